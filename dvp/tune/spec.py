"""A sweep file (`sweeps/<name>.yaml`): what to train, over which axes, how to search and stop, on what resources.
Loaded and checked in full before Ray starts: an unknown key, a value of the wrong type, an axis that names no
config key or a value that config would refuse is a one-line ConfigError naming it. The keys, their defaults,
types, ranges and comments are configs/sweep.yaml, read by the run config's schema mechanism (dvp.core.schema).
`load_sweep` parses (the file and the command line), merges (over the defaults) and checks (the sweep's keys,
then every trial's config as dvp-train would check it).

    spec = load_sweep("digits_depth_pseudo", ["num_samples=2", "train.max_epochs=3"])
    spec.param_space()                    # Tune's search space: {"arm": ..., "space": {...}}
    spec.trial_overrides(trial_config)    # the dvp-train overrides of one trial (its reproduce command)

A trial is a set of `key=value` overrides on an experiment: `experiment=<family>`, the sweep's fixed
`overrides`, the family's own axes (the values of an `experiments:` entry, crossed as a grid: pseudo-input
counts are `model.ctx_size` for dvp_vae and `model.num_pseudo` for vampprior) and the shared `space` axes (any
Tune domain, below). `dvp-train <those overrides>` reproduces the trial.

Shared axes, `space: {dotted.key: DOMAIN}`; DOMAIN is a plain value (fixed) or one of
    {grid: [v1, v2, ...]}  every value, crossed with the other grid axes (times num_samples)
    {choice: [v1, ...]}    one at random per sample
    {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {quniform: [lo, hi, q]}
    {randint: [lo, hi]}  (hi excluded)  {qrandint: [lo, hi, q]}  (hi included)
"""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from dvp.core.config import CONFIG_DIR, experiments, split_overrides
from dvp.core.config import SCHEMA as RUN_SCHEMA
from dvp.core.errors import ConfigError
from dvp.core.schema import load_schema
from dvp.train.config import compose, validate

SWEEP_DIR = Path(__file__).resolve().parents[2] / "sweeps"
TRAIN_SECTIONS = ("data", "model", "train", "dist", "eval")
"""Command-line keys under these sections are fixed trial overrides; every other key sets the sweep file."""
DOMAINS = {"grid": None, "choice": None, "uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2,
           "qrandint": 3}
"""Shared-axis domains and how many numbers each takes (None: a non-empty list of values)."""
SEARCHERS = {"basic": None, "optuna": "ray.tune.search.optuna.OptunaSearch",
             "hyperopt": "ray.tune.search.hyperopt.HyperOptSearch",
             "bayesopt": "ray.tune.search.bayesopt.BayesOptSearch",
             "hebo": "ray.tune.search.hebo.HEBOSearch", "nevergrad": "ray.tune.search.nevergrad.NevergradSearch",
             "ax": "ray.tune.search.ax.AxSearch", "zoopt": "ray.tune.search.zoopt.ZOOptSearch",
             "bohb": "ray.tune.search.bohb.TuneBOHB"}
"""search.algorithm: basic is Tune's grid + random sampling; the others are Tune's searchers (their package
must be installed; keyword arguments go next to `algorithm`)."""
SCHEDULERS = {"asha": "ray.tune.schedulers.ASHAScheduler", "fifo": "ray.tune.schedulers.FIFOScheduler",
              "hyperband": "ray.tune.schedulers.HyperBandScheduler",
              "median": "ray.tune.schedulers.MedianStoppingRule", "pbt": "ray.tune.schedulers.PopulationBasedTraining",
              "bohb": "ray.tune.schedulers.HyperBandForBOHB"}
"""scheduler.name, with keyword arguments next to it; time_attr defaults to `epoch` (finished epochs)."""

SCHEMA = load_schema(CONFIG_DIR / "sweep.yaml", "sweep key", base=RUN_SCHEMA, out_of_range="must be")
"""Every key of a sweep file: default, type, range, choices and comment, read from configs/sweep.yaml."""


