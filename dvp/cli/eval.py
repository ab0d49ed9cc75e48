"""`dvp-eval run_dir=DIR [checkpoint=best|last|PATH] [eval.is_samples=K] [eval.max_images=N] [out=FILE.json]`

Evaluates a checkpoint's EMA weights (or raw ones: eval.weights=raw) on the test set: the negative ELBO
(diffusion term by its T-point quadrature), the importance-sampled NLL with K samples (`eval.is_weight=iwae`, the
valid estimator, unless asked otherwise),
bits/dim, active units, per-layer KL and the sampling time per image. Writes `<checkpoint>.eval.json` next to the
checkpoint and prints a table. `artifact=ENTITY/PROJECT/NAME:ALIAS` evaluates a checkpoint logged to wandb
(online only) instead of a local run dir.

    dvp-eval run_dir=runs/mnist/dvp_vae/20261125-080000 eval.is_samples=1000
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dvp.cli.common import launch_context, run_cli, without_local_rank
from dvp.cli.runs import load_run, parse_args
from dvp.core.paths import check_output_file
from dvp.evaluate.sharded import evaluate_test, results_path


def evaluate_cli(argv: list[str]) -> int:
    args, overrides = parse_args(without_local_rank(argv, os.environ), extra=("out",), allowed_prefixes=(
        "eval.", "train.eval_batch_size", "data.root", "data.download"))
    ctx = launch_context()
    try:
        if "out" in args:
            ctx.on_main(lambda: check_output_file(Path(args["out"]), "out"))
        run = load_run(args, overrides, ctx.device)
        out = Path(args["out"]) if "out" in args else results_path(run.checkpoint, run.cfg.eval.weights)
        ctx.on_main(lambda: check_output_file(out, "out"))
        data = run.data()
        evaluate_test(run.model, data.test, run.cfg, run.checkpoint, out=out, ctx=ctx)
    finally:
        ctx.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(evaluate_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
