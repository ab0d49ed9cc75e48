"""SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and Ctrl-C (SIGINT) as a clean, prompt stop of any
command.

    with StopSignals() as signals:          # raising by default: a signal raises `Interrupted` where the code is
        with signals.deferred():            # inside: a signal only sets `signals.received`, checked between steps
            ...
            with signals.raising():         # raising again, e.g. for a validation pass inside the training loop
                ...

    with held():                            # a signal is dropped: the seconds in which a failing job names
        ...                                 # its lost peer (torchrun signals the survivors once a rank dies)

    with sigterm_as_sigint():               # SIGTERM as Ctrl-C, for Ray Tune (dvp-sweep)
        ...

Outside `deferred()` the handler raises `Interrupted` at once (Python runs handlers between bytecodes, so a
long evaluation ends within one forward pass); inside it the signal is remembered and the training loop stops
at the next step boundary, after saving. Handlers are installed only from the main thread (elsewhere, e.g. in a
Ray Train worker thread, this is a no-op) and the previous handlers are restored on exit.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from dvp.core.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)   # SIGUSR1: Slurm's --signal warning


def signal_name(signum: int) -> str:
    """'SIGTERM', 'SIGINT', ..."""
    return signal.Signals(signum).name


class StopSignals:
    """Context manager turning SIGTERM/SIGINT into `Interrupted`, or into a flag inside `deferred()`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._defer = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if not self._defer:
            raise Interrupted(f"interrupted by {signal_name(signum)}", signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a signal only sets `received`."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Within the block (even inside `deferred()`) a signal raises `Interrupted`, and one received before
        raises on entry."""
        if self.received is not None:
            raise Interrupted(f"interrupted by {signal_name(self.received)}", self.received)
        outer, self._defer = self._defer, 0
        try:
            yield
        finally:
            self._defer = outer


@contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Within the block SIGTERM interrupts as Ctrl-C does (a SIGINT to this process), for a library that stops
    cleanly only on SIGINT (Ray Tune saves the experiment and returns); the previous handler is restored after it.
    A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def held() -> Iterator[None]:
    """Within the block SIGTERM, SIGINT and SIGUSR1 do nothing (their handlers are restored after it). For the few
    seconds in which a rank whose peer died finds out which one: launchers such as torchrun's agent send SIGTERM
    to the survivors as soon as one rank dies, which would otherwise replace that line with 'interrupted'. A
    no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
