"""The hierarchical VAE: DVP-VAE, its Ladder baseline and the classic VampPrior, one code path (docs/model.md §1-§4).

Generative model (dvp_vae):  p(x, z, u) = p(u) prod_l p(z_l | z_{>l}, u) p(x | z_1..z_L)
Variational family:         q(u, z | x) = q(u | x) prod_l q(z_l | z_{>l}, x)
with u a pseudo-input (truncated DCT of x, `pseudo_input.py`), p(u) a diffusion prior (`diffusion.py`) and
q(u|x) = N(u~(x), diag(exp(omega))). `ladder` drops u; `vampprior` drops u and uses
p(z_L) = 1/K sum_k q(z_L | u_k) with K learnable pseudo-images u_k (Tomczak & Welling 2018).

Top-down pass, for each latent l from the top (docs/model.md §4, (15)-(18)), with s the top-down state (ones at top):
    c_l = AvgPool(to_image(u))                          context at this latent's resolution (dvp_vae)
    [mu_p, logvar_p, h] = ResBlock_p([s, c_l])            prior p(z_l | z_{>l}, u)
    [mu_q, logvar_q]    = ResBlock_q((e_l + s) / sqrt 2)  posterior q(z_l | z_{>l}, x), e_l from the encoder
    s <- s + h;  z_l ~ q (or p);  s <- Up(ResNet(s + Conv1x1(z_l)))
Likelihood (latent aggregation): x-params = Conv3x3(Conv1x1(sum_l Up(z_l) / sqrt L)).
Under bf16 autocast the convolutions that read a residual stream or output mu, log-var and logits compute in float32
(`blocks.Float32Conv2d`), and both residual streams (encoder h, top-down state s) stay float32.

`forward` returns every per-example term in float32: reconstruction, per-layer KL (analytic Gaussian KL;
a one-sample estimate for the VampPrior mixture), the u term log q(u|x) - log p(u) and the importance weight
    log w = log p(x|z) + sum_l [log p(z_l|.) - log q(z_l|.)] + log p(u) - log q(u|x)
evaluated at the sampled z and u (the correct IWAE weight, docs/model.md §7, eq. (25)).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.core.noise import Noise, randn_like
from dvp.model.blocks import DecoderResBlock, EncoderResBlock, conv
from dvp.model.checks import group_resolutions
from dvp.model.diffusion import DiffusionPrior
from dvp.model.likelihoods import Bernoulli, LogisticMixture
from dvp.model.pseudo_input import PseudoInput

LOG_2PI = math.log(2 * math.pi)


class _ClampInward(torch.autograd.Function):
    """y = clamp(w, lo, hi), whose gradient reaches w inside [lo, hi] and, outside, only where descent moves w
    back toward the box: dL/dw = g if lo <= w <= hi or (w > hi and g > 0) or (w < lo and g < 0), else 0.

    What the authors' in-place clamp of omega at every forward pass does to the optimisation (projected gradient:
    the parameter sits on the bound and leaves it when the gradient points inside), without writing into the
    parameter (a ZeRO-3 forward sees a gathered copy, where an in-place write is lost). torch.clamp's own
    gradient is 0 beyond a bound: a parameter an optimizer step pushed past it would stay there for good."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(w)
        ctx.bounds = (lo, hi)
        return w.clamp(lo, hi)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None, None]:
        (w,), (lo, hi) = ctx.saved_tensors, ctx.bounds
        passes = ((w >= lo) & (w <= hi)) | ((w > hi) & (g > 0)) | ((w < lo) & (g < 0))
        return g * passes, None, None


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over all but the batch axis."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))).flatten(1).sum(1)


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) = 1/2 [lv_p - lv_q + (e^lv_q + (mu_q-mu_p)^2)/e^lv_p - 1]."""
    kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0)
    return kl.flatten(1).sum(1)


class Terms(NamedTuple):
    """Per-example float32 terms of one pass; shapes [B] unless noted. A NamedTuple, so that DeepSpeed's ZeRO-3
    hooks see the tensors a forward pass returns (and gather the root module's parameters for backward)."""
    recon: Tensor          # -log p(x | z)
    kl: Tensor             # [B, L] KL of each z layer, top first
    kl_u: Tensor           # log q(u|x) - log p(u) (zeros without u)
    log_w: Tensor          # log p(x, z, u) - log q(z, u | x) at the sample
    log_w_analytic: Tensor  # the authors' weight: log p(x|z) - sum_l KL_l - kl_u (optimistic; comparison only)
    mu_q: list[Tensor]     # posterior means per layer (for active units)

    @property
    def nelbo(self) -> Tensor:
        """-ELBO = -log p(x|z) + sum_l KL_l + [log q(u|x) - log p(u)]."""
        return self.recon + self.kl.sum(1) + self.kl_u


class Encoder(nn.Module):
    """x -> one feature map per latent group, finest first; shared by all latents of that resolution."""

    def __init__(self, c: int, num_ch: int, hid: int, blocks: int, n_groups: int, start_at_x: bool,
                 mean: float | None, std: float | None) -> None:
        super().__init__()
        self.stem = conv(c, num_ch, 1, float32=True)   # keeps the residual stream h float32 under autocast
        self.groups = nn.ModuleList(nn.Sequential(*[EncoderResBlock(num_ch, hid, num_ch) for _ in range(blocks)])
                                    for _ in range(n_groups))
        self.pools = [1 if i == 0 and start_at_x else 2 for i in range(n_groups)]
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.mean is not None:
            x = (x * 127.5 + 127.5 - self.mean) / self.std
        h, feats = self.stem(x), []
        for group, pool in zip(self.groups, self.pools):
            h = group(h)
            h = F.avg_pool2d(h, pool) if pool > 1 else h
            feats.append(h)
        return feats


class LatentLayer(nn.Module):
    """One latent z_l of the top-down ladder: prior head, posterior head, z_up and the state ResNet.

    The last layer's ResNet is the identity (docs/model.md §4); under latent aggregation nothing reads the state after
    the last latent, so that layer has no z_up either (the authors' code keeps an unused one: 64 parameters on MNIST).
    """

    def __init__(self, num_ch: int, hid: int, zc: int, ctx_ch: int, prior_stats: bool, last: bool,
                 state_read_after: bool, init_scale: float, logvar_range: tuple[float, float]) -> None:
        super().__init__()
        self.zc, self.prior_stats, self.logvar_range = zc, prior_stats, logvar_range
        self.prior = DecoderResBlock(num_ch + ctx_ch, hid, 2 * zc * prior_stats + num_ch, out_scale=0.0,
                                     float32_out=True)
        self.posterior = DecoderResBlock(num_ch, hid, 2 * zc, out_scale=0.0, float32_out=True)
        self.z_up = conv(zc, num_ch, 1) if state_read_after else None
        if self.z_up is not None:
            self.z_up.weight.data.mul_(init_scale)
        self.resnet = nn.Identity() if last else DecoderResBlock(num_ch, hid, num_ch, out_scale=init_scale)

    def _stats(self, out: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = out[:, :self.zc].float(), out[:, self.zc:2 * self.zc].float()
        return mu, logvar.clamp(*self.logvar_range)

    def prior_stats_and_h(self, s: Tensor, ctx: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor]:
        out = self.prior(s if ctx is None else torch.cat([s, ctx.to(s.dtype)], 1))
        if not self.prior_stats:
            return None, None, out
        mu, logvar = self._stats(out)
        return mu, logvar, out[:, 2 * self.zc:]

    def posterior_stats(self, s: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self._stats(self.posterior((e + s) * (1 / math.sqrt(2))))

    def update(self, s: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """s <- ResNet(s + h + Conv1x1(z)) (the caller upsamples at the end of a group)."""
        return s if self.z_up is None else self.resnet(s + h + self.z_up(z))


class HierarchicalVAE(nn.Module):
    """DVP-VAE / Ladder VAE / VampPrior, chosen by `cfg.name`; `image_shape` = (C, H, W)."""

    def __init__(self, cfg: DictConfig, image_shape: tuple[int, int, int], resolutions: list[int]) -> None:
        super().__init__()
        c = image_shape[0]
        self.cfg, self.image_shape, self.kind = cfg, image_shape, cfg.name
        num_ch, hid, zc = cfg.num_ch, max(1, round(cfg.num_ch * cfg.block_ch_mult)), cfg.latent_width
        self.encoder = Encoder(c, num_ch, hid, cfg.enc_blocks_per_scale, len(resolutions), cfg.start_scale_at_x,
                               cfg.input_mean, cfg.input_std)
        # latents top first: (group index counted from the finest, resolution)
        self.layout = [(g, resolutions[g]) for g in reversed(range(len(resolutions)))
                       for _ in range(cfg.latent_scales[g])]
        n_latents = len(self.layout)
        ctx_ch = c if self.kind == "dvp_vae" else 0
        self.layers = nn.ModuleList(
            LatentLayer(num_ch, hid, zc, ctx_ch, prior_stats=not (self.kind == "vampprior" and i == 0),
                        last=i == n_latents - 1,
                        state_read_after=i < n_latents - 1 or not cfg.latent_aggregation,
                        init_scale=math.sqrt(1 / n_latents),
                        logvar_range=(cfg.min_logvar, cfg.max_logvar))
            for i in range(n_latents))
        self.register_buffer("s_top", torch.ones(1, num_ch, resolutions[-1], resolutions[-1]), persistent=False)
        self.likelihood = (Bernoulli(c) if cfg.likelihood == "bernoulli"
                           else LogisticMixture(c, cfg.num_mixtures))
        head_in = zc if cfg.latent_aggregation else num_ch
        self.head = nn.Sequential(conv(head_in, num_ch, 1), conv(num_ch, self.likelihood.out_channels, 3, True))
        if self.kind == "dvp_vae":
            self.pseudo_input = PseudoInput(image_shape, cfg.ctx_size, cfg.ctx_type)
            d = cfg.diffusion
            self.prior_u = DiffusionPrior(self.pseudo_input.shape, d.model_channels, d.num_res_blocks, d.dropout,
                                          d.T, d.gamma_min, d.gamma_max)
            self.ctx_logvar = nn.Parameter(torch.full(self.pseudo_input.shape, float(d.gamma_min)),
                                           requires_grad=not cfg.freeze_u)
        if self.kind == "vampprior":
            self.pseudo_images = nn.Parameter(0.1 * torch.randn(cfg.num_pseudo, *image_shape))

    def fit_to_data(self, x_train: Tensor) -> None:
        """Fit what the model takes from the training images before training: the DCT normalisation of the
        pseudo-input (dvp_vae, `PseudoInput.fit_scale`); nothing for the other kinds."""
        if self.kind == "dvp_vae":
            self.pseudo_input.fit_scale(x_train)

    # ---- pieces -------------------------------------------------------------------------------------------
    def omega(self) -> Tensor:
        """log-variance of q(u|x), clamped to [ctx_logvar_min, ctx_logvar_max] with gradients that may bring it
        back inside (`_ClampInward`: the authors' in-place clamp, ZeRO-safe)."""
        return _ClampInward.apply(self.ctx_logvar.float(), self.cfg.ctx_logvar_min, self.cfg.ctx_logvar_max)

    def _contexts(self, u: Tensor) -> dict[int, Tensor]:
        """AvgPool(to_image(u)) at every latent resolution (the inverse DCT is computed once)."""
        with torch.autocast(u.device.type, enabled=False):
            img = self.pseudo_input.to_image(u.float())
        n = self.image_shape[1]
        return {r: F.avg_pool2d(img, n // r) if r < n else img for _, r in self.layout}

    def _vamp_top_log_prior(self, z: Tensor) -> Tensor:
        """log p(z_L) = logsumexp_k log q(z_L | u_k) - log K, u_k the pseudo-images."""
        mu, logvar = self._vamp_components()
        zf = z.float().flatten(1)[:, None]                                  # [B, 1, D]
        mu, logvar = mu.flatten(1)[None], logvar.flatten(1)[None]          # [1, K, D]
        log_q = (-0.5 * (LOG_2PI + logvar + (zf - mu) ** 2 * torch.exp(-logvar))).sum(2)
        return torch.logsumexp(log_q, 1) - math.log(mu.shape[1])

    def _vamp_components(self) -> tuple[Tensor, Tensor]:
        """q(z_L | u_k) for every pseudo-image (top layer posterior at the all-ones top state)."""
        e = self.encoder(F.hardtanh(self.pseudo_images))[-1]
        return self.layers[0].posterior_stats(self.s_top.expand(len(e), -1, -1, -1).to(e.dtype), e)

    def _aggregate(self, zs: list[Tensor], s: Tensor) -> Tensor:
        """Likelihood parameters from sum_l Up(z_l)/sqrt(L) (or from the final state without aggregation)."""
        n = self.image_shape[1]
        if self.cfg.latent_aggregation:
            a = sum(F.interpolate(z, size=(n, n), mode="bilinear", align_corners=False) if z.shape[-1] != n
                    else z for z in zs) / math.sqrt(len(zs))
        else:
            a = F.interpolate(s, size=(n, n), mode="bilinear", align_corners=False) if s.shape[-1] != n else s
        return self.head(a)

    def _top_down(self, batch: int, feats: list[Tensor] | None, u: Tensor | None,
                  temperature: float = 1.0, noise: Noise | None = None) -> tuple[Tensor, list[Tensor], list[tuple]]:
        """Run the ladder; posterior sampling when `feats` is given, prior sampling otherwise; draws from
        `noise` (see dvp.core.noise) or the default RNG.

        Returns x-params, the z samples (top first) and per-layer (mu_p, logvar_p, mu_q, logvar_q).
        """
        ctx = self._contexts(u) if u is not None else None
        s = self.s_top.expand(batch, -1, -1, -1)
        zs, stats = [], []
        for i, ((g, r), layer) in enumerate(zip(self.layout, self.layers)):
            mu_p, logvar_p, h = layer.prior_stats_and_h(s, ctx[r] if ctx is not None else None)
            if feats is not None:
                mu_q, logvar_q = layer.posterior_stats(s, feats[g])
                z = mu_q + torch.exp(0.5 * logvar_q) * randn_like(mu_q, noise)
            else:
                mu_q = logvar_q = None
                if mu_p is None:   # VampPrior top: pick u_k uniformly, z_L ~ q(z_L | u_k)
                    mu_k, logvar_k = self._vamp_components()
                    k = torch.randint(len(mu_k), (batch,), device=mu_k.device)
                    mu_p, logvar_p = mu_k[k], logvar_k[k]
                z = mu_p + temperature * torch.exp(0.5 * logvar_p) * randn_like(mu_p, noise)
            zs.append(z)
            stats.append((mu_p, logvar_p, mu_q, logvar_q))
            s = layer.update(s, h, z)
            nxt = self.layout[i + 1][1] if i + 1 < len(self.layout) else r
            if nxt != r:
                s = F.interpolate(s, size=(nxt, nxt), mode="bilinear", align_corners=False)
        return self._aggregate(zs, s), zs, stats

    # ---- the three uses -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, x_target: Tensor, quadrature: bool = False, noise: Noise | None = None) -> Terms:
        """All ELBO / IWAE terms for images x (what the encoder sees) and targets x_target (what is modelled).

        `quadrature` selects the T-point test-time bound of the diffusion prior instead of one random t. Every
        random draw comes from `noise` (a function of the global sample index, see dvp.core.noise) or, when None,
        from the default RNG.
        """
        b = x.shape[0]
        kl_u = log_pu_minus_qu = torch.zeros(b, device=x.device)
        u = None
        if self.kind == "dvp_vae":
            with torch.autocast(x.device.type, enabled=False):
                u_mean = self.pseudo_input(x)
                omega = self.omega()
                u = u_mean + torch.exp(0.5 * omega) * randn_like(u_mean, noise)
                log_qu = gaussian_log_prob(u, u_mean, omega.expand_as(u))
            log_pu = self.prior_u.log_prob(u, quadrature=quadrature, noise=noise)
            kl_u = log_qu - log_pu
            log_pu_minus_qu = -kl_u
        params, zs, stats = self._top_down(b, self.encoder(x), u, noise=noise)
        log_px = self.likelihood.log_prob(params, x_target)
        kls, log_ratio = [], torch.zeros(b, device=x.device)
        for z, (mu_p, logvar_p, mu_q, logvar_q) in zip(zs, stats):
            zf = z.float()
            log_q = gaussian_log_prob(zf, mu_q, logvar_q)
            if mu_p is None:   # VampPrior top layer: one-sample KL against the mixture
                log_p = self._vamp_top_log_prior(zf)
                kls.append(log_q - log_p)
            else:
                log_p = gaussian_log_prob(zf, mu_p, logvar_p)
                kls.append(gaussian_kl(mu_q, logvar_q, mu_p, logvar_p))
            log_ratio = log_ratio + log_p - log_q
        kl = torch.stack(kls, 1)
        return Terms(recon=-log_px, kl=kl, kl_u=kl_u,
                     log_w=log_px + log_ratio + log_pu_minus_qu,
                     log_w_analytic=log_px - kl.sum(1) - kl_u,
                     mu_q=[s[2] for s in stats])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, mean: bool = True) -> Tensor:
        """Images from the generative model: u ~ p(u), z_l ~ p(z_l | z_{>l}, u) at `temperature`, x | z."""
        u = self.prior_u.sample(n) if self.kind == "dvp_vae" else None
        params, *_ = self._top_down(n, None, u, temperature)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z], z ~ q(z | x) (u at its posterior mean)."""
        u = self.pseudo_input(x) if self.kind == "dvp_vae" else None
        params, *_ = self._top_down(x.shape[0], self.encoder(x), u)
        return self.likelihood.mean(params)


def build_model(cfg: DictConfig, image_shape: tuple[int, int, int]) -> HierarchicalVAE:
    """The model named by `cfg.model` for images of `image_shape` (C, H, W)."""
    return HierarchicalVAE(cfg.model, image_shape, group_resolutions(cfg, image_shape))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level module, as the authors count them (prior_u = diffusion prior); whole
    counts also when DeepSpeed ZeRO-3 has partitioned the parameters."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.split(".")[0]
            key = key if key in ("encoder", "prior_u") else "decoder"
            counts[key] = counts.get(key, 0) + getattr(p, "ds_numel", p.numel())   # ZeRO-3 keeps a partition
    counts["total"] = sum(counts.values())
    return counts
