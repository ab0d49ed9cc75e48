"""The distributed context of a launch: join the process group (none at world size 1), pick the device through
DeepSpeed's accelerator abstraction, and give the loop its collectives.

    ctx = init(detect(os.environ))        # ctx.rank, .local_rank, .world_size, .device, .backend, .is_main
    ctx = init(env, device="cpu")         # dist.device: auto | cpu | cuda
    total = ctx.all_reduce_sum(loss_sum)  # summed over ranks in place (the tensor lives on ctx.device)
    cfg = ctx.broadcast_object(cfg)       # rank 0's value everywhere
    ctx.barrier(); ctx.close()

`detect` (dvp.parallel.launch) reads the launcher's variables; `init` exports the torch names that DeepSpeed reads.

Device: one index for dvp and DeepSpeed (`device_index`; LOCAL_RANK is exported as it, since DeepSpeed takes its
device from LOCAL_RANK). No silent CPU: when a GPU is asked for (dist.device=cuda, a GPU that Ray assigned, a
CUDA_VISIBLE_DEVICES naming devices or Slurm GPUs) and CUDA cannot be used, `init` stops with a ConfigError naming
what asked and what was found, before any compute; every rank's device is in `DistContext.devices`.
Timeouts: the join waits at most the rendezvous timeout, every collective after it `timeout_s` (a lost rank then
raises in every survivor; on NCCL through blocking wait, `dvp.parallel.launch.nccl_error_settings`).
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
from dvp.parallel.interface import Interface, choose_interface, current_interface
from dvp.parallel.launch import LaunchEnv, gpu_request, nccl_error_settings

T = TypeVar("T")
DEVICES = ("auto", "cpu", "cuda")
"""dist.device: auto (a GPU where one is asked for or DeepSpeed finds one, else the CPU), cpu (even on a GPU
host), cuda (a GPU or a ConfigError)."""
COLLECTIVE_TIMEOUT_S = 600.0
"""dist.timeout_s's default: how long a collective waits for the other ranks."""
RENDEZVOUS_TIMEOUT_S = 120.0
"""The join's bound when dist.rendezvous_timeout_s is null (never more than the collectives' timeout)."""


@dataclass(frozen=True)
class AssignedGpu:
    """A GPU that a scheduler gave this process (Ray Train): who gave it, in words ('Ray assigned GPU 3'), and its
    index among the devices CUDA_VISIBLE_DEVICES shows."""
    by: str
    index: int


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
    devices: list[str] = field(default_factory=list)              # every rank's device ('cuda:0 (NVIDIA H100)')
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

    def where(self) -> str:
        """Where the ranks run, for the log: 'rank 0 node0 (10.0.0.1), rank 1 node1 (10.0.0.2) over eth0 (...)',
        or 'N ranks on HOST' when they share one host."""
        names = {name for name, _ in self.hosts}
        if len(names) <= 1:
            return f"{self.world_size} ranks on {next(iter(names), socket.gethostname())}"
        ranks = ", ".join(f"rank {r} {name} ({addr})" for r, (name, addr) in enumerate(self.hosts))
        return ranks + (f" over {self.interface.describe()}" if self.interface else "")

    def devices_line(self, precision: str) -> str:
        """Every rank's device, backend and precision, for the first lines of a run: 'devices: rank 0 cuda:0
        (NVIDIA H100) nccl bf16, rank 1 cuda:1 (NVIDIA H100) nccl bf16', or 'devices: ranks 0-3 cpu gloo fp32'
        when they are all the same."""
        each = [f"{device} {self.backend} {precision}" for device in self.devices]
        if len(set(each)) == 1:
            ranks = "rank 0" if len(each) == 1 else f"ranks 0-{len(each) - 1}"
            return f"devices: {ranks} {each[0]}"
        return "devices: " + ", ".join(f"rank {r} {text}" for r, text in enumerate(each))

    def host_line(self) -> str:
        """This host's own line, logged by its first rank (local rank 0): 'host node1: rank 2 of 4 talks over eth0
        (10.0.0.2, toward the other hosts)'; so every host's interface choice is in a log."""
        name, address = self.hosts[self.rank] if self.rank < len(self.hosts) else (socket.gethostname(), "?")
        over = self.interface.describe() if self.interface else f"the address its name resolves to ({address})"
        return f"host {name}: rank {self.rank} of {self.world_size} talks over {over}"

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


