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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dvp.core.errors import USER_ERRORS, ConfigError
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

    def close(self) -> None:
        """Destroy the process group if `init` created it (one that Ray Train made is left to Ray)."""
        if self._owns_group and dist.is_initialized():
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
        return DistContext(env.rank, env.local_rank, env.world_size, device, dist.get_backend())
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    except dist.DistError as exc:
        raise ConfigError(_rendezvous_message(env, timeout_s, str(exc))) from None
    return DistContext(env.rank, env.local_rank, env.world_size, device, backend, _owns_group=True)


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
