"""Noise schedules with k-diffusion's names, and σ ↔ t maps for discrete ᾱ tables."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def append_zero(x: Tensor) -> Tensor:
    """Append a final 0 so that the last sampler step lands on the data."""
    return torch.cat([x, x.new_zeros([1])])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer number of steps, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> Tensor:
    """Karras et al. (2022) schedule: n steps, σ_max → σ_min spaced uniformly in σ^{1/ρ}, then 0."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    sigmas[-1], sigmas[0] = sigma_min, sigma_max
    return append_zero(sigmas.float()).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> Tensor:
    """Schedule uniform in log σ, then 0."""
    _check_range(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    sigmas[-1], sigmas[0] = sigma_min, sigma_max
    return append_zero(sigmas.float()).to(device)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device="cpu") -> Tensor:
    """Polynomial in log σ (ρ = 1 is the exponential schedule), then 0."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas.float()).to(device)


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3,
                  device="cpu") -> Tensor:
    """Continuous VP schedule (Song et al. 2021) expressed as VE σ, then 0."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer number of steps, got {n}")
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must lie in (0, 1), got {eps_s}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    sigmas = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas.float()).to(device)


def revert_sigmas(sigmas: Tensor) -> Tensor:
    """Turn a sampling grid (decreasing, ending in 0) into an inversion grid (increasing, > 0)."""
    return sigmas[sigmas > 0].flip(0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t): the VE noise level of each discrete timestep."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if alphas_cumprod.ndim != 1 or ((alphas_cumprod <= 0) | (alphas_cumprod > 1)).any():
        raise ValueError("alphas_cumprod must be a 1-D table with values in (0, 1]")
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: Tensor, sigmas_table: Tensor, quantize: bool = False) -> Tensor:
    """Fractional timestep of σ by linear interpolation of log σ in an increasing table."""
    return log_sigma_to_t(sigma, sigmas_table.to(sigma.device, torch.float64).clamp_min(1e-30).log(), quantize)


def log_sigma_to_t(sigma: Tensor, log_sigmas: Tensor, quantize: bool = False) -> Tensor:
    """``sigma_to_t`` against a precomputed increasing log σ table (binary search, clamped to the table)."""
    log_sigma = sigma.to(log_sigmas.dtype).clamp_min(1e-30).log()
    if quantize:
        return (log_sigma[..., None] - log_sigmas).abs().argmin(-1).to(sigma.dtype)
    high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, log_sigmas.shape[0] - 1)
    low_value, high_value = log_sigmas[high - 1], log_sigmas[high]
    w = ((log_sigma - low_value) / (high_value - low_value)).clamp(0, 1)
    return (high - 1 + w).to(sigma.dtype)


def t_to_sigma(t: Tensor, sigmas_table: Tensor) -> Tensor:
    """σ of a fractional timestep by linear interpolation of log σ."""
    log_sigmas = sigmas_table.to(t.device, torch.float64).log()
    t = t.to(torch.float64).clamp(0, log_sigmas.shape[0] - 1)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp().float()


def flow_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t ↦ s·t/(1 + (s − 1)·t) (s > 1 spends more steps at high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas_flow(n: int, shift: float = 1.0, t_max: float = 1 - 1e-3, t_min: float = 1e-3,
                    device="cpu") -> Tensor:
    """Rectified-flow schedule: t uniform from ``t_max`` to ``t_min``, shifted, as σ = t/(1 − t), then 0.

    t = 1 (pure noise) is σ = ∞, which the variance-exploding form cannot hold, so ``t_max`` < 1; the
    starting state is x = σ_max·ε as for any VE sampler (off by x₀, i.e. by 1/σ_max relatively).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer number of steps, got {n}")
    if not 0 < t_min < t_max < 1:
        raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = flow_shift(torch.linspace(t_max, t_min, n, dtype=torch.float64), shift)
    return append_zero((t / (1 - t)).float()).to(device)
