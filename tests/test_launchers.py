"""The launchers' own arguments: the `--local_rank=N` that the deepspeed launcher puts before dvp's arguments is
accepted and checked against the environment (pure logic, in-process), and docs/distributed.md's `deepspeed
--module dvp.train` command trains on 2 CPU processes with the real launcher (marked `distributed`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.docs import documented_command
from test_distributed import COMMON, ROOT, _env, _port, flat, ok, train, weights

import dvp.cli.eval
from dvp.cli.common import without_local_rank
from dvp.core.errors import ConfigError
from dvp.train.checkpoint import load_checkpoint

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))   # the launcher's script, next to this python
DEEPSPEED_RANK_1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}   # what the deepspeed launcher sets


@pytest.mark.parametrize("argv,environ,left", [
    (["--local_rank=1", "train.lr=0.01"], DEEPSPEED_RANK_1, ["train.lr=0.01"]),
    (["--local_rank", "1", "train.lr=0.01"], DEEPSPEED_RANK_1, ["train.lr=0.01"]),
    (["train.lr=0.01", "--local_rank=0"], {}, ["train.lr=0.01"]),             # one process: local rank 0
    (["train.lr=0.01"], DEEPSPEED_RANK_1, ["train.lr=0.01"]),                 # deepspeed --no_local_rank
])
def test_the_deepspeed_launchers_local_rank_argument_is_taken_out(argv: list[str], environ: dict[str, str],
                                                                   left: list[str]) -> None:
    assert without_local_rank(argv, environ) == left


@pytest.mark.parametrize("argv,environ,fragments", [
    (["--local_rank=0", "train.lr=0.01"], DEEPSPEED_RANK_1, ["--local_rank=0 disagrees", "local rank 1"]),
    (["--local_rank=1"], {}, ["--local_rank=1 disagrees", "single", "local rank 0"]),
    (["--local_rank=one"], DEEPSPEED_RANK_1, ["--local_rank 'one' is not a local rank"]),
    (["--local_rank"], DEEPSPEED_RANK_1, ["--local_rank '' is not a local rank"]),
    (["--local_rank=1", "--local_rank=1"], DEEPSPEED_RANK_1, ["--local_rank is given 2 times"]),
])
def test_a_local_rank_argument_that_disagrees_or_is_malformed_is_one_line(argv: list[str],
                                                                          environ: dict[str, str],
                                                                          fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        without_local_rank(argv, environ)
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_dvp_eval_accepts_the_local_rank_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`deepspeed --module dvp.evaluate` passes --local_rank=0 first: dvp-eval goes on to its own arguments (here a
    run dir without a checkpoint, the one-line error about that)."""
    assert dvp.cli.eval.main(["--local_rank=0", f"run_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "local_rank" not in error and str(tmp_path / "checkpoints") in error, error


@pytest.mark.distributed
def test_the_deepspeed_launcher_trains_two_cpu_processes_like_one(tmp_path: Path) -> None:
    """docs/distributed.md's `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module dvp.train ...` with the real
    launcher (a free master port added): on a CPU host `--num_gpus 2` starts 2 processes, each given
    `--local_rank=N` first. 2 ranks of micro-batch 16 at ZeRO 0 end bitwise where one process with the same
    micro-batches ends (tests/test_distributed.py)."""
    args = [*COMMON, "train.max_steps=3", "dist.zero_stage=0", "dist.micro_batch=16"]
    reference, run = tmp_path / "single16", tmp_path / "deepspeed"
    ok(train(1, reference, *args[len(COMMON):]))
    command = documented_command("docs/distributed.md", "DS_ACCELERATOR=cpu deepspeed --num_gpus 2", {
        "DS_ACCELERATOR=cpu": [], "deepspeed": [DEEPSPEED, "--master_port", str(_port())],
        "...": [*args, f"run_dir={run}"]})
    res = ok(subprocess.run(command, cwd=ROOT, env={**_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                            text=True, timeout=300))
    out = res.stdout + res.stderr
    assert "'--local_rank=0'" in out and "'--local_rank=1'" in out, out[-3000:]     # the launcher's spawn lines
    assert "DeepSpeedEngine x 2 (micro-batch 16, accumulation 1)" in out, out[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["loop"]["step"] == 3
    assert torch.equal(flat(weights(run)), flat(weights(reference)))
