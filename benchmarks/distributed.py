"""Data-parallel training on CPU: DeepSpeed ZeRO stages x precisions at 2 processes, 2 x 1 against 1 x 2 threads,
the DeepSpeed engine's overhead in one process, and 2-rank against 1-rank `dvp-eval`.

    python benchmarks/distributed.py                                   # the default set, ~10 min on 2 idle cores
    python benchmarks/distributed.py --stages 0 3 --precisions fp32 --steps 2 --warmup 1 --repeats 1 \\
        --eval-samples 5 --eval-images 20                              # a quick check of every path
    python benchmarks/distributed.py --data-root /work/shared/data     # real MNIST instead of the 8x8 digits

Every training case runs in its own process group: `torchrun --nproc_per_node 2` (OMP_NUM_THREADS=1 and
`torch.set_num_threads(1)` per rank) or one plain process, re-invoking this file as `--worker SPEC.json`; each rank
writes one JSON of its measurements, which the parent merges. Every case builds the model with
`dvp.train.loop.prepare`, the engine with `make_engine` (dvp.train.engines; the same code as `dvp-train`), and
steps it on the
same fixed global batches (every rank gets the whole batch; the engine takes its rows): `--warmup` untimed
steps, `--steps` timed ones (median s/step; img/s = global batch / median), then one extra step in which the
memory held is measured. A case that fails records its error and traceback in the JSON, and the rest go on.

1. `zero`: dist.engine=deepspeed, dist.zero_stage in --stages, train.precision in --precisions, 2 processes x 1
   thread. Per rank: peak RSS (ru_maxrss) and its growth over the RSS after the imports, and bytes held of
   - params: the module's parameters as the rank holds them (ZeRO-3: `p.ds_tensor`, the rank's partition);
   - master: the float32 tensors the optimizer updates (`engine.partitions`) where they are not the module's own
     parameters (ZeRO 1-3 keep a float32 copy of the rank's partition; ZeRO 0 updates the parameters in place);
   - grads: measured during the extra step, after every parameter's gradient accumulation (a post-accumulate-
     grad hook on each module parameter) and at the optimizer step (a step pre-hook on AdamaxEMA): the gradients
     then alive, i.e. `.grad` of the module's parameters and of the optimizer's tensors, and every tensor in an
     attribute of DeepSpeed's ZeRO optimizer whose name contains `grad` or `ipg` (reduction buckets, partition
     buffers). `grads peak`: the most bytes these tensors covered at any of those points (overlapping views
     once); `grads@step`: the same at the optimizer step; `grads alloc`: the largest total of the whole storages
     behind them (a bucket allocated larger than what is written into it counts whole: on CPU untouched pages
     cost no RSS, on an accelerator they are allocated). The JSON splits each into the three sources;
   - optim: exp_avg + exp_inf of `engine.optimizer.state` over `engine.partitions`; ema: its `ema` entry;
   next to the theory for N = 2 ranks and P float32 parameters (4P bytes): params 4P (ZeRO-3: 4P/N); master 0
   (ZeRO 0) else 4P/N; grads 4P (ZeRO 0-1) else 4P/N; optim 8P (ZeRO 0) else 8P/N; ema 4P (ZeRO 0) else 4P/N.
   Measured partitions exceed 4P/N a little where DeepSpeed pads them for alignment.
2. `scaling`: the same global batch on 2 processes x 1 thread (DeepSpeed ZeRO-0, fp32) and on 1 process x 2
   threads (dist.engine=torch): img/s and their ratio.
3. `overhead`: dist.engine=deepspeed (ZeRO-0, fp32) against dist.engine=torch, both in one process with
   --overhead-threads threads: (s/step deepspeed / s/step torch - 1) in %.
   The arms of 2 and 3 run --repeats times, interleaved; each arm's figure is its best run (least disturbed by
   other load on the machine), every run is in the JSON.
4. `eval`: a tiny run (`dvp.train model.num_ch=16 train.max_steps=20 train.final_eval=false`), then the wall time
   of `python -m dvp.evaluate run_dir=DIR eval.is_samples=K eval.max_images=M` against `torchrun
   --nproc_per_node 2 -m dvp.evaluate ...` (OMP_NUM_THREADS=1), with both IS-NLLs (they should agree up to float
   summation order). Wall time includes starting Python (and torchrun) and loading the checkpoint.

Results go to --out (JSON, with the CPU model, torch and deepspeed versions) and a table on stdout. Nothing is
asserted: on a shared or small machine the figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
PRECISIONS = ("fp32", "bf16", "fp16")
MIB = 2 ** 20


# ---- worker: one rank of one case -------------------------------------------------------------------------------
def rss_now_mib() -> float:
    """This process's current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def collect_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    """Tensors in `obj` and in its lists, tuples and dicts (a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            collect_tensors(item, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            collect_tensors(item, out, depth + 1)


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a view counts its whole buffer, once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def extent_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes covered by `tensors` themselves (the union of their memory ranges: overlapping views count once,
    the unused rest of a larger buffer does not count)."""
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        reach = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
        spans.append((t.data_ptr(), t.data_ptr() + reach * t.element_size()))
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def grads_held(engine: Any) -> dict[str, Any]:
    """The gradient memory alive now (called inside the optimizer step): see the module docstring."""
    module = getattr(engine, "module", None) or engine.model
    module_grads = [p.grad for p in module.parameters() if p.grad is not None]
    opt_grads = [p.grad for p in engine.optimizer.params() if p.grad is not None]
    ds = getattr(engine, "ds", None)
    zero = getattr(ds, "optimizer", None) if ds is not None else None
    buffers: list[torch.Tensor] = []
    names = []
    if zero is not None and zero is not engine.optimizer:
        for name, value in vars(zero).items():
            if "grad" in name.lower() or "ipg" in name.lower():
                found: list[torch.Tensor] = []
                collect_tensors(value, found)
                found = [t for t in found if t.numel() > 1]      # not scalars such as norms or flags
                if found:
                    names.append(name)
                    buffers += found
    every = module_grads + opt_grads + buffers
    return {"grads_module_bytes": extent_bytes(module_grads), "grads_optimizer_bytes": extent_bytes(opt_grads),
            "grads_zero_buffers_bytes": extent_bytes(buffers), "grads_zero_buffer_attrs": names,
            "grads_bytes": extent_bytes(every), "grads_alloc_bytes": storage_bytes(every)}


def held_memory(engine: Any) -> dict[str, Any]:
    """Bytes of parameters, float32 master copy, optimizer moments and EMA that this rank holds now."""
    module = getattr(engine, "module", None) or engine.model
    trainable = [p for p in module.parameters() if p.requires_grad]
    full = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    held = [getattr(p, "ds_tensor", p) for p in trainable]
    partitions = list(getattr(engine, "partitions", None) or engine.optimizer.params())
    param_ptrs = {t.untyped_storage().data_ptr() for t in held if t.numel()}
    master = [t for t in partitions if t.untyped_storage().data_ptr() not in param_ptrs]
    state = engine.optimizer.state
    return {"param_count": full, "params_bytes": sum(nbytes(t) for t in held),
            "master_bytes": sum(nbytes(t) for t in master),
            "partition_numel": sum(t.numel() for t in partitions),
            "optim_bytes": sum(nbytes(state[t][k]) for t in partitions for k in ("exp_avg", "exp_inf")),
            "ema_bytes": sum(nbytes(state[t]["ema"]) for t in partitions)}


def theory(param_count: int, stage: int | None, world: int) -> dict[str, float]:
    """ZeRO's per-rank bytes for P float32 parameters (stage None: the torch engine, nothing partitioned)."""
    p4 = 4.0 * param_count
    stage = 0 if stage is None else stage
    return {"params_bytes": p4 / world if stage >= 3 else p4, "master_bytes": 0.0 if stage == 0 else p4 / world,
            "grads_bytes": p4 if stage <= 1 else p4 / world,
            "optim_bytes": 2 * p4 if stage == 0 else 2 * p4 / world,
            "ema_bytes": p4 if stage == 0 else p4 / world}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and step one case on this rank; returns its measurements."""
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)       # as dvp.train.loop.train does
    from dvp.core.config import compose
    from dvp.parallel.context import init
    from dvp.parallel.launch import detect
    from dvp.train.engines import make_engine
    from dvp.train.loop import lr_at, prepare
    ctx = init(detect(os.environ))
    try:
        rss_base = rss_now_mib()
        cfg = compose(spec["overrides"])
        data, model = prepare(cfg, ctx.world_size)
        engine = make_engine(model, cfg, data.shape, ctx)
        engine.set_lr(lr_at(0, cfg.train))
        rss_init = rss_now_mib()
        b, n = cfg.train.batch_size, spec["warmup"] + spec["steps"] + 1
        g = torch.Generator().manual_seed(spec["seed"])
        idx = torch.randperm(len(data.train), generator=g)
        idx = idx.repeat(-(-n * b // len(idx)))[:n * b]
        batches = [data.train[idx[i * b:(i + 1) * b]] for i in range(n)]
        times, losses, skipped = [], [], 0.0
        for i, x in enumerate(batches[:-1]):
            t0 = time.perf_counter()
            stats = engine.step(x, i)
            times.append(time.perf_counter() - t0)
            losses.append(stats["loss"])
            skipped = stats["skipped_total"]
        peak: dict[str, Any] = {}
        at_step: dict[str, Any] = {}

        def measure(into: dict[str, Any]) -> None:
            current = grads_held(engine)
            alloc = max(current["grads_alloc_bytes"], into.get("grads_alloc_bytes", -1))
            if current["grads_bytes"] >= into.get("grads_bytes", -1):
                into.update(current)
            into["grads_alloc_bytes"] = alloc     # the largest seen, at whatever point
        module = getattr(engine, "module", None) or engine.model
        handles = [p.register_post_accumulate_grad_hook(lambda _p: measure(peak))
                   for p in module.parameters() if p.requires_grad]

        def before_optimizer_step(*_: Any) -> None:     # a step pre-hook returns None: arguments unchanged
            measure(peak)
            measure(at_step)
        handles.append(engine.optimizer.register_step_pre_hook(before_optimizer_step))
        engine.step(batches[-1], n - 1)      # the extra, untimed step: gradients measured inside it
        for h in handles:
            h.remove()
        timed = times[spec["warmup"]:]
        median = statistics.median(timed)
        stage = getattr(engine, "stage", None)      # the ZeRO stage of a DeepSpeedEngine; None: TorchEngine
        mem = {**held_memory(engine), **peak,
               **{k.replace("grads_", "grads_at_step_", 1): v for k, v in at_step.items()}}
        return {"rank": ctx.rank, "world_size": ctx.world_size, "threads": torch.get_num_threads(),
                "engine": type(engine).__name__, "zero_stage": stage, "precision": cfg.train.precision,
                "batch_size": b, "micro_batch": engine.micro, "accumulation": engine.accumulation,
                "step_s": times, "s_per_step": median, "s_per_step_min": min(timed), "images_per_s": b / median,
                "loss": losses, "skipped_total": skipped,
                "rss_base_mib": rss_base, "rss_after_init_mib": rss_init, "peak_rss_mib": peak_rss_mib(),
                "memory": mem, "theory": theory(mem["param_count"], stage, ctx.world_size)}
    finally:
        ctx.close()


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = Path(f"{spec['prefix']}.rank{rank}.json")
    try:
        result = worker(spec)
        code = 0
    except BaseException as e:    # recorded for the parent; the other rank is ended by torchrun
        result = {"rank": rank, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000],
                  "traceback": traceback.format_exc()[-6000:]}
        code = 1
    out.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)      # no interpreter teardown: a failed rank must not wait on a collective


# ---- parent: cases, subprocesses, tables --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_case(case: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one training case in its own process(es); merge the ranks' JSON; errors are recorded, not raised."""
    prefix = tmp / case["name"]
    spec = {**case, "prefix": str(prefix), "warmup": args.warmup, "steps": args.steps, "seed": args.seed}
    spec_path = prefix.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    launcher = torchrun(case["nproc"]) if case["nproc"] > 1 else [sys.executable]
    cmd = launcher + [str(HERE), "--worker", str(spec_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(case["threads"]), cwd=ROOT,
                              timeout=args.case_timeout)
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode = None
        stderr = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")
        stderr += f"\n(timed out after {args.case_timeout} s)"
    ranks = []
    for r in range(case["nproc"]):
        path = Path(f"{prefix}.rank{r}.json")
        if path.exists():
            ranks.append(json.loads(path.read_text()))
            path.unlink()
    out: dict[str, Any] = {"name": case["name"], "group": case["group"], "nproc": case["nproc"],
                           "threads": case["threads"], "overrides": case["overrides"],
                           "process_s": time.perf_counter() - t0, "returncode": returncode,
                           **{k: case[k] for k in ("arm", "repeat") if k in case}}
    errors = [r for r in ranks if "error" in r]
    if errors or returncode != 0 or len(ranks) != case["nproc"]:
        first = errors[0] if errors else {}
        out["error"] = first.get("error") or f"exit {returncode}, {len(ranks)} of {case['nproc']} ranks reported"
        out["traceback"] = first.get("traceback") or stderr[-6000:]
        out["error_rank"] = first.get("rank")
        out["stderr_tail"] = stderr[-3000:]
        print(f"  {case['name']}: FAILED ({out['error'][:200]})", flush=True)
        return out
    ranks.sort(key=lambda r: r["rank"])
    main = ranks[0]
    out.update({k: main[k] for k in ("engine", "zero_stage", "precision", "batch_size", "micro_batch",
                                     "accumulation", "s_per_step", "s_per_step_min", "images_per_s",
                                     "skipped_total", "theory")})
    out["loss_last"] = main["loss"][-1]
    out["ranks"] = ranks
    print(f"  {case['name']}: {out['s_per_step']:.3f} s/step, {out['images_per_s']:.0f} img/s, peak RSS "
          + " / ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks) + f" MiB ({out['process_s']:.0f} s)", flush=True)
    return out


def base_overrides(args: argparse.Namespace) -> list[str]:
    o = [f"model.num_ch={args.num_ch}", f"train.batch_size={args.batch}", f"train.seed={args.seed}",
         "wandb.mode=disabled"]
    if args.data_root:
        o += ["data.name=mnist", f"data.root={args.data_root}"]
    return o + list(args.set)


def training_cases(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(the ZeRO x precision cases, the interleaved rounds of the scaling and overhead arms)."""
    base = base_overrides(args)
    ds = ["dist.engine=deepspeed"]
    zero = [{"name": f"zero{s}_{p}", "group": "zero", "nproc": 2, "threads": 1,
             "overrides": base + ds + [f"dist.zero_stage={s}", f"train.precision={p}"]}
            for s in args.stages for p in args.precisions]
    arms = []
    if "scaling" in args.parts:
        arms += [{"name": "scaling_2proc_x1thread", "group": "scaling", "nproc": 2, "threads": 1,
                  "overrides": base + ds + ["dist.zero_stage=0", "train.precision=fp32"]},
                 {"name": "scaling_1proc_x2threads", "group": "scaling", "nproc": 1, "threads": 2,
                  "overrides": base + ["dist.engine=torch", "train.precision=fp32"]}]
    if "overhead" in args.parts:
        t = args.overhead_threads
        arms += [{"name": f"overhead_deepspeed_1proc_x{t}", "group": "overhead", "nproc": 1, "threads": t,
                  "overrides": base + ds + ["dist.zero_stage=0", "train.precision=fp32"]},
                 {"name": f"overhead_torch_1proc_x{t}", "group": "overhead", "nproc": 1, "threads": t,
                  "overrides": base + ["dist.engine=torch", "train.precision=fp32"]}]
    rounds = [[{**a, "name": f"{a['name']}_r{r}", "arm": a["name"], "repeat": r} for a in arms]
              for r in range(args.repeats)]
    return (zero if "zero" in args.parts else []), rounds


def best(runs: list[dict[str, Any]], arm: str) -> dict[str, Any] | None:
    ok = [r for r in runs if r.get("arm") == arm and "error" not in r]
    return min(ok, key=lambda r: r["s_per_step"]) if ok else None


def comparisons(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    t = args.overhead_threads
    out: dict[str, Any] = {}
    two, one = best(runs, "scaling_2proc_x1thread"), best(runs, "scaling_1proc_x2threads")
    if two and one:
        out["scaling"] = {"images_per_s_2proc_x1thread": two["images_per_s"],
                          "images_per_s_1proc_x2threads": one["images_per_s"],
                          "ratio": two["images_per_s"] / one["images_per_s"], "aim": ">= 0.9"}
    ds, plain = best(runs, f"overhead_deepspeed_1proc_x{t}"), best(runs, f"overhead_torch_1proc_x{t}")
    if ds and plain:
        out["overhead"] = {"threads": t, "s_per_step_deepspeed": ds["s_per_step"],
                           "s_per_step_torch": plain["s_per_step"],
                           "overhead_pct": 100 * (ds["s_per_step"] / plain["s_per_step"] - 1), "aim": "<= 5"}
    return out


def timed_command(cmd: list[str], threads: int, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), cwd=ROOT, timeout=timeout)
    return time.perf_counter() - t0, proc


def eval_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A tiny run, then 1-rank and 2-rank dvp.evaluate on it: wall time and IS-NLL of each."""
    run_dir = tmp / "eval_run"
    train = [sys.executable, "-m", "dvp.train", "model.num_ch=16", f"train.max_steps={args.eval_train_steps}",
             "train.final_eval=false", "wandb.mode=disabled", f"run_dir={run_dir}"]
    if args.data_root:
        train += ["data.name=mnist", f"data.root={args.data_root}"]
    out: dict[str, Any] = {"train_steps": args.eval_train_steps, "is_samples": args.eval_samples,
                           "max_images": args.eval_images}
    try:
        wall, proc = timed_command(train, 2, args.case_timeout)
        out["train_s"] = wall
        if proc.returncode != 0:
            raise RuntimeError(f"dvp.train exit {proc.returncode}: {proc.stderr[-3000:]}")
        evaluate = ["-m", "dvp.evaluate", f"run_dir={run_dir}", f"eval.is_samples={args.eval_samples}",
                    f"eval.max_images={args.eval_images}"]
        for name, launcher, threads in (("1rank", [sys.executable], 2), ("2rank", torchrun(2), 1)):
            result_file = tmp / f"eval_{name}.json"
            cmd = launcher + evaluate + [f"out={result_file}"]
            wall, proc = timed_command(cmd, threads, args.case_timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} dvp.evaluate exit {proc.returncode}: {proc.stderr[-3000:]}")
            res = json.loads(result_file.read_text())
            out[name] = {"command": " ".join(cmd[cmd.index("-m"):]), "threads_per_rank": threads,
                         "wall_s": wall, "nll": res["nll"], "elbo_nelbo": res["elbo_nelbo"]}
            print(f"  eval {name}: {wall:.1f} s, nll {res['nll']:.4f}", flush=True)
        out["speedup"] = out["1rank"]["wall_s"] / out["2rank"]["wall_s"]
        out["nll_abs_diff"] = abs(out["1rank"]["nll"] - out["2rank"]["nll"])
        out["nll_rel_diff"] = out["nll_abs_diff"] / abs(out["1rank"]["nll"])
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        print(f"  eval: FAILED ({out['error'][:300]})", flush=True)
    return out


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    try:
        import importlib.metadata as md
        ds_version = md.version("deepspeed")
    except Exception:
        ds_version = None
    return {"cpu_model": model, "cpus": os.cpu_count(), "loadavg_1min_start": os.getloadavg()[0],
            "cpu_bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags, "cpu_avx512f": "avx512f" in flags,
            "torch": torch.__version__, "deepspeed": ds_version, "python": platform.python_version(),
            "platform": platform.platform()}


# ---- tables ------------------------------------------------------------------------------------------------------
def render(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [head] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def kib(x: float) -> str:
    return f"{x / 1024:.0f}"


def zero_table(cases: list[dict[str, Any]]) -> str:
    head = ("case", "s/step", "img/s", "peak RSS MiB r0/r1", "+RSS MiB r0/r1", "params KiB", "master KiB",
            "grads peak KiB", "grads@step KiB", "grads alloc MiB", "optim KiB", "ema KiB", "loss last")
    rows = []
    for c in cases:
        if "error" in c:
            rows.append((c["name"], "FAILED", c["error"][:60], *[""] * (len(head) - 3)))
            continue
        r0, th = c["ranks"][0], c["theory"]
        mem = [r["memory"] for r in c["ranks"]]

        def cell(key: str, theory_key: str | None = None) -> str:   # measured on each rank (theory)
            return "/".join(kib(m.get(key, float("nan"))) for m in mem) + f" ({kib(th[theory_key or key])})"
        rows.append((c["name"], f"{c['s_per_step']:.3f}", f"{c['images_per_s']:.0f}",
                     "/".join(f"{r['peak_rss_mib']:.0f}" for r in c["ranks"]),
                     "/".join(f"{r['peak_rss_mib'] - r['rss_base_mib']:.0f}" for r in c["ranks"]),
                     cell("params_bytes"), cell("master_bytes"), cell("grads_bytes"),
                     cell("grads_at_step_bytes", "grads_bytes"),
                     "/".join(f"{m.get('grads_alloc_bytes', float('nan')) / MIB:.1f}" for m in mem),
                     cell("optim_bytes"),
                     cell("ema_bytes"), f"{r0['loss'][-1]:.4f}"))
    return render(head, rows)


def runs_table(runs: list[dict[str, Any]]) -> str:
    head = ("run", "engine", "procs x threads", "s/step", "img/s", "peak RSS MiB")
    rows = [(r["name"], "FAILED", r["error"][:60], "", "", "") if "error" in r else
            (r["name"], r["engine"], f"{r['nproc']} x {r['threads']}", f"{r['s_per_step']:.3f}",
             f"{r['images_per_s']:.0f}", "/".join(f"{x['peak_rss_mib']:.0f}" for x in r["ranks"]))
            for r in runs]
    return render(head, rows)


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    comp = result.get("comparisons", {})
    if "scaling" in comp:
        s = comp["scaling"]
        lines.append(f"scaling: 2 procs x 1 thread {s['images_per_s_2proc_x1thread']:.0f} img/s vs 1 proc x 2 "
                     f"threads {s['images_per_s_1proc_x2threads']:.0f} img/s: ratio {s['ratio']:.2f}x "
                     "(aim >= 0.9x)")
    if "overhead" in comp:
        o = comp["overhead"]
        lines.append(f"overhead: DeepSpeed engine in 1 process {o['s_per_step_deepspeed']:.3f} s/step vs torch "
                     f"engine {o['s_per_step_torch']:.3f} s/step ({o['threads']} threads): "
                     f"{o['overhead_pct']:+.1f}% (aim <= 5%)")
    e = result.get("eval")
    if e and "error" not in e:
        lines.append(f"eval: 1 rank {e['1rank']['wall_s']:.1f} s (nll {e['1rank']['nll']:.4f}), 2 ranks "
                     f"{e['2rank']['wall_s']:.1f} s (nll {e['2rank']['nll']:.4f}): speedup {e['speedup']:.2f}x, "
                     f"|dnll| {e['nll_abs_diff']:.2e} nats")
    elif e:
        lines.append(f"eval: FAILED {e['error'][:300]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["zero", "scaling", "overhead", "eval"],
                   choices=["zero", "scaling", "overhead", "eval"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--steps", type=int, default=8, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per case")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each scaling / overhead arm")
    p.add_argument("--overhead-threads", type=int, default=2, help="threads of both overhead arms")
    p.add_argument("--num-ch", type=int, default=32, help="model.num_ch")
    p.add_argument("--batch", type=int, default=64, help="train.batch_size (the global batch)")
    p.add_argument("--data-root", default=None, help="directory with mnist.npz (default: sklearn 8x8 digits)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--eval-samples", type=int, default=50, help="eval.is_samples of the eval part")
    p.add_argument("--eval-images", type=int, default=200, help="eval.max_images of the eval part")
    p.add_argument("--eval-train-steps", type=int, default=20, help="train.max_steps of the eval part's run")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is abandoned")
    p.add_argument("--out", default=str(HERE.parent / "results" / "distributed.json"))
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    info = machine()
    print(f"{info['cpu_model']} ({info['cpus']} CPUs, native bf16: {info['cpu_bf16_native']}), torch "
          f"{info['torch']}, deepspeed {info['deepspeed']}; num_ch {args.num_ch}, batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, data: {args.data_root or 'digits'}", flush=True)
    if info["loadavg_1min_start"] > 0.5:
        print(f"warning: load average {info['loadavg_1min_start']:.2f} before starting: other processes share the "
              "cores, and threads of one process then wait on each other (1 x 2 threads suffers most)", flush=True)
    zero, rounds = training_cases(args)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dvp-bench-dist-") as tmp_name:
        tmp = Path(tmp_name)
        zero_results = [run_case(c, args, tmp) for c in zero]
        runs = [run_case(c, args, tmp) for round_ in rounds for c in round_]
        eval_result = eval_part(args, tmp) if "eval" in args.parts else None
    result = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "base_overrides": base_overrides(args), "zero": zero_results, "runs": runs,
              "comparisons": comparisons(runs, args), "eval": eval_result,
              "total_s": time.perf_counter() - t_start, "loadavg_1min_end": os.getloadavg()[0]}
    failures = [c["name"] for c in zero_results + runs if "error" in c]
    if eval_result and "error" in eval_result:
        failures.append("eval")
    result["failures"] = failures
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if zero_results:
        print("\nZeRO stage x precision, 2 processes x 1 thread. Memory per rank: rank0/rank1 measured "
              "(theory); grads measured during the extra step")
        print(zero_table(zero_results))
    if runs:
        print()
        print(runs_table(runs))
    lines = summary_lines(result)
    if lines:
        print()
        print("\n".join(lines))
    if failures:
        print(f"\nfailed: {', '.join(failures)} (errors and tracebacks in the JSON)")
    print(f"wrote {path} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
