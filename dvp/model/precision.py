"""The precision a forward pass computes in: bf16 / fp16 autocast on the run's device, or float32 as is. The
layers that stay float32 under autocast are dvp.model.blocks.Float32Conv2d.

float32 on an NVIDIA GPU (Ampere and later) may be TF32: cuDNN allows TF32 convolutions by default (10
mantissa bits, as coarse as fp16's), CUDA matmuls do not. `float32_math` makes it a choice: evaluation is always
true float32 (`evaluation`), training is TF32 only with train.tf32=true (`configure_training`). On CPU these
flags do nothing. Only torch's fp32_precision API is used (torch >= 2.9): mixing it with the legacy
`allow_tf32` flags is an error in torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> Any:
    """The forward-pass precision context: bf16 / fp16 autocast, or nothing for fp32."""
    return torch.autocast(device.type, dtype=DTYPES.get(precision, torch.float32), enabled=precision in DTYPES)


def _fp32_backends() -> tuple[Any, Any]:
    """The flags of float32 cuDNN convolutions and CUDA matmuls ('ieee' or 'tf32'; 'none' inherits)."""
    return torch.backends.cudnn.conv, torch.backends.cuda.matmul


def set_float32_math(tf32: bool) -> None:
    """float32 convolutions and matmuls on CUDA in TF32 (`tf32`) or in IEEE float32."""
    for backend in _fp32_backends():
        backend.fp32_precision = "tf32" if tf32 else "ieee"


@contextmanager
def float32_math(tf32: bool) -> Iterator[None]:
    """`set_float32_math(tf32)` inside the block; the previous flags are restored after it."""
    before = [backend.fp32_precision for backend in _fp32_backends()]
    set_float32_math(tf32)
    try:
        yield
    finally:
        for backend, value in zip(_fp32_backends(), before):
            backend.fp32_precision = value


@contextmanager
def evaluation(precision: str, device: torch.device) -> Iterator[None]:
    """The precision of validation, test ELBO and IS-NLL: `eval.precision` autocast over true float32 math (no
    TF32), whatever the training precision and train.tf32."""
    with float32_math(tf32=False), autocast(precision, device):
        yield


def configure_training(tf32: bool, device: torch.device) -> None:
    """At the start of training: TF32 as train.tf32 says; on CUDA cudnn.benchmark (the training shapes are
    fixed, so each convolution's fastest algorithm is searched once)."""
    set_float32_math(tf32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """The training batches' memory format: train.channels_last, or with null the faster one for the device:
    channels_last on CUDA (cuDNN's tensor-core kernels are NHWC), contiguous NCHW on CPU (faster there: bf16
    eager 233 against 177 img/s with channels_last on Zen 4, benchmarks/results/train_throughput.json)."""
    use = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if use else torch.contiguous_format
