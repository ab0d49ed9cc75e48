"""`dvp-eval run_dir=DIR [checkpoint=best|last|PATH] [eval.is_samples=K] [eval.max_images=N] [out=FILE.json]`

Evaluates a checkpoint's EMA weights (or raw ones: eval.weights=raw) on the test set: the negative ELBO
(diffusion term by its T-point quadrature), the importance-sampled NLL with K samples (`eval.is_weight=iwae`, the valid estimator, unless asked otherwise),
bits/dim, active units, per-layer KL and the sampling time per image. Writes `<checkpoint>.eval.json` next to the
checkpoint and prints a table. `artifact=ENTITY/PROJECT/NAME:ALIAS` evaluates a checkpoint logged to wandb
(online only) instead of a local run dir.

    dvp-eval run_dir=runs/mnist/dvp_vae/20261125-080000 eval.is_samples=1000
"""
from __future__ import annotations

import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dvp.cli import run_cli, single_process_context
from dvp.data import model_inputs
from dvp.engine import autocast
from dvp.logger import replace_atomically
from dvp.model import HierarchicalVAE
from dvp.paths import check_output_file
from dvp.objectives import active_units, bits_per_dim, elbo_stats, importance_sampled_nll


@torch.no_grad()
def evaluate_elbo(model: HierarchicalVAE, x_all: torch.Tensor, cfg: DictConfig,
                  quadrature: bool = False) -> dict[str, float]:
    """Mean -ELBO terms over a split (batches of train.eval_batch_size) and active units averaged over batches
    (spec §1.8), with `eval.precision` autocast whatever the training precision. Uses the caller's RNG for
    binarisation and sampling."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(x_all), cfg.train.eval_batch_size):
        x = x_all[i:i + cfg.train.eval_batch_size].to(device)
        x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
        with autocast(cfg.eval.precision, device):
            terms = model(x_enc, x_target, quadrature=quadrature)
        stats = {k: float(v) for k, v in elbo_stats(terms, model.image_shape).items()}
        stats.update(active_units(terms.mu_q))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
        n += len(x)
    return {k: v / n for k, v in sums.items()}


class ImageProgress:
    """Progress of a pass over `total` images on stderr: on a terminal a tqdm bar counting images (with ETA),
    otherwise a plain line at most every `period` seconds (0: every update) and one at the end, e.g.
    `IS-NLL 2,000/10,000 images, 20%, nll 95.31, elapsed 0:06:12, eta 0:24:48`."""

    def __init__(self, total: int, desc: str, period: float = 30.0) -> None:
        self.total, self.desc, self.period = total, desc, period
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = (tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
                    if sys.stderr.isatty() else None)

    def __enter__(self) -> ImageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int, postfix: str) -> None:
        """Count `n` more images done; `postfix` (e.g. 'nll 95.31') goes on the bar or line."""
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.period or self.done >= self.total:
            self.last = now
            print(progress_line(self.desc, self.done, self.total, now - self.start, postfix), file=sys.stderr,
                  flush=True)


def progress_line(desc: str, done: int, total: int, elapsed: float, postfix: str) -> str:
    """One plain progress line; eta = elapsed (total - done) / done."""
    eta = elapsed * (total - done) / done if done else 0.0
    return (f"{desc} {done:,}/{total:,} images, {100 * done / total:.0f}%, {postfix}, "
            f"elapsed {timedelta(seconds=round(elapsed))}, eta {timedelta(seconds=round(eta))}")


def _duration(seconds: float) -> str:
    """'45 s', '35 min' or '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def is_nll_cost(images: int, k: int, elbo_seconds: float) -> str:
    """What the IS-NLL will cost: images x K forward samples, taking about K x the time of the ELBO pass over
    the same images (each importance sample is one forward pass, like the ELBO's single sample)."""
    return (f"IS-NLL: {images:,} test images x K={k:,} samples ({images * k:,} forward passes), "
            f"about {_duration(k * elbo_seconds)} at the rate of the ELBO pass ({elbo_seconds:.2f} s)")


