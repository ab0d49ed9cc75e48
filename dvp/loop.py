"""The training loop: epochs of engine steps, the LR schedule, validation, checkpoints, early stopping.

    run_dir = train(compose(["experiment=mnist/dvp_vae", "data.root=../shared/data"]))

Recipe (spec §3): per-epoch LR, linear warm-up lr = base (e+1)/W for e < W, then cosine
lr(e) = lr_min + (base - lr_min) (1 + cos(pi e / lr_epochs)) / 2; validation of the EMA model every epoch
(-ELBO in bits/dim with the one-sample diffusion term, fixed noise); `checkpoints/best.pt` when it improves,
`checkpoints/last.pt` every epoch, every `ckpt_every` steps and on interruption (Ctrl-C, SIGTERM); early stop
after `patience` epochs without improvement. A run resumes from last.pt with optimizer, EMA, schedule, RNG and
batch position restored, so it continues as if it had not stopped.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dvp.checkpoint import load_checkpoint, save_checkpoint
from dvp.config import ConfigError, from_dict, to_dict, validate
from dvp.data import BatchIterator, DataSplits, load_data_config, model_inputs
from dvp.engine import TorchEngine
from dvp.evaluate import evaluate_elbo, evaluate_test
from dvp.logger import RunLogger
from dvp.model import HierarchicalVAE, build_model, parameter_counts


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. a long run of skipped steps); the message says what to change."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    best_val: float = math.inf
    epochs_since_best: int = 0


def lr_at(epoch: int, t: DictConfig) -> float:
    """Per-epoch learning rate: linear warm-up for `warmup_epochs`, then cosine from lr to lr_min."""
    if epoch < t.warmup_epochs:
        return t.lr * (epoch + 1) / t.warmup_epochs
    return t.lr_min + (t.lr - t.lr_min) * (1 + math.cos(math.pi * min(epoch, t.lr_epochs) / t.lr_epochs)) / 2



def prepare(cfg: DictConfig) -> tuple[DataSplits, HierarchicalVAE]:
    """Load the data (errors before any compute), check the config against its shape, build the model and fit the
    DCT normalisation on the training split only."""
    data = load_data_config(cfg.data)
    validate(cfg, data.shape)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.shape)
    if cfg.model.name == "dvp_vae":
        model.pseudo_input.fit_scale(data.train)
    return data, model


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    name = cfg.experiment or "default"
    return Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")


def resume_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The saved config with this command's overrides on top; model and data keys cannot change."""
    merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(
        [o for o in overrides if o.split("=", 1)[0] not in ("experiment", "run_dir", "train.resume")]))
    for section in ("model", "data"):
        if OmegaConf.to_container(merged[section]) != saved[section]:
            raise ConfigError(f"cannot change {section}.* when resuming {cfg.run_dir}; "
                              "start a new run_dir for a different model or data")
    return from_dict(OmegaConf.to_container(merged))


