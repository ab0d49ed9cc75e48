"""The device of every rank: one GPU index for dvp and DeepSpeed, no silent CPU when a GPU was asked for, the
devices line and each host's own line, NCCL's error handling and Ray's GPU resources.

What cannot exist on this CPU machine is a GPU: where a test needs a device count or a per-rank
CUDA_VISIBLE_DEVICES it passes the count in to a pure function, and says so. The "GPU asked for but unusable"
tests are real: CUDA_VISIBLE_DEVICES=99 (a device no machine has) or an empty one, so CUDA finds no GPU here and
on a GPU host alike."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dvp.cli.train import main
from dvp.core.errors import ConfigError
from dvp.parallel.context import DistContext, device_index, shared_gpu
from dvp.parallel.interface import Interface
from dvp.parallel.launch import gpu_request, nccl_error_settings
from dvp.tune.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.max_steps=1", "train.final_eval=false", "wandb.mode=disabled", "model.num_ch=8",
         "train.batch_size=32", "train.ckpt_every=0"]


@pytest.mark.parametrize("local_rank, local_world, visible, assigned, index", [
    (3, 8, 8, None, 3),          # torchrun --nproc_per_node 8 on 8 visible GPUs: GPU <local rank>
    (1, 2, 1, None, 0),          # srun --gpus-per-task=1: local rank 1 sees only its own GPU, device 0
    (5, None, 1, None, 0),       # the same, the local world size unknown (uneven Slurm tasks, MPI)
    (0, 1, 4, None, 0),          # one process on a node of 4 GPUs
    (1, 2, 4, None, 1),          # fewer processes than GPUs
    (0, 2, 2, 1, 1),             # Ray Train: worker 0 of the node was given the second visible GPU
])
def test_device_index_is_the_one_gpu_dvp_and_deepspeed_use(local_rank: int, local_world: int | None,
                                                            visible: int, assigned: int | None, index: int) -> None:
    """The visible device count is passed in (mocked: no GPU here)."""
    assert device_index(local_rank, local_world, visible, assigned) == index


@pytest.mark.parametrize("local_rank, local_world, visible, assigned, match", [
    (0, 4, 2, None, "4 processes on this host .*CUDA_VISIBLE_DEVICES shows 2 GPUs: two ranks would share a GPU"),
    (2, None, 2, None, "3 processes on this host .*CUDA_VISIBLE_DEVICES shows 2 GPUs.*--nproc_per_node 2"),
    (0, 2, 2, 2, "assigned to this process is device 2 but CUDA_VISIBLE_DEVICES shows 2"),
])
def test_more_local_ranks_than_visible_gpus_is_one_line(local_rank: int, local_world: int | None, visible: int,
                                                         assigned: int | None, match: str) -> None:
    """The visible device count is passed in (mocked: no GPU here). Two ranks on one GPU fail in NCCL: an error,
    not a wrap-around."""
    with pytest.raises(ConfigError, match=match) as caught:
        device_index(local_rank, local_world, visible, assigned)
    assert "\n" not in str(caught.value)


def test_two_ranks_on_one_gpu_are_found_by_host_and_uuid() -> None:
    """GPU UUIDs are given (mocked: no GPU here). One visible device is device 0 for every rank, whether each
    task has its own GPU (distinct UUIDs) or all see the same (torchrun --nproc_per_node 2 on a 1-GPU host)."""
    assert shared_gpu(["n0 GPU a", "n0 GPU b", "n1 GPU a", "n1 GPU b"]) is None
    assert shared_gpu(["n0 GPU a", "n1 GPU a", "n0 GPU b", "n0 GPU a"]) == ((0, 3), "n0 GPU a")


@pytest.mark.parametrize("environ, asked", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_GPUS_ON_NODE": "0"}, None),   # a Slurm job without GPUs
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e3f"}, "CUDA_VISIBLE_DEVICES=GPU-5e3f"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "SLURM_GPUS_PER_NODE=a100:8"),
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
    ({"CUDA_VISIBLE_DEVICES": "0", "DS_ACCELERATOR": "cpu"}, None),           # the CPU chosen explicitly
])
def test_what_in_the_environment_asks_for_a_gpu(environ: dict[str, str], asked: str | None) -> None:
    assert gpu_request(environ) == asked


@pytest.mark.parametrize("argv, environ, asked", [
    (["dist.device=auto"], {"CUDA_VISIBLE_DEVICES": "99"}, "CUDA_VISIBLE_DEVICES=99"),
    (["dist.device=cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "dist.device=cuda"),
])
def test_a_gpu_asked_for_but_unusable_stops_with_one_line_before_any_compute(
        tmp_path: Path, argv: list[str], environ: dict[str, str], asked: str) -> None:
    """Real: CUDA finds no GPU in either environment (here: no driver; on a GPU host: no device of that id, or
    none visible), and DeepSpeed's accelerator is left to choose (no DS_ACCELERATOR)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | environ
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "dvp.train", *argv, f"run_dir={run}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {asked} asks for a GPU but "), done.stderr
    assert "dist.device=cpu" in lines[0] and done.stdout == ""
    assert not run.exists()                                  # nothing written, nothing trained


