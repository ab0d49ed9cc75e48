"""The GPU path in one command: throughput, resume, DeepSpeed ZeRO through its launcher, fp16 recovery, IS-NLL
and TF32, each section a check that fails loudly; one JSON and a printed table.

    python benchmarks/gpu_check.py --data-root data                  # a GPU machine: < 8 min on one H100
    python benchmarks/gpu_check.py --quick --data-root DIR --out /tmp/gpu_check.json     # CPU quick check

Sections (each timed; a failed one is reported with its message and the script exits 1 after the others ran):
- throughput: benchmarks/train_throughput.py on `experiment=mnist/dvp_vae` (batch 250): fp32, bf16, bf16 with
  channels_last, bf16 + channels_last + compile, images/s and % of the device's measured bf16 matmul peak.
- resume: a bf16 run of 300 steps (quick: 4) that validates (an epoch ends inside it), against the same run
  stopped halfway and resumed; the relative L2 distance of the two final weights, ||w_r - w|| / ||w||, must be
  below `--resume-tol` (GPU kernels are not bitwise reproducible; on CPU it is 0).
- zero: ZeRO-2 and ZeRO-3 on one device through `deepspeed --num_gpus 1 --module dvp.train` (run as `python -m
  deepspeed.launcher.runner`, the `deepspeed` command's module), stopped halfway and resumed from DeepSpeed's
  native shards (same world size and stage).
- fp16_overflow: fp16 at ZeRO-2 through the same launcher with a huge initial loss scale (every first step
  overflows): the run must recover (skipped steps < steps, finite final loss); reports both.
- is_nll: `dvp-eval` of the resumed run with K=1,000 on 1,000 test images (quick: 10 on 5), and its time.
- tf32: the same checkpoint's test -ELBO (all test images) in true float32 (what evaluation does) and with
  TF32 convolutions and matmuls (what cuDNN does by default): the effect of TF32 on the figure.
- gpu_tests: the suite's `gpu` mark (tests/test_gpu.py, DVP_TEST_GPU=1), on a GPU only.

The JSON (`--out`, default benchmarks/results/gpu/<device>.json) records the device, torch, DeepSpeed and
Python versions, and per section its wall time, whether it passed, its figures or its error. `--quick` shrinks
every section (a model of 8 channels, a few steps of batch 25, ZeRO-3 only in `zero` since fp16_overflow launches
ZeRO-2, K=10 on 5 images, TF32 on 200; no compile) so that the whole
script runs on 2 CPU cores in a few minutes (tests/test_benchmarks.py). The GPU machine gets only the
repository: copy mnist.npz into an ignored folder of it and pass that folder as `--data-root`
(benchmarks/README.md)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


class CheckFailed(Exception):
    """A section's check did not hold; the message says which and by how much."""


@dataclass(frozen=True)
class Plan:
    """The sizes of every section: the GPU run's, or the quick CPU check's."""
    batch: int
    val_size: int
    model: tuple[str, ...]             # extra overrides of the model (quick: a narrow one)
    settings: tuple[str, ...]          # train_throughput.py settings
    warmup: int
    timed: int
    matmul_size: int
    resume_steps: int
    zero_steps: int
    zero_stages: tuple[int, ...]       # ZeRO stages launched and resumed (quick: ZeRO-2 runs in fp16_overflow)
    fp16_steps: int
    fp16_scale: float                  # the forced initial loss scale (halved at every overflowing step)
    tf32_images: int | None            # test images of the TF32 comparison (None: all)
    is_samples: int
    is_images: int
    threads: int | None                # train.num_threads (quick: 1 on a shared CPU)


GPU = Plan(batch=250, val_size=10_000, model=(),
           settings=("fp32_eager", "bf16", "bf16_cl", "bf16_cl_compile"), warmup=3, timed=20, matmul_size=8192,
           resume_steps=300, zero_steps=20, zero_stages=(2, 3), fp16_steps=30,
           fp16_scale=2.0 ** 24, tf32_images=None,
           is_samples=1000, is_images=1000, threads=None)
