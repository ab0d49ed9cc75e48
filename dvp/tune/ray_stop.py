"""`python -m dvp.tune.ray_stop [TEMP_DIR] [--grace S]`: stop the Ray processes of one Ray instance on this node,
the one whose temp folder (RAY_TMPDIR or --temp-dir) is TEMP_DIR (default: $RAY_TMPDIR), and nothing else.

`ray stop` ends every Ray process on the host, whoever started it; on a shared node (two Slurm jobs, a test next
to a cluster) that kills the neighbours' Rays too. This finds one instance's processes by its temp folder: in the
command line (gcs_server, raylet, dashboard and agents get --log-dir/--session-dir under it) or as an open file
under it (`ray start --block`, and `ray::` workers, which rename themselves but keep their log files open). It
sends SIGTERM, then SIGKILL to what is left after the grace period; this process and its ancestors are spared.
Used by cluster/slurm/sweep.sbatch at the end of a sweep, with the folder in RAY_TMPDIR: a folder given on the
command line is also in the command line of whatever started this (srun, a shell), which would then match.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _uses(proc: Path, folder: str) -> bool:
    """Whether the process names `folder` in its command line or holds a file open under it."""
    try:
        if folder in (proc / "cmdline").read_bytes().decode(errors="replace"):
            return True
        return any(os.readlink(fd) == folder or os.readlink(fd).startswith(folder + "/")
                   for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def ray_processes(temp_dir: str) -> list[int]:
    """PIDs of the live processes of the Ray instance whose temp folder is `temp_dir`."""
    folder = os.path.realpath(temp_dir).rstrip("/")
    spared = _ancestors()
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) not in spared and alive(int(p.name)) and _uses(p, folder)]


def terminate(pids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM the processes, SIGKILL those alive after `grace` seconds; returns those still alive after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.1)
        pids = [p for p in pids if alive(p)]
        if not pids:
            break
    return pids


def stop_ray(temp_dir: str, grace: float = 10.0) -> int:
    """Terminate the instance's processes (and any it started meanwhile); returns how many would not die."""
    left = terminate(ray_processes(temp_dir), grace)
    return len(terminate(sorted(set(left + ray_processes(temp_dir))), grace))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvp.tune.ray_stop", description=__doc__.split("\n\n")[0])
    parser.add_argument("temp_dir", nargs="?", default=os.environ.get("RAY_TMPDIR"),
                        help="the Ray instance's temp folder (its RAY_TMPDIR or --temp-dir; default $RAY_TMPDIR)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    if not args.temp_dir:
        parser.error("give the Ray instance's temp folder, or set RAY_TMPDIR")
    if not os.path.isdir(args.temp_dir):
        print(f"ray_stop: {args.temp_dir} is not a folder: no Ray instance uses it", file=sys.stderr)
        return 0
    left = stop_ray(args.temp_dir, args.grace)
    print(f"ray_stop: stopped the Ray processes of {args.temp_dir}" + (f" ({left} would not die)" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
