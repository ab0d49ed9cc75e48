"""Configuration: compose `configs/defaults.yaml` + an experiment + `key=value` overrides, then validate.

    cfg = compose(["experiment=mnist/dvp_vae", "train.lr=5e-3"])

Order of precedence (last wins): defaults.yaml, configs/experiment/<experiment>.yaml, command-line overrides.
The schema is defaults.yaml itself: a key absent there, a value whose type differs from the default's, a null
where the default is not null (NULLABLE lists the keys that may be null), a NaN or infinity, an interpolation that
does not resolve or a key given twice is an error that names the key. `validate` then checks every numeric key
against its range (RANGES) and the combinations that cannot work (pseudo-input larger than the image, latent width
!= image channels under latent aggregation, ...) before any data is read or model is built. `experiment=` only
names files under configs/experiment (`experiments()` lists them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dvp.core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "omniglot": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.name": ("digits", "mnist", "omniglot", "cifar10", "npz"),
    "data.encoder_sees": ("grey", "binary"),
    "model.name": ("dvp_vae", "ladder", "vampprior"),
    "model.likelihood": ("bernoulli", "logistic_mixture"),
    "model.ctx_type": ("dct", "downsample"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "dist.zero_stage": (0, 1, 2, 3),
    "dist.engine": ("auto", "torch", "deepspeed"),
    "dist.device": ("auto", "cpu", "cuda"),
    "eval.is_weight": ("iwae", "analytic_kl"),
    "eval.weights": ("ema", "raw"),
    "eval.precision": ("fp32", "bf16"),
    "wandb.mode": ("online", "offline", "disabled"),
}


NULLABLE: dict[str, type] = {
    "experiment": str, "run_dir": str, "data.root": str, "data.val_size": int, "model.input_mean": float,
    "model.input_std": float, "train.max_steps": int, "train.num_threads": int, "eval.max_images": int,
    "dist.micro_batch": int, "dist.rendezvous_timeout_s": float, "train.channels_last": bool,
    "eval.chunks_per_pass": int,
    "wandb.entity": str, "wandb.group": str,
}
"""Keys whose default is null, with the type a non-null value must have; every other key refuses null."""


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric key: lo <= v <= hi, with open ends where `lo_open`/`hi_open`."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        return (f"in {'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}"
                f"{')' if self.hi_open else ']'}")


def _number(v: float) -> str:
    """A bound as written: integers in full (4294967295), other numbers by %g."""
    return str(v) if isinstance(v, int) else f"{v:g}"


POSITIVE, AT_LEAST_1, NON_NEGATIVE, ANY = Range(0, lo_open=True), Range(1), Range(0), Range()
SEED = Range(0, 2 ** 32 - 1)          # torch generators take < 2**64, and the batch order seeds seed + epoch
INT64_MAX = 2 ** 63 - 1               # torch reads every integer as int64
RANGES: dict[str, Range] = {
    "data.val_size": NON_NEGATIVE, "data.split_seed": SEED,
    "model.num_mixtures": AT_LEAST_1, "model.latent_width": AT_LEAST_1, "model.num_ch": AT_LEAST_1,
    "model.block_ch_mult": POSITIVE, "model.enc_blocks_per_scale": AT_LEAST_1, "model.input_mean": ANY,
    "model.input_std": POSITIVE, "model.min_logvar": ANY, "model.max_logvar": ANY, "model.ctx_size": AT_LEAST_1,
    "model.ctx_logvar_min": ANY, "model.ctx_logvar_max": ANY, "model.num_pseudo": AT_LEAST_1,
    "model.diffusion.model_channels": Range(16), "model.diffusion.num_res_blocks": AT_LEAST_1,
    "model.diffusion.dropout": Range(0, 1, hi_open=True), "model.diffusion.T": AT_LEAST_1,
    "model.diffusion.gamma_min": ANY, "model.diffusion.gamma_max": ANY,
    "train.lr": POSITIVE, "train.weight_decay": NON_NEGATIVE, "train.batch_size": AT_LEAST_1,
    "train.eval_batch_size": AT_LEAST_1, "train.max_epochs": AT_LEAST_1, "train.max_steps": AT_LEAST_1,
    "train.lr_epochs": AT_LEAST_1, "train.lr_min": NON_NEGATIVE, "train.warmup_epochs": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE, "train.grad_skip": NON_NEGATIVE, "train.max_skips": AT_LEAST_1,
    "train.ema": Range(0, 1, hi_open=True), "train.patience": AT_LEAST_1, "train.seed": SEED,
    "train.max_minutes": NON_NEGATIVE, "train.ckpt_every": NON_NEGATIVE, "train.log_every": AT_LEAST_1,
    "train.fp16_init_scale": POSITIVE,
    "train.num_threads": Range(1, 1024), "dist.zero_stage": Range(0, 3), "dist.micro_batch": AT_LEAST_1,
    "dist.timeout_s": POSITIVE, "dist.rendezvous_timeout_s": POSITIVE,
    "eval.is_samples": AT_LEAST_1,
    "eval.is_chunk": AT_LEAST_1, "eval.max_images": AT_LEAST_1, "eval.batch_size": AT_LEAST_1,
    "eval.chunks_per_pass": AT_LEAST_1,
}
"""The allowed range of every numeric key of configs/defaults.yaml (a test checks that none is missing)."""
ORDERED: tuple[tuple[str, str], ...] = (("model.min_logvar", "model.max_logvar"),
                                        ("model.ctx_logvar_min", "model.ctx_logvar_max"),
                                        ("model.diffusion.gamma_min", "model.diffusion.gamma_max"),
                                        ("train.lr_min", "train.lr"))
"""Pairs (a, b) that must satisfy a < b (lr_min <= lr)."""


def experiments() -> list[str]:
    """Names accepted by `experiment=`, e.g. 'mnist/dvp_vae'."""
    root = CONFIG_DIR / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))


def _leaves(cfg: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], cfg


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def _typed(key: str, default: Any, value: Any) -> Any:
    """`value` checked against the type of its default (or NULLABLE's type); returns it, numbers given for a
    string key as strings. Raises ConfigError naming the key, the type and an example."""
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"config key '{key}' cannot be null or empty; it expects {type(default).__name__} "
                          f"(default {default!r})")
    want = NULLABLE.get(key, str) if default is None else type(default)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if want is bool or isinstance(value, bool):
        ok = want is bool and isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float))
    elif want is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, want)
    if not ok:
        example = f"default {default!r}" if default is not None else "default null"
        choices = f"; choose one of {list(CHOICES[key])}" if key in CHOICES else ""
        raise ConfigError(f"config key '{key}' expects {want.__name__} ({example}), got {value!r}{choices}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if any(isinstance(v, int) and abs(v) > INT64_MAX for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"config key '{key}' = {value!r} is too large (integers must be below 2**63)")
    return value


def _check_types(defaults: dict, merged: dict) -> dict:
    """Every leaf must be a known key and keep the type of its default (int is accepted where a float is
    expected); returns `merged` with numbers given for string keys turned into strings."""
    want = dict(_leaves(defaults))
    for key, value in list(_leaves(merged)):
        if key not in want:
            raise ConfigError(f"unknown config key '{key}' (see configs/defaults.yaml for every key)")
        typed = _typed(key, want[key], value)
        if typed is not value:
            _set(merged, key, typed)
    return merged


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
            raise ConfigError(f"argument '{arg}' is not key=value (e.g. train.lr=5e-3, experiment=mnist/dvp_vae)")
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
    resolved = _check_types(OmegaConf.to_container(_defaults()), _resolve(cfg))
    out = OmegaConf.create(resolved)
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


def group_resolutions(cfg: DictConfig, shape: tuple[int, int, int]) -> list[int]:
    """Spatial size of each latent group, finest first: H/2^(i+1), or H/2^i with start_scale_at_x."""
    _, h, _ = shape
    offset = 0 if cfg.model.start_scale_at_x else 1
    return [h // 2 ** (i + offset) for i in range(len(cfg.model.latent_scales))]


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


def validate(cfg: DictConfig, shape: tuple[int, int, int] | None = None, n_train: int | None = None,
             world_size: int = 1) -> None:
    """Raise ConfigError for any value outside its choices or range, or any combination that cannot run;
    `shape` and `n_train` (the image shape and training-split size, once the data is loaded) and `world_size`
    (processes of the launch) add their checks."""
    flat = dict(_leaves(OmegaConf.to_container(cfg)))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {list(allowed)}")
    for key, allowed in RANGES.items():
        value = flat[key]
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")
    for lower, upper in ORDERED:
        if flat[lower] > flat[upper] or (flat[lower] == flat[upper] and lower != "train.lr_min"):
            raise ConfigError(f"{lower}={flat[lower]!r} must be below {upper}={flat[upper]!r}")
    if not flat["wandb.project"]:
        raise ConfigError("wandb.project must not be empty")
    m, d = cfg.model, cfg.data
    if len(m.latent_scales) == 0 or any(n < 1 for n in m.latent_scales):
        raise ConfigError(f"model.latent_scales={list(m.latent_scales)} needs >= 1 group, each with >= 1 latent")
    if round(m.num_ch * m.block_ch_mult) < 1:
        raise ConfigError(f"model.num_ch * model.block_ch_mult = {m.num_ch * m.block_ch_mult} must be >= 1")
    if m.diffusion.model_channels % 16:
        raise ConfigError(f"model.diffusion.model_channels={m.diffusion.model_channels} must be a multiple of 16 "
                          "(GroupNorm with 16 groups)")
    if m.likelihood == "bernoulli" and not d.binarize:
        raise ConfigError("model.likelihood=bernoulli needs data.binarize=true (a binary target); "
                          "use model.likelihood=logistic_mixture for grey levels")
    if m.likelihood == "logistic_mixture" and d.binarize:
        raise ConfigError("model.likelihood=logistic_mixture models 8-bit pixels: set data.binarize=false")
    if n_train is not None and cfg.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split of "
                          f"data '{d.name}' ({n_train} images); use at most {n_train}")
    _check_batch_split(cfg, world_size)
    shape = shape or DATASET_SHAPES.get(d.name)
    if shape is None:
        return  # npz: checked again once the data is loaded
    c, h, w = shape
    if h != w:
        raise ConfigError(f"data '{d.name}' has non-square images {h}x{w}; only square images are supported")
    if m.latent_aggregation and m.latent_width != c:
        raise ConfigError(f"model.latent_width={m.latent_width} must equal the image channels ({c}) while "
                          f"model.latent_aggregation=true; set model.latent_width={c} or latent_aggregation=false")
    res = group_resolutions(cfg, shape)
    offset = 0 if m.start_scale_at_x else 1
    if h % 2 ** (len(res) - 1 + offset):
        raise ConfigError(f"model.latent_scales has {len(res)} groups but a {h}x{w} image halves only "
                          f"{_halvings(h) + 1 - offset} times (start_scale_at_x={m.start_scale_at_x}); "
                          "use fewer groups")
    if m.name == "dvp_vae" and not 1 <= m.ctx_size <= h:
        raise ConfigError(f"model.ctx_size={m.ctx_size} must be in [1, {h}] for {h}x{w} images "
                          "(pseudo-input k x k cannot exceed the image)")


def _halvings(h: int) -> int:
    n = 0
    while h % 2 == 0:
        h, n = h // 2, n + 1
    return n


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict (what run dirs and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a config saved by `to_dict` (keys added since take their defaults), checked like `compose`."""
    return _checked(OmegaConf.merge(_defaults(), OmegaConf.create(d)))
