"""The training loop: epochs of engine steps, the LR schedule, validation, checkpoints, early stopping.

    run_dir = train(compose(["experiment=mnist/dvp_vae", "data.root=../shared/data"]))          # one process
    run_dir = train(cfg, overrides, ctx)   # every rank of a launch (ctx = dvp.parallel.context.init(detect(environ)))

A run, as calls to its components: `Checkpointer.read_last` (last.pt, when resuming) and `resume_config`,
`prepare` (data, model fitted to them), `Checkpointer.restore` (the engine, the batch position, the loop state),
the `RunLogger`, then `_Run.fit`: per batch `Engine.step`, per epoch `_end_of_epoch` (validation, images, best.pt),
`Checkpointer.save` of last.pt (every epoch, every ckpt_every steps, at a pause or a signal); `final_eval`.

Recipe (docs/model.md §8, eq. (28)): per-epoch LR, linear warm-up lr = base (e+1)/W for e < W, then cosine
lr(e) = lr_min + (base - lr_min) (1 + cos(pi e / lr_epochs)) / 2; validation of the EMA model every epoch
(-ELBO in bits/dim with the one-sample diffusion term, fixed noise); `checkpoints/best.pt` when it improves,
`checkpoints/last.pt` every epoch, every `ckpt_every` steps, at a budget stop and on Ctrl-C / SIGTERM / SIGUSR1;
early stop after `patience` epochs without improvement.

Many processes: every rank runs this loop on the same global batches (the engine takes its rows); rank 0
resolves the run dir and does all the writing; the stop decisions are the same on every rank (the loop state is,
and a signal or the clock is agreed in each step's statistics all-reduce); checkpoints are collective (see
`Checkpointer.save`).

Resume: `dvp-train run_dir=DIR` (the same command, given the run's run_dir=) continues from last.pt with the
weights, EMA, optimizer, loop counters (step, epoch, best validation, patience), batch position and RNG
restored, and `metrics.jsonl`
cut back to the records that existed when last.pt was written, at any world size (tests/test_distributed.py). So
after a kill -9 anywhere, or a stop by
`max_steps` / `max_minutes` (a pause: no validation, no patience counted), the resumed run ends with the same
weights (bitwise on CPU), the same best.pt and the same records as one that never stopped. Tested in
tests/test_resume.py.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dvp.core.config import parse_overrides, split_overrides, to_dict
from dvp.core.errors import ConfigError, Interrupted, TrainingStopped
from dvp.core.paths import check_output_dir, replace_atomically
from dvp.core.signals import SIGNALS, StopSignals, signal_name
from dvp.data.batches import BatchIterator, model_inputs
from dvp.data.datasets import DataSplits, load_data_config
from dvp.evaluate.sharded import evaluate_elbo, evaluate_test
from dvp.model.precision import configure_training
from dvp.model.vae import HierarchicalVAE, build_model, parameter_counts
from dvp.parallel.context import DistContext, init
from dvp.parallel.launch import detect
from dvp.train.checkpoint import load_checkpoint
from dvp.train.checkpointer import Checkpointer, LoopState
from dvp.train.config import from_dict, validate
from dvp.train.engine import Engine, StepStats
from dvp.train.logger import RunLogger

EpochReport = Callable[[dict[str, float], Path], None]
"""Called on every rank after each epoch's last.pt: (the epoch's validation metrics with epoch and step, last.pt)."""
STOP_FILE = "stop.json"
"""Written by rank 0 when training ends by itself (not when killed or signalled): step, epoch and the reason."""


def lr_at(epoch: int, t: DictConfig) -> float:
    """Per-epoch learning rate: linear warm-up for `warmup_epochs`, then cosine from lr to lr_min."""
    if epoch < t.warmup_epochs:
        return t.lr * (epoch + 1) / t.warmup_epochs
    return t.lr_min + (t.lr - t.lr_min) * (1 + math.cos(math.pi * min(epoch, t.lr_epochs) / t.lr_epochs)) / 2


def prepare(cfg: DictConfig, world_size: int = 1) -> tuple[DataSplits, HierarchicalVAE]:
    """Load the data (errors before any compute), check the config against its shape and the world size, build
    the model and fit the DCT normalisation on the training split only."""
    data = load_data_config(cfg.data)
    validate(cfg, data.shape, n_train=len(data.train), world_size=world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.shape)
    model.fit_to_data(data.train)
    return data, model


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    name = cfg.experiment or "default"
    return Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")


def resume_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The saved config with this command's overrides on top; model and data keys cannot change."""
    merged = OmegaConf.merge(OmegaConf.create(saved), parse_overrides(
        [(k, v) for k, v in split_overrides(overrides) if k not in ("experiment", "run_dir", "train.resume")]))
    for section in ("model", "data"):
        if OmegaConf.to_container(merged[section]) != saved[section]:
            raise ConfigError(f"cannot change {section}.* when resuming {cfg.run_dir}; "
                              "start a new run_dir for a different model or data")
    return from_dict(OmegaConf.to_container(merged))


