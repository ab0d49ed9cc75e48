"""What the model is fed: dynamic binarisation, the encoder's and the likelihood's inputs, and the seeded, resumable
batch order.

Binary-pixel likelihoods use :func:`dynamic_binarize` on every loss evaluation, and training loops iterate
with :class:`BatchIterator`, whose order and flips are pure functions of ``(seed, epoch, position)`` so
that a run resumed from :meth:`BatchIterator.state_dict` sees exactly the batches it would have seen.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from dvp.core.noise import Noise, rand_like

__all__ = ["BatchIterator", "dynamic_binarize", "model_inputs"]


def dynamic_binarize(x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
    """Draw ``x_bin ~ Bernoulli((x + 1) / 2)`` for grey levels ``x`` in ``[-1, 1]``: ``x_bin = [v < (x + 1) / 2]``
    with ``v ~ U(0, 1)`` from ``noise`` (see dvp.core.noise) or the default RNG.

    Returns a tensor of the same shape, dtype and device as ``x`` with values in ``{0, 1}``.
    """
    return (rand_like(x, noise) < ((x + 1) / 2).clamp(0, 1)).to(x.dtype)


def model_inputs(x: torch.Tensor, binarize: bool, encoder_sees: str = "grey",
                 noise: Noise | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the encoder and the pseudo-input see, what the likelihood models) for a batch in [-1, 1].

    With `binarize`, the target is a fresh x_bin ~ Bernoulli((x+1)/2) and the encoder sees the grey levels
    (`encoder_sees="grey"`, the paper's choice, docs/model.md §6, eq. (24)) or x_bin mapped to {-1, 1} (`"binary"`).
    """
    if not binarize:
        return x, x
    x_bin = dynamic_binarize(x, noise)
    return (x if encoder_sees == "grey" else x_bin * 2 - 1), x_bin


class BatchIterator:
    """Seeded, resumable iterator over minibatches of an in-memory tensor.

    Each ``iter()`` yields the batches of one epoch, starting at the saved position; when the epoch is
    exhausted the epoch counter increases and the position returns to 0. The order of epoch ``e`` is
    ``torch.randperm(N)`` drawn from a ``torch.Generator`` seeded with ``seed + e`` (the identity when
    ``shuffle`` is false). With ``flip`` each image is mirrored horizontally with probability 1/2, by a mask
    drawn from the same generator after the permutation; so every batch is a pure function of
    ``(seed, epoch, position)`` and an iterator restored with :meth:`load_state_dict` yields exactly the
    batches that remained. Use ``flip`` for training data only. ``state_dict``/``load_state_dict`` take
    effect at the next ``iter()``; do not interleave two live iterations of one instance.

    Args:
        x: the examples, first dimension N. Batches are indexed from it on its own device.
        batch_size: examples per batch.
        shuffle: permute the examples every epoch.
        seed: base seed of the per-epoch generators.
        drop_last: drop the final batch when it has fewer than ``batch_size`` examples.
        flip: random horizontal flips of the last dimension.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 flip: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if flip and x.dim() < 2:
            raise ValueError(f"flip needs examples with a width dimension, got shape {tuple(x.shape)}")
        self._x = x
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._flip = flip
        self._epoch = 0
        self._position = 0
        if len(self) == 0:
            raise ValueError(f"{x.shape[0]} examples make no batch of {batch_size} "
                             f"with drop_last={drop_last}")

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self._x.shape[0]
        return n // self._batch_size if self._drop_last else -(-n // self._batch_size)

    @property
    def epoch(self) -> int:
        """The current epoch, counted from 0."""
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "position": batches already yielded in epoch e}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid BatchIterator state {dict(state)}: need epoch >= 0 and "
                             f"0 <= position <= {len(self)} batches per epoch")
        self._epoch, self._position = epoch, position

    def __iter__(self) -> Iterator[torch.Tensor]:
        order, flips = self._epoch_plan(self._epoch)
        size = self._batch_size
        for position in range(self._position, len(self)):
            rows = slice(position * size, (position + 1) * size)
            batch = self._x[order[rows]]
            if flips is not None:
                mask = flips[rows].view(-1, *([1] * (batch.dim() - 1)))
                batch = torch.where(mask, batch.flip(-1), batch)
            self._position = position + 1
            yield batch
        self._epoch += 1
        self._position = 0

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The example order of ``epoch`` and, with ``flip``, its per-slot flip mask (both on x's device)."""
        generator = torch.Generator().manual_seed(self._seed + epoch)
        n = self._x.shape[0]
        order = torch.randperm(n, generator=generator) if self._shuffle else torch.arange(n)
        flips = torch.rand(n, generator=generator) < 0.5 if self._flip else None
        device = self._x.device
        return order.to(device), None if flips is None else flips.to(device)
