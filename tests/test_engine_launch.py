"""The engines' GPU-path fixes at world size 2 (real DeepSpeed on 2 gloo processes under torchrun): fp16 loss
scaling backs off after an overflow as in one process, and torch.compile takes the same first steps as eager
with the noise of every rank drawn by global row (outside the compiled graph), in one process and then in two
(in this order, in one file: the first warms Inductor's cache for the second)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_distributed import flat, losses, ok, records, train, weights
from test_engine_gpu_path import COMPILED_CASE, SMALLEST, _train_records, _weights

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
def test_compiled_training_takes_the_same_first_steps_as_eager(tmp_path: Path) -> None:
    """train.compile=true in one process (DeepSpeed ZeRO-2, the graph of a rank of the 2-process test below, which
    runs after it in this file and so finds Inductor's cache warm; the torch engine's compile is
    tests/test_gpu.py's, on a GPU): the noise is drawn outside the compiled graph, so the first loss is the eager
    one and 3 steps end within compile's fusion rounding of the eager weights (relative L2 < 2e-3, the spread
    that float summation order alone gives, see tests/test_distributed.py); noise drawn by Inductor's own RNG
    would change the first loss by ~1%. (torch 2.14 breaks the graph at a generator draw by itself, so here this
    guards the property rather than catching a failure.) About 100 s with Inductor's cache cold on 2 cores."""
    threads = torch.get_num_threads()
    try:
        eager = _train_records(tmp_path / "eager", *COMPILED_CASE)
        compiled = _train_records(tmp_path / "compiled", *COMPILED_CASE, "train.compile=true")
    finally:
        torch.set_num_threads(threads)
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    assert math.sqrt(diff / sum(float(v.double().pow(2).sum()) for v in a.values())) < 2e-3


@pytest.mark.distributed
def test_compiled_training_on_two_processes_takes_the_same_first_steps_as_eager(tmp_path: Path) -> None:
    """train.compile=true under DeepSpeed (ZeRO-2, 2 processes): each rank's rows get the noise of their global
    rows, drawn outside the compiled graph, so the first loss equals eager's and 3 steps end within compile's
    fusion rounding (relative L2 < 2e-3, the summation-order spread of tests/test_distributed.py). Runs after the
    one-process test above, whose graph is each rank's: Inductor's cache is warm (cold, the two ranks would each
    compile it at once: minutes on 2 cores)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ["train.max_steps=3", "dist.zero_stage=2", *SMALLEST]
    ok(train(2, eager, *args))
    ok(train(2, compiled, *args, "train.compile=true"))
    assert losses(compiled)[0] == pytest.approx(losses(eager)[0], rel=1e-6)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    a, b = flat(weights(eager)), flat(weights(compiled))
    assert float((a - b).norm() / a.norm()) < 2e-3