def train(cfg: DictConfig, overrides: list[str] | None = None, ctx: DistContext | None = None,
          report: EpochReport | None = None) -> Path:
    """Train (or resume) the run described by `cfg` on the processes of `ctx` (default: this process alone, see
    `dvp.parallel`); returns the run directory. `report` is called at every epoch end (e.g. to tell Ray Tune);
    `run_dir/stop.json` records why training ended when it ended by itself.

    Every check (config, run dir, checkpoint, data) happens before anything is written; rank 0 resolves and
    checks the run dir and does all the writing. SIGTERM/SIGUSR1 save `last.pt` and raise `Interrupted`."""
    ctx = ctx or init(detect({}), device=cfg.dist.device)
    run_dir = ctx.on_main(lambda: _checked_run_dir(cfg))
    checkpoints = Checkpointer(run_dir, ctx)
    saved = checkpoints.read_last(required=cfg.train.resume)
    if saved is not None:
        cfg = resume_config(cfg, saved["config"], overrides or [])
    cfg.run_dir = str(run_dir)
    data, model = prepare(cfg, ctx.world_size)
    _configure_process(cfg.train, ctx)
    batches = BatchIterator(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, drop_last=True,
                            flip=cfg.data.flip)
    engine, state = checkpoints.restore(cfg, model, data.shape, batches, saved)
    # nothing is written before this line: every bad input has failed above
    if ctx.is_main:
        _start_run_dir(cfg, checkpoints)
    log = _logger(cfg, len(batches), state, ctx)
    _announce(cfg, model, engine, len(batches), state, saved is not None, log, ctx)
    run = _Run(cfg, data, engine, batches, state, log, checkpoints, ctx, report)
    try:
        with run.signals:
            run.record_stop(run.fit())
            if cfg.train.final_eval:
                run.final_eval()
    finally:
        log.close()
    return run_dir


def _checked_run_dir(cfg: DictConfig) -> Path:
    run_dir = resolve_run_dir(cfg)
    check_output_dir(run_dir, "run_dir")
    return run_dir


def _configure_process(t: DictConfig, ctx: DistContext) -> None:
    """This process's threads (train.num_threads), denormals and TF32 / cudnn settings."""
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.set_flush_denormal(True)    # CPU: subnormal floats (seen early in training) make steps up to 8x slower
    configure_training(t.tf32, ctx.device)    # CUDA: TF32 only with train.tf32, cudnn.benchmark


def _start_run_dir(cfg: DictConfig, checkpoints: Checkpointer) -> None:
    """Rank 0, before training writes anything else: the run dir, without stale temporaries or an old stop.json,
    and the run's config.yaml."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_stale_temporaries()
    (run_dir / STOP_FILE).unlink(missing_ok=True)     # training goes on: the old stop no longer holds
    replace_atomically(run_dir / "config.yaml", lambda tmp: tmp.write_text(OmegaConf.to_yaml(cfg)))


def _logger(cfg: DictConfig, steps_per_epoch: int, state: LoopState, ctx: DistContext) -> RunLogger:
    """The run's logger (writing on rank 0 only), metrics.jsonl cut back to the records of the resumed state."""
    t = cfg.train
    total = min(t.max_epochs * steps_per_epoch, t.max_steps or math.inf)
    return RunLogger(Path(cfg.run_dir), to_dict(cfg), total_steps=int(total), enabled=ctx.is_main,
                     wandb_mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
                     group=cfg.wandb.group, log_checkpoints=cfg.wandb.log_checkpoints,
                     start_step=state.step, keep_records=state.records)


