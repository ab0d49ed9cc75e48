"""Observation models p(x | z) (docs/model.md §5, eqs. (19)-(20)), log-likelihoods summed per example in float32.

- Bernoulli over binarised pixels, p = sigmoid(logits) clamped to [1e-7, 1 - 1e-7] (done on the logits):
      log p(x|z) = sum_i x_i log p_i + (1 - x_i) log(1 - p_i).
- Discretised mixture of logistics (PixelCNN++ / VDVAE), M components with autoregressive RGB means,
  bin half-width 1/255 on x in [-1, 1], edge bins at +-1 integrate to infinity:
      log p(x|z) = sum_pixels logsumexp_m [log pi_m + sum_c log(CDF(x_c + 1/255) - CDF(x_c - 1/255))].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_MAX_LOGIT = math.log((1 - 1e-7) / 1e-7)


class Bernoulli:
    """Bernoulli likelihood over {0,1} pixels; the network outputs logits, one channel per image channel."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    @property
    def out_channels(self) -> int:
        return self.channels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x | logits), shape [B], x in {0, 1}."""
        logits = params.float().clamp(-_MAX_LOGIT, _MAX_LOGIT)
        return -F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        """E[x] mapped to [-1, 1] for display."""
        return torch.sigmoid(params.float()) * 2 - 1

    def sample(self, params: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params.float())) * 2 - 1


class LogisticMixture:
    """Discretised mixture of logistics for 8-bit images in [-1, 1], 1 or 3 channels."""

    def __init__(self, channels: int, num_mixtures: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"logistic mixture supports 1 or 3 channels, got {channels}")
        self.channels, self.m = channels, num_mixtures

    @property
    def out_channels(self) -> int:
        c = self.channels
        return self.m * (1 + 2 * c + c * (c - 1) // 2)   # logits, means, log-scales, RGB coefficients

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, _, h, w = params.shape
        c, m = self.channels, self.m
        params = params.float()
        logits = params[:, :m]
        rest = params[:, m:].reshape(b, -1, m, h, w)
        means, log_scales = rest[:, :c], rest[:, c:2 * c].clamp(-8.0, 1.0)
        coeffs = torch.tanh(rest[:, 2 * c:])
        return logits, means, log_scales, coeffs

    def _ar_means(self, means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
        """mu_g += c0 x_r, mu_b += c1 x_r + c2 x_g (x broadcast over the mixture axis)."""
        if self.channels == 1:
            return means
        x = x.unsqueeze(2)
        r = means[:, 0:1]
        g = means[:, 1:2] + coeffs[:, 0:1] * x[:, 0:1]
        b = means[:, 2:3] + coeffs[:, 1:2] * x[:, 0:1] + coeffs[:, 2:3] * x[:, 1:2]
        return torch.cat([r, g, b], dim=1)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x | params), shape [B], x in [-1, 1] on the 8-bit grid."""
        logits, means, log_scales, coeffs = self._split(params)
        x = x.float()
        centered = x.unsqueeze(2) - self._ar_means(means, coeffs, x)
        inv_s = torch.exp(-log_scales)
        plus_in = inv_s * (centered + 1.0 / 255)
        min_in = inv_s * (centered - 1.0 / 255)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)            # log CDF(x + 1/255): left edge bin
        log_one_minus_cdf_min = -F.softplus(min_in)             # log (1 - CDF(x - 1/255)): right edge bin
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in) - math.log(127.5)
        log_bin = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid)
        xe = x.unsqueeze(2).expand_as(centered)
        log_probs = torch.where(xe < -0.999, log_cdf_plus, torch.where(xe > 0.999, log_one_minus_cdf_min, log_bin))
        log_mix = log_probs.sum(1) + F.log_softmax(logits, dim=1)        # [B, M, H, W]
        return torch.logsumexp(log_mix, dim=1).flatten(1).sum(1)

    def _draw(self, params: Tensor, noise: bool) -> Tensor:
        logits, means, log_scales, coeffs = self._split(params)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-5, 1 - 1e-5)))
        pick = F.one_hot((logits + gumbel).argmax(1), self.m).permute(0, 3, 1, 2).unsqueeze(1).float()
        mu = (means * pick).sum(2)
        if noise:
            u = torch.rand_like(mu).clamp(1e-5, 1 - 1e-5)
            mu = mu + torch.exp((log_scales * pick).sum(2)) * (torch.log(u) - torch.log1p(-u))
        c = (coeffs * pick).sum(2)
        if self.channels == 1:
            return mu.clamp(-1, 1)
        r = mu[:, 0].clamp(-1, 1)
        g = (mu[:, 1] + c[:, 0] * r).clamp(-1, 1)
        b = (mu[:, 2] + c[:, 1] * r + c[:, 2] * g).clamp(-1, 1)
        return torch.stack([r, g, b], 1)

    def mean(self, params: Tensor) -> Tensor:
        """The mean of a sampled mixture component (no logistic noise), for display."""
        return self._draw(params, noise=False)

    def sample(self, params: Tensor) -> Tensor:
        return self._draw(params, noise=True)
