"""Ray Tune sweeps on a real local Ray cluster (started and stopped by dvp-sweep), each trial a 2-worker DeepSpeed
TorchTrainer on the bundled digits: ASHA, the report, offline wandb, the best trial's reproduce command, a killed
worker, an interrupted sweep (an elastic trial that loses a host and grows back: tests/test_multinode_ray.py).
Minutes each: marked `sweep` (CI runs them separately).

"The same validation ELBO" of a trial re-run in one process (the torch engine, one micro-batch of 64 instead of
2 x 32): rel 3e-3, the world-size tolerance at the length of these trials (measured here: 1e-3 after 20 Adamax
steps, 5e-4 after 60, while the weights themselves drift apart by a relative L2 of 5e-2: Adamax turns summation-
order differences into lr-sized steps on near-zero-gradient coordinates, see tests/test_distributed.py)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.clusters import wait_for
from helpers.wandb_records import history, records
from PIL import Image

from dvp.train.checkpoint import load_checkpoint
from dvp.train.logger import read_metrics

pytestmark = pytest.mark.sweep
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.num_ch=16", "train.batch_size=64", "train.max_epochs=3", "train.lr_epochs=3",
          "train.warmup_epochs=1", "train.final_eval=false", "train.log_every=5"]


def sweep_yaml(tmp_path: Path, name: str, **changes: Any) -> Path:
    raw = {"name": name, "experiments": {"digits/dvp_vae": {"model.ctx_size": [2, 4]}},
           "space": {"model.latent_scales": {"grid": [[1], [2, 2]]}}, "overrides": COMMON,
           "metric": "val/nelbo", "mode": "min",
           "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
           "resources": {"workers": 2, "cpus_per_worker": 1}, "max_failures": 2,
           "wandb": {"project": "dvp-test", "mode": "offline"}, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Sweep:
    """`python -m dvp.cli.sweep sweep=FILE storage=DIR` in a subprocess with a private, short TMPDIR (Ray's
    sockets live under it; a path over 107 characters breaks them), which also marks this sweep's processes."""

    def __init__(self, path: Path, storage: Path) -> None:
        self.cmd = [sys.executable, "-m", "dvp.cli.sweep", f"sweep={path}", f"storage={storage}"]
        self.tmp = tempfile.mkdtemp(prefix="dvpt-", dir="/tmp")
        self.env = {**{k: v for k, v in os.environ.items() if k != "WANDB_DIR"},   # runs go to trial folders
                    "TMPDIR": self.tmp, "PYTHONUNBUFFERED": "1", "WANDB_CONFIG_DIR": self.tmp,
                    "WANDB_CACHE_DIR": self.tmp, "WANDB_DATA_DIR": self.tmp}
        self.log = Path(self.tmp) / "sweep.log"

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log.open("a"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, timeout: float = 1500) -> int:
        proc = self.start()
        try:
            return proc.wait(timeout=timeout)
        finally:
            stop(proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self, title: str) -> list[int]:
        """PIDs of this sweep's processes whose command line starts with `title` (e.g. ray::RayTrainWorker)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                environ = (entry / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(title) and (f"TMPDIR={self.tmp}" in environ or self.tmp in cmdline):
                found.append(int(entry.name))
        return found

    def close(self) -> None:
        for pid in self.processes("ray::") + self.processes(sys.executable):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tune_trials(sweep_dir: Path) -> dict[str, Any]:
    from ray.tune import ExperimentAnalysis
    return {t.trial_id: t for t in ExperimentAnalysis(str(sweep_dir)).trials}


def val_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "val"]


def reported(sweep_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    """What the trial reported to Tune (its result.json lines)."""
    lines = (sweep_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_sweep_asha_report_wandb_and_reproduce(tmp_path: Path) -> None:
    sweep = Sweep(sweep_yaml(tmp_path, "t4"), tmp_path / "store")
    try:
        rc = sweep.run()
        out = sweep.output()
    finally:
        sweep.close()
    assert rc == 0, out[-6000:]
    sweep_dir = tmp_path / "store" / "t4"
    trials = tune_trials(sweep_dir)
    assert len(trials) == 4 and {t.status for t in trials.values()} == {"TERMINATED"}, out[-3000:]

    # ASHA stopped at least one trial: it has no stop.json (training did not end by itself) and fewer epochs in
    # Tune's record; a trial without stop.json trained all 3 epochs
    stopped = {i for i in trials if not (sweep_dir / "runs" / i / "stop.json").exists()}
    assert stopped, "ASHA stopped no trial"
    for i in trials:
        epochs = [r["epoch"] for r in val_records(sweep_dir / "runs" / i)]
        assert epochs == list(range(len(epochs))) and (len(epochs) == 3 if i not in stopped
                                                       else len(reported(sweep_dir, i)) < 3), (i, epochs)

    # every trial: Tune's record, the run dir's metrics and the offline wandb run hold the same numbers. ASHA's
    # stop is asynchronous: the trial may finish one more validation (its last epoch, even) before it ends, so
    # Tune's record is then one validation short of the run's
    for i in trials:
        run_values = [r["nelbo"] for r in val_records(sweep_dir / "runs" / i)]
        tune_values = [r["val/nelbo"] for r in reported(sweep_dir, i)]
        assert tune_values and run_values[:len(tune_values)] == tune_values, (i, run_values, tune_values)
        assert len(tune_values) == 3 or len(run_values) - len(tune_values) <= 1, (i, run_values, tune_values)
        assert all(r["world_size"] == 2 for r in reported(sweep_dir, i))
        wandb_file, = (sweep_dir / f"trial_{i}" / "wandb").glob("offline-run-*/run-*.wandb")
        assert [h["val/nelbo"] for h in history(wandb_file) if "val/nelbo" in h] == tune_values
        assert any(r.WhichOneof("record_type") == "run" and r.run.run_group == "t4" for r in records(wandb_file))

    # the report: CSV and Markdown rows are the trials' own numbers; the plots are images
    from dvp.tune.report import write_report
    files = write_report(sweep_dir, sweep_dir / "report")
    with open(files["trials"]) as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(trials)
    for i, row in rows.items():
        values = [r["nelbo"] for r in val_records(sweep_dir / "runs" / i)]
        assert math.isclose(float(row["best"]), min(values), rel_tol=1e-6), (row, values)
        assert row["stopped_early"].lower() == str(i in stopped).lower()
        assert row["status"] == "TERMINATED" and i in files["trials_md"].read_text()
    for key, path in files.items():
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.size[0] > 200 and image.size[1] > 100, key

    # the best trial: best.json names it, its registered checkpoint is a run dir that dvp-eval reads
    best = json.loads((sweep_dir / "best.json").read_text())
    values = {i: min(r["nelbo"] for r in val_records(sweep_dir / "runs" / i)) for i in trials}
    assert best["trial_id"] == min(values, key=values.get) and best["value"] == values[best["trial_id"]]
    assert f"reproduce: {best['command']}" in out
    res = subprocess.run([sys.executable, "-m", "dvp.evaluate", f"run_dir={best['checkpoint']}", "eval.is_samples=4",
                          "eval.max_images=16"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((Path(best["checkpoint"]) / "checkpoints" / "best.eval.json").read_text())["nll"] > 0
    res = subprocess.run([sys.executable, "-m", "dvp.sample", f"run_dir={best['checkpoint']}", "n=4",
                          f"out={tmp_path / 'best.png'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and Image.open(tmp_path / "best.png").size[0] >= 512, res.stderr[-2000:]

    # the report's test evaluation of the finished trials, sharded over 2 processes, lands in its table
    res = subprocess.run([sys.executable, "-m", "dvp.cli.report", str(sweep_dir), "eval=true", "eval.is_samples=4",
                          "eval.max_images=16", "workers=2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(sweep_dir / "report" / "trials.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    for i in trials:
        result = sweep_dir / "runs" / i / "checkpoints" / "best.eval.json"
        assert result.exists() == (i not in stopped), i
        if i not in stopped:
            assert float(rows[i]["test_nll"]) == pytest.approx(json.loads(result.read_text())["nll"], rel=1e-6)

    # its reproduce command in one process (torch engine) gives the same validation ELBO as the 2-worker trial
    repro = tmp_path / "repro"
    res = subprocess.run([sys.executable, "-m", "dvp.train", *best["overrides"], f"run_dir={repro}",
                          "wandb.mode=disabled"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    trial = [r["nelbo"] for r in val_records(sweep_dir / "runs" / best["trial_id"])]
    again = [r["nelbo"] for r in val_records(repro)][:len(trial)]
    assert len(again) == len(trial) and all(math.isclose(a, b, rel_tol=3e-3) for a, b in zip(again, trial)), (
        again, trial)
    w1 = load_checkpoint(repro / "checkpoints" / "last.pt")["engine"]["model"]
    w2 = load_checkpoint(sweep_dir / "runs" / best["trial_id"] / "checkpoints" / "last.pt")["engine"]["model"]
    flat = [torch.cat([w[k].flatten().double() for k in sorted(w)]) for w in (w1, w2)]
    print("reproduce: val nelbo", again, "trial", trial, "weights rel",
          float((flat[0] - flat[1]).norm() / flat[1].norm()))


def test_a_trial_larger_than_the_cluster_is_refused_before_any_trial(tmp_path: Path) -> None:
    sweep = Sweep(sweep_yaml(tmp_path, "big"), tmp_path / "store")
    sweep.cmd += ["resources.workers=3", "ray.num_cpus=2", "train.batch_size=48"]
    try:
        rc, out = sweep.run(timeout=300), sweep.output()
    finally:
        sweep.close()
    assert rc == 2, out[-3000:]
    assert "error: sweep big: a trial needs 3 workers x (1 CPU, 0 GPU) but the cluster has 2 CPUs" in out
    assert not (tmp_path / "store" / "big").exists()                   # nothing written


def test_a_killed_worker_resumes_and_an_interrupted_sweep_resumes(tmp_path: Path) -> None:
    path = sweep_yaml(tmp_path, "faults", experiments={"digits/dvp_vae": {"model.ctx_size": [2]}},
                      scheduler={"name": "fifo"}, wandb={"mode": "disabled"})
    sweep_dir = tmp_path / "store" / "faults"
    sweep = Sweep(path, tmp_path / "store")
    try:
        proc = sweep.start()
        first = wait_for(lambda: sorted((sweep_dir / "trials").glob("*/checkpoint_*")), 600,
                         "the first trial's first registered checkpoint")[0].parent.name
        worker = wait_for(lambda: sweep.processes("ray::RayTrainWorker"), 60, "a Ray Train worker")[0]
        os.kill(worker, signal.SIGKILL)                                   # a worker dies mid-trial
        wait_for(lambda: (sweep_dir / "runs" / first / "stop.json").exists(), 900, "the first trial to finish")
        second = wait_for(lambda: [p.name for p in (sweep_dir / "runs").iterdir() if p.name != first
                                   and (p / "metrics.jsonl").exists()], 600, "the second trial to train")[0]
        finished = (sweep_dir / "runs" / first / "metrics.jsonl").read_bytes()
        os.kill(proc.pid, signal.SIGINT)                                  # interrupt the sweep driver
        assert proc.wait(timeout=300) == 130, sweep.output()[-4000:]
        assert "run the same command to resume" in sweep.output()
        assert not (sweep_dir / "runs" / second / "stop.json").exists()
        assert sweep.run() == 0, sweep.output()[-4000:]                   # the same command again
        out = sweep.output()
    finally:
        stop(proc)
        sweep.close()
    assert "resumed at step" in out and "(resumed)" in out
    assert (sweep_dir / "runs" / first / "metrics.jsonl").read_bytes() == finished   # not redone
    trials = tune_trials(sweep_dir)
    assert {t.status for t in trials.values()} == {"TERMINATED"} and set(trials) == {first, second}
    for i in (first, second):
        assert (sweep_dir / "runs" / i / "stop.json").exists()
        assert [r["epoch"] for r in val_records(sweep_dir / "runs" / i)] == [0, 1, 2]
