"""The cluster launch files against real daemons on this machine (tests/helpers/clusters.py starts them, stops them
by PID):
a single-node Slurm (munged, slurmctld, slurmd) running cluster/slurm/train.sbatch. Minutes each: marked
`cluster`; .ci/run installs the Debian packages and runs them.

sweep.sbatch (with its USR1 requeue) and Ray's cluster launcher with cluster/local.yaml (`ray up` / `ray submit` /
`ray down` over SSH) run across hosts in tests/test_multinode_ray.py. What one machine
cannot show (GPUs, a cloud provider's API, a real network) is listed in docs/clusters.md."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.clusters import Slurm, wait_for

from dvp.train.checkpoint import load_checkpoint
from dvp.train.logger import read_metrics

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["experiment=digits/dvp_vae", "model.num_ch=16", "train.batch_size=64", "train.max_epochs=4",
         "train.lr_epochs=4", "train.warmup_epochs=1", "train.final_eval=false", "train.log_every=5",
         "wandb.mode=disabled"]
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]   # 2 DeepSpeed processes, 1 CPU each


@pytest.fixture
def base() -> Iterator[Path]:
    """A short private folder (Ray's socket paths must stay under 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="dvpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def slurm(base: Path) -> Iterator[Slurm]:
    with Slurm(base / "slurm") as cluster:
        yield cluster


def val(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "val"]


def log(work: Path, name: str, job: str) -> str:
    return (work / f"{name}-{job}.out").read_text(errors="replace")


# ---- Slurm: training --------------------------------------------------------------------------------------------
def test_slurm_train_job_completes_and_a_usr1_job_requeues_and_ends_where_it_would_have(slurm: Slurm,
                                                                                       base: Path) -> None:
    """A 2-task DeepSpeed job finishes; the same job sent USR1 after step 25 (what --signal=USR1@300 sends
    before the time limit) saves, requeues itself, resumes from that checkpoint and ends with bitwise the same
    weights and validation numbers as the uninterrupted job."""
    work = base / "work"
    work.mkdir()
    script = str(ROOT / "cluster/slurm/train.sbatch")
    whole = slurm.sbatch([*CPU_JOB, script, *TRAIN], cwd=work)
    info = slurm.wait_done(whole, 300)
    out = log(work, "dvp-train", whole)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:] + slurm.logs()
    whole_dir = work / f"runs/slurm/dvp-train-{whole}"
    assert f"2 tasks on {info['NodeList']}" in out and "DeepSpeedEngine x 2" in out, out[-4000:]
    assert json.loads((whole_dir / "stop.json").read_text())["step"] == 80

    cut = slurm.sbatch([*CPU_JOB, script, *TRAIN], cwd=work)
    cut_dir = work / f"runs/slurm/dvp-train-{cut}"
    wait_for(lambda: (cut_dir / "metrics.jsonl").exists() and any(
        r["split"] == "train" and r["step"] >= 25 for r in read_metrics(cut_dir / "metrics.jsonl")), 180,
        "step 25 of the job to be cut")
    assert slurm.run(["scancel", "--signal=USR1", cut]).returncode == 0
    slurm.wait_state(cut, {"PENDING"}, 120)                       # requeued by the script itself
    slurm.release(cut)
    info = slurm.wait_done(cut, 300)
    out = log(work, "dvp-train", cut)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-4000:] + slurm.logs()
    # the signal lands within the epoch or, where steps 25-40 outran scancel, in the validation at its end
    assert re.search(r"stopped: SIGUSR1 (during training|at the end of an epoch)", out), out[-4000:]
    assert f"requeueing job {cut}" in out, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed at step" in line]
    assert resumed and 25 <= int(resumed[0].rsplit(" ", 1)[1]) < 80, out[-4000:]
    assert "restart 1" in out and json.loads((cut_dir / "stop.json").read_text())["step"] == 80

    assert [(r["step"], r["nelbo"]) for r in val(cut_dir)] == [(r["step"], r["nelbo"]) for r in val(whole_dir)]
    a, b = (load_checkpoint(d / "checkpoints/last.pt")["engine"] for d in (cut_dir, whole_dir))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
