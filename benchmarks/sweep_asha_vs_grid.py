"""ASHA against the full grid on the same sweep: wall time, trials stopped early, the compute ASHA saved (epochs
and optimizer steps trained, summed over trials) and whether ASHA found the grid's best configuration.

    python benchmarks/sweep_asha_vs_grid.py                                  # sweeps/digits_depth_pseudo.yaml
    python benchmarks/sweep_asha_vs_grid.py --sweep mnist_depth_pseudo --set data.root=../shared/data \\
        train.max_epochs=6 train.lr_epochs=6                                  # a small MNIST budget

Runs `dvp-sweep sweep=NAME scheduler.name=asha` and then the same with `scheduler.name=fifo` (every trial to
the end: the grid), each into its own storage folder, and reads both sweep folders back (run dirs' metrics and
stop.json); `--folders ASHA_DIR GRID_DIR` reads two finished sweeps instead (wall time is then the span of
their metric records, which leaves out Ray's start and each trial's first ~40 s before its first record).
Writes --out (JSON) and prints a table. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dvp.train.logger import read_metrics  # noqa: E402
from dvp.tune.spec import load_sweep  # noqa: E402


def run(sweep: str, scheduler: list[str], storage: Path, extra: list[str]) -> dict[str, Any]:
    """One sweep; its wall time and, per trial, the best metric, epochs and steps trained, stopped early."""
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dvp.cli.sweep", f"sweep={sweep}", f"storage={storage}",
                          *scheduler, *extra], capture_output=True, text=True)
    wall = time.monotonic() - start
    spec = load_sweep(sweep, [*scheduler, *extra, f"storage={storage}"])
    return {"returncode": res.returncode, "wall_s": wall, "log_tail": res.stdout[-2000:] + res.stderr[-2000:],
            **read(Path(spec.sweep_dir), spec.metric.split("/", 1)[1], spec.mode)}


def read(sweep_dir: Path, key: str, mode: str) -> dict[str, Any]:
    """Per trial of a sweep folder: the best metric, epochs and steps trained, stopped early; the best trial; and
    the span of its records (first to last metrics time over all trials, seconds)."""
    trials, times = {}, []
    for run_dir in sorted((sweep_dir / "runs").iterdir()):
        records = read_metrics(run_dir / "metrics.jsonl")
        times += [r["time"] for r in records]
        val = [r[key] for r in records if r["split"] == "val" and r.get(key) is not None]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config = json.dumps({k: v for k, v in config.items() if k not in ("run_dir", "wandb")}, sort_keys=True)
        trials[run_dir.name] = {"best": min(val) if mode == "min" else max(val), "epochs": len(val),
                                "steps": max((r["step"] for r in records), default=0),
                                "stopped_early": not (run_dir / "stop.json").exists(), "config": config}
    return {"trials": trials, "best": json.loads((sweep_dir / "best.json").read_text()),
            "records_span_s": max(times) - min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="digits_depth_pseudo")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more dvp-sweep arguments")
    p.add_argument("--out", default=str(HERE / "results" / "sweep_asha_vs_grid.json"))
    p.add_argument("--folders", nargs=2, metavar=("ASHA_DIR", "GRID_DIR"),
                   help="read two finished sweep folders instead of running them (wall time: their records' span)")
    args = p.parse_args()
    if args.folders:
        spec = load_sweep(args.sweep, args.set)
        key = spec.metric.split("/", 1)[1]
        asha, grid = (read(Path(d), key, spec.mode) for d in args.folders)
        for arm in (asha, grid):
            arm["wall_s"] = arm["records_span_s"]
    else:
        with tempfile.TemporaryDirectory(prefix="dvp-sweep-bench-") as tmp:
            asha = run(args.sweep, ["scheduler.name=asha"], Path(tmp) / "asha", args.set)
            grid = run(args.sweep, ["scheduler.name=fifo"], Path(tmp) / "grid", args.set)
    by_config = {t["config"]: t for t in grid["trials"].values()}
    best_grid = min(grid["trials"].values(), key=lambda t: t["best"])
    best_asha = asha["trials"][asha["best"]["trial_id"]]
    summary = {
        "trials": len(grid["trials"]),
        "stopped_early": sum(t["stopped_early"] for t in asha["trials"].values()),
        "epochs_asha": sum(t["epochs"] for t in asha["trials"].values()),
        "epochs_grid": sum(t["epochs"] for t in grid["trials"].values()),
        "steps_asha": sum(t["steps"] for t in asha["trials"].values()),
        "steps_grid": sum(t["steps"] for t in grid["trials"].values()),
        "wall_s_asha": asha["wall_s"], "wall_s_grid": grid["wall_s"],
        "asha_found_grid_best": by_config.get(best_asha["config"]) is best_grid,
        "best_asha": best_asha["best"], "best_grid": best_grid["best"],
    }
    summary["compute_saved"] = 1 - summary["steps_asha"] / max(summary["steps_grid"], 1)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "sweep": args.sweep, "set": args.set, "summary": summary, "asha": asha, "grid": grid}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    s = summary
    print(f"{'':22} {'ASHA':>10} {'grid':>10}")
    print(f"{'wall time (s)':22} {s['wall_s_asha']:>10.0f} {s['wall_s_grid']:>10.0f}")
    print(f"{'epochs trained':22} {s['epochs_asha']:>10} {s['epochs_grid']:>10}")
    print(f"{'optimizer steps':22} {s['steps_asha']:>10} {s['steps_grid']:>10}")
    print(f"{'best ' + load_sweep(args.sweep).metric:22} {s['best_asha']:>10.3f} {s['best_grid']:>10.3f}")
    print(f"{s['trials']} trials, {s['stopped_early']} stopped early by ASHA; compute saved "
          f"{100 * s['compute_saved']:.0f}% of the grid's steps; ASHA found the grid's best: "
          f"{s['asha_found_grid_best']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
