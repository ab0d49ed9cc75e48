"""dvp across hosts: every launcher, and the faults of a network, on hosts made of Linux namespaces
(tests/helpers/netns.py: each host its own network stack, IP, hostname and /etc/hosts, joined by a bridge). Marked
`multinode` (root; CI runs the mark with -n 0).

The reference is the one-process run with the same micro-batches: 2 ranks of 16 images at ZeRO 0 sum the same
gradients as one process of micro-batch 16 in the same order, so the weights are bitwise equal
(tests/test_distributed.py proves it on one host; here the ranks are on two).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.clusters import wait_for
from helpers.docs import documented_command
from helpers.netns import Hosts
from test_distributed import COMMON, ROOT, _env, flat, ok, records, train, weights

from dvp.train.checkpoint import load_checkpoint
from dvp.train.logger import read_metrics

pytestmark = pytest.mark.multinode
PORT = 29500
SSH = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
       "-o", "LogLevel=ERROR"]
STEPS = ["train.max_steps=6", "dist.zero_stage=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, micro-batch 16, 6 steps: the run two ranks of 16 must equal bitwise."""
    run = tmp_path_factory.mktemp("single16")
    ok(train(1, run, *STEPS, "dist.micro_batch=16"))
    return run


def torchrun(hosts: Hosts, node: int, run_dir: Path, *args: str) -> list[str]:
    """docs/distributed.md's torchrun command for host `node` of the 2-host job (node0:29500 the rendezvous), one
    process per host (torchrun as `python -m torch.distributed.run`, what its script runs)."""
    assert hosts.names[0] == "node0" and PORT == 29500
    return documented_command("docs/distributed.md", "torchrun --nnodes", {
        "torchrun": [sys.executable, "-m", "torch.distributed.run"], "R": [str(node)], "G": ["1"],
        "run_dir=DIR": [f"run_dir={run_dir}"], "...": [*COMMON, *args]})


def mpiexec(key: Path, run_dir: Path, *args: str, exports: tuple[str, ...] = ()) -> list[str]:
    """docs/distributed.md's mpiexec command, run on node0 as root with the test's SSH key, the checkout as working
    directory, one thread per rank and the variables `exports` of mpiexec's environment passed on."""
    harness = ["--allow-run-as-root", "--mca", "plm_rsh_args", " ".join(["-i", str(key), *SSH]),
               "--wdir", str(ROOT), "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONUNBUFFERED=1"]
    harness += [word for name in exports for word in ("-x", name)]
    return documented_command("docs/distributed.md", "mpiexec --host", {
        "mpiexec": ["mpiexec", *harness], "python": [sys.executable], "run_dir=DIR": [f"run_dir={run_dir}"],
        "...": [*COMMON, *args]})


Started = list[tuple[subprocess.Popen, Path]]


def start_on_all(hosts: Hosts, commands: list[list[str]], tmp: Path, env: dict[str, str] | None = None,
                 per_host: list[dict[str, str]] | None = None) -> Started:
    """Start commands[i] on host i at once (environment: `env`, then per_host[i]), output to tmp/<host>.log."""
    logs = [tmp / f"{hosts.names[i]}.log" for i in range(len(commands))]
    return [(hosts.popen(i, cmd, logs[i], env={**_env(), **(env or {}), **(per_host[i] if per_host else {})},
                         cwd=ROOT), logs[i])
            for i, cmd in enumerate(commands)]


def wait_all(started: Started, timeout: float = 600) -> list[tuple[int, str]]:
    """(exit code, output) of each started command, all ended within `timeout` s from now."""
    end = time.monotonic() + timeout
    for p, _ in started:
        p.wait(timeout=max(1.0, end - time.monotonic()))
    return [(p.returncode, log.read_text(errors="replace")) for p, log in started]


def run_on_all(hosts: Hosts, commands: list[list[str]], tmp: Path, timeout: float = 600,
               env: dict[str, str] | None = None,
               per_host: list[dict[str, str]] | None = None) -> list[tuple[int, str]]:
    """Run commands[i] on host i at once; (exit code, output) of each."""
    return wait_all(start_on_all(hosts, commands, tmp, env, per_host), timeout)


def bitwise(run: Path, reference: Path) -> bool:
    return all(torch.equal(a, b) for a, b in zip(flat(weights(run)), flat(weights(reference))))


