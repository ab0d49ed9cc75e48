"""The suite's process settings, applied before any test imports dvp or starts a process (children inherit them).

Threads: two pytest workers share the 2 cores (setup.cfg's `-n 2`): each computes on one thread, and so do the
processes its tests start (OMP_NUM_THREADS), since two workers each running torch's default of one thread per core
would oversubscribe the cores and OpenMP's waiting threads would slow every test many times over.

Device: the suite is a CPU suite, on a machine with GPUs too. Its bitwise checks compare runs whose reduction
order is fixed only on the CPU, and its multi-process tests put several ranks on one host, which on one GPU would
share it (NCCL refuses). So every test, and every process it starts, sees no GPU (`CUDA_VISIBLE_DEVICES` empty,
which asks for none: dvp.parallel.launch.gpu_request) and DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`),
unless `DVP_TEST_GPU=1`: then the GPUs stay visible for the tests marked `gpu` (tests/test_gpu.py, run by
benchmarks/gpu_check.py on a GPU machine; CI has none).
"""
import os

import torch

GPU_RUN = os.environ.get("DVP_TEST_GPU") == "1"

if not GPU_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["DS_ACCELERATOR"] = "cpu"

if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
