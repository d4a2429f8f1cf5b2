"""Reward guidance by gradient (DPS-style / universal forward guidance) as a denoiser wrapper.

The guided denoiser is D̃(x, σ) = D(x, σ) + s·σ²·∇_x r(D(x, σ)): since σ²·∇ log p_σ(x) = D − x, adding
s·σ²·∇_x r to D adds s·∇_x r to the score, i.e. samples the PF-ODE of p_σ(x)·exp(s·r(x̂₀(x))) (Chung et
al. 2023, DPS; Bansal et al. 2023, universal guidance's forward step, here in the VE form that
k-diffusion's CLIP-guided example uses). Any sampler runs it unchanged; each call costs one forward
pass with gradients, one backward pass through the network and one reward call, all counted (``nfe``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..utils import append_dims, check_state, nfe_summary


class RewardGuidedDenoiser(torch.nn.Module):
    """D(x, σ) + scale·σ²·∇_x r(D(x, σ)), counting its rows (``forward_rows``, ``backward_rows``) and reward
    calls; ``nfe`` reports them by the NFE rule. The state x of every call is checked by ``utils.check_state``."""

    def __init__(self, model, reward: Callable[[Tensor], Tensor], scale: float, sigma_data: float = 1.0):
        super().__init__()
        self.model, self.reward, self.scale, self.sigma_data = model, reward, float(scale), float(sigma_data)
        self.calls = self.forward_rows = self.backward_rows = 0

    @property
    def nfe(self) -> dict:
        """Rows so far by ``utils.nfe_summary``: each call is one forward and one backward pass of its rows
        and one reward call on them."""
        return nfe_summary(self.forward_rows, self.backward_rows, reward_calls=self.calls,
                           reward_rows=self.forward_rows)

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        check_state(x, sigma, step=f"{self.calls} (call of the guided denoiser)", sigma_data=self.sigma_data,
                    setting=f"the guided steps diverged: use a smaller scale than {self.scale:g} or more steps")
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
        self.calls += 1
        self.forward_rows, self.backward_rows = self.forward_rows + x.shape[0], self.backward_rows + x.shape[0]
        return denoised.detach() + self.scale * append_dims(sigma.to(x) ** 2, x.ndim) * grad.detach()


def reward_guided_denoiser(model, reward: Callable[[Tensor], Tensor], scale: float, *,
                           sigma_data: float = 1.0) -> RewardGuidedDenoiser:
    """Wrap ``model`` so every sampler follows the reward gradient (DPS-style guidance of strength ``scale``).

    Args:
        model: a denoiser ``D(x, sigma[B], **extra_args)``, differentiable in ``x``.
        reward: ``reward(x0 [B, ...]) -> [B]``, differentiable (e.g. ``toy.classifier_reward``).
        scale: s ≥ 0; 0 returns D unchanged (but still pays the backward pass).
        sigma_data: the data's RMS scale: a state x at σ whose per-item RMS exceeds
            ``DIVERGENCE_C``·√(σ² + σ_data²) (or that is not finite) stops the run at that call with a
            ``DivergedError`` naming the call, σ and ``scale``.
    """
    if not callable(model) or not callable(reward):
        raise TypeError("model and reward must be callables: D(x, sigma, **extra_args) and reward(x0) -> [B]")
    if not (isinstance(scale, (int, float)) and scale >= 0):
        raise ValueError(f"scale must be a number >= 0, got {scale!r}")
    return RewardGuidedDenoiser(model, reward, scale, sigma_data)
