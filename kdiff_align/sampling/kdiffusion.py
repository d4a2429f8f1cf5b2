"""Drop-ins for k-diffusion's ``sample_*`` functions: same names, positional signatures and numbers.

Each takes ``model(x, sigma[B], **extra_args) -> D``; where k-diffusion draws from the global RNG,
these do too unless ``generator=`` is given (keyword-only, our addition). Differences, all of which
leave the law of the samples unchanged: with ``s_churn`` restricted by ``s_tmin/s_tmax`` we draw
churn noise only on the churned steps (k-diffusion draws, and discards, one every step), and
deterministic steps (η = 0) draw nothing, so the global RNG stream after the call can differ.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from ..utils import Generator, as_sigma, randn_like
from .core import ode_step, sdeint
from .multistep import multistep_odeint
from .sde import BrownianTreeNoiseSampler, ancestral_split, sde_solve

_INF = float("inf")


def churn_gamma(sigma: float, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Karras et al. (2022) Alg. 2: γ = min(S_churn/N, √2 − 1) for σ in [S_tmin, S_tmax], else 0."""
    return min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _churned(model, x, sigmas, method, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras Alg. 2: raise σ to σ̂ = σ(1 + γ) by adding noise, then one ``method`` ODE step from σ̂."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    for i in trange(len(s) - 1, disable=disable):
        gamma = churn_gamma(s[i], len(s) - 1, s_churn, s_tmin, s_tmax)
        sigma_hat = s[i] * (gamma + 1)
        if gamma > 0:
            x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - s[i] ** 2) ** 0.5
        denoised = model(x, as_sigma(sigma_hat, x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x, _ = ode_step(model, x, sigma_hat, s[i + 1], extra_args=extra_args, method=method, denoised=denoised)
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=_INF, s_noise=1., *, generator: Generator = None) -> Tensor:
    """Euler steps with optional churn (Karras et al. 2022, Alg. 2)."""
    return _churned(model, x, sigmas, "euler", extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                    generator)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=_INF, s_noise=1., *, generator: Generator = None) -> Tensor:
    """Heun steps with optional churn (Karras et al. 2022, Alg. 2); Euler on the step to 0."""
    return _churned(model, x, sigmas, "heun", extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                    generator)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=_INF, s_noise=1., *, generator: Generator = None) -> Tensor:
    """DPM-Solver-2-style midpoint steps in log σ with optional churn (Karras et al. 2022, Alg. 2)."""
    return _churned(model, x, sigmas, "dpm2", extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                    generator)


def _noise(x, noise_sampler, generator):
    return noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: randn_like(x, generator))


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator: Generator = None) -> Tensor:
    """Euler ancestral sampling (the DDPM posterior kernel at η = 1)."""
    return sdeint(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, eta=eta,
                  s_noise=s_noise, noise_sampler=_noise(x, noise_sampler, generator))


def _sde(method, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, **kw):
    return sde_solve(model, x, sigmas, method, extra_args={} if extra_args is None else extra_args,
                     callback=callback, disable=disable, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler,
                     **kw)


