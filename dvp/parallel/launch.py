"""The launch environment -> rank, local rank, world size and master address (`LaunchEnv`).

`detect` is a pure function of the environment that the command layer passes in (os.environ); the process
group and device are dvp.parallel.context's `init`:

    ctx = init(detect(os.environ))

Two more pure functions of the environment: `gpu_request` (whether the launch asked for a GPU: CUDA_VISIBLE_DEVICES,
Slurm's GPU variables) and `nccl_error_settings` (the NCCL error handling to export where the user has not).

Launch commands, and the variables `detect` reads for each:

    python -m dvp.train ...
        single: rank 0 of 1, no process group
    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_endpoint host0:29500 -m dvp.train ...
        torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
        told apart by TORCHELASTIC_RUN_ID
    deepspeed --hostfile hosts --module dvp.train ...
        deepspeed: the same names, LOCAL_SIZE for the local world size; told apart by CROSS_RANK
    srun --nodes 2 --ntasks-per-node 2 python -m dvp.train ...
        slurm: SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID,
        SLURM_STEP_TASKS_PER_NODE; master = the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST),
        port = MASTER_PORT or 20000 + SLURM_JOB_ID % 20000 (export MASTER_PORT when two multi-task steps of
        one job run at the same time)
    mpiexec -n 4 -x MASTER_ADDR=host0 python -m dvp.train ...
        openmpi: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
    mpiexec -n 4 -genv MASTER_ADDR host0 python -m dvp.train ...
        mpich (Hydra, Intel MPI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID or PMI_LOCAL_RANK,
        MPI_LOCALNRANKS or PMI_LOCAL_SIZE
    a Ray Train TorchTrainer worker
        ray: the torchrun names, set by Ray; told apart by RAY_RAYLET_PID. Ray has already created the
        process group: `init` joins it and leaves it to Ray.

MPI ranks all on one node (local size == world size) use MASTER_ADDR=127.0.0.1; across nodes MASTER_ADDR must
be given. MASTER_PORT defaults to 29500 except under Slurm.

Precedence, first match wins (a launcher started inside another sees both sets of variables):
  1. RANK or WORLD_SIZE set: the explicit torch variables win (srun or mpiexec running torchrun, RANK set
     inside an MPI job, Ray on Slurm): torchrun if TORCHELASTIC_RUN_ID is set, else deepspeed if CROSS_RANK,
     else ray if RAY_RAYLET_PID, else torchrun.
  2. OMPI_COMM_WORLD_RANK or _SIZE set: openmpi (under mpiexec in sbatch, ranks inherit the shell's SLURM_*).
  3. PMI_RANK or PMI_SIZE set: mpich.
  4. SLURM_STEP_NUM_TASKS (else SLURM_NTASKS) above 1: slurm. A step or `sbatch` shell of one task is single.
  5. Otherwise single.
A half-set or inconsistent environment is a one-line `ConfigError` naming the variable and the fix.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dvp.core.errors import ConfigError

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm", "openmpi", "mpich", "ray")
DEFAULT_PORT = 29500
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher describes it."""
    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int | None
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class _Names:
    """The variables one launcher keeps its numbers in; of each tuple the first one present is read."""
    rank: tuple[str, ...]
    world_size: tuple[str, ...]
    local_rank: tuple[str, ...]
    local_world_size: tuple[str, ...]
    start: str  # how the processes should have been started, for the messages


_TORCH = _Names(("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"),
                "set RANK, WORLD_SIZE and LOCAL_RANK together or none (torchrun and the deepspeed launcher "
                "set all three)")
