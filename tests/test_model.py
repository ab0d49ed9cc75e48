"""The model layer against ground truth: DCT, KL, the IS-NLL estimator against exact likelihoods, configs."""
from __future__ import annotations

import math

import pytest
import torch

from dvp.core.config import compose
from dvp.data.catalog import DATASETS as DATASET_SHAPES
from dvp.model.blocks import Float32Conv2d
from dvp.model.objectives import active_units, elbo_stats, importance_sampled_nll
from dvp.model.pseudo_input import PseudoInput, dct_matrix
from dvp.model.vae import HierarchicalVAE, build_model, gaussian_kl, gaussian_log_prob, parameter_counts

# The counts of the authors' released configs (docs/model.md §8), which the issue asks to match within 2%. Ours are
# these minus the last layer's unused z_up conv (latent_width*num_ch + num_ch parameters), which nothing reads.
SPEC_COUNTS = {"mnist/dvp_vae": 648_579, "omniglot/dvp_vae": 1_298_563, "cifar10/dvp_vae": 19_478_162,
               "mnist/ladder": 600_673, "omniglot/ladder": 1_058_425}


@pytest.mark.parametrize("experiment", sorted(SPEC_COUNTS))
def test_parameter_counts_match_the_released_configs(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    counts = parameter_counts(build_model(cfg, DATASET_SHAPES[cfg.data.name]))
    unused_z_up = cfg.model.latent_width * cfg.model.num_ch + cfg.model.num_ch
    assert counts["total"] == SPEC_COUNTS[experiment] - unused_z_up
    assert abs(counts["total"] / SPEC_COUNTS[experiment] - 1) < 0.02
    if experiment == "mnist/dvp_vae":                       # and per module (docs/model.md §8)
        assert (counts["encoder"], counts["decoder"], counts["prior_u"]) == (123_712, 477_538 - 64, 47_329)


# ---- DCT pseudo-inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [7, 8, 28, 32])
def test_dct_matrix_is_orthonormal_and_matches_the_formula(n: int) -> None:
    d = dct_matrix(n).double()
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    k, m = 3 % n, 5 % n
    a = math.sqrt((1 if k == 0 else 2) / n)
    assert d[k, m].item() == pytest.approx(a * math.cos(math.pi * (m + 0.5) * k / n), abs=1e-6)


def test_full_dct_inverts_exactly_and_truncation_keeps_low_frequencies() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    full = PseudoInput((1, 8, 8), 8)
    full.fit_scale(x)
    assert torch.allclose(full.to_image(full.transform(x) / full.dct_scale), x, atol=1e-5)
    # an image made of the 3x3 lowest frequencies is kept exactly by k=3, not by k=2; k=1 keeps only its mean
    d = dct_matrix(8)
    coeffs = torch.zeros(8, 8)
    coeffs[:3, :3] = 0.3 * torch.randn(3, 3)
    coeffs[0, 0] = 4.0                                    # DC: mean 0.5 in [0, 1]
    low = (d.T @ coeffs @ d).clamp(0, 1).expand(1, 1, 8, 8) * 2 - 1
    p3, p2, p1 = (PseudoInput((1, 8, 8), k) for k in (3, 2, 1))
    assert torch.allclose(p3.to_image(p3.transform(low)), low, atol=1e-5)
    assert (p2.to_image(p2.transform(low)) - low).abs().max() > 1e-2
    assert torch.allclose(p1.to_image(p1.transform(low)), low.mean().expand_as(low), atol=1e-5)


def test_dct_scale_is_the_train_max_of_floored_coefficients_and_never_zero() -> None:
    torch.manual_seed(0)
    train, other = torch.rand(50, 1, 8, 8) * 2 - 1, torch.ones(3, 1, 8, 8)
    p = PseudoInput((1, 8, 8), 4)
    p.fit_scale(train)
    expected = p.transform(train).floor().abs().amax(0).clamp_min(1.0)
    assert torch.equal(p.dct_scale, expected)
    assert (p.dct_scale >= 1).all()
    assert p.dct_scale[0, 0, 0] > 1   # the DC coefficient of [0,1] images is ~ mean * N
    before = p.dct_scale.clone()
    u = p(other)                       # using the transform does not refit it
    assert torch.equal(p.dct_scale, before) and u.abs().max() <= 1


# ---- KL and densities ----------------------------------------------------------------------------------------
def test_analytic_gaussian_kl_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = torch.randn(4, 6), torch.randn(4, 6) * 0.5, torch.randn(4, 6), torch.randn(4, 6) * 0.5
    z = mu_q + torch.exp(0.5 * lv_q) * torch.randn(200_000, 4, 6)
    mc = (gaussian_log_prob(z.flatten(0, 1), mu_q.repeat(200_000, 1), lv_q.repeat(200_000, 1))
          - gaussian_log_prob(z.flatten(0, 1), mu_p.repeat(200_000, 1), lv_p.repeat(200_000, 1))).view(200_000, 4)
    assert torch.allclose(mc.mean(0), gaussian_kl(mu_q, lv_q, mu_p, lv_p), atol=0.05)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, torch.exp(0.5 * lv_q)),
                                            torch.distributions.Normal(mu_p, torch.exp(0.5 * lv_p))).sum(1)
    assert torch.allclose(gaussian_kl(mu_q, lv_q, mu_p, lv_p), ref, atol=1e-5)


