"""A Ray Tune sweep run to its end: the Ray cluster it runs on (joined or private: `ray_session`), the resume of an
interrupted sweep (`check_folder`), the trials (`fit`), their summary table, `best.json` and the report
(`summarize`). The command, dvp.cli.sweep (dvp-sweep), puts them together and owns its signals and exit codes."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import dvp
from dvp.core.errors import ConfigError
from dvp.parallel.context import free_port
from dvp.tune.driver import DRIVER_RESOURCE, can_restore, driver_resources, make_tuner, restore_tuner
from dvp.tune.report import write_report
from dvp.tune.spec import SweepSpec
from dvp.tune.storage import read_text, stage, upload, write_text
from dvp.tune.trials import best_record, validations

DONE = ("TERMINATED", "ERROR")
"""Tune's statuses of a trial that has ended (any other: unfinished, resumed by the same command)."""
RUNTIME_ENV = {"worker_process_setup_hook": "dvp.tune.node.setup_process"}
"""The sweep's Ray job: each worker process first picks the network interface of its node's Ray address."""


# ---- Ray ----------------------------------------------------------------------------------------------------------
def start_ray(spec: SweepSpec) -> str | None:
    """Join the cluster the spec or RAY_ADDRESS names, or start a private local Ray; returns the private Ray's
    temp folder (the caller stops it and removes the folder), else None."""
    import ray
    address = spec.ray["address"] or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        from ray.exceptions import AuthenticationError
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=RUNTIME_ENV)
        except (ConnectionError, AuthenticationError) as e:
            raise ConfigError(f"ray.address={address}: {str(e).splitlines()[0][:200]}; check the address, and "
                              "for a cluster with token auth (cluster/*.yaml, sweep.sbatch) give its token: "
                              "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<its token file>") from None
        wait_for_nodes(spec.ray["nodes"], spec.ray["wait_s"])
        return None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")        # a stale ~/.ray/auth_token must not turn it on
    temp = tempfile.mkdtemp(prefix="dvp-ray-")                # its own sessions: never another Ray's
    # the dashboard serves the state API, which Ray Train's placement-group cleaner needs (without it a finished
    # trial's worker placement group can stay reserved and starve the next trial); on loopback, a free port
    ray.init(address="local", num_cpus=spec.ray["num_cpus"] or os.cpu_count(), num_gpus=spec.ray["num_gpus"],
             resources={DRIVER_RESOURCE: 1000}, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), _temp_dir=temp, log_to_driver=True, runtime_env=RUNTIME_ENV)
    return temp


def live_nodes() -> list[dict[str, Any]]:
    """The live nodes of the joined Ray cluster (ray.nodes() also lists dead ones)."""
    import ray
    return [n for n in ray.nodes() if n.get("Alive")]


def ray_address() -> str:
    """The joined Ray cluster's GCS address and its live nodes, for the log."""
    import ray
    return f"{ray.get_runtime_context().gcs_address} ({len(live_nodes())} nodes)"


def wait_for_nodes(nodes: int, wait_s: float) -> None:
    """Wait until the joined cluster has `nodes` live nodes (workers still starting), or a ConfigError."""
    deadline = time.monotonic() + wait_s
    while (alive := len(live_nodes())) < nodes:
        if time.monotonic() > deadline:
            raise ConfigError(f"ray.nodes={nodes}: the cluster has {alive} live nodes after {wait_s:g} s; check "
                              "that every worker node ran `ray start --address=<head>`, or lower ray.nodes")
        time.sleep(1.0)


