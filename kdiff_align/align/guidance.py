"""Reward guidance by gradient (DPS-style / universal forward guidance) as a denoiser wrapper.

The guided denoiser is D̃(x, σ) = D(x, σ) + s·σ²·∇_x r(D(x, σ)): since σ²·∇ log p_σ(x) = D − x, adding
s·σ²·∇_x r to D adds s·∇_x r to the score, i.e. samples the PF-ODE of p_σ(x)·exp(s·r(x̂₀(x))) (Chung et
al. 2023, DPS; Bansal et al. 2023, universal guidance's forward step, here in the VE form that
k-diffusion's CLIP-guided example uses). Any sampler runs it unchanged; each call costs one forward
pass with gradients and one backward pass through the network, counted in ``backward_rows``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..utils import append_dims


class RewardGuidedDenoiser(torch.nn.Module):
    """D(x, σ) + scale·σ²·∇_x r(D(x, σ)); ``backward_rows`` counts the rows differentiated."""

    def __init__(self, model, reward: Callable[[Tensor], Tensor], scale: float):
        super().__init__()
        self.model, self.reward, self.scale, self.backward_rows = model, reward, float(scale), 0

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            denoised = self.model(x_in, sigma, **kwargs)
            r = self.reward(denoised)
            if not isinstance(r, Tensor) or r.shape != (x.shape[0],) or not r.requires_grad:
                raise TypeError("reward guidance needs a differentiable reward(x0) -> Tensor[B]; got "
                                f"{type(r).__name__} {tuple(getattr(r, 'shape', ()))}, requires_grad="
                                f"{getattr(r, 'requires_grad', False)}")
            if not torch.isfinite(r).all():
                bad = int((~torch.isfinite(r)).sum())
                raise ValueError(f"reward returned {bad} NaN or infinite values of {len(r)} at sigma="
                                 f"{float(sigma.max()):.4g}; reward guidance needs a finite reward(x0)")
            (grad,) = torch.autograd.grad(r.sum(), x_in)
        self.backward_rows += x.shape[0]
        return denoised.detach() + self.scale * append_dims(sigma.to(x) ** 2, x.ndim) * grad.detach()


def reward_guided_denoiser(model, reward: Callable[[Tensor], Tensor], scale: float) -> RewardGuidedDenoiser:
    """Wrap ``model`` so every sampler follows the reward gradient (DPS-style guidance of strength ``scale``).

    Args:
        model: a denoiser ``D(x, sigma[B], **extra_args)``, differentiable in ``x``.
        reward: ``reward(x0 [B, ...]) -> [B]``, differentiable (e.g. ``toy.classifier_reward``).
        scale: s ≥ 0; 0 returns D unchanged (but still pays the backward pass).
    """
    if not callable(model) or not callable(reward):
        raise TypeError("model and reward must be callables: D(x, sigma, **extra_args) and reward(x0) -> [B]")
    if not (isinstance(scale, (int, float)) and scale >= 0):
        raise ValueError(f"scale must be a number >= 0, got {scale!r}")
    return RewardGuidedDenoiser(model, reward, scale)
