"""The Tune side of a sweep (Ray Train V2 pattern: `Tuner(trainer)` no longer works): Tune runs one driver
function per trial, which fits a `TorchTrainer` whose workers run `dvp.tune.worker.train_worker`.

    tuner = make_tuner(spec)          # or restore_tuner(spec) for an interrupted sweep
    results = tuner.fit()

Per trial: ScalingConfig(num_workers = resources.workers, or (min, max) for an elastic trial),
`resources_per_worker` from the CPUs and GPUs per worker; FailureConfig(max_failures) restarts the worker group
from the last registered checkpoint; CheckpointConfig keeps the 2 latest (ASHA may end a trial while it saves);
TuneReportCallback passes each epoch's report to Tune (scheduler, searcher, results). The driver itself needs
almost nothing: one unit of the custom resource `dvp_driver` where the cluster has it (the private local Ray
and cluster/*.yaml's head node: drivers stay on the head and take no CPU), else 0.01 CPU; so a trial's CPUs
are its workers'.

Layout of the sweep folder (`<storage>/<name>/`): Tune's experiment state and one folder per trial (params,
results), `sweep.yaml` (the sweep as run), `trials/<trial id>/` (Ray Train's run: registered checkpoints),
`runs/<trial id>/` (the trial's dvp run dir: config, metrics.jsonl, images, checkpoints).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from dvp.core.errors import ConfigError
from dvp.train.logger import offline_without_credentials
from dvp.tune.spec import SCHEDULERS, SEARCHERS, SweepSpec
from dvp.tune.worker import train_worker

DRIVER_RESOURCE = "dvp_driver"


def driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's driver asks of a cluster with resources `cluster`."""
    return {DRIVER_RESOURCE: 1.0} if cluster.get(DRIVER_RESOURCE) else {"CPU": 0.01}


def _trial_driver(spec: SweepSpec) -> Any:
    """The Tune trainable: fit one trial's TorchTrainer."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def run_trial(config: dict[str, Any]) -> None:
        trial_id = tune.get_context().get_trial_id()
        r = spec.resources
        overrides = spec.trial_overrides(config) + ["wandb.mode=disabled"]   # wandb: the Tuner's callback
        resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"overrides": overrides, "run_dir": str(spec.runs_dir() / trial_id),
                               "threads": 0 if r.gpus_per_worker else max(1, int(r.cpus_per_worker)),
                               "storage": f"{spec.sweep_dir}/trials/{trial_id}" if spec.remote else None},
            scaling_config=ray.train.ScalingConfig(
                num_workers=r.workers if r.elastic else r.workers[0], use_gpu=r.gpus_per_worker > 0,
                resources_per_worker=resources, elastic_resize_monitor_interval_s=10.0),
            run_config=ray.train.RunConfig(
                name=trial_id, storage_path=f"{spec.sweep_dir}/trials",
                failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=[TuneReportCallback()]))
        trainer.fit()
    return run_trial


def _by_name(path: str, kwargs: dict[str, Any], key: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sweep {key} {name}{kwargs}: {' '.join(str(e).split())}") from None


def _scheduler(spec: SweepSpec) -> Any:
    """The scheduler by name with the sweep file's keyword arguments (fifo takes none: switching a sweep to
    `scheduler.name=fifo`, the full grid, ignores the early-stopping ones)."""
    kwargs = {k: v for k, v in spec.scheduler.items() if k != "name"}
    if spec.scheduler["name"] == "fifo":
        kwargs = {}
    else:
        kwargs.setdefault("time_attr", "epoch")
    if spec.scheduler["name"] in ("asha", "hyperband", "bohb"):
        kwargs.setdefault("max_t", spec.max_epochs)
    return _by_name(SCHEDULERS[spec.scheduler["name"]], kwargs, "scheduler")


def _searcher(spec: SweepSpec) -> Any:
    name = spec.search["algorithm"]
    if SEARCHERS[name] is None:
        return None
    return _by_name(SEARCHERS[name], {k: v for k, v in spec.search.items() if k != "algorithm"}, "search")


def _trainable(spec: SweepSpec) -> Any:
    import ray
    from ray import tune
    return tune.with_resources(_trial_driver(spec), driver_resources(ray.cluster_resources()))


def make_tuner(spec: SweepSpec, max_concurrent: int) -> Any:
    """A new Tuner over the spec's space."""
    from ray import tune
    return tune.Tuner(
        _trainable(spec), param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    max_concurrent_trials=max_concurrent, scheduler=_scheduler(spec),
                                    search_alg=_searcher(spec),
                                    trial_name_creator=lambda t: t.trial_id,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(Path(spec.sweep_dir).parent) if not spec.remote
                                  else spec.storage, failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  callbacks=wandb_callbacks(spec), verbose=1))


def wandb_callbacks(spec: SweepSpec) -> list[Any]:
    """[WandbTrials] unless wandb is disabled; online without credentials falls back to offline."""
    if spec.wandb["mode"] == "disabled":
        return []
    mode = offline_without_credentials(spec.wandb["mode"], lambda line: print(line, file=sys.stderr, flush=True))
    return [_wandb_trials_class()(spec, mode)]


def _wandb_trials_class() -> type:
    from ray import tune

    class WandbTrials(tune.Callback):
        """One wandb run per trial (id = trial id, group = the sweep's name, config = the trial's overrides), logged
        from the Tune driver process itself as each epoch's report arrives, and finished when the trial ends: so
        a trial that ASHA ends abruptly still has its whole history (Ray's WandbLoggerCallback logs from an actor
        that can be killed with the last results unwritten). Offline runs land in the trial's Tune folder
        (`trial_<id>/wandb/offline-run-*`); `wandb sync` uploads them."""

        def __init__(self, spec: SweepSpec, mode: str) -> None:
            self.spec, self.mode, self.runs = spec, mode, {}

        def _run(self, trial: Any) -> Any:
            if trial.trial_id not in self.runs:
                import wandb
                Path(trial.local_path).mkdir(parents=True, exist_ok=True)
                self.runs[trial.trial_id] = wandb.init(
                    project=self.spec.wandb["project"], entity=self.spec.wandb["entity"], group=self.spec.name,
                    name=trial.trial_id, id=trial.trial_id, resume="allow", mode=self.mode,
                    dir=str(Path(trial.local_path).resolve()), reinit="create_new",
                    config={"overrides": self.spec.trial_overrides(trial.config), **trial.config})
            return self.runs[trial.trial_id]

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            values = {k: v for k, v in result.items() if k.startswith("val/") or k in ("epoch", "world_size")}
            self._run(trial).log(values, step=int(result.get("step", 0)))

        def _finish(self, trial: Any) -> None:
            run = self.runs.pop(trial.trial_id, None)
            if run is not None:
                run.finish()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            for trial in trials:
                self._finish(trial)

    return WandbTrials


def can_restore(spec: SweepSpec) -> bool:
    from ray import tune
    return bool(tune.Tuner.can_restore(spec.sweep_dir))


def restore_tuner(spec: SweepSpec) -> Any:
    """The interrupted sweep's Tuner: finished trials stay finished, unfinished ones continue from their
    checkpoints, failed ones are retried."""
    from ray import tune
    return tune.Tuner.restore(spec.sweep_dir, trainable=_trainable(spec), resume_unfinished=True,
                              resume_errored=True)