def test_hosts_are_separate_machines_and_leave_nothing_behind(tmp_path: Path) -> None:
    with Hosts(tmp_path, 2, private_tmp=True) as hosts:
        for i in range(2):
            out = hosts.run(i, ["sh", "-c", "hostname; hostname --ip-address; getent hosts node0 node1; "
                                "touch /tmp/mine; ls /tmp"])
            lines = out.stdout.split()
            assert out.returncode == 0 and lines[:2] == [hosts.names[i], hosts.ips[i]], out
            assert f"{hosts.ips[1 - i]} {hosts.names[1 - i]}" in " ".join(lines), out.stdout
            assert lines[-1] == "mine" and not Path("/tmp/mine").exists()      # a /tmp of its own
        reach = ["nc", "-z", "-v", "-w", "2"]          # netcat: python may live under the private /tmp
        listen = hosts.popen(1, ["nc", "-lk", "9"], tmp_path / "listen.log")
        time.sleep(1)
        assert hosts.run(0, [*reach, hosts.ips[1], "9"]).returncode == 0       # host to host
        hosts.link(1, up=False)
        assert hosts.run(0, [*reach, hosts.ips[1], "9"]).returncode != 0       # a cut cable
        hosts.link(1, up=True)
        assert "unreachable" in hosts.run(0, [*reach, "192.0.2.2", "9"]).stderr   # not the machine's own net
        namespaces = hosts.namespaces + [hosts.switch]
    assert listen.poll() is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in namespaces) and not any(Path("/etc/netns", ns).exists()
                                                               for ns in namespaces)


