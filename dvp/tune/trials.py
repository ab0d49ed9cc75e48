"""A sweep folder read back as one row per trial (what `dvp-report` tabulates and plots), offline: `sweep.yaml`,
Tune's saved trial states and each trial's dvp run dir `runs/<trial id>/`.

    rows = collect(Path("runs/sweeps/digits_depth_pseudo"))     # ROW_KEYS says what each key is
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from dvp.core.config import compose, from_dict
from dvp.core.errors import ConfigError
from dvp.data.catalog import DATASETS
from dvp.model.vae import build_model, parameter_counts
from dvp.train.checkpoint import load_checkpoint
from dvp.train.logger import read_metrics
from dvp.tune.spec import SweepSpec, load_saved

ROW_KEYS = {
    "trial_id": "Tune's trial id; the run dir is SWEEP_DIR/runs/<trial_id>",
    "family": "the trial's experiment, e.g. digits/dvp_vae",
    "<dotted.key>": "one per axis of the sweep (the families' own axes, then the space axes): the trial's value, "
                    "None where the axis is not the trial's family's",
    "model": "model.name of the trial's config (dvp_vae, vampprior, ladder)",
    "latent_scales": "model.latent_scales of the trial's config (latents per resolution, finest first)",
    "depth": "sum(latent_scales): the number of latent layers",
    "pseudo_inputs": "model.ctx_size for dvp_vae (k x k DCT pseudo-input), model.num_pseudo for vampprior, "
                     "else None",
    "params": "trainable parameters of the model built from the trial's config (parameter_counts total)",
    "best": "best value of the sweep's metric (e.g. val/nelbo -> 'nelbo' of the split=val records of "
            "metrics.jsonl) over the trial's validations, min or max by the sweep's mode; None if none is finite",
    "best_epoch": "epochs finished at that validation (its record's epoch + 1, as Tune's epoch and stop.json)",
    "val_bpd": "'loss' (bits/dim) of that validation record",
    "au": "'au' (active-unit fraction, Var > 0.01) of that validation record",
    "au_layers": "[au/0, au/1, ...] of that validation record (layer 0 = top); CSV: a JSON list",
    "test_nll": "'nll' of checkpoints/best.eval.json (test IS-NLL in nats), None before evaluation",
    "test_is_samples": "'is_samples' (K) of best.eval.json, None before evaluation",
    "test_images": "'images' (test images evaluated) of best.eval.json, None before evaluation",
    "steps": "the largest 'step' of any record of metrics.jsonl (None without records)",
    "wall_s": "last minus first record 'time' of metrics.jsonl, seconds (None without records)",
    "epochs": "validations in metrics.jsonl (distinct epochs): epochs completed",
    "status": "Tune's saved status: TERMINATED, ERROR, RUNNING or PENDING",
    "stopped_early": "status TERMINATED without runs/<trial_id>/stop.json: ended by the scheduler (ASHA)",
    "run_dir": "SWEEP_DIR/runs/<trial_id>; with remote storage (s3://) SWEEP_DIR/trials/<trial_id>, where its "
               "checkpoints (a run dir's layout) are",
    "command": "the dvp-train command that reproduces the trial (SweepSpec.reproduce_command)",
}
"""The keys of a `collect` row, in CSV column order (the axis keys stand where <dotted.key> is)."""
PSEUDO_KEYS = {"dvp_vae": "model.ctx_size", "vampprior": "model.num_pseudo"}
"""The pseudo-input axis of each model family that has one."""


# ---- reading the sweep folder ------------------------------------------------------------------------------------
def open_sweep(sweep_dir: Path) -> SweepSpec:
    """The sweep saved in `sweep_dir`; a ConfigError naming the folder when it is not one."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep folder {sweep_dir} does not exist; give the folder that dvp-sweep printed "
                          "(<storage>/<name>, e.g. runs/sweeps/digits_depth_pseudo)")
    return load_saved(sweep_dir)


