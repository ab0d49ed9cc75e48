"""`dvp-train [experiment=DATASET/MODEL] [key=value ...]`: train (or resume) a model; prints where the run went.

    dvp-train                                           # DVP-VAE on the bundled 8x8 digits, CPU, minutes
    dvp-train experiment=mnist/dvp_vae data.root=../shared/data
    dvp-train experiment=mnist/ladder train.lr=5e-3 train.precision=bf16
    dvp-train run_dir=runs/mnist/dvp_vae/20261125-080000   # resume from its checkpoints/last.pt

The run dir holds config.yaml, metrics.jsonl, images/*.png (samples and reconstructions every epoch),
checkpoints/{best,last}.pt and, after training, checkpoints/best.eval.json (test NLL; see dvp-eval).
Ctrl-C or SIGTERM saves checkpoints/last.pt before exiting; the same command resumes.
"""
from __future__ import annotations

import sys

from dvp.cli import run_cli, single_process_context
from dvp.config import compose
from dvp.loop import train


def train_cli(argv: list[str]) -> int:
    cfg = compose(argv)
    run_dir = train(cfg, argv, single_process_context().device)
    print(f"run_dir={run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(train_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