def check_resources(spec: SweepSpec) -> int:
    """Refuse a trial the cluster can never hold (when resources.check); returns how many trials run at once."""
    import ray
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in live_nodes()]
    r = spec.resources
    need_cpu = r.workers[0] * r.cpus_per_worker + driver_resources(total).get("CPU", 0.0)
    need_gpu = r.workers[0] * r.gpus_per_worker
    if r.check:
        have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
        if need_cpu > have_cpu + 1e-9 or need_gpu > have_gpu + 1e-9:
            raise ConfigError(
                f"sweep {spec.name}: a trial needs {r.workers[0]} workers x ({r.cpus_per_worker:g} CPU, "
                f"{r.gpus_per_worker:g} GPU) but the cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs; lower "
                "resources.workers / cpus_per_worker / gpus_per_worker, or resources.check=false for an autoscaler")
        if not any(n.get("CPU", 0) >= r.cpus_per_worker and n.get("GPU", 0) >= r.gpus_per_worker for n in nodes):
            raise ConfigError(f"sweep {spec.name}: no node has {r.cpus_per_worker:g} CPUs and "
                              f"{r.gpus_per_worker:g} GPUs for one worker; lower resources.cpus_per_worker / "
                              "gpus_per_worker")
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    fits = [math.floor((total.get("CPU", 0.0) + 1e-9) / need_cpu)]
    if need_gpu:
        fits.append(math.floor(total.get("GPU", 0.0) / need_gpu + 1e-9))
    return max(1, min(fits))


# ---- the sweep folder ---------------------------------------------------------------------------------------------
def _saved_form(spec: SweepSpec) -> dict[str, Any]:
    """The sweep as sweep.yaml records it (storage absolute, as load_sweep made it)."""
    return {**spec.raw, "storage": spec.storage}


def _what(saved: dict[str, Any]) -> dict[str, Any]:
    """The sweep without where it runs (`ray`: a requeued Slurm job's head may get another address)."""
    return {k: v for k, v in saved.items() if k != "ray"}


def check_folder(spec: SweepSpec) -> bool:
    """Whether the sweep folder already holds this sweep (a resume); a ConfigError when it holds another."""
    saved = read_text(f"{spec.sweep_dir}/sweep.yaml")
    if saved is not None and _what(yaml.safe_load(saved)) != _what(_saved_form(spec)):
        raise ConfigError(f"{spec.sweep_dir} holds another sweep (its sweep.yaml differs from this command's); "
                          "rerun that sweep's command to resume it, or give another name= or storage=")
    return saved is not None


def record_sweep(spec: SweepSpec) -> None:
    """Write sweep.yaml into the sweep folder (what a resume and dvp-report read)."""
    if not spec.remote:
        Path(spec.sweep_dir).mkdir(parents=True, exist_ok=True)
    write_text(f"{spec.sweep_dir}/sweep.yaml", yaml.safe_dump(_saved_form(spec), sort_keys=False))


def trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial of the sweep folder: id, status, config, overrides, its last result and error."""
    from ray.tune import ExperimentAnalysis
    analysis = ExperimentAnalysis(spec.sweep_dir)
    out = []
    for t in analysis.trials:
        out.append({"trial_id": t.trial_id, "status": t.status, "config": t.config,
                    "overrides": spec.trial_overrides(t.config), "last_result": dict(t.last_result or {}),
                    "error": _error_text(t)})
    return out


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path and Path(path).is_file() else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


def latest_checkpoint(spec: SweepSpec, trial_id: str) -> str | None:
    """The newest registered checkpoint folder of a trial (local storage), laid out like a run dir."""
    folders = sorted(p for p in Path(spec.sweep_dir, "trials", trial_id).glob("checkpoint_*") if p.is_dir())
    return str(folders[-1]) if folders else None


def best_values(spec: SweepSpec, view: Path,
                rows: list[dict[str, Any]]) -> dict[str, tuple[float | None, int]]:
    """Per trial: the best finite value of the metric over its validations in the sweep folder `view` (None:
    none yet) and how many."""
    key = spec.metric.split("/", 1)[1]
    out = {}
    for row in rows:
        records = validations(view / "runs" / row["trial_id"])
        best = best_record(records, key, spec.mode)
        out[row["trial_id"]] = (None if best is None else best[key], len(records))
    return out


def best_trial(spec: SweepSpec, rows: list[dict[str, Any]], values: dict[str, tuple[float | None, int]],
               checkpoints: dict[str, str]) -> dict[str, Any] | None:
    """The trial with the best value of the metric at any epoch it reported (scope 'all')."""
    scored = [(values[r["trial_id"]][0], r) for r in rows if values[r["trial_id"]][0] is not None]
    if not scored:
        return None
    value, best = (min if spec.mode == "min" else max)(scored, key=lambda pair: pair[0])
    return {"trial_id": best["trial_id"], "metric": spec.metric, "value": value, "overrides": best["overrides"],
            "command": spec.reproduce_command(best["config"]),
            "checkpoint": checkpoints.get(best["trial_id"]),
            "run_dir": f"{spec.sweep_dir}/runs/{best['trial_id']}" if not spec.remote else
            f"{spec.runs_dir() / best['trial_id']} on the node of its rank 0"}


def _table(spec: SweepSpec, rows: list[dict[str, Any]], values: dict[str, tuple[float | None, int]]) -> str:
    lines = [f"{'trial':10} {'status':10} {'epochs':>6} {spec.metric:>12}  overrides"]
    for row in rows:
        best, epochs = values[row["trial_id"]]
        axes = row["overrides"][1 + len(spec.overrides):]
        shown = math.nan if best is None else best
        lines.append(f"{row['trial_id']:10} {row['status']:10} {epochs:>6} {shown:>12.4f}  "
                     f"{row['overrides'][0]} {' '.join(axes)}" + (f"  error: {row['error']}" if row["error"] else ""))
    return "\n".join(lines)


def _view(spec: SweepSpec, local: Path) -> tuple[Path, dict[str, str]]:
    """The sweep folder as a local folder dvp-report reads (remote storage: staged into `local`), and each
    trial's newest registered checkpoint."""
    if spec.remote:
        return stage(spec.sweep_dir, local)
    folders = {p.name: latest_checkpoint(spec, p.name) for p in Path(spec.sweep_dir, "trials").glob("*")}
    return Path(spec.sweep_dir), {t: c for t, c in folders.items() if c}


