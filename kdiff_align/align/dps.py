"""Diffusion posterior sampling (Chung et al. 2023): the backpropagation baseline of the inexact-Newton steps.

Each step that moves x runs D(x) with autograd and one backward pass, then moves x by −ζ·∇‖y − A x̂₀‖ (the
gradient of the norm, through Jᵀe for the residual e). It shares ``sample_constrained``'s interface,
residuals and solver steps (``newton``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from ..sampling.multistep import MultistepSolver
from ..utils import Generator, append_dims, as_sigma, check_state, nfe_summary
from .newton import (MULTISTEP_SAMPLERS, STEP_SPACES, check_choice, check_residual, check_sampler_inputs, counting,
                     in_window, rms, solver_step)


def _dps_norm(residual, denoised: Tensor, e: Tensor) -> Tensor:
    """‖y − A x̂₀‖ per sample when the residual knows its measurement (``LinearResidual``), else ‖e‖."""
    r = residual.measurement(denoised) if hasattr(residual, "measurement") else e
    return r.flatten(1).norm(dim=1).clamp_min(torch.finfo(e.dtype).tiny)


@torch.no_grad()
def sample_dps(model, x: Tensor, sigmas: Tensor, residual: Callable[[Tensor], Tensor], *, zeta: float = 0.5,
               step_space: str = "vp", sampler: str = "ddim", eta: float = 1.0, window=None,
               extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None,
               generator: Generator = None, return_info: bool = False, sigma_data: float = 1.0):
    """Diffusion posterior sampling (Chung et al. 2023) with the same interface as ``sample_constrained``.

    Each step σ_i → σ_{i+1} > 0 in the window runs D(x) with autograd and one backward pass through the
    network, and after the solver step x′ moves x′ along Jᵀe/‖y − A D(x)‖ = −∇_x‖y − A D(x)‖ (e = Aᵀ(y − A x̂₀),
    Jᵀe = −∇_x ½‖y − A D(x)‖²). The step to σ = 0 returns x̂₀ and takes no gradient (nor pays for one).

    Args:
        zeta: DPS's step ζ (published: 0.5 for inpainting, 0.3 for 4× super-resolution).
        step_space: ``"vp"`` is the published step in the VP/DDPM scale x_t = x/√(1+σ²):
            x_{t′} = x′_{t′} − ζ·∇_{x_t}‖y − A x̂₀‖, the gradient of the norm (not of its square; the authors'
            code differentiates the norm, which is ζ/(2‖y − A x̂₀‖) times the gradient of the squared loss).
            In our x that is x′ + ζ·√(1+σ′²)·√(1+σ²)·Jᵀe/‖y − A x̂₀‖, the norm from
            ``residual.measurement`` when the residual is a ``LinearResidual``, else ‖e‖. ``"ve"`` is the
            VE-unit step x′ + ζ·Jᵀe/‖e‖ (ζ not comparable with the published values).
        sigma_data: the data's RMS scale for ``utils.check_state`` after every step (a ``DivergedError``
            names the step, σ and ``zeta``).

    ``info["nfe"]`` follows the NFE rule (``utils.nfe_summary``): forward and backward evaluations per
    sample, counted, and their total in forward equivalents.
    """
    extra_args = check_sampler_inputs(model, x, sigmas, residual, sampler, eta, extra_args)
    check_choice(step_space, STEP_SPACES, "step_space")
    stepper = (MultistepSolver(sampler, sigmas.tolist(), lower_order_final=True) if sampler in MULTISTEP_SAMPLERS
               else sampler)  # the last step is x = x̂₀ for every multistep solver
    counts, backward, history = {"forward": 0}, 0, []
    net = counting(model, counts)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = as_sigma(sigmas[i], x)
        active = in_window(window, float(sigmas[i])) and bool(sigmas[i + 1] > 0)  # a gradient it will apply
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(active)
            denoised_graph = net(x_, sigma, **extra_args)
            denoised = denoised_graph.detach()
            e = check_residual(residual(denoised), denoised)
            if active:
                (grad,) = torch.autograd.grad(denoised_graph, x_, grad_outputs=e)
                backward += 1
            del denoised_graph
        history.append(rms(e))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = solver_step(net, x, sigma, sigmas[i + 1], denoised, stepper, eta, extra_args, generator, i)
        if active:
            if step_space == "vp":  # ∇ in x_t = x/√(1+σ²) units, applied to x′_t/√(1+σ′²)
                scale = float((1 + sigmas[i] ** 2).sqrt() * (1 + sigmas[i + 1] ** 2).sqrt())
                norm = _dps_norm(residual, denoised, e)
            else:
                scale, norm = 1.0, e.flatten(1).norm(dim=1).clamp_min(torch.finfo(e.dtype).tiny)
            x = x + zeta * scale * grad / append_dims(norm, x.ndim)
        check_state(x, sigmas[i + 1], step=i, sigma_data=sigma_data,
                    setting=f"zeta={zeta:g} is too large for this grid: use a smaller zeta or more steps")
    info = {"residual": torch.stack(history, 1), "nfe": nfe_summary(counts["forward"] // x.shape[0], backward)}
    return (x, info) if return_info else x
