"""`dvp-info [experiment=...] [key=value ...]`: the resolved config and parameter counts per module.

    dvp-info experiment=mnist/dvp_vae          # ... last line: params: 648579

Builds the model on the dataset's image shape without reading any data (npz needs data.root to know its shape).
"""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from dvp.cli.common import run_cli
from dvp.data.catalog import dataset_shape
from dvp.model.vae import build_model, parameter_counts
from dvp.train.config import compose


def info(overrides: list[str]) -> int:
    """Print the resolved config and the trainable parameters per module, the total last as 'params: N'."""
    cfg = compose(overrides)
    shape = dataset_shape(cfg.data)
    if shape is None:
        from dvp.data.datasets import load_data_config
        shape = load_data_config(cfg.data).shape
    print(OmegaConf.to_yaml(cfg), end="")
    counts = parameter_counts(build_model(cfg, shape))
    total = counts.pop("total")
    for name, n in counts.items():
        print(f"{name:>10}: {n:,}")
    print(f"params: {total}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(info, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