def find_sweep(name: str) -> Path:
    """`name` as a file path, else sweeps/<name>.yaml of this checkout."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = SWEEP_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
    raise ConfigError(f"sweep '{name}' not found: give a YAML file or one of {', '.join(known)} (sweeps/*.yaml)")


def _value_text(v: Any) -> str:
    """A value as dvp-train reads it on a command line: [1,2], true, null, 0.001, text."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value_text(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return repr(v) if isinstance(v, float) else str(v)


@dataclass
class Resources:
    workers: tuple[int, int]       # (min, max); min == max: a fixed size
    cpus_per_worker: float
    gpus_per_worker: float
    check: bool

    @property
    def elastic(self) -> bool:
        return self.workers[0] != self.workers[1]


@dataclass
class SweepSpec:
    """A checked sweep file. `arms`: one dict of overrides per family x family-grid point."""
    name: str
    path: str
    raw: dict[str, Any]
    arms: list[dict[str, Any]]
    space: dict[str, Any]
    overrides: list[str]
    metric: str
    mode: str
    search: dict[str, Any]
    scheduler: dict[str, Any]
    num_samples: int
    max_concurrent_trials: int
    resources: Resources
    max_failures: int
    storage: str
    wandb: dict[str, Any]
    ray: dict[str, Any]
    report: bool = True
    max_epochs: int = field(default=0)

    # ---- where things go ---------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        """Storage on a cloud URI (s3://, gs://, ...), not a file system path."""
        return "://" in self.storage

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}" if self.remote else str(Path(self.storage) / self.name)

    def runs_dir(self) -> Path:
        """Where trials keep their dvp run dirs: the sweep folder, or a node-local one when storage is remote
        (checkpoints then travel through Ray's storage)."""
        if self.remote:
            return Path.home() / "dvp_runs" / self.name
        return Path(self.sweep_dir) / "runs"

    # ---- Tune ----------------------------------------------------------------------------------------------------
    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the arms (grid with the basic searcher, else a choice) and the shared axes."""
        from ray import tune
        basic = self.search["algorithm"] == "basic"
        arm = tune.grid_search(self.arms) if basic else tune.choice(self.arms)
        space = {}
        for key, domain in self.space.items():
            if isinstance(domain, dict):
                (kind, args), = domain.items()
                space[key] = (tune.grid_search(list(args)) if kind == "grid" and basic else
                              tune.choice(list(args)) if kind in ("grid", "choice") else getattr(tune, kind)(*args))
            else:
                space[key] = domain
        return {"arm": arm, "space": space}

    def trial_overrides(self, config: dict[str, Any]) -> list[str]:
        """The dvp-train overrides of the trial with Tune config `config` (experiment first, then the fixed
        overrides, then the axes)."""
        arm = dict(config["arm"])
        out = [f"experiment={arm.pop('experiment')}", *self.overrides]
        out += [f"{k}={_value_text(v)}" for k, v in arm.items()]
        out += [f"{k}={_value_text(v)}" for k, v in config.get("space", {}).items()]
        return out

    def reproduce_command(self, config: dict[str, Any]) -> str:
        return "dvp-train " + " ".join(shlex.quote(o) for o in self.trial_overrides(config))

    def trial_cpus(self) -> float:
        return self.resources.workers[0] * self.resources.cpus_per_worker

    def to_yaml(self) -> str:
        """The sweep as loaded (file + command line), as written into the sweep folder."""
        return yaml.safe_dump(self.raw, sort_keys=False)


# ---- loading and checking ------------------------------------------------------------------------------------------
def _arms(experiments_: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One dict of overrides per family x point of the family's own grid."""
    if not experiments_:
        raise ConfigError(f"'experiments' must map each experiment (one of {', '.join(experiments())}) to "
                          "its own axes, e.g. {{digits/dvp_vae: {{model.ctx_size: [2, 4]}}}}")
    arms = []
    for name, axes in experiments_.items():
        if name not in experiments():
            raise ConfigError(f"experiment '{name}' not found; allowed: {', '.join(experiments())}")
        axes = axes or {}
        if not isinstance(axes, dict):
            raise ConfigError(f"experiments.{name} must map dotted config keys to lists of values")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"experiments.{name}.{key} must be a non-empty list of values "
                                  f"(e.g. [2, 4]), got {values!r}")
        keys = list(axes)
        for point in itertools.product(*(axes[k] for k in keys)):
            arms.append({"experiment": name, **dict(zip(keys, point))})
    return arms


