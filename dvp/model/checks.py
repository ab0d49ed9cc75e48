"""The models `model.name` may name, the spatial size of each latent group, and the checks of the config that need
them and the image shape (C, H, W), run before any model is built: latent groups the image can hold, the
pseudo-input inside the image, GroupNorm's width rule, a likelihood that matches the data's binarisation."""
from __future__ import annotations

from omegaconf import DictConfig

from dvp.core.errors import ConfigError

GROUPS = 16
"""GroupNorm groups of every normalisation of the diffusion prior's UNet (dvp.model.unet): its width,
model.diffusion.model_channels, must be a multiple of it."""
MODELS = ("dvp_vae", "ladder", "vampprior")
"""The accepted values of `model.name`: DVP-VAE, the Ladder VAE, and the VampPrior (a hierarchical one)."""


def group_resolutions(cfg: DictConfig, shape: tuple[int, int, int]) -> list[int]:
    """Spatial size of each latent group, finest first: H/2^(i+1), or H/2^i with start_scale_at_x."""
    _, h, _ = shape
    offset = 0 if cfg.model.start_scale_at_x else 1
    return [h // 2 ** (i + offset) for i in range(len(cfg.model.latent_scales))]


def check_model_config(cfg: DictConfig, shape: tuple[int, int, int] | None) -> None:
    """Raise ConfigError for a model the config cannot build; `shape` (None: not known before the data is read)
    adds the checks against the image."""
    m, d = cfg.model, cfg.data
    if m.name not in MODELS:
        raise ConfigError(f"model.name={m.name!r} is not allowed; choose one of {list(MODELS)}")
    if len(m.latent_scales) == 0 or any(n < 1 for n in m.latent_scales):
        raise ConfigError(f"model.latent_scales={list(m.latent_scales)} needs >= 1 group, each with >= 1 latent")
    if round(m.num_ch * m.block_ch_mult) < 1:
        raise ConfigError(f"model.num_ch * model.block_ch_mult = {m.num_ch * m.block_ch_mult} must be >= 1")
    if m.diffusion.model_channels % GROUPS:
        raise ConfigError(f"model.diffusion.model_channels={m.diffusion.model_channels} must be a multiple of "
                          f"{GROUPS} (GroupNorm with {GROUPS} groups)")
    if m.likelihood == "bernoulli" and not d.binarize:
        raise ConfigError("model.likelihood=bernoulli needs data.binarize=true (a binary target); "
                          "use model.likelihood=logistic_mixture for grey levels")
    if m.likelihood == "logistic_mixture" and d.binarize:
        raise ConfigError("model.likelihood=logistic_mixture models 8-bit pixels: set data.binarize=false")
    if shape is not None:
        _check_image(cfg, shape)


def _check_image(cfg: DictConfig, shape: tuple[int, int, int]) -> None:
    m = cfg.model
    c, h, w = shape
    if h != w:
        raise ConfigError(f"data '{cfg.data.name}' has non-square images {h}x{w}; only square images are supported")
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