def _report(spec: SweepSpec, view: Path, rows: list[dict[str, Any]]) -> str:
    """Write the sweep's report (report: true) into the sweep folder and say where; a failure here costs the
    sweep nothing (its folder is complete) and is one line."""
    again = f"dvp-report {spec.sweep_dir}" if not spec.remote else "dvp-report on a copy of the sweep folder"
    if not (spec.report and rows):
        return again
    try:
        written = write_report(view, view / "report")
        if spec.remote:
            upload(view / "report", f"{spec.sweep_dir}/report")
    except Exception as e:  # a plot or table failure must not turn a finished sweep into a failed one
        return f"not written ({type(e).__name__}: {' '.join(str(e).split())[:200]}); {again}"
    return f"{spec.sweep_dir}/report ({len(written)} files); again: {again}"


# ---- the sweep -------------------------------------------------------------------------------------------------
@contextmanager
def ray_session(spec: SweepSpec) -> Iterator[None]:
    """The Ray cluster of the sweep for the block: joined, or a private local one stopped and removed after it."""
    private = start_ray(spec)
    try:
        yield
    finally:
        if private:
            import ray
            ray.shutdown()
            shutil.rmtree(private, ignore_errors=True)


def fit(spec: SweepSpec, resumed: bool) -> list[dict[str, Any]]:
    """Start (or resume) the sweep on the joined Ray cluster and wait for it; returns its trials (`trials`)."""
    concurrent = check_resources(spec)
    if not resumed:
        record_sweep(spec)
    print(f"sweep {spec.name}: {len(spec.arms)} arms x {spec.num_samples} samples, {concurrent} at once, "
          f"folder {spec.sweep_dir}" + (" (resumed)" if resumed else ""), flush=True)
    print(f"dvp {dvp.__version__} from {Path(dvp.__file__).parent}, Ray cluster {ray_address()}", flush=True)
    tuner = restore_tuner(spec) if resumed and can_restore(spec) else make_tuner(spec, concurrent)
    tuner.fit()
    return trials(spec)


def summarize(spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    """Print the trials' table, write best.json and the report, and say where."""
    with tempfile.TemporaryDirectory(prefix="dvp-sweep-view-") as local:
        view, checkpoints = _view(spec, Path(local))
        values = best_values(spec, view, rows)
        print(_table(spec, rows, values), flush=True)
        best = best_trial(spec, rows, values, checkpoints)
        if best is not None:
            write_text(f"{spec.sweep_dir}/best.json", json.dumps(best, indent=1) + "\n")
            print(f"best: trial {best['trial_id']} {spec.metric} {best['value']:.4f}\n  checkpoint: "
                  f"{best['checkpoint']}\n  reproduce: {best['command']}", flush=True)
        print(f"report: {_report(spec, view, rows)}", flush=True)
