"""The diffusion prior p_theta(u) over the pseudo-input u (docs/model.md §3, eqs. (8)-(14)).

A continuous-time, variance-preserving VDM (Kingma et al. 2021) with epsilon-prediction:

    q(z_t | u) = N(alpha_t u, sigma_t^2 I),   alpha_t^2 = sigmoid(-gamma(t)),   sigma_t^2 = sigmoid(gamma(t)),

so the log-SNR is -gamma(t). Per example, summed over the C*k*k dimensions of u,

    -log p(u) <= L_0 + L_inf + L_T,
    L_T   = KL(N(alpha_1 u, sigma_1^2) || N(0, 1)),
    L_0   = E -log N(u; z_0 / alpha_0, exp(gamma_0)),        z_0 = alpha_0 u + sigma_0 eps_0 (exact mean),
    L_inf = 1/2 E_{t ~ U(0,1)} gamma'(t) ||eps - eps_hat(z_t, t)||^2,   z_t = alpha_t u + sigma_t eps.

Training uses one t per example; test time replaces the expectation over t by the average over t = j/T,
j = 1..T (a T-point quadrature of the same integral). T also sets the number of ancestral sampling steps.
All schedule quantities and the loss are computed in float32; only the UNet follows an active autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvp.core.noise import Noise, rand_like, randn_like
from dvp.model.unet import UNet


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def per_example(x: Tensor) -> Tensor:
    """[B, ...] -> [B]: the sum over all non-batch dimensions."""
    return x.flatten(1).sum(1)


class LinearLogSNRSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, t in [0, 1]; gamma'(t) = gamma_max - gamma_min.

    Frozen (stored as buffers) unless `trainable`.
    """

    def __init__(self, gamma_min: float, gamma_max: float, trainable: bool = False) -> None:
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")
        ends = {"gamma_min": torch.tensor(float(gamma_min)), "gamma_max": torch.tensor(float(gamma_max))}
        for name, value in ends.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def forward(self, t: Tensor) -> Tensor:
        """gamma(t) in float32, same shape as t."""
        return self.gamma_min.float() + (self.gamma_max.float() - self.gamma_min.float()) * t.float()

    def derivative(self, t: Tensor) -> Tensor:
        """gamma'(t) = gamma_max - gamma_min, in float32, same shape as t."""
        return (self.gamma_max.float() - self.gamma_min.float()).expand(t.shape)


