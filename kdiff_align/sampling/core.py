"""Integrators of the probability-flow ODE and of reverse SDEs, in k-diffusion's conventions.

Every sampler has the signature ``sampler(model, x, sigmas, *, extra_args=None, callback=None,
disable=None, **kw) -> x`` with ``model(x, sigma[B], **extra_args) -> x̂₀``, so k-diffusion's
``sample_*`` functions and these are interchangeable. Step functions return ``(x_next, denoised)``
and accept a precomputed ``denoised`` so alignment code can reuse the first network call.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from numbers import Real
from typing import Callable

import torch
import torchdiffeq
from torch import Tensor
from tqdm.auto import tqdm

from ..utils import (Generator, append_dims, as_sigma, check_generator, check_sigmas, check_input,
                    default_noise_sampler, get_ancestral_step, randn_like, to_d)
from .grad import check_grad, fixed_noise, grad_context, grad_inputs, run_steps
from .multistep import MULTISTEP_METHODS, multistep_odeint
from .sde import SDE_METHODS, sde_run

FIXED_METHODS = ("euler", "heun", "dpm2", "rk4")
ADAPTIVE_METHODS = {"dopri5": "dopri5", "bosh3": "bosh3", "adaptive_heun": "adaptive_heun"}
METHODS = FIXED_METHODS + MULTISTEP_METHODS + tuple(ADAPTIVE_METHODS)
NFE_PER_STEP = {"euler": 1, "heun": 2, "dpm2": 2, "rk4": 4, **{m: 1 for m in MULTISTEP_METHODS}}


def is_tuned(method) -> bool:
    """Whether ``method`` is a ``TunedSampler``: a sampler that brings its own grid (``along``)."""
    return hasattr(method, "along")


def check_method(method: str, allowed=METHODS, *, tuned: bool = False, where: str = "this function") -> str:
    """Reject unknown integrator names, listing the valid ones. A ``TunedSampler`` passes only where
    ``tuned`` (``odeint`` and the samplers built on it); elsewhere (``where``) it fails naming ``method``."""
    if is_tuned(method):
        if tuned:
            return method
        raise ValueError(f"method: a TunedSampler integrates the PF-ODE forward (σ decreasing) only, with odeint; "
                         f"{where} needs one of {', '.join(allowed)}, got {method!r}")
    if method not in allowed:
        raise ValueError(f"method must be one of {', '.join(allowed)}; got {method!r}")
    return method


def _last_step(sigma_next) -> bool:
    """True when every item steps to σ = 0 (the final Euler step x = D); mixed grids are rejected.

    A float is checked without touching the device (no synchronisation on GPUs).
    """
    if isinstance(sigma_next, (int, float)):
        return sigma_next == 0
    zero = torch.as_tensor(sigma_next) == 0
    if zero.any() and not zero.all():
        raise ValueError("sigma_next must be 0 for all batch items or for none")
    return bool(zero.all())


def ode_step(model, x: Tensor, sigma, sigma_next, *, extra_args: dict | None = None, method: str = "heun",
             denoised: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, Alg. 1).

    Works in both directions (σ_next < σ samples, σ_next > σ inverts); a step to σ = 0 is the Euler
    step ``x = denoised``. ``denoised`` may be passed when D(x, σ) is already known.
    """
    check_method(method, FIXED_METHODS, where="ode_step")
    extra_args = {} if extra_args is None else extra_args
    last = _last_step(sigma_next)
    sigma, sigma_next = as_sigma(sigma, x), as_sigma(sigma_next, x)
    if denoised is None:
        denoised = model(x, sigma, **extra_args)
    if last:
        return denoised, denoised
    d = to_d(x, sigma, denoised)
    h = append_dims(sigma_next - sigma, x.ndim)
    if method == "euler":
        return x + d * h, denoised
    if method == "heun":
        x_2 = x + d * h
        d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next, **extra_args))
        return x + (d + d_2) / 2 * h, denoised
    if method == "dpm2":
        sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
        x_2 = x + d * append_dims(sigma_mid - sigma, x.ndim)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid, **extra_args))
        return x + d_2 * h, denoised
    sigma_mid = (sigma + sigma_next) / 2  # classical RK4 in σ
    k_2 = to_d(x + d * h / 2, sigma_mid, model(x + d * h / 2, sigma_mid, **extra_args))
    k_3 = to_d(x + k_2 * h / 2, sigma_mid, model(x + k_2 * h / 2, sigma_mid, **extra_args))
    k_4 = to_d(x + k_3 * h, sigma_next, model(x + k_3 * h, sigma_next, **extra_args))
    return x + (d + 2 * k_2 + 2 * k_3 + k_4) / 6 * h, denoised


