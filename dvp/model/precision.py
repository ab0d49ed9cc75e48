"""The precision a forward pass computes in: bf16 / fp16 autocast on the run's device, or float32 as is. The
layers that stay float32 under autocast are dvp.model.blocks.Float32Conv2d."""
from __future__ import annotations

from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> Any:
    """The forward-pass precision context: bf16 / fp16 autocast, or nothing for fp32."""
    return torch.autocast(device.type, dtype=DTYPES.get(precision, torch.float32), enabled=precision in DTYPES)