def _tree(x, sigmas, noise_sampler):
    """k-diffusion's default for the SDE solvers: one Brownian tree seeded from the global RNG."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max())


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator: Generator = None) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps."""
    return _sde("dpm2_ancestral", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                _noise(x, noise_sampler, generator))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, generator: Generator = None) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022)."""
    return _sde("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                _noise(x, noise_sampler, generator))


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2) -> Tensor:
    """DPM-Solver++ SDE (two evaluations per step), Brownian-tree noise by default."""
    return _sde("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                _tree(x, sigmas, noise_sampler), r=r)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint') -> Tensor:
    """DPM-Solver++(2M) SDE, Brownian-tree noise by default."""
    return _sde("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                _tree(x, sigmas, noise_sampler), solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None) -> Tensor:
    """DPM-Solver++(3M) SDE, Brownian-tree noise by default."""
    return _sde("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                _tree(x, sigmas, noise_sampler))


def _multistep(method, model, x, sigmas, extra_args, callback, disable, **kw):
    return multistep_odeint(model, x, sigmas, method, extra_args={} if extra_args is None else extra_args,
                            callback=callback, disable=disable, **kw)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4) -> Tensor:
    """Linear multistep on d in σ, full order to the end as in k-diffusion (exact Lagrange weights)."""
    return _multistep("lms", model, x, sigmas, extra_args, callback, disable, order=order, lower_order_final=False)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022)."""
    return _multistep("dpmpp_2m", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant="bh2") -> Tensor:
    """UniPC predictor–corrector (Zhao et al. 2023), data prediction, B(h) ``variant`` "bh1" or "bh2"."""
    return _multistep("unipc", model, x, sigmas, extra_args, callback, disable, order=order, variant=variant)


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023): equal-step Adams–Bashforth on d in σ, warm-up from order 1."""
    return _multistep("ipndm", model, x, sigmas, extra_args, callback, disable, order=order)


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3) -> Tensor:
    """DEIS (Zhang & Chen 2022), log-ρ form: ε interpolated in log σ, integrated exactly in σ."""
    return _multistep("deis", model, x, sigmas, extra_args, callback, disable, order=order)


def _eps(model, x, t: float, extra_args, counter: list) -> Tensor:
    """ε(x, σ = e^{−t}) = (x − D)/σ, counting the evaluation."""
    sigma = math.exp(-t)
    counter.append(1)
    return (x - model(x, as_sigma(sigma, x), **extra_args)) / sigma


def dpm_solver_step(model, x, t: float, t_next: float, eps: Tensor, order: int, extra_args, counter: list,
                    r1: float | None = None, cache: dict | None = None) -> Tensor:
    """Singlestep DPM-Solver-1/2/3 in ε form (Lu et al. 2022a, Alg. 1), r1 = 1/2 (order 2) or 1/3 (order 3).

    ``cache`` keeps ε at the intermediate point t + r1·h, so an order-2 and an order-3 step with the
    same r1 (the adaptive solver's pair) share that evaluation.
    """
    h, cache = t_next - t, {} if cache is None else cache
    sig = lambda tt: math.exp(-tt)  # noqa: E731
    x_1 = x - sig(t_next) * math.expm1(h) * eps
    if order == 1:
        return x_1
    r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = t + r1 * h
    if r1 not in cache:
        cache[r1] = _eps(model, x - sig(s1) * math.expm1(r1 * h) * eps, s1, extra_args, counter)
    eps_1 = cache[r1]
    if order == 2:
        return x_1 - sig(t_next) / (2 * r1) * math.expm1(h) * (eps_1 - eps)
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - sig(s2) * math.expm1(r2 * h) * eps
          - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps))
    eps_2 = _eps(model, u2, s2, extra_args, counter)
    return x_1 - sig(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_2 - eps)


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """The deterministic target time and the fresh-noise std of an ancestral DPM-Solver step."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_split(math.exp(-t), math.exp(-t_next), eta)
    t_down = min(t_end, -math.log(sigma_down))
    return t_down, max(math.exp(-2 * t_next) - math.exp(-2 * t_down), 0.0) ** 0.5


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, *, generator: Generator = None) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022a): ``n`` evaluations in steps of order 3 uniform in log σ.

    Takes σ_min/σ_max, not a grid; returns the state at σ_min (no final denoising step).
    """
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min and sigma_max must be > 0, got {sigma_min} and {sigma_max}")
    extra_args, noise_sampler = {} if extra_args is None else extra_args, _noise(x, noise_sampler, generator)
    t_start, t_end = -math.log(float(sigma_max)), -math.log(float(sigma_min))
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    counter = []
    for i in trange(len(orders), disable=disable):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = _eps(model, x, t, extra_args, counter)
        if callback is not None:
            sigma = math.exp(-t)
            callback({"x": x, "i": i, "t": t, "t_up": t, "sigma": sigma, "sigma_hat": sigma,
                      "denoised": x - sigma * eps})
        x = dpm_solver_step(model, x, t, t_down, eps, orders[i], extra_args, counter)
        if sigma_up:
            x = x + sigma_up * s_noise * noise_sampler(math.exp(-t), math.exp(-t_next))
    return x


def _pid_factor(errs: list[float], error: float, b: tuple[float, float, float], eps: float = 1e-8) -> float:
    """PID step-size factor from the last inverse errors, soft-limited by 1 + atan(f − 1)."""
    inv_error = 1 / (float(error) + eps)
    if not errs:
        errs.extend([inv_error] * 3)
    errs[0] = inv_error
    factor = errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2]
    return 1 + math.atan(factor - 1)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, *, generator: Generator = None):
    """DPM-Solver-12/23 with PID step-size control (Lu et al. 2022a). Ignores any grid: it takes σ_min and
    σ_max and returns the state at σ_min; ``return_info`` adds the counted NFE and accepted/rejected steps."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min and sigma_max must be > 0, got {sigma_min} and {sigma_max}")
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    extra_args, noise_sampler = {} if extra_args is None else extra_args, _noise(x, noise_sampler, generator)
    t_end, s = -math.log(float(sigma_min)), -math.log(float(sigma_max))
    p_order = 1.5 if eta else order
    b = ((pcoeff + icoeff + dcoeff) / p_order, -(pcoeff + 2 * dcoeff) / p_order, dcoeff / p_order)
    h, errs, x_prev, counter = abs(h_init), [], x, []
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps = _eps(model, x, s, extra_args, counter)
        denoised = x - math.exp(-s) * eps
        low, cache = (1, None) if order == 2 else (2, {})
        x_low = dpm_solver_step(model, x, s, t_down, eps, low, extra_args, counter, r1=1 / 3, cache=cache)
        x_high = dpm_solver_step(model, x, s, t_down, eps, order, extra_args, counter, cache=cache)
        delta = torch.maximum(torch.as_tensor(atol, dtype=x.dtype), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        factor = _pid_factor(errs, error, b)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = x_low
            x = x_high + (sigma_up * s_noise * noise_sampler(math.exp(-s), math.exp(-t)) if sigma_up else 0)
            s = t
        h *= factor
        info["n_accept" if accept else "n_reject"] += 1
        info["steps"] += 1
        info["nfe"] = len(counter)
        if callback is not None:
            callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "sigma": math.exp(-s),
                      "sigma_hat": math.exp(-s), "denoised": denoised, "error": error, "h": h, **info})
    return (x, info) if return_info else x
