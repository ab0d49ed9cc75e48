"""The cluster launch files against real daemons on this machine (tests/clusters.py starts them, stops them by PID):
a single-node Slurm (munged, slurmctld, slurmd) running cluster/slurm/train.sbatch and sweep.sbatch, and Ray's
cluster launcher (`ray up` / `ray submit` / `ray down`, the `local` provider over a private sshd on 127.0.0.1)
running cluster/local.yaml. Minutes each: marked `cluster`; .ci/run installs the Debian packages and runs them.

What one machine cannot show (several nodes, GPUs, a cloud provider's API) is listed in the README's "Clusters"."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from clusters import Slurm, Sshd, wait_for

from dvp.dist.context import free_port
from dvp.train.checkpoint import load_checkpoint
from dvp.train.logger import read_metrics
from dvp.tune.ray_stop import ray_processes, stop_ray

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
    """A 2-task DeepSpeed job finishes; the same job sent USR1 mid-epoch (what --signal=USR1@300 sends before the
    time limit) saves, requeues itself, resumes from that checkpoint and ends with bitwise the same weights and
    validation numbers as the uninterrupted job."""
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
    assert "stopped: SIGUSR1 during training" in out and f"requeueing job {cut}" in out, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed at step" in line]
    assert resumed and 25 <= int(resumed[0].rsplit(" ", 1)[1]) < 80, out[-4000:]
    assert "restart 1" in out and json.loads((cut_dir / "stop.json").read_text())["step"] == 80

    assert [(r["step"], r["nelbo"]) for r in val(cut_dir)] == [(r["step"], r["nelbo"]) for r in val(whole_dir)]
    a, b = (load_checkpoint(d / "checkpoints/last.pt")["engine"] for d in (cut_dir, whole_dir))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


# ---- Slurm: a sweep on Ray inside the allocation ----------------------------------------------------------------
def test_slurm_sweep_runs_ray_in_the_job_is_requeued_on_usr1_and_completes_with_its_report(slurm: Slurm,
                                                                                         base: Path) -> None:
    """sweep.sbatch starts Ray in the allocation and runs sweeps/digits_smoke.yaml in it. USR1 to the batch shell
    (--signal=B:USR1) after the first checkpoint interrupts the sweep, stops Ray and requeues; the second run
    resumes the sweep (the first trial from its checkpoint), finishes it, writes best.json and the report, and
    stops its Ray: no process of the job's Ray is left. Trials of 4 epochs (digits_smoke has 2): the interrupt
    takes seconds to reach the trial, and a 2-epoch trial could finish first (seen 1 run in 3), leaving
    nothing to resume."""
    work = base / "work"
    work.mkdir()
    store = base / "sweeps"
    job = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                        str(ROOT / "cluster/slurm/sweep.sbatch"), "sweep=digits_smoke", f"storage={store}",
                        "train.max_epochs=4", "train.lr_epochs=4"], cwd=work)
    folder = store / "digits_smoke"
    wait_for(lambda: list(folder.glob("trials/*/checkpoint_*")), 300, "the first registered checkpoint")
    assert slurm.run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    slurm.wait_state(job, {"PENDING"}, 180)
    assert not ray_processes(f"/tmp/dvp-ray-{job}"), "the interrupted job left Ray processes"
    slurm.release(job)
    info = slurm.wait_done(job, 600)
    out = log(work, "dvp-sweep", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-6000:] + slurm.logs()
    assert "interrupting the sweep" in out and "(resumed)" in out, out[-6000:]
    assert re.search(r"resumed at step (20|40|60)\b", out), out[-6000:]             # mid-trial, epochs of 20 steps
    assert out.count("ray_stop: stopped the Ray processes") == 2 and "dvp-sweep: exit 0" in out, out[-6000:]
    assert not ray_processes(f"/tmp/dvp-ray-{job}")

    rows = list(csv.DictReader((folder / "report/trials.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    for row in rows:
        records = val(folder / "runs" / row["trial_id"])
        assert [r["epoch"] for r in records] == [0, 1, 2, 3]          # each epoch once, across the requeue
        assert float(row["best"]) == pytest.approx(min(r["nelbo"] for r in records), rel=1e-6)
        # what Tune recorded: no epoch twice (Tune's result.json may miss what it received just before the
        # interruption; its saved state has it, and the resumed trial went on from there)
        reported = [json.loads(line)["epoch"] for line in (folder / f"trial_{row['trial_id']}/result.json").open()]
        assert reported == sorted(set(reported)) and reported[-1] == 4, reported
    best = json.loads((folder / "best.json").read_text())
    assert best["value"] == pytest.approx(min(float(r["best"]) for r in rows), rel=1e-6)
    assert all((folder / "report" / f).stat().st_size > 0 for f in ("trials.md", "learning_curves.png"))


# ---- Ray's cluster launcher -------------------------------------------------------------------------------------
BASHRC = """\
export PATH={home}/bin:{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RAY_TMPDIR={head_tmp} RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TORCH_EXTENSIONS_DIR={ext}
cd "$HOME"
"""
RAY_WRAPPER = """\
#!/bin/bash
# `ray stop` (which ray up and ray down run on the head) ends this head's Ray only, not every Ray on the host
if [ "${{1:-}}" = stop ]; then exec python -m dvp.tune.ray_stop; fi      # RAY_TMPDIR's Ray
exec {venv}/bin/python -m ray.scripts.scripts "$@"
"""


def head_venv(path: Path) -> None:
    """The head node's Python: a fresh venv that sees this venv's packages (torch, ray, ... through a .pth file)
    but not its dvp, so that the cluster YAML's own set-up commands must install dvp on the head."""
    subprocess.run(["python3", "-m", "venv", str(path)], check=True, timeout=120)
    site = subprocess.run([str(path / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dvp_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_ray_up_submit_down_runs_a_sweep_with_the_package_shipped_by_cluster_local_yaml(base: Path) -> None:
    """cluster/local.yaml, pointed at 127.0.0.1 (ssh through a private sshd, its own ports and RAY_TMPDIR), brings
    up a real head with `ray up`: file_mounts ship dvp's sources, setup_commands `pip install -e` them. `ray
    submit ... sweeps/sweep.py -- sweep=digits_smoke ray.address=auto` runs the sweep on it, importing the shipped
    copy; its results and report are where the sweep's storage says (the head's ~/runs/sweeps); `ray down` stops
    that Ray and nothing else."""
    home, head_tmp, client_tmp = base / "home", base / "rt-head", base / "rt-client"
    for d in (home / "bin", head_tmp, client_tmp):
        d.mkdir(parents=True)
    venv = base / "hv"
    head_venv(venv)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    (home / ".bashrc").write_text(BASHRC.format(home=home, venv=venv, head_tmp=head_tmp, ext=ext))
    (home / ".profile").write_text(". ~/.bashrc\n")
    (home / "bin/ray").write_text(RAY_WRAPPER.format(venv=venv))
    (home / "bin/ray").chmod(0o755)

    config = yaml.safe_load((ROOT / "cluster/local.yaml").read_text())
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    head_start = config["head_start_ray_commands"]
    assert "--port=6379" in head_start[1]
    head_start[1] = head_start[1].replace("--port=6379", f"--port={gcs} --dashboard-port={dashboard} "
                                          f"--dashboard-agent-listen-port={agent} --num-cpus=2")
    ssh_dirs = set(Path("/tmp").glob("ray_ssh_*"))
    with Sshd(base / "ssh", home) as sshd:
        config.update(cluster_name=f"dvptest{gcs}", max_workers=0, worker_start_ray_commands=[],
                      provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                      auth={"ssh_user": "root", "ssh_private_key": str(sshd.key),
                            "ssh_proxy_command": f"nc 127.0.0.1 {sshd.port}"})
        (base / "cluster.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "RAY_TMPDIR": str(client_tmp), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled"}

        def ray(*args: str, timeout: float) -> subprocess.CompletedProcess:
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            print(f"ray {args[0]}: {time.monotonic() - start:.1f} s, exit {done.returncode}")
            return done
        try:
            up = ray("up", "-y", "--no-config-cache", "--disable-usage-stats", str(base / "cluster.yaml"),
                     timeout=900)
            assert up.returncode == 0 and "Ray runtime started" in up.stdout + up.stderr, (up.stdout + up.stderr)[-6000:]
            assert ray_processes(str(head_tmp)), "no Ray processes on the head after ray up"
            submit = ray("submit", "--no-config-cache", str(base / "cluster.yaml"), "sweeps/sweep.py", "--",
                         "sweep=digits_smoke", "ray.address=auto", timeout=900)
            out = submit.stdout + submit.stderr
            assert submit.returncode == 0, out[-6000:]
        finally:
            down = ray("down", "-y", str(base / "cluster.yaml"), timeout=300)
            stop_ray(str(head_tmp))
            for d in set(Path("/tmp").glob("ray_ssh_*")) - ssh_dirs:
                shutil.rmtree(d, ignore_errors=True)
    assert down.returncode == 0, (down.stdout + down.stderr)[-4000:]

    # the package came from the YAML's file_mounts + setup_commands, on the head
    for shipped in ("dvp/train/loop.py", "dvp/data/batches.py"):           # every layer folder, dvp/data too
        assert (home / "dvp-src" / shipped).read_bytes() == (ROOT / shipped).read_bytes(), shipped
    assert f"from {home}/dvp-src/dvp," in out, out[-6000:]
    used, ours = (yaml.safe_load(p.read_text()) for p in (base / "cluster.yaml", ROOT / "cluster/local.yaml"))
    for key in ("file_mounts", "rsync_filter", "setup_commands"):     # shipped exactly as the YAML ships it
        assert used[key] == ours[key], key
    # the sweep's results and report, where its storage (runs/sweeps, relative to the head's home) says
    folder = home / "runs/sweeps/digits_smoke"
    rows = list(csv.DictReader((folder / "report/trials.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    for row in rows:
        assert float(row["best"]) == pytest.approx(
            min(r["nelbo"] for r in val(folder / "runs" / row["trial_id"])), rel=1e-6)
    assert json.loads((folder / "best.json").read_text())["value"] == pytest.approx(
        min(float(r["best"]) for r in rows), rel=1e-6)
    assert not ray_processes(str(head_tmp)), "ray down left the head's Ray running"