def _announce(cfg: DictConfig, model: HierarchicalVAE, engine: Engine, steps_per_epoch: int, state: LoopState,
              resumed: bool, log: RunLogger, ctx: DistContext) -> None:
    """The parameter counts (to the log) and the run's first lines: run dir, size, engine, devices, hosts."""
    counts = parameter_counts(model)
    log.log_summary({f"params/{k}": v for k, v in counts.items()})
    if ctx.is_main:
        print(f"run_dir={cfg.run_dir}  params={counts['total']:,}  steps/epoch={steps_per_epoch}  "
              f"{type(engine).__name__} x {ctx.world_size} (micro-batch {engine.micro}, accumulation "
              f"{engine.accumulation})  {'resumed at step ' + str(state.step) if resumed else 'new run'}",
              flush=True)
        print(ctx.devices_line(cfg.train.precision), flush=True)
        if ctx.world_size > 1:
            print(f"hosts: {ctx.where()}", flush=True)
    if ctx.world_size > 1 and ctx.local_rank == 0:       # each host's own interface, in some log
        print(ctx.host_line(), flush=True)


class _Run:
    """One invocation of the loop over a prepared engine: `fit` trains until a stop, `final_eval` tests best.pt.

    Kill safety: `last.pt` records the loop state, batch position, RNG and how many metric records exist; a run
    killed anywhere resumes from it and redoes exactly what followed, so its records and weights end up as an
    uninterrupted run's. An epoch ends with validation, images, `best.pt`, then `last.pt`; a budget stop
    (`max_steps`, `max_minutes`) in the middle of an epoch is a pause: `last.pt` only, no validation.
    """

    def __init__(self, cfg: DictConfig, data: DataSplits, engine: Engine, batches: BatchIterator,
                 state: LoopState, log: RunLogger, checkpoints: Checkpointer, ctx: DistContext,
                 report: EpochReport | None = None) -> None:
        self.cfg, self.data, self.engine, self.batches, self.state = cfg, data, engine, batches, state
        self.log, self.checkpoints, self.ctx, self.report = log, checkpoints, ctx, report
        self.run_dir = Path(cfg.run_dir)
        self.last, self.best = checkpoints.last, checkpoints.best
        self.signals = StopSignals()
        t = cfg.train
        self.max_steps = t.max_steps or math.inf
        self.deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else math.inf
        self.out_of_time = False
        self.stop_signal = 0      # the signal all ranks agreed to stop for (0: none yet)

    def checkpoint(self, path: Path, state: LoopState | None = None,
                   batches: dict[str, int] | None = None) -> None:
        """Save the run (or the given loop state and batch position) to `path` (`Checkpointer.save`, collective),
        with the metric records written so far; signals wait until it is done."""
        with self.signals.deferred():
            self.checkpoints.save(path, self.engine, state or replace(self.state, records=self.log.records),
                                  batches or self.batches.state_dict())

    def record_stop(self, reason: str) -> None:
        """Rank 0: why training ended by itself, printed and in run_dir/stop.json."""
        if self.ctx.is_main:
            print(f"stopped at step {self.state.step}: {reason}", flush=True)
            record = {"step": self.state.step, "epoch": self.state.epoch, "reason": reason}
            replace_atomically(self.run_dir / STOP_FILE, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))

    def _stop_reason(self) -> str | None:
        """Why the run stops now, or None. Every input is the same on every rank (the loop state, and the clock
        through `_agreed_stop`), so all ranks stop together."""
        s, t = self.state, self.cfg.train
        if s.epoch >= t.max_epochs:
            return f"finished {t.max_epochs} epochs"
        if s.epochs_since_best >= t.patience:
            return f"early stop: no validation improvement for {t.patience} epochs"
        if s.step >= self.max_steps:
            return f"train.max_steps={t.max_steps} reached (a pause: a larger train.max_steps goes on)"
        if self.out_of_time:
            return (f"train.max_minutes={t.max_minutes} reached (a pause: the same command with this run_dir= "
                    "goes on)")
        return None

    def _stop_votes(self) -> list[float]:
        """This rank's votes to stop now: [out of time, got SIGNALS[0], got SIGNALS[1], ...] (0 or 1 each)."""
        received = self.signals.received
        return [float(time.monotonic() > self.deadline), *(float(received == s) for s in SIGNALS)]

    def _agreed_stop(self, votes: list[float] | None = None) -> bool:
        """Whether any rank got a signal or ran out of time: from `votes`, the ranks' `_stop_votes` summed
        (the engine sums them with a step's statistics), or agreed now in one all-reduce. Sets `out_of_time`,
        `stop_signal` (the largest signal number any rank got, 0: none) and `signals.received` on every
        rank."""
        if votes is None:
            mine = torch.tensor(self._stop_votes(), dtype=torch.float32, device=self.ctx.device)
            votes = self.ctx.all_reduce_sum(mine).tolist()
        late, counts = votes[0], votes[1:]
        self.stop_signal = max([self.stop_signal, *(int(s) for s, n in zip(SIGNALS, counts) if n > 0)])
        if self.stop_signal and self.signals.received is None:
            self.signals.received = self.stop_signal      # another rank was signalled: stop with it
        self.out_of_time = self.out_of_time or late > 0
        return bool(self.stop_signal or late > 0)

    def _interrupted(self, signum: int, where: str) -> Interrupted:
        return Interrupted(f"{signal_name(signum)} {where}; {self.last} holds step {self.state.step}: "
                           f"resume with dvp-train run_dir={self.run_dir}", signum, saved=True)

    def fit(self) -> str:
        """Train epochs until max_epochs, patience, max_steps or max_minutes; returns why it stopped. Signals
        are acted on between steps (save, then raise `Interrupted`) and during validation (see `_end_epoch`)."""
        with self.signals.deferred():
            while (reason := self._stop_reason()) is None:
                self._train_steps()
                if self.stop_signal:       # agreed: every rank saves (one signalled after the vote goes on)
                    self.checkpoint(self.last)
                    raise self._interrupted(self.stop_signal, "during training")
                epoch_complete = (self.batches.epoch > self.state.epoch
                                  or self.batches.state_dict()["position"] == len(self.batches))
                if not epoch_complete:                    # a budget stop mid-epoch: a pause, not an epoch end
                    self.checkpoint(self.last)
                    continue
                self._end_epoch()
            return reason

    def _train_steps(self) -> None:
        """Optimizer steps on global batches until the epoch ends, a budget runs out or a signal arrives on any
        rank. Each step's decision (the votes, train.max_skips) is read after the next step is queued: the host
        waits for step n while step n + 1 runs, so only a logged step waits for the device (the same rule on
        every rank: all stop after the same step)."""
        t, state, engine = self.cfg.train, self.state, self.engine
        engine.set_lr(lr_at(state.epoch, t))
        tick, seen = time.perf_counter(), 0
        pending: tuple[StepStats, int] | None = None      # the last step whose decision is not read yet
        for x in self.batches:
            stats = engine.step(x, state.step, self._stop_votes)    # the stop: agreed with the stats
            state.step += 1
            seen += len(x)
            if state.step % t.log_every == 0:
                self.log.log_train(state.step, stats, seen / (time.perf_counter() - tick))
                tick, seen = time.perf_counter(), 0
            if t.ckpt_every and state.step % t.ckpt_every == 0:
                self.checkpoint(self.last)
            stop = pending is not None and self._decide(*pending)
            pending = (stats, state.step)
            if stop or state.step >= self.max_steps:
                break
        if pending is not None:
            self._decide(*pending)

    def _decide(self, stats: StepStats, step: int) -> bool:
        """Step `step`'s decision: stop the run after train.max_skips skipped steps in a row (TrainingStopped,
        last.pt saved), and whether any rank voted to stop (see `_agreed_stop`)."""
        t = self.cfg.train
        if stats.consecutive_skips >= t.max_skips:
            self.checkpoint(self.last)
            raise TrainingStopped(
                f"{stats.consecutive_skips} consecutive steps skipped at step {step} (last loss "
                f"{stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g}): lower train.lr, raise "
                "train.grad_skip (or 0 to disable), or use train.precision=fp32")
        return self._agreed_stop(stats.votes)

    def _end_epoch(self) -> None:
        """Validation, images and best.pt of the finished epoch, then last.pt. In one process a signal in
        between saves the state from before the epoch end (so a resumed run redoes it) and raises; with more,
        it is agreed after the epoch end (ranks must not leave a collective halfway)."""
        before = replace(self.state, records=self.log.records)
        position = {"epoch": self.state.epoch, "position": len(self.batches)}
        try:
            with self.signals.raising() if self.ctx.world_size == 1 else nullcontext():
                metrics = _end_of_epoch(self.cfg, self.engine, self.data, self.state, self.log, self.best,
                                        self.checkpoint, self.ctx)
        except Interrupted as e:
            self.state = before
            self.checkpoint(self.last, before, position)
            raise self._interrupted(e.signum, "during validation") from None
        self.state.epoch += 1
        self.batches.load_state_dict({"epoch": self.state.epoch, "position": 0})
        self.checkpoint(self.last)
        if self.report is not None:
            self.report({**metrics, "epoch": float(self.state.epoch), "step": float(self.state.step)}, self.last)
        if self._agreed_stop() and self.stop_signal:
            raise self._interrupted(self.stop_signal, "at the end of an epoch")

    def final_eval(self) -> None:
        """The test evaluation of best.pt (eval.*), sharded over the ranks, or a line saying why there is none."""
        if not self.best.exists():
            why = ("the run stopped before its first epoch ended" if self.state.epoch == 0
                   else "no validation loss was finite")
            if self.ctx.is_main:
                print(f"no final evaluation: {self.best} was not written ({why})", flush=True)
            return
        best = load_checkpoint(self.best)
        model = build_model(self.cfg, self.data.shape).to(self.engine.device)
        model.load_state_dict(best["engine"]["ema"])
        try:
            evaluate_test(model, self.data.test, self.cfg, self.best, self.log, self.state.step, ctx=self.ctx)
        except Interrupted as e:
            raise Interrupted(f"{signal_name(e.signum)} during the final evaluation; training is saved in "
                              f"{self.last}; the same command with run_dir={self.run_dir} redoes the "
                              "evaluation, or run dvp-eval "
                              f"run_dir={self.run_dir}", e.signum) from None


