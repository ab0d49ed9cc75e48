"""The run config checked in full, before any data is read or model is built: the schema's checks
(dvp.core.config) and those of the data and model it names (dvp.data.catalog, dvp.model.checks).

    cfg = compose(["experiment=mnist/dvp_vae", "train.lr=5e-3"])     # every command's config
"""
from __future__ import annotations

from omegaconf import DictConfig

from dvp.core import config
from dvp.data.catalog import dataset_shape
from dvp.model.checks import check_model_config


def validate(cfg: DictConfig, shape: tuple[int, int, int] | None = None, n_train: int | None = None,
             world_size: int = 1) -> None:
    """ConfigError for anything of `cfg` that cannot run: `shape` and `n_train` (the image shape and training-split
    size, once the data is loaded; the dataset's known shape before) and `world_size` (processes of the launch)
    add their checks."""
    config.validate(cfg, n_train=n_train, world_size=world_size)
    known = dataset_shape(cfg.data)
    check_model_config(cfg, shape or known)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """`dvp.core.config.compose`, then the data's and the model's checks."""
    cfg = config.compose(overrides)
    validate(cfg)
    return cfg


def from_dict(d: dict) -> DictConfig:
    """`dvp.core.config.from_dict` (a saved config), then the data's and the model's checks."""
    cfg = config.from_dict(d)
    validate(cfg)
    return cfg
