"""The user-facing error types that CLIs report as one line (bad config, data or checkpoint)."""
from __future__ import annotations

from dvp.checkpoint import CheckpointError
from dvp.config import ConfigError
from dvp.data import DataError
from dvp.loop import TrainingStopped

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, TrainingStopped)
