"""pixart.train.diffusion against closed forms written here from the textbook, not from the module under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixart.train.diffusion import IDDPM

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
AC = np.cumprod(1.0 - BETAS)


@pytest.fixture(scope="module")
def diff() -> IDDPM:
    return IDDPM()


def bcast(a: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return torch.from_numpy(a[t.numpy()]).reshape(-1, *([1] * (ndim - 1)))


def posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM eq. 7: mean and variance of q(x_{t-1} | x_t, x_0), for t ≥ 1."""
    ac_prev = np.concatenate([[1.0], AC[:-1]])
    c0 = bcast(np.sqrt(ac_prev) * BETAS / (1 - AC), t, x0.ndim)
    ct = bcast(np.sqrt(1 - BETAS) * (1 - ac_prev) / (1 - AC), t, x0.ndim)
    return c0 * x0 + ct * x_t, bcast((1 - ac_prev) / (1 - AC) * BETAS, t, x0.ndim)


def model_mean_var(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ_θ from ε̂ through x̂_0, σ²_θ = β_t^frac · β̃_t^(1-frac), with β̃_0 replaced by β̃_1."""
    eps, v = out.chunk(2, dim=1)
    a = bcast(AC, t, x_t.ndim)
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    mean, _ = posterior(x0_hat, x_t, t)
    beta_tilde = (1 - np.concatenate([[1.0], AC[:-1]])) / (1 - AC) * BETAS
    beta_tilde[0] = beta_tilde[1]
    frac = (v + 1) / 2
    return mean, bcast(BETAS, t, x_t.ndim) ** frac * bcast(beta_tilde, t, x_t.ndim) ** (1 - frac)


def kl_gauss(m1, v1, m2, v2):
    """KL(N(m1, v1) ‖ N(m2, v2)) = log(σ2/σ1) + (σ1² + (m1 - m2)²) / (2σ2²) - 1/2."""
    return 0.5 * torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def batch(t: list[int], seed: int = 0, c: int = 3, hw: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(t), c, hw, hw, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=dtype)
    out = torch.cat([torch.randn(x0.shape, generator=g, dtype=dtype),
                     torch.rand(x0.shape, generator=g, dtype=dtype) * 2 - 1], dim=1)
    return x0, noise, out, torch.tensor(t)


def test_schedule_matches_reference(diff):
    assert diff.num_timesteps == T
    np.testing.assert_allclose(diff.betas.numpy(), BETAS, rtol=1e-12)
    np.testing.assert_allclose(diff.alphas_cumprod.numpy(), AC, rtol=1e-12)


def test_q_sample_closed_form(diff):
    x0, noise, _, t = batch([0, 1, 500, 999])
    want = bcast(np.sqrt(AC), t, 4) * x0 + bcast(np.sqrt(1 - AC), t, 4) * noise
    got = diff.q_sample(x0, t, noise)
    assert got.dtype == torch.float64
    # From the float64 tables, as the official code: not diffusers' float32 ᾱ, which puts √(1 - ᾱ_0) 8e-5 off.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    f32 = diff.q_sample(x0.float(), t, noise.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, want.float(), rtol=2e-7, atol=1e-7)  # one fp32 rounding per term


def test_posterior_is_bayes_conditioning(diff):
    """Condition the joint Gaussian of (x_{t-1}, x_t) given x_0 on x_t: the posterior the loss is built on."""
    x0, noise, _, t = batch([1, 2, 300, 999])
    x_t = diff.q_sample(x0, t, noise)
    ac_prev = bcast(np.concatenate([[1.0], AC[:-1]]), t, 4)
    alpha = bcast(1 - BETAS, t, 4)
    # x_{t-1} = √ᾱ_{t-1} x0 + √(1-ᾱ_{t-1}) z1;  x_t = √α_t x_{t-1} + √β_t z2
    m1, s11 = ac_prev.sqrt() * x0, 1 - ac_prev
    m2, s12, s22 = alpha.sqrt() * m1, alpha.sqrt() * s11, alpha * s11 + (1 - alpha)
    bayes_mean, bayes_var = m1 + s12 / s22 * (x_t - m2), s11 - s12**2 / s22
    mean, var = posterior(x0, x_t, t)
    torch.testing.assert_close(mean, bayes_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, bayes_var, rtol=1e-10, atol=1e-14)
    got_mean, got_var, got_logvar = diff.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, bayes_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_var, bayes_var, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got_logvar, bayes_var.log(), rtol=1e-10, atol=1e-12)


def test_vb_is_kl_in_bits_for_t_positive(diff):
    x0, noise, out, t = batch([1, 2, 10, 250, 600, 999], seed=1)
    x_t = diff.q_sample(x0, t, noise)
    true_mean, true_var = posterior(x0, x_t, t)
    mean, var = model_mean_var(out, x_t, t)
    want = kl_gauss(true_mean, true_var, mean, var).mean(dim=(1, 2, 3)) / math.log(2)
    # The textbook KL agrees with torch.distributions' too.
    p, q = torch.distributions.Normal(true_mean, true_var.sqrt()), torch.distributions.Normal(mean, var.sqrt())
    torch.testing.assert_close(torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)) / math.log(2), want)
    got = diff.training_losses(out, x0, x_t, t, noise)
    torch.testing.assert_close(got["vb"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["mse"], ((out[:, :3] - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["loss"], got["mse"] + got["vb"], rtol=1e-12, atol=0)
    skipped = diff.training_losses(out, x0, x_t, t, noise, any_t0=False)  # the host knows no t is 0
    assert all(torch.equal(skipped[k], got[k]) for k in got)


def test_vb_at_t0_is_discretized_gaussian_nll_with_the_exact_cdf():
    diff = IDDPM(decoder_cdf="exact")
    x0, noise, out, t = batch([0, 0, 0], seed=2, hw=6)
    x0[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.9995])  # the open-ended edge bins
    x0[1] = (x0[1] * 127.5).round() / 127.5  # on the 8-bit grid as well as off it
    x_t = diff.q_sample(x0, t, noise)
    mean, var = model_mean_var(out, x_t, t)
    n = torch.distributions.Normal(mean, var.sqrt())
    hi, lo = n.cdf(x0 + 1 / 255), n.cdf(x0 - 1 / 255)
    logp = torch.where(x0 < -0.999, hi, torch.where(x0 > 0.999, 1 - lo, hi - lo)).clamp(min=1e-12).log()
    want = -logp.mean(dim=(1, 2, 3)) / math.log(2)
    got = diff.training_losses(out, x0, x_t, t, noise)["vb"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_stop_gradient_splits_mean_and_variance(diff):
    x0, noise, out, t = batch([0, 5, 999], seed=3)
    x_t = diff.q_sample(x0, t, noise)
    out.requires_grad_(True)
    vb_grad, = torch.autograd.grad(diff.training_losses(out, x0, x_t, t, noise)["vb"].sum(), out)
    assert torch.all(vb_grad[:, :3] == 0)
    assert torch.all(vb_grad[:, 3:].abs().flatten(1).amax(1) > 0)  # every sample, t = 0 included
    mse_grad, = torch.autograd.grad(diff.training_losses(out, x0, x_t, t, noise)["mse"].sum(), out)
    assert torch.all(mse_grad[:, 3:] == 0)
    assert torch.all(mse_grad[:, :3].abs().flatten(1).amax(1) > 0)


def test_perfect_model_has_zero_loss(diff):
    x0, noise, _, t = batch([1, 2, 50, 400, 999], seed=4)
    x_t = diff.q_sample(x0, t, noise)
    # v = -1 puts σ²_θ at the range's lower end, β̃_t: the true posterior variance for every t ≥ 1.
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    got = diff.training_losses(out, x0, x_t, t, noise)
    assert torch.all(got["mse"] == 0)
    assert got["vb"].abs().max() < 1e-5


def test_timesteps_uniform_and_seeded(diff):
    draw = diff.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    assert draw.dtype == torch.int64 and draw.shape == (100_000,)
    assert draw.min() == 0 and draw.max() == T - 1
    assert abs(draw.double().mean().item() - 499.5) < 0.02 * 499.5
    again = diff.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)


def test_loss_runs_in_fp32_for_bf16_model_output(diff):
    x0, noise, out, t = batch([0, 3, 700], seed=5, dtype=torch.float32)
    x_t = diff.q_sample(x0, t, noise)
    out16 = out.to(torch.bfloat16).requires_grad_(True)
    got = diff.training_losses(out16, x0, x_t, t, noise)
    assert all(v.dtype == torch.float32 for v in got.values())
    torch.testing.assert_close(got["loss"], diff.training_losses(out16.float(), x0, x_t, t, noise)["loss"])
    got["loss"].sum().backward()
    assert out16.grad.dtype == torch.bfloat16 and torch.isfinite(out16.grad).all()


def test_loss_convenience_draws_and_is_seeded(diff):
    x0 = torch.randn(4, 3, 4, 4)
    zero_model = lambda x_t, t: torch.zeros(x_t.shape[0], 6, *x_t.shape[2:])  # noqa: E731
    a = diff.loss(zero_model, x0, generator=torch.Generator().manual_seed(7))
    b = diff.loss(zero_model, x0, generator=torch.Generator().manual_seed(7))
    assert set(a) == {"loss", "mse", "vb", "t"} and a["t"].shape == (4,)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    noise, t = torch.randn(x0.shape), torch.tensor([0, 1, 2, 3])
    c = diff.loss(zero_model, x0, t=t, noise=noise)
    torch.testing.assert_close(c["mse"], (noise**2).mean(dim=(1, 2, 3)))  # ε̂ = 0
    assert torch.equal(c["t"], t)


def test_decoder_likelihood_keeps_digits_in_the_tails():
    """In float32, bins 0…6 σ from the mean on either side match a float64 computation; from ~7.5 σ on, log P sits on
    IDDPM's floor, log 1e-12, with finite (zero) gradients."""
    from functools import partial

    from pixart.train.diffusion import discretized_gaussian_log_likelihood

    logp = partial(discretized_gaussian_log_likelihood, cdf="exact")
    offsets = torch.tensor([0.0, 0.02, 0.04, 0.05, 0.06, 0.10])  # in units of σ = 0.01: 0, 2, 4, 5, 6, 10
    x = torch.full((2, 6), 0.5)
    mean = torch.stack([x[0] - offsets, x[1] + offsets]).requires_grad_(True)  # bin above, then below, the mean
    got = logp(x, mean, torch.full_like(x, math.log(0.01)))
    n = torch.distributions.Normal(-offsets.double(), 0.01)  # the lower-tail mirror, in float64
    want = (n.cdf(torch.tensor(1 / 255)) - n.cdf(torch.tensor(-1 / 255))).clamp(min=1e-12).log().float()
    torch.testing.assert_close(got, torch.stack([want, want]), rtol=1e-4, atol=0)
    assert got[0, 4] > -20 and got[0, 5] == math.log(1e-12)
    got.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.all(mean.grad[:, 5] == 0)
    # σ ≫ bin: in fp32 both CDFs round to the same value, the mass to 0; floored, with no NaN gradient.
    mean = torch.zeros(1, 1, requires_grad=True)
    wide = logp(torch.zeros(1, 1), mean, torch.full((1, 1), math.log(1e6)))
    wide.sum().backward()
    assert wide.item() == pytest.approx(math.log(1e-12)) and torch.isfinite(mean.grad).all()


# -- the official IDDPM, written here from its behaviour (PixArt-alpha diffusion/model/gaussian_diffusion.py) ---------


def official_losses(out: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
    """The official training_losses for LEARNED_RANGE + MSE, as it computes them: float64 numpy tables, each looked
    up at t and cast with .float() (so float32 coefficients even for float64 inputs); x_t from q_sample; the t = 0
    decoder term with the tanh CDF and plain CDF differences, each clamped at 1e-12 before the log."""
    ac_prev = np.append(1.0, AC[:-1])
    post_var = BETAS * (1.0 - ac_prev) / (1.0 - AC)
    tables = {"sqrt_ac": np.sqrt(AC), "sqrt_1m_ac": np.sqrt(1.0 - AC), "recip": np.sqrt(1.0 / AC),
              "recipm1": np.sqrt(1.0 / AC - 1), "log_var_clipped": np.log(np.append(post_var[1], post_var[1:])),
              "log_betas": np.log(BETAS), "coef1": BETAS * np.sqrt(ac_prev) / (1.0 - AC),
              "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - BETAS) / (1.0 - AC)}

    def at(name):
        return torch.from_numpy(tables[name])[t].float().reshape(-1, 1, 1, 1)

    def mean_flat(a):
        return a.mean(dim=(1, 2, 3))

    def cdf(a):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))

    x_t = at("sqrt_ac") * x0 + at("sqrt_1m_ac") * noise
    eps, v = out.chunk(2, dim=1)
    frac = (v + 1) / 2
    log_var = frac * at("log_betas") + (1 - frac) * at("log_var_clipped")
    x0_hat = at("recip") * x_t - at("recipm1") * eps
    mean = at("coef1") * x0_hat + at("coef2") * x_t
    true_mean, true_log_var = at("coef1") * x0 + at("coef2") * x_t, at("log_var_clipped")
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                + (true_mean - mean) ** 2 * torch.exp(-log_var))
    centered, inv_std = x0 - mean, torch.exp(-0.5 * log_var)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_probs = torch.where(x0 < -0.999, cdf_plus.clamp(min=1e-12).log(),
                            torch.where(x0 > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                        (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    vb = torch.where(t == 0, -mean_flat(log_probs) / math.log(2.0), mean_flat(kl) / math.log(2.0))
    mse = mean_flat((noise - eps) ** 2)
    return {"x_t": x_t, "mse": mse, "vb": vb, "loss": mse + vb}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_loss_equals_the_official_at_every_t(diff, dtype):
    """All 1000 timesteps, edge bins included: within 1e-5 relative in float64 and float32. (The float32 tables
    are where the two may differ: the official casts its coefficients to float32 even for float64 inputs.)"""
    x0, noise, out, t = batch(list(range(T)), seed=11, c=4, hw=4, dtype=dtype)
    x0[:, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=dtype)  # the open-ended decoder bins
    want = official_losses(out, x0, t, noise)
    x_t = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, want["x_t"], rtol=1e-6, atol=1e-6)
    got = diff.training_losses(out, x0, x_t, t, noise)
    for k in ("mse", "vb", "loss"):
        rel = ((got[k] - want[k]).abs() / want[k].abs()).max().item()
        assert got[k].dtype == dtype and rel <= 1e-5, (k, rel)


def test_t0_decoder_term_default_is_the_official_tanh_formula(diff):
    """The official tanh CDF moves the t = 0 term by a fraction of a percent from the exact CDF: the default must be
    the official one, and the exact one stays available."""
    x0, noise, out, t = batch([0] * 8, seed=12, hw=8)
    x_t = diff.q_sample(x0, t, noise)
    official = official_losses(out, x0, t, noise)["vb"]
    tanh = diff.training_losses(out, x0, x_t, t, noise)["vb"]
    exact = IDDPM(decoder_cdf="exact").training_losses(out, x0, x_t, t, noise)["vb"]
    torch.testing.assert_close(tanh, official, rtol=1e-6, atol=0)
    assert ((exact - official).abs() / official).max() > 1e-3  # the two really differ: the default is a choice
    with pytest.raises(ValueError, match="decoder_cdf"):
        IDDPM(decoder_cdf="erf")
