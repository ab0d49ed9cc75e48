"""Real cluster daemons for the tests marked `cluster`, on this one machine: a single-node Slurm (munged, slurmctld,
slurmd from Debian's slurm-wlm and munge) and a private sshd on 127.0.0.1 for Ray's cluster launcher (`local`
provider). Each binds to 127.0.0.1 on free ports, keeps every file under its own folder, and is stopped by the PIDs
it started (never by name); every wait is bounded. Needs root (the daemons run as root, munged as the munge user),
as in CI.

    with Slurm(base) as slurm:                   # SLURM_CONF in slurm.env; sbatch/squeue through slurm.run
        job = slurm.sbatch(["cluster/slurm/train.sbatch", ...])
        slurm.wait_done(job)
    with Sshd(base) as sshd:                     # ssh root@127.0.0.1 -p sshd.port -i sshd.key
        ...
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvp.parallel.context import free_port
from dvp.tune.ray_stop import terminate

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def missing(programs: list[str]) -> list[str]:
    return [p for p in programs if shutil.which(p) is None and not Path(p).exists()]


def kill_pid_file(path: Path, timeout: float = 10.0) -> None:
    """SIGTERM the process whose PID the file holds, SIGKILL after `timeout`."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    terminate([pid], timeout)


# ---- Slurm ----------------------------------------------------------------------------------------------------
SLURM_CONF = """\
ClusterName=dvptest
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
{comm}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory=1024 State=UNKNOWN"
SLURM_PROGRAMS = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "squeue", "scontrol"]


Wrap = Callable[[int, list[str]], list[str]]
"""wrap(i, command): the command that runs `command` on node i (identity on this machine's own network)."""


class Slurm:
    """A Slurm cluster under `base` (AuthInfo cred_expire=10 shortens the requeue hold): by default one node, this
    machine on 127.0.0.1; else `nodes` = [(name, address), ...], a slurmd per node started through `wrap` (on
    the hosts of tests/helpers/netns.py), slurmctld and every client command on node 0. One munged serves them all
    through its socket file."""

    def __init__(self, base: Path, nodes: list[tuple[str, str]] | None = None, wrap: Wrap | None = None) -> None:
        self.base = base
        self.env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
        self.nodes = nodes or [(socket.gethostname().split(".")[0], "127.0.0.1")]
        self.wrap: Wrap = wrap or (lambda i, command: command)
        # on this machine's own network slurmd binds the address its name resolves to (ports free on 127.0.0.1
        # although another Slurm may hold them elsewhere); a host of its own listens on all its addresses, as a
        # default slurmd does, whatever its own name resolves to there
        self.comm = "" if wrap else "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"

    def __enter__(self) -> Slurm:
        if os.geteuid() != 0:
            raise AssertionError("the Slurm tests start slurmctld and slurmd as root; run them as root (as CI does)")
        if gone := missing(SLURM_PROGRAMS):
            raise AssertionError(f"{', '.join(gone)} not found: apt-get install slurm-wlm munge (.ci/run does)")
        b = self.base
        for d in ("state", "spool", "log", "munge"):
            (b / d).mkdir(parents=True, exist_ok=True)
        for d in (b.parent, b):                         # the munge user must reach its folder
            d.chmod(d.stat().st_mode | 0o755)
        munge = pwd.getpwnam("munge")
        os.chown(b / "munge", munge.pw_uid, munge.pw_gid)
        for name, _ in self.nodes:
            (b / "spool" / name).mkdir(parents=True, exist_ok=True)
        (b / "slurm.conf").write_text(SLURM_CONF.format(
            ctld_host=self.nodes[0][0], ctld_addr=self.nodes[0][1], base=b, ctld_port=free_port(), comm=self.comm,
            slurmd_port=free_port(), node_names=",".join(n for n, _ in self.nodes),
            node_lines="\n".join(NODE_LINE.format(name=n, addr=a, cpus=os.cpu_count()) for n, a in self.nodes)))
        try:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={b}/munge/munge.socket",
                            f"--pid-file={b}/munge/munged.pid", f"--log-file={b}/munge/munged.log",
                            f"--seed-file={b}/munge/seed"], check=True, timeout=30)
            subprocess.run(self.wrap(0, ["/usr/sbin/slurmctld", "-f", str(b / "slurm.conf")]), env=self.env,
                           check=True, timeout=30)
            for i, (name, _) in enumerate(self.nodes):
                subprocess.run(self.wrap(i, ["/usr/sbin/slurmd", "-f", str(b / "slurm.conf"), "-N", name]),
                               env=self.env, check=True, timeout=30)
            wait_for(self.idle, 60, "every node idle in sinfo")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if (self.base / "slurmctld.pid").exists():
                self.run(["scancel", "--partition=debug"])
                wait_for(lambda: not self.run(["squeue", "-h"]).stdout.strip(), 60, "an empty queue")
        finally:
            for pid_file in [*(f"slurmd-{name}.pid" for name, _ in self.nodes), "slurmctld.pid",
                             "munge/munged.pid"]:
                kill_pid_file(self.base / pid_file)

    def idle(self) -> bool:
        states = self.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return len(states) == len(self.nodes) and set(states) == {"idle"}

    def run(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(0, command), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(self.wrap(0, ["sbatch", "--parsable", *args]), cwd=cwd,
                             env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {key: value} (JobState, ExitCode, Restarts, ...); {} once forgotten."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        return wait_for(lambda: (s := self.state(job_id)) in states and s, timeout,
                        f"job {job_id} in {sorted(states)}")

    def release(self, job_id: str) -> None:
        """Start a requeued (PENDING) job now instead of after the requeue hold (cred_expire + 1 s). Not at once:
        slurmd revoked the job's credential when it was requeued and refuses a credential dated no later than the
        revocation, in whole seconds (the likely cause of the restarts that ended FAILED without any output, 2
        of ~10 runs before this wait; none in 5 since); and the node must have finished its previous run."""
        time.sleep(2)
        wait_for(self.idle, 60, "the nodes idle")
        out = self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        assert out.returncode == 0, out.stderr

    def logs(self, lines: int = 30) -> str:
        """The last lines of slurmctld's and slurmd's logs (for a failure message)."""
        text = ""
        for name in ["slurmctld", *(f"slurmd-{n}" for n, _ in self.nodes)]:
            path = self.base / "log" / f"{name}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            text += f"\n--- {name}.log\n" + "\n".join(tail)
        return text

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        self.wait_state(job_id, DONE, timeout)
        return self.job(job_id)


# ---- sshd -----------------------------------------------------------------------------------------------------
SSHD_CONFIG = """\
ListenAddress {listen}
Port {port}
HostKey {base}/host_ed25519
PidFile {base}/sshd.pid
AuthorizedKeysFile {base}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
SetEnv HOME={home}
"""


class Sshd:
    """A private sshd on `listen`:`port` (127.0.0.1 and a free port unless given) that lets in the key `key` as
    this user, with HOME=`home`. `wrap` turns the daemon's command into the one that starts it (on a host of
    tests/helpers/netns.py: `lambda cmd: hosts.command(i, cmd)`)."""

    def __init__(self, base: Path, home: Path, listen: str = "127.0.0.1", port: int | None = None,
                 wrap: Callable[[list[str]], list[str]] = list) -> None:
        self.base, self.home, self.listen, self.wrap = base, home, listen, wrap
        self.port = port or free_port()
        self.key = base / "id_ed25519"

    def __enter__(self) -> Sshd:
        if gone := missing(["/usr/sbin/sshd", "ssh-keygen", "rsync", "nc"]):
            raise AssertionError(f"{', '.join(gone)} not found: apt-get install openssh-server rsync netcat-openbsd "
                                 "(.ci/run does)")
        b = self.base
        b.mkdir(parents=True, exist_ok=True)
        for key in (b / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        shutil.copy(f"{self.key}.pub", b / "authorized_keys")
        (b / "sshd_config").write_text(SSHD_CONFIG.format(listen=self.listen, port=self.port, base=b,
                                                          home=self.home))
        Path("/run/sshd").mkdir(exist_ok=True)          # sshd's privilege-separation folder
        subprocess.run(self.wrap(["/usr/sbin/sshd", "-f", str(b / "sshd_config")]), check=True, timeout=30)
        wait_for(lambda: (b / "sshd.pid").exists(), 10, "sshd's pid file")
        return self

    def __exit__(self, *exc: object) -> None:
        """The listener and its sessions (a client's ControlPersist connection outlives the commands by 10 s)."""
        try:
            pid = int((self.base / "sshd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        terminate([pid, *descendants(pid)])


def descendants(pid: int) -> list[int]:
    """The PIDs of a process's children, their children, ..."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found
