"""Everything a run writes for humans: console progress, `metrics.jsonl`, wandb, and image grids.

`RunLogger(run_dir, config, total_steps=..., enabled=rank == 0)`; with `enabled=False` every method is a no-op.
`save_grid(images, path)` writes a PNG grid of images, upscaled to at least 512 px wide (small images stay
visible).

`run_dir/metrics.jsonl` holds one JSON object per line:
`{"split": "train"|"val"|"test"|..., "step": int, "epoch": int (eval lines only), **metrics, "time": unix}`.
Metric values are plain floats; non-finite ones (nan, ±inf) are written as `null`, so every line is strict JSON.

A wandb failure never stops training: the first exception from wandb is reported in one warning line, and the
run continues with wandb switched off.
"""
from __future__ import annotations

import json
import math
import secrets
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from tqdm import tqdm

from dvp.core.config import SCHEMA
from dvp.core.paths import replace_atomically

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_MODES = SCHEMA.keys["wandb.mode"].choices     # configs/defaults.yaml lists them


def offline_without_credentials(mode: str, warn: Callable[[str], None]) -> str:
    """`mode`, or "offline" (after one warning line) when it is "online" and no wandb credentials are configured."""
    import wandb
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        warn("warning: no wandb credentials found; logging to wandb offline")
        return "offline"
    return mode


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file in order; blank lines and lines that are not JSON (a line cut short by a
    crash) are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _plain(value: float | torch.Tensor) -> float | None:
    """A metric value as a float, or None where it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, min_width: int = 512) -> Path:
    """Write B×C×H×W images in [-1, 1] as one PNG grid (clamped, padding 2, nrow = ceil(sqrt(B)) by default),
    upscaled by nearest neighbour by the smallest integer factor that makes it at least `min_width` pixels
    wide, s = max(1, ceil(min_width / W_grid)); written atomically, returns `path`."""
    from torchvision.utils import make_grid  # imported here: torchvision takes seconds to import
    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    nrow = math.ceil(math.sqrt(images.shape[0])) if nrow is None else nrow
    grid = make_grid(images, nrow=nrow, padding=2)
    scale = max(1, math.ceil(min_width / grid.shape[-1]))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    replace_atomically(Path(path), lambda tmp: Image.fromarray(pixels).save(tmp, format="png"))
    return Path(path)


def _describe(stats: dict[str, float]) -> str:
    """'loss 0.452 bpd nelbo 245.1' from whichever of the two keys are present."""
    parts = []
    if "loss" in stats:
        parts.append(f"loss {float(stats['loss']):.3f} bpd")
    if "nelbo" in stats:
        parts.append(f"nelbo {float(stats['nelbo']):.1f}")
    return " ".join(parts)


class RunLogger:
    """Console, metrics file, wandb and image grids of one training run (construct on every rank, enable on one).

    Args:
        run_dir: where `metrics.jsonl`, `images/`, `wandb/` and `wandb_id.txt` go (created when enabled).
        config: the resolved config as a plain dict, stored as the wandb run config.
        total_steps: the step count of the whole run, for the progress bar and ETA (None when unknown).
        enabled: False makes every method a no-op that writes nothing (non-zero ranks).
        wandb_mode: "online" (offline, with a warning, when no credentials are configured), "offline", or
            "disabled" (wandb is never imported).
        project, entity: the wandb project and entity.
        group: the wandb group (a sweep's trials share one), or None.
        log_checkpoints: whether `log_checkpoint` uploads checkpoints as wandb artifacts.
        start_step: the step a resumed run starts from (progress bar and ETA).
        keep_records: how many records of an existing `metrics.jsonl` the resumed state has seen (saved in its
            checkpoint); later ones, written after that checkpoint by a run that then died, are dropped, so the
            file ends up record for record as an uninterrupted run's. None (a checkpoint from before this count
            was kept): the records with step <= start_step are kept.
    """

    def __init__(self, run_dir: Path, config: dict, *, total_steps: int | None, enabled: bool = True,
                 wandb_mode: str = "offline", project: str = "dvp", entity: str | None = None,
                 group: str | None = None, log_checkpoints: bool = False, start_step: int = 0,
                 keep_records: int | None = None) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}")
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.log_checkpoints = log_checkpoints
        self._start_step = start_step
        self.records = 0
        """Records in `metrics.jsonl` so far (what a checkpoint saves as the resume point of the file)."""
        self._start_time = time.time()
        self._bar: tqdm | None = None
        self._run: Any = None
        self._metrics: TextIO | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        if metrics_path.exists():
            self.records = self._truncate_metrics(metrics_path, start_step, keep_records)
        self._metrics = metrics_path.open("a", buffering=1)
        if wandb_mode != "disabled":
            self._wandb_call(lambda: self._start_wandb(config, wandb_mode, project, entity, group))
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, unit="step",
                             dynamic_ncols=True)

    @staticmethod
    def _truncate_metrics(path: Path, start_step: int, keep_records: int | None) -> int:
        """Keep the first `keep_records` records (or, when None, those with step <= start_step), rewriting the
        file atomically; returns how many were kept."""
        records = read_metrics(path)
        if keep_records is None:
            kept = [r for r in records if r.get("step", 0) <= start_step]
        else:
            kept = records[:keep_records]
        replace_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        return len(kept)

    def _start_wandb(self, config: dict, mode: str, project: str, entity: str | None, group: str | None) -> None:
        """Start (or resume) the wandb run whose id is kept in `run_dir/wandb_id.txt`."""
        import wandb

        mode = offline_without_credentials(mode, self._print)
        id_path = self.run_dir / WANDB_ID_FILE
        if not id_path.exists():
            id_path.write_text(secrets.token_hex(4) + "\n")
        run_id = id_path.read_text().strip()
        # an absolute dir: a wandb service inherited from a parent process (WANDB_SERVICE) resolves a relative
        # one in its own working directory
        self._run = wandb.init(mode=mode, dir=self.run_dir.resolve(), project=project, entity=entity,
                               group=group, config=config, id=run_id, resume="allow")

    def _wandb_call(self, call: Callable[[], None]) -> None:
        """Run a wandb call; on any exception warn once and switch wandb off for the rest of the run."""
        try:
            call()
        except Exception as error:  # wandb must never stop training, whatever it raises
            self._run = None
            self._print(f"warning: wandb failed ({type(error).__name__}: {error}); "
                        "logging continues without wandb")

    def _print(self, line: str) -> None:
        """One console line on stderr, above the progress bar when there is one."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _write_record(self, record: dict[str, Any], metrics: dict[str, float]) -> None:
        record.update({key: _plain(value) for key, value in metrics.items()})
        record["time"] = time.time()
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self.records += 1

    def _wandb_log(self, values: dict[str, Any], step: int) -> None:
        if self._run is not None:
            run = self._run
            self._wandb_call(lambda: run.log(values, step=step))

    def log_train(self, step: int, stats: dict[str, float], images_per_s: float) -> None:
        """Record training stats at `step` (keys "loss" in bits/dim and "nelbo" in nats are shown on the
        console) and the throughput."""
        if not self.enabled:
            return
        stats = {**stats, "images_per_s": images_per_s}
        self._write_record({"split": "train", "step": step}, stats)
        self._wandb_log({f"train/{key}": float(value) for key, value in stats.items()}, step)
        summary = f"{_describe(stats)} img/s {images_per_s:.1f}"
        if self._bar is not None:
            self._bar.set_postfix_str(f"step {step} {summary}", refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.refresh()
            return
        line = f"step {step}" if self.total_steps is None else f"step {step}/{self.total_steps}"
        line = f"{line} {summary}"
        done = step - self._start_step
        if self.total_steps is not None and done > 0:
            remaining = (self.total_steps - step) * (time.time() - self._start_time) / done
            line = f"{line} eta {timedelta(seconds=round(max(remaining, 0.0)))}"
        self._print(line)

    def log_eval(self, step: int, epoch: int, split: str, metrics: dict[str, float]) -> None:
        """Record evaluation metrics of `split` ("val", "test", ...), keyed "<split>/<name>" in wandb."""
        if not self.enabled:
            return
        self._write_record({"split": split, "step": step, "epoch": epoch}, metrics)
        self._wandb_log({"epoch": epoch, **{f"{split}/{key}": float(value) for key, value in metrics.items()}},
                        step)
        self._print(f"[{split}] epoch {epoch} step {step} {_describe(metrics)}".rstrip())

    def log_images(self, step: int, name: str, images: torch.Tensor, nrow: int | None = None) -> Path | None:
        """Save a grid of B×C×H×W images in [-1, 1] to `run_dir/images/{name}_step{step:07d}.png`
        (`save_grid`: nrow defaults to ceil(sqrt(B)), padding 2, at least 512 px wide) and log it to wandb as
        "images/{name}"; returns the PNG path."""
        if not self.enabled:
            return None
        path = self.run_dir / "images" / f"{name}_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, nrow=nrow)
        if self._run is not None:
            run = self._run

            def upload() -> None:
                import wandb

                run.log({f"images/{name}": wandb.Image(str(path), caption=f"step {step}")}, step=step)

            self._wandb_call(upload)
        return path

    def log_summary(self, values: dict[str, float | int]) -> None:
        """Set run-level values (parameter counts, final metrics) in the wandb run summary."""
        if self.enabled and self._run is not None:
            run = self._run
            self._wandb_call(lambda: run.summary.update(values))

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        """Upload a checkpoint file or directory as the wandb artifact "dvp-<run id>" (type "model") with
        `aliases`, when checkpoint logging is on."""
        if not (self.enabled and self.log_checkpoints and self._run is not None):
            return
        run = self._run

        def upload() -> None:
            import wandb

            artifact = wandb.Artifact(f"dvp-{run.id}", type="model")
            if Path(path).is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            run.log_artifact(artifact, aliases=list(aliases))

        self._wandb_call(upload)

    def close(self) -> None:
        """Close the progress bar and metrics file and finish the wandb run; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._run is not None:
            run = self._run
            self._wandb_call(lambda: run.finish(exit_code=0))
            self._run = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