class _Interrupt:
    """Turns SIGTERM (Slurm preemption, `kill`) and Ctrl-C into a flag checked between steps."""

    def __init__(self) -> None:
        self.flag = False
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set(self, signum: int, frame: Any) -> None:
        self.flag = True

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Train (or resume) the run described by `cfg`; returns the run directory."""
    run_dir = resolve_run_dir(cfg)
    last = run_dir / "checkpoints" / "last.pt"
    resume = last.exists()
    if cfg.train.resume and not resume:
        raise ConfigError(f"train.resume=true but {last} does not exist")
    saved = load_checkpoint(last) if resume else None
    if saved is not None:
        cfg = resume_config(cfg, saved["config"], overrides or [])
    cfg.run_dir = str(run_dir)
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    data, model = prepare(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = TorchEngine(model.to(device), t, data.shape)
    batches = BatchIterator(data.train, t.batch_size, shuffle=True, seed=t.seed, drop_last=True,
                            flip=cfg.data.flip)
    state = LoopState()
    if saved is not None:
        engine.load_state_dict(saved["engine"])
        batches.load_state_dict(saved["batches"])
        state = LoopState(**saved["loop"])
        torch.set_rng_state(saved["rng"]["torch"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    steps_per_epoch = len(batches)
    total = min(t.max_epochs * steps_per_epoch, t.max_steps or math.inf)
    log = RunLogger(run_dir, to_dict(cfg), total_steps=int(total), wandb_mode=cfg.wandb.mode,
                    project=cfg.wandb.project, entity=cfg.wandb.entity,
                    log_checkpoints=cfg.wandb.log_checkpoints, start_step=state.step)
    counts = parameter_counts(model)
    log.log_summary({f"params/{k}": v for k, v in counts.items()})
    print(f"run_dir={run_dir}  params={counts['total']:,}  steps/epoch={steps_per_epoch}  "
          f"{'resumed at step ' + str(state.step) if saved is not None else 'new run'}", flush=True)

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, {"config": to_dict(cfg), "image_shape": list(data.shape),
                               "engine": engine.state_dict(), "loop": asdict(state),
                               "batches": batches.state_dict(), "rng": {"torch": torch.get_rng_state()}})

    interrupt = _Interrupt()
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else math.inf
    max_steps = t.max_steps or math.inf
    stop = state.epochs_since_best >= t.patience
    try:
        while not stop and state.epoch < t.max_epochs and state.step < max_steps:
            engine.set_lr(lr_at(state.epoch, t))
            tick, seen = time.perf_counter(), 0
            for x in batches:
                x_enc, x_target = model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)
                stats = engine.step(x_enc, x_target)
                state.step += 1
                seen += len(x)
                if engine.consecutive_skips >= t.max_skips:
                    checkpoint(last)
                    raise TrainingStopped(
                        f"{engine.consecutive_skips} consecutive steps skipped at step {state.step} (last loss "
                        f"{stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g}): lower train.lr, raise "
                        "train.grad_skip (or 0 to disable), or use train.precision=fp32")
                if state.step % t.log_every == 0:
                    log.log_train(state.step, stats, seen / (time.perf_counter() - tick))
                    tick, seen = time.perf_counter(), 0
                if t.ckpt_every and state.step % t.ckpt_every == 0:
                    checkpoint(last)
                if interrupt.flag or state.step >= max_steps or time.monotonic() > deadline:
                    break
            if interrupt.flag:
                checkpoint(last)
                print(f"interrupted: saved {last} at step {state.step}; resume with dvp-train run_dir={run_dir}")
                return run_dir
            epoch_finished = batches.state_dict()["position"] == 0
            _end_of_epoch(cfg, engine, data, state, log, run_dir, checkpoint)
            state.epoch += epoch_finished
            if state.epochs_since_best >= t.patience:
                print(f"early stop: no validation improvement for {t.patience} epochs")
                stop = True
            stop = stop or time.monotonic() > deadline
            checkpoint(last)
        if t.final_eval:
            best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
            engine.ema.load_state_dict(best["engine"]["ema"])
            evaluate_test(engine.ema, data.test, cfg, run_dir / "checkpoints" / "best.pt", log, state.step)
    finally:
        interrupt.restore()
        log.close()
    return run_dir


def _end_of_epoch(cfg: DictConfig, engine: TorchEngine, data: DataSplits, state: LoopState, log: RunLogger,
                  run_dir: Path, checkpoint: Any) -> None:
    """Validate the EMA model, keep the best checkpoint, write sample and reconstruction grids."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.data.split_seed)
        metrics = evaluate_elbo(engine.ema, data.val, cfg)
        samples = engine.ema.sample(64)
        x = data.val[:32].to(engine.device)
        recon = engine.ema.reconstruct(model_inputs(x, cfg.data.binarize, cfg.data.encoder_sees)[0])
    metrics["skipped_total"] = float(engine.skipped_total)
    log.log_eval(state.step, state.epoch, "val", metrics)
    log.log_images(state.step, "samples", samples, nrow=8)
    log.log_images(state.step, "reconstructions", torch.cat([x.cpu(), recon.cpu()]), nrow=8)
    if metrics["loss"] < state.best_val:
        state.best_val, state.epochs_since_best = metrics["loss"], 0
        best = run_dir / "checkpoints" / "best.pt"
        checkpoint(best)
        log.log_checkpoint(best, ["best", f"step-{state.step}"])
    else:
        state.epochs_since_best += 1
