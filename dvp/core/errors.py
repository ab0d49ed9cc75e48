"""The user-facing error types, a leaf module (it imports nothing of dvp). The command-line entry points report
every one of them as one line on stderr and exit 2 (`Interrupted`: 128 + the signal number, or 0 after a saved
preemption)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


class DataError(ValueError):
    """A dataset cannot be loaded as asked: a missing or malformed file (the message names the file and how
    to obtain it), an unknown dataset name or an impossible split size."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what it is not, and what to do."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. a long run of skipped steps); the message says what to change."""


class PublishError(RuntimeError):
    """A report could not be published to a server (wandb): the message names the cause and the fix; what was
    written locally stays as it is."""


class Interrupted(RuntimeError):
    """A signal (SIGTERM, SIGUSR1, Ctrl-C) ended the command; the message says what was saved and how to
    continue. `saved`: the run was checkpointed first (a preemption: SIGTERM/SIGUSR1 then exit 0)."""

    def __init__(self, message: str, signum: int, saved: bool = False) -> None:
        super().__init__(message)
        self.signum = signum
        self.saved = saved


class PeerLost(RuntimeError):
    """Another rank of the job died or stopped answering (its process, its host or the network): the message
    names it; every surviving rank stops with it (exit 1) and the same command resumes from the last checkpoint."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, TrainingStopped,
                                             PublishError)


def one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(error).split())
