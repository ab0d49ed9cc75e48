"""The pseudo-input u(x): a fixed, non-trainable low-dimensional transform of the image (docs/model.md §2, (4)-(7)).

DCT (the paper's choice). Orthonormal 2-D DCT-II of each channel of x' = (x+1)/2 in [0,1]:

    X[k1,k2] = a(k1) a(k2) sum_{n1,n2} x'[n1,n2] cos(pi (n1+1/2) k1 / N) cos(pi (n2+1/2) k2 / N),
    a(0) = sqrt(1/N), a(k>0) = sqrt(2/N),

i.e. X = D x' D^T with the orthonormal matrix D. u keeps the top-left k x k block of every channel and is
normalised per coefficient, u~ = clamp(X / s, -1, 1) with s[c,k1,k2] = max_train |floor(X[c,k1,k2])|, computed
on the training split only and floored at 1 (the authors' cache could divide by zero). The inverse map used to
condition the decoder is u -> u*s -> zero-pad to N x N -> D^T X D -> clamp [0,1] -> [-1,1].

`downsample` is the paper's ablation: u = bilinear resize of x to k x k, inverse = bilinear resize back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): D[k, m] = a(k) cos(pi (m + 1/2) k / n); D @ D.T = I."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (m + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


class PseudoInput(nn.Module):
    """u(x) and its inverse, for images of shape (C, N, N) and pseudo-inputs of shape (C, k, k)."""

    def __init__(self, image_shape: tuple[int, int, int], k: int, kind: str = "dct") -> None:
        super().__init__()
        c, n, _ = image_shape
        self.kind, self.k, self.n = kind, k, n
        self.shape = (c, k, k)
        self.register_buffer("dct", dct_matrix(n)[:k], persistent=False)   # the k lowest-frequency rows of D
        self.register_buffer("dct_scale", torch.ones(c, k, k))              # s, set by fit_scale; in checkpoints

    def transform(self, x: Tensor) -> Tensor:
        """The unnormalised coefficients X[:, :, :k, :k] of x in [-1, 1] (or the k x k resize)."""
        if self.kind == "downsample":
            return F.interpolate(x.float(), size=(self.k, self.k), mode="bilinear", align_corners=False)
        x01 = (x.float() + 1.0) / 2.0
        return self.dct @ x01 @ self.dct.T

    @torch.no_grad()
    def fit_scale(self, x_train: Tensor, chunk: int = 4096) -> None:
        """s = max over the training images of |floor(X)| per coefficient, floored at 1 (DCT only)."""
        if self.kind != "dct":
            return
        s = torch.zeros_like(self.dct_scale)
        for i in range(0, len(x_train), chunk):
            coeffs = self.transform(x_train[i:i + chunk].to(self.dct.device))
            s = torch.maximum(s, coeffs.floor().abs().amax(dim=0))
        self.dct_scale.copy_(s.clamp_min(1.0))

    def forward(self, x: Tensor) -> Tensor:
        """u~(x): the normalised pseudo-input in [-1, 1], shape (B, C, k, k)."""
        if self.kind == "downsample":
            return self.transform(x).clamp(-1.0, 1.0)
        return (self.transform(x) / self.dct_scale).clamp(-1.0, 1.0)

    def to_image(self, u: Tensor) -> Tensor:
        """The image-space reconstruction of u, in [-1, 1], shape (B, C, N, N)."""
        if self.kind == "downsample":
            return F.interpolate(u, size=(self.n, self.n), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
        x01 = self.dct.T @ (u * self.dct_scale) @ self.dct
        return x01.clamp(0.0, 1.0) * 2.0 - 1.0