def _domain_values(key: str, domain: Any, where: str) -> list[Any]:
    """The values of a shared axis to try in a config check: every listed value, or the range's ends."""
    if not isinstance(domain, dict):
        return [domain]
    if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
        raise ConfigError(f"{where}: space.{key} must be a value or one of "
                          f"{', '.join('{' + d + ': ...}' for d in DOMAINS)}, got {domain!r}")
    (kind, args), = domain.items()
    n = DOMAINS[kind]
    if n is None:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: space.{key}.{kind} must be a non-empty list of values, got {args!r}")
        return list(args)
    if (not isinstance(args, list) or len(args) != n
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{where}: space.{key}.{kind} takes {n} numbers "
                          f"([lo, hi{', q' if n == 3 else ''}]), got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"{where}: space.{key}.{kind} needs lo < hi{' and lo > 0' if kind == 'loguniform' else ''}, "
                          f"got {args!r}")
    if kind in ("randint", "qrandint"):
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: space.{key}.{kind} takes integers, got {args!r}")
        return [lo, hi - 1 if kind == "randint" else hi]
    return [lo, hi]


def _check_trials(spec: SweepSpec, where: str) -> None:
    """Compose the config of every arm with every value of every shared axis (and at every world size of the
    worker range): any key or value that dvp-train would refuse fails here, named."""
    if not spec.metric.startswith("val/"):
        raise ConfigError(f"{where}: metric '{spec.metric}' must be a validation metric, e.g. val/nelbo (nats) or "
                          "val/loss (bits/dim)")
    fixed_keys = {k for k, _ in split_overrides(spec.overrides)}
    for key in spec.space:
        if key in fixed_keys:
            raise ConfigError(f"{where}: '{key}' is both a fixed override and a space axis; keep one")
    for arm in spec.arms:
        for key in arm:
            if key in fixed_keys or key in spec.space:
                raise ConfigError(f"{where}: '{key}' is both an axis of {arm['experiment']} and a fixed override or "
                                  "space axis; keep one")
    axes = [(k, v) for k, d in spec.space.items() for v in _domain_values(k, d, where)]
    first = {k: _domain_values(k, d, where)[0] for k, d in spec.space.items()}
    for arm in spec.arms:
        for key, value in [(None, None), *axes]:
            config = {"arm": arm, "space": {**first, **({key: value} if key else {})}}
            try:
                cfg = compose(spec.trial_overrides(config))
                for world in range(spec.resources.workers[0], spec.resources.workers[1] + 1):
                    validate(cfg, world_size=world)
            except ConfigError as e:
                what = f"{key}={_value_text(value)}" if key else "its fixed overrides"
                raise ConfigError(f"{where}: trial {arm} with {what}: {e}") from None
            spec.max_epochs = max(spec.max_epochs, cfg.train.max_epochs)


def load_sweep(name: str, argv: list[str] | None = None) -> SweepSpec:
    """Read sweeps/<name>.yaml (or a file), apply `key=value` arguments (sweep keys, or trial overrides for keys
    under data/model/train/dist/eval), and check everything; ConfigError on the first problem."""
    path = find_sweep(name)
    raw, extra, where = _parse(path, list(argv or []))
    try:
        spec = _check(raw, _merge(raw, extra), path)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check_trials(spec, where)
    return spec


def _parse(path: Path, argv: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]], str]:
    """The sweep file with the command line's sweep keys set, the command line's trial overrides, and how errors
    name the sweep."""
    where = f"sweep {path}"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of sweep keys")
    extra, sets = [], []
    for key, value in split_overrides(argv):
        (extra if key.split(".")[0] in TRAIN_SECTIONS else sets).append((key, value))
    if sets:
        try:
            cli = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in sets]))
        except Exception as e:  # OmegaConf parse errors
            raise ConfigError(f"command line: cannot parse {sets}: {' '.join(str(e).split())}") from None
        raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.create(cli)))
        where = f"{where} (with {' '.join(f'{k}={v}' for k, v in sets)})"
    raw.setdefault("name", path.stem)
    return raw, extra, where


