"""Mean and standard deviation over seeds of the equal-steps quality runs (quality_330_seeds.sh).

    python benchmarks/summarise_quality.py benchmarks/results/quality_330_seeds

Reads OUT/<variant>_seed<s>/dvp_vae_raw_{elbo_2k,isnll_k100_200}.json, prints a table per variant (test -ELBO on
2,000 images and IS-NLL with K=100 on 200, raw weights after 330 steps) and writes OUT/summary.json.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

AUTHORS = {"nelbo": 122.6, "isnll": 104.0}   # the authors' code after 330 steps (issue 3), one run


def main() -> None:
    out = Path(sys.argv[1])
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for d in sorted(p for p in out.glob("*_seed*") if p.is_dir()):
        variant, seed = d.name.rsplit("_seed", 1)
        elbo, isnll = d / "dvp_vae_raw_elbo_2k.json", d / "dvp_vae_raw_isnll_k100_200.json"
        if elbo.exists() and isnll.exists():
            e = json.loads(elbo.read_text())
            runs.setdefault(variant, {})[seed] = {"nelbo": e["elbo_nelbo"], "recon": e["elbo_recon"],
                                                  "kl_z": e["elbo_kl_z"], "kl_u": e["elbo_kl_u"],
                                                  "isnll": json.loads(isnll.read_text())["nll"]}
    summary = {}
    print(f"{'variant':13s} {'seeds':>6s} {'-ELBO mean':>11s} {'sd':>5s} {'IS-NLL mean':>12s} {'sd':>5s}  per seed")
    for variant, by_seed in runs.items():
        stats = {}
        for key in ("nelbo", "isnll", "recon", "kl_z", "kl_u"):
            values = [r[key] for r in by_seed.values()]
            stats[key] = {"mean": statistics.fmean(values),
                          "sd": statistics.stdev(values) if len(values) > 1 else None}
        summary[variant] = {"seeds": by_seed, "stats": stats}
        sd = {k: f"{stats[k]['sd']:.2f}" if stats[k]["sd"] is not None else "-" for k in stats}
        per_seed = ", ".join(f"s{s}: {r['nelbo']:.1f}/{r['isnll']:.1f}" for s, r in by_seed.items())
        print(f"{variant:13s} {len(by_seed):6d} {stats['nelbo']['mean']:11.2f} {sd['nelbo']:>5s} "
              f"{stats['isnll']['mean']:12.2f} {sd['isnll']:>5s}  {per_seed}")
    print(f"authors' code, one run: -ELBO {AUTHORS['nelbo']}, IS-NLL {AUTHORS['isnll']}")
    (out / "summary.json").write_text(json.dumps({"authors": AUTHORS, "variants": summary}, indent=1))
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
