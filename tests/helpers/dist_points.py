"""Run `dvp-train` in this process (one rank of a torchrun / mpiexec job) with an event injected on one rank at
one optimizer step (used by tests/test_distributed.py).

    python tests/helpers/dist_points.py EVENT RANK STEP [dvp-train key=value ...]

EVENT, on rank RANK when optimizer step STEP (0-based) starts:
    kill    SIGKILL this rank (kill -9: nothing runs after it)
    nan     this rank's loss is NaN for that step (its gradient too; the other ranks' stay finite)
    usr1    a real SIGUSR1 to this rank only (Slurm's warning signal)
    save    SIGKILL this rank right after DeepSpeed wrote the shards of the checkpoint at step STEP (shards and
            their `latest` on disk, last.pt not yet replaced)
    pause   this rank writes the file DVP_PAUSE_MARK names, then sleeps DVP_PAUSE_S seconds (default 30) before
            the step: the other ranks wait for it in the step's all-reduce (a test cuts this rank's network then)
    none    nothing
The rank is read from the launcher's variables (RANK or OMPI_COMM_WORLD_RANK), as dvp.parallel.launch does.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import dvp.cli.train
import dvp.train.engine_deepspeed
import dvp.train.engine_torch

EVENT, RANK, STEP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MY_RANK = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
poison = False


def _elbo_stats(original: Any) -> Any:
    def stats(*args: Any, **kwargs: Any) -> dict:
        out = original(*args, **kwargs)
        if poison:
            out["loss"] = out["loss"] * float("nan")
        return out
    return stats


def _step(original: Any) -> Any:
    def step(self: Any, x: Any, index: int, *rest: Any) -> dict:
        global poison
        hit = MY_RANK == RANK and index == STEP
        if hit and EVENT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit and EVENT == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
        if hit and EVENT == "pause":
            Path(os.environ["DVP_PAUSE_MARK"]).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("DVP_PAUSE_S", "30")))
        poison = hit and EVENT == "nan"
        try:
            return original(self, x, index, *rest)
        finally:
            poison = False
    return step


def _save_native(original: Any) -> Any:
    def save(self: Any, directory: Any, tag: str, client_state: dict) -> bool:
        wrote = original(self, directory, tag, client_state)
        if EVENT == "save" and MY_RANK == RANK and tag == f"step{STEP}":
            os.kill(os.getpid(), signal.SIGKILL)
        return wrote
    return save


_engine = dvp.train.engine_deepspeed.DeepSpeedEngine
_engine.save_native = _save_native(_engine.save_native)
for module in (dvp.train.engine_torch, dvp.train.engine_deepspeed):
    module.elbo_stats = _elbo_stats(module.elbo_stats)
for cls in (dvp.train.engine_torch.TorchEngine, dvp.train.engine_deepspeed.DeepSpeedEngine):
    cls.step = _step(cls.step)

if __name__ == "__main__":
    sys.exit(dvp.cli.train.main(sys.argv[4:]))
