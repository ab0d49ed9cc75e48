"""Launched processes (real torchrun, real gloo): the first lines of a 2-process run name both ranks' devices and
each host's own interface once, and the join and the collectives have their own timeouts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("OMPI_", "PMI"))}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"} | extra


def test_two_ranks_name_both_devices_and_each_host_logs_its_own_line_once(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_port()), "-m", "dvp.train", "train.max_steps=2", "train.final_eval=false",
                           "wandb.mode=disabled", "model.num_ch=8", "train.batch_size=32", "train.ckpt_every=0",
                           f"run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("run_dir="))
    assert lines[first + 1] == "devices: ranks 0-1 cpu gloo fp32", lines
    hosts = [line for line in lines if line.startswith("host ")]
    assert hosts == [f"host {socket.gethostname()}: rank 0 of 2 talks over lo (127.0.0.1, toward the other hosts)"]


TIMEOUTS = """
import json, os, torch, torch.distributed as dist
from dvp.core.errors import ConfigError
from dvp.parallel.context import init
from dvp.parallel.launch import detect
try:
    ctx = init(detect(os.environ), timeout_s=600, rendezvous_timeout_s=float(os.environ["JOIN_S"]))
except ConfigError as exc:
    raise SystemExit(f"ConfigError: {exc}")
c10d = dist.distributed_c10d
group = c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
print(json.dumps({"group": group.total_seconds(), "later": c10d.default_pg_timeout.total_seconds(),
                  "store": c10d._get_default_store().timeout.total_seconds()}))
ctx.close()
"""


def _ranks(n: int, port: int, join_s: float) -> list[subprocess.Popen]:
    procs = []
    for rank in range(n):
        variables = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "JOIN_S": str(join_s)}
        procs.append(subprocess.Popen([sys.executable, "-c", TIMEOUTS], cwd=ROOT, env=_env(**variables),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_the_join_has_its_own_bound_and_every_collective_after_it_waits_timeout_s() -> None:
    for proc in _ranks(2, _port(), 60):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"group": 600.0, "later": 600.0, "store": 600.0}
    start = time.monotonic()
    [lonely] = _ranks(1, _port(), 2)                  # rank 0 of 2 alone: rank 1 never comes
    _, err = lonely.communicate(timeout=120)
    assert lonely.returncode == 1 and "timed out after 2 s: only 1 of WORLD_SIZE=2 processes joined" in err, err
    assert time.monotonic() - start < 30                        # 2 s, not timeout_s=600, + start-up
