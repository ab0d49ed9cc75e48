"""How far the bf16-autocast gradient is from the float32 one, next to the gradient's own sampling noise.

    python benchmarks/bf16_gradients.py RUN_DIR/checkpoints/last.pt --data-root ../shared/data

Loads a trained checkpoint (model weights, not EMA), takes one training batch of 250 real MNIST images, and
computes the float32 gradient of the training loss (the reference). Per parameter group it then reports the
cosine similarity of the reference with
- `bf16`: the same batch and the same z/u/t noise under bf16 autocast (what mixed precision changes);
- `deepspeed_bf16`: the same, through the DeepSpeed engine (`train.precision=bf16`: its torch_autocast mode with
  the float32 modules kept, float32 parameters and gradients), ZeRO stage `--zero-stage`, one process;
- `other_noise`: float32, the same batch, other noise (the estimator's own noise);
- `other_batch`: float32, another batch (minibatch noise).
A bf16 cosine below the two noise columns means mixed precision degrades the gradient more than sampling does.
Results go to `--out` as JSON; the table is printed. The backward pass runs outside autocast, as in training.
Everything runs on the run's device (the GPU when there is one: autocast on CUDA, float32 without TF32).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dvp.core.config import from_dict
from dvp.core.noise import Noise
from dvp.data.batches import model_inputs
from dvp.data.datasets import load_data
from dvp.model.objectives import elbo_stats
from dvp.model.precision import autocast, float32_math
from dvp.model.vae import HierarchicalVAE, build_model
from dvp.parallel.context import DistContext, init
from dvp.parallel.launch import detect
from dvp.train.checkpoint import load_checkpoint
from dvp.train.engines import make_engine

BATCH = 250


def group_of(name: str) -> str:
    """encoder.stem / encoder.groups.<g> / layers.<prior|posterior|z_up|resnet> / head / prior_u / ..."""
    parts = name.split(".")
    if parts[0] == "layers":
        return "layers." + parts[2]
    if parts[0] == "encoder":
        return ".".join(parts[:3]) if parts[1] == "groups" else "encoder." + parts[1]
    return parts[0]


def noise(seed: int, n: int) -> Noise:
    return Noise(seed, n, 0, n)


def grouped(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(group_of(name), []).append(p.grad.flatten().float())
    return {k: torch.cat(v) for k, v in groups.items()}


def gradient(model: HierarchicalVAE, x: torch.Tensor, x_target: torch.Tensor, bf16: bool,
             seed: int) -> dict[str, torch.Tensor]:
    """Flattened gradient of the training loss per parameter group; noise from `seed`."""
    model.zero_grad(set_to_none=True)
    with autocast("bf16" if bf16 else "fp32", x.device):
        terms = model(x, x_target, noise=noise(seed, len(x)))
    elbo_stats(terms, model.image_shape)["loss"].backward()
    return grouped(model)


def deepspeed_gradient(state: dict, x: torch.Tensor, x_target: torch.Tensor, seed: int, stage: int,
                       ctx: DistContext) -> dict[str, torch.Tensor]:
    """The same gradient through the DeepSpeed engine in bf16 (one process, ZeRO `stage`, gradient read after
    DeepSpeed's backward: stage 0 keeps it whole on the parameters)."""
    cfg = from_dict({**state["config"], "train": {**state["config"]["train"], "precision": "bf16"},
                     "dist": {**state["config"]["dist"], "engine": "deepspeed", "zero_stage": stage,
                              "micro_batch": None}})
    cfg.train.batch_size = len(x)
    model = build_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["engine"]["model"])
    engine = make_engine(model, cfg, tuple(state["image_shape"]), ctx)
    terms = engine.ds(x, x_target, noise=noise(seed, len(x)))
    engine.ds.backward(elbo_stats(terms, engine.image_shape)["loss"])
    return grouped(engine.module)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-root", required=True, help="directory with mnist.npz")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of the DeepSpeed column (0 keeps "
                   "whole gradients on the parameters)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_gradients.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load_checkpoint(Path(args.checkpoint))
    cfg = from_dict(state["config"])
    ctx = init(detect({}))
    model = build_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["engine"]["model"])
    model.to(ctx.device)
    train = load_data("mnist", args.data_root).train.to(ctx.device)
    batch_a = model_inputs(train[:BATCH], binarize=True, noise=noise(0, BATCH))
    batch_b = model_inputs(train[BATCH:2 * BATCH], binarize=True, noise=noise(1, BATCH))
    with float32_math(tf32=False):
        ref = gradient(model, *batch_a, bf16=False, seed=7)
        compared = {"bf16": gradient(model, *batch_a, bf16=True, seed=7),
                    "deepspeed_bf16": deepspeed_gradient(state, *batch_a, seed=7, stage=args.zero_stage,
                                                         ctx=ctx),
                    "other_noise": gradient(model, *batch_a, bf16=False, seed=8),
                    "other_batch": gradient(model, *batch_b, bf16=False, seed=7)}
    cosine = {k: {c: torch.nn.functional.cosine_similarity(ref[k], grads[k], 0).item()
                  for c, grads in compared.items()} for k in ref}
    rel_err = {k: {c: ((compared[c][k] - ref[k]).norm() / ref[k].norm()).item()
                   for c in ("bf16", "deepspeed_bf16")} for k in ref}
    out = {"checkpoint": str(args.checkpoint), "device": str(ctx.device), "step": state["loop"].get("step"),
           "batch": BATCH,
           "zero_stage": args.zero_stage, "cosine": cosine, "relative_error": rel_err}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"{'group':22s} {'bf16':>8s} {'ds_bf16':>8s} {'other_noise':>12s} {'other_batch':>12s} "
          f"{'bf16 rel err':>13s} {'ds rel err':>11s}")
    for k in sorted(cosine):
        c, e = cosine[k], rel_err[k]
        print(f"{k:22s} {c['bf16']:8.4f} {c['deepspeed_bf16']:8.4f} {c['other_noise']:12.4f} "
              f"{c['other_batch']:12.4f} {e['bf16']:13.4f} {e['deepspeed_bf16']:11.4f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