def _is_nll_sum(model: HierarchicalVAE, x_test: torch.Tensor, cfg: DictConfig,
                progress_period: float) -> float:
    """Sum over the images of the K-sample IS-NLL (`eval.*`), one binarisation per batch shared by its K
    samples, with progress on stderr."""
    e = cfg.eval
    device = next(model.parameters()).device
    nll_sum = 0.0
    with ImageProgress(len(x_test), "IS-NLL", progress_period) as progress:
        for i in range(0, len(x_test), e.batch_size):
            x = x_test[i:i + e.batch_size].to(device)
            x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
            with autocast(e.precision, device):
                nll = importance_sampled_nll(model, x_enc, x_target, e.is_samples, e.is_chunk, e.is_weight)
            nll_sum += float(nll.sum())
            progress.update(len(x), f"nll {nll_sum / (i + len(x)):.2f}")
    return nll_sum


@torch.no_grad()
def evaluate_test(model: HierarchicalVAE, x_test: torch.Tensor, cfg: DictConfig, checkpoint: Path,
                  log: Any = None, step: int = 0, seed: int = 0, out: Path | None = None,
                  progress_period: float = 30.0) -> dict[str, float]:
    """Test-set ELBO, IS-NLL, bpd, active units, per-layer KL and sampling time, in `eval.precision`; JSON
    written atomically to `out`, by default next to `checkpoint` (`best.eval.json`, or `best.raw.eval.json`
    for eval.weights=raw). Before the IS-NLL, its cost is printed to stderr; its progress follows there, a line
    at most every `progress_period` seconds when stderr is not a terminal."""
    e = cfg.eval
    x_test = x_test[:e.max_images] if e.max_images else x_test
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        start = time.perf_counter()
        results = {f"elbo_{k}": v for k, v in evaluate_elbo(model, x_test, cfg, quadrature=True).items()}
        elbo_seconds = time.perf_counter() - start
        print(is_nll_cost(len(x_test), e.is_samples, elbo_seconds), file=sys.stderr, flush=True)
        nll_mean = _is_nll_sum(model, x_test, cfg, progress_period) / len(x_test)
        start = time.perf_counter()
        model.sample(100, temperature=1.0)
        sample_s = (time.perf_counter() - start) / 100
    results.update({"nll": nll_mean, "bpd": float(bits_per_dim(torch.tensor(nll_mean), model.image_shape)),
                    "is_samples": e.is_samples, "is_weight": e.is_weight, "weights": e.weights,
                    "images": len(x_test),
                    "sample_seconds_per_image": sample_s, "checkpoint": str(checkpoint)})
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
    rows += [(f"  KL layer {k.split('/')[1]}", v) for k, v in results.items() if k.startswith("elbo_kl/")]
    rows += [("IS samples K", results["is_samples"]), ("test images", results["images"]),
             ("sampling s/image", results["sample_seconds_per_image"])]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        print(f"{name:<{width}}  {text}")


def results_path(checkpoint: Path, weights: str) -> Path:
    """Where the results of `checkpoint` go by default: best.eval.json, or best.raw.eval.json for raw weights."""
    return checkpoint.with_suffix(".eval.json" if weights == "ema" else ".raw.eval.json")


def evaluate_cli(argv: list[str]) -> int:
    from dvp.runs import load_run, parse_args
    args, overrides = parse_args(argv, allowed_prefixes=("eval.", "data.root", "data.download"), extra=("out",))
    if "out" in args:
        check_output_file(Path(args["out"]), "out")
    run = load_run(args, overrides, single_process_context().device)
    out = Path(args["out"]) if "out" in args else results_path(run.checkpoint, run.cfg.eval.weights)
    check_output_file(out, "out")
    data = run.data()
    evaluate_test(run.model, data.test, run.cfg, run.checkpoint, out=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(evaluate_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
