"""The datasets `data.name` may name, with the image shape of each (None: known once the file is read), and the
checks of the config that need them, run before any data is read."""
from __future__ import annotations

from collections.abc import Mapping

from dvp.core.errors import ConfigError

DATASETS: dict[str, tuple[int, int, int] | None] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "omniglot": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "npz": None,
}
"""The accepted values of `data.name` (the one list of them) and their image shapes (C, H, W)."""


def dataset_shape(data_cfg: Mapping) -> tuple[int, int, int] | None:
    """The image shape of the config's dataset, None for a user's npz (known once it is read); a name outside
    DATASETS is a ConfigError."""
    name = data_cfg["name"]
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not allowed; choose one of {list(DATASETS)}")
    return DATASETS[name]
