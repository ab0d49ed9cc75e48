"""The engines' GPU-path fixes at world size 2 (real DeepSpeed on 2 gloo processes under torchrun): fp16 loss
scaling backs off after an overflow as in one process, and torch.compile takes the same first steps as eager
with the noise of every rank drawn by global row (outside the compiled graph)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_distributed import flat, losses, ok, records, train, weights
from test_engine_gpu_path import SMALLEST

FP16_OVERFLOW = ["train.precision=fp16", "train.fp16_init_scale=2097152", "train.max_steps=6"]


@pytest.mark.distributed
def test_fp16_overflow_backs_off_at_zero_2_on_two_processes_as_in_one(tmp_path: Path) -> None:
    """2^21 overflows the fp16 backward: one process (torch engine) skips the first steps while its scale halves,
    then trains; 2 processes at ZeRO-2 skip the same steps (every rank agrees) and follow the same loss curve
    (within the 0.5% of 16-bit rounding per micro-batch, as in tests/test_distributed.py)."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(train(1, one, *FP16_OVERFLOW))
    ok(train(2, two, *FP16_OVERFLOW, "dist.zero_stage=2"))
    skipped = [r["skipped"] for r in records(two)]
    assert skipped == [r["skipped"] for r in records(one)]
    assert 0 < sum(skipped) < len(skipped) - 1 and skipped[-1] == 0
    assert all(math.isfinite(v) for v in losses(two))
    assert losses(two) == pytest.approx(losses(one), rel=5e-3)


@pytest.mark.distributed
def test_compiled_training_on_two_processes_takes_the_same_first_steps_as_eager(tmp_path: Path) -> None:
    """train.compile=true under DeepSpeed (ZeRO-2, 2 processes): each rank's rows get the noise of their global
    rows, drawn outside the compiled graph, so the first loss equals eager's and 3 steps end within compile's
    fusion rounding (relative L2 < 2e-3, the summation-order spread of tests/test_distributed.py). Slow on 2
    cores when Inductor's cache is cold (minutes): kept to 3 steps."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ["train.max_steps=3", "dist.zero_stage=2", *SMALLEST]
    ok(train(2, eager, *args))
    ok(train(2, compiled, *args, "train.compile=true"))
    assert losses(compiled)[0] == pytest.approx(losses(eager)[0], rel=1e-6)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    a, b = flat(weights(eager)), flat(weights(compiled))
    assert float((a - b).norm() / a.norm()) < 2e-3
