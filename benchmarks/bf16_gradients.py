"""How far the bf16-autocast gradient is from the float32 one, next to the gradient's own sampling noise.

    python benchmarks/bf16_gradients.py RUN_DIR/checkpoints/last.pt --data-root ../shared/data

Loads a trained checkpoint (model weights, not EMA), takes one training batch of 250 real MNIST images, and
computes the float32 gradient of the training loss (the reference). Per parameter group it then reports the
cosine similarity of the reference with
- `bf16`: the same batch and the same z/u/t noise under bf16 autocast (what mixed precision changes);
- `other_noise`: float32, the same batch, other noise (the estimator's own noise);
- `other_batch`: float32, another batch (minibatch noise).
A bf16 cosine below the two noise columns means mixed precision degrades the gradient more than sampling does.
Results go to `--out` as JSON; the table is printed. The backward pass runs outside autocast, as in training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dvp.checkpoint import load_checkpoint
from dvp.config import from_dict
from dvp.data import load_data, model_inputs
from dvp.model import HierarchicalVAE, build_model
from dvp.objectives import elbo_stats

BATCH = 250


def group_of(name: str) -> str:
    """encoder.stem / encoder.groups.<g> / layers.<prior|posterior|z_up|resnet> / head / prior_u / ..."""
    parts = name.split(".")
    if parts[0] == "layers":
        return "layers." + parts[2]
    if parts[0] == "encoder":
        return ".".join(parts[:3]) if parts[1] == "groups" else "encoder." + parts[1]
    return parts[0]


def gradient(model: HierarchicalVAE, x: torch.Tensor, x_target: torch.Tensor, bf16: bool,
             seed: int) -> dict[str, torch.Tensor]:
    """Flattened gradient of the training loss per parameter group; noise from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        terms = model(x, x_target)
    elbo_stats(terms, model.image_shape)["loss"].backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(group_of(name), []).append(p.grad.flatten())
    return {k: torch.cat(v) for k, v in groups.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-root", required=True, help="directory with mnist.npz")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_gradients.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load_checkpoint(Path(args.checkpoint))
    cfg = from_dict(state["config"])
    model = build_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["engine"]["model"])
    train = load_data("mnist", args.data_root).train
    g = torch.Generator().manual_seed(0)
    batch_a = model_inputs(train[:BATCH], binarize=True, generator=g)
    batch_b = model_inputs(train[BATCH:2 * BATCH], binarize=True, generator=g)
    ref = gradient(model, *batch_a, bf16=False, seed=7)
    compared = {"bf16": gradient(model, *batch_a, bf16=True, seed=7),
                "other_noise": gradient(model, *batch_a, bf16=False, seed=8),
                "other_batch": gradient(model, *batch_b, bf16=False, seed=7)}
    cosine = {k: {c: torch.nn.functional.cosine_similarity(ref[k], grads[k], 0).item()
                  for c, grads in compared.items()} for k in ref}
    rel_err = {k: ((compared["bf16"][k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}
    out = {"checkpoint": str(args.checkpoint), "step": state["loop"].get("step"), "batch": BATCH,
           "cosine": cosine, "bf16_relative_error": rel_err}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"{'group':22s} {'bf16':>8s} {'other_noise':>12s} {'other_batch':>12s} {'bf16 rel err':>13s}")
    for k in sorted(cosine):
        c = cosine[k]
        print(f"{k:22s} {c['bf16']:8.4f} {c['other_noise']:12.4f} {c['other_batch']:12.4f} {rel_err[k]:13.4f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
