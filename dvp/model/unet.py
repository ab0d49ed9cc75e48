"""The epsilon-prediction denoiser of the diffusion prior (docs/model.md §3): a single-level, guided-diffusion-style
UNet.

It works at the pseudo-input resolution k x k, so there is one level (channel_mult = [1]) and no
down/upsampling:

    input:  conv3x3 C -> mc, then num_res_blocks ResBlocks          (every output pushed on the skip stack)
    middle: ResBlock, self-attention (1 head), ResBlock
    output: num_res_blocks + 1 ResBlocks on concat(h, skip.pop())
    head:   GroupNorm, SiLU, zero-initialised conv3x3 mc -> C

Every ResBlock is conditioned on the time embedding through FiLM scale-shift. The time embedding is sinusoidal
on the raw continuous t in [0, 1] (not scaled by 1000), followed by Linear, SiLU, Linear, all at width mc.
Zero-initialised head: a fresh UNet predicts eps_hat = 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvp.core.noise import Noise
from dvp.model.blocks import Float32Conv2d
from dvp.model.checks import GROUPS


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm on a contiguous copy of its input: at this size (k x k maps, one or two channels per group)
    PyTorch's channels_last CPU kernel is ~20x slower in bf16 (~6x in fp32) than the contiguous one."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous())


def timestep_embedding(t: Tensor, dim: int, max_period: float = 1e4) -> Tensor:
    """Sinusoidal embedding [cos(t w_j), sin(t w_j)], w_j = max_period^(-j / (dim/2)), j = 0..dim/2 - 1.

    t: [B] raw times in [0, 1]; returns [B, dim] in float32 (dim must be even).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Dropout(nn.Module):
    """Dropout whose mask is global noise: h * m / (1 - p), m = [r >= p], r ~ U(0, 1) from `noise` (a function of
    the global sample index, like every other draw), so the same rows get the same masks whatever the world size
    or micro-batching. Identity in eval mode or when p = 0 (then nothing is drawn); with noise None, the default
    RNG's mask (torch's dropout)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, h: Tensor, noise: Noise | None = None, inner: int = 1) -> Tensor:
        if not self.training or self.p == 0:
            return h
        if noise is None:
            return F.dropout(h, self.p, training=True)
        keep = noise.rand_like(h, inner) >= self.p
        return h * keep / (1 - self.p)


class ResBlock(nn.Module):
    """Time-conditioned residual block with scale-shift norm (use_scale_shift_norm):

        h = conv3x3(SiLU(GroupNorm(x)))
        [scale, shift] = Linear(SiLU(emb))
        h = zero_conv3x3(Dropout(SiLU(GroupNorm(h) * (1 + scale) + shift)))
        out = skip(x) + h,   skip = identity, or conv1x1 when in_channels != out_channels.
    """

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, dropout: float,
                 num_groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(num_groups, in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = GroupNorm(num_groups, out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor, noise: Noise | None = None, inner: int = 1) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        silu, dropout, conv = self.out_layers
        h = conv(dropout(silu(self.out_norm(h) * (1 + scale) + shift), noise, inner))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a zero-initialised output projection:

        [q, k, v] = conv1d_qkv(GroupNorm(x)),   a = v softmax(q^T k / sqrt(C)),   out = x + zero_conv1d(a).
    """

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        q, k, v = self.qkv(self.norm(x_flat)).transpose(1, 2)[:, None].chunk(3, dim=-1)  # [B, 1, L, C] each
        a = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2)  # [B, C, L]
        return (x_flat + self.proj_out(a)).reshape(b, c, *spatial)


class UNet(nn.Module):
    """eps_hat(z_t, t): [B, C, k, k] x [B] -> [B, C, k, k] (see the module docstring for the layout)."""

    def __init__(self, in_channels: int, model_channels: int, num_res_blocks: int, dropout: float,
                 num_groups: int = GROUPS) -> None:
        super().__init__()
        mc = model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, mc), nn.SiLU(), nn.Linear(mc, mc))

        def res_block(c_in: int) -> ResBlock:
            return ResBlock(c_in, mc, mc, dropout, num_groups)

        self.input_conv = nn.Conv2d(in_channels, mc, 3, padding=1)
        self.input_blocks = nn.ModuleList(res_block(mc) for _ in range(num_res_blocks))
        self.middle_in = res_block(mc)
        self.middle_attn = AttentionBlock(mc, num_groups)
        self.middle_out = res_block(mc)
        self.output_blocks = nn.ModuleList(res_block(2 * mc) for _ in range(num_res_blocks + 1))
        self.out = nn.Sequential(GroupNorm(num_groups, mc), nn.SiLU(),
                                 zero_init(Float32Conv2d(mc, in_channels, 3, padding=1)))   # eps_hat in fp32

    def forward(self, z_t: Tensor, t: Tensor, noise: Noise | None = None, inner: int = 1) -> Tensor:
        """`noise` (rows laid out with `inner` points per example, see dvp.core.noise) draws the dropout masks."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = self.input_conv(z_t)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb, noise, inner)
            skips.append(h)
        h = self.middle_out(self.middle_attn(self.middle_in(h, emb, noise, inner)), emb, noise, inner)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, noise, inner)
        return self.out(h)
