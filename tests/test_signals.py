"""dvp.core.signals with real signals sent to this process: raising by default, remembered inside deferred(),
dropped inside held() (the roll-call after a lost peer, which torchrun's SIGTERM must not cut short)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dvp.core.errors import Interrupted
from dvp.core.signals import StopSignals, held, sigterm_as_sigint


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


def test_sigterm_as_sigint_interrupts_like_ctrl_c_and_restores_the_handler() -> None:
    def before(*_: object) -> None:
        raise AssertionError("the previous handler ran inside the block")

    old = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_sigint():
            _send(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("statuses, code", [(["TERMINATED", "ERROR"], 0), (["ERROR", "ERROR"], 1),
                                            (["TERMINATED", "RUNNING"], 130)])
def test_dvp_sweep_owns_its_exit_code_and_restores_sigterm(monkeypatch: pytest.MonkeyPatch, statuses: list[str],
                                                           code: int) -> None:
    """The command, not dvp.tune.sweep, installs the SIGTERM handler (while the sweep runs) and picks the exit code."""
    from contextlib import nullcontext

    import dvp.cli.sweep as command
    seen = []

    def fit(spec: object, resumed: bool) -> list[dict]:
        seen.append(signal.getsignal(signal.SIGTERM))
        return [{"trial_id": str(i), "status": s} for i, s in enumerate(statuses)]

    for name, stub in {"load_sweep": lambda *_: None, "check_folder": lambda _: False, "summarize": lambda *_: None,
                       "ray_session": lambda _: nullcontext(), "fit": fit}.items():
        monkeypatch.setattr(command, name, stub)
    before = signal.getsignal(signal.SIGTERM)
    assert command.main(["sweep=x"]) == code
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before