# ---- the IS-NLL estimator against an exact likelihood ------------------------------------------------------
X_TINY = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.float32).view(4, 1, 2, 2)


def _tiny(name: str, n_latents: int) -> HierarchicalVAE:
    """A real HierarchicalVAE on 1x2x2 images whose latents are 1x1x1: the likelihood is exactly integrable.

    Randomly perturbed, then fitted for a few hundred ELBO steps so that q is a sensible proposal (as after
    training) while the ELBO stays visibly loose.
    """
    over = ["data.name=npz", f"model.name={name}", f"model.latent_scales=[{n_latents}]", "model.num_ch=8",
            "model.enc_blocks_per_scale=1", "model.num_pseudo=3"]
    cfg = compose(over)
    torch.manual_seed(1)
    model = HierarchicalVAE(cfg.model, (1, 2, 2), [1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        model(X_TINY * 2 - 1, X_TINY).nelbo.mean().backward()
        opt.step()
    return model.eval()


def _exact_log_px(model: HierarchicalVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log sum over a fine grid of p(x | z) p(z) dz, through the model's own layers."""
    grid = torch.linspace(-12, 12, 1601 if len(model.layers) == 1 else 401)
    dz = grid[1] - grid[0]
    zs = torch.cartesian_prod(*[grid] * len(model.layers)).reshape(-1, len(model.layers))
    n = zs.shape[0]
    s = model.s_top.expand(n, -1, -1, -1)
    log_pz, latents = torch.zeros(n), []
    for i, layer in enumerate(model.layers):
        z = zs[:, i].view(n, 1, 1, 1)
        mu, lv, h = layer.prior_stats_and_h(s, None)
        log_pz += model._vamp_top_log_prior(z) if mu is None else gaussian_log_prob(z, mu, lv)
        latents.append(z)
        s = layer.update(s, h, z)
    params = model._aggregate(latents, s)
    out = []
    for xi in x:
        log_px_z = model.likelihood.log_prob(params, xi.expand(n, -1, -1, -1))
        out.append(torch.logsumexp(log_px_z + log_pz, 0) + len(model.layers) * torch.log(dz))
    return torch.stack(out)


@pytest.mark.parametrize("name,n_latents", [("ladder", 1), ("ladder", 2), ("vampprior", 1)])
def test_is_nll_converges_to_the_exact_likelihood(name: str, n_latents: int) -> None:
    model = _tiny(name, n_latents)
    x = X_TINY
    with torch.no_grad():
        exact = -_exact_log_px(model, x)
        torch.manual_seed(2)
        nll = importance_sampled_nll(model, x * 2 - 1, x, k=20_000, chunk=5_000)
        nelbo = torch.stack([model(x * 2 - 1, x).nelbo for _ in range(2000)]).mean(0)
    assert torch.allclose(nll, exact, atol=0.02), (nll, exact)
    assert (nelbo > exact - 0.01).all()        # -ELBO bounds -log p(x) ...
    assert (nelbo - exact).max() > 0.03        # ... visibly loosely, and the estimator closes the gap


def test_iwae_bound_is_above_the_elbo_and_tightens_with_k() -> None:
    model = _tiny("ladder", 2)
    x = torch.tensor([[0, 1, 1, 0]], dtype=torch.float32).view(1, 1, 2, 2).expand(400, -1, -1, -1)
    torch.manual_seed(3)
    with torch.no_grad():
        means = [importance_sampled_nll(model, x * 2 - 1, x, k=k, chunk=k).mean().item() for k in (1, 4, 32, 256)]
        nelbo = model(x * 2 - 1, x).nelbo.mean().item()
    assert abs(means[0] - nelbo) < 0.15          # K=1 is the ELBO
    assert means[0] > means[1] > means[2] > means[3]
    exact = -_exact_log_px(model, x[:1]).item()
    assert means[3] >= exact - 0.02


def test_authors_analytic_kl_weight_differs_from_the_valid_estimator() -> None:
    model = _tiny("ladder", 1)
    x = torch.tensor([[0, 1, 1, 0]], dtype=torch.float32).view(1, 1, 2, 2)
    torch.manual_seed(4)
    with torch.no_grad():
        exact = -_exact_log_px(model, x)
        analytic = importance_sampled_nll(model, x * 2 - 1, x, k=20_000, chunk=5_000, weight="analytic_kl")
    assert (exact - analytic).abs().item() > 0.05  # not a valid estimate of -log p(x) (docs/model.md §7)


# ---- every experiment builds and trains; bf16 agrees with fp32 --------------------------------------------------
EXPERIMENTS = ["digits/dvp_vae", "digits/ladder", "mnist/dvp_vae", "mnist/ladder", "mnist/vampprior",
               "omniglot/dvp_vae", "omniglot/ladder", "cifar10/dvp_vae", "cifar10/ladder"]


def _batch(cfg, shape, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(b, *shape) * 2 - 1
    target = torch.bernoulli((x + 1) / 2) if cfg.data.binarize else torch.round((x + 1) * 127.5) / 127.5 - 1
    return x, target


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_forward_backward_and_samples(experiment: str) -> None:
    overrides = [f"experiment={experiment}"] + (["model.num_pseudo=20"] if "vampprior" in experiment else [])
    cfg = compose(overrides)
    shape = DATASET_SHAPES[cfg.data.name]
    torch.manual_seed(0)
    model = build_model(cfg, shape)
    x, target = _batch(cfg, shape, 2)
    stats = elbo_stats(model(x, target), shape)
    stats["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(stats["loss"]) and all(g is not None and torch.isfinite(g).all() for g in grads)
    heads = {n: p.grad for n, p in model.named_parameters() if n.endswith(("prior.net.6.weight",
                                                                              "posterior.net.6.weight"))}
    assert heads and all(g.abs().sum() > 0 for g in heads.values())   # the zero-initialised heads start learning
    samples = model.eval().sample(2)
    assert samples.shape == (2, *shape) and samples.min() >= -1 and samples.max() <= 1


@pytest.mark.parametrize("experiment", ["mnist/dvp_vae", "mnist/ladder"])
def test_bf16_autocast_agrees_with_fp32_on_the_elbo(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    shape = DATASET_SHAPES[cfg.data.name]
    torch.manual_seed(0)
    model = build_model(cfg, shape).eval()
    x, target = _batch(cfg, shape, 16)
    torch.manual_seed(5)
    fp32 = model(x, target)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, target)
    assert bf16.nelbo.dtype == torch.float32 and bf16.kl.dtype == torch.float32
    rel = ((bf16.nelbo - fp32.nelbo).abs() / fp32.nelbo.abs()).max().item()
    assert rel < 0.02, rel    # stated tolerance: 2% per example at initialisation


def test_active_units_counts_dimensions_whose_posterior_mean_varies() -> None:
    mu_live = torch.randn(100, 1, 2, 2)
    mu_dead = torch.zeros(100, 1, 2, 2) + 0.001 * torch.randn(100, 1, 2, 2)
    au = active_units([mu_live, mu_dead])
    assert au == {"au/0": 1.0, "au/1": 0.0, "au": 0.5, "au_1e-3/0": 1.0, "au_1e-3/1": 0.0, "au_1e-3": 0.5}


def test_u_term_is_log_q_minus_the_diffusion_bound() -> None:
    cfg = compose(["experiment=digits/dvp_vae"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8)).eval()
    x, target = _batch(cfg, (1, 8, 8), 4)
    torch.manual_seed(6)
    terms = model(x, target, quadrature=True)
    torch.manual_seed(6)
    u_mean = model.pseudo_input(x)
    omega = model.omega()
    u = u_mean + torch.exp(0.5 * omega) * torch.randn_like(u_mean)
    expected = gaussian_log_prob(u, u_mean, omega.expand_as(u)) - model.prior_u.log_prob(u, quadrature=True)
    assert torch.allclose(terms.kl_u, expected, atol=1e-3)


def test_discretised_logistic_mixture_sums_to_one_over_the_256_levels() -> None:
    from dvp.model.likelihoods import LogisticMixture
    lik = LogisticMixture(1, 5)
    torch.manual_seed(0)
    params = (torch.randn(1, lik.out_channels, 1, 1) * 2).expand(256, -1, -1, -1)
    levels = (torch.arange(256, dtype=torch.float32) / 127.5 - 1).view(256, 1, 1, 1)
    total = torch.logsumexp(lik.log_prob(params, levels), 0)
    assert abs(total.item()) < 1e-3


def test_downsample_pseudo_input_variant_runs() -> None:
    cfg = compose(["model.ctx_type=downsample"])
    model = build_model(cfg, (1, 8, 8))
    x, target = _batch(cfg, (1, 8, 8), 3)
    assert torch.isfinite(model(x, target).nelbo).all()
    assert model.pseudo_input(x).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_conv_is_exact_float32_under_bf16_autocast(kernel: int, memory_format: torch.memory_format) -> None:
    torch.manual_seed(0)
    head = Float32Conv2d(8, 3, kernel, padding=kernel // 2)
    plain = torch.nn.Conv2d(8, 3, kernel, padding=kernel // 2)
    plain.load_state_dict(head.state_dict())            # same parameters, same state_dict keys
    x = torch.randn(4, 8, 6, 6).to(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, rounded = head(x.bfloat16()), plain(x.bfloat16())
    exact = plain(x.bfloat16().float())
    assert out.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    assert (rounded.float() - exact).abs().max() > 1e-4   # what the float32 head avoids: bf16-rounded outputs


def test_latent_heads_give_float32_statistics_under_bf16_autocast() -> None:
    cfg = compose(["experiment=mnist/dvp_vae"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28))
    for layer in model.layers:
        for block in (layer.prior, layer.posterior):
            assert isinstance(block.net[-1], Float32Conv2d) and isinstance(block.skip, Float32Conv2d)
    assert isinstance(model.head[-1], Float32Conv2d)
    assert isinstance(model.prior_u.unet.out[-1], Float32Conv2d)


def test_float32_entry_conv_keeps_the_gradient_of_offset_channels() -> None:
    """Channels at a large offset with small variation (the MNIST encoder's stream over the background): a bf16
    conv rounds the input to a spacing of 2^-7 and loses the variation that the weight gradient is made of when
    the loss ignores the offset; the float32 conv keeps it. Every 1x1 conv that reads a residual stream (a block's
    entry and skip) is float32."""
    from dvp.model.blocks import DecoderResBlock, EncoderResBlock
    torch.manual_seed(0)
    head = Float32Conv2d(16, 8, 1)
    plain = torch.nn.Conv2d(16, 8, 1)
    plain.load_state_dict(head.state_dict())
    x = 1.0 + torch.rand(1, 16, 1, 1) + 0.01 * torch.randn(8, 16, 12, 12)    # |mean| / std ~ 150
    g = torch.randn(8, 8, 12, 12)
    g -= g.mean((0, 2, 3), keepdim=True)                 # the loss ignores each channel's offset

    def weight_grad(conv: torch.nn.Conv2d, bf16: bool) -> torch.Tensor:
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (conv(x).float() * g).sum()
        loss.backward()                                  # outside autocast, as in TorchEngine.step
        return conv.weight.grad.flatten().clone()

    exact = weight_grad(plain, False)
    cos = torch.nn.functional.cosine_similarity
    assert cos(exact, weight_grad(head, True), 0) > 0.9999
    assert cos(exact, weight_grad(plain, True), 0) < 0.95
    for block in (EncoderResBlock(4, 4, 8), DecoderResBlock(4, 4, 8)):   # entry and skip read the stream
        entry = block.net[1] if isinstance(block, EncoderResBlock) else block.net[0]
        assert isinstance(entry, Float32Conv2d) and isinstance(block.skip, Float32Conv2d)
        assert type(block.net[-1]) is torch.nn.Conv2d                    # the body's output stays bf16


def test_omega_past_its_clamp_follows_gradients_back_inside_as_the_authors_in_place_clamp() -> None:
    """omega (log-variance of q(u|x)) clamped to [-12, -5] (docs/model.md §2, eq. (7); in place in the authors' code):
    an Adamax step can carry the parameter past -5; the forward still uses -5, and a gradient whose descent lowers omega
    must reach it (a plain functional clamp gives 0 there, so omega stuck for good), one that would raise it must
    not. Frozen (model.freeze_u) it gets no gradient at all."""
    cfg = compose(["experiment=digits/dvp_vae"])
    model = build_model(cfg, DATASET_SHAPES["digits"])
    w = model.ctx_logvar
    for start, expect_up, expect_down in ((-4.0, 0.0, 1.0), (-6.0, -1.0, 1.0), (-13.0, -1.0, 0.0)):
        with torch.no_grad():
            w.fill_(start)
        omega = model.omega()
        assert torch.all(omega == min(max(start, cfg.model.ctx_logvar_min), cfg.model.ctx_logvar_max))
        for sign, expect in ((-1.0, expect_up), (1.0, expect_down)):   # loss = sign * sum(omega)
            w.grad = None
            (sign * model.omega().sum()).backward()
            assert torch.all(w.grad == sign * abs(expect)), (start, sign, w.grad.flatten()[:3])
    frozen = build_model(compose(["experiment=digits/dvp_vae", "model.freeze_u=true"]), DATASET_SHAPES["digits"])
    assert not frozen.ctx_logvar.requires_grad
    assert torch.all(frozen.omega() == cfg.model.diffusion.gamma_min)
