"""The report's figures of a sweep's rows (`dvp.tune.trials.collect`): best metric over depth x pseudo-inputs per
model family, learning curves, active units per layer, best metric against parameter count. Each writes one PNG
and returns its path."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dvp.train.curves import save_figure
from dvp.tune.spec import SweepSpec
from dvp.tune.trials import PSEUDO_KEYS, axes, best_row, cell_text


# ---- figures ---------------------------------------------------------------------------------------------------------
def _metric_label(spec: SweepSpec) -> str:
    key = spec.metric.split("/", 1)[1]
    unit = {"nelbo": " = -ELBO (nats)", "loss": " (bits/dim)"}.get(key, "")
    return f"{spec.metric}{unit}"


def _family_colours(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {f: f"C{i}" for i, f in enumerate(dict.fromkeys(r["family"] for r in rows))}


def _cell(spec: SweepSpec, group: list[dict[str, Any]]) -> tuple[float, str]:
    """A heatmap cell of the trials at one (pseudo-inputs, depth): the best metric and its annotation (a star
    when that trial was stopped early), or NaN and the trials' statuses."""
    best = best_row(spec, group)
    if best is None:
        return math.nan, "\n".join(sorted({r["status"] for r in group}))
    return best["best"], f"{best['best']:.4g}" + ("*" if best["stopped_early"] else "")


def plot_heatmap(spec: SweepSpec, rows: list[dict[str, Any]], family: str, path: Path) -> Path:
    """The best metric of one family over depth (model.latent_scales, columns) x pseudo-inputs (rows; one row
    for a family without them); several trials in a cell (other axes, samples): the best of them."""
    depths = sorted({tuple(r["latent_scales"]) for r in rows}, key=lambda s: (sum(s), s))
    pseudo = sorted({r["pseudo_inputs"] for r in rows}, key=lambda p: (p is None, p or 0))
    values, notes = np.full((len(pseudo), len(depths)), math.nan), {}
    for i, p in enumerate(pseudo):
        for j, d in enumerate(depths):
            group = [r for r in rows if r["pseudo_inputs"] == p and tuple(r["latent_scales"]) == d]
            values[i, j], notes[i, j] = _cell(spec, group) if group else (math.nan, "not run")
    fig = Figure(figsize=(max(5.5, 2.6 + 1.6 * len(depths)), 2.0 + 0.9 * len(pseudo)), layout="constrained")
    ax = fig.subplots()
    cmap = _colormap(spec)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), note in notes.items():
        dark = np.isfinite(values[i, j]) and (values[i, j] > middle) == (spec.mode == "min")
        ax.text(j, i, note, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(depths)), [f"{list(d)}\n({sum(d)} layer{'s' if sum(d) > 1 else ''})" for d in depths])
    ax.set_yticks(range(len(pseudo)), ["none" if p is None else str(p) for p in pseudo])
    model = rows[0]["model"]
    ax.set_xlabel("depth: model.latent_scales (latents per resolution)")
    ax.set_ylabel(f"pseudo-inputs: {PSEUDO_KEYS[model]}" if model in PSEUDO_KEYS else "pseudo-inputs: none")
    stars = " (* stopped early)" if any(r["stopped_early"] for r in rows) else ""
    ax.set_title(f"{family}: best {spec.metric}{stars}", fontsize=10)
    if finite.size:
        fig.colorbar(image, ax=ax, label=_metric_label(spec))
    return save_figure(fig, path)


def _colormap(spec: SweepSpec) -> Any:
    """viridis with the best values bright, grey where there is no value."""
    import matplotlib
    return matplotlib.colormaps["viridis_r" if spec.mode == "min" else "viridis"].with_extremes(bad="lightgrey")