def _accelerator(quiet: bool = True) -> Any:
    """DeepSpeed's accelerator (GPU, CPU, XPU, ...), imported lazily: importing deepspeed takes seconds. `quiet`:
    without DeepSpeed's 'Setting accelerator to CPU' warning (when nothing asked for a GPU)."""
    logger = logging.getLogger("DeepSpeed")
    notices = [f for f in logger.filters if isinstance(f, _NoCpuFallbackNotice)]
    if not quiet:
        for notice in notices:
            logger.removeFilter(notice)
    elif not notices:
        logger.addFilter(_NoCpuFallbackNotice())
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


class _NoCpuFallbackNotice(logging.Filter):
    """Drops DeepSpeed's 'Setting accelerator to CPU' warning (printed on stdout at import): on a machine
    without a GPU, where nothing asked for one, the CPU is the expected choice, and a command prints nothing
    before its own first line. Never installed when a GPU was asked for (see `_device`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def accelerator_rng_state() -> torch.Tensor:
    """This process's accelerator RNG state (the CPU's on a machine without one)."""
    return _accelerator().get_rng_state()


def set_accelerator_rng_state(state: torch.Tensor) -> None:
    _accelerator().set_rng_state(state)


def device_index(local_rank: int, local_world_size: int | None, visible: int, assigned: int | None = None) -> int:
    """The index, among the `visible` CUDA devices, of this local rank's GPU (DeepSpeed is given the same one):
    `assigned` when a scheduler chose it (Ray Train: its GPU's place in CUDA_VISIBLE_DEVICES); 0 when one device
    is visible (one GPU per task: srun --gpus-per-task=1, --gpu-bind, cgroups, an MPI wrapper: every local rank
    sees its own GPU as device 0); else the local rank, each local rank having a device of its own. More local
    ranks (`local_world_size`, else at least local_rank + 1) than visible devices is a ConfigError: two ranks on
    one GPU fail in NCCL (ranks that see one device each, the same one, are found at the join: `shared_gpu`)."""
    if assigned is not None:
        if not 0 <= assigned < visible:
            raise ConfigError(f"the GPU assigned to this process is device {assigned} but CUDA_VISIBLE_DEVICES "
                              f"shows {visible}: leave CUDA_VISIBLE_DEVICES to the scheduler (Ray sets it)")
        return assigned
    if visible == 1:
        return 0
    ranks = local_world_size or local_rank + 1
    if ranks > visible:
        raise ConfigError(f"{ranks} processes on this host (the local world size) but CUDA_VISIBLE_DEVICES shows "
                          f"{visible} GPUs: two ranks would share a GPU, which NCCL refuses; start one process per "
                          f"GPU (torchrun --nproc_per_node {visible}, srun --ntasks-per-node={visible}) or give "
                          "each process its own GPU (srun --gpus-per-task=1)")
    return local_rank


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU in this process (the driver's own words where it gives them), or None."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"torch {torch.__version__} is built without CUDA (a CPU-only wheel)"
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as exc:
        said = str(exc).strip()
        return f"CUDA does not start: {said.splitlines()[0] if said else type(exc).__name__}"
    if torch.cuda.device_count() == 0:
        return "torch sees no CUDA device"
    return None


def _device(env: LaunchEnv, choice: str, assigned: AssignedGpu | None) -> torch.device:
    """This rank's device, made current: the CPU for dist.device=cpu (DeepSpeed's accelerator too) or where nothing
    asks for a GPU and DeepSpeed finds none; else the CUDA device `device_index` picks. A GPU that is asked for
    (dist.device=cuda, `assigned`, or the launch environment's `gpu_request`) but cannot be used is a ConfigError
    naming what asked and what was found."""
    if choice not in DEVICES:
        raise ConfigError(f"dist.device={choice!r}; choose one of {', '.join(DEVICES)}")
    if choice == "cpu":
        _use_cpu_accelerator()
        return torch.device("cpu")
    asked = "dist.device=cuda" if choice == "cuda" else assigned.by if assigned else gpu_request(os.environ)
    problem = cuda_problem() if asked else None
    if problem:
        raise ConfigError(f"{asked} asks for a GPU but {problem}: fix the GPU setup (nvidia-smi shows the driver; "
                          "pip install a CUDA build of torch), or train on the CPU with dist.device=cpu")
    accelerator = _accelerator(quiet=asked is None)
    if accelerator.device_name() == "cpu":  # (device_count() would probe NUMA nodes with numactl)
        if asked:
            why = f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}" if "DS_ACCELERATOR" in os.environ else \
                "it detected no CUDA device"
            raise ConfigError(f"{asked} asks for a GPU but DeepSpeed's accelerator is the CPU ({why}): unset "
                              "DS_ACCELERATOR, or train on the CPU with dist.device=cpu")
        return torch.device("cpu")
    index = device_index(env.local_rank, env.local_world_size, accelerator.device_count(),
                         assigned.index if assigned else None)
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def _use_cpu_accelerator() -> None:
    """dist.device=cpu: DeepSpeed's accelerator is the CPU too, on a GPU host as well (DS_ACCELERATOR=cpu before
    DeepSpeed chooses one, `set_accelerator` where it has chosen already)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    if _accelerator().device_name() != "cpu":
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
        set_accelerator(CPU_Accelerator())


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def init(env: LaunchEnv, backend: str | None = None, timeout_s: float = COLLECTIVE_TIMEOUT_S,
         rendezvous_timeout_s: float | None = None, device: str = "auto",
         assigned: AssignedGpu | None = None) -> DistContext:
    """The distributed context for `env`: this rank's device (`device`: dist.device; `assigned`: a GPU that a
    scheduler gave this process), made current, and at world size > 1 the default process group (gloo on CPU,
    the accelerator's backend such as nccl otherwise, unless `backend` is given), joined within
    `rendezvous_timeout_s` (None: the smaller of `timeout_s` and RENDEZVOUS_TIMEOUT_S) or a ConfigError naming
    the rendezvous address; every collective after the join waits `timeout_s`."""
    join_s = min(timeout_s, RENDEZVOUS_TIMEOUT_S) if rendezvous_timeout_s is None else rendezvous_timeout_s
    for name, value in (("timeout_s", timeout_s), ("rendezvous_timeout_s", join_s)):
        if value <= 0:
            raise ConfigError(f"{name}={value} must be positive")
    here = _device(env, device, assigned)
    backend = backend or ("gloo" if here.type == "cpu" else _accelerator().communication_backend_name())
    if env.world_size == 1:
        return DistContext(env.rank, env.local_rank, 1, here, backend, devices=[describe_device(here)])
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),  # deepspeed reads them
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size))
    _export_device_rank(_deepspeed_local_rank(here, env.local_rank))
    timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized():
        _check_existing_group(env)
        _collectives_wait(timeout)
        ctx = DistContext(env.rank, env.local_rank, env.world_size, here, dist.get_backend(),
                          interface=current_interface())
        _gather(ctx)
        return ctx
    if backend == "nccl":
        os.environ.update(nccl_error_settings(os.environ))
    interface = None
    try:
        join = timedelta(seconds=join_s)
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=join))
        store.set_timeout(join)
        interface = choose_interface(env.master_addr, env.master_port, store, env.rank, env.world_size, join_s)
        if here.type == "cuda":
            _one_rank_per_gpu(store, env.rank, env.world_size, here, join)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                                world_size=env.world_size, timeout=join)
    except (dist.DistError, RuntimeError) as exc:
        if not isinstance(exc, dist.DistError) and "connectFullMesh" not in str(exc):
            raise
        over = f" (this rank talks over {interface.describe()})" if interface else ""
        raise ConfigError(_rendezvous_message(env, join_s, str(exc)) + over) from None
    store.set_timeout(timeout)
    _collectives_wait(timeout)
    ctx = DistContext(env.rank, env.local_rank, env.world_size, here, backend, _owns_group=True,
                      interface=interface)
    _gather(ctx)
    return ctx


