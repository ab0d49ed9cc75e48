"""`dvp-sample run_dir=DIR [n=64] [temperature=1.0] [out=FILE.png] [seed=0] [checkpoint=best|last|PATH]`

Draws n images from a checkpoint's EMA model, u ~ p(u) by ancestral diffusion sampling and z_l ~ p(z_l | z_{>l}, u)
with standard deviations scaled by `temperature` (default 1.0; below 1, e.g. 0.8, gives cleaner images), and writes
a PNG grid, upscaled to at least 512 pixels wide (default `<run_dir>/samples_t<temperature>.png`).

    dvp-sample run_dir=runs/mnist/dvp_vae/20261125-080000 n=64 temperature=0.8
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from dvp.cli.common import run_cli, single_process_context
from dvp.cli.runs import load_run, parse_args
from dvp.core.errors import ConfigError
from dvp.core.paths import check_output_file
from dvp.train.logger import save_grid

MAX_IMAGES = 10_000
MAX_SEED = 2 ** 32 - 1


def _option(args: dict[str, str], key: str, default: str, kind: type) -> int | float:
    """`args[key]` (or `default`) read as `kind`; text that is not one is a ConfigError naming the key."""
    text = args.get(key, default)
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text} is not {'an integer' if kind is int else 'a number'}") from None


def sample_options(args: dict[str, str]) -> tuple[int, float, int]:
    """n in [1, 10000], a finite temperature > 0 and a seed in [0, 2**32 - 1] from the command's arguments
    (defaults 64, 1.0, 0)."""
    n = _option(args, "n", "64", int)
    temperature = _option(args, "temperature", "1.0", float)
    seed = _option(args, "seed", "0", int)
    if not 1 <= n <= MAX_IMAGES:
        raise ConfigError(f"n={n} must be in [1, {MAX_IMAGES}] (the number of images)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature={args.get('temperature', '1.0')} must be a finite number > 0 "
                          "(1.0: the model's prior)")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed} must be in [0, {MAX_SEED}]")
    return n, temperature, seed


def sample_cli(argv: list[str]) -> int:
    args, overrides = parse_args(argv, allowed_prefixes=("eval.weights",), extra=("n", "temperature", "out", "seed"))
    n, temperature, seed = sample_options(args)
    if "out" in args:
        check_output_file(Path(args["out"]), "out")
    run = load_run(args, overrides, single_process_context("dvp-sample").device)
    out = Path(args.get("out", run.checkpoint.parent.parent / f"samples_t{temperature:g}.png"))
    check_output_file(out, "out")
    print(f"sampling {n} images at temperature {temperature:g} from {run.checkpoint}", file=sys.stderr, flush=True)
    torch.manual_seed(seed)
    images = run.model.sample(n, temperature=temperature)
    save_grid(images.cpu(), out, nrow=math.ceil(math.sqrt(n)))
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sample_cli, __doc__, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