def _merge(raw: dict[str, Any], extra: list[tuple[str, str]]) -> dict[str, Any]:
    """The file's keys (typed by SCHEMA) over the defaults, its overrides replaced by the command line's."""
    given = {k for k, _ in extra}
    raw["overrides"] = [o for o in raw.get("overrides") or [] if o.split("=", 1)[0] not in given]
    raw["overrides"] += [f"{k}={v}" for k, v in extra]
    SCHEMA.check_types(raw)
    merged = {k: ({**v, **raw.get(k, {})} if isinstance(v, dict) and k != "space" else raw.get(k, v))
              for k, v in SCHEMA.defaults().items()}
    merged["space"] = raw.get("space") or {}
    return merged


def _check(raw: dict[str, Any], merged: dict[str, Any], path: Path) -> SweepSpec:
    """The sweep's own checks of `merged` (the trials' configs are `_check_trials`'), then the SweepSpec (`raw`: the
    file and command line as given, what the sweep folder records)."""
    for o in merged["overrides"]:
        if o.split("=")[0] in ("run_dir", "experiment"):
            raise ConfigError(f"override '{o}' is set per trial by the sweep; remove it")
    r = merged["resources"]
    workers = r["workers"] if isinstance(r["workers"], list) else [r["workers"], r["workers"]]
    if not 1 <= workers[0] <= workers[1]:
        raise ConfigError(f"resources.workers={r['workers']} needs 1 <= min <= max")
    if merged["ray"]["nodes"] < 1 or merged["ray"]["wait_s"] <= 0:
        raise ConfigError(f"ray.nodes must be >= 1 and ray.wait_s > 0 (got {merged['ray']['nodes']} and "
                          f"{merged['ray']['wait_s']})")
    SCHEMA.check_values(merged)
    if r["gpus_per_worker"] != int(r["gpus_per_worker"]):
        raise ConfigError(f"resources.gpus_per_worker={r['gpus_per_worker']} shares a GPU between workers, "
                          "which NCCL refuses (two ranks on one GPU); use 0 (CPU) or a whole number of GPUs")
    if merged["search"]["algorithm"] not in SEARCHERS:
        raise ConfigError(f"search.algorithm={merged['search']['algorithm']!r}; choose one of {', '.join(SEARCHERS)}")
    if merged["scheduler"].get("name") not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={merged['scheduler'].get('name')!r}; choose one of "
                          f"{', '.join(SCHEDULERS)}")
    if not str(merged["name"]).replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name={merged['name']!r} may hold letters, digits, - and _ only (a folder name)")
    return SweepSpec(name=merged["name"], path=str(path), raw={**raw, "name": merged["name"]},
                     arms=_arms(merged["experiments"]), space=merged["space"],
                     overrides=merged["overrides"], metric=merged["metric"], mode=merged["mode"],
                     search=merged["search"], scheduler=merged["scheduler"], num_samples=merged["num_samples"],
                     max_concurrent_trials=merged["max_concurrent_trials"],
                     resources=Resources((workers[0], workers[1]), float(r["cpus_per_worker"]),
                                         float(r["gpus_per_worker"]), bool(r["check"])),
                     max_failures=merged["max_failures"], storage=_absolute(str(merged["storage"])),
                     wandb=merged["wandb"], ray=merged["ray"], report=bool(merged["report"]))


def _absolute(storage: str) -> str:
    """A local storage path made absolute where the sweep is started: the trials' drivers and workers run in Ray
    actors with other working folders (on a cluster, the head's home: `ray submit`'s runs/sweeps is ~/runs/sweeps)."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def load_saved(sweep_dir: Path) -> SweepSpec:
    """The spec saved in a sweep folder (`sweep.yaml`), for resuming and reporting from the folder alone."""
    path = Path(sweep_dir) / "sweep.yaml"
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no sweep.yaml); give the folder dvp-sweep printed")
    return load_sweep(str(path))

