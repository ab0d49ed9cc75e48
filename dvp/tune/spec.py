"""A sweep file (`sweeps/<name>.yaml`): what to train, over which axes, how to search and stop, on what resources.
Loaded and checked in full before Ray starts: an unknown key, a value of the wrong type, an axis that names no
config key or a value that config would refuse is a one-line ConfigError naming it.

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

from dvp.core.config import CHOICES, compose, experiments, split_overrides, validate
from dvp.core.errors import ConfigError

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

DEFAULTS: dict[str, Any] = {
    "name": None,                 # the sweep's folder under `storage` and its wandb group (default: file name)
    "description": "",            # one line shown in the report
    "experiments": None,          # {experiment: {dotted.key: [values]}}: families and their own grid axes
    "space": {},                  # {dotted.key: DOMAIN}: axes shared by every family
    "overrides": [],              # ["key=value", ...]: fixed for every trial
    "metric": "val/nelbo",        # what the scheduler and the best trial use (val/<any validation key>)
    "mode": "min",                # min | max
    "search": {"algorithm": "basic"},     # basic | a Tune searcher by name (SEARCHERS), + its kwargs
    "scheduler": {"name": "asha"},        # a Tune scheduler by name (SCHEDULERS), + its kwargs
    "num_samples": 1,             # samples of the space (the grid is repeated num_samples times)
    "max_concurrent_trials": 0,   # trials at once (0: as many as the cluster's CPUs / GPUs hold)
    "resources": {"workers": 2,   # Ray Train workers (DeepSpeed processes) per trial, or [min, max] (elastic)
                  "cpus_per_worker": 1.0,   # CPUs per worker (also its torch threads when it has no GPU)
                  "gpus_per_worker": 0.0,   # GPUs per worker: 0 (CPU workers) or a whole number (no sharing)
                  "check": True},           # refuse requests the cluster cannot hold (false: an autoscaler adds nodes)
    "max_failures": 2,            # restarts of a trial whose worker dies (from its last checkpoint)
    "storage": "runs/sweeps",     # where the sweep folder goes: a local folder, NFS, or s3://bucket/prefix
    "report": True,               # write the table and plots (dvp-report) into <sweep folder>/report/ at the end
    "wandb": {"project": "dvp",   # wandb project of the trials (group: the sweep's name)
              "entity": None,     # wandb entity
              "mode": "offline"},  # online | offline | disabled
    "ray": {"address": None,      # an existing Ray cluster (else RAY_ADDRESS, else a private local Ray)
            "num_cpus": None,     # CPUs of the private local Ray (default: this machine's)
            "num_gpus": None,     # GPUs of the private local Ray (default: detected)
            "nodes": 1,           # wait (up to ray.wait_s) until the cluster has this many live nodes
            "wait_s": 300},       # how long to wait for them (Slurm's `srun ray start`, an autoscaler's min_workers)
}
NULLABLE = {"name": str, "wandb.entity": str, "ray.address": str, "ray.num_cpus": int, "ray.num_gpus": int}


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
def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and f"{prefix}{k}" in ("search", "scheduler", "resources", "wandb", "ray"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown keys and wrong types of the sweep file itself (search / scheduler take any extra kwargs)."""
    known = _flat(DEFAULTS)
    for key, value in _flat(raw).items():
        section = key.split(".")[0]
        if key not in known:
            if section in ("search", "scheduler") and "." in key:
                continue
            raise ConfigError(f"{where}: unknown sweep key '{key}'; allowed: {', '.join(sorted(known))}")
        default = known[key]
        if value is None:
            if key in NULLABLE:
                continue
            raise ConfigError(f"{where}: sweep key '{key}' cannot be null")
        want = NULLABLE.get(key) if default is None else type(default)
        if key == "resources.workers":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value))
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = want is None or isinstance(value, want)
        if not ok:
            shown = "an integer or [min, max]" if key == "resources.workers" else (want.__name__ if want else "?")
            raise ConfigError(f"{where}: sweep key '{key}' expects {shown}, got {value!r}")


