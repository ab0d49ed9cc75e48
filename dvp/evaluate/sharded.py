"""Sharded evaluation of a model on a split: the mean -ELBO terms and active units (every validation), and the test
set's ELBO, importance-sampled NLL, bits/dim, per-layer KL and sampling time (the end of a run, and dvp-eval).

The ELBO: each rank takes its rows of every batch, every draw by global row (dvp.core.noise). The IS-NLL: each
rank takes whole batches of eval.batch_size test images (so every rank works up to n_test / batch_size ranks),
every draw by batch index. Sums are all-reduced, so every rank gets the single-process numbers up to float
summation order. Every evaluation forward pass is true float32 (no TF32) or eval.precision's autocast
(dvp.model.precision.evaluation).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dvp.core.noise import Noise, noise_seed, shard
from dvp.core.paths import replace_atomically
from dvp.data.batches import model_inputs
from dvp.evaluate.progress import ImageProgress, is_nll_cost
from dvp.model.objectives import active_units, bits_per_dim, elbo_stats, importance_sampled_nll, moments
from dvp.model.precision import evaluation
from dvp.model.vae import HierarchicalVAE
from dvp.parallel.context import DistContext


@torch.no_grad()
def evaluate_elbo(model: HierarchicalVAE, x_all: torch.Tensor, cfg: DictConfig, ctx: DistContext | None = None,
                  seed: int = 0, stream: str = "val", quadrature: bool = False) -> dict[str, float]:
    """Mean -ELBO terms over a split (global batches of train.eval_batch_size) and active units averaged over
    batches (docs/model.md §7, eq. (27)), with `eval.precision` autocast whatever the training precision.

    Sharded: each rank of `ctx` evaluates its rows of every batch; the draws of a batch come from
    `Noise(noise_seed(seed, stream, batch))` at the global rows, the sums over the split and the active-unit
    moments of each batch are all-reduced; so every rank gets the single-process numbers (up to float summation
    order)."""
    model.eval()
    device = next(model.parameters()).device
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    sums: dict[str, torch.Tensor] = {}
    size = cfg.train.eval_batch_size
    for index, start in enumerate(range(0, len(x_all), size)):
        x = x_all[start:start + size]
        lo, hi = shard(len(x), rank, world)
        empty = lo == hi                      # fewer rows than ranks: run one row, count it zero times
        lo, hi = (0, 1) if empty else (lo, hi)
        noise = Noise(noise_seed(seed, stream, index), len(x), lo, hi)
        x_enc, x_target = model_inputs(x[lo:hi].to(device), cfg.data.binarize, cfg.data.encoder_sees, noise)
        with evaluation(cfg.eval.precision, device):
            terms = model(x_enc, x_target, quadrature=quadrature, noise=noise)
        weight = 0.0 if empty else float(hi - lo)
        summed = moments(terms.mu_q) * (0.0 if empty else 1.0)
        summed = ctx.all_reduce_sum(summed) if ctx is not None else summed
        stats = {k: float(v) * weight for k, v in elbo_stats(terms, model.image_shape).items()}
        stats.update({k: v * len(x) / world for k, v in active_units(terms.mu_q, summed=summed).items()})
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums)
    total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    total = ctx.all_reduce_sum(total) if ctx is not None else total
    return {k: float(v) / len(x_all) for k, v in zip(keys, total.cpu())}


class ChunkDraws:
    """The draws of consecutive importance-sampling chunks run in one forward pass: each chunk's own `Noise`,
    concatenated along the sample axis (the layout reps x rows x inner of dvp.core.noise, the chunks' samples
    in order). A pass of any number of chunks therefore sees the draws of those chunks run one by one, and the
    estimate does not depend on how many chunks a pass holds."""

    def __init__(self, chunks: list[Noise]) -> None:
        self.chunks = chunks

    def _draw(self, like: torch.Tensor, inner: int, draw: str) -> torch.Tensor:
        parts, start = [], 0
        for chunk in self.chunks:
            rows = chunk.reps * (chunk.hi - chunk.lo) * inner
            parts.append(getattr(chunk, draw)(like[start:start + rows], inner))
            start += rows
        return torch.cat(parts)

    def randn_like(self, like: torch.Tensor, inner: int = 1) -> torch.Tensor:
        return self._draw(like, inner, "randn_like")

    def rand_like(self, like: torch.Tensor, inner: int = 1) -> torch.Tensor:
        return self._draw(like, inner, "rand_like")


def samples_per_pass(model: HierarchicalVAE, x_enc: torch.Tensor, x_target: torch.Tensor,
                     e: DictConfig) -> int:
    """Importance samples per forward pass: eval.chunks_per_pass x eval.is_chunk (at most K). With null: one
    chunk on CPU; on CUDA as many chunks as fit in half the memory still available, from the peak memory of
    one chunk's forward pass on this batch (a probe with fixed draws; its result is not used)."""
    chunks = e.chunks_per_pass
    if chunks is None and x_enc.device.type == "cuda":
        device, rows = x_enc.device, len(x_enc)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        rep = (e.is_chunk,) + (1,) * (x_enc.dim() - 1)
        with evaluation(e.precision, device):
            model(x_enc.repeat(rep), x_target.repeat(rep), quadrature=True,
                  noise=Noise(0, rows, 0, rows, reps=e.is_chunk))
        per_chunk = torch.cuda.max_memory_allocated(device) - before
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        chunks = max(1, int(available / 2 // max(per_chunk, 1)))
    return min(e.is_samples, (chunks or 1) * e.is_chunk)


def _is_nll_sum(model: HierarchicalVAE, x_test: torch.Tensor, cfg: DictConfig, ctx: DistContext | None,
                seed: int, progress_period: float) -> float:
    """Sum over the images of the K-sample IS-NLL (`eval.*`), one binarisation per batch shared by its K
    samples. The test set is cut into batches of eval.batch_size images; each rank takes whole batches
    (`shard` of the batch indices). The draws of batch b are `Noise(noise_seed(seed, "is", b, first))` for
    each chunk of eval.is_chunk samples first..first+is_chunk and `Noise(noise_seed(seed, "is_binarize", b))`,
    whatever the world size and however many chunks a forward pass holds (`samples_per_pass`, `ChunkDraws`):
    the same numbers up to float rounding. The sum is all-reduced. Progress of rank 0's batches on stderr
    from rank 0."""
    e = cfg.eval
    device = next(model.parameters()).device
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    starts = range(0, len(x_test), e.batch_size)
    first, last = shard(len(starts), rank, world)
    mine = [(index, x_test[start:start + e.batch_size]) for index, start in enumerate(starts)][first:last]
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, per_pass = 0, 0
    with ImageProgress(sum(len(x) for _, x in mine), "IS-NLL", progress_period, show=rank == 0) as progress:
        for index, x in mine:
            binarize = Noise(noise_seed(seed, "is_binarize", index), len(x), 0, len(x))
            x_enc, x_target = model_inputs(x.to(device), cfg.data.binarize, cfg.data.encoder_sees, binarize)
            per_pass = per_pass or samples_per_pass(model, x_enc, x_target, e)

            def noise(first: int, n: int, index: int = index, rows: int = len(x)) -> ChunkDraws:
                return ChunkDraws([Noise(noise_seed(seed, "is", index, start), rows, 0, rows,
                                         reps=min(e.is_chunk, first + n - start))
                                   for start in range(first, first + n, e.is_chunk)])

            with evaluation(e.precision, device):
                nll = importance_sampled_nll(model, x_enc, x_target, e.is_samples, per_pass, e.is_weight,
                                             noise)
            nll_sum += nll.double().sum()
            seen += len(x)
            progress.update(len(x), f"nll {float(nll_sum) / seen:.2f}, {per_pass} samples/pass")
    return float(ctx.all_reduce_sum(nll_sum) if ctx is not None else nll_sum)


@torch.no_grad()
def evaluate_test(model: HierarchicalVAE, x_test: torch.Tensor, cfg: DictConfig, checkpoint: Path,
                  log: Any = None, step: int = 0, seed: int = 0, out: Path | None = None,
                  progress_period: float = 30.0, ctx: DistContext | None = None) -> dict[str, float]:
    """Test-set ELBO, IS-NLL, bpd, active units, per-layer KL and sampling time, in `eval.precision`, sharded
    over the ranks of `ctx` (the same numbers as one process up to float summation order); rank 0 writes the
    JSON atomically to `out`, by default next to `checkpoint` (`best.eval.json`, or `best.raw.eval.json` for
    eval.weights=raw). Before the IS-NLL, its cost is printed to stderr; its progress follows there, a line
    at most every `progress_period` seconds when stderr is not a terminal."""
    e = cfg.eval
    main = ctx is None or ctx.is_main
    x_test = x_test[:e.max_images] if e.max_images else x_test
    model.eval()
    start = time.perf_counter()
    results = {f"elbo_{k}": v
               for k, v in evaluate_elbo(model, x_test, cfg, ctx, seed, "test", quadrature=True).items()}
    elbo_seconds = time.perf_counter() - start
    if main:
        print(is_nll_cost(len(x_test), e.is_samples, elbo_seconds), file=sys.stderr, flush=True)
    nll_mean = _is_nll_sum(model, x_test, cfg, ctx, seed, progress_period) / len(x_test)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        start = time.perf_counter()
        model.sample(100, temperature=1.0)
        sample_s = (time.perf_counter() - start) / 100
    results.update({"nll": nll_mean, "bpd": float(bits_per_dim(torch.tensor(nll_mean), model.image_shape)),
                    "is_samples": e.is_samples, "is_weight": e.is_weight, "weights": e.weights,
                    "images": len(x_test),
                    "sample_seconds_per_image": sample_s, "checkpoint": str(checkpoint)})
    if not main:
        return results
    out = out or results_path(checkpoint, e.weights)
    replace_atomically(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    print_table(results)
    print(f"results: {out}")
    if log is not None:
        log.log_eval(step, 0, "test", {k.removeprefix("elbo_"): v for k, v in results.items()
                                        if isinstance(v, float)})
    return results


def print_table(results: dict[str, Any]) -> None:
    """Results as a two-column table on stdout."""
    rows = [("test NLL (nats)", results["nll"]), ("test bits/dim", results["bpd"]),
            ("test -ELBO (nats)", results["elbo_nelbo"]), ("  reconstruction", results["elbo_recon"]),
            ("  KL z", results["elbo_kl_z"]), ("  KL u", results["elbo_kl_u"]),
            ("active units (var > 0.01)", results["elbo_au"]),
            ("active units (var > 0.001)", results["elbo_au_1e-3"])]
    layers = [(int(k.split("/")[1]), v) for k, v in results.items() if k.startswith("elbo_kl/")]
    rows += [(f"  KL layer {i}" + (" (top)" if i == 0 else " (finest)" if i == len(layers) - 1 else ""), v)
             for i, v in layers]                  # numbered top-down: 0 is the coarsest latent
    rows += [("IS samples K", results["is_samples"]), ("test images", results["images"]),
             ("sampling s/image", results["sample_seconds_per_image"])]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        print(f"{name:<{width}}  {text}")


def results_path(checkpoint: Path, weights: str) -> Path:
    """Where the results of `checkpoint` go by default: best.eval.json, or best.raw.eval.json for raw weights."""
    return checkpoint.with_suffix(".eval.json" if weights == "ema" else ".raw.eval.json")
