"""Opening a finished or running run for evaluation and sampling: `run_dir=DIR [checkpoint=best|last|PATH]` or
`artifact=ENTITY/PROJECT/NAME:ALIAS` (a checkpoint logged to wandb; needs network), plus allowed overrides."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dvp.core.config import parse_overrides, split_overrides
from dvp.core.errors import CheckpointError, ConfigError
from dvp.data.datasets import DataSplits, load_data_config
from dvp.model.vae import HierarchicalVAE, build_model
from dvp.train.checkpoint import check_weights_match, load_checkpoint
from dvp.train.config import from_dict


@dataclass
class Run:
    """A checkpoint's config and its EMA model, ready for evaluation or sampling."""
    cfg: DictConfig
    model: HierarchicalVAE
    checkpoint: Path
    args: dict[str, str]          # the command's own arguments (run_dir, checkpoint, n, temperature, ...)

    def data(self) -> DataSplits:
        return load_data_config(self.cfg.data)


def fetch_artifact(reference: str) -> Path:
    """Download a wandb model artifact and return the checkpoint file inside it."""
    import wandb
    try:
        directory = Path(wandb.Api().artifact(reference, type="model").download())
    except Exception as e:  # wandb raises many types (network, auth, missing artifact)
        raise CheckpointError(f"cannot fetch wandb artifact '{reference}': {e}") from None
    files = sorted(directory.glob("*.pt"))
    if not files:
        raise CheckpointError(f"wandb artifact '{reference}' holds no .pt checkpoint")
    return files[0]


def checkpoint_path(args: dict[str, str]) -> Path:
    if "artifact" in args:
        return fetch_artifact(args["artifact"])
    if "run_dir" not in args:
        raise ConfigError("give run_dir=DIR (a run directory) or artifact=ENTITY/PROJECT/NAME:ALIAS")
    if not Path(args["run_dir"]).is_dir():
        raise ConfigError(f"run_dir={args['run_dir']} is not a directory (no run there); give the folder "
                          "that dvp-train printed as run_dir=...")
    which = args.get("checkpoint", "best")
    if not which:
        raise ConfigError("checkpoint= is empty; give best, last or a path to a .pt file")
    if which in ("best", "last"):
        path = Path(args["run_dir"]) / "checkpoints" / f"{which}.pt"
        if which == "best" and not path.exists():
            path = path.with_name("last.pt")
        return path
    return Path(which)


def parse_args(argv: list[str], allowed_prefixes: tuple[str, ...],
               extra: tuple[str, ...] = ()) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into the command's own (run_dir, checkpoint, artifact and `extra`) and config
    overrides under `allowed_prefixes`; anything else, or a key given twice, is a ConfigError."""
    args: dict[str, str] = {}
    overrides = []
    for key, value in split_overrides(argv):
        if key in ("run_dir", "checkpoint", "artifact") + extra:
            args[key] = value
        elif key.startswith(allowed_prefixes):
            overrides.append(f"{key}={value}")
        else:
            shown = [p + "*" if p.endswith(".") else p for p in extra + allowed_prefixes]
            raise ConfigError(f"'{key}' cannot be set here; allowed: run_dir, checkpoint, artifact, "
                              f"{', '.join(shown)}")
    return args, overrides


def load_run(args: dict[str, str], overrides: list[str], device: torch.device) -> Run:
    """Load the checkpoint that `args` name, apply `overrides` to its config and build its model (EMA or raw
    weights, `eval.weights`) on `device`; every bad file or value is a one-line error before compute."""
    path = checkpoint_path(args)
    state = load_checkpoint(path)
    try:
        merged = OmegaConf.merge(OmegaConf.create(state["config"]), parse_overrides(split_overrides(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply {overrides} to the config of {path}: {str(e).splitlines()[0]}") from None
    cfg = from_dict(OmegaConf.to_container(merged))
    model = build_model(cfg, tuple(state["image_shape"]))
    which = "ema" if cfg.eval.weights == "ema" else "model"
    check_weights_match(path, model.state_dict(), state["engine"][which], which)
    model.load_state_dict(state["engine"][which])
    return Run(cfg, model.to(device).eval(), path, args)
