"""What every Ray Train worker of a trial runs: the same training loop and DeepSpeed engine as `dvp-train`, with
each epoch's validation metrics reported to Ray and its checkpoint registered there.

    TorchTrainer(train_worker, train_loop_config={"overrides": [...], "run_dir": DIR, "threads": N,
                                                  "storage": None or the trial's folder in remote storage}, ...)

Ray has created the process group (RANK, WORLD_SIZE, ... set; `dvp.parallel` detects the "ray" launcher and joins
it). A worker's GPU is the one Ray Train assigned it (`assigned_gpu`), not its local rank's; a worker that Ray
gave no GPU trains on the CPU (dist.device=auto), on a GPU node too: Ray reserved none for it. The registered
checkpoint is a folder laid out like a run dir (`config.yaml`, `checkpoints/last.pt`, `checkpoints/best.pt`), so
`dvp-eval run_dir=<checkpoint folder>` and `dvp-sample` read it as they are.

Resume: when Ray restarts the worker group (a worker died, or an elastic trial changed size) or a sweep is
resumed, the loop continues from Ray's latest checkpoint (copied into the run dir first; the run dir's own
last.pt when Ray has none), at whatever world size the group now has: the model does not depend on it. Ray's
checkpoint, not a newer last.pt of the run dir, because it is the last state Tune was told of: an epoch whose
report was cut off by the failure is trained and reported again, so Tune (and ASHA) see every epoch once.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from dvp.core.config import compose
from dvp.parallel.context import AssignedGpu, DistContext, init
from dvp.parallel.launch import detect
from dvp.train.checkpointer import export_run, import_run, saved_step
from dvp.train.loop import STOP_FILE, train
from dvp.tune.storage import write_text


def restore_from_ray(run_dir: Path, ctx: DistContext) -> None:
    """Copy Ray's latest checkpoint of this trial into `run_dir` unless the run dir's last.pt is at the same step
    (see the module docstring); rank 0 copies, every rank waits."""
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and ctx.is_main:
        with checkpoint.as_directory() as folder:
            if saved_step(Path(folder)) != saved_step(run_dir):
                import_run(Path(folder), run_dir)
    ctx.barrier()


def reporter(run_dir: Path, ctx: DistContext) -> Any:
    """The loop's epoch callback: `ray.train.report` of the metrics on every rank, rank 0 adding the checkpoint
    folder (`export_run`: hard links to the run dir's files, nothing is copied until Ray persists it)."""
    import ray.train

    def report(metrics: dict[str, float], last: Path) -> None:
        values = {("epoch" if k == "epoch" else "step" if k == "step" else f"val/{k}"): float(v)
                  for k, v in metrics.items()}
        values["world_size"] = float(ctx.world_size)
        values["hosts"] = ",".join(name for name, _ in ctx.hosts) or socket.gethostname()   # by rank
        if not ctx.is_main:
            ray.train.report(values, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="dvp-ckpt-") as folder:
            export_run(run_dir, Path(folder))
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))
    return report


def assigned_gpu() -> AssignedGpu | None:
    """The GPU Ray Train gave this worker, or None when it has none. Ray Train V2 sets CUDA_VISIBLE_DEVICES of
    every GPU worker to the GPUs of all the trial's workers on its node (`_share_cuda_visible_devices`) and
    LOCAL_RANK to the worker's place on the node, which need not match its GPU's place there: the device is
    `ray.train.torch.get_device()`, the place of `ray.get_gpu_ids()`'s first id in CUDA_VISIBLE_DEVICES."""
    import ray
    ids = ray.get_gpu_ids()
    if not ids:
        return None
    from ray.train.torch import get_device
    return AssignedGpu(f"Ray assigned GPU {','.join(map(str, ids))}", int(get_device().index or 0))


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: `dvp.train.loop.train` on the trial's overrides in the group Ray made."""
    # DeepSpeed's JIT-built ops: one node-local cache shared by the trials (not a shared home on NFS)
    extensions = Path(tempfile.gettempdir()) / f"dvp-torch-extensions-{os.getuid()}"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))     # Ray sets OMP_NUM_THREADS=1
    overrides = [*config["overrides"], f"run_dir={config['run_dir']}"]
    cfg = compose(overrides)
    gpu = assigned_gpu()
    ctx = init(detect(os.environ), timeout_s=cfg.dist.timeout_s, rendezvous_timeout_s=cfg.dist.rendezvous_timeout_s,
               device="cpu" if gpu is None and cfg.dist.device == "auto" else cfg.dist.device, assigned=gpu)
    run_dir = Path(config["run_dir"])
    restore_from_ray(run_dir, ctx)
    train(cfg, overrides, ctx, report=reporter(run_dir, ctx))
    stop = run_dir / STOP_FILE
    if config.get("storage") and ctx.is_main and stop.is_file():   # after the last checkpoint: to storage itself
        write_text(f"{config['storage']}/{STOP_FILE}", stop.read_text())