def test_torchrun_on_two_hosts_trains_the_one_process_model(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with Hosts(tmp_path, 2) as hosts:
        results = run_on_all(hosts, [torchrun(hosts, i, run, *STEPS) for i in range(2)], tmp_path)
    for code, out in results:
        assert code == 0, out[-4000:]
    assert re.search(rf"hosts: rank 0 node0 \({hosts.ips[0]}\), rank 1 node1 \({hosts.ips[1]}\) over eth0",
                     results[0][1]), results[0][1][-3000:]
    assert bitwise(run, reference)


def test_hosts_whose_names_resolve_to_another_network_still_join(reference: Path, tmp_path: Path) -> None:
    """Each host's own name resolves to its eth1, a network no other host reaches (a management address, or
    Debian's 127.0.1.1). Plain gloo listens on that address and its first collective fails (the control, without
    dvp); dvp sets GLOO_SOCKET_IFNAME to the interface toward the other hosts (eth0) and trains the one-process
    model. A GLOO_SOCKET_IFNAME the user sets wins: eth1 fails within dist.timeout_s with one line naming the
    interface, and an interface the host does not have is a one-line error before any compute. The control
    (about 50 s of waiting on the dead network) runs beside dvp's runs, on another port."""
    run = tmp_path / "run"
    plain_gloo = [sys.executable, "-c", "import datetime, torch, torch.distributed as d; d.init_process_group("
                  "'gloo', timeout=datetime.timedelta(seconds=10)); d.all_reduce(torch.ones(1))"]
    with Hosts(tmp_path, 2, trap=(0, 1)) as hosts:
        assert hosts.run(1, ["hostname", "--ip-address"]).stdout.strip() == hosts.ips1[1]
        control = tmp_path / "control"
        control.mkdir()
        without_dvp = start_on_all(hosts, [plain_gloo] * 2, control, per_host=[{"RANK": "0"}, {"RANK": "1"}],
                                   env={"MASTER_ADDR": hosts.names[0], "MASTER_PORT": str(PORT + 100),
                                        "WORLD_SIZE": "2"})
        results = run_on_all(hosts, [torchrun(hosts, i, run, *STEPS) for i in range(2)], tmp_path)
        for code, out in results:
            assert code == 0, out[-4000:]
        assert f"rank 0 node0 ({hosts.ips[0]}), rank 1 node1 ({hosts.ips[1]}) over eth0" in results[0][1]
        assert bitwise(run, reference)
        for name in ("eth1", "eth9"):
            folder = tmp_path / name
            folder.mkdir()
            start = time.monotonic()
            results = run_on_all(hosts, [torchrun(hosts, i, folder / "run", *STEPS, "dist.timeout_s=15")
                                         for i in range(2)], folder, timeout=180, env={"GLOO_SOCKET_IFNAME": name})
            assert all(code != 0 for code, _ in results), results
            assert time.monotonic() - start < 120
            errors = [line for _, out in results for line in out.splitlines() if line.startswith("error: ")]
            if name == "eth1":
                assert any("GLOO_SOCKET_IFNAME" in line and "talks over eth1" in line for line in errors), errors
            else:
                assert any(line.startswith("error: GLOO_SOCKET_IFNAME=eth9: eth9 is not an interface")
                           and "on node0" in line for line in errors), errors
        results = wait_all(without_dvp, timeout=120)
        assert any(code != 0 and "connectFullMesh" in out for code, out in results), results   # the trap bites


def paused(command: list[str], step: int) -> list[str]:
    """`command` with tests/helpers/dist_points.py in place of `-m dvp.train`: rank 1 pauses before `step`."""
    at = command.index("dvp.train") - 1
    driver = str(ROOT / "tests" / "helpers" / "dist_points.py")
    return [*command[:at], driver, "pause", "1", str(step), *command[at + 2:]]


def wait_for_mark(mark: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the paused rank has written `mark` (the job is mid-step); `proc`, the launcher on node0, runs."""
    deadline = time.monotonic() + timeout
    while not mark.exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def watch(procs: list[subprocess.Popen], logs: list[Path], lines: list[str], timeout: float
          ) -> tuple[list[float], list[float]]:
    """Poll every 0.2 s until every process has exited: when log i first held a line matching lines[i] and when
    process i exited (time.monotonic(); inf for what did not happen within `timeout`)."""
    seen, ended = [float("inf")] * len(procs), [float("inf")] * len(procs)
    deadline = time.monotonic() + timeout
    while True:
        for i, (proc, log, line) in enumerate(zip(procs, logs, lines)):
            if seen[i] == float("inf") and re.search(line, log.read_text(errors="replace")):
                seen[i] = time.monotonic()
            if ended[i] == float("inf") and proc.poll() is not None:
                ended[i] = time.monotonic()
        if time.monotonic() > deadline or all(t < float("inf") for t in ended):
            return seen, ended
        time.sleep(0.2)


def test_a_cut_link_stops_the_survivor_naming_the_lost_host_and_a_relaunch_resumes(tmp_path: Path) -> None:
    """Rank 1 pauses before step 5 (tests/helpers/dist_points.py `pause`) while rank 0 waits for it in that step's
    all-reduce; then node1's cable is pulled. Rank 0 stops within dist.timeout_s + 15 s with one line naming
    rank 1 on node1; rank 1, cut off, names the rendezvous host; the torchrun agent on each host exits within
    10 s of its rank's line (measured 1.5 s: nothing in the static rendezvous's agent waits on the store once its
    workers have ended). With the cable back, the same command on both hosts resumes from the step-3 checkpoint
    and ends bitwise where one process with the same micro-batches ends."""
    args = ["train.max_steps=8", "train.ckpt_every=3", "dist.zero_stage=0", "dist.timeout_s=20"]
    reference = tmp_path / "single16"
    ok(train(1, reference, *args, "dist.micro_batch=16"))
    run, mark = tmp_path / "run", tmp_path / "paused"
    logs = [tmp_path / f"cut{i}.log" for i in range(2)]
    with Hosts(tmp_path, 2) as hosts:
        commands = [torchrun(hosts, i, run, *args) for i in range(2)]
        env = {**_env(), "DVP_PAUSE_MARK": str(mark), "DVP_PAUSE_S": "40"}
        procs = [hosts.popen(i, paused(cmd, 5), logs[i], env=env, cwd=ROOT) for i, cmd in enumerate(commands)]
        wait_for_mark(mark, procs[0], logs[0])
        hosts.link(1, up=False)
        cut = time.monotonic()
        lines = [rf"error: rank 0 on node0 lost rank 1 on node1 \({hosts.ips[1]}\): .*dist.timeout_s=20",
                 r"error: rank 1 on node1 lost rank 0 on node0 .*the rendezvous host"]
        seen, ended = watch(procs, logs, lines, timeout=180)
        texts = [log.read_text(errors="replace")[-3000:] for log in logs]
        assert seen[0] - cut < 20 + 15 and seen[1] < float("inf"), (seen, cut, texts)
        for i in range(2):
            assert procs[i].returncode != 0 and ended[i] - seen[i] < 10, (i, ended[i] - seen[i], texts[i])
        assert load_checkpoint(run / "checkpoints" / "last.pt")["loop"]["step"] == 3
        hosts.link(1, up=True)
        (tmp_path / "resume").mkdir()
        results = run_on_all(hosts, commands, tmp_path / "resume")
    for code, out in results:
        assert code == 0, out[-4000:]
    assert "resumed at step 3" in results[0][1]
    assert bitwise(run, reference)
    assert [r["step"] for r in records(run)] == [r["step"] for r in records(reference)]   # each step once


def test_mpiexec_over_ssh_on_two_hosts_trains_the_one_process_model(reference: Path, tmp_path: Path) -> None:
    """docs/distributed.md's mpiexec command, with Open MPI starting the rank on node1 over SSH (an sshd per host):
    ranks from OMPI_COMM_WORLD_*, bitwise the one-process model."""
    run = tmp_path / "run"
    with Hosts(tmp_path, 2) as hosts, hosts.sshd() as key:
        assert hosts.run(0, ["ssh", "-i", str(key), *SSH, "root@node1", "hostname"]).stdout.strip() == "node1"
        out = hosts.run(0, mpiexec(key, run, *STEPS), timeout=600, env=_env(), cwd=ROOT)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "DeepSpeedEngine x 2" in out.stdout
    assert f"rank 0 node0 ({hosts.ips[0]}), rank 1 node1 ({hosts.ips[1]})" in out.stdout
    assert bitwise(run, reference)


def test_mpiexec_ends_the_job_within_45_s_of_a_pulled_cable(tmp_path: Path) -> None:
    """docs/distributed.md's mpiexec command; rank 1 pauses before step 1 while rank 0 waits for it, and node1's cable
    is pulled. Open MPI's keepalive options (probes after 10 s idle, 3 every 5 s) make mpiexec declare node1's daemon
    lost and end the job within 45 s (measured 27 s; without them it waited until the link came back), with its
    message naming node1, long before dist.timeout_s=120 would let rank 0 give up."""
    run, mark, log = tmp_path / "run", tmp_path / "paused", tmp_path / "mpiexec.log"
    env = {**_env(), "DVP_PAUSE_MARK": str(mark), "DVP_PAUSE_S": "150"}
    with Hosts(tmp_path, 2) as hosts, hosts.sshd() as key:
        command = mpiexec(key, run, "train.max_steps=4", "dist.zero_stage=0", "dist.timeout_s=120",
                          exports=("DVP_PAUSE_MARK", "DVP_PAUSE_S"))
        proc = hosts.popen(0, paused(command, 1), log, env=env, cwd=ROOT)
        wait_for_mark(mark, proc, log)
        hosts.link(1, up=False)
        cut = time.monotonic()
        _, [ended] = watch([proc], [log], ["ORTE has lost communication"], timeout=120)
        text = log.read_text(errors="replace")
    assert ended - cut < 45 and proc.returncode != 0, (ended - cut, text[-3000:])
    assert re.search(r"ORTE has lost communication with a remote daemon.*Remote daemon: .* on node node1", text,
                     re.DOTALL), text[-3000:]


@pytest.fixture
def short() -> Iterator[Path]:
    """A folder straight under /tmp that other users can enter (munged runs as munge; pytest's are private)."""
    path = Path(tempfile.mkdtemp(prefix="dvpm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_slurm_job_on_two_slurmd_hosts_trains_one_model_and_a_usr1_requeue_resumes_exactly(
        short: Path) -> None:
    """cluster/slurm/train.sbatch with --nodes=2: slurmctld on node0, a slurmd on each host; one DeepSpeed
    task per node (the master is the first host of the node list). USR1 mid-run (Slurm's time-limit warning)
    saves, requeues and resumes; the job ends bitwise where one process with the same micro-batches ends."""
    args = [*COMMON, "train.max_steps=120", "dist.zero_stage=0"]
    reference = short / "single16"
    ok(subprocess.run([sys.executable, "-m", "dvp.train", *args, "dist.micro_batch=16", f"run_dir={reference}"],
                      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600))
    work, run = short / "work", short / "run"
    work.mkdir()
    with Hosts(short, 2) as hosts, hosts.slurm() as slurm:
        job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                            str(ROOT / "cluster/slurm/train.sbatch"), *args, f"run_dir={run}"], cwd=work,
                           env={**_env(), "DVP_PYTHON": sys.executable})
        wait_for(lambda: (run / "metrics.jsonl").exists() and any(
            r["split"] == "train" and r["step"] >= 20 for r in read_metrics(run / "metrics.jsonl")), 300,
            "step 20 of the 2-node job")
        assert slurm.run(["scancel", "--signal=USR1", job]).returncode == 0
        slurm.wait_state(job, {"PENDING"}, 120)
        slurm.release(job)
        info = slurm.wait_done(job, 300)
        out = (work / f"dvp-train-{job}.out").read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-4000:] + slurm.logs()
    assert "2 tasks on node[0-1]" in out and "DeepSpeedEngine x 2" in out, out[-4000:]
    assert out.count(f"hosts: rank 0 node0 ({hosts.ips[0]}), rank 1 node1 ({hosts.ips[1]})") == 2, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed at step" in line]
    assert resumed and 20 <= int(resumed[0].rsplit(" ", 1)[1]) < 120, out[-4000:]
    assert bitwise(run, reference)
    assert [r["step"] for r in records(run)] == [r["step"] for r in records(reference)]   # each step once