def _is_number(v) -> bool:
    """A real number or a 0-d tensor, not a bool or a string."""
    return not isinstance(v, bool) and (isinstance(v, Real) or (isinstance(v, Tensor) and v.ndim == 0))


def check_beta(beta) -> None:
    """Fail early unless ``beta`` is None, a finite number >= 0, ``"anderson"`` or a callable β(σ)."""
    if beta is None or callable(beta) or (isinstance(beta, str) and beta == "anderson"):
        return
    if not _is_number(beta):
        raise TypeError(f"beta must be a number >= 0, 'anderson' or a callable beta(sigma), got {beta!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be >= 0 and finite, got {beta}")


def _check_sde_args(eta, beta, generator, batch: int) -> None:
    """``sdeint``'s noise arguments: ``eta`` a number >= 0, ``beta`` (``check_beta``), ``generator``."""
    if not _is_number(eta):
        raise TypeError(f"eta must be a number >= 0, got {eta!r}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    check_beta(beta)
    check_generator(generator, batch)


def _beta_at(beta, sigma: Tensor) -> Tensor:
    """β(σ) of the Karras SDE: a number, ``"anderson"`` (β = 1/σ) or a callable of σ."""
    if isinstance(beta, str) and beta == "anderson":
        return 1 / sigma
    if callable(beta):
        return torch.as_tensor(beta(sigma), dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    check_beta(beta)
    return torch.full_like(sigma, float(beta))


def needs_noise(sigma_next, eta: float = 1.0, beta=None) -> bool:
    """Whether an SDE step draws noise (none on the last step, at η = 0 or at β ≡ 0)."""
    if _last_step(sigma_next):
        return False
    return bool(beta != 0) if beta is not None else eta > 0


def sde_step(model, x: Tensor, sigma, sigma_next, *, extra_args: dict | None = None, eta: float = 1.0,
             s_noise: float = 1.0, beta=None, noise: Tensor | None = None, generator: Generator = None,
             denoised: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One reverse-SDE step: the ancestral/DDPM-posterior kernel (``eta``) or the Karras β-SDE.

    Args:
        eta: ancestral kernel weight; 1 is the DDPM posterior q(x_σ' | x_σ, x̂₀), 0 is DDIM/Euler.
        beta: if given, use the Karras et al. (2022) eq. 6 SDE instead, with drift (1 + βσ)(x − D)/σ and
            diffusion √(2β)σ, integrated by Heun with the same noise in both stages (Sampling Demon's
            stepper). A number, ``"anderson"`` (β = 1/σ) or a callable β(σ).
        noise: standard-normal noise to use instead of drawing it (e.g. Demon's chosen z*).
        generator: a ``torch.Generator`` or one per batch item (see ``utils.randn_like``).
    """
    extra_args = {} if extra_args is None else extra_args
    last, draw = _last_step(sigma_next), noise is None and needs_noise(sigma_next, eta, beta)
    sigma, sigma_next = as_sigma(sigma, x), as_sigma(sigma_next, x)
    if denoised is None:
        denoised = model(x, sigma, **extra_args)
    if last:
        return denoised, denoised
    if draw:
        noise = randn_like(x, generator)
    d = to_d(x, sigma, denoised)
    if beta is None:
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x_next = x + d * append_dims(sigma_down - sigma, x.ndim)
        if eta > 0:
            x_next = x_next + noise * s_noise * append_dims(sigma_up, x.ndim)
        return x_next, denoised
    beta_1, beta_2 = _beta_at(beta, sigma), _beta_at(beta, sigma_next)
    dt = append_dims(sigma_next - sigma, x.ndim)
    rand = noise * s_noise * dt.abs().sqrt() if noise is not None else 0.0
    f_1 = append_dims(1 + beta_1 * sigma, x.ndim) * d
    g_1 = append_dims((2 * beta_1).sqrt() * sigma, x.ndim)
    x_pred = x + f_1 * dt + g_1 * rand
    f_2 = append_dims(1 + beta_2 * sigma_next, x.ndim) * to_d(x_pred, sigma_next,
                                                               model(x_pred, sigma_next, **extra_args))
    g_2 = append_dims((2 * beta_2).sqrt() * sigma_next, x.ndim)
    return x + (f_1 + f_2) / 2 * dt + (g_1 + g_2) / 2 * rand, denoised


class _LogSigmaODE(torch.nn.Module):
    """The PF-ODE in u = ±log σ for torchdiffeq: dx/du = ±(x − D), with k-diffusion callbacks."""

    def __init__(self, model, extra_args, sign: float, callback, pbar, batch: int):
        super().__init__()
        self.model, self.extra_args, self.sign = model, extra_args, sign
        self.callback, self.pbar, self.batch = callback, pbar, batch
        self.cache: OrderedDict[float, Tensor] = OrderedDict()
        self.nfe, self.i = 0, 0

    def sigma(self, u: Tensor, x: Tensor) -> Tensor:
        return (self.sign * u).exp().to(x.dtype).expand(self.batch)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        denoised = self.model(x, self.sigma(u, x), **self.extra_args)
        self.nfe += 1
        self.cache[float(u)] = denoised
        while len(self.cache) > 16:
            self.cache.popitem(last=False)
        return self.sign * (x - denoised)

    def callback_step(self, u0: Tensor, x0: Tensor, du: Tensor) -> None:
        if self.callback is not None:
            sigma = self.sigma(u0, x0)
            # torchdiffeq evaluates f at times rounded to the state's dtype: match within that precision
            near = [d for u, d in self.cache.items() if abs(u - float(u0)) <= 1e-6 * max(1.0, abs(float(u0)))]
            self.callback({"x": x0, "i": self.i, "sigma": sigma, "sigma_hat": sigma,
                           "denoised": near[-1] if near else None, "h": du, "nfe": self.nfe})

    def callback_accept_step(self, u0: Tensor, x0: Tensor, du: Tensor) -> None:
        self.i += 1
        self.pbar.update(float(du))


def _adaptive(model, x, sigma_from, sigma_to, extra_args, callback, disable, method, rtol, atol,
              grad=None) -> Tensor:
    """Integrate the PF-ODE from σ_from to σ_to (> 0) with an adaptive torchdiffeq solver in log σ
    (``grad="adjoint"``: torchdiffeq's ``odeint_adjoint``, O(1) memory, gradients to solver tolerance)."""
    sign = -1.0 if sigma_to < sigma_from else 1.0
    u = sign * torch.tensor([float(sigma_from), float(sigma_to)], dtype=torch.float64).log()
    with tqdm(total=float(u[1] - u[0]), disable=disable, unit="log σ",
              bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} log σ") as pbar:
        func = _LogSigmaODE(model, extra_args, sign, callback, pbar, x.shape[0])
        if grad == "adjoint":
            return torchdiffeq.odeint_adjoint(func, x, u.to(x.device), rtol=rtol, atol=atol,
                                              method=ADAPTIVE_METHODS[method],
                                              adjoint_params=tuple(grad_inputs(model, extra_args)))[-1]
        return torchdiffeq.odeint(func, x, u.to(x.device), rtol=rtol, atol=atol,
                                  method=ADAPTIVE_METHODS[method])[-1]


def _fixed_grid(model, x, sigmas, method, extra_args, callback, disable, grad, grad_last) -> Tensor:
    """The k-diffusion loop of a one-step ``method`` along ``sigmas`` (either direction), in a ``grad`` mode."""
    s = sigmas.tolist()  # one device sync per run; steps then branch on floats

    def step(i, x):
        denoised = model(x, as_sigma(s[i], x), **extra_args)
        x_next, _ = ode_step(model, x, s[i], s[i + 1], extra_args=extra_args, method=method, denoised=denoised)
        return x_next, {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}, ()

    return run_steps(step, x, len(s) - 1, callback=callback, disable=disable, grad=grad, grad_last=grad_last,
                     model=model, extra_args=extra_args)


def _shape_checked(model) -> Callable:
    """``model`` failing on a x̂₀ whose shape is not x's (the state would change shape by broadcasting)."""
    def denoiser(x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        denoised = model(x, sigma, **extra_args)
        if getattr(denoised, "shape", None) != x.shape:
            raise ValueError(f"model returned x̂₀ of shape {tuple(getattr(denoised, 'shape', ()))} for x of shape "
                             f"{tuple(x.shape)}; a denoiser must return x's shape (a 1-D x is a batch of scalars)")
        return denoised
    denoiser.__wrapped__ = model  # the adjoint's parameters are the wrapped model's (``grad.grad_inputs``)
    return denoiser


def _check_inputs(model, x, sigmas, extra_args, method, decreasing: bool, end_zero: bool = True,
                  where: str = "odeint") -> dict:
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser D(x, sigma, **extra_args), got {type(model).__name__}")
    check_input(x, "x")
    check_sigmas(sigmas, decreasing=decreasing, end_zero=end_zero)
    if method is not None:
        check_method(method, where=where)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got {type(extra_args).__name__}")
    return {} if extra_args is None else extra_args


def odeint(model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callable | None = None,
           disable: bool | None = None, method: str = "heun", rtol: float = 1e-4, atol: float = 1e-4,
           grad: str | None = None, grad_last: int | None = None, **solver_kw) -> Tensor:
    """Sample by integrating the probability-flow ODE along decreasing ``sigmas``.

    Fixed-grid methods (euler, heun, dpm2, rk4) and multistep ones (lms, dpmpp_2m, dpmpp_3m, unipc,
    ipndm, deis; one evaluation per step, see ``multistep``) step through the grid; adaptive ones
    (dopri5, bosh3, adaptive_heun) run torchdiffeq in log σ from ``sigmas[0]`` to the last positive σ.
    A grid ending in 0 ends with the step x = D(x, σ_min); a grid ending above 0 (a split grid, e.g.
    ``sigmas[:k]``) returns the noisy state there, so ``odeint(sigmas[k-1:])`` can continue it.

    Args:
        method: a name from ``METHODS``, or a ``TunedSampler``, whose solver then runs on its own grid
            between ``sigmas[0]`` and ``sigmas[-1]`` (``TunedSampler.along``).
        grad: None (no graph, as k-diffusion), ``"full"`` (autograd through the unrolled loop),
            ``"checkpoint"`` (per-step activation checkpointing) or ``"adjoint"`` (discrete adjoint on
            fixed grids, torchdiffeq's ``odeint_adjoint`` for the adaptive methods); see ``sampling.grad``.
        grad_last: with ``grad``, differentiate only the last K steps (DRaFT-K).
        solver_kw: multistep options: ``order``, ``variant`` (UniPC "bh1"/"bh2"),
            ``lower_order_final``, ``sigma_steps``, ``corrections``, ``input_sigmas``.
    """
    if is_tuned(method):
        sigmas = method.along(sigmas)
        solver_kw, method = {**method.options(sigmas), **solver_kw}, method.method
    extra_args = _check_inputs(model, x, sigmas, extra_args, method, decreasing=True, end_zero=False)
    model = _shape_checked(model)
    check_grad(grad, grad_last, adaptive=method in ADAPTIVE_METHODS)
    if solver_kw and method not in MULTISTEP_METHODS:
        raise TypeError(f"{', '.join(solver_kw)} only apply to the multistep methods, not {method!r}")
    with grad_context(grad):
        if method in MULTISTEP_METHODS:
            return multistep_odeint(model, x, sigmas, method, extra_args=extra_args, callback=callback,
                                    disable=disable, grad=grad, grad_last=grad_last, **solver_kw)
        if method not in ADAPTIVE_METHODS:
            return _fixed_grid(model, x, sigmas, method, extra_args, callback, disable, grad, grad_last)
        ends_in_zero = float(sigmas[-1]) == 0
        last = sigmas[-2] if ends_in_zero else sigmas[-1]
        if len(sigmas) > 2 or not ends_in_zero:
            x = _adaptive(model, x, sigmas[0], last, extra_args, callback, disable, method, rtol, atol, grad)
        if not ends_in_zero:
            return x
        denoised = model(x, as_sigma(float(sigmas[-2]), x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": len(sigmas) - 2, "sigma": sigmas[-2], "sigma_hat": sigmas[-2],
                      "denoised": denoised})
        return denoised


def oderevert(model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None,
              callback: Callable | None = None, disable: bool | None = None, method: str = "heun",
              rtol: float = 1e-4, atol: float = 1e-4, grad: str | None = None,
              grad_last: int | None = None) -> Tensor:
    """Invert sampling: integrate the PF-ODE upward along increasing, positive ``sigmas``.

    ``oderevert(model, odeint(model, x, s), revert_sigmas(s)) ≈ x`` up to discretisation error and the
    final step's σ_min·ε term (the data point is taken as the state at σ_min). ``grad`` and
    ``grad_last`` as in ``odeint``. A ``TunedSampler`` is rejected: it integrates σ decreasing only.
    """
    extra_args = _check_inputs(model, x, sigmas, extra_args, method, decreasing=False,
                               where="oderevert (σ increasing)")
    model = _shape_checked(model)
    check_grad(grad, grad_last, adaptive=method in ADAPTIVE_METHODS)
    with grad_context(grad):
        if method in MULTISTEP_METHODS:
            return multistep_odeint(model, x, sigmas, method, extra_args=extra_args, callback=callback,
                                    disable=disable, grad=grad, grad_last=grad_last)
        if method in ADAPTIVE_METHODS:
            return _adaptive(model, x, sigmas[0], sigmas[-1], extra_args, callback, disable, method, rtol, atol,
                             grad)
        return _fixed_grid(model, x, sigmas, method, extra_args, callback, disable, grad, grad_last)


def _ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, generator, beta,
               grad, grad_last) -> Tensor:
    """The Euler-ancestral / Karras β-SDE loop of ``sdeint`` around ``sde_step``, noise fixed per path."""
    s = sigmas.tolist()  # one device sync per run; steps then branch on floats
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    noise_sampler = noise_sampler if grad is None else fixed_noise(noise_sampler)

    def step(i, x):
        denoised = model(x, as_sigma(s[i], x), **extra_args)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if needs_noise(s[i + 1], eta, beta) else None
        x_next, _ = sde_step(model, x, s[i], s[i + 1], extra_args=extra_args, eta=eta, s_noise=s_noise,
                             beta=beta, noise=noise, generator=generator, denoised=denoised)
        return x_next, {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}, ()

    return run_steps(step, x, len(s) - 1, callback=callback, disable=disable, grad=grad, grad_last=grad_last,
                     model=model, extra_args=extra_args)


def sdeint(model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callable | None = None,
           disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
           noise_sampler: Callable | None = None, generator: Generator = None, beta=None,
           method: str = "ancestral", solver_type: str = "midpoint", r: float = 0.5,
           grad: str | None = None, grad_last: int | None = None) -> Tensor:
    """Sample with a reverse SDE: ancestral (``eta``; DDPM at 1, DDIM at 0), Karras β-SDE (``beta``), or
    one of the DPM-Solver families (``method``).

    Args:
        noise_sampler: ``noise_sampler(sigma, sigma_next) -> noise like x``; overrides ``generator``.
        generator: a ``torch.Generator`` or a list of one per batch item, which makes each item's
            sample independent of the batch it is in. For the DPM-Solver++ SDEs it seeds a Brownian
            tree over every σ (one per item for a list), so refining the grid converges to one sample
            path and a split grid with one generator gives the whole grid's path (``sde.sde_run``).
        beta: see ``sde_step``; when given, ``eta`` is ignored. The Heun β-SDE stays accurate while
            β·|Δσ| is of order 1; far larger steps over-contract and collapse modes (a warning says so).
        method: ``"ancestral"`` (Euler ancestral / β-SDE), ``"dpm2_ancestral"``,
            ``"dpmpp_2s_ancestral"``, ``"dpmpp_sde"`` (2 evaluations per step), ``"dpmpp_2m_sde"``,
            ``"dpmpp_3m_sde"`` (1 per step); ``eta`` weighs the fresh noise in all of them.
        solver_type: ``"midpoint"`` or ``"heun"`` second-order term of ``dpmpp_2m_sde``.
        r: the intermediate point of ``dpmpp_sde`` as a fraction of the step in log σ.
        grad: as in ``odeint`` (every method supports all three modes); the noise is drawn once per path
            and reused when a step is recomputed, so the gradient is the pathwise one.
        grad_last: with ``grad``, differentiate only the last K steps.

    A grid ending above 0 returns the noisy state there (a split grid).
    """
    extra_args = _check_inputs(model, x, sigmas, extra_args, None, decreasing=True, end_zero=False)
    model = _shape_checked(model)
    _check_sde_args(eta, beta, generator, x.shape[0])
    check_method(method, SDE_METHODS, where="sdeint")
    check_grad(grad, grad_last)
    if method != "ancestral":
        if beta is not None:
            raise ValueError(f"beta applies to method='ancestral' only, not {method!r}")
        with grad_context(grad):
            return sde_run(model, x, sigmas, method, generator=generator, noise_sampler=noise_sampler, eta=eta,
                           extra_args=extra_args, callback=callback, disable=disable, s_noise=s_noise,
                           solver_type=solver_type, r=r, grad=grad, grad_last=grad_last)
    max_step = float((sigmas[:-2] - sigmas[1:-1]).max()) if len(sigmas) > 2 else 0.0
    if isinstance(beta, (int, float)) and beta * max_step > 4:
        warnings.warn(f"beta={beta} with steps of up to {max_step:.3g} in σ "
                      "makes β·|Δσ| > 4: the β-SDE discretisation is inaccurate; use more steps or a smaller beta")
    with grad_context(grad):
        return _ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, generator,
                          beta, grad, grad_last)
