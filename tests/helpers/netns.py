"""Separate hosts on this one machine, made of Linux namespaces, for the tests marked `multinode`.

Each host is a network namespace (its own interfaces, IP, routes and ports) entered together with a UTS namespace
(its own hostname) and a mount namespace (/etc/netns/<ns>/hosts bind-mounted over /etc/hosts, so every host
resolves every other by name; `Hosts(private_tmp=True)` also mounts a private /tmp, `Hosts(local=[folder])` a
host's own copy over each folder, which is then node-local: the rest of /tmp, with a checkout there, stays shared).
The hosts share the file system otherwise: the checkout and its venv are the same path on every host, like an
NFS home. They are joined by veth pairs on one bridge that lives in a namespace of its own: nothing is added to
the machine's own network stack, so no traffic leaves the namespaces the harness creates.

    with Hosts(tmp_path, 2) as hosts:               # hosts.names == ["node0", "node1"], hosts.ips[i]
        p = hosts.popen(1, [sys.executable, "-m", "dvp.train", ...], log=tmp_path / "node1.log")
        hosts.run(0, ["hostname"]).stdout           # 'node0'
        hosts.link(1, up=False)                     # cut node1's cable (its veth's end at the switch)
        with hosts.sshd() as key:                   # sshd on port 22 of every host, one key for all
            hosts.run(0, ["ssh", "-i", str(key), "root@node1", "hostname"])

Everything is named after a random tag (namespaces dvp<tag>-sw, dvp<tag>-0, ...) and removed by name on exit,
after every process still inside a host's namespace (`ip netns pids`) has been killed by PID: also when the test
fails. Needs root (CI runs the mark as root).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from helpers.clusters import Slurm, Sshd

NETNS_ETC = Path("/etc/netns")
ENTER = ('hostname "$0" && mount --bind "$1" /etc/hosts && { [ -z "$DVP_HOST_TMP" ] || mount --bind "$DVP_HOST_TMP" '
         '/tmp; } && for pair in $DVP_HOST_LOCAL; do mount --bind "${pair%%=*}" "${pair#*=}" || exit 1; done && '
         'shift && exec "$@"')
"""The shell run inside a host's namespaces before the command: set the hostname, mount the host's /etc/hosts,
its private /tmp and its own copy of each node-local folder. (Not `ip netns exec`: it also remounts /sys, hiding
the cgroup file system slurmd needs.)"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


