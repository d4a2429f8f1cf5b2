"""Drive diffusers' multistep schedulers themselves on any σ grid with a VE denoiser D(x, σ).

Each scheduler is built with ``prediction_type="sample"`` (the model output is D, the x₀ prediction)
and ``set_timesteps(n)`` (its history and counters), then given our grid as ``scheduler.sigmas`` and
one distinct timestep per step (it only uses them to count steps). DPM-Solver++, UniPC and DEIS hold
the VP state x·α(σ), α = 1/√(1 + σ²) (their ``_sigma_to_alpha_sigma_t``), LMS the VE state x. Their
updates depend on the grid through λ = −log σ only, so this is the same ODE solve as in VP or flow
coordinates. diffusers' DEIS cannot step to σ = 0 (it takes log 0 and returns NaN): a final 0 is
replaced by ``DEIS_ZERO``·σ_min for it alone, where its first-order last step is x = D(x, σ_min) up to
a relative 1e-12. DPM-Solver++ rounds its state to float32 at every step (diffusers' own upcast).
"""
from __future__ import annotations

import diffusers
import torch

DEIS_ZERO = 1e-12

SCHEDULERS = {
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}),
    "dpmpp_3m": (diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}),
    **{f"unipc{p}": (diffusers.UniPCMultistepScheduler, {"solver_order": p}) for p in (1, 2, 3)},
    **{f"deis{p}": (diffusers.DEISMultistepScheduler, {"solver_order": p}) for p in (2, 3)},
    "lms": (diffusers.LMSDiscreteScheduler, {}),
}


def scheduler_on(cls, config: dict, sigmas: torch.Tensor):
    """A fresh ``cls(**config)`` scheduler whose grid is ``sigmas`` (decreasing VE σ, n + 1 values)."""
    n = len(sigmas) - 1
    scheduler = cls(prediction_type="sample", **config)
    scheduler.set_timesteps(n)
    if cls is diffusers.DEISMultistepScheduler and sigmas[-1] == 0:
        sigmas = torch.cat([sigmas[:-1], sigmas[-2:-1] * DEIS_ZERO])
    scheduler.sigmas = sigmas.detach().cpu()
    scheduler.timesteps = torch.arange(n, 0, -1)
    scheduler.set_begin_index(0)
    scheduler.is_scale_input_called = True  # LMS: our D takes the VE state unscaled
    return scheduler


def solve(cls, config: dict, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None):
    """x₀ from x at σ_0 along ``sigmas`` with diffusers' ``cls`` scheduler, one D call per step."""
    scheduler = scheduler_on(cls, config, sigmas)
    vp = cls is not diffusers.LMSDiscreteScheduler
    alpha = lambda s: (1 + s**2) ** -0.5 if vp else 1.0  # noqa: E731
    state = x * alpha(sigmas[0])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sigma = sigmas[i].to(x).expand(x.shape[0])
            denoised = model(state / alpha(sigmas[i]), sigma, **(extra_args or {}))
            state = scheduler.step(denoised, t, state).prev_sample
    return state / alpha(scheduler.sigmas[-1].to(x))


def solver(name: str):
    """diffusers' scheduler ``name`` (a key of ``SCHEDULERS``) as ``f(model, x, sigmas)``."""
    cls, config = SCHEDULERS[name]
    return lambda model, x, sigmas: solve(cls, config, model, x, sigmas)
