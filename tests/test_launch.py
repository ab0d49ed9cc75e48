"""dvp.parallel.launch: every launcher's environment -> LaunchEnv, bad environments as one-line ConfigErrors, the Slurm
host-list parser, and init for real: world size 1 without torch.distributed, 2 processes on gloo (torchrun
and Open MPI variables), and a rendezvous that never completes failing within its timeout."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dvp.core.errors import ConfigError
from dvp.parallel.context import init
from dvp.parallel.launch import LAUNCHERS, LaunchEnv, detect, expand_hostlist

REPO = Path(__file__).resolve().parents[1]
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_", "CROSS_", "RAY_")
LAUNCH_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "NODE_RANK"}

TORCHRUN_2X2 = {  # torchrun --nnodes 2 --nproc_per_node 2, second node, second process
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3", "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "4",
    "MASTER_ADDR": "node01", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "dvp-7f3a",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1"}
DEEPSPEED_2X4 = {  # deepspeed --hostfile (2 hosts, slots=4), second host, second process
    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "CROSS_RANK": "1",
    "CROSS_SIZE": "2", "LOCAL_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
SRUN_2X2 = {  # srun --nodes 2 --ntasks-per-node 2, third task (first on the second node)
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "8"}
OPENMPI_1X4 = {  # mpiexec -n 4 on one host
    "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "2", "OMPI_UNIVERSE_SIZE": "4",
    "PMIX_RANK": "2", "PMIX_NAMESPACE": "prterun-host0-12345@1"}
HYDRA_2X2 = {  # MPICH mpiexec -n 4 -ppn 2 -genv MASTER_ADDR host0
    "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "6",
    "HYDI_CONTROL_FD": "7", "MASTER_ADDR": "host0"}
RAY_WORKER = {  # a Ray Train TorchTrainer worker, num_workers=2 on one node
    "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0",
    "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "38501", "OMP_NUM_THREADS": "1", "RAY_RAYLET_PID": "4711",
    "RAY_JOB_ID": "01000000", "ACCELERATE_TORCH_DEVICE": "cpu"}
SBATCH_SHELL = {"SLURM_JOB_ID": "4243", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                "SLURM_JOB_NODELIST": "cpu1", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("environ,expected", [
    (TORCHRUN_2X2, LaunchEnv("torchrun", 3, 1, 4, 2, "node01", 29400)),
    (DEEPSPEED_2X4, LaunchEnv("deepspeed", 5, 1, 8, 4, "10.0.0.1", 29500)),
    (SRUN_2X2, LaunchEnv("slurm", 2, 0, 4, 2, "gpu07", 24242)),
    ({**SRUN_2X2, "SLURM_STEP_NODELIST": "node[01-03,07],gpu5", "MASTER_PORT": "29600"},
     LaunchEnv("slurm", 2, 0, 4, 2, "node01", 29600)),
    ({k: v for k, v in SRUN_2X2.items() if not k.startswith("SLURM_STEP_")}
     | {"SLURM_JOB_NODELIST": "r1-n[4-5]"},
     LaunchEnv("slurm", 2, 0, 4, None, "r1-n4", 24242)),
    (OPENMPI_1X4, LaunchEnv("openmpi", 2, 2, 4, 4, "127.0.0.1", 29500)),
    ({**OPENMPI_1X4, "OMPI_COMM_WORLD_SIZE": "8", "MASTER_ADDR": "host0", "MASTER_PORT": "29511"},
     LaunchEnv("openmpi", 2, 2, 8, 4, "host0", 29511)),
    ({**OPENMPI_1X4, **SBATCH_SHELL, "SLURM_NTASKS": "4"},  # mpiexec inside sbatch: OMPI_* beat SLURM_*
     LaunchEnv("openmpi", 2, 2, 4, 4, "127.0.0.1", 29500)),
    (HYDRA_2X2, LaunchEnv("mpich", 3, 1, 4, 2, "host0", 29500)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "2"},
     LaunchEnv("mpich", 1, 1, 2, 2, "127.0.0.1", 29500)),
    (RAY_WORKER, LaunchEnv("ray", 1, 1, 2, 2, "10.0.0.5", 38501)),
    ({k: v for k, v in RAY_WORKER.items() if not k.startswith("RAY_")},
     LaunchEnv("torchrun", 1, 1, 2, 2, "10.0.0.5", 38501)),
    ({**SRUN_2X2, **TORCHRUN_2X2},  # srun running torchrun: the explicit RANK wins
     LaunchEnv("torchrun", 3, 1, 4, 2, "node01", 29400)),
    ({**OPENMPI_1X4, "RANK": "0", "WORLD_SIZE": "1"},  # RANK set inside an MPI job
     LaunchEnv("torchrun", 0, 0, 1, None, "127.0.0.1", 29500)),
    ({}, LaunchEnv("single", 0, 0, 1, 1, "127.0.0.1", 29500)),
    ({"HOME": "/root", "MASTER_PORT": "oops"}, LaunchEnv("single", 0, 0, 1, 1, "127.0.0.1", 29500)),
    (SBATCH_SHELL, LaunchEnv("single", 0, 0, 1, 1, "127.0.0.1", 29500)),
])
def test_detect_reads_every_launcher(environ: dict[str, str], expected: LaunchEnv) -> None:
    assert detect(environ) == expected


def test_every_launcher_is_covered() -> None:
    found = {detect(e).launcher for e in (TORCHRUN_2X2, DEEPSPEED_2X4, SRUN_2X2, OPENMPI_1X4, HYDRA_2X2,
                                          RAY_WORKER, {})}
    assert found == set(LAUNCHERS)


TORCH_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("environ,names", [
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE"]),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h0"}, ["WORLD_SIZE=2", "RANK"]),
    ({**TORCH_2, "RANK": "one"}, ["RANK='one'", "not an integer"]),
    ({**TORCH_2, "WORLD_SIZE": "2.0"}, ["WORLD_SIZE='2.0'"]),
    ({**TORCH_2, "RANK": "3"}, ["RANK=3", "WORLD_SIZE=2"]),
    ({**TORCH_2, "RANK": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({**TORCH_2, "RANK": "-1"}, ["RANK=-1", "negative"]),
    ({**TORCH_2, "WORLD_SIZE": "0", "RANK": "0"}, ["WORLD_SIZE=0"]),
    ({**TORCH_2, "LOCAL_RANK": "-2"}, ["LOCAL_RANK=-2"]),
    ({**TORCH_2, "LOCAL_WORLD_SIZE": "1"}, ["LOCAL_RANK=1", "LOCAL_WORLD_SIZE=1"]),
    ({**TORCH_2, "LOCAL_WORLD_SIZE": "4"}, ["LOCAL_WORLD_SIZE=4", "WORLD_SIZE=2"]),
    ({k: v for k, v in TORCH_2.items() if k != "LOCAL_RANK"}, ["LOCAL_RANK"]),
    ({k: v for k, v in TORCH_2.items() if k != "MASTER_ADDR"}, ["MASTER_ADDR", "WORLD_SIZE=2"]),
    ({**TORCH_2, "MASTER_ADDR": " "}, ["MASTER_ADDR"]),
    ({**TORCH_2, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000", "1..65535"]),
    ({**TORCH_2, "MASTER_PORT": "0"}, ["MASTER_PORT=0"]),
    ({**TORCH_2, "MASTER_PORT": "http"}, ["MASTER_PORT='http'"]),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "a"}, ["SLURM_PROCID", "srun"]),
    ({**SRUN_2X2, "SLURM_STEP_NUM_TASKS": "4x"}, ["SLURM_STEP_NUM_TASKS='4x'"]),
    ({**SRUN_2X2, "SLURM_STEP_NODELIST": "gpu[07-"}, ["SLURM_STEP_NODELIST='gpu[07-'", "MASTER_ADDR"]),
    ({k: v for k, v in SRUN_2X2.items() if "NODELIST" not in k}, ["SLURM_JOB_NODELIST", "MASTER_ADDR"]),
    ({k: v for k, v in SRUN_2X2.items() if k != "SLURM_STEP_NODELIST"} | {"SLURM_JOB_NODELIST": "n[3-1]"},
     ["SLURM_JOB_NODELIST='n[3-1]'"]),
    ({k: v for k, v in SRUN_2X2.items() if k != "SLURM_JOB_ID"}, ["MASTER_PORT", "SLURM_JOB_ID"]),
    ({**SRUN_2X2, "SLURM_LOCALID": "2"}, ["SLURM_LOCALID=2", "SLURM_STEP_TASKS_PER_NODE=2"]),
    ({**SRUN_2X2, "SLURM_STEP_TASKS_PER_NODE": "two"}, ["SLURM_STEP_TASKS_PER_NODE='two'"]),
    ({**SRUN_2X2, "SLURM_PROCID": "4"}, ["SLURM_PROCID=4", "SLURM_STEP_NUM_TASKS=4"]),
    ({**OPENMPI_1X4, "OMPI_COMM_WORLD_SIZE": "8"}, ["MASTER_ADDR", "OMPI_COMM_WORLD_LOCAL_SIZE=4", "-x"]),
    ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE", "mpiexec"]),
    ({**OPENMPI_1X4, "OMPI_COMM_WORLD_RANK": "4"}, ["OMPI_COMM_WORLD_RANK=4", "OMPI_COMM_WORLD_SIZE=4"]),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, ["MASTER_ADDR", "-genv"]),
    ({**HYDRA_2X2, "MPI_LOCALRANKID": "2"}, ["MPI_LOCALRANKID=2", "MPI_LOCALNRANKS=2"]),
])
def test_bad_environments_are_one_line_config_errors(environ: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        detect(environ)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("text,hosts", [
    ("a", ["a"]),
    ("a,b", ["a", "b"]),
    ("a[1-3]", ["a1", "a2", "a3"]),
    ("a[01-03,7]", ["a01", "a02", "a03", "a7"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("a[098-100]", ["a098", "a099", "a100"]),
    ("rack1-node[1-2]", ["rack1-node1", "rack1-node2"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5,node[2,4]", ["gpu5", "node2", "node4"]),
    ("a[1-2]-ib,b.example.org", ["a1-ib", "a2-ib", "b.example.org"]),
])
def test_slurm_hostlist_expands(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", ",a", "a,", "a,,b", "a[", "a[1-", "a[]", "a[x]", "a[3-1]", "a[1-2",
                                  "[1-2]", "a[1-2][3]", "a]"])
def test_slurm_hostlist_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(text)


def test_init_at_world_size_one_creates_no_process_group() -> None:
    ctx = init(detect({}))
    assert not dist.is_initialized()
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.is_main) == (0, 0, 1, True)
    if not torch.cuda.is_available():
        assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    t = torch.tensor([2.0])
    assert ctx.all_reduce_sum(t) is t and t.item() == 2.0
    obj = {"a": [1]}
    assert ctx.broadcast_object(obj) is obj
    ctx.barrier()
    ctx.close()
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="timeout_s"):
        init(detect({}), timeout_s=0)


def _free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def restored_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """init writes the torch.distributed variables into os.environ; put back what was there."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")  # records the old value (delenv alone would not record an absent one)
        monkeypatch.delenv(name)


