"""`dvp-sweep sweep=NAME [key=value ...]` (also `python sweeps/sweep.py ...`): run a Ray Tune sweep whose trials
each train with DeepSpeed on several Ray Train workers; weak trials stop early (ASHA by default).

    dvp-sweep sweep=digits_depth_pseudo                          # sweeps/digits_depth_pseudo.yaml, private local Ray
    dvp-sweep sweep=mnist_depth_pseudo data.root=../shared/data storage=/nfs/sweeps
    dvp-sweep sweep=my_sweep.yaml num_samples=4 resources.workers=[1,4] train.max_epochs=20
    ray submit CLUSTER.yaml sweeps/sweep.py -- sweep=mnist_depth_pseudo ray.address=auto
    dvp-report runs/sweeps/digits_depth_pseudo                   # the table and plots

Arguments: `sweep=` (a name under sweeps/ or a YAML file); `key=value` under data/model/train/dist/eval are
fixed trial overrides; any other key sets the sweep file's (dvp.tune.spec), e.g. storage=, num_samples=,
resources.workers=. Everything is checked before Ray starts.

Ray: `ray.address=` (or RAY_ADDRESS) joins an existing cluster (`ray.nodes=N` first waits up to ray.wait_s for N
live nodes, as cluster/slurm/sweep.sbatch asks); otherwise the sweep starts a private local Ray (its own temp
folder and ports, never another Ray on the host) and stops it at the end.

Resume: the same command on an interrupted sweep (Ctrl-C, SIGTERM, a crash) continues it: finished trials are
kept, unfinished ones continue from their last checkpoints. A failed trial does not stop the sweep.
At the end: `<sweep folder>/best.json` (the best trial: metric, overrides, checkpoint folder, reproduce command),
a table of the trials, the command that reproduces the best one, and (report: true, the default) dvp-report's
table and plots in `<sweep folder>/report/`.
"""
from __future__ import annotations

import sys
from typing import Any

from dvp.cli.common import run_cli
from dvp.core.errors import ConfigError
from dvp.core.signals import sigterm_as_sigint
from dvp.tune.spec import load_sweep
from dvp.tune.sweep import DONE, check_folder, fit, ray_session, summarize


def _split_sweep(argv: list[str]) -> tuple[str, list[str]]:
    names = [a for a in argv if a.startswith("sweep=")]
    if len(names) != 1 or not names[0][len("sweep="):]:
        raise ConfigError("give the sweep once: sweep=NAME (a file under sweeps/, e.g. digits_depth_pseudo) "
                          "or sweep=path/to/sweep.yaml")
    return names[0][len("sweep="):], [a for a in argv if not a.startswith("sweep=")]


def sweep_cli(argv: list[str]) -> int:
    """Load and check the sweep, run it to its end (SIGTERM stops it as Ctrl-C does: Tune saves and stops on
    SIGINT), summarize it; exit 130 when trials are unfinished (rerun to resume), 1 when every trial failed."""
    name, rest = _split_sweep(argv)
    spec = load_sweep(name, rest)
    resumed = check_folder(spec)
    with ray_session(spec), sigterm_as_sigint():       # after ray.init, whose own SIGTERM handler it replaces
        rows = fit(spec, resumed)
    summarize(spec, rows)
    return _exit_code(rows)


def _exit_code(rows: list[dict[str, Any]]) -> int:
    unfinished = [r["trial_id"] for r in rows if r["status"] not in DONE]
    if unfinished:
        print(f"interrupted: {len(unfinished)} trials unfinished; run the same command to resume", file=sys.stderr)
        return 130
    if rows and all(r["status"] == "ERROR" for r in rows):
        print("error: every trial failed; see the errors above", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sweep_cli, __doc__, sys.argv[1:] if argv is None else argv, stop_signals=False)


if __name__ == "__main__":
    sys.exit(main())