def _arms(experiments_: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if not isinstance(experiments_, dict) or not experiments_:
        raise ConfigError(f"{where}: 'experiments' must map each experiment (one of {', '.join(experiments())}) to "
                          "its own axes, e.g. {{digits/dvp_vae: {{model.ctx_size: [2, 4]}}}}")
    arms = []
    for name, axes in experiments_.items():
        if name not in experiments():
            raise ConfigError(f"{where}: experiment '{name}' not found; allowed: {', '.join(experiments())}")
        axes = axes or {}
        if not isinstance(axes, dict):
            raise ConfigError(f"{where}: experiments.{name} must map dotted config keys to lists of values")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: experiments.{name}.{key} must be a non-empty list of values "
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
    where = f"sweep {path}"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of sweep keys")
    extra, sets = [], []
    for key, value in split_overrides(list(argv or [])):
        (extra if key.split(".")[0] in TRAIN_SECTIONS else sets).append((key, value))
    if sets:
        try:
            cli = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in sets]))
        except Exception as e:  # OmegaConf parse errors
            raise ConfigError(f"command line: cannot parse {sets}: {' '.join(str(e).split())}") from None
        raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.create(cli)))
        where = f"{where} (with {' '.join(f'{k}={v}' for k, v in sets)})"
    raw.setdefault("name", path.stem)
    given = {k for k, _ in extra}            # the command line's trial overrides replace the file's
    raw["overrides"] = [o for o in raw.get("overrides") or [] if o.split("=", 1)[0] not in given]
    raw["overrides"] += [f"{k}={v}" for k, v in extra]
    _check_keys(raw, where)
    merged = {k: ({**v, **raw.get(k, {})} if isinstance(v, dict) else raw.get(k, v)) for k, v in DEFAULTS.items()}
    merged["space"] = raw.get("space") or {}
    if not isinstance(merged["space"], dict):
        raise ConfigError(f"{where}: 'space' must map dotted config keys to domains")
    for o in merged["overrides"]:
        if o.split("=")[0] in ("run_dir", "experiment"):
            raise ConfigError(f"{where}: override '{o}' is set per trial by the sweep; remove it")
    r = merged["resources"]
    workers = r["workers"] if isinstance(r["workers"], list) else [r["workers"], r["workers"]]
    if not 1 <= workers[0] <= workers[1]:
        raise ConfigError(f"{where}: resources.workers={r['workers']} needs 1 <= min <= max")
    if r["cpus_per_worker"] <= 0 or r["gpus_per_worker"] < 0:
        raise ConfigError(f"{where}: resources.cpus_per_worker must be > 0 and gpus_per_worker >= 0")
    if r["gpus_per_worker"] != int(r["gpus_per_worker"]):
        raise ConfigError(f"{where}: resources.gpus_per_worker={r['gpus_per_worker']} shares a GPU between workers, "
                          "which NCCL refuses (two ranks on one GPU); use 0 (CPU) or a whole number of GPUs")
    if merged["mode"] not in ("min", "max"):
        raise ConfigError(f"{where}: mode={merged['mode']!r}; choose min or max")
    if merged["search"]["algorithm"] not in SEARCHERS:
        raise ConfigError(f"{where}: search.algorithm={merged['search']['algorithm']!r}; choose one of "
                          f"{', '.join(SEARCHERS)}")
    if merged["scheduler"].get("name") not in SCHEDULERS:
        raise ConfigError(f"{where}: scheduler.name={merged['scheduler'].get('name')!r}; choose one of "
                          f"{', '.join(SCHEDULERS)}")
    if merged["wandb"]["mode"] not in CHOICES["wandb.mode"]:
        raise ConfigError(f"{where}: wandb.mode={merged['wandb']['mode']!r}; choose one of "
                          f"{', '.join(CHOICES['wandb.mode'])}")
    for key in ("num_samples",):
        if merged[key] < 1:
            raise ConfigError(f"{where}: {key}={merged[key]} must be >= 1")
    if merged["ray"]["nodes"] < 1 or merged["ray"]["wait_s"] <= 0:
        raise ConfigError(f"{where}: ray.nodes must be >= 1 and ray.wait_s > 0 (got {merged['ray']['nodes']} and "
                          f"{merged['ray']['wait_s']})")
    for key in ("max_concurrent_trials", "max_failures"):
        if merged[key] < 0:
            raise ConfigError(f"{where}: {key}={merged[key]} must be >= 0")
    if not str(merged["name"]).replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{where}: name={merged['name']!r} may hold letters, digits, - and _ only (a folder name)")
    spec = SweepSpec(name=merged["name"], path=str(path), raw={**raw, "name": merged["name"]},
                     arms=_arms(merged["experiments"], where), space=merged["space"],
                     overrides=merged["overrides"], metric=merged["metric"], mode=merged["mode"],
                     search=merged["search"], scheduler=merged["scheduler"], num_samples=merged["num_samples"],
                     max_concurrent_trials=merged["max_concurrent_trials"],
                     resources=Resources((workers[0], workers[1]), float(r["cpus_per_worker"]),
                                         float(r["gpus_per_worker"]), bool(r["check"])),
                     max_failures=merged["max_failures"], storage=_absolute(str(merged["storage"])),
                     wandb=merged["wandb"],
                     ray=merged["ray"], report=bool(merged["report"]))
    _check_trials(spec, where)
    return spec


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

