"""`python -m dvp.cli.curves OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]`: a run's learning curves as PNG, or several
runs' validation -ELBO on one plot (dvp.train.curves draws them)."""
from __future__ import annotations

import sys
from pathlib import Path

from dvp.train.curves import compare_curves, plot_curves


def main(argv: list[str] | None = None) -> int:
    """`python -m dvp.cli.curves OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]`: one run's curves, or several runs'
    validation -ELBO compared (plus OUT-stem_<label>.png with each run's own curves)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or any("=" not in a for a in args[1:]):
        print(main.__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    runs = {label: Path(d) / "metrics.jsonl" for label, d in (a.split("=", 1) for a in args[1:])}
    for label, path in runs.items():
        print(plot_curves(path, out.with_name(f"{out.stem}_{label}.png"), title=label))
    if len(runs) > 1:
        print(compare_curves(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
