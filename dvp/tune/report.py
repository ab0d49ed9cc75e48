"""`dvp-report SWEEP_DIR [eval=true] [eval.is_samples=K] [eval.max_images=N] [workers=N] [out=DIR]
[wandb=true|false]`: the table and plots of a sweep, from its folder alone (no Ray cluster; no network unless
wandb=true), and the same as a W&B Report of the sweep's wandb group.

    dvp-report runs/sweeps/digits_depth_pseudo                      # table + plots in <sweep folder>/report/
    dvp-report runs/sweeps/digits_depth_pseudo eval=true workers=2  # test IS-NLL of the finished trials first
    dvp-report /nfs/sweeps/mnist_depth_pseudo eval=true eval.is_samples=1000 eval.max_images=1000 out=rep
    dvp-report runs/sweeps/mnist_depth_pseudo wandb=true            # + the W&B Report, its URL printed

SWEEP_DIR is the folder dvp-sweep printed (`<storage>/<name>`): it reads `sweep.yaml`, Tune's experiment state
and each trial's dvp run dir `runs/<trial id>/` (config.yaml, metrics.jsonl, stop.json,
checkpoints/best.eval.json); a trial without a run dir yet (pending) gets blanks.

`eval=true` first runs the paper's test evaluation (`python -m dvp.evaluate run_dir=<run dir>`: ELBO and the
importance-sampled NLL with K = eval.is_samples samples, default 1000, on the first eval.max_images test images,
default all) on every trial that finished by itself (stop.json) and has checkpoints/best.pt but no
best.eval.json; with workers=N > 1 each evaluation is sharded over N processes (torch.distributed.run,
OMP_NUM_THREADS=1). One line per trial on stdout, the evaluation's own output in `<out>/eval_<trial id>.log`.
Exit 1 when an evaluation failed (the report is written all the same).

Writes into out (default SWEEP_DIR/report/):
    trials.csv                   one row per trial (`collect`; ROW_KEYS says what each column is)
    trials.md                    the sweep, metric, trial counts, best trial and the table as Markdown
    nll_heatmap_<family>.png     per model family: best metric over depth x pseudo-inputs
    learning_curves.png          the metric at every validation of every trial
    active_units.png             active-unit fraction per latent layer at each trial's best validation
    nll_vs_params.png            best metric against parameter count
then prints the Markdown table and the paths written.

`wandb=true` (the default when sweep.yaml's wandb.mode is online; wandb=false never touches the network) then
publishes the report to wandb (dvp/tune/wandb_report.py): each trial's run (group = the sweep's name, in
sweep.yaml's wandb.entity / wandb.project) gets the report's numbers in its summary as report/<key> (best, params,
depth, pseudo_inputs, ...), and a new W&B Report "Sweep <name>" shows trials.md, the runs table and the plots'
counterparts (learning curves, best vs parameters, parallel coordinates over the axes, active units); its URL is
printed. It needs an API key (`wandb login` or WANDB_API_KEY; WANDB_BASE_URL for a private server) and runs that
reached the server (an offline sweep: `wandb sync SWEEP_DIR/trial_*/wandb/offline-run-*` first). A missing key
or wandb switched off here is one error line before anything else runs; a server failure is one error line
(exit 2) after the offline files are written, which it leaves as they are.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvp.cli import run_cli
from dvp.config import split_overrides
from dvp.errors import ConfigError
from dvp.launch import free_port
from dvp.logger import replace_atomically
from dvp.paths import check_output_dir
from dvp.tune.plots import plot_active_units, plot_heatmap, plot_learning_curves, plot_vs_params
from dvp.tune.spec import SweepSpec
from dvp.tune.trials import ROW_KEYS, eval_results, axes, best_row, cell_text, open_sweep, rows_of, validations

OPTIONS = ("eval", "eval.is_samples", "eval.max_images", "workers", "out", "wandb")
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
    if any(validations(Path(r["run_dir"])) for r in rows):
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


# ---- the command ---------------------------------------------------------------------------------------------------
@dataclass
class Options:
    """The command's arguments, checked."""
    sweep_dir: Path
    out: Path
    eval: bool = False
    is_samples: int = 1000
    max_images: int | None = None
    workers: int = 1
    wandb: bool | None = None       # None: publish when the sweep's wandb.mode is online


def _positive_int(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{key}={text} is not an integer") from None
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")
    return value


def parse_args(argv: list[str]) -> Options:
    """SWEEP_DIR (the one argument without '=') and the `key=value` options (OPTIONS), checked."""
    folders = [a for a in argv if "=" not in a]
    if len(folders) != 1:
        raise ConfigError(f"give the sweep folder once: dvp-report SWEEP_DIR [key=value ...] (got {len(folders)} "
                          f"arguments without '='); keys: {', '.join(OPTIONS)}")
    given = dict(split_overrides([a for a in argv if "=" in a]))
    unknown = [k for k in given if k not in OPTIONS]
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'; allowed: {', '.join(OPTIONS)}")
    for key in ("eval", "wandb"):
        if given.get(key, "false") not in ("true", "false"):
            raise ConfigError(f"{key}={given[key]}; give {key}=true or {key}=false")
    numbers = {k: _positive_int(k, given[k]) for k in ("eval.is_samples", "eval.max_images", "workers") if k in given}
    if numbers and given.get("eval") != "true":
        raise ConfigError(f"{next(iter(numbers))}= applies to the test evaluation only; add eval=true")
    sweep_dir = Path(folders[0])
    return Options(sweep_dir, Path(given["out"]) if given.get("out") else sweep_dir / "report",
                   given.get("eval") == "true", numbers.get("eval.is_samples", 1000), numbers.get("eval.max_images"),
                   numbers.get("workers", 1), given["wandb"] == "true" if "wandb" in given else None)


def report_cli(argv: list[str]) -> int:
    o = parse_args(argv)
    spec = open_sweep(o.sweep_dir)
    check_output_dir(o.out, "out")
    to_wandb = o.wandb if o.wandb is not None else spec.wandb["mode"] == "online"
    if to_wandb:
        from dvp.tune import wandb_report        # wandb and wandb-workspaces load only for a report that needs them
        wandb_report.check_ready(spec)
    failed = 0
    if o.eval:
        o.out.mkdir(parents=True, exist_ok=True)
        failed = evaluate_trials(o.sweep_dir, o.out, o.is_samples, o.max_images, o.workers)
    rows = rows_of(spec, o.sweep_dir)
    written = write_files(spec, o.sweep_dir, rows, o.out)
    print(markdown_table(spec, rows))
    print("\n".join(["", "written:", *(f"  {p}" for p in written.values())]), flush=True)
    if to_wandb:
        url, runs = wandb_report.publish(spec, rows, markdown_body(spec, o.sweep_dir, rows), o.out)
        print(f"wandb report ({runs} of {len(rows)} trials' runs): {url}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(report_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