QUICK = Plan(batch=25, val_size=5400, model=("model.num_ch=8", "model.diffusion.T=3"),
             settings=("fp32_eager", "bf16"), warmup=1, timed=1, matmul_size=256, resume_steps=4,
             zero_steps=2, zero_stages=(3,),
             fp16_steps=11, fp16_scale=2.0 ** 24, tf32_images=200, is_samples=10, is_images=5, threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], what: str, timeout: float = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository root (environment: this one and `env`); a non-zero exit is a CheckFailed
    with the tail of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise CheckFailed(f"{what} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return proc


class Check:
    """The sections' shared inputs: the plan, the data, the working folder, the device."""

    def __init__(self, plan: Plan, data_root: str, work: Path, cuda: bool, tolerance: float) -> None:
        self.plan, self.data_root, self.work, self.cuda = plan, data_root, work, cuda
        self.tolerance = tolerance

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        """dvp-train arguments of an MNIST run of this plan in `run_dir`."""
        p = self.plan
        args = ["experiment=mnist/dvp_vae", f"data.root={self.data_root}", f"run_dir={run_dir}",
                f"train.batch_size={p.batch}", f"data.val_size={p.val_size}", "train.final_eval=false",
                "train.ckpt_every=0", "train.log_every=1", "wandb.mode=disabled", *p.model, *extra]
        args += [f"train.num_threads={p.threads}"] if p.threads else []
        return args + [f"dist.device={'cuda' if self.cuda else 'cpu'}"]     # no silent fallback to the CPU

    def train(self, run_dir: Path, *extra: str, launcher: bool = False) -> str:
        """One dvp-train run (through the `deepspeed` launcher on one device with `launcher`); its stdout."""
        if launcher:     # the `deepspeed` command's own module: the GPU machine's wheels install no scripts
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                   str(free_port()), "--module", "dvp.train"]
        else:
            cmd = [sys.executable, "-m", "dvp.train"]
        return run(cmd + self.overrides(run_dir, *extra), f"dvp-train {' '.join(extra)}").stdout


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from dvp.train.checkpoint import load_checkpoint
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["engine"]["model"]


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all parameters."""
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return math.sqrt(diff / sum(float(v.double().pow(2).sum()) for v in a.values()))


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


def section_throughput(c: Check) -> dict[str, Any]:
    p = c.plan
    out = c.work / "train_throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--data-root", c.data_root,
           "--settings", *p.settings, "--warmup", str(p.warmup), "--steps", str(p.timed),
           "--batch", str(p.batch),
           "--matmul-size", str(p.matmul_size), "--out", str(out)]
    run(cmd + (["--threads", str(p.threads)] if p.threads else []), "train_throughput.py", timeout=900)
    r = json.loads(out.read_text())
    keys = ("images_per_s", "frac_bf16_peak", "channels_last", "compile")
    rows = {x["setting"]: {k: x[k] for k in keys} for x in r["results"]}
    if not all(math.isfinite(x["images_per_s"]) and x["images_per_s"] > 0 for x in rows.values()):
        raise CheckFailed(f"throughput not positive: {rows}")
    return {"matmul_peak_tflops": r["matmul_peak_tflops"], "gflop_per_image": r["flops_per_image"] / 1e9,
            "settings": rows}


def section_resume(c: Check) -> dict[str, Any]:
    n = c.plan.resume_steps
    full, resumed = c.work / "resume_full", c.work / "resume_resumed"
    c.train(full, "train.precision=bf16", f"train.max_steps={n}")
    c.train(resumed, "train.precision=bf16", f"train.max_steps={n // 2}")
    second = c.train(resumed, "train.precision=bf16", f"train.max_steps={n}")
    if f"resumed at step {n // 2}" not in second:
        raise CheckFailed(f"the second run did not resume at step {n // 2}: {second[-1000:]}")
    if not (full / "checkpoints" / "best.pt").exists():
        raise CheckFailed(f"no validation within {n} steps (no best.pt): an epoch must end inside the run")
    distance = relative_l2(weights(full), weights(resumed))
    result = {"steps": n, "relative_l2": distance, "tolerance": c.tolerance}
    if not distance <= c.tolerance:
        raise CheckFailed(f"resumed weights differ from the uninterrupted run's: relative L2 {distance:.3g}"
                          f" > {c.tolerance:g}")
    return result


def section_zero(c: Check) -> dict[str, Any]:
    n, result = c.plan.zero_steps, {}
    for stage in c.plan.zero_stages:
        run_dir = c.work / f"zero{stage}"
        args = ("dist.engine=deepspeed", f"dist.zero_stage={stage}", "train.precision=bf16")
        c.train(run_dir, *args, f"train.max_steps={n // 2}", launcher=True)
        shards = run_dir / "checkpoints" / "deepspeed" / f"step{n // 2}"
        if not shards.is_dir():
            raise CheckFailed(f"ZeRO-{stage}: no native shards at {shards}")
        second = c.train(run_dir, *args, f"train.max_steps={n}", launcher=True)
        if f"resumed at step {n // 2}" not in second:
            raise CheckFailed(f"ZeRO-{stage}: the relaunch did not resume at step {n // 2}: {second[-1000:]}")
        last = train_records(run_dir)[-1]
        if last["step"] != n or not math.isfinite(last["loss"]):
            raise CheckFailed(f"ZeRO-{stage}: last record {last}")
        result[f"zero{stage}"] = {"steps": n, "final_loss_bpd": last["loss"]}
    return result


def section_fp16_overflow(c: Check) -> dict[str, Any]:
    n, run_dir = c.plan.fp16_steps, c.work / "fp16_zero2"
    c.train(run_dir, "dist.engine=deepspeed", "dist.zero_stage=2", "train.precision=fp16",
            f"train.fp16_init_scale={c.plan.fp16_scale}", f"train.max_steps={n}", launcher=True)
    records = train_records(run_dir)
    skipped, last = int(records[-1]["skipped_total"]), records[-1]
    result = {"steps": n, "initial_scale": c.plan.fp16_scale, "skipped_steps": skipped,
              "final_loss_bpd": last["loss"]}
    if not (1 <= skipped < n and math.isfinite(last["loss"]) and last["skipped"] == 0):
        raise CheckFailed(f"fp16 at ZeRO-2 did not recover from the forced overflow: {result}")
    return result


def section_is_nll(c: Check) -> dict[str, Any]:
    p, out = c.plan, c.work / "is_nll.json"
    cmd = [sys.executable, "-m", "dvp.evaluate", f"run_dir={c.work / 'resume_resumed'}", "checkpoint=last",
           f"eval.is_samples={p.is_samples}", f"eval.max_images={p.is_images}", f"data.root={c.data_root}",
           f"out={out}"]
    start = time.perf_counter()
    run(cmd, "dvp-eval")
    seconds = time.perf_counter() - start
    r = json.loads(out.read_text())
    result = {"k": p.is_samples, "images": r["images"], "nll": r["nll"], "nelbo": r["elbo_nelbo"],
              "seconds": seconds}
    if not (math.isfinite(r["nll"]) and r["nll"] < r["elbo_nelbo"] and r["images"] == p.is_images):
        raise CheckFailed(f"IS-NLL not finite or not below the -ELBO: {result}")
    return result


@contextmanager
def tf32_evaluation(tf32: bool):
    """Evaluation in true float32 (dvp's) or with TF32 convolutions and matmuls (cuDNN's default before)."""
    from dvp.evaluate import sharded
    from dvp.model.precision import autocast, float32_math

    @contextmanager
    def with_tf32(precision: str, device: torch.device):
        with float32_math(tf32=True), autocast(precision, device):
            yield

    saved = sharded.evaluation
    sharded.evaluation = with_tf32 if tf32 else saved
    try:
        yield
    finally:
        sharded.evaluation = saved


def section_tf32(c: Check) -> dict[str, Any]:
    from dvp.cli.runs import load_run
    from dvp.evaluate.sharded import evaluate_elbo
    device = torch.device("cuda" if c.cuda else "cpu")
    r = load_run({"run_dir": str(c.work / "resume_resumed"), "checkpoint": "last"},
                 [f"data.root={c.data_root}"], device)
    test = r.data().test[:c.plan.tf32_images]
    nelbo = {}
    for name, tf32 in (("fp32", False), ("tf32", True)):
        with tf32_evaluation(tf32):
            nelbo[name] = evaluate_elbo(r.model, test, r.cfg, seed=0, stream="test", quadrature=True)["nelbo"]
    result = {"images": len(test), "nelbo_fp32": nelbo["fp32"], "nelbo_tf32": nelbo["tf32"],
              "difference": nelbo["tf32"] - nelbo["fp32"]}
    if not all(map(math.isfinite, nelbo.values())):
        raise CheckFailed(f"test -ELBO not finite: {result}")
    return result


def section_gpu_tests(c: Check) -> dict[str, Any]:
    if not c.cuda:
        return {"skipped": "no GPU: the gpu mark needs one"}
    if not (ROOT / "tests" / "test_gpu.py").exists():
        raise CheckFailed("missing: tests/test_gpu.py (the gpu mark's tests)")
    cmd = [sys.executable, "-m", "pytest", "-n", "0", "-m", "gpu", "-q", "tests/test_gpu.py"]
    tail = run(cmd, "pytest -m gpu", env={"DVP_TEST_GPU": "1"}).stdout.strip().splitlines()[-1]
    return {"summary": tail}


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "throughput": section_throughput, "resume": section_resume, "zero": section_zero,
    "fp16_overflow": section_fp16_overflow, "is_nll": section_is_nll, "tf32": section_tf32,
    "gpu_tests": section_gpu_tests}
"""In order: is_nll and tf32 read the resume section's run."""