def _end_of_epoch(cfg: DictConfig, engine: Engine, data: DataSplits, state: LoopState, log: RunLogger,
                  best: Path, checkpoint: Any, ctx: DistContext) -> dict[str, float]:
    """Validate the EMA weights (sharded, the same numbers on every rank), keep the best checkpoint, write sample
    and reconstruction grids (rank 0); returns the validation metrics."""
    view = engine.eval_view("ema")
    metrics = evaluate_elbo(view, data.val, cfg, ctx, seed=cfg.data.split_seed, stream="val")
    metrics["skipped_total"] = float(engine.skipped_total)
    log.log_eval(state.step, state.epoch, "val", metrics)
    if ctx.is_main:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.data.split_seed)
            samples = view.sample(64)
            x = data.val[:32].to(engine.device)
            recon = view.reconstruct(model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)[0])
        log.log_images(state.step, "samples", samples, nrow=8)
        log.log_images(state.step, "reconstructions", torch.cat([x.cpu(), recon.cpu()]), nrow=8)
    if metrics["loss"] < state.best_val:
        state.best_val, state.epochs_since_best = metrics["loss"], 0
        checkpoint(best)
        log.log_checkpoint(best, ["best", f"step-{state.step}"])
    else:
        state.epochs_since_best += 1
    return metrics
