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
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dvp.cli import run_cli
from dvp.data import model_inputs
from dvp.engine import autocast
from dvp.model import HierarchicalVAE
from dvp.objectives import active_units, bits_per_dim, elbo_stats, importance_sampled_nll


@torch.no_grad()
def evaluate_elbo(model: HierarchicalVAE, x_all: torch.Tensor, cfg: DictConfig,
                  quadrature: bool = False) -> dict[str, float]:
    """Mean -ELBO terms over a split (batches of train.eval_batch_size) and active units averaged over batches
    (spec §1.8). Uses the caller's RNG for binarisation and sampling."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(x_all), cfg.train.eval_batch_size):
        x = x_all[i:i + cfg.train.eval_batch_size].to(device)
        x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
        with autocast(cfg.train.precision, device):
            terms = model(x_enc, x_target, quadrature=quadrature)
        stats = {k: float(v) for k, v in elbo_stats(terms, model.image_shape).items()}
        stats.update(active_units(terms.mu_q))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
        n += len(x)
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def evaluate_test(model: HierarchicalVAE, x_test: torch.Tensor, cfg: DictConfig, checkpoint: Path,
                  log: Any = None, step: int = 0, seed: int = 0, out: Path | None = None) -> dict[str, float]:
    """Test-set ELBO, IS-NLL, bpd, active units, per-layer KL and sampling time; JSON written to `out`, by default
    next to `checkpoint` (`best.eval.json`, or `best.raw.eval.json` for eval.weights=raw)."""
    e = cfg.eval
    x_test = x_test[:e.max_images] if e.max_images else x_test
    device = next(model.parameters()).device
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        results = {f"elbo_{k}": v for k, v in evaluate_elbo(model, x_test, cfg, quadrature=True).items()}
        nll_sum = 0.0
        bar = tqdm(range(0, len(x_test), e.batch_size), desc=f"IS-NLL K={e.is_samples}", unit="batch",
                   disable=None, file=sys.stderr)
        for i in bar:
            x = x_test[i:i + e.batch_size].to(device)
            # one binarisation per batch, shared by the K samples
            x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
            with autocast(cfg.train.precision, device):
                nll = importance_sampled_nll(model, x_enc, x_target, e.is_samples, e.is_chunk, e.is_weight)
            nll_sum += float(nll.sum())
            bar.set_postfix(nll=f"{nll_sum / min(i + e.batch_size, len(x_test)):.2f}")
        start = time.perf_counter()
        model.sample(100, temperature=1.0)
        sample_s = (time.perf_counter() - start) / 100
    nll_mean = nll_sum / len(x_test)
    results.update({"nll": nll_mean, "bpd": float(bits_per_dim(torch.tensor(nll_mean), model.image_shape)),
                    "is_samples": e.is_samples, "is_weight": e.is_weight, "weights": e.weights,
                    "images": len(x_test),
                    "sample_seconds_per_image": sample_s, "checkpoint": str(checkpoint)})
    out = out or checkpoint.with_suffix(".eval.json" if e.weights == "ema" else ".raw.eval.json")
    out.write_text(json.dumps(results, indent=2))
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
            ("active units", results["elbo_au"])]
    rows += [(f"  KL layer {k.split('/')[1]}", v) for k, v in results.items() if k.startswith("elbo_kl/")]
    rows += [("IS samples K", results["is_samples"]), ("test images", results["images"]),
             ("sampling s/image", results["sample_seconds_per_image"])]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        print(f"{name:<{width}}  {text}")


def evaluate_cli(argv: list[str]) -> int:
    from dvp.runs import load_run
    run = load_run(argv, allowed_prefixes=("eval.", "data.root", "data.download", "train.precision"),
                   extra=("out",))
    data = run.data()
    out = Path(run.args["out"]) if "out" in run.args else None
    evaluate_test(run.model, data.test, run.cfg, run.checkpoint, out=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(evaluate_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
