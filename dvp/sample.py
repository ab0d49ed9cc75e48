"""`dvp-sample run_dir=DIR [n=64] [temperature=0.8] [out=FILE.png] [seed=0] [checkpoint=best|last|PATH]`

Draws n images from a checkpoint's EMA model, u ~ p(u) by ancestral diffusion sampling and z_l ~ p(z_l | z_{>l}, u)
with standard deviations scaled by `temperature`, and writes a PNG grid (default
`<run_dir>/samples_t<temperature>.png`).

    dvp-sample run_dir=runs/mnist/dvp_vae/20261125-080000 n=64 temperature=0.8
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

from dvp.cli import run_cli
from dvp.config import ConfigError
from dvp.runs import load_run


def sample_cli(argv: list[str]) -> int:
    run = load_run(argv, allowed_prefixes=("eval.weights",), extra=("n", "temperature", "out", "seed"))
    try:
        n = int(run.args.get("n", 64))
        temperature = float(run.args.get("temperature", 1.0))
        seed = int(run.args.get("seed", 0))
    except ValueError as e:
        raise ConfigError(f"n, seed must be integers and temperature a number: {e}") from None
    if n < 1 or temperature <= 0:
        raise ConfigError(f"need n >= 1 and temperature > 0, got n={n}, temperature={temperature}")
    torch.manual_seed(seed)
    images = run.model.sample(n, temperature=temperature)
    default = run.checkpoint.parent.parent / f"samples_t{temperature:g}.png"
    out = Path(run.args.get("out", default))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.cpu() + 1) / 2, out, nrow=math.ceil(math.sqrt(n)), padding=2)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sample_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
