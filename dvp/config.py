"""Configuration: compose `configs/defaults.yaml` + an experiment + `key=value` overrides, then validate.

    cfg = compose(["experiment=mnist/dvp_vae", "train.lr=5e-3"])

Order of precedence (last wins): defaults.yaml, configs/experiment/<experiment>.yaml, command-line overrides.
The schema is defaults.yaml itself: a key absent there, or a value whose type differs from the default's, is an
error that names the key. `validate` then checks the combinations that cannot work (pseudo-input larger than the
image, latent width != image channels under latent aggregation, ...) before any data is read or model is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

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
    "train.precision": ("fp32", "bf16"),
    "dist.zero_stage": (0, 1, 2, 3),
    "eval.is_weight": ("iwae", "analytic_kl"),
    "eval.weights": ("ema", "raw"),
    "wandb.mode": ("online", "offline", "disabled"),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


def experiments() -> list[str]:
    """Names accepted by `experiment=`, e.g. 'mnist/dvp_vae'."""
    root = CONFIG_DIR / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))


def _leaves(cfg: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], cfg


def _check_types(defaults: dict, merged: dict) -> None:
    """Every leaf must keep the type of its default (int is accepted where a float is expected)."""
    want = dict(_leaves(defaults))
    for key, value in _leaves(merged):
        if key not in want:
            raise ConfigError(f"unknown config key '{key}'")
        default = want[key]
        if default is None or value is None:
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float))
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"config key '{key}' expects {type(default).__name__} "
                              f"(default {default!r}), got {value!r}")


def _merge(base: DictConfig, other: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: unknown or invalid config key '{key}' "
                          f"(see configs/defaults.yaml for every key)") from None


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the resolved config from `key=value` strings; raises ConfigError on any bad key or value."""
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"argument '{o}' is not key=value (e.g. train.lr=5e-3, experiment=mnist/dvp_vae)")
    cfg = OmegaConf.load(CONFIG_DIR / "defaults.yaml")
    defaults = OmegaConf.to_container(cfg)
    OmegaConf.set_struct(cfg, True)
    exp = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "experiment"]
    if exp:
        name = exp[-1]
        path = CONFIG_DIR / "experiment" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"experiment '{name}' not found; allowed: {', '.join(experiments())}")
        cfg = _merge(cfg, OmegaConf.load(path), f"experiment {name}")
        cfg.experiment = name
    try:
        dotlist = OmegaConf.from_dotlist([o for o in overrides if o.split("=", 1)[0] != "experiment"])
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None
    cfg = _merge(cfg, dotlist, "command line")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    _check_types(defaults, resolved)
    cfg = OmegaConf.create(resolved)
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def group_resolutions(cfg: DictConfig, shape: tuple[int, int, int]) -> list[int]:
    """Spatial size of each latent group, finest first: H/2^(i+1), or H/2^i with start_scale_at_x."""
    _, h, _ = shape
    offset = 0 if cfg.model.start_scale_at_x else 1
    return [h // 2 ** (i + offset) for i in range(len(cfg.model.latent_scales))]


def validate(cfg: DictConfig, shape: tuple[int, int, int] | None = None) -> None:
    """Raise ConfigError for any value outside its choices or any combination that cannot run."""
    flat = dict(_leaves(OmegaConf.to_container(cfg)))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {list(allowed)}")
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = {"train.lr": t.lr, "train.batch_size": t.batch_size, "train.eval_batch_size": t.eval_batch_size,
                "model.num_ch": m.num_ch, "model.latent_width": m.latent_width, "eval.is_samples": cfg.eval.is_samples,
                "eval.is_chunk": cfg.eval.is_chunk, "model.diffusion.T": m.diffusion.T}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"train.ema={t.ema} must be in [0, 1)")
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
    if m.name == "vampprior" and m.num_pseudo < 1:
        raise ConfigError(f"model.num_pseudo={m.num_pseudo} must be >= 1 for model.name=vampprior")
    shape = shape or DATASET_SHAPES.get(d.name)
    if shape is None:
        return  # npz: checked again once the data is loaded
    c, h, w = shape
    if h != w:
        raise ConfigError(f"data '{d.name}' has non-square images {h}x{w}; only square images are supported")
    if m.latent_aggregation and m.latent_width != c:
        raise ConfigError(f"model.latent_width={m.latent_width} must equal the image channels ({c}) while "
                          "model.latent_aggregation=true; set model.latent_width={c} or latent_aggregation=false")
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
    """Rebuild a config saved by `to_dict`, checked against today's schema."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "defaults.yaml"))
    _check_types(defaults, d)
    cfg = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.create(d))
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg
