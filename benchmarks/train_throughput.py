"""Training throughput of the MNIST DVP-VAE (`experiment=mnist/dvp_vae`, batch 250) under several engine settings.

    python benchmarks/train_throughput.py --data-root /work/shared/data          # ~10 min on 2 CPU cores
    python benchmarks/train_throughput.py --steps 2 --warmup 1 --settings fp32_eager bf16 --matmul-size 256 \
        --batch 25 --out /tmp/train_throughput.json                            # a quick check

Every setting runs in its own subprocess (`--setting NAME --child`, which prints one JSON line), so peak memory
is per setting. All settings start from the same initialisation (train.seed), see the same batches (real MNIST
with `--data-root`, else random grey images; targets binarised with a seeded generator) and the same model noise
seed, and run `--warmup` + `--steps` optimizer steps through `TorchEngine.step`. Warm-up steps (where
torch.compile compiles) are timed separately; the timed steps give the median seconds per step. The -ELBO of
every step is recorded so that equal steps can be compared across settings: `nelbo_final` is the mean over the
last 5 timed steps and `dnelbo_rel` its relative difference to fp32_eager. (Compiled code draws its noise from
Inductor's own generator, so compiled settings see different z/u/t noise: their difference includes sampling
noise.)

The parent also measures the model FLOPs of one training step per image (forward + backward, fp32 eager,
`torch.utils.flop_counter`) and the run's device's dense matmul peak (n x n bf16 and fp32 `torch.matmul` on
the GPU when there is one, else the CPU; n = `--matmul-size`, default 4096, best of a few, the GPU
synchronised around each timed batch of products; a CPU without native bf16 takes minutes per 4096^2 bf16
product, the quick check's 256 seconds), and reports GFLOP/s achieved and its fraction of the bf16 peak. One
extra profiled step per setting gives the seconds spent inside the convolutions (`conv_s_per_step`; on a GPU
the kernels' device time): their share of the step, and the speedup over fp32_eager that the setting would
reach if everything but its convolutions cost nothing (`ceiling_speedup`). fp32 is true float32 on a GPU
(train.tf32=false, as dvp-train sets it; cudnn.benchmark on). Results go to `--out` as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dvp.core.config import compose
from dvp.data.batches import model_inputs
from dvp.data.datasets import load_data
from dvp.model.blocks import Float32Conv2d
from dvp.model.objectives import elbo_stats
from dvp.model.precision import configure_training
from dvp.model.vae import HierarchicalVAE, build_model
from dvp.parallel.context import init
from dvp.parallel.launch import detect
from dvp.train.engine_torch import TorchEngine
from dvp.train.loop import lr_at

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32_eager": {"precision": "fp32", "channels_last": False, "compile": False},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16_cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16_cl_compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "fp32_compile": {"precision": "fp32", "channels_last": False, "compile": True},
    # for comparison: every convolution in bf16, also the float32 ones of `blocks.Float32Conv2d`
    "bf16_cl_compile_allconv": {"precision": "bf16", "channels_last": True, "compile": True,
                                "float32_convs": False},
}
BASELINE = "fp32_eager"
LAST = 5   # timed steps averaged into nelbo_final


def config(setting: str, seed: int, batch: int) -> Any:
    s = SETTINGS[setting]
    return compose(["experiment=mnist/dvp_vae", f"train.batch_size={batch}", f"train.seed={seed}",
                    f"train.precision={s['precision']}", f"train.channels_last={str(s['channels_last']).lower()}",
                    f"train.compile={str(s['compile']).lower()}"])


def images(data_root: str | None, seed: int) -> torch.Tensor:
    """The training images in [-1, 1]: MNIST's training split, or 10,000 random grey images."""
    if data_root:
        return load_data("mnist", data_root).train
    return torch.rand(10_000, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def batches(train: torch.Tensor, n: int, seed: int, batch: int) -> list[torch.Tensor]:
    """n fixed global batches of `batch` images, identical for every setting (the engine binarises them with its
    seeded noise)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)
    idx = idx.repeat(-(-n * batch // len(idx)))[:n * batch]
    return [train[idx[i * batch:(i + 1) * batch]] for i in range(n)]


def model_for(cfg: Any, train: torch.Tensor) -> HierarchicalVAE:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, (1, 28, 28))
    model.fit_to_data(train)
    return model


def run_child(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train warm-up + timed steps under one setting; returns its measurements."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SETTINGS[setting].get("float32_convs", True):   # this child process only
        Float32Conv2d.forward = torch.nn.Conv2d.forward
    cfg = config(setting, args.seed, args.batch)
    train = images(args.data_root, args.seed)
    data = batches(train, args.warmup + args.steps, args.seed, args.batch)
    ctx = init(detect({}))
    configure_training(cfg.train.tf32, ctx.device)
    engine = TorchEngine(model_for(cfg, train), cfg, (1, 28, 28), ctx)
    engine.set_lr(lr_at(0, cfg.train))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, nelbos = [], []
    for step, x in enumerate(data):
        t0 = time.perf_counter()
        stats = engine.step(x, step)
        synchronize(ctx.device)
        times.append(time.perf_counter() - t0)
        nelbos.append(stats["nelbo"])
    timed = times[args.warmup:]
    median = statistics.median(timed)
    conv_s = conv_seconds(engine, data[-1])
    return {"setting": setting, **SETTINGS[setting], "device": str(ctx.device),
            "threads": torch.get_num_threads(),
            "warmup_steps": args.warmup, "timed_steps": args.steps,
            "first_step_s": times[0], "warmup_s": sum(times[:args.warmup]),
            "s_per_step": median, "s_per_step_min": min(timed), "images_per_s": args.batch / median,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_before_steps_mib": rss_before, "conv_s_per_step": conv_s,
            "nelbo_steps": nelbos, "nelbo_final": statistics.fmean(nelbos[-min(LAST, args.steps):])}


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing on CPU): a timed interval then holds its kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_seconds(engine: TorchEngine, x: torch.Tensor) -> float:
    """Seconds of one extra (profiled, untimed) step spent inside convolutions and matrix products, forward and
    backward (oneDNN or cuDNN convolutions, and the float32 1x1 convolutions that run as `mm`/`addmm`/
    `baddbmm`): CPU time of those operators on CPU, the device time of their kernels on a GPU.

    These carry nearly all the FLOPs, so 1 / (this time) bounds the step rate that fusing or removing everything
    else could reach: the ceiling reported next to each setting.
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        engine.step(x, 0)
        synchronize(engine.device)
    conv_ops = ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::convolution_backward",
                "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    events = [e for e in prof.key_averages() if e.key in conv_ops]
    return sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e6


def flops_per_image(args: argparse.Namespace) -> float:
    """FLOPs of one fp32 eager training step (forward, loss, backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = config(BASELINE, args.seed, args.batch)
    train = images(args.data_root, args.seed)
    model = model_for(cfg, train).train()
    torch.manual_seed(args.seed)
    x = batches(train, 1, args.seed, args.batch)[0]
    x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
    with FlopCounterMode(display=False) as counter:
        elbo_stats(model(x_enc, x_target), (1, 28, 28))["loss"].backward()
    return counter.get_total_flops() / args.batch


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5,
                device: torch.device | None = None) -> float:
    """Best-of-`reps` TFLOP/s of n x n x n `torch.matmul`s in `dtype` on `device` (default: the GPU if there
    is one, else the CPU). On a GPU each timed rep is 20 products between synchronisations (one 4096^3 bf16
    product takes ~0.1 ms there) and float32 is true float32 (no TF32)."""
    from dvp.model.precision import float32_math
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    inner = 20 if device.type == "cuda" else 1
    best = float("inf")
    with float32_math(tf32=False):
        torch.matmul(a, b)
        synchronize(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.matmul(a, b)
            synchronize(device)
            best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / best / 1e12


def device_name() -> str:
    """The GPU's name when there is one, else the CPU's model name."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu()["model_name"]


def cpu() -> dict[str, Any]:
    """The CPU the figures belong to: /proc/cpuinfo's model name, family and model, and its bf16 instructions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    flags = first.get("flags", "").split()
    return {"model_name": first.get("model name", platform.processor()), "family": first.get("cpu family"),
            "model": first.get("model"), "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags]}


def run_setting(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--setting", setting, "--seed", str(args.seed),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--data-root", args.data_root] if args.data_root else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"setting {setting} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    print(f"  {setting}: {result['s_per_step']:.3f} s/step, {result['images_per_s']:.0f} img/s "
          f"({result['process_s']:.0f} s)", flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = ("setting", "s/step", "img/s", "speedup", "GFLOP/s", "% fp32 peak", "% bf16 peak", "conv share", "ceiling",
            "peak MiB", "final nelbo", "Δnelbo vs fp32")
    rows = [head] + [(r["setting"], f"{r['s_per_step']:.3f}", f"{r['images_per_s']:.0f}",
                      f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-",
                      f"{r['gflops']:.1f}", f"{100 * r['frac_fp32_peak']:.1f}%", f"{100 * r['frac_bf16_peak']:.1f}%",
                      f"{100 * r['conv_share']:.0f}%",
                      f"{r['ceiling_speedup']:.2f}x" if r["ceiling_speedup"] is not None else "-",
                      f"{r['peak_rss_mib']:.0f}",
                      f"{r['nelbo_final']:.2f}",
                      f"{100 * r['dnelbo_rel']:+.2f}%" if r["dnelbo_rel"] is not None else "-")
                     for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--data-root", default=None, help="directory with mnist.npz (default: random grey images)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--batch", type=int, default=250, help="images per step (the paper's MNIST batch: 250)")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n matmuls timed for the peak")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    p.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.setting, args)), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{device_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, data: {args.data_root or 'random'}", flush=True)
    results = [run_setting(s, args) for s in args.settings]   # first: a child inherits the parent's peak RSS
    flops = flops_per_image(args)
    peak = {"bf16": matmul_peak(torch.bfloat16, args.matmul_size),
            "fp32": matmul_peak(torch.float32, args.matmul_size)}
    print(f"  {flops / 1e9:.3f} GFLOP per image per training step; matmul peak bf16 {peak['bf16']:.2f}, "
          f"fp32 {peak['fp32']:.2f} TFLOP/s", flush=True)
    base = next((r for r in results if r["setting"] == BASELINE), None)
    for r in results:
        r["gflops"] = flops * r["images_per_s"] / 1e9
        r["frac_fp32_peak"] = r["gflops"] / (peak["fp32"] * 1e3)
        r["frac_bf16_peak"] = r["gflops"] / (peak["bf16"] * 1e3)
        r["speedup"] = r["images_per_s"] / base["images_per_s"] if base else None
        r["conv_share"] = r["conv_s_per_step"] / r["s_per_step"]
        r["conv_gflops"] = flops * args.batch / r["conv_s_per_step"] / 1e9   # upper bound: all FLOPs in the convs
        r["ceiling_speedup"] = base["s_per_step"] / r["conv_s_per_step"] if base else None
        r["dnelbo_rel"] = (r["nelbo_final"] - base["nelbo_final"]) / abs(base["nelbo_final"]) if base else None
    out = {"experiment": "mnist/dvp_vae", "batch_size": args.batch, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "cpu": cpu(), "device": device_name(),
           "threads": torch.get_num_threads(),
           "data": args.data_root or "random", "seed": args.seed, "warmup_steps": args.warmup,
           "timed_steps": args.steps, "flops_per_image": flops, "matmul_size": args.matmul_size,
           "matmul_peak_tflops": peak, "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
