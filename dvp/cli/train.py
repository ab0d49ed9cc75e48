"""`dvp-train [experiment=DATASET/MODEL] [key=value ...]`: train (or resume) a model; prints where the run went.

    dvp-train                                           # DVP-VAE on the bundled 8x8 digits, CPU, minutes
    dvp-train experiment=mnist/dvp_vae data.root=../shared/data
    dvp-train experiment=mnist/ladder train.lr=5e-3 train.precision=bf16
    dvp-train run_dir=runs/mnist/dvp_vae/20261125-080000   # resume from its checkpoints/last.pt
    torchrun --nproc_per_node 8 -m dvp.train experiment=cifar10/dvp_vae dist.zero_stage=2 train.precision=bf16
    deepspeed --num_gpus 8 --module dvp.train experiment=mnist/dvp_vae   # its --local_rank=N is accepted
    mpiexec -n 4 dvp-train experiment=mnist/dvp_vae    # also srun, Ray Train workers

The run dir holds config.yaml, metrics.jsonl, images/*.png (samples and reconstructions every epoch),
checkpoints/{best,last}.pt (consolidated float32, any world size), checkpoints/deepspeed/ (DeepSpeed's shards
of last.pt, multi-process runs) and, after training, checkpoints/best.eval.json (test NLL; see dvp-eval).
SIGTERM or SIGUSR1 (on any rank) saves checkpoints/last.pt and exits 0, Ctrl-C saves and exits 130; the same
command resumes, at any world size, when it names the run's run_dir= (without it each start is a new run dir).
"""
from __future__ import annotations

import os
import sys

from dvp.cli.common import launch_context, peers_watched, run_cli, without_local_rank
from dvp.train.config import compose
from dvp.train.loop import train


def train_cli(argv: list[str]) -> int:
    argv = without_local_rank(argv, os.environ)
    cfg = compose(argv)
    ctx = launch_context(cfg.dist)
    try:
        with peers_watched(ctx, cfg.dist.timeout_s):
            run_dir = train(cfg, argv, ctx)
    finally:
        ctx.close()
    if ctx.is_main:
        print(f"run_dir={run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(train_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
