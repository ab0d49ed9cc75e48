"""The report of a sweep, from its folder alone: trials.csv, trials.md, the plots, and the test evaluation of the
finished trials (`python -m dvp.evaluate` on each, sharded over workers). The command is dvp.cli.report
(dvp-report), whose docstring lists what is written."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dvp.core.paths import replace_atomically
from dvp.parallel.context import free_port
from dvp.tune.plots import plot_active_units, plot_heatmap, plot_learning_curves, plot_vs_params
from dvp.tune.spec import SweepSpec
from dvp.tune.trials import ROW_KEYS, axes, best_row, cell_text, eval_results, open_sweep, rows_of

MD_COLUMNS = (("params", "params"), ("best", "best {metric}"), ("best_epoch", "epoch"), ("val_bpd", "val bpd"),
              ("test_nll", "test NLL"), ("au", "AU"), ("steps", "steps"), ("wall_s", "wall s"),
              ("status", "status"), ("stopped_early", "stopped early"), ("epochs", "epochs"))
"""The Markdown table's columns after trial, family and the axes: (row key, header)."""



def _columns(spec: SweepSpec) -> list[str]:
    keys = list(ROW_KEYS)
    at = keys.index("<dotted.key>")
    return keys[:at] + axes(spec) + keys[at + 1:]


def write_csv(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path:
    """trials.csv: every row key, floats in full."""
    columns = _columns(spec)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(columns)
            for row in rows:
                out.writerow(["" if row[k] is None else json.dumps(row[k]) if isinstance(row[k], list) else row[k]
                              for k in columns])
    replace_atomically(path, write)
    return path


def markdown_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    """The trials as a Markdown table (padded for reading as text)."""
    headers = ["trial", "family", *axes(spec), *(h.format(metric=spec.metric) for _, h in MD_COLUMNS)]
    keys = ["trial_id", "family", *axes(spec), *(k for k, _ in MD_COLUMNS)]
    cells = [[cell_text(row[k]) for k in keys] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def markdown(spec: SweepSpec, sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """trials.md: the sweep, the metric, counts by status, the best trial, the table and the reproduce commands."""
    return f"# Sweep {spec.name}\n\n" + markdown_body(spec, sweep_dir, rows)


def markdown_body(spec: SweepSpec, sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """trials.md without its title line (the wandb report's Markdown block)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    best = best_row(spec, rows)
    evaluated = sorted({(r["test_is_samples"], r["test_images"]) for r in rows if r["test_nll"] is not None})
    lines = [spec.raw.get("description") or "(no description)", "",
             f"- folder: `{sweep_dir}`",
             f"- metric: {spec.metric} ({spec.mode}), the best over each trial's validations (epoch: epochs "
             "finished then); val bpd and AU (active-unit fraction) at that validation",
             f"- trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'}); stopped early "
             f"by the scheduler: {sum(r['stopped_early'] for r in rows)}",
             "- test NLL: importance-sampled, nats, of checkpoints/best.pt: "
             + (", ".join(f"K={k}, {n} images" for k, n in evaluated) if evaluated
                else "(none yet: dvp-report SWEEP_DIR eval=true)")]
    if best is not None:
        lines += [f"- best: trial {best['trial_id']} ({best['family']}), {spec.metric} {cell_text(best['best'])} at "
                  f"epoch {best['best_epoch']}", "", f"  `{best['command']}`"]
    lines += ["", markdown_table(spec, rows), "", "## Reproduce", ""]
    lines += [f"- {r['trial_id']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: Path, out: Path) -> dict[str, Path]:
    """Collect the rows and write trials.csv, trials.md and the plots (those with something to show) into `out`;
    returns {name: path} of what was written (name: the file name without .png, trials_md for trials.md)."""
    spec = open_sweep(Path(sweep_dir))
    return write_files(spec, Path(sweep_dir), rows_of(spec, Path(sweep_dir)), Path(out))


def write_files(spec: SweepSpec, sweep_dir: Path, rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """`write_report` for rows already collected."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"trials": write_csv(spec, rows, out / "trials.csv")}
    text = markdown(spec, sweep_dir, rows)
    replace_atomically(out / "trials.md", lambda tmp: tmp.write_text(text))
    written["trials_md"] = out / "trials.md"
    for family in dict.fromkeys(r["family"] for r in rows):
        name = f"nll_heatmap_{family.replace('/', '_')}"
        written[name] = plot_heatmap(spec, [r for r in rows if r["family"] == family], family, out / f"{name}.png")
    if any(r["validations"] for r in rows):
        written["learning_curves"] = plot_learning_curves(spec, rows, out / "learning_curves.png")
    if any(r["au_layers"] for r in rows):
        written["active_units"] = plot_active_units(spec, rows, out / "active_units.png")
    if any(r["best"] is not None and r["params"] for r in rows):
        written["nll_vs_params"] = plot_vs_params(spec, rows, out / "nll_vs_params.png")
    return written


# ---- test evaluation -----------------------------------------------------------------------------------------------
def to_evaluate(sweep_dir: Path) -> list[Path]:
    """Run dirs of the trials that finished by themselves (stop.json) with a best.pt but no best.eval.json."""
    return [d for d in sorted((sweep_dir / "runs").glob("*")) if (d / "stop.json").is_file()
            and (d / "checkpoints" / "best.pt").is_file() and not (d / "checkpoints" / "best.eval.json").is_file()]


def eval_command(run_dir: Path, is_samples: int, max_images: int | None, workers: int) -> list[str]:
    """`python -m dvp.evaluate run_dir=... eval.is_samples=K [eval.max_images=N]`, under torch.distributed.run
    with `workers` processes when more than one."""
    args = [f"run_dir={run_dir}", f"eval.is_samples={is_samples}"]
    args += [f"eval.max_images={max_images}"] if max_images else []
    if workers == 1:
        return [sys.executable, "-m", "dvp.evaluate", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers), "--master_port",
            str(free_port()), "-m", "dvp.evaluate", *args]


def _run_logged(command: list[str], log: Path, env: dict[str, str]) -> int:
    """Run `command` with its output in `log`; if this process is stopped meanwhile, the command gets SIGTERM
    (torch.distributed.run passes it on to its workers) and is waited for."""
    with log.open("w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()


def evaluate_trials(sweep_dir: Path, out: Path, is_samples: int, max_images: int | None, workers: int) -> int:
    """The test evaluation of every trial `to_evaluate` lists, one at a time, one line per trial on stdout;
    returns how many failed (their log's last line is shown)."""
    runs = to_evaluate(sweep_dir)
    print(f"eval: {len(runs)} finished trials without a test evaluation (K={is_samples}, "
          f"{max_images or 'all'} test images, {workers} process{'es' if workers > 1 else ''})", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if workers > 1 else {})}
    failed = 0
    for i, run_dir in enumerate(runs, start=1):
        log = out / f"eval_{run_dir.name}.log"
        print(f"eval {i}/{len(runs)} trial {run_dir.name}:", end="", flush=True)
        start = time.monotonic()
        code = _run_logged(eval_command(run_dir, is_samples, max_images, workers), log, env)
        seconds = time.monotonic() - start
        if code == 0:
            print(f" test NLL {eval_results(run_dir)['nll']:.4f} nats in {seconds:.0f} s", flush=True)
            continue
        failed += 1
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
        print(f" failed (exit {code}) after {seconds:.0f} s: {last[0].strip()[:200]}; log {log}", flush=True)
    return failed
