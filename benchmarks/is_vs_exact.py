"""The importance-sampled NLL against the exact likelihood, on the real model classes made small enough to integrate.

    python benchmarks/is_vs_exact.py [--k 20000]      # writes benchmarks/results/is_vs_exact.json, prints a table

Uses the tiny 1x2x2-image models of tests/test_model.py (1-D latents, exact log p(x) on a fine grid through the
model's own layers), and reports exact -log p(x), the IS-NLL (valid weight), the authors' analytic-KL weight and the
-ELBO for each test image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_model import X_TINY, _exact_log_px, _tiny  # noqa: E402

from dvp.model.objectives import importance_sampled_nll  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "is_vs_exact.json")
    args = parser.parse_args()
    rows = []
    x, enc = X_TINY, X_TINY * 2 - 1
    for name, n_latents in [("ladder", 1), ("ladder", 2), ("vampprior", 1)]:
        model = _tiny(name, n_latents)
        with torch.no_grad():
            torch.manual_seed(2)
            row = {"model": f"{name}, {n_latents} latent(s)", "exact": (-_exact_log_px(model, x)).tolist(),
                   "is_nll": importance_sampled_nll(model, enc, x, args.k, 5000).tolist(),
                   "analytic_kl": importance_sampled_nll(model, enc, x, args.k, 5000, "analytic_kl").tolist(),
                   "nelbo": torch.stack([model(enc, x).nelbo for _ in range(2000)]).mean(0).tolist()}
        rows.append(row)
        for key in ("exact", "is_nll", "analytic_kl", "nelbo"):
            print(f"{row['model']:<20} {key:<12} " + " ".join(f"{v:8.4f}" for v in row[key]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"k": args.k, "rows": rows}, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
