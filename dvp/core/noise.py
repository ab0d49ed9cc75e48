"""Random draws that do not depend on how a global batch is split over processes and micro-batches.

    noise = Noise(seed=noise_seed(cfg.train.seed, "train", step), n=global_batch, lo=lo, hi=hi)
    eps = noise.randn_like(mu)        # rows lo:hi of a [global_batch, ...] draw

Every draw generates the whole global batch's tensor from one generator seeded by (seed, stream, index) and
keeps rows [lo, hi): the rows a process (or a micro-batch) owns. The k-th draw of a forward pass is therefore a
function of (seed, step, global sample index) alone, so one process, eight processes or two micro-batches per
process see exactly the same binarisation, reparameterisation noise and diffusion times for every image, and
train the same model up to floating-point reduction order. Generating the other rows costs
world x micro-batches draws per step, negligible at these image sizes next to a forward pass.

Row layouts: a tensor of `reps * (hi - lo) * inner` rows holds, in order, `reps` repeats of the local rows
(`x.repeat(reps, ...)`, the importance samples), each row repeated `inner` times in place
(`repeat_interleave(inner)`, the diffusion quadrature points).

`noise=None` in the model means the process's default torch RNG (sampling, single-image tools).

Under torch.compile (train.compile) every draw runs outside the compiled graph (`torch.compiler.disable`): it
is the eager draw from the seeded generator, bit for bit, never a traced copy that Inductor could replace with
its own RNG (functionalised Philox draws that ignore the generator would give every rank the same rows and
break world-size invariance and exact resume). The cost is one graph break per draw (a few per forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

STREAMS = {"train": 0, "val": 1, "test": 2, "is": 3, "is_binarize": 4}   # independent seed streams per use


def noise_seed(seed: int, stream: str, *index: int) -> int:
    """A well-mixed 63-bit seed for draw set `index` (a step; a batch and a chunk) of `stream` under `seed`."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, STREAMS[stream], *index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of n rows that rank `rank` of `world` owns: contiguous and balanced."""
    return rank * n // world, (rank + 1) * n // world


@dataclass
class Noise:
    """Draws for rows [lo, hi) of a global batch of `n` rows; `reps` repeats of the batch (importance
    samples). A fresh generator seeded with `seed` per forward pass; draws follow the order of the calls."""
    seed: int
    n: int
    lo: int
    hi: int
    reps: int = 1
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.compiler.disable
    def _global(self, like: Tensor, inner: int, draw: str) -> Tensor:
        local = self.hi - self.lo
        rows = like.shape[0]
        if rows != self.reps * local * inner:
            raise ValueError(f"a draw of {rows} rows does not match reps={self.reps} x rows {local} x "
                             f"inner={inner}")
        shape = (self.reps, self.n, inner, *like.shape[1:])
        gen = self._generator(like.device)
        full = (torch.randn if draw == "normal" else torch.rand)(shape, generator=gen, device=like.device)
        return full[:, self.lo:self.hi].reshape(like.shape).to(like.dtype)

    def randn_like(self, like: Tensor, inner: int = 1) -> Tensor:
        """Standard normals shaped like `like` (its rows in the layout above)."""
        return self._global(like, inner, "normal")

    def rand_like(self, like: Tensor, inner: int = 1) -> Tensor:
        """Uniforms on [0, 1) shaped like `like`."""
        return self._global(like, inner, "uniform")


def randn_like(like: Tensor, noise: Noise | None, inner: int = 1) -> Tensor:
    """`noise.randn_like(like)`, or the default RNG's when `noise` is None."""
    return torch.randn_like(like) if noise is None else noise.randn_like(like, inner)


def rand_like(like: Tensor, noise: Noise | None, inner: int = 1) -> Tensor:
    """`noise.rand_like(like)`, or the default RNG's when `noise` is None."""
    return torch.rand_like(like) if noise is None else noise.rand_like(like, inner)
