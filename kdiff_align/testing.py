"""Closed-form denoisers for exact tests: a Gaussian and a Gaussian mixture under x = x₀ + σ·n."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .utils import Generator, append_dims, randn_like


class GaussianDenoiser(torch.nn.Module):
    """Exact D for data N(μ, diag(s²)): D(x, σ) = μ + s²/(s² + σ²)·(x − μ).

    Args:
        mean: μ, a tensor of the sample shape (or a scalar with ``shape``).
        std: s, a scalar (isotropic) or a tensor broadcastable to the sample shape (diagonal).
    """

    def __init__(self, mean, std, shape=None):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if shape is not None:
            mean = mean.expand(shape).clone()
        std = torch.as_tensor(std, dtype=torch.float32)
        if (std <= 0).any():
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std.expand_as(mean).clone())

    def forward(self, x: Tensor, sigma: Tensor, **_) -> Tensor:
        var = self.std.to(x)**2
        sigma2 = append_dims(sigma.to(x), x.ndim) ** 2
        return self.mean.to(x) + var / (var + sigma2) * (x - self.mean.to(x))

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        """n draws from the data law."""
        return self.mean + self.std * randn_like(self.mean.expand(n, *self.mean.shape), generator)

    def flow(self, x: Tensor, sigma_from, sigma_to) -> Tensor:
        """Exact probability-flow map x(σ_to) = μ + (x(σ_from) − μ)·√((s² + σ_to²)/(s² + σ_from²))."""
        var = self.std.to(x)**2
        return self.mean.to(x) + (x - self.mean.to(x)) * ((var + sigma_to**2) / (var + sigma_from**2)).sqrt()

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_σ(x) of the noised marginal N(μ, s² + σ²), summed over each item."""
        var = self.std.to(x)**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2
        lp = -0.5 * ((x - self.mean.to(x))**2 / var + var.log() + math.log(2 * math.pi))
        return lp.flatten(1).sum(1)


class MixtureDenoiser(torch.nn.Module):
    """Exact D for a mixture Σ_k π_k N(μ_k, s_k² I): responsibilities times per-component posterior means.

    Args:
        means: ``[K, *shape]`` component means.
        stds: ``[K]`` isotropic component standard deviations.
        weights: ``[K]`` mixture weights (normalised here).
    """

    def __init__(self, means, stds, weights):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        stds = torch.as_tensor(stds, dtype=torch.float32)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if stds.shape != means.shape[:1] or weights.shape != means.shape[:1]:
            raise ValueError(f"stds and weights must be [K] = [{means.shape[0]}], got {tuple(stds.shape)} and "
                             f"{tuple(weights.shape)}")
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("stds must be positive and weights non-negative with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())

    def component_log_probs(self, x: Tensor, sigma) -> Tensor:
        """``[B, K]``: log π_k + log N(x; μ_k, (s_k² + σ²) I)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        var = self.stds.to(x)[None] ** 2 + sigma**2  # [B or 1, K]
        dim = x[0].numel()
        sq = ((x[:, None] - self.means.to(x)[None]) ** 2).flatten(2).sum(2)  # [B, K]
        return self.weights.to(x).log()[None] - 0.5 * (sq / var + dim * (var.log() + math.log(2 * math.pi)))

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_σ(x) of the noised mixture."""
        return self.component_log_probs(x, sigma).logsumexp(1)

    def forward(self, x: Tensor, sigma: Tensor, **_) -> Tensor:
        resp = self.component_log_probs(x, sigma).softmax(1)  # [B, K]
        var = self.stds.to(x)[None] ** 2
        shrink = var / (var + sigma.to(x).reshape(-1, 1) ** 2)  # [B, K]
        means = self.means.to(x)[None]
        post = means + append_dims(shrink, x.ndim + 1) * (x[:, None] - means)  # [B, K, ...]
        return (append_dims(resp, x.ndim + 1) * post).sum(1)

    def sample(self, n: int, generator: Generator = None, return_components: bool = False):
        """n draws from the data law (and their component indices)."""
        gen = generator if isinstance(generator, torch.Generator) or generator is None else generator[0]
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        noise = randn_like(self.means[k], generator)
        x = self.means[k] + append_dims(self.stds[k], noise.ndim) * noise
        return (x, k) if return_components else x

    def classify(self, x: Tensor) -> Tensor:
        """Index of the component with the highest posterior at σ = 0 (mode assignment)."""
        return self.component_log_probs(x, 0.0).argmax(1)


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser, counting calls and rows, and checking that σ is a [B] tensor matching x.

    ``rows`` counts forward rows (recomputation by checkpointing or an adjoint included);
    ``backward_rows`` the rows a backward pass went through (a hook on each output with a graph).
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.rows, self.backward_rows = model, 0, 0, 0

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        if not isinstance(sigma, Tensor) or sigma.shape != (x.shape[0],):
            raise AssertionError(f"sigma must be a [B]={x.shape[0]} tensor, got {getattr(sigma, 'shape', sigma)}")
        self.calls += 1
        self.rows += x.shape[0]
        out = self.model(x, sigma, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(grad.shape[0]))
        return out

    def _count_backward(self, rows: int) -> None:
        self.backward_rows += rows