def test_dist_device_cpu_forces_the_cpu_and_the_first_lines_name_the_device(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "99")        # a GPU asked for ...
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert main([*SMALL, "dist.device=cpu", f"run_dir={tmp_path / 'run'}"]) == 0      # ... and the CPU chosen
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run_dir=") and lines[1] == "devices: rank 0 cpu gloo fp32", lines
    assert os.environ["DS_ACCELERATOR"] == "cpu"             # DeepSpeed's accelerator is the CPU's too


def _context(devices: list[str], backend: str, hosts: list[tuple[str, str]], rank: int = 0,
             interface: Interface | None = None) -> DistContext:
    return DistContext(rank, 0, len(devices), torch.device("cpu"), backend, interface=interface, hosts=hosts,
                       devices=devices)


def test_the_devices_line_names_every_rank_and_is_compact_when_they_agree() -> None:
    """Device names are given (mocked: no GPU here)."""
    gpus = _context(["cuda:0 (NVIDIA H100)", "cuda:1 (NVIDIA H100)"], "nccl", [("n0", "10.0.0.1")] * 2)
    assert gpus.devices_line("bf16") == ("devices: rank 0 cuda:0 (NVIDIA H100) nccl bf16, "
                                         "rank 1 cuda:1 (NVIDIA H100) nccl bf16")
    cpus = _context(["cpu"] * 4, "gloo", [("n0", "10.0.0.1")] * 4)
    assert cpus.devices_line("fp32") == "devices: ranks 0-3 cpu gloo fp32"


def test_each_host_line_names_its_host_interface_and_address() -> None:
    eth0 = Interface("eth0", "10.0.0.2", chosen=True)
    ctx = _context(["cpu"] * 4, "gloo", [("n0", "10.0.0.1")] * 2 + [("n1", "10.0.0.2")] * 2, rank=2,
                   interface=eth0)
    assert ctx.host_line() == "host n1: rank 2 of 4 talks over eth0 (10.0.0.2, toward the other hosts)"
    unknown = _context(["cpu"] * 2, "gloo", [("n0", "?"), ("n1", "?")], rank=1)
    assert unknown.host_line() == "host n1: rank 1 of 2 talks over the address its name resolves to (?)"


@pytest.mark.parametrize("environ, exported", [
    ({}, {"TORCH_NCCL_BLOCKING_WAIT": "1"}),
    ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, {"TORCH_NCCL_BLOCKING_WAIT": "1"}),   # torchrun's; unused
    ({"TORCH_NCCL_BLOCKING_WAIT": "0"}, {}),                                          # the user's choice wins
    ({"NCCL_BLOCKING_WAIT": "0"}, {}),                                                # under its old name too
])
def test_nccl_raises_in_python_by_blocking_wait_unless_the_user_chose(environ: dict[str, str],
                                                                      exported: dict[str, str]) -> None:
    assert nccl_error_settings(environ) == exported


@pytest.mark.parametrize("gpus, ok", [(0, True), (1, True), (2.0, True), (0.5, False), (1.5, False)])
def test_a_fraction_of_a_gpu_per_worker_is_one_line(tmp_path: Path, gpus: float, ok: bool) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"experiments": {"digits/dvp_vae": {"model.ctx_size": [2]}},
                                    "resources": {"workers": 2, "gpus_per_worker": gpus}}))
    if ok:
        assert load_sweep(str(path)).resources.gpus_per_worker == gpus
        return
    with pytest.raises(ConfigError, match=rf"resources.gpus_per_worker={gpus} shares a GPU.*whole number"):
        load_sweep(str(path))
