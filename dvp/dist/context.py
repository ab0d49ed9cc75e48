"""The distributed context of a launch: join the process group (none at world size 1), pick the device through
DeepSpeed's accelerator abstraction, and give the loop its collectives.

    ctx = init(detect(os.environ))        # ctx.rank, .local_rank, .world_size, .device, .backend, .is_main
    total = ctx.all_reduce_sum(loss_sum)  # summed over ranks in place (the tensor lives on ctx.device)
    cfg = ctx.broadcast_object(cfg)       # rank 0's value everywhere
    ctx.barrier(); ctx.close()

`detect` (dvp.dist.launch) reads the launcher's variables; `init` exports the torch names that DeepSpeed reads.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dvp.core.errors import USER_ERRORS, ConfigError
from dvp.dist.interface import Interface, choose_interface
from dvp.dist.launch import LaunchEnv

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in the job and the collectives the training loop needs. At world size 1 every
    collective is the identity and torch.distributed is never touched."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    _owns_group: bool = field(default=False, repr=False)
    interface: Interface | None = None
    hosts: list[tuple[str, str]] = field(default_factory=list)   # (hostname, address) of every rank, by rank
    _broken: bool = field(default=False, repr=False)              # a peer was lost: the group is not used again

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes consolidated files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all ranks, in place, and returned (`t` must live on `device`)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 only (a check or a choice that touches the file system), its result or its
        user error given to every rank: so a bad input stops all ranks with the same line, never a hang."""
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except USER_ERRORS as e:
                outcome = (type(e).__name__, str(e))
        kind, value = self.broadcast_object(outcome)
        if kind != "ok":
            raise next(c for c in USER_ERRORS if c.__name__ == kind)(value)
        return value

    def agree_max(self, *values: float) -> list[float]:
        """Each value's maximum over the ranks, in one all-reduce: how ranks agree on a stop (a flag set on any
        rank, the number of the signal one rank received)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def where(self) -> str:
        """Where the ranks run, for the log: 'rank 0 node0 (10.0.0.1), rank 1 node1 (10.0.0.2) over eth0 (...)',
        or 'N ranks on HOST' when they share one host."""
        names = {name for name, _ in self.hosts}
        if len(names) <= 1:
            return f"{self.world_size} ranks on {next(iter(names), socket.gethostname())}"
        ranks = ", ".join(f"rank {r} {name} ({addr})" for r, (name, addr) in enumerate(self.hosts))
        return ranks + (f" over {self.interface.describe()}" if self.interface else "")

    def lost_ranks(self, wait_s: float = 5.0) -> list[int] | None:
        """After a collective failed: the ranks that do not answer a roll-call through the rendezvous store within
        `wait_s` (every survivor calls this as its own collective fails), or None when the store itself does not
        answer in time: then what this rank lost is the rendezvous host, rank 0's. The roll-call runs in a
        thread, since a store call on a dead link can block for minutes; the process group is not used again."""
        self._broken = True
        answer: list[list[int]] = []

        def roll_call() -> None:
            try:
                store = dist.distributed_c10d._get_default_store()
                store.set_timeout(timedelta(seconds=wait_s))
                store.set(f"dvp/roll-call/{self.rank}", "here")
                end = time.monotonic() + wait_s
                while True:
                    missing = [r for r in range(self.world_size) if not store.check([f"dvp/roll-call/{r}"])]
                    if not missing or time.monotonic() > end:
                        answer.append(missing)
                        return
                    time.sleep(0.2)
            except (RuntimeError, AttributeError, ValueError):
                return

        thread = threading.Thread(target=roll_call, daemon=True)
        thread.start()
        thread.join(wait_s + 3)
        return answer[0] if answer else None

    def lost_peers(self) -> str:
        """Who stopped answering, for the one-line error: 'rank 1 on node1 (10.0.0.2)'."""
        lost = self.lost_ranks()
        if lost is None:
            lost, how = [0], " (the rendezvous host: its store does not answer)"
        else:
            how = ""
        if not lost:
            return "no rank (every rank answers the roll-call: a collective timed out on a slow link?)"
        names = [f"rank {r} on {self.hosts[r][0]} ({self.hosts[r][1]})" if r < len(self.hosts) else f"rank {r}"
                 for r in lost]
        return ", ".join(names) + how

    def close(self) -> None:
        """Destroy the process group if `init` created it (one that Ray Train made is left to Ray; one that lost
        a peer is left to the process's exit: destroying it would wait on the dead link)."""
        if self._owns_group and dist.is_initialized() and not self._broken:
            dist.destroy_process_group()
        self._owns_group = False


def _accelerator() -> Any:
    """DeepSpeed's accelerator (GPU, CPU, XPU, ...), imported lazily: importing deepspeed takes seconds."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoCpuFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoCpuFallbackNotice())
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


class _NoCpuFallbackNotice(logging.Filter):
    """Drops DeepSpeed's 'Setting accelerator to CPU' warning (printed on stdout at import): on a machine
    without a GPU the CPU is the expected choice, and a command prints nothing before its own first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def accelerator_rng_state() -> torch.Tensor:
    """This process's accelerator RNG state (the CPU's on a machine without one)."""
    return _accelerator().get_rng_state()


def set_accelerator_rng_state(state: torch.Tensor) -> None:
    _accelerator().set_rng_state(state)


def _device(local_rank: int) -> torch.device:
    """This local rank's accelerator device, made current; the CPU when DeepSpeed finds no accelerator. With
    fewer visible devices than local ranks (e.g. one per Slurm task) local ranks wrap around them."""
    accelerator = _accelerator()
    if accelerator.device_name() == "cpu":  # (device_count() would probe NUMA nodes with numactl)
        return torch.device("cpu")
    index = local_rank % max(accelerator.device_count(), 1)
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def init(env: LaunchEnv, backend: str | None = None, timeout_s: float = 120) -> DistContext:
    """The distributed context for `env`: the accelerator device of this local rank (made current), and at
    world size > 1 the default process group (gloo on CPU, the accelerator's backend such as nccl otherwise,
    unless `backend` is given), joined within `timeout_s` or a ConfigError naming the rendezvous address."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s} must be positive")
    device = _device(env.local_rank)
    backend = backend or ("gloo" if device.type == "cpu" else _accelerator().communication_backend_name())
    if env.world_size == 1:
        return DistContext(env.rank, env.local_rank, 1, device, backend)
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),  # deepspeed reads them
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if dist.is_initialized():
        _check_existing_group(env)
        ctx = DistContext(env.rank, env.local_rank, env.world_size, device, dist.get_backend())
        ctx.hosts = _gather_hosts(ctx)
        return ctx
    timeout, interface = timedelta(seconds=timeout_s), None
    try:
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        store.set_timeout(timeout)
        interface = choose_interface(env.master_addr, env.master_port, store, env.rank, env.world_size, timeout_s)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    except (dist.DistError, RuntimeError) as exc:
        if not isinstance(exc, dist.DistError) and "connectFullMesh" not in str(exc):
            raise
        over = f" (this rank talks over {interface.describe()})" if interface else ""
        raise ConfigError(_rendezvous_message(env, timeout_s, str(exc)) + over) from None
    _later_groups_wait(timeout)
    ctx = DistContext(env.rank, env.local_rank, env.world_size, device, backend, _owns_group=True,
                      interface=interface)
    ctx.hosts = _gather_hosts(ctx)
    return ctx


def _later_groups_wait(timeout: timedelta) -> None:
    """Make `timeout` the default of the process groups created after this one. DeepSpeed reduces gradients in
    groups of its own (`new_group` without a timeout), which torch gives its default of 30 minutes: a host lost
    mid-step would hold the survivors that long. torch reads the default from these module variables."""
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _gather_hosts(ctx: DistContext) -> list[tuple[str, str]]:
    """(hostname, address the collectives use) of every rank, by rank: one all-gather at start-up."""
    here = (socket.gethostname(), ctx.interface.address if ctx.interface else "?")
    hosts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(hosts, here)
    return [tuple(h) for h in hosts]


def deepspeed_environment(ctx: DistContext) -> None:
    """DeepSpeed reads RANK, LOCAL_RANK and WORLD_SIZE from the environment even in one process (at init and
    during steps): in one process they are exported as 0, local rank, 1 (a consistent single launch), with a
    private one-process group (no network); `init` exported them already for a multi-process job."""
    if ctx.world_size > 1:
        return
    if not dist.is_initialized():
        dist.init_process_group(ctx.backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.update(RANK="0", LOCAL_RANK=str(ctx.local_rank), WORLD_SIZE="1")


def _check_existing_group(env: LaunchEnv) -> None:
    """A process group made before `init` (Ray Train makes one) agrees with the environment."""
    if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise ConfigError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                          f"{dist.get_world_size()} but the {env.launcher} environment says rank {env.rank} "
                          f"of {env.world_size}: launch with one launcher only")


def _rendezvous_message(env: LaunchEnv, timeout_s: float, error: str) -> str:
    """One line saying why joining the process group at the master address failed and what to check."""
    where = f"rendezvous at {env.master_addr}:{env.master_port} (MASTER_ADDR:MASTER_PORT)"
    if "connectFullMesh" in error:
        return (f"the {env.world_size} ranks met at {env.master_addr}:{env.master_port} but rank {env.rank} could "
                f"not connect to the others within {timeout_s:g} s: an address they advertised is not reachable; "
                "set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME) to the cluster network's interface on every host, "
                "or unset them to let dvp choose")
    joined = re.search(r"(\d+)/(\d+) clients joined", error)
    if joined:
        missing = int(joined[2]) - int(joined[1])
        return (f"{where} timed out after {timeout_s:g} s: only {joined[1]} of WORLD_SIZE={env.world_size} "
                f"processes joined rank 0, {missing} missing; start all {env.world_size} with the same "
                "MASTER_ADDR/MASTER_PORT, or raise the timeout")
    if "connect" in error and "timed out" in error:
        return (f"{where} timed out after {timeout_s:g} s on rank {env.rank}: nothing answered there; start "
                "rank 0 too, and check that MASTER_ADDR/MASTER_PORT name rank 0's host and port")
    if "timed out" in error or "timeout" in error:
        return (f"{where} timed out after {timeout_s:g} s on rank {env.rank}: not all {env.world_size} "
                "processes arrived; start every rank with the same MASTER_ADDR/MASTER_PORT")
    first_line = error.strip().splitlines()[0] if error.strip() else "no reason given"
    return (f"{where} failed on rank {env.rank}: {first_line}; choose another MASTER_PORT or check "
            "MASTER_ADDR")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a master or a dashboard started right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