class DiffusionPrior(nn.Module):
    """p_theta(u) over u of shape `shape` = (C, k, k): a UNet denoiser eps_hat(z_t, t) and T grid points."""

    def __init__(self, shape: tuple[int, int, int], model_channels: int, num_res_blocks: int, dropout: float,
                 T: int, gamma_min: float, gamma_max: float) -> None:
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be positive, got {T}")
        self.shape = tuple(shape)
        self.T = T
        self.schedule = LinearLogSNRSchedule(gamma_min, gamma_max)
        self.unet = UNet(self.shape[0], model_channels, num_res_blocks, dropout)

    def prior_loss(self, u: Tensor) -> Tensor:
        """L_T = KL(N(alpha_1 u, sigma_1^2) || N(0, 1))
               = 1/2 sum_i (sigma_1^2 + alpha_1^2 u_i^2 - 1 - log sigma_1^2).

        Evaluated in the equivalent, cancellation-free form
        1/2 sum_i (alpha_1^2 (u_i^2 - 1) + softplus(-gamma_1)), using 1 - sigma^2 = alpha^2 and
        -log sigma^2 = softplus(-gamma). Returns [B].
        """
        u = u.float()
        gamma_1 = self.schedule(u.new_ones(()))
        alpha2_1 = torch.sigmoid(-gamma_1)
        return 0.5 * per_example(alpha2_1 * (u.pow(2) - 1) + F.softplus(-gamma_1))

    def reconstruction_loss(self, u: Tensor) -> Tensor:
        """L_0 = E_{eps_0} -log N(u; z_0 / alpha_0, exp(gamma_0)), z_0 = alpha_0 u + sigma_0 eps_0, exactly.

        u - z_0 / alpha_0 = -(sigma_0 / alpha_0) eps_0 and sigma_0^2 / alpha_0^2 = exp(gamma_0), so the integrand
        is 1/2 sum_i (log 2 pi + gamma_0 + eps_0i^2), independent of u; its expectation
        L_0 = d/2 (log 2 pi + gamma_0 + 1) replaces the authors' one-draw estimate (same mean, no variance:
        a noisy term inside importance weights would bias the IS-NLL). Returns [B].
        """
        gamma_0 = self.schedule(u.new_zeros(()))
        d = u[0].numel()
        return (0.5 * d * (math.log(2 * math.pi) + gamma_0 + 1.0)).expand(u.shape[0])

    def diffusion_loss(self, u: Tensor, t: Tensor, eps: Tensor, noise: Noise | None = None,
                       inner: int = 1) -> Tensor:
        """The L_inf integrand 1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2 with z_t = alpha_t u + sigma_t eps.

        u, eps: [B, C, k, k]; t: [B]. The UNet runs under any active autocast; eps_hat is cast to float32
        before the squared error; `noise` (`inner` rows per example) draws the UNet's dropout masks. Returns [B]
        in float32.
        """
        u, eps = u.float(), eps.float()
        gamma_t = self.schedule(t)
        alpha_t, sigma_t = (a.view(-1, 1, 1, 1) for a in alpha_sigma(gamma_t))
        z_t = alpha_t * u + sigma_t * eps
        eps_hat = self.unet(z_t, t, noise, inner).float()
        return 0.5 * self.schedule.derivative(t) * per_example((eps - eps_hat).pow(2))

    def quadrature_loss(self, u: Tensor, noise: Noise | None = None) -> Tensor:
        """L_inf ~= 1/T sum_{j=1..T} 1/2 gamma'(t_j) ||eps_j - eps_hat(z_{t_j}, t_j)||^2,
        t_j = j/T, with fresh noise eps_j at each point.

        All B*T points go through the UNet in one call. Returns [B].
        """
        b = u.shape[0]
        t_grid = torch.arange(1, self.T + 1, device=u.device, dtype=torch.float32) / self.T
        u_rep = u.float().repeat_interleave(self.T, dim=0)  # row b*T + j holds example b at t_grid[j]
        t_rep = t_grid.repeat(b)
        eps = randn_like(u_rep, noise, inner=self.T)
        return self.diffusion_loss(u_rep, t_rep, eps, noise, self.T).view(b, self.T).mean(1)

    def loss(self, u: Tensor, quadrature: bool = False, noise: Noise | None = None) -> Tensor:
        """L_0 + L_inf + L_T in nats per example ([B], float32), an upper bound on -log p(u) in expectation.

        L_inf uses one t ~ U(0, 1) per example, or the T-point quadrature when `quadrature` (test time).
        """
        u = u.float()
        l_0 = self.reconstruction_loss(u)
        if quadrature:
            l_inf = self.quadrature_loss(u, noise)
        else:
            t = rand_like(u[:, 0, 0, 0], noise)
            l_inf = self.diffusion_loss(u, t, randn_like(u, noise), noise)
        return l_0 + l_inf + self.prior_loss(u)

    def log_prob(self, u: Tensor, quadrature: bool = False, noise: Noise | None = None) -> Tensor:
        """log p_hat(u) = -(L_0 + L_inf + L_T), the single-draw VDM lower bound on log p(u). Returns [B]."""
        return -self.loss(u, quadrature, noise)

    def x_hat(self, z_t: Tensor, t: Tensor) -> Tensor:
        """x_hat = clamp((z_t - sigma_t eps_hat(z_t, t)) / alpha_t, -1, 1), the clean prediction (float32)."""
        alpha_t, sigma_t = (a.view(-1, 1, 1, 1) for a in alpha_sigma(self.schedule(t)))
        eps_hat = self.unet(z_t, t).float()
        return ((z_t - sigma_t * eps_hat) / alpha_t).clamp(-1.0, 1.0)

    def sample_step(self, z_t: Tensor, t: Tensor, s: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step z_t -> z_s (s < t) of p(z_s | z_t) = q(z_s | z_t, u = x_hat(z_t, t)):

            z_s ~ N((alpha_{t|s} sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x_hat,
                    sigma_{t|s}^2 sigma_s^2 / sigma_t^2),
            alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.

        With c = sigma_{t|s}^2 / sigma_t^2 = -expm1(gamma_s - gamma_t) (as in VDM) this is the stable form
            z_s = alpha_s ((1 - c) z_t / alpha_t + c x_hat) + sigma_s sqrt(c) eps.
        """
        gamma_t, gamma_s = self.schedule(t), self.schedule(s)
        alpha_t = alpha_sigma(gamma_t)[0].view(-1, 1, 1, 1)
        alpha_s, sigma_s = (a.view(-1, 1, 1, 1) for a in alpha_sigma(gamma_s))
        c = -torch.expm1(gamma_s - gamma_t).view(-1, 1, 1, 1)
        mean = alpha_s * ((1 - c) * z_t / alpha_t + c * self.x_hat(z_t, t))
        eps = torch.randn(z_t.shape, generator=generator, device=z_t.device)
        return mean + sigma_s * c.sqrt() * eps

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """u ~ p_theta: ancestral sampling over t_i = i/T, i = T..1, s = t_i - 1/T, from z_1 ~ N(0, I).

        Returns the final z_0 as u, [n, C, k, k] in float32 on the module's device (a `generator` must live on
        that device too). The train/eval mode is the caller's: call .eval() to sample without dropout.
        """
        device = next(self.unet.parameters()).device
        z = torch.randn((n, *self.shape), generator=generator, device=device)
        for i in range(self.T, 0, -1):
            t = torch.full((n,), i / self.T, device=device)
            s = torch.full((n,), (i - 1) / self.T, device=device)
            z = self.sample_step(z, t, s, generator)
        return z
