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

import sys
from dataclasses import dataclass
from pathlib import Path

from dvp.cli.common import run_cli
from dvp.core.config import split_overrides
from dvp.core.errors import ConfigError
from dvp.core.paths import check_output_dir
from dvp.tune.report import evaluate_trials, markdown_body, markdown_table, write_files
from dvp.tune.trials import open_sweep, rows_of

OPTIONS = ("eval", "eval.is_samples", "eval.max_images", "workers", "out", "wandb")


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
        from dvp.tune import wandb_report  # wandb and wandb-workspaces load only for a report that needs them
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
