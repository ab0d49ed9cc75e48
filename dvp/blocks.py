"""Convolutional building blocks of the encoder and the top-down decoder (spec §2). SiLU throughout."""
from __future__ import annotations

from torch import Tensor, nn


def conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded convolution (kernel 1 or 3)."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)


class EncoderResBlock(nn.Module):
    """Pre-activation bottleneck: x + conv1(act(conv3(act(conv3(act(conv1(act(x)))))))), 1x1 skip if widths differ."""

    def __init__(self, c_in: int, c_hid: int, c_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), conv(c_in, c_hid, 1), nn.SiLU(), conv(c_hid, c_hid, 3),
                                 nn.SiLU(), conv(c_hid, c_hid, 3), nn.SiLU(), conv(c_hid, c_out, 1))
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.net(x)


class DecoderResBlock(nn.Module):
    """skip(x) + conv1(act(conv3(act(conv3(act(conv1(x))))))) ('2x3' mode).

    `out_scale` multiplies the last conv at init: 0 for the prior/posterior heads (they start at N(0, I) plus the
    skip), sqrt(1/L) for the state ResNets (VDVAE-style stable init).
    """

    def __init__(self, c_in: int, c_hid: int, c_out: int, out_scale: float = 1.0) -> None:
        super().__init__()
        last = conv(c_hid, c_out, 1)
        last.weight.data.mul_(out_scale)
        last.bias.data.mul_(out_scale)
        self.net = nn.Sequential(conv(c_in, c_hid, 1), nn.SiLU(), conv(c_hid, c_hid, 3), nn.SiLU(),
                                 conv(c_hid, c_hid, 3), nn.SiLU(), last)
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.net(x)
