"""Shared command-line plumbing: `--help` prints the command's docstring and the main keys; configuration, data
and checkpoint errors print one clear line and exit 2 instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from dvp.config import ConfigError, experiments

MAIN_KEYS = """
Main keys (any key of configs/defaults.yaml works as key=value):
  experiment=DATASET/MODEL   one of: {experiments}
  run_dir=DIR                run directory (default runs/<experiment>/<timestamp>)
  data.root=DIR              dataset files (e.g. data.root=../shared/data for mnist.npz); data.download=true
  model.latent_scales=[4,4]  latents per resolution, finest first;  model.ctx_size=K  pseudo-input k x k
  train.lr=  train.batch_size=  train.max_epochs=  train.max_steps=  train.precision=fp32|bf16  train.seed=
  eval.is_samples=K          importance samples of the test NLL;  wandb.mode=online|offline|disabled
"""


def run_cli(fn: Callable[[list[str]], int], doc: str | None, argv: list[str]) -> int:
    """Run `fn(argv)`; '--help' prints the docstring; known user errors exit 2 with one line on stderr."""
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n" + MAIN_KEYS.format(experiments=", ".join(experiments())))
        return 0
    from dvp.errors import USER_ERRORS
    try:
        return fn(argv)
    except (ConfigError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