def test_rendezvous_on_a_taken_port_or_without_rank_0_is_a_config_error(restored_environ: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*EADDRINUSE.*MASTER_PORT"):
            init(LaunchEnv("torchrun", 0, 0, 2, 2, "127.0.0.1", port), timeout_s=5)
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*timed out after 1 s on rank 1.*start rank 0"):
        init(LaunchEnv("torchrun", 1, 1, 2, 2, "127.0.0.1", port), timeout_s=1)
    assert time.monotonic() - start < 15
    assert not dist.is_initialized()


@pytest.mark.parametrize("launcher,check", [
    ("torchrun", "give torchrun an address of rank 0's host that every host reaches: in --rdzv-endpoint, or with "
                 "--rdzv-backend c10d as --local-addr on every host"),
    ("openmpi", "check that MASTER_ADDR/MASTER_PORT name rank 0's host and port"),
])
def test_a_rendezvous_host_that_does_not_answer_is_named_with_what_set_it(launcher: str, check: str,
                                                                        restored_environ: None) -> None:
    """Under torchrun the user did not set MASTER_ADDR: the line names torchrun's options that decide it (its
    rendezvous endpoint, or the --local-addr of rank 0's agent under c10d) and what the name resolves to here."""
    port = _free_port()
    with pytest.raises(ConfigError) as info:
        init(LaunchEnv(launcher, 1, 1, 2, 2, "localhost", port), timeout_s=1)
    message = str(info.value)
    assert f"rendezvous at localhost:{port} (MASTER_ADDR:MASTER_PORT" in message, message
    assert "nothing answered there (localhost is 127.0.0.1 from this host); start rank 0 too" in message, message
    assert message.endswith(check) and ("set by torchrun" in message) == (launcher == "torchrun"), message


WORKER = """
import json, os, torch, torch.distributed as dist
from dvp.parallel.context import init
from dvp.parallel.launch import detect
env = detect(os.environ)
ctx = init(env, timeout_s=60)
total = ctx.all_reduce_sum(torch.tensor([ctx.rank + 1.0])).item()
got = ctx.broadcast_object({"from": ctx.rank, "data": [1, 2]} if ctx.is_main else None)
again = init(detect(os.environ))        # an existing group (as under Ray Train) is joined, not replaced
again.close()
still = dist.is_initialized()
ctx.barrier()
ctx.close()
print(json.dumps({"launcher": env.launcher, "rank": ctx.rank, "world": ctx.world_size, "total": total,
                  "got": got, "device": str(ctx.device), "backend": ctx.backend, "joined_kept": still,
                  "closed": not dist.is_initialized()}))
"""


def _base_env() -> dict[str, str]:
    """This environment without any launcher's variables, on the CPU accelerator, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_NAMES and not k.startswith(LAUNCH_PREFIXES)}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _run(envs: list[dict[str, str]], code: str, tmp_path: Path, timeout: float) -> list[tuple[int, str, str]]:
    """Run `code` once per environment, all at once; (exit code, stdout, stderr) of each."""
    procs, logs = [], []
    for i, env in enumerate(envs):
        out, err = (open(tmp_path / f"{i}.{kind}", "w+") for kind in ("out", "err"))
        logs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=out,
                                      stderr=err))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for code_, (out, err) in zip(codes, logs):
        out.seek(0), err.seek(0)
        results.append((code_, out.read(), err.read()))
        out.close(), err.close()
    return results


@pytest.mark.parametrize("variables,launcher", [
    (lambda r, port: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"},
     "torchrun"),
    (lambda r, port: {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                      "MASTER_PORT": str(port)},
     "openmpi"),
], ids=["torchrun", "openmpi"])
def test_two_processes_on_gloo(variables, launcher: str, tmp_path: Path) -> None:
    port = _free_port()
    results = _run([_base_env() | variables(r, port) for r in (0, 1)], WORKER, tmp_path, timeout=120)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {"launcher": launcher, "rank": rank, "world": 2, "total": 3.0,
                          "got": {"from": 0, "data": [1, 2]}, "device": "cpu", "backend": "gloo",
                          "joined_kept": True, "closed": True}


LONELY = """
import os
from dvp.core.errors import ConfigError
from dvp.parallel.context import init
from dvp.parallel.launch import detect
try:
    init(detect(os.environ), timeout_s=5)
except ConfigError as exc:
    raise SystemExit(f"ConfigError: {exc}")
"""


def test_rendezvous_that_never_completes_fails_within_the_timeout(tmp_path: Path) -> None:
    port = _free_port()
    env = _base_env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)}
    start = time.monotonic()
    [(code, _, err)] = _run([env], LONELY, tmp_path, timeout=40)
    assert time.monotonic() - start < 30       # 5 s rendezvous + interpreter, torch and deepspeed start-up
    message = err.strip().splitlines()[-1]
    assert code != 0 and message.startswith("ConfigError: rendezvous at 127.0.0.1:")
    assert f":{port}" in message and "1 missing" in message
    assert "only 1 of WORLD_SIZE=2 processes joined" in message


def test_dvp_sample_refuses_a_multi_process_launch_in_one_line(tmp_path) -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "x"}
    res = subprocess.run([sys.executable, "-m", "dvp.sample", f"run_dir={tmp_path}"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "error: torchrun started 2 processes, but dvp-sample runs in one process; run it directly (dvp-train and "
        "dvp-eval use many)"]
