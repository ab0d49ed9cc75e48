"""Opening a finished or running run for evaluation and sampling: `run_dir=DIR [checkpoint=best|last|PATH]` or
`artifact=ENTITY/PROJECT/NAME:ALIAS` (a checkpoint logged to wandb; needs network), plus allowed overrides."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dvp.checkpoint import CheckpointError, load_checkpoint
from dvp.config import ConfigError, from_dict
from dvp.data import DataSplits, load_data_config
from dvp.model import HierarchicalVAE, build_model


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
    which = args.get("checkpoint", "best")
    if which in ("best", "last"):
        path = Path(args["run_dir"]) / "checkpoints" / f"{which}.pt"
        if which == "best" and not path.exists():
            path = path.with_name("last.pt")
        return path
    return Path(which)


def load_run(argv: list[str], allowed_prefixes: tuple[str, ...], extra: tuple[str, ...] = ()) -> Run:
    """Parse `key=value` arguments, load the checkpoint and build its model (EMA or raw weights, `eval.weights`)
    on the best device."""
    args: dict[str, str] = {}
    overrides = []
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"argument '{a}' is not key=value")
        if key in ("run_dir", "checkpoint", "artifact") + extra:
            args[key] = value
        elif key.startswith(allowed_prefixes):
            overrides.append(a)
        else:
            raise ConfigError(f"'{key}' cannot be set here; allowed: run_dir, checkpoint, artifact, "
                              f"{', '.join(extra + allowed_prefixes)}")
    path = checkpoint_path(args)
    state = load_checkpoint(path)
    cfg = from_dict(OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(state["config"]),
                                                           OmegaConf.from_dotlist(overrides))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["engine"]["ema" if cfg.eval.weights == "ema" else "model"])
    return Run(cfg, model.to(device).eval(), path, args)