def environment(cuda: bool) -> dict[str, Any]:
    import deepspeed
    from train_throughput import device_name  # this folder: the GPU's name, or the CPU's model name
    return {"device": device_name(), "cuda": cuda, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "cuda_version": torch.version.cuda}


def summary(name: str, section: dict[str, Any]) -> str:
    """One line of a section's figures (or its error) for the table."""
    if not section["ok"]:
        return section["error"].splitlines()[0][:140]
    r = section["figures"]
    if name == "throughput":
        peak = r["matmul_peak_tflops"]["bf16"]
        return "; ".join(f"{k} {v['images_per_s']:.0f} img/s ({100 * v['frac_bf16_peak']:.1f}%)"
                         for k, v in r["settings"].items()) + f" of bf16 peak {peak:.1f} TFLOP/s"
    if name == "resume":
        return f"{r['steps']} steps, relative L2 {r['relative_l2']:.2e} (tol {r['tolerance']:g})"
    if name == "zero":
        return "; ".join(f"{k}: {v['steps']} steps, loss {v['final_loss_bpd']:.4f} bpd" for k, v in r.items())
    if name == "fp16_overflow":
        return f"{r['skipped_steps']} of {r['steps']} steps skipped, final loss {r['final_loss_bpd']:.4f} bpd"
    if name == "is_nll":
        return (f"K={r['k']} x {r['images']} images: NLL {r['nll']:.3f} (-ELBO {r['nelbo']:.3f}) "
                f"in {r['seconds']:.1f} s")
    if name == "tf32":
        return (f"test -ELBO fp32 {r['nelbo_fp32']:.4f}, tf32 {r['nelbo_tf32']:.4f} "
                f"(diff {r['difference']:+.2e}) on {r['images']} images")
    return r.get("skipped") or r["summary"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="directory holding mnist.npz")
    p.add_argument("--quick", action="store_true", help="the CPU quick check (tiny sizes)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--resume-tol", type=float, default=None,
                   help="largest relative L2 of resumed vs uninterrupted weights (default 0.05 on GPU, 0 on "
                   "CPU)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu/<device>.json)")
    args = p.parse_args()
    if not (Path(args.data_root) / "mnist.npz").exists():
        raise SystemExit(f"error: --data-root {args.data_root} holds no mnist.npz")
    cuda = torch.cuda.is_available()
    env = environment(cuda)
    slug = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_") + ("_quick" if args.quick else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" / "gpu" / f"{slug}.json")
    work = Path(args.work or tempfile.mkdtemp(prefix="dvp_gpu_check_"))
    tolerance = args.resume_tol if args.resume_tol is not None else (0.05 if cuda else 0.0)
    check = Check(QUICK if args.quick else GPU, str(Path(args.data_root).resolve()), work, cuda, tolerance)
    print(f"{env['device']}: torch {env['torch']}, deepspeed {env['deepspeed']}, work {work}", flush=True)
    results: dict[str, Any] = {}
    for name in args.sections:
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, "figures": SECTIONS[name](check)}
        except Exception as e:     # any failure of a section is its result; the others still run
            error = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
            results[name] = {"ok": False, "error": error}
            print(f"FAILED {name}: {error}", file=sys.stderr, flush=True)
        results[name]["wall_s"] = time.perf_counter() - start
        status = "ok" if results[name]["ok"] else "FAILED"
        print(f"  {name}: {status} ({results[name]['wall_s']:.0f} s)", flush=True)
    report = {**env, "quick": args.quick, "plan": vars(check.plan), "sections": results,
              "total_s": sum(r["wall_s"] for r in results.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  {'ok' if r['ok'] else 'FAILED':6}  {r['wall_s']:6.1f} s  {summary(name, r)}")
    print(f"total {report['total_s']:.0f} s; wrote {out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
