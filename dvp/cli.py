"""Shared command-line plumbing: `--help` prints the command's docstring and the main keys; configuration, data
and checkpoint errors print one clear line and exit 2 instead of a traceback; SIGTERM and Ctrl-C end any command
within seconds with one line (exit 128 + the signal number), after what the command saves on a stop."""
from __future__ import annotations

import os
import sys
from typing import Callable

from dvp.config import experiments
from dvp.errors import USER_ERRORS, ConfigError, Interrupted
from dvp.launch import DistContext, detect, init
from dvp.signals import StopSignals

MAIN_KEYS = """
Main keys (any key of configs/defaults.yaml works as key=value):
  experiment=DATASET/MODEL   one of: {experiments}
  run_dir=DIR                run directory (default runs/<experiment>/<timestamp>)
  data.root=DIR              dataset files (e.g. data.root=../shared/data for mnist.npz); data.download=true
  model.latent_scales=[4,4]  latents per resolution, finest first;  model.ctx_size=K  pseudo-input k x k
  train.lr=  train.batch_size=  train.max_epochs=  train.max_steps=  train.precision=fp32|bf16  train.seed=
  eval.is_samples=K          importance samples of the test NLL;  wandb.mode=online|offline|disabled
"""


def one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(error).split())


def run_cli(fn: Callable[[list[str]], int], doc: str | None, argv: list[str]) -> int:
    """Run `fn(argv)`; '--help' prints the docstring; known user errors exit 2 with one line on stderr."""
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n" + MAIN_KEYS.format(experiments=", ".join(experiments())))
        return 0
    try:
        with StopSignals():
            return fn(argv)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        return 128 + e.signum


def single_process_context() -> DistContext:
    """The context of this launch (the device from DeepSpeed's accelerator abstraction); a multi-process launch
    (torchrun, srun, mpiexec, ...) is refused until the DeepSpeed data-parallel engine exists."""
    env = detect(os.environ)
    if env.world_size > 1:
        raise ConfigError(f"{env.launcher} started {env.world_size} processes, but dvp trains and evaluates in one "
                          "process so far (data-parallel training is not built yet); run the command directly")
    return init(env)
