"""Configuration: compose `configs/defaults.yaml` + an experiment + `key=value` overrides, then validate.

    cfg = compose(["experiment=<dataset>/<model>", "train.lr=5e-3"])

Order of precedence (last wins): defaults.yaml, configs/experiment/<experiment>.yaml, command-line overrides.
The schema is defaults.yaml itself, read by dvp.core.schema (SCHEMA): a key absent there, a value of another
type, a null where the key may not be null, a NaN or infinity, an interpolation that does not resolve or a key
given twice is an error that names the key. `validate` then checks every value against its choices, range and
order, and the combinations that cannot run on this launch (the batch split over the processes), before any data
is read or model is built. What needs the data or the model (dataset and model names, image shapes, latent
groups) is checked by those layers (dvp.data.catalog, dvp.model.checks; dvp.train.config runs them all).
`experiment=` only names files under configs/experiment (`experiments()` lists them).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dvp.core.errors import ConfigError
from dvp.core.schema import load_schema

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA = load_schema(CONFIG_DIR / "defaults.yaml", "config key")
"""Every key of the run config: default, type, range, choices, order and comment, read from configs/defaults.yaml."""


def experiments() -> list[str]:
    """Names accepted by `experiment=`, '<dataset>/<model>' for each configs/experiment/<dataset>/<model>.yaml."""
    root = CONFIG_DIR / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))


def _merge(base: DictConfig, other: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: unknown or invalid config key '{key}' "
                          f"(see configs/defaults.yaml for every key)") from None


def _resolve(cfg: DictConfig) -> dict:
    """The config as a plain dict with ${...} interpolations resolved; a bad one is a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': cannot resolve its interpolation ({reason}); give a plain value "
                          "or ${other.key} of an existing key") from None


def split_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """`key=value` strings as (key, value) pairs; refuses an argument without '=' and a key given twice."""
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"argument '{arg}' is not key=value (e.g. train.lr=5e-3, experiment=<dataset>/<model>)")
        if key in seen:
            raise ConfigError(f"key '{key}' is given twice on the command line ({seen[key]} and {arg}); "
                              "give it once")
        seen[key] = arg
        pairs.append((key, value))
    return pairs


def experiment_path(name: str) -> Path:
    """configs/experiment/<name>.yaml for a name listed by `experiments()`; nothing outside that folder."""
    if name not in experiments():
        raise ConfigError(f"experiment '{name}' not found; allowed: {', '.join(experiments())} "
                          "(add your own as configs/experiment/<dataset>/<name>.yaml)")
    return CONFIG_DIR / "experiment" / f"{name}.yaml"


def _defaults() -> DictConfig:
    return OmegaConf.load(CONFIG_DIR / "defaults.yaml")


def _checked(cfg: DictConfig) -> DictConfig:
    """Resolve, type-check and validate a merged config; the result is a struct-mode DictConfig."""
    out = OmegaConf.create(SCHEMA.check_types(_resolve(cfg)))
    OmegaConf.set_struct(out, True)
    validate(out)
    return out


def _check_known(keys: Iterable[str], cfg: DictConfig) -> None:
    """Refuse a command-line key that names nothing in `cfg`, by its full name (a merge would name only its first
    unknown part, e.g. 'optim' of optim.lr)."""
    missing = object()
    for key in keys:
        try:
            found = OmegaConf.select(cfg, key, default=missing)
        except OmegaConfBaseException:     # e.g. '[': not a key at all
            found = missing
        if found is missing:
            raise ConfigError(f"unknown config key '{key}' (see configs/defaults.yaml for every key)")


def parse_overrides(pairs: list[tuple[str, str]]) -> DictConfig:
    """(key, value) pairs as a DictConfig, each value read as YAML; a value that does not parse (e.g. '[2,2') is a
    ConfigError naming its key."""
    for key, value in pairs:
        try:
            OmegaConf.from_dotlist([f"{key}={value}"])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            reason = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config key '{key}': cannot parse the value {value!r} ({reason}); give a number, "
                              "true/false, a string or a list like [2,2]") from None
    try:
        return OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs])
    except OmegaConfBaseException as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"cannot combine the overrides {[f'{k}={v}' for k, v in pairs]}: {reason}") from None


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the resolved config from `key=value` strings; raises ConfigError on any bad key or value."""
    pairs = split_overrides(list(overrides or []))
    cfg = _defaults()
    OmegaConf.set_struct(cfg, True)
    name = dict(pairs).get("experiment")
    if name is not None:
        cfg = _merge(cfg, OmegaConf.load(experiment_path(name)), f"experiment {name}")
        cfg.experiment = name
    _check_known([k for k, _ in pairs], cfg)
    dotlist = parse_overrides([(k, v) for k, v in pairs if k != "experiment"])
    return _checked(_merge(cfg, dotlist, "command line"))


def _check_batch_split(cfg: DictConfig, world_size: int) -> None:
    """train.batch_size (global, per optimizer step) = world_size x dist.micro_batch x accumulation steps."""
    b, micro = cfg.train.batch_size, cfg.dist.micro_batch
    if cfg.dist.engine == "torch" and world_size > 1:
        raise ConfigError(f"dist.engine=torch runs in one process but {world_size} were launched; use "
                          "dist.engine=deepspeed (or auto)")
    if micro is None:
        if b % world_size:
            raise ConfigError(f"train.batch_size={b} (the global batch) does not split over {world_size} "
                              f"processes; use a multiple of {world_size}")
    elif b % (world_size * micro):
        raise ConfigError(f"train.batch_size={b} (the global batch) is not a multiple of {world_size} processes "
                          f"x dist.micro_batch={micro}; choose dist.micro_batch dividing {b // world_size}"
                          if b % world_size == 0 else
                          f"train.batch_size={b} (the global batch) does not split over {world_size} processes; "
                          f"use a multiple of {world_size} x dist.micro_batch={micro}")


def validate(cfg: DictConfig, n_train: int | None = None, world_size: int = 1) -> None:
    """Raise ConfigError for any value outside its choices or range or against its order (SCHEMA), or any
    combination that cannot run; `n_train` (the training-split size, once the data is loaded) and `world_size`
    (processes of the launch) add their checks. The data and model layers check what they name
    (dvp.data.catalog, dvp.model.checks)."""
    SCHEMA.check_values(OmegaConf.to_container(cfg))
    if not cfg.wandb.project:
        raise ConfigError("wandb.project must not be empty")
    if n_train is not None and cfg.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split of "
                          f"data '{cfg.data.name}' ({n_train} images); use at most {n_train}")
    _check_batch_split(cfg, world_size)


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict (what run dirs and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a config saved by `to_dict` (keys added since take their defaults), checked like `compose`."""
    return _checked(OmegaConf.merge(_defaults(), OmegaConf.create(d)))