_OPENMPI = _Names(("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
                  ("OMPI_COMM_WORLD_LOCAL_SIZE",), "start the processes with Open MPI's mpiexec")
_MPICH = _Names(("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
                ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"), "start the processes with MPICH's mpiexec")
_SLURM = _Names(("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), ("SLURM_LOCALID",), (),
                "start one process per task with `srun python ...` (not directly in the sbatch/salloc shell)")
_SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The first of `names` that is set, or None."""
    return next((name for name in names if name in environ), None)


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    """The integer in variable `name`, at least `minimum`."""
    text = environ[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer: fix or unset it") from None
    if value < minimum:
        rule = "is negative: ranks count from 0" if minimum == 0 else f"must be at least {minimum}"
        raise ConfigError(f"{name}={value} {rule}")
    return value


def _numbers(environ: Mapping[str, str], names: _Names) -> tuple[int, int, int, int | None]:
    """(rank, world size, local rank, local world size or None), read and cross-checked."""
    rank_var, world_var = _first(environ, names.rank), _first(environ, names.world_size)
    if rank_var is None or world_var is None:
        present, missing = (rank_var, names.world_size) if world_var is None else (world_var, names.rank)
        raise ConfigError(f"{present}={environ[present]} is set but {missing[0]} is not: {names.start}")
    rank, world = _int(environ, rank_var), _int(environ, world_var, minimum=1)
    if rank >= world:
        raise ConfigError(f"{rank_var}={rank} is not below {world_var}={world}: ranks run from 0 to "
                          f"{world - 1}")
    local_var = _first(environ, names.local_rank)
    local_world_var = _first(environ, names.local_world_size)
    if local_var is None and world > 1:
        raise ConfigError(f"{world_var}={world} but {names.local_rank[0]} (this process's index on its node, "
                          f"it picks the device) is not set: {names.start}")
    local_rank = 0 if local_var is None else _int(environ, local_var)
    local_world = None if local_world_var is None else _int(environ, local_world_var, minimum=1)
    if local_world is not None:
        _check_local(local_var or names.local_rank[0], local_rank, str(local_world_var), local_world,
                     world_var, world)
    return rank, world, local_rank, local_world


def _check_local(local_var: str, local_rank: int, local_world_var: str, local_world: int, world_var: str,
                 world: int) -> None:
    """The local rank is below the local world size, which is at most the world size."""
    if local_rank >= local_world:
        raise ConfigError(f"{local_var}={local_rank} is not below {local_world_var}={local_world}: local "
                          f"ranks run from 0 to {local_world - 1}")
    if local_world > world:
        raise ConfigError(f"{local_world_var}={local_world} exceeds {world_var}={world}: a node cannot hold "
                          "more processes than the job")


def _port(environ: Mapping[str, str], default: int = DEFAULT_PORT) -> int:
    """MASTER_PORT, or `default` when unset."""
    if "MASTER_PORT" not in environ:
        return default
    port = _int(environ, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise ConfigError(f"MASTER_PORT={port} is not a TCP port: choose one in 1..65535 that is free on "
                          "rank 0's host")
    return port


def _torch_style(environ: Mapping[str, str]) -> LaunchEnv:
    """torchrun, the deepspeed launcher and Ray Train: the torch.distributed variables themselves."""
    rank, world, local_rank, local_world = _numbers(environ, _TORCH)
    master = environ.get("MASTER_ADDR", "").strip()
    if not master and world > 1:
        raise ConfigError(f"MASTER_ADDR is not set but WORLD_SIZE={world}: set it to the host name or "
                          "address of rank 0 (torchrun and the deepspeed launcher set it)")
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "CROSS_RANK" in environ:
        launcher = "deepspeed"
    else:
        launcher = "ray" if "RAY_RAYLET_PID" in environ else "torchrun"
    return LaunchEnv(launcher, rank, local_rank, world, local_world, master or LOCALHOST, _port(environ))


def _mpi(environ: Mapping[str, str], launcher: str, names: _Names, flag: str) -> LaunchEnv:
    """Open MPI or MPICH/Hydra: ranks from the MPI variables; across nodes MASTER_ADDR must be given."""
    rank, world, local_rank, local_world = _numbers(environ, names)
    master = environ.get("MASTER_ADDR", "").strip()
    if not master:
        if world > 1 and local_world != world:
            spread = ("cannot tell whether all ranks share one node" if local_world is None
                      else f"{names.local_world_size[0]}={local_world} < {names.world_size[0]}={world}")
            raise ConfigError(f"MASTER_ADDR is not set and {spread}: pass rank 0's host to every rank, e.g. "
                              f"mpiexec {flag} ...")
        master = LOCALHOST
    return LaunchEnv(launcher, rank, local_rank, world, local_world, master, _port(environ))


def _slurm(environ: Mapping[str, str]) -> LaunchEnv:
    """An `srun` step of several tasks: SLURM_* ranks, the step's first host as master."""
    rank, world, local_rank, _ = _numbers(environ, _SLURM)
    local_world = _slurm_tasks_per_node(environ)
    if local_world is not None:
        _check_local("SLURM_LOCALID", local_rank, "SLURM_STEP_TASKS_PER_NODE", local_world,
                     str(_first(environ, _SLURM.world_size)), world)
    master = environ.get("MASTER_ADDR", "").strip() or _slurm_first_host(environ)
    if "MASTER_PORT" in environ:
        port = _port(environ)
    elif "SLURM_JOB_ID" in environ:
        port = 20000 + _int(environ, "SLURM_JOB_ID") % 20000
    else:
        raise ConfigError("MASTER_PORT is not set and neither is SLURM_JOB_ID, so the ranks cannot agree "
                          "on a port: export MASTER_PORT before srun")
    return LaunchEnv("slurm", rank, local_rank, world, local_world, master, port)


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int | None:
    """The tasks per node of the step when every node has the same number (SLURM_STEP_TASKS_PER_NODE such as
    '2(x3)' or '2,2'), else None."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE")
    if text is None:
        return None
    counts = set()
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(\(x\d+\))?", part.strip())
        if match is None:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={text!r} is not a Slurm task count list like "
                              "'2(x3),1': unset it")
        counts.add(int(match[1]))
    return counts.pop() if len(counts) == 1 else None


def _slurm_first_host(environ: Mapping[str, str]) -> str:
    """The first host of the step's (else the job's) node list."""
    name = _first(environ, _SLURM_NODELISTS)
    if name is None:
        raise ConfigError("SLURM_JOB_NODELIST is not set and neither is MASTER_ADDR: set MASTER_ADDR to the "
                          "host of rank 0")
    try:
        return expand_hostlist(environ[name])[0]
    except ValueError as exc:
        raise ConfigError(f"{name}={environ[name]!r} is not a Slurm host list ({exc}): set MASTER_ADDR to "
                          "the host of rank 0") from None


_HOST = re.compile(r"(?P<head>[^,\[\]]+)(?:\[(?P<ranges>[^\[\]]+)\](?P<tail>[^,\[\]]*))?")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: 'node[01-03,7],gpu5' -> node01 node02 node03 node7
    gpu5. Forms: 'a', 'a,b', 'a[1-3]', 'a[01-03,7]' (zero padding kept), 'rack1-node[1-2]', 'a[1-2]-ib'.
    Raises ValueError saying where the text stops making sense."""
    hosts: list[str] = []
    pos = 0
    while True:
        match = _HOST.match(text, pos)
        if match is None:
            raise ValueError(f"no host name at character {pos}")
        hosts += _expand_one(match["head"], match["ranges"], match["tail"] or "")
        pos = match.end()
        if pos == len(text):
            return hosts
        if text[pos] != ",":
            raise ValueError(f"unexpected {text[pos]!r} at character {pos}")
        pos += 1


def _expand_one(head: str, ranges: str | None, tail: str) -> list[str]:
    """One host-list term: 'node' + '01-03,7' + '' -> node01 node02 node03 node7."""
    if ranges is None:
        return [head]
    hosts = []
    for part in ranges.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"bad range {part!r} in [{ranges}]")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ValueError(f"range {part!r} runs backwards")
        hosts += [f"{head}{n:0{len(match[1])}d}{tail}" for n in range(low, high + 1)]
    return hosts


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    """The number of tasks of the Slurm step (0 outside Slurm)."""
    name = _first(environ, _SLURM.world_size)
    return 0 if name is None else _int(environ, name)


def detect(environ: Mapping[str, str]) -> LaunchEnv:
    """The launch environment described by `environ` (e.g. os.environ), by the precedence in the module doc.
    Pure: reads only `environ`; raises ConfigError for a half-set or inconsistent environment."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torch_style(environ)
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        return _mpi(environ, "openmpi", _OPENMPI, "-x MASTER_ADDR=host0")
    if "PMI_RANK" in environ or "PMI_SIZE" in environ:
        return _mpi(environ, "mpich", _MPICH, "-genv MASTER_ADDR host0")
    if _slurm_tasks(environ) > 1:
        return _slurm(environ)
    return LaunchEnv("single", 0, 0, 1, 1, LOCALHOST, DEFAULT_PORT)


NCCL_BLOCKING_WAIT = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")   # torch reads the first one set


def nccl_error_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The NCCL error-handling variables to export before an NCCL process group is made, each where the user
    (`environ`) has not set it: so that a collective a lost rank never joins raises a Python exception
    (DistBackendError) in the calling thread after dist.timeout_s, which dvp turns into its one line naming the
    lost rank, instead of an abort from torch's C++ watchdog thread (torch 2.14, ProcessGroupNCCL.hpp):

    TORCH_NCCL_BLOCKING_WAIT=1   `wait()` on a collective blocks the calling thread until the collective ends
        or the group's timeout passes, then aborts the communicators and raises there. No watchdog thread (and
        no heartbeat monitor) is created, so nothing aborts the process from C++: the one line holds. Cost: the
        host waits for each collective (no host/GPU overlap across one). TORCH_NCCL_BLOCKING_WAIT=0 set by the
        user keeps the watchdog instead, and a lost rank then ends the process with its C++ trace.
    Not set, as they act only through the watchdog, which blocking wait does not start:
    TORCH_NCCL_ASYNC_ERROR_HANDLING (the watchdog's action on an error: 3, tear the process down, by default;
    torchrun exports 1), TORCH_NCCL_DUMP_ON_TIMEOUT and TORCH_NCCL_TRACE_BUFFER_SIZE (the watchdog's flight
    recorder dump), TORCH_NCCL_ENABLE_MONITORING and TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC (its heartbeat monitor)."""
    if any(name in environ for name in NCCL_BLOCKING_WAIT):
        return {}
    return {"TORCH_NCCL_BLOCKING_WAIT": "1"}


SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")
SLURM_GPU_IDS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
NO_DEVICES = ("", "NoDevFiles", "-1")
"""CUDA_VISIBLE_DEVICES values that hide every GPU (Slurm sets NoDevFiles in a job without GPUs)."""


def gpu_request(environ: Mapping[str, str]) -> str | None:
    """What in the launch environment asks this process for a GPU, as 'NAME=value', or None: a CUDA_VISIBLE_DEVICES
    that names devices, or Slurm GPUs (a count such as SLURM_GPUS_ON_NODE=4 or SLURM_GPUS_PER_NODE=a100:8 above
    0, or a GPU id list such as SLURM_JOB_GPUS=0,1). DS_ACCELERATOR=cpu chooses the CPU: no request."""
    if environ.get("DS_ACCELERATOR", "").strip() == "cpu":
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in NO_DEVICES:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in SLURM_GPU_COUNTS + SLURM_GPU_IDS:
        value = environ.get(name, "").strip()
        count = len(value.split(",")) if name in SLURM_GPU_IDS else _slurm_gpu_count(value)
        if value and value not in NO_DEVICES and count > 0:
            return f"{name}={value}"
    return None


def _slurm_gpu_count(value: str) -> int:
    """The number in a Slurm GPU count: '4', 'a100:4', 'gpu:a100:4' -> 4; anything else -> 0."""
    match = re.fullmatch(r"(?:[\w.-]+:)*(\d+)", value)
    return int(match[1]) if match else 0