def _one_rank_per_gpu(store: dist.Store, rank: int, world_size: int, device: torch.device,
                      timeout: timedelta) -> None:
    """Every rank publishes its host and GPU (by UUID) in the rendezvous store, and every rank stops with the same
    ConfigError when two share one GPU (a device index cannot tell: one visible device is device 0 for each rank,
    whether each task was given its own GPU or all see the same one), before NCCL, which would fail there."""
    mine = f"{socket.gethostname()} GPU {torch.cuda.get_device_properties(device).uuid}"
    store.set(f"dvp/gpu/{rank}", mine)
    keys = [f"dvp/gpu/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    shared = shared_gpu([store.get(key).decode() for key in keys])
    if shared:
        (a, b), where = shared
        raise ConfigError(f"ranks {a} and {b} run on one GPU ({where}): every rank needs a GPU of its own (NCCL "
                          f"refuses two on one); start as many processes per host as it has GPUs, or give each its "
                          "own (srun --gpus-per-task=1)")


def shared_gpu(owners: list[str]) -> tuple[tuple[int, int], str] | None:
    """The first two ranks whose GPU (host and UUID, by rank in `owners`) is the same, with that GPU; or None."""
    first: dict[str, int] = {}
    for rank, owner in enumerate(owners):
        if owner in first:
            return (first[owner], rank), owner
        first[owner] = rank
    return None


def _deepspeed_local_rank(device: torch.device, local_rank: int) -> int:
    """The LOCAL_RANK DeepSpeed is given: the index of this rank's GPU (DeepSpeed's engine calls
    set_device(LOCAL_RANK), ZeRO-3 places parameters on device LOCAL_RANK); the launcher's local rank on CPU."""
    return local_rank if device.index is None else device.index


def _export_device_rank(index: int) -> None:
    """Export LOCAL_RANK as `index`; under Open MPI, OMPI_COMM_WORLD_LOCAL_RANK too, which DeepSpeed asserts
    equal to LOCAL_RANK (DistContext.local_rank keeps the launcher's local rank)."""
    os.environ["LOCAL_RANK"] = str(index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)


def _collectives_wait(timeout: timedelta) -> None:
    """Make `timeout` the wait of every collective from now on: of the default group (joined within the
    rendezvous timeout, or made by Ray Train with its own) and the default of the groups created after it.
    DeepSpeed reduces gradients in groups of its own (`new_group` without a timeout), which torch gives its
    default of 30 minutes: a host lost mid-step would hold the survivors that long. torch reads the default from
    these module variables."""
    c10d = dist.distributed_c10d
    (getattr(dist, "set_timeout", None) or c10d._set_pg_timeout)(timeout)   # older torch: the private one
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _gather(ctx: DistContext) -> None:
    """Every rank's (hostname, address the collectives use) into `ctx.hosts` and device into `ctx.devices`, by
    rank: one all-gather at start-up."""
    here = (socket.gethostname(), ctx.interface.address if ctx.interface else "?", describe_device(ctx.device))
    ranks: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(ranks, here)
    ctx.hosts = [(name, address) for name, address, _ in ranks]
    ctx.devices = [device for _, _, device in ranks]


def deepspeed_environment(ctx: DistContext) -> None:
    """DeepSpeed reads RANK, LOCAL_RANK and WORLD_SIZE from the environment even in one process (at init and
    during steps): in one process they are exported as 0, the device's index (the local rank on CPU), 1 (a
    consistent single launch), with a private one-process group (no network); `init` exported them already for a
    multi-process job."""
    if ctx.world_size > 1:
        return
    if not dist.is_initialized():
        dist.init_process_group(ctx.backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.update(RANK="0", WORLD_SIZE="1")
    _export_device_rank(_deepspeed_local_rank(ctx.device, ctx.local_rank))


def _check_existing_group(env: LaunchEnv) -> None:
    """A process group made before `init` (Ray Train makes one) agrees with the environment."""
    if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise ConfigError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                          f"{dist.get_world_size()} but the {env.launcher} environment says rank {env.rank} "
                          f"of {env.world_size}: launch with one launcher only")


def _rendezvous_message(env: LaunchEnv, timeout_s: float, error: str) -> str:
    """One line saying why joining the process group at the master address failed and what to check (under
    torchrun, which sets MASTER_ADDR itself, the torchrun option that decides it)."""
    torchrun = env.launcher == "torchrun"
    source = ("MASTER_ADDR:MASTER_PORT, set by torchrun: the host of --rdzv-endpoint, or with --rdzv-backend c10d the "
              "--local-addr (default: the host name) of the host whose agent became rank 0" if torchrun
              else "MASTER_ADDR:MASTER_PORT")
    where = f"rendezvous at {env.master_addr}:{env.master_port} ({source})"
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
                "MASTER_ADDR/MASTER_PORT, or raise dist.rendezvous_timeout_s")
    if "connect" in error and "timed out" in error:
        try:
            address = socket.gethostbyname(env.master_addr)
            resolved = "" if address == env.master_addr else f" ({env.master_addr} is {address} from this host)"
        except OSError:
            resolved = f" ({env.master_addr} does not resolve on this host)"
        check = ("give torchrun an address of rank 0's host that every host reaches: in --rdzv-endpoint, or with "
                 "--rdzv-backend c10d as --local-addr on every host" if torchrun
                 else "check that MASTER_ADDR/MASTER_PORT name rank 0's host and port")
        return (f"{where} timed out after {timeout_s:g} s on rank {env.rank}: nothing answered there{resolved}; "
                f"start rank 0 too, and {check}")
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
