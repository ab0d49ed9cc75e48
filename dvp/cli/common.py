"""Shared command-line plumbing: `--help` prints the command's docstring and the main keys; configuration, data
and checkpoint errors print one clear line and exit 2 instead of a traceback; SIGTERM, SIGUSR1 and Ctrl-C end any
command within seconds with one line, after what the command saves on a stop (exit 0 when training was saved
after SIGTERM/SIGUSR1, a preemption; otherwise 128 + the signal number); a collective that fails because another
process of the job died is one line and exit 1."""
from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch.distributed as dist
from omegaconf import DictConfig

from dvp.core.config import SCHEMA, experiments
from dvp.core.errors import USER_ERRORS, ConfigError, Interrupted, PeerLost, one_line
from dvp.core.signals import StopSignals, held
from dvp.data.catalog import DATASETS
from dvp.model.checks import MODELS
from dvp.parallel.context import DistContext, init
from dvp.parallel.launch import detect

MAIN_KEYS = """
Main keys (any key of configs/defaults.yaml works as key=value):
  experiment=DATASET/MODEL   one of: {experiments}
  run_dir=DIR                run directory (default runs/<experiment>/<timestamp>)
  data.name=                 {data_name};  model.name={model_name}
  data.root=DIR              dataset files (e.g. data.root=../shared/data for mnist.npz); data.download=true
  model.latent_scales=[4,4]  latents per resolution, finest first;  model.ctx_size=K  pseudo-input k x k
  train.lr=  train.batch_size= (global)  train.max_epochs=  train.max_steps=  train.precision={train_precision}
  train.seed=  dist.zero_stage={dist_zero_stage}  dist.micro_batch=N (per process per forward)
  dist.engine={dist_engine}
  eval.is_samples=K          importance samples of the test NLL;  wandb.mode={wandb_mode}
"""
"""What --help prints after a command's docstring; the choices come from where they are declared."""


def main_keys() -> str:
    """MAIN_KEYS with this checkout's experiments and each key's choices."""
    choices = {k.replace(".", "_"): "|".join(map(str, s.choices)) for k, s in SCHEMA.keys.items() if s.choices}
    choices.update({"data_name": "|".join(DATASETS), "model_name": "|".join(MODELS)})
    return MAIN_KEYS.format_map({"experiments": ", ".join(experiments()), **choices})


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
             "Broken pipe", "Timed out waiting", "timed out", "Watchdog caught collective operation timeout")
"""What a collective raises (gloo's RuntimeError, NCCL's messages) when another rank of the job has died or its
host stopped answering (after dist.timeout_s). On NCCL the exception reaches Python only through blocking wait
(`dvp.parallel.launch.nccl_error_settings`): a DistBackendError, '... timed out in blocking wait' or 'NCCL error ...
remote process exited or there was a network error'."""
RESUME = "rerun the command with this run's run_dir= (its first line) to resume from the last checkpoint"
LOCAL_RANK_FLAG = "--local_rank"


def run_cli(fn: Callable[[list[str]], int], doc: str | None, argv: list[str], stop_signals: bool = True) -> int:
    """Run `fn(argv)`; '--help' prints the docstring; known user errors exit 2 with one line on stderr.
    `stop_signals=False` leaves SIGINT/SIGTERM to `fn` (Ray Tune handles them itself)."""
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n" + main_keys())
        return 0
    try:
        with StopSignals() if stop_signals else nullcontext():
            return fn(argv)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        return 0 if e.saved and e.signum != signal.SIGINT else 128 + e.signum
    except PeerLost as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (dist.DistError, RuntimeError) as e:
        if not _peer_failure(e):
            raise
        print(f"error: another process of this job failed or was stopped ({one_line(e)[:200]}); its own output "
              f"says why; {RESUME}", file=sys.stderr)
        return 1


def _peer_failure(error: BaseException) -> bool:
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and
                                                  any(p in str(error) for p in PEER_LOST))


@contextmanager
def peers_watched(ctx: DistContext, timeout_s: float) -> Iterator[None]:
    """Turns a collective that fails because another rank died or went silent into PeerLost, which names the
    rank and host that did not answer (a roll-call of the survivors through the rendezvous store)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if ctx.world_size == 1 or isinstance(e, (PeerLost, *USER_ERRORS, Interrupted)) or not _peer_failure(e):
            raise
        with held():                # torchrun's SIGTERM to the survivors must not cut the roll-call short
            lost = ctx.lost_peers()
        raise PeerLost(f"rank {ctx.rank} on {socket.gethostname()} lost {lost}: "
                       f"{one_line(e)[:160]} (dist.timeout_s={timeout_s:g}); the other ranks stop too; {RESUME}"
                       ) from None


def without_local_rank(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """`argv` without the `--local_rank=N` (or `--local_rank N`) that the deepspeed launcher puts before the
    script's arguments (`deepspeed --module dvp.train ...`; its `--no_local_rank` leaves it out). The device
    comes from the environment (LOCAL_RANK, which that launcher sets too; `dvp.parallel.launch.detect`): N is
    ignored, but one that disagrees with the environment's local rank is a ConfigError."""
    flags = [i for i, a in enumerate(argv) if a == LOCAL_RANK_FLAG or a.startswith(LOCAL_RANK_FLAG + "=")]
    if not flags:
        return argv
    if len(flags) > 1:
        raise ConfigError(f"{LOCAL_RANK_FLAG} is given {len(flags)} times; give it once (the deepspeed launcher "
                          "adds it) or not at all")
    i = flags[0]
    if "=" in argv[i]:
        text, end = argv[i].partition("=")[2], i + 1
    else:
        text, end = " ".join(argv[i + 1:i + 2]), i + 2
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"{LOCAL_RANK_FLAG} {text!r} is not a local rank: give {LOCAL_RANK_FLAG}=N (N >= 0) "
                          "or leave it out")
    env = detect(environ)
    if int(text) != env.local_rank:
        raise ConfigError(f"{LOCAL_RANK_FLAG}={int(text)} disagrees with the {env.launcher} environment's local "
                          f"rank {env.local_rank}: launch with one launcher, or leave the flag out")
    return argv[:i] + argv[end:]


def launch_context(dist_cfg: DictConfig | None = None) -> DistContext:
    """The distributed context of this launch (torchrun, deepspeed, srun, mpiexec, Ray or a plain process),
    with the device from DeepSpeed's accelerator abstraction; `dist_cfg` (dvp-train's `dist` section; None: the
    defaults) gives the device and how long ranks wait for each other (dist.device, dist.timeout_s,
    dist.rendezvous_timeout_s)."""
    if dist_cfg is None:
        return init(detect(os.environ))
    return init(detect(os.environ), timeout_s=dist_cfg.timeout_s, rendezvous_timeout_s=dist_cfg.rendezvous_timeout_s,
                device=dist_cfg.device)


def single_process_context(command: str) -> DistContext:
    """The context of a command that runs in one process; a multi-process launch is a one-line error."""
    env = detect(os.environ)
    if env.world_size > 1:
        raise ConfigError(f"{env.launcher} started {env.world_size} processes, but {command} runs in one process; "
                          "run it directly (dvp-train and dvp-eval use many)")
    return init(env)
