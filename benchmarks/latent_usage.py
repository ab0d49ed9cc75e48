"""Does DVP-VAE use its latents? Per-layer KL, active units, KL(u) and the validation -ELBO against steps on real
MNIST, for DVP-VAE and the Ladder VAE (the curves), and ablations of DVP-VAE at equal steps (the table).

    python benchmarks/latent_usage.py train dvp_vae ladder --data-root ../shared/data --minutes 50
    python benchmarks/latent_usage.py train ctx2 ctx4 frozen_u no_aggregation downsample --data-root ../shared/data \
        --steps 440
    python benchmarks/latent_usage.py report            # PNG + JSON in --out, the table on stdout

`train` runs `dvp-train` for each named run (RUNS below: the paper recipe, `experiment=mnist/<model>`, on the fast
path, one thread each, --parallel at a time) in `--runs/<name>`; the same command again continues each run from
its checkpoint (--minutes is a budget per call, --steps a total). `report` reads every run's validation records
(metrics.jsonl: the EMA weights on MNIST's 5,000 validation images after every epoch of 220 steps): the curves of
`--curves` runs (val -ELBO, KL(u), KL per latent layer, active units at 0.01 and 0.001 per layer), the step at
which DVP-VAE's -ELBO first drops below the Ladder's (the crossing, if any), and, at the largest step every run
reached, a table of -ELBO, KL(u), KL per layer and active units per run. Writes `latent_usage.json` and
`latent_curves.png` in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.precision=bf16", "train.channels_last=true", "train.compile=true", "train.num_threads=1",
        "train.final_eval=false", "wandb.mode=disabled"]
DVP = ["experiment=mnist/dvp_vae"]
RUNS: dict[str, list[str]] = {
    "dvp_vae": DVP,                                               # the recipe: ctx_size 7, DCT, aggregation on
    "ladder": ["experiment=mnist/ladder"],
    "no_aggregation": [*DVP, "model.latent_aggregation=false"],   # the likelihood reads the top-down state
    "ctx2": [*DVP, "model.ctx_size=2"],
    "ctx4": [*DVP, "model.ctx_size=4"],
    "downsample": [*DVP, "model.ctx_type=downsample"],            # u = bilinear 7x7 image instead of the DCT
    "frozen_u": [*DVP, "model.freeze_u=true"],                    # control: u(x) fixed, its prior still trained
}
LABELS = {"dvp_vae": "DVP-VAE", "ladder": "Ladder VAE"}


def records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation records, one per epoch end, in order."""
    from dvp.tune.trials import validations
    if not (run_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (train it first: latent_usage.py train {run_dir.name} ...)")
    return validations(run_dir)


def layers(r: dict[str, Any]) -> int:
    return sum(1 for k in r if k.startswith("kl/"))


def summary(r: dict[str, Any]) -> dict[str, Any]:
    n = layers(r)
    return {"step": r["step"], "nelbo": r["nelbo"], "kl_u": r["kl_u"], "kl_z": r["kl_z"],
            "kl": [r[f"kl/{i}"] for i in range(n)], "au": r["au"], "au_1e-3": r["au_1e-3"],
            "au_layers": [r[f"au/{i}"] for i in range(n)], "au_1e-3_layers": [r[f"au_1e-3/{i}"] for i in range(n)]}


def crossing(dvp: list[dict[str, Any]], ladder: list[dict[str, Any]]) -> int | None:
    """The first validation step at which DVP-VAE's -ELBO is below the Ladder's at the same step."""
    theirs = {r["step"]: r["nelbo"] for r in ladder}
    return next((r["step"] for r in dvp if r["step"] in theirs and r["nelbo"] < theirs[r["step"]]), None)


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(curves)
    fig, axes = plt.subplots(len(names) + 1, 3, figsize=(15, 3.6 * (len(names) + 1)), squeeze=False)
    ax_nelbo, ax_klu, ax_au = axes[0]
    for name, recs in curves.items():
        steps = [r["step"] for r in recs]
        line, = ax_nelbo.plot(steps, [r["nelbo"] for r in recs], marker=".", label=LABELS.get(name, name))
        colour = line.get_color()                                   # one colour per run in the top row
        ax_klu.plot(steps, [r["kl_u"] for r in recs], marker=".", color=colour, label=LABELS.get(name, name))
        ax_au.plot(steps, [r["au"] for r in recs], marker=".", color=colour, label=f"{LABELS.get(name, name)} (0.01)")
        ax_au.plot(steps, [r["au_1e-3"] for r in recs], ls="--", color=colour,
                   label=f"{LABELS.get(name, name)} (0.001)")
    for ax, title in ((ax_nelbo, "validation -ELBO (nats)"), (ax_klu, "KL(u) (nats)"),
                      (ax_au, "active units, all layers")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for row, (name, recs) in zip(axes[1:], curves.items()):
        steps = [r["step"] for r in recs]
        n = layers(recs[0])
        colours = plt.cm.viridis([i / max(1, n - 1) for i in range(n)])
        for i in range(n):
            row[0].plot(steps, [max(r[f"kl/{i}"], 1e-4) for r in recs], color=colours[i], marker=".",
                        label=f"z_{i}")
            row[1].plot(steps, [r[f"au/{i}"] for r in recs], color=colours[i], marker=".", label=f"z_{i}")
            row[2].plot(steps, [r[f"au_1e-3/{i}"] for r in recs], color=colours[i], marker=".", label=f"z_{i}")
        row[0].set_yscale("log")
        label = LABELS.get(name, name)
        for ax, title in zip(row, (f"{label}: KL per layer (nats, log)", f"{label}: active units (0.01)",
                                   f"{label}: active units (0.001)")):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend(fontsize=7, ncol=2)
        row[1].set_ylim(-0.05, 1.05)
        row[2].set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(args: argparse.Namespace) -> None:
    unknown = [n for n in args.names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {unknown}: choose from {', '.join(RUNS)}")
    if not (Path(args.data_root) / "mnist.npz").is_file():
        raise SystemExit(f"--data-root {args.data_root}: no mnist.npz there")
    stop = [f"train.max_minutes={args.minutes}"] if args.minutes else [f"train.max_steps={args.steps}"]
    given = {kv.split("=", 1)[0] for kv in args.set}
    fast = [kv for kv in FAST if kv.split("=", 1)[0] not in given]       # --set replaces the fast path's keys
    queue, running = list(args.names), []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            log = (args.runs / f"{name}.log").open("a")
            cmd = [sys.executable, "-m", "dvp.train", *RUNS[name], f"data.root={args.data_root}",
                   f"run_dir={args.runs / name}", *fast, *stop, *args.set]
            print(f"start {name}: {' '.join(cmd[2:])}", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"{name}: exit {proc.returncode} (log {args.runs / name}.log)", flush=True)
                if proc.returncode != 0:
                    for _, other in running:
                        other.terminate()           # it saves its checkpoint on SIGTERM; the same command goes on
                    raise SystemExit(f"{name} failed: see {args.runs / name}.log")


def report(args: argparse.Namespace) -> None:
    found = {n: records(args.runs / n) for n in RUNS if (args.runs / n / "metrics.jsonl").is_file()}
    found = {n: r for n, r in found.items() if r}
    missing = [n for n in args.curves if n not in found]
    if missing:
        raise SystemExit(f"--curves {missing}: no validation records in {args.runs}")
    common = min(recs[-1]["step"] for recs in found.values())
    at = {n: summary(next(r for r in reversed(recs) if r["step"] <= common)) for n, recs in found.items()}
    curves = {n: found[n] for n in args.curves}
    cross = crossing(found["dvp_vae"], found["ladder"]) if {"dvp_vae", "ladder"} <= set(found) else None
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out / "latent_curves.png")
    result = {"curves": {n: [summary(r) for r in recs] for n, recs in curves.items()}, "crossing_step": cross,
              "common_step": common, "at_common_step": at,
              "overrides": {n: RUNS[n] for n in found}, "fast_path": FAST}
    (args.out / "latent_usage.json").write_text(json.dumps(result, indent=1) + "\n")
    n = max(len(s["kl"]) for s in at.values())
    print(f"validation at step {common} (EMA weights); KL per layer in nats, z_0 (top, coarsest) .. z_{n - 1} "
          "(finest):")
    print(f"{'run':<15} {'step':>5} {'-ELBO':>7} {'KL(u)':>6} {'AU':>5} {'AU.001':>6}  KL per layer")
    for name, s in at.items():
        kl = " ".join(f"{k:.3f}" for k in s["kl"])
        print(f"{name:<15} {s['step']:>5} {s['nelbo']:>7.2f} {s['kl_u']:>6.2f} {s['au']:>5.3f} "
              f"{s['au_1e-3']:>6.3f}  {kl}")
    ends = ", ".join(f"{n} {recs[-1]['step']} steps" for n, recs in curves.items())
    print(f"curves to {ends}; DVP-VAE's -ELBO below the Ladder's: "
          f"{f'from step {cross}' if cross is not None else 'at no validation step'}")
    print(f"wrote {args.out / 'latent_usage.json'} and {args.out / 'latent_curves.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/latent_usage", help="the run dirs' parent")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or continue) the named runs")
    t.add_argument("names", nargs="+", help=f"runs to train: {', '.join(RUNS)}")
    t.add_argument("--data-root", required=True, help="the folder holding mnist.npz")
    budget = t.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock training minutes per run in this call")
    budget.add_argument("--steps", type=int, help="train each run to this many optimizer steps in all")
    t.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    t.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run (they replace the "
                   "fast path's own: train.precision=fp32 on a CPU without bf16)")
    r = sub.add_parser("report", help="curves, crossing and the equal-step table")
    r.add_argument("--curves", nargs="+", default=["dvp_vae", "ladder"], help="runs whose curves are plotted")
    r.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/latent_usage")
    args = parser.parse_args()
    if args.command == "train":
        args.runs.mkdir(parents=True, exist_ok=True)
        train(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
