"""The IDDPM hybrid objective that PixArt-α trains with: ε-prediction plus a learned-range variance.

Schedule: T = 1000, β_t linear 1e-4 → 0.02, ᾱ_t = Π_{s≤t} (1 - β_s); forward q(x_t | x_0) = N(√ᾱ_t x_0, 1 - ᾱ_t).
The model outputs 2C channels: ε̂ (first C) and v ∈ [-1, 1] (last C). With frac = (v + 1) / 2,

    log σ²_θ = frac · log β_t + (1 - frac) · log β̃_t,    β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)   (β̃_0 clipped to β̃_1)
    x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t,    μ_θ = μ̃_t(x̂_0, x_t),
    μ̃_t(x_0, x_t) = (β_t √ᾱ_{t-1} x_0 + (1 - ᾱ_{t-1}) √α_t x_t) / (1 - ᾱ_t)   (the mean of q(x_{t-1} | x_t, x_0))

    loss = mean ‖ε̂ - ε‖² + vb,    vb = KL(q(x_{t-1} | x_t, x_0) ‖ N(μ_θ, σ²_θ)) / log 2   for t > 0
                                   vb = -log p(x_0 | x_1), a discretized Gaussian (bins of 2/255)   for t = 0

with every term a mean over the non-batch dims. vb sees ε̂ through a stop-gradient, so the mean is trained by the mse
alone (DDPM's L_simple, which gives the better samples) and vb only teaches the variance, which L_simple cannot reach
(IDDPM §3.1). Without the detach, vb's much noisier gradients (IDDPM §3.3) would also pull on ε̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_HALF_BIN = 1.0 / 255.0  # the decoder's bins are 2/255 wide: 256 levels of a [-1, 1] signal
_LOG_FLOOR = math.log(1e-12)  # IDDPM clamps each bin's probability at 1e-12: bounded loss, no gradient past it


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))): the approximation IDDPM's (and so PixArt's) decoder uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, cdf: str = "tanh") -> Tensor:
    """log P(x) of the bin of width 2/255 around x under N(mean, e^(2·log_scale)); the bins at x < -0.999 and
    x > 0.999 extend to -∞ and +∞, and log P is floored at log 1e-12 (IDDPM's decoder).

    cdf="tanh" is the official formula: the tanh approximation of Φ, the bin mass as a plain difference of CDFs,
    each log clamped at 1e-12. cdf="exact" is the exact normal CDF in log space; it keeps digits in the tails and
    moves the t = 0 term by 0.5-1 % (a deliberate departure, opt-in: `IDDPM(decoder_cdf="exact")`)."""
    inv_std = torch.exp(-log_scale)
    lo = (x - mean - _HALF_BIN) * inv_std
    hi = (x - mean + _HALF_BIN) * inv_std
    if cdf == "tanh":
        cdf_hi, cdf_lo = approx_standard_normal_cdf(hi), approx_standard_normal_cdf(lo)
        floor = math.exp(_LOG_FLOOR)
        log_hi = torch.log(cdf_hi.clamp(min=floor))
        log_one_minus_lo = torch.log((1.0 - cdf_lo).clamp(min=floor))
        log_mid = torch.log((cdf_hi - cdf_lo).clamp(min=floor))
        return torch.where(x < -0.999, log_hi, torch.where(x > 0.999, log_one_minus_lo, log_mid))
    if cdf != "exact":
        raise ValueError(f"cdf must be 'tanh' (official) or 'exact', not {cdf!r}")
    # Bin mass in log space, log Φ(hi) + log(1 - Φ(lo)/Φ(hi)): log Φ keeps its digits in both tails, where the plain
    # difference does not (in fp32, 1 - Φ(5.6) rounds to 0, and so does torch's fp32 Φ(-5.6) itself).
    log_hi = torch.special.log_ndtr(hi)
    ratio = -torch.expm1(torch.special.log_ndtr(lo) - log_hi)
    mid = log_hi + torch.log(ratio.clamp(min=torch.finfo(ratio.dtype).tiny))  # clamp: no -inf, so no NaN gradients
    edge = torch.where(x < -0.999, log_hi, torch.special.log_ndtr(-lo))
    return torch.where(x.abs() > 0.999, edge, mid).clamp(min=_LOG_FLOOR)


class IDDPM:
    """The forward process, posterior, learned variance and hybrid loss, from float64 buffers cast to the compute
    dtype (at least fp32) per call, as the official code casts its float64 numpy tables. diffusers' DDPMScheduler
    holds ᾱ in float32, which puts √(1 - ᾱ_0) off by 8e-5 relative: it is not used for training.

    decoder_cdf: "tanh" (official) or "exact", the normal CDF of the t = 0 decoder term (see
    `discretized_gaussian_log_likelihood`)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 decoder_cdf: str = "tanh") -> None:
        if decoder_cdf not in ("tanh", "exact"):
            raise ValueError(f"decoder_cdf must be 'tanh' (official) or 'exact', not {decoder_cdf!r}")
        self.num_timesteps = num_timesteps
        self.decoder_cdf = decoder_cdf
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.betas = betas
        self.alphas_cumprod = ac
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.posterior_variance = post_var
        # β̃_0 = 0: its log is -inf, so t = 0 borrows β̃_1 (the decoder's lower end of the variance range).
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.log_betas = torch.log(betas)
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Buffer `name` at timesteps t, shaped [B, 1, ...] to broadcast against `like`, in like's dtype."""
        key = (name, t.device)
        if key not in self._on_device:  # one copy per device, not a host→device transfer every step
            self._on_device[key] = getattr(self, name).to(t.device)
        return self._on_device[key][t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.LongTensor:
        """Uniform over {0, …, T-1}, as PixArt's train.py draws them (no importance sampling)."""
        # Draw where the generator lives: randint refuses a CPU generator with a CUDA device.
        where = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=where).to(device)

    def q_sample(self, x0: Tensor, t: torch.LongTensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, coefficients from the float64 tables, in at least fp32 (ᾱ_999 ≈ 4e-5 is
        coarse in bf16)."""
        out_dtype, dtype = x0.dtype, torch.promote_types(x0.dtype, torch.float32)
        x0, noise = x0.to(dtype), noise.to(dtype)
        x_t = self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        return x_t.to(out_dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def p_mean_logvar(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The model's mean and log variance of p(x_{t-1} | x_t) from [ε̂, v] (LEARNED_RANGE)."""
        eps, v = model_output.chunk(2, dim=1)
        frac = (v + 1) / 2
        max_log, min_log = self._at("log_betas", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)
        log_var = frac * max_log + (1 - frac) * min_log
        x0_hat = (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                  - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        return self.q_posterior(x0_hat, x_t, t)[0], log_var

    def training_losses(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: torch.LongTensor,
                        noise: Tensor, any_t0: bool | None = None) -> dict[str, Tensor]:
        """Per-sample {"loss", "mse", "vb"} ([B] each, loss = mse + vb), computed in at least fp32. `any_t0=False`
        (the caller drew t on the host and knows no row has t = 0) skips the decoder likelihood, which costs as much
        as the rest of the loss and would otherwise need a device sync to skip."""
        dtype = torch.promote_types(torch.promote_types(model_output.dtype, x0.dtype), torch.float32)
        out, x0, x_t, noise = (a.to(dtype) for a in (model_output, x0, x_t, noise))
        C = x0.shape[1]
        if out.shape[1] != 2 * C:
            raise ValueError(f"model_output has {out.shape[1]} channels, want 2 × {C} (ε, then v)")
        eps, v = out[:, :C], out[:, C:]
        mse = _mean_flat((eps - noise) ** 2)

        # Stop-gradient on ε̂: vb trains only the variance channels (see the module docstring).
        mean, log_var = self.p_mean_logvar(torch.cat([eps.detach(), v], dim=1), x_t, t)
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        if any_t0 is False:
            vb = kl
        else:
            logp = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, cdf=self.decoder_cdf)
            nll = -_mean_flat(logp) / math.log(2.0)
            vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def loss(self, model: Callable[[Tensor, torch.LongTensor], Tensor], x0: Tensor, t: torch.LongTensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One training step's losses: draws t and ε where not given (t first, from `generator`), noises x0, calls
        model(x_t, t). Returns training_losses(...) plus "t"."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        if noise is None:
            where = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        return {**self.training_losses(model(x_t, t), x0, x_t, t, noise), "t": t}
