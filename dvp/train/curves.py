"""Training curves from `metrics.jsonl` as PNG pictures (matplotlib's Agg canvas; no display, no pyplot state).

    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    compare_curves({"DVP-VAE": dvp / "metrics.jsonl", "Ladder": ladder / "metrics.jsonl"}, out / "val_nelbo.png")

Series a file lacks are skipped, and so are null (non-finite) values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dvp.train.logger import read_metrics

UNITS = {"loss": "bits/dim", "nelbo": "nats"}
"""Axis units of the metric keys that have one."""
SMOOTHING = 0.9
"""Weight of the past in the exponential moving average drawn over the raw train loss."""


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; ValueError naming the file when it has none."""
    records = read_metrics(path)
    if not records:
        raise ValueError(f"no metric records in {path}")
    return records


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in the records of `split`, leaving out records without a value."""
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** i))
    return smoothed


def save_figure(fig: Figure, out_path: Path) -> Path:
    """Write the figure as a PNG at dpi 120 through a temporary file, so readers never see half a picture."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out_path)
    return out_path


def _finish_axes(ax: Axes, ylabel: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_curves(metrics_path: Path, out_path: Path, title: str | None = None) -> Path:
    """Plot train loss (faint raw values and a smoothed line) and validation loss in bits/dim against step, plus
    the validation NELBO in nats in a second panel when the file has it; returns `out_path`."""
    records = _records(metrics_path)
    nelbo = _series(records, "val", "nelbo")
    fig = Figure(figsize=(11 if nelbo[0] else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if nelbo[0] else 1, squeeze=False)[0]
    steps, loss = _series(records, "train", "loss")
    if steps:
        axes[0].plot(steps, loss, color="C0", alpha=0.25, linewidth=0.8)
        axes[0].plot(steps, _smooth(loss), color="C0", label="train")
    steps, loss = _series(records, "val", "loss")
    if steps:
        axes[0].plot(steps, loss, color="C1", marker="o", markersize=3, label="val")
    _finish_axes(axes[0], "loss (bits/dim)")
    if nelbo[0]:
        axes[1].plot(*nelbo, color="C1", marker="o", markersize=3, label="val")
        _finish_axes(axes[1], "NELBO (nats)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path)


def compare_curves(runs: dict[str, Path], out_path: Path, key: str = "nelbo", split: str = "val") -> Path:
    """Plot `key` of `split` against step for several runs on one axis, labelled by the dict keys; runs without
    that series are skipped, and ValueError is raised when none has it. Returns `out_path`."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, path in runs.items():
        steps, values = _series(_records(path), split, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    if not ax.lines:
        raise ValueError(f"no run has {split} {key!r}: {', '.join(str(p) for p in runs.values())}")
    _finish_axes(ax, f"{split} {key} ({UNITS[key]})" if key in UNITS else f"{split} {key}")
    return save_figure(fig, out_path)