def _tune_trials(sweep_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(trial id, status, Tune config) of every trial, from Tune's experiment state (no Ray needed). Tune's loader
    turns RUNNING into PENDING (to resume it), so the status is read from the newest state file itself."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        raise ConfigError(f"{sweep_dir} holds no Tune experiment state (experiment_state-*.json): the sweep has not "
                          "started a trial yet; run its dvp-sweep command")
    from ray.tune import ExperimentAnalysis
    saved = {}
    for trial_json, _ in json.loads(states[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json)
        saved[trial["trial_id"]] = trial["status"]
    analysis = ExperimentAnalysis(str(sweep_dir))
    return [(t.trial_id, saved.get(t.trial_id, t.status), t.config) for t in analysis.trials]


def _trial_config(spec: SweepSpec, run_dir: Path, config: dict[str, Any]) -> Any:
    """The run dir's resolved config.yaml, or (before the trial started) its overrides composed."""
    path = run_dir / "config.yaml"
    if path.is_file():
        return from_dict(yaml.safe_load(path.read_text()))
    return compose(spec.trial_overrides(config))


def _image_shape(cfg: Any, run_dir: Path) -> tuple[int, int, int] | None:
    """The dataset's image shape, or a checkpoint's (npz data), or None."""
    if DATASETS.get(cfg.data.name):
        return DATASETS[cfg.data.name]
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return tuple(load_checkpoint(path)["image_shape"])
    return None


def _parameters(cfg: Any, shape: tuple[int, int, int] | None, cache: dict[str, int]) -> int | None:
    if shape is None:
        return None
    key = json.dumps([OmegaConf.to_container(cfg.model), list(shape)], sort_keys=True)
    if key not in cache:
        cache[key] = parameter_counts(build_model(cfg, shape))["total"]
    return cache[key]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run dir's metrics.jsonl (none before the trial started)."""
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _per_epoch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The split=val records in epoch order, one per epoch (the last written)."""
    by_epoch = {r["epoch"]: r for r in records if r.get("split") == "val" and "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def validations(run_dir: Path) -> list[dict[str, Any]]:
    """The validation records of a run dir, one per epoch in order."""
    return _per_epoch(_records(run_dir))


def best_record(records: list[dict[str, Any]], key: str, mode: str) -> dict[str, Any] | None:
    """The record with the best finite `key` (the first of equal ones), or None."""
    scored = [r for r in records if r.get(key) is not None and math.isfinite(r[key])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[key])


def _clock(records: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    """Last step and wall time (last minus first record time) of the records."""
    if not records:
        return None, None
    times = [r["time"] for r in records if "time" in r]
    return max(r.get("step", 0) for r in records), (max(times) - min(times)) if times else None


def eval_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "checkpoints" / "best.eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def axes(spec: SweepSpec) -> list[str]:
    """The sweep's axes: every family's own, then the shared space axes (dotted config keys)."""
    keys = [k for arm in spec.arms for k in arm if k != "experiment"]
    return list(dict.fromkeys(keys + list(spec.space)))


def _row(spec: SweepSpec, sweep_dir: Path, trial_id: str, status: str, config: dict[str, Any],
         cache: dict[str, int]) -> dict[str, Any]:
    run_dir = sweep_dir / "runs" / trial_id
    cfg = _trial_config(spec, run_dir, config)
    values = {**config["arm"], **config.get("space", {})}
    records = _records(run_dir)
    vals = _per_epoch(records)
    best = best_record(vals, spec.metric.split("/", 1)[1], spec.mode) or {}
    steps, wall = _clock(records)
    test = eval_results(run_dir)
    scales = list(cfg.model.latent_scales)
    layers = sum(k.startswith("au/") for k in best)
    return {
        "trial_id": trial_id, "family": config["arm"]["experiment"], **{k: values.get(k) for k in axes(spec)},
        "model": cfg.model.name, "latent_scales": scales, "depth": sum(scales),
        "pseudo_inputs": OmegaConf.select(cfg, PSEUDO_KEYS[cfg.model.name]) if cfg.model.name in PSEUDO_KEYS else None,
        "params": _parameters(cfg, _image_shape(cfg, run_dir), cache),
        "best": best.get(spec.metric.split("/", 1)[1]),
        "best_epoch": best["epoch"] + 1 if best else None, "val_bpd": best.get("loss"), "au": best.get("au"),
        "au_layers": [best[f"au/{i}"] for i in range(layers)],
        "test_nll": test.get("nll"), "test_is_samples": test.get("is_samples"), "test_images": test.get("images"),
        "steps": steps, "wall_s": wall, "epochs": len(vals), "status": status,
        "stopped_early": status == "TERMINATED" and not (run_dir / "stop.json").is_file(),
        "run_dir": str(run_dir) if not spec.remote else f"{spec.sweep_dir}/trials/{trial_id}",
        "command": spec.reproduce_command(config),
        "validations": vals,       # not a column: the records plots draw (what `validations` reads)
    }


def rows_of(spec: SweepSpec, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial of the sweep folder, in Tune's trial order; keys and meanings in ROW_KEYS."""
    cache: dict[str, int] = {}
    return [_row(spec, sweep_dir, *trial, cache) for trial in _tune_trials(sweep_dir)]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows (`rows_of`) of the sweep folder `sweep_dir`."""
    return rows_of(open_sweep(Path(sweep_dir)), Path(sweep_dir))


# ---- tables --------------------------------------------------------------------------------------------------------
def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the best metric at any validation (as dvp-sweep's best.json), or None."""
    scored = [r for r in rows if r["best"] is not None]
    if not scored:
        return None
    return (min if spec.mode == "min" else max)(scored, key=lambda r: r["best"])

def cell_text(value: Any) -> str:
    """A cell: blank for None, lists as JSON, floats to 4 significant digits (6 for large ones)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)
