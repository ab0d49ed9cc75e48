"""Objectives and estimators on top of the model's per-example terms (docs/model.md §6-§7, eqs. (21)-(27)).

    -ELBO(x)  = -log p(x|z) + sum_l KL(q(z_l|.) || p(z_l|.)) + [log q(u|x) - log p(u)]        (nats)
    bits/dim  = -ELBO / (D ln 2),  D = C H W
    IS-NLL(x) = -[logsumexp_k log w_k - log K],  log w_k = log p(x, z_k, u_k) - log q(z_k, u_k | x)
    active units: the fraction of latent dimensions with Var_x(E_q[z]) > 0.01 (Burda et al. 2015), and > 0.001

The IS weight is the correct IWAE weight; `weight="analytic_kl"` reproduces the authors' estimator
log p(x|z_k) - sum_l KL_l - [log q(u_k|x) - log p(u_k)], which is not a valid bound and only exists to compare
with published numbers. With the diffusion prior's own bound inside log p(u), the IS-NLL is an upper bound.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dvp.core.noise import Noise
from dvp.model.vae import HierarchicalVAE, Terms


def bits_per_dim(nats: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """nats per image -> bits per dimension."""
    return nats / (math.prod(image_shape) * math.log(2))


def elbo_stats(terms: Terms, image_shape: tuple[int, int, int]) -> dict[str, Tensor]:
    """Batch means of the loss (bits/dim, the optimised quantity) and its parts in nats; all float32."""
    nelbo = terms.nelbo
    stats = {"loss": bits_per_dim(nelbo, image_shape).mean(), "nelbo": nelbo.mean(),
             "recon": terms.recon.mean(), "kl_z": terms.kl.sum(1).mean(), "kl_u": terms.kl_u.mean()}
    for i, kl in enumerate(terms.kl.mean(0)):
        stats[f"kl/{i}"] = kl
    return stats


@torch.no_grad()
def importance_sampled_nll(model: HierarchicalVAE, x: Tensor, x_target: Tensor, k: int, chunk: int,
                           weight: str = "iwae", noise: Callable[[int, int], Noise] | None = None) -> Tensor:
    """-log p(x) estimated with k importance samples from q, `chunk` samples per forward pass; shape [B].

    One target x_target (e.g. one binarisation) is shared by all k samples. The diffusion prior uses its T-point
    quadrature bound. `noise(start, n)` gives the draws of samples start..start+n (see dvp.core.noise; None: the
    default RNG).
    """
    if weight not in ("iwae", "analytic_kl"):
        raise ValueError(f"weight={weight!r}; choose 'iwae' or 'analytic_kl'")
    b, log_ws = x.shape[0], []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        rep = (n,) + (1,) * (x.dim() - 1)
        terms = model(x.repeat(rep), x_target.repeat(rep), quadrature=True,
                      noise=noise(start, n) if noise is not None else None)
        log_w = terms.log_w if weight == "iwae" else terms.log_w_analytic
        log_ws.append(log_w.view(n, b))
    return -(torch.logsumexp(torch.cat(log_ws, 0), 0) - math.log(k))


def _au_key(threshold: float) -> str:
    """'au' for the standard threshold 0.01, else 'au_<threshold>' written compactly: 0.001 -> 'au_1e-3'."""
    if threshold == 0.01:
        return "au"
    mantissa, exponent = f"{threshold:.0e}".split("e")
    return f"au_{mantissa}e{int(exponent)}"


def moments(mu_q: list[Tensor]) -> Tensor:
    """[n, sum_x mu_d(x), sum_x mu_d(x)^2 for every dimension d of every layer] in float64: what active units
    need, summable over processes."""
    flat = torch.cat([mu.double().flatten(1) for mu in mu_q], 1)
    n = torch.tensor([flat.shape[0]], dtype=torch.float64, device=flat.device)
    return torch.cat([n, flat.sum(0), flat.pow(2).sum(0)])


def active_units(mu_q: list[Tensor], thresholds: tuple[float, ...] = (0.01, 0.001),
                 summed: Tensor | None = None) -> dict[str, float]:
    """Fraction of latent dimensions with Var_x(E_q[z_l]) > t, for each threshold t, per layer and overall.

    A_t = #{d : Var_x(mu_d(x)) > t} / #{d}, the unbiased variance over the batch,
    Var = (sum mu^2 - (sum mu)^2 / n) / (n - 1), from `summed` (`moments` summed over the processes that hold
    parts of the batch) or from mu_q's own moments. Keys: 'au' and 'au/<l>' for t = 0.01 (Burda et al. 2015),
    'au_1e-3' and 'au_1e-3/<l>' for t = 0.001.
    """
    m = moments(mu_q) if summed is None else summed
    dims = [mu[0].numel() for mu in mu_q]
    n, s1, s2 = m[0], m[1:1 + sum(dims)], m[1 + sum(dims):]
    variances = ((s2 - s1.pow(2) / n) / (n - 1)).split(dims)
    total = sum(var.numel() for var in variances)
    out = {}
    for threshold in thresholds:
        key = _au_key(threshold)
        counts = [int((var > threshold).sum()) for var in variances]
        out.update({f"{key}/{i}": c / var.numel() for i, (c, var) in enumerate(zip(counts, variances))})
        out[key] = sum(counts) / total
    return out
