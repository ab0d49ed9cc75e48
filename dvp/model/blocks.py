"""Convolutional building blocks of the encoder and the top-down decoder (docs/model.md §4). SiLU throughout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Float32Conv2d(nn.Conv2d):
    """nn.Conv2d computed in float32 even under bf16 autocast: for the layers that output distribution parameters
    and for the 1x1 convolutions that read a float32 residual stream.

    bf16 keeps 8 mantissa bits. A mean or log-variance computed in bf16 is rounded by ~0.4% of its size, and the
    KL's (mu_q - mu_p)^2 / sigma_p^2 and the logits of p(x|z) carry that rounding into the loss and its gradient.
    A residual stream whose channels sit at a large offset loses most of its variation when cast to bf16 (see
    `EncoderResBlock`). These layers are a small share of the FLOPs, so they run in float32 (same parameters and
    state_dict keys as nn.Conv2d). A 1x1 kernel runs as a matrix product over the channel axis, which on CPU is
    several times faster than oneDNN's float32 convolution at these few channels, in the input's memory format
    (no layout conversion): y[n, :, p] = W x[n, :, p] + b for every pixel p.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.kernel_size != (1, 1):
                return super().forward(x)
            weight = self.weight.flatten(1)
            if x.is_contiguous(memory_format=torch.channels_last):       # NHWC: pixels x channels rows
                return F.linear(x.movedim(1, -1), weight, self.bias).movedim(-1, 1)
            n, _, h, w = x.shape                                          # NCHW: b + W @ [C, H*W] per image
            bias = x.new_zeros(()) if self.bias is None else self.bias[None, :, None]
            return torch.baddbmm(bias, weight.expand(n, -1, -1), x.flatten(2)).view(n, -1, h, w)


def conv(c_in: int, c_out: int, kernel: int, float32: bool = False) -> nn.Conv2d:
    """A 'same'-padded convolution (kernel 1 or 3); `float32` computes it in float32 under autocast."""
    return (Float32Conv2d if float32 else nn.Conv2d)(c_in, c_out, kernel, padding=kernel // 2)


class EncoderResBlock(nn.Module):
    """Pre-activation bottleneck: x + conv1(act(conv3(act(conv3(act(conv1(act(x)))))))), 1x1 skip if widths differ.

    The 1x1 convs that read the float32 residual stream (the first, and the skip) compute in float32 (see
    `Float32Conv2d`): on MNIST several stream channels sit at a near-constant offset (|mean| / std up to ~100 over
    the background), where bf16's spacing of 2^-7 at 1.0 erases most of their variation; in bf16 the encoder's
    gradient fell to cosine 0.74-0.78 against float32 (benchmarks/bf16_gradients.py).
    """

    def __init__(self, c_in: int, c_hid: int, c_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), conv(c_in, c_hid, 1, float32=True), nn.SiLU(), conv(c_hid, c_hid, 3),
                                 nn.SiLU(), conv(c_hid, c_hid, 3), nn.SiLU(), conv(c_hid, c_out, 1))
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1, float32=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.net(x)


class DecoderResBlock(nn.Module):
    """skip(x) + conv1(act(conv3(act(conv3(act(conv1(x))))))) ('2x3' mode).

    `out_scale` multiplies the last conv at init: 0 for the prior/posterior heads (they start at N(0, I) plus the
    skip), sqrt(1/L) for the state ResNets (VDVAE-style stable init). The 1x1 convs that read the float32 state
    (the first, and the skip) compute in float32, as in `EncoderResBlock`; `float32_out` computes the last conv in
    float32 too: for the heads, whose output (last + skip) is mu and log-var.
    """

    def __init__(self, c_in: int, c_hid: int, c_out: int, out_scale: float = 1.0, float32_out: bool = False) -> None:
        super().__init__()
        last = conv(c_hid, c_out, 1, float32_out)
        last.weight.data.mul_(out_scale)
        last.bias.data.mul_(out_scale)
        self.net = nn.Sequential(conv(c_in, c_hid, 1, float32=True), nn.SiLU(), conv(c_hid, c_hid, 3), nn.SiLU(),
                                 conv(c_hid, c_hid, 3), nn.SiLU(), last)
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1, float32=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.net(x)
