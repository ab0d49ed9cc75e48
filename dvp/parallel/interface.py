"""Which network interface a multi-host job talks over, and who its peers are.

gloo (and NCCL's bootstrap) advertise the address this host's own name resolves to, unless GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME name an interface. On a host with several interfaces (a cluster network and a management or
storage network) the name can resolve to one the other hosts cannot reach, and the job hangs at its first
collective. `choose_interface` sets both variables, where they are unset, to the interface through which this
host reaches the other hosts: toward the rendezvous address (MASTER_ADDR), which every rank has just reached,
or, on the master's own host, toward the other ranks' addresses published in the rendezvous store.

    iface = choose_interface("node0", 29500, store, rank, world_size, 120)   # Interface('eth0', '10.1.0.2', True)

Under Ray, whose Train workers join their process group before any dvp code runs, every worker process takes the
interface of its node's Ray address instead (`use_interface_of`, from `dvp.tune.node.setup_process`).
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from dvp.core.errors import ConfigError

if TYPE_CHECKING:                       # torch is not imported for the interface alone (Ray's setup hook)
    import torch.distributed as dist

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Interface:
    """The interface the collectives use: its name and IPv4 address, and whether dvp chose it (False: the
    user's GLOO_SOCKET_IFNAME)."""
    name: str
    address: str
    chosen: bool

    def describe(self) -> str:
        why = "toward the other hosts" if self.chosen else "from GLOO_SOCKET_IFNAME"
        return f"{self.name} ({self.address}, {why})"


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface `name`, or None (no such interface, or no IPv4 address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def route_source(address: str, port: int) -> str:
    """The local IPv4 address this host's routing table uses to reach `address` (nothing is sent)."""
    target = socket.getaddrinfo(address, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, port))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the interface that holds local IPv4 `address`."""
    return next((name for _, name in socket.if_nameindex() if interface_address(name) == address), None)


def is_local(address: str) -> bool:
    """`address` (an IPv4 address) belongs to this host: loopback or one of its interfaces."""
    return address.startswith("127.") or interface_of(address) is not None


def choose_interface(master_addr: str, master_port: int, store: dist.Store, rank: int, world_size: int,
                     timeout_s: float) -> Interface | None:
    """Export GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (each where unset) as this host's interface toward the
    other hosts of the job; the interface in use, or None where it cannot be told (no route: the rendezvous
    fails with its own message). A GLOO_SOCKET_IFNAME already set is honoured and reported; one that names no
    interface of this host is a ConfigError.

    A rank on another host than MASTER_ADDR takes the interface its route to MASTER_ADDR leaves by. A rank on
    the master's own host cannot tell from that route (MASTER_ADDR may resolve there to any of its addresses),
    so every rank publishes its route's source address in the rendezvous `store`, and a rank on the master's
    host takes the interface toward the first rank on another host (none: every rank is on this host, and the
    route to MASTER_ADDR is right)."""
    given = os.environ.get("GLOO_SOCKET_IFNAME")
    try:
        master_ip = socket.getaddrinfo(master_addr, master_port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
        source: str | None = route_source(master_ip, master_port)
    except OSError:
        master_ip, source = "", None
    store.set(f"dvp/route/{rank}", source or "")
    if given:
        return _given(given)
    if source is None:
        return None
    if is_local(master_ip):
        keys = [f"dvp/route/{r}" for r in range(world_size)]
        store.wait(keys, timedelta(seconds=timeout_s))
        remote = next((a for a in (store.get(k).decode() for k in keys) if a and not is_local(a)), None)
        if remote is not None:
            source = route_source(remote, master_port)
    return use_interface_of(source)


def use_interface_of(address: str) -> Interface | None:
    """Export GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (each where unset) as the interface that holds the local
    IPv4 `address` (the source of the route toward the other hosts, or a Ray node's address: what the other
    nodes reach this one at); that interface, or None where none holds it."""
    name = interface_of(address)
    if name is None:
        return None
    for var in IFNAME_VARS:
        os.environ.setdefault(var, name)
    return Interface(name, address, chosen=True)


def current_interface() -> Interface | None:
    """The interface GLOO_SOCKET_IFNAME names (set by the user, or by `use_interface_of` in a Ray worker), or None
    where it is unset: for a process group that another library made (Ray Train)."""
    given = os.environ.get("GLOO_SOCKET_IFNAME")
    return _given(given) if given else None


def _given(value: str) -> Interface:
    """The interface GLOO_SOCKET_IFNAME names (its first, when it lists several), checked to exist here."""
    names = value.split(",")
    unknown = [n for n in names if interface_address(n) is None]
    if unknown:
        have = ", ".join(n for _, n in socket.if_nameindex() if interface_address(n))
        raise ConfigError(f"GLOO_SOCKET_IFNAME={value}: {unknown[0]} is not an interface with an IPv4 address on "
                          f"{socket.gethostname()} (it has {have}); name one of those, or unset it to use the one "
                          f"toward the other hosts")
    return Interface(names[0], str(interface_address(names[0])), chosen=False)
