"""Two pytest workers share the 2 cores (setup.cfg's `-n 2`): each computes on one thread, and so do the processes
its tests start (OMP_NUM_THREADS), since two workers each running torch's default of one thread per core would
oversubscribe the cores and OpenMP's waiting threads would slow every test many times over."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