class Hosts:
    """`n` hosts node0 .. node{n-1} at 10.<a>.<b>.1 .. n on one bridge (a /24 picked from the tag).

    Each host in `trap` gets a second interface, eth1 (10.<a>.<b+1>.i/24, one end of a veth pair whose other end
    stays on the host: a network no other host reaches), and its own name resolves to that eth1 address on it:
    a host whose hostname resolves to an interface the job cannot use (gloo advertises that address)."""

    def __init__(self, base: Path, n: int, private_tmp: bool = False, trap: tuple[int, ...] = (),
                 local: tuple[Path, ...] = ()) -> None:
        if n < 2:
            raise ValueError("a cluster of namespaces needs at least 2 hosts")
        if any(" " in str(p) or "=" in str(p) for p in local):
            raise ValueError(f"node-local folders {local}: no spaces or '=' in their paths")
        self.base, self.n, self.private_tmp, self.local = base, n, private_tmp, local
        self.tag = secrets.token_hex(3)
        octets = int(self.tag, 16)
        self.net = f"10.{100 + octets % 100}.{2 * (octets // 100 % 100)}"
        self.net1 = f"10.{100 + octets % 100}.{2 * (octets // 100 % 100) + 1}"
        self.trap = trap
        self.names = [f"node{i}" for i in range(n)]
        self.ips = [f"{self.net}.{i + 1}" for i in range(n)]
        self.ips1 = [f"{self.net1}.{i + 1}" for i in range(n)]
        self.namespaces = [f"dvp{self.tag}-{i}" for i in range(n)]
        self.switch = f"dvp{self.tag}-sw"
        self._procs: list[subprocess.Popen] = []

    # ---- set-up and tear-down -----------------------------------------------------------------------------
    def __enter__(self) -> Hosts:
        if os.geteuid() != 0:
            raise AssertionError("network namespaces need root; run the multinode tests as root (as CI does)")
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            inside, port = f"v{self.tag}{i}", self.port(i)
            ip("link", "add", inside, "type", "veth", "peer", "name", port)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", port, "netns", self.switch)
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "link", "set", inside, "name", "eth0")
            ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            if i in self.trap:
                ip("-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-end")
                ip("-n", ns, "addr", "add", f"{self.ips1[i]}/24", "dev", "eth1")
                ip("-n", ns, "link", "set", "eth1-end", "up")
                ip("-n", ns, "link", "set", "eth1", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self._hosts_file(i))
            if self.private_tmp:
                (self.base / f"{self.names[i]}-tmp").mkdir(parents=True, exist_ok=True)
            for k, folder in enumerate(self.local):
                folder.mkdir(parents=True, exist_ok=True)
                self.local_copy(i, k).mkdir(parents=True, exist_ok=True)

    def _hosts_file(self, i: int) -> str:
        lines = ["127.0.0.1 localhost"]
        for j, name in enumerate(self.names):
            own_trap = j == i and i in self.trap
            lines.append(f"{self.ips1[j] if own_trap else self.ips[j]} {name}")
        return "\n".join(lines) + "\n"

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            _kill_group(proc)
        for ns in self.namespaces:
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in [*self.namespaces, self.switch]:
            ip("netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

    # ---- running commands on a host -----------------------------------------------------------------------
    def command(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` as run on host i: in its network, UTS and mount namespaces (whatever environment it is given:
        slurmd and sshd are started through this too)."""
        local = " ".join(f"{self.local_copy(i, k)}={p}" for k, p in enumerate(self.local))
        tmp = str(self.base / f"{self.names[i]}-tmp") if self.private_tmp else ""
        return ["env", f"DVP_HOST_TMP={tmp}", f"DVP_HOST_LOCAL={local}",
                "nsenter", f"--net=/run/netns/{self.namespaces[i]}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", ENTER, self.names[i],
                str(NETNS_ETC / self.namespaces[i] / "hosts"), *cmd]

    def local_copy(self, i: int, k: int) -> Path:
        """Host i's own copy of node-local folder k (what it sees at local[k])."""
        return self.base / f"{self.names[i]}-local{k}"

    def run(self, i: int, cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, **kwargs)

    def popen(self, i: int, cmd: list[str], log: Path, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """`cmd` started on host i in its own process group, stdout and stderr to `log`; killed on exit."""
        with log.open("ab") as out:
            proc = subprocess.Popen(self.command(i, cmd), stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    @contextmanager
    def sshd(self) -> Iterator[Path]:
        """An sshd on port 22 of every host (as root, HOME=<base>/<host>-home) that lets in one key on all of
        them; yields that key's path (ssh -i KEY root@node1). Stopped by PID on exit."""
        with ExitStack() as stack:
            daemons = []
            for i, name in enumerate(self.names):
                home = self.base / f"{name}-home"
                home.mkdir(parents=True, exist_ok=True)
                daemons.append(stack.enter_context(Sshd(self.base / f"{name}-ssh", home, listen=self.ips[i],
                                                        port=22, wrap=partial(self.command, i))))
            keys = "".join(Path(f"{d.key}.pub").read_text() for d in daemons)
            for d in daemons:
                (d.base / "authorized_keys").write_text(keys)
            yield daemons[0].key

    def slurm(self, nodes: int | None = None) -> Slurm:
        """A Slurm cluster of the first `nodes` hosts (default all): slurmctld on node0, a slurmd on each
        (NodeName = its hostname, NodeAddr = its IP); clients (sbatch, squeue) run on node0. Use as a context
        manager."""
        n = nodes or self.n
        return Slurm(self.base / "slurm", nodes=list(zip(self.names[:n], self.ips[:n])), wrap=self.command)

    # ---- the network --------------------------------------------------------------------------------------
    def port(self, i: int) -> str:
        """The switch's end of host i's cable (its eth0)."""
        return f"v{self.tag}{i}p"

    def link(self, i: int, up: bool) -> None:
        """Plug host i's cable in or out at the switch: the host keeps its address, its packets go nowhere."""
        ip("-n", self.switch, "link", "set", self.port(i), "up" if up else "down")


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.1)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
