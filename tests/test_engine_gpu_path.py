"""What the engines do for a GPU that the CPU can check: the optimizer's skip decision as a tensor (no host
synchronisation), fp16 loss scaling that backs off at every ZeRO stage as in the torch engine, and checkpoints
whose RNG states were written on another device type.

The GPU itself is mocked in one place only: a CUDA generator state (16 bytes: Philox seed and offset, the size
`torch.cuda.get_rng_state()` returns) is written into checkpoints, as a GPU run would leave them, since no GPU
exists here."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dvp.core.config import compose
from dvp.core.signals import SIGNALS
from dvp.parallel.context import DistContext, init
from dvp.parallel.launch import detect
from dvp.train.checkpoint import load_checkpoint, save_checkpoint
from dvp.train.engine import LossScale, StepStats
from dvp.train.engine_torch import TorchEngine
from dvp.train.loop import prepare, train
from dvp.train.optim import AdamaxEMA

TINY = ["model.num_ch=16", "train.batch_size=16", "train.final_eval=false", "wandb.mode=disabled",
        "train.log_every=1", "train.ckpt_every=0"]
SMALLEST = ["model.enc_blocks_per_scale=1", "model.diffusion.num_res_blocks=1"]
"""The smallest model of every code path: what torch.compile's tests compile (its time grows with the graph)."""
COMPILED_CASE = ["train.max_steps=3", *SMALLEST, "dist.engine=deepspeed", "dist.zero_stage=2", "train.num_threads=1"]
"""The compiled run of one process: the graph (model, micro-batch of 16, one thread) of each rank of the 2-process
test in tests/test_engine_launch.py, which runs after it (same file) and finds Inductor's cache warm."""
CUDA_RNG_BYTES = 16     # torch.cuda.get_rng_state(): Philox seed (8 bytes) and offset (8 bytes)


