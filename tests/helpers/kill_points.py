"""Run `dvp-train` in this process and SIGKILL it at a chosen point (used by tests/test_resume.py).

    python tests/helpers/kill_points.py POINT N [dvp-train key=value ...]

POINT is where the N-th (1-based) event kills the process with SIGKILL (kill -9, nothing runs after it):
    step        inside the N-th optimizer step, after the backward pass, before the weights change
    save        in the middle of the N-th checkpoint write (half the bytes are on disk)
    after_val   right after the N-th validation record reached metrics.jsonl, before the epoch's checkpoints
    after_best  right after the N-th best.pt was written, before the epoch's last.pt
    final_eval  inside the N-th importance-sampling pass of the final evaluation
    term_val    not a kill: a real SIGTERM to itself at the start of the N-th validation pass (the handler runs
                inside the validation code, as when Slurm's SIGTERM arrives there)
"""
from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch

import dvp.cli.train
import dvp.evaluate.sharded
import dvp.train.checkpointer
import dvp.train.loop
import dvp.train.optim
from dvp.train.logger import RunLogger


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _on_nth(n: int, original: Callable[..., Any], before: bool, when: Callable[..., bool] = lambda *a, **k: True
            ) -> Callable[..., Any]:
    """`original` wrapped to SIGKILL the process before (or after) its n-th call for which `when` holds."""
    count = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        hit = when(*args, **kwargs)
        count += hit
        if hit and count == n and before:
            _kill()
        out = original(*args, **kwargs)
        if hit and count == n:
            _kill()
        return out
    return wrapped


def _half_save(n: int) -> Callable[..., Any]:
    """torch.save that writes half of its n-th file, syncs it and dies."""
    original, count = torch.save, 0

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count != n:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _kill()
    return save


def _sigterm_on_nth(n: int, original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` that sends SIGTERM to its own process as its n-th call starts."""
    count = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    return wrapped


def main() -> int:
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if point == "step":
        dvp.train.optim.AdamaxEMA._adamax = _on_nth(n, dvp.train.optim.AdamaxEMA._adamax, before=True)
    elif point == "save":
        torch.save = _half_save(n)
    elif point == "after_val":
        RunLogger.log_eval = _on_nth(n, RunLogger.log_eval, before=False,
                                     when=lambda self, step, epoch, split, metrics: split == "val")
    elif point == "after_best":
        dvp.train.checkpointer.save_checkpoint = _on_nth(n, dvp.train.checkpointer.save_checkpoint, before=False,
                                                         when=lambda path, state: path.name == "best.pt")
    elif point == "term_val":
        dvp.train.loop.evaluate_elbo = _sigterm_on_nth(n, dvp.train.loop.evaluate_elbo)
    elif point == "final_eval":
        sharded = dvp.evaluate.sharded
        sharded.importance_sampled_nll = _on_nth(n, sharded.importance_sampled_nll, before=True)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return dvp.cli.train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
