"""What only a CUDA GPU can show: the `gpu` mark, deselected by default and in CI (which has no GPU), run on a GPU
machine by benchmarks/gpu_check.py as `DVP_TEST_GPU=1 pytest -n 0 -m gpu tests/test_gpu.py` (tests/conftest.py
hides the GPUs from every other test). Without a usable GPU every test here fails at its first line: a `gpu` run
that passed has run on one.

Each test is the GPU half of a CPU test: the device line and no silent CPU (tests/test_device.py), ranks sharing a
GPU (device_index), checkpoints moving between CPU and GPU (tests/test_engine_gpu_path.py), true float32 in
evaluation (tests/test_gpu_path.py), fp16 loss-scale back-off under ZeRO, compiled against eager training.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from test_distributed import ok, records, train

from dvp.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def a_gpu() -> None:
    """Every test here needs CUDA: no GPU is a failure, never a skip."""
    assert os.environ.get("DVP_TEST_GPU") == "1", "run the gpu mark with DVP_TEST_GPU=1 (tests/conftest.py)"
    assert torch.cuda.is_available() and torch.cuda.device_count() > 0, "no usable CUDA GPU"


def test_a_run_names_its_gpu_and_trains_on_it(tmp_path: Path) -> None:
    res = ok(train(1, tmp_path / "run", "train.max_steps=4", "dist.device=cuda"))
    name = torch.cuda.get_device_name(0)
    assert re.search(rf"devices: rank 0 cuda:0 \({re.escape(name)}\) \S+ fp32", res.stdout), res.stdout
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))


def test_more_ranks_than_gpus_is_one_line_on_every_rank(tmp_path: Path) -> None:
    """torchrun with one process more than there are GPUs: two ranks would share one (NCCL refuses)."""
    n = torch.cuda.device_count() + 1
    res = train(n, tmp_path / "run", "train.max_steps=2", timeout=200)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == n and all("GPU" in line for line in errors), res.stderr[-3000:]


def test_a_checkpoint_moves_from_cpu_to_gpu_and_back(tmp_path: Path) -> None:
    """Trained 3 steps on the CPU, resumed on the GPU to 6, resumed on the CPU to 9 (RNG states of either
    device in the files), and read by dvp-eval on the CPU."""
    run = tmp_path / "run"
    ok(train(1, run, "train.max_steps=3", "dist.device=cpu"))
    assert "resumed at step 3" in ok(train(1, run, "train.max_steps=6", "dist.device=cuda")).stdout
    assert "resumed at step 6" in ok(train(1, run, "train.max_steps=9", "dist.device=cpu")).stdout
    assert load_checkpoint(run / "checkpoints" / "last.pt")["loop"]["step"] == 9
    steps = [r["step"] for r in records(run)]
    assert steps == list(range(1, 10))


def test_evaluation_is_true_float32_where_training_uses_tf32() -> None:
    """A float32 convolution under `evaluation` matches float64 to float32 rounding; under TF32 (what cuDNN does
    by default, and train.tf32=true) it does not: so the evaluation figures are true float32 on this GPU."""
    from dvp.model.precision import evaluation, float32_math
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda")
    exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)

    def error() -> float:
        with torch.no_grad():
            return float((conv(x).double() - exact).norm() / exact.norm())

    with float32_math(tf32=True):
        tf32 = error()
        with evaluation("fp32", torch.device("cuda")):
            ieee = error()
    assert ieee < 1e-6, ieee
    assert tf32 > 10 * ieee, (tf32, ieee)


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_backs_off_its_loss_scale_after_an_overflow(tmp_path: Path, stage: int) -> None:
    """fp16 through DeepSpeed with a loss scale of 2^24: the first steps overflow and are skipped, the scale backs
    off, and the run trains (the torch engine's GradScaler does the same)."""
    res = ok(train(1, tmp_path / "run", "train.max_steps=16", "dist.device=cuda", "train.precision=fp16",
                   "dist.engine=deepspeed", f"dist.zero_stage={stage}", "train.fp16_init_scale=16777216"))
    recs = records(tmp_path / "run")
    skipped = recs[-1]["skipped_total"]
    assert 1 <= skipped < 16, (skipped, res.stdout[-2000:])
    assert not recs[-1]["skipped"] and torch.isfinite(torch.tensor(recs[-1]["loss"]))


def test_compiled_and_eager_training_agree(tmp_path: Path) -> None:
    """torch.compile on the GPU draws the same global noise as eager (drawn outside the compiled region), so the
    first losses agree to float rounding; a compiled forward that drew its own noise would differ by far more."""
    ok(train(1, tmp_path / "eager", "train.max_steps=3", "dist.device=cuda"))
    ok(train(1, tmp_path / "compiled", "train.max_steps=3", "dist.device=cuda", "train.compile=true", timeout=900))
    eager = torch.tensor([r["loss"] for r in records(tmp_path / "eager")])
    compiled = torch.tensor([r["loss"] for r in records(tmp_path / "compiled")])
    assert len(eager) == len(compiled) == 3
    assert torch.allclose(eager, compiled, rtol=2e-3), (eager, compiled)


@pytest.mark.parametrize("engine", ["dist.engine=torch", "dist.zero_stage=0", "dist.zero_stage=2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_never_waits_for_the_gpu(engine: str, precision: str) -> None:
    """torch.cuda's sync debug mode raises at any host synchronisation: none in three steps of the torch engine
    or DeepSpeed ZeRO 0 and 2 (the batch, the votes, the EMA decay, the counters and the stats copy all queued),
    and their statistics are then read. Not checked: fp16 (torch's GradScaler reads its overflow flag each step)
    and ZeRO-3 (DeepSpeed reads its gradient norm)."""
    from dvp.core.config import compose
    from dvp.parallel.context import init
    from dvp.parallel.launch import detect
    from dvp.train.engines import make_engine
    from dvp.train.loop import prepare
    ds = [] if engine == "dist.engine=torch" else ["dist.engine=deepspeed"]
    cfg = compose(["model.num_ch=16", "train.batch_size=16", f"train.precision={precision}", engine, *ds,
                   "wandb.mode=disabled", "dist.device=cuda"])
    data, model = prepare(cfg)
    steps = make_engine(model, cfg, data.shape, init(detect({}), device="cuda"))
    steps.step(data.train[:16], 0)             # the first step: allocations, DeepSpeed's lazy set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [steps.step(data.train[16 * i:16 * (i + 1)], i, lambda: [0.0, 0.0]) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [s["skipped"] for s in stats] == [0.0, 0.0, 0.0] and all(s.votes == [0.0, 0.0] for s in stats)
    assert steps.counters()["applied_steps"] == 4