# ---- the optimizer's decision as a tensor ------------------------------------------------------------------
def _optimizer(skip: float = 0.0, clip: float = 5.0) -> tuple[AdamaxEMA, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = AdamaxEMA(params, lr=0.01, weight_decay=1e-6, clip=clip, skip=skip)
    opt.init_state()
    opt.param_groups[0]["ema_decay"] = 0.9
    return opt, params


def test_the_optimizer_step_reads_nothing_to_the_host() -> None:
    """The norm, the clip factor, the skip decision and every masked update stay tensors (foreach ops)."""
    opt, params = _optimizer(skip=10.0)
    for p in params:
        p.grad = torch.randn_like(p)
    with _HostSyncs() as syncs, _ScalarReads() as reads:
        opt.step()
    assert syncs.calls == [] and reads.count == 0


def _state(opt: AdamaxEMA, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]


def test_an_applied_step_is_torchs_clipped_adamax_with_the_ema() -> None:
    opt, params = _optimizer(clip=0.5)
    ref = [p.detach().clone().requires_grad_() for p in params]
    grads = [torch.randn_like(p) * 3 for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    outcome = opt.step()
    assert isinstance(outcome.applied, torch.Tensor) and bool(outcome.applied)
    norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert float(outcome.grad_norm) == pytest.approx(float(norm), rel=1e-6)
    torch.optim.Adamax(ref, lr=0.01, weight_decay=1e-6, eps=1e-8).step()
    for p, r in zip(params, ref):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-7)
    start = _optimizer(clip=0.5)[1]
    for p, p0 in zip(params, start):      # EMA: ema <- 0.9 theta_0 + 0.1 theta_1
        assert torch.allclose(opt.state[p]["ema"], 0.9 * p0.detach() + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


@pytest.mark.parametrize("case", ["nan", "inf", "above_skip"])
def test_a_skipped_step_leaves_every_tensor_bitwise_unchanged(case: str) -> None:
    """Also at the very first step, where the moments are zero: a skipped step must not touch exp_inf (Adamax
    would raise it to eps) nor divide by it."""
    opt, params = _optimizer(skip=10.0)
    before = _state(opt, params)
    for p in params:
        p.grad = torch.randn_like(p) * (100 if case == "above_skip" else 1)
    params[0].grad[1, 2] = {"nan": math.nan, "inf": math.inf, "above_skip": 1.0}[case]
    outcome = opt.step()
    assert isinstance(outcome.applied, torch.Tensor) and not bool(outcome.applied)
    assert math.isfinite(float(outcome.grad_norm)) == (case == "above_skip")
    assert all(torch.equal(a, b) for a, b in zip(before, _state(opt, params)))
    for p in params:                    # and the next finite step is applied as usual
        p.grad = torch.ones_like(p)
    assert bool(opt.step().applied) and all(float(opt.state[p]["step"]) == 1 for p in params)
    assert all(torch.isfinite(t).all() for t in _state(opt, params))


class _HostSyncs(TorchFunctionMode):
    """Counts the calls of Tensor methods that copy a value to the host (each a device synchronisation on a
    GPU): item, tolist, cpu, float(), bool(), int(), numpy."""
    METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.__float__,
               torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.METHODS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _ScalarReads(TorchDispatchMode):
    """Counts the reads of one tensor value to the host inside torch's C++ code (aten._local_scalar_dense: a
    0-dim tensor passed where an op takes a Python number, e.g. torch._foreach_lerp_'s weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip,skip", [(5.0, 0.0), (0.0, 1e3)])
def test_a_training_step_waits_for_nothing_and_its_stats_come_in_one_read(clip: float, skip: float) -> None:
    """engine.step reads nothing to the host (the EMA decay and the counters are device tensors); the stats,
    the votes, the grad norm, the skip decision and the counters then come in one transfer, on first use."""
    cfg = compose([*TINY, f"train.grad_clip={clip}", f"train.grad_skip={skip}"])
    data, model = prepare(cfg)
    engine = TorchEngine(model, cfg, data.shape, init(detect({})))
    engine.step(data.train[:16], 0)
    with _HostSyncs() as syncs, _ScalarReads() as reads:
        stats = engine.step(data.train[:16], 1, lambda: [0.0, 1.0])
    assert syncs.calls == [] and reads.count == 0
    with _HostSyncs() as syncs:
        assert stats["skipped"] == 0 and stats.votes == [0.0, 1.0] and stats.consecutive_skips == 0
        assert stats["skipped_total"] == 0 and math.isfinite(stats["grad_norm"])
    assert syncs.calls == ["tolist"]
    assert engine.counters() == {"skipped_total": 0, "consecutive_skips": 0, "applied_steps": 2}


def test_the_loop_waits_for_the_device_only_at_logged_steps(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's statistics are first read after the next step was queued (the host then waits for a step
    the device has finished, or is finishing while the next one runs), except at a logged step (every 3rd
    here) and the last step of the loop."""
    issued: list[StepStats] = []
    first_read: dict[int, int] = {}               # step -> steps queued when its stats were first read
    step, read = TorchEngine.step, StepStats._read

    def counted_step(self: TorchEngine, *args: Any) -> StepStats:
        issued.append(out := step(self, *args))
        return out

    def counted_read(self: StepStats) -> dict[str, float]:
        for n, stats in enumerate(issued, start=1):
            if stats is self and self._values is None:
                first_read[n] = len(issued)
        return read(self)
    monkeypatch.setattr(TorchEngine, "step", counted_step)
    monkeypatch.setattr(StepStats, "_read", counted_read)
    args = [*(a for a in TINY if not a.startswith("train.log_every=")), "train.log_every=3",
            "train.max_steps=7", "dist.engine=torch", f"run_dir={tmp_path}"]
    train(compose(args), args)
    waited = sorted(n for n, queued in first_read.items() if queued == n)
    assert sorted(first_read) == list(range(1, 8))
    assert waited == [3, 6, 7]


def test_the_stop_votes_ride_on_the_statistics_all_reduce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """One collective per training step: the loop's stop flags (signal, clock) are summed with the step's
    statistics; the separate agreement collective runs only at an epoch end."""
    calls: list[int] = []
    original = DistContext.all_reduce_sum

    def counted(self: DistContext, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return original(self, t)
    monkeypatch.setattr(DistContext, "all_reduce_sum", counted)
    assert len(_train_records(tmp_path, "train.max_steps=4")) == 4
    stats = 5 + 4                       # loss, nelbo, recon, kl_z, kl_u and kl/0..3 (4 latents)
    assert calls == [stats + 1 + len(SIGNALS)] * 4      # + out of time + one vote per signal


# ---- fp16 loss scaling -------------------------------------------------------------------------------------
def test_back_off_is_torchs_update_after_an_overflow() -> None:
    """LossScale.back_off (what DeepSpeed ZeRO 1-3 skipped) == GradScaler.update() after a step with inf."""
    model = torch.nn.Linear(2, 1)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=3)
    ours = LossScale("cpu", init_scale=2.0 ** 20, growth_interval=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for finite in (True, True, False):
        for scaler in (torch_scaler, ours):
            opt.zero_grad()
            scaler.scale(model(torch.ones(1, 2)).sum() * (1.0 if finite else math.inf)).backward()
            if finite or scaler is torch_scaler:
                scaler.step(opt)
                scaler.update()
            else:
                ours.back_off()
    assert torch_scaler.state_dict() == ours.state_dict()
    assert ours.get_scale() == 2.0 ** 19 and ours.state_dict()["_growth_tracker"] == 0


def _train_records(run_dir: Path, *over: str) -> list[dict]:
    """`dvp-train` in this process (a resume takes `over` on top of the saved config); the train records."""
    args = [*TINY, f"run_dir={run_dir}", *over]
    train(compose(args), args)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


FP16_OVERFLOW = ["train.precision=fp16", "train.fp16_init_scale=2097152", "train.max_steps=6"]


@pytest.fixture(scope="module")
def torch_fp16(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _train_records(tmp_path_factory.mktemp("fp16_torch"), *FP16_OVERFLOW, "dist.engine=torch")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_overflow_backs_off_at_every_zero_stage_as_in_the_torch_engine(torch_fp16: list[dict],
                                                                          tmp_path: Path, stage: int) -> None:
    """A loss scale of 2^21 overflows the fp16 backward of the digits model: the torch engine skips the first
    3 steps (the scale halves each time) and then trains. DeepSpeed (one process, real DeepSpeed on gloo) must
    skip the same steps and train the same way; before the fix ZeRO 1-3 never backed off and skipped them
    all."""
    ds = _train_records(tmp_path, *FP16_OVERFLOW, "dist.engine=deepspeed", f"dist.zero_stage={stage}")
    skipped = [r["skipped"] for r in ds]
    assert skipped == [r["skipped"] for r in torch_fp16]
    assert skipped == [1, 1, 1, 0, 0, 0]                  # it overflowed, backed off, then recovered
    assert all(math.isfinite(r["loss"]) for r in ds)
    assert [r["loss"] for r in ds] == pytest.approx([r["loss"] for r in torch_fp16], rel=1e-4)
    assert ds[-1]["loss"] < ds[0]["loss"]                 # the applied steps train


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_fp16_resume_continues_at_the_saved_loss_scale(torch_fp16: list[dict], tmp_path: Path,
                                                       engine: str) -> None:
    """Paused after the 3 overflows (loss scale backed off to 2^18) and resumed: the resumed run goes on at the
    saved scale, not at train.fp16_init_scale (which would overflow and skip 3 more steps), and ends as the
    uninterrupted run does (DeepSpeed: ZeRO-2, from its native shards)."""
    over = [*FP16_OVERFLOW[:-1], f"dist.engine={engine}", "dist.zero_stage=2"]
    _train_records(tmp_path, *over, "train.max_steps=4")
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["engine"]["counters"]["loss_scale"] == 2 ** 18
    resumed = _train_records(tmp_path, *over, "train.max_steps=6")
    assert [r["skipped"] for r in resumed] == [r["skipped"] for r in torch_fp16] == [1, 1, 1, 0, 0, 0]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in torch_fp16], rel=1e-4)


# ---- checkpoints across device types -----------------------------------------------------------------------
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["engine"]["model"]


def _add_gpu_rng_states(run_dir: Path) -> None:
    """What a GPU run writes besides the CPU state (mocked: no GPU here): last.pt's rng['cuda'] and, next to
    DeepSpeed's shards, each rank's rng file with 'cuda' (this format) and 'accelerator' (the format before
    it, which held the CUDA state under that name)."""
    fake = torch.randint(0, 255, (CUDA_RNG_BYTES,), dtype=torch.uint8)
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["rng"]["cuda"] = fake
    save_checkpoint(last, {k: v for k, v in state.items() if k not in ("format", "version")})
    for path in (run_dir / "checkpoints" / "deepspeed").glob("step*/rng_rank*.pt"):
        rng = torch.load(path, weights_only=True)
        torch.save({**rng, "cuda": fake, "accelerator": fake}, path)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_checkpoint_with_gpu_rng_states_resumes_on_cpu_bitwise(tmp_path: Path, engine: str) -> None:
    """The CUDA state (which the CPU generator would refuse: wrong size) is left out, the CPU state restored,
    and the resumed run ends bitwise equal to the uninterrupted one (deepspeed: from its native shards)."""
    over = ["train.max_steps=4", f"dist.engine={engine}"]
    _train_records(tmp_path / "whole", *over)
    _train_records(tmp_path / "part", "train.max_steps=2", f"dist.engine={engine}")
    _add_gpu_rng_states(tmp_path / "part")
    if engine == "deepspeed":
        assert list((tmp_path / "part" / "checkpoints" / "deepspeed").glob("step2/rng_rank0.pt"))
    _train_records(tmp_path / "part", *over)
    whole, part = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert all(torch.equal(whole[k], part[k]) for k in whole)


# ---- DeepSpeed's communication buckets ---------------------------------------------------------------------
@pytest.mark.parametrize("n_params,bucket", [(100_000, 2 ** 16), (1_500_000, 375_000),
                                             (10 ** 9, 5 * 10 ** 7)])
def test_gradient_buckets_let_communication_overlap_backward(n_params: int, bucket: int) -> None:
    """A quarter of the model per bucket (4 reductions that ZeRO 2-3 overlap with backward), within
    [2^16, 5e7] elements; overlap_comm at ZeRO 2 and 3 only."""
    from dvp.train.engine_deepspeed import deepspeed_config
    for stage in range(4):
        ds = deepspeed_config(compose([f"dist.zero_stage={stage}"]), 8, 8, n_params)["zero_optimization"]
        assert ds["reduce_bucket_size"] == bucket and ds["overlap_comm"] == (stage >= 2)