def plot_learning_curves(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path:
    """The metric at every validation of every trial: colour by family, dashed when stopped early."""
    key = spec.metric.split("/", 1)[1]
    colours = _family_colours(rows)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ends = []
    for row in rows:
        points = [(r["epoch"] + 1, r[key]) for r in row["validations"] if r.get(key) is not None]
        if points:
            early = row["stopped_early"]
            ax.plot(*zip(*points), color=colours[row["family"]], linestyle="--" if early else "-", marker="o",
                    markersize=4, markerfacecolor="white" if early else colours[row["family"]], alpha=0.8)
            ends.append((*points[-1], _suffix(row), colours[row["family"]]))
    _label_points(ax, ends)
    for family, colour in colours.items():
        ax.plot([], [], color=colour, label=family)
    ax.plot([], [], color="grey", linestyle="--", marker="o", markerfacecolor="white",
            label="stopped early by the scheduler")
    ax.set_xlabel("epochs finished")
    ax.set_ylabel(_metric_label(spec))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{spec.name}: {spec.metric} per epoch, {len(rows)} trials (labels: trial id suffix)", fontsize=10)
    ax.margins(x=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _label_points(ax: Any, points: list[tuple[float, float, str, str]], log_x: bool = False) -> None:
    """Write each (x, y, text, colour) next to its point; points within 3% of the axes' spans of each other
    share one label ('00002, 00003') so that no two labels overlap there."""
    if not points:
        return
    xs = [math.log10(x) if log_x else x for x, *_ in points]
    ys = [y for _, y, *_ in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[list[int]] = []
    for i in sorted(range(len(points)), key=lambda i: (xs[i], ys[i])):
        near = [g for g in groups if abs(xs[g[0]] - xs[i]) < 0.03 * span_x and abs(ys[g[0]] - ys[i]) < 0.03 * span_y]
        if near:
            near[0].append(i)
        else:
            groups.append([i])
    for group in groups:
        x, y, _, colour = points[group[0]]
        ax.annotate(", ".join(points[i][2] for i in group), (x, y), fontsize=7, xytext=(5, 3),
                    textcoords="offset points", color=colour)


def _suffix(row: dict[str, Any]) -> str:
    """The part of a trial id after the sweep's common prefix: '5ef40_00003' -> '00003'."""
    return row["trial_id"].rsplit("_", 1)[-1]


def _short(spec: SweepSpec, row: dict[str, Any]) -> str:
    """A trial's id and axis values, for plot labels: '5ef40_00003\\nctx_size=4 latent_scales=[2,2]'."""
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={cell_text(row[k]).replace(' ', '')}" for k in axes(spec)
                      if row[k] is not None)
    return f"{row['trial_id']}\n{values}"


def plot_active_units(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: the active-unit fraction of each latent layer (au/<l>) at each trial's best validation."""
    shown = [r for r in rows if r["au_layers"]]
    layers = max(len(r["au_layers"]) for r in shown)
    width = 0.8 / layers
    fig = Figure(figsize=(max(8.0, 1.3 * len(shown) + 2), 5), layout="constrained")
    ax = fig.subplots()
    for layer in range(layers):
        xs = [i + (layer - (len(r["au_layers"]) - 1) / 2) * width for i, r in enumerate(shown)
              if layer < len(r["au_layers"])]
        ys = [r["au_layers"][layer] for r in shown if layer < len(r["au_layers"])]
        ax.bar(xs, ys, width=width, color=f"C{layer}", label=f"layer {layer}" + (" (top)" if layer == 0 else ""))
        for x, y in zip(xs, ys):
            if y == 0:                      # no bar to see: say it is zero, not missing
                ax.text(x, 0.01, "0", ha="center", va="bottom", fontsize=7, color=f"C{layer}")
    ax.set_xticks(range(len(shown)), [_short(spec, r) for r in shown], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("active-unit fraction (Var > 0.01)")
    ax.set_title(f"{spec.name}: active units per latent layer at each trial's best epoch", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="au/<layer>", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_vs_params(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path:
    """Best metric against parameter count, marker and colour per family, points labelled by trial id."""
    colours = _family_colours(rows)
    markers = dict(zip(colours, "os^DvP*X"))
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    shown = [r for r in rows if r["best"] is not None and r["params"]]
    for family in colours:
        points = [r for r in shown if r["family"] == family]
        ax.scatter([r["params"] for r in points], [r["best"] for r in points], color=colours[family],
                   marker=markers[family], label=family, s=40)
    log_x = max(r["params"] for r in shown) > 10 * min(r["params"] for r in shown)
    if log_x:
        ax.set_xscale("log")
    _label_points(ax, [(r["params"], r["best"], _suffix(r), colours[r["family"]]) for r in shown], log_x)
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"best {_metric_label(spec)}")
    ax.set_title(f"{spec.name}: best {spec.metric} vs model size (labels: trial id suffix)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
