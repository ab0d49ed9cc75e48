"""dvp.core.signals with real signals sent to this process: raising by default, remembered inside deferred(),
dropped inside held() (the roll-call after a lost peer, which torchrun's SIGTERM must not cut short)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dvp.core.errors import Interrupted
from dvp.core.signals import StopSignals, held


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)                      # Python runs the handler at the next bytecode boundary


def test_a_signal_raises_outside_deferred_and_is_remembered_inside() -> None:
    with StopSignals() as signals:
        with pytest.raises(Interrupted, match="SIGTERM"):
            _send(signal.SIGTERM)
        signals.received = None
        with signals.deferred():
            _send(signal.SIGUSR1)
            assert signals.received == signal.SIGUSR1
            with pytest.raises(Interrupted, match="SIGUSR1"), signals.raising():
                pass


def test_held_drops_signals_and_restores_the_handlers() -> None:
    with StopSignals() as signals:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        with held():
            for s in handlers:
                _send(s)
        assert signals.received is None
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        with pytest.raises(Interrupted, match="SIGTERM"):
            _send(signal.SIGTERM)
