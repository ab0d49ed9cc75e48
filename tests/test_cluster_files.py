"""The cluster launch files, checked without a cluster (the real runs are tests/test_clusters.py, marked
cluster): both Ray cluster launcher YAMLs pass Ray's own validation and ship what exists, the head of each gives
the trials' drivers their `dvp_driver` resource, the sbatch scripts are valid bash with the options docs/clusters.md
describes, and `python -m dvp.tune.ray_stop` ends one Ray instance's processes and spares the others."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dvp.tune.ray_stop import ray_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_validation_and_ships_dvp(name: str) -> None:
    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    config = prepare_config(raw)
    validate_config(config)                                    # Ray's JSON schema; raises on a bad key or type
    token = raw["file_mounts"].pop("~/.ray/auth_token")        # token auth: the user's token, to Ray's default path
    assert token == "~/.ray/auth_token"
    for remote, local in raw["file_mounts"].items():
        assert remote.startswith("~/dvp-src/") and (ROOT / local).exists(), (remote, local)
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert all(re.search(r"RAY_AUTH_MODE=token (nohup setsid )?ray start", c) for c in commands if "ray start" in c)
    assert {"./dvp", "./configs", "./sweeps", "./setup.cfg", "./pyproject.toml"} <= set(raw["file_mounts"].values())
    assert any("pip install" in c and "-e ~/dvp-src" in c for c in raw["setup_commands"])
    head = config["available_node_types"][config["head_node_type"]]
    start = " ".join(raw["head_start_ray_commands"])
    assert "dvp_driver" in start or head["resources"].get("dvp_driver", 0) >= 1
    assert "ray start --head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_cluster_yaml_has_gpu_workers_that_autoscale() -> None:
    config = prepare_config(yaml.safe_load((ROOT / "cluster/cluster.yaml").read_text()))
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] < t["max_workers"] for t in workers)


@pytest.mark.parametrize("name, options", [
    ("train.sbatch", ["--ntasks-per-node", "--gpus-per-node", "--signal=USR1@", "--requeue", "--open-mode=append"]),
    ("sweep.sbatch", ["--nodes", "--ntasks-per-node=1", "--gpus-per-node", "--signal=B:USR1@", "--requeue"])])
def test_sbatch_scripts_are_valid_bash_with_their_options_at_the_top(name: str, options: list[str]) -> None:
    path = ROOT / "cluster/slurm" / name
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert os.access(path, os.X_OK)
    sbatch = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in options:
        assert any(s.startswith(option) for s in sbatch), option


def _holder(folder: Path, name: str) -> subprocess.Popen:
    """A process that keeps a file open under `folder` (as a Ray process keeps its logs) and says when it has."""
    code = "import sys,time; f=open(sys.argv[1],'w'); print('ready', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / name)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_ray_stop_ends_the_processes_of_one_temp_folder_and_spares_the_rest(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    a, b, bystander = _holder(mine, "a.log"), _holder(mine, "b.log"), _holder(other, "c.log")
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--log-dir={mine}/logs"])
    try:
        time.sleep(0.2)
        assert set(ray_processes(str(mine))) == {a.pid, b.pid, named.pid}
        env = {**os.environ, "RAY_TMPDIR": str(mine)}
        out = subprocess.run([sys.executable, "-m", "dvp.tune.ray_stop", "--grace", "5"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"stopped the Ray processes of {mine}" in out.stdout, out.stderr
        for p in (a, b, named):
            assert p.wait(timeout=10) is not None
        assert bystander.poll() is None                    # another instance's process lives on
    finally:
        for p in (a, b, bystander, named):
            p.kill()
            p.wait()


def test_ray_stop_without_a_folder_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    out = subprocess.run([sys.executable, "-m", "dvp.tune.ray_stop"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "RAY_TMPDIR" in out.stderr


GPU_JOBS = [   # (the sbatch shell's Slurm variables, what `scontrol show job` prints, the GPUs per node)
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:4"}, "", "4"),              # --gpus-per-node=a100:4
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "", "8"),                                         # an older Slurm
    ({"SLURM_JOB_GPUS": "0,1,2"}, "   TresPerNode=gres/gpu:3", "3"),                      # --gres=gpu:3
    ({}, "   TRES=cpu=8,node=2,gres/gpu=4 TresPerNode=gres/gpu:a100:2 ", "2"),            # --gres=gpu:a100:2
    ({}, "   Gres=gpu:tesla:4 Reservation=(null)", "4"),                                  # Slurm before 21
    ({"SLURM_GPUS_ON_NODE": "0"}, "   TresPerNode=gres/gpu:4", "0"),                      # --gpus-per-node=0
    ({}, "   TRES=cpu=8,node=2 TresPerNode=(null)", "0"),                                 # a CPU job
]


@pytest.mark.parametrize("variables, scontrol, gpus", GPU_JOBS)
def test_sweep_sbatch_counts_the_gpus_of_a_node_however_the_job_asked(variables: dict[str, str], scontrol: str,
                                                                      gpus: str) -> None:
    """The script's own `node_gpus` function, run by bash with the variables Slurm sets in the batch shell and
    `scontrol` replaced by a function printing a job record (no Slurm here)."""
    script = (ROOT / "cluster/slurm/sweep.sbatch").read_text()
    node_gpus = re.search(r"^node_gpus\(\) \{.*?^\}$", script, re.S | re.M)
    assert node_gpus is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | variables | {"SLURM_JOB_ID": "7"}
    code = f"scontrol() {{ printf '%s\\n' {scontrol!r}; }}\n{node_gpus[0]}\nnode_gpus"
    out = subprocess.run(["bash", "-uc", code], env=env, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.strip() == gpus, (out.stdout, out.stderr)
