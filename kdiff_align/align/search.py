"""Search over initial noises (Ma et al. 2025, "Inference-time scaling for diffusion models beyond
scaling denoising steps"): random search and zero-order search around the best noise.

Both treat the sampler as a black box ``sample(n) -> x0`` of a standard-normal noise ``n`` ``[B, ...]``
(e.g. ``lambda n: odeint(model, n * sigma_max, sigmas)``) and a verifier ``reward(x0) -> [B]``; the
reward needs no gradient. Every round of candidates is sampled in one batched call.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..rewards import check_rewards
from ..utils import Generator, randn_like


def random_search(sample: Callable[[Tensor], Tensor], reward: Callable[[Tensor], Tensor], noises: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Random search (best-of-N): sample every noise, keep each item's highest-reward sample.

    Args:
        noises: ``[N, B, ...]``: N candidate noises for each of B items, all sampled in one call.

    Returns ``(x0 [B, ...], noise [B, ...], reward [B])`` of the winners.
    """
    if noises.ndim < 3:
        raise ValueError(f"noises must be [N, B, ...] (N candidates for B items), got {tuple(noises.shape)}")
    n, b = noises.shape[:2]
    x0 = sample(noises.flatten(0, 1))
    with torch.no_grad():
        r = check_rewards(reward(x0), n * b, "reward")
    best_r, index = r.view(n, b).max(0)
    items = torch.arange(b, device=noises.device)
    return x0.view(n, b, *x0.shape[1:])[index, items], noises[index, items], best_r


def neighbours(pivot: Tensor, count: int, step: float, generator: Generator = None) -> Tensor:
    """``count`` noises ``[count, B, ...]`` around ``pivot``: (n + λz)/√(1 + λ²), z ~ N(0, I), λ = ``step``.

    The rescaling keeps each neighbour standard normal when the pivot is, so the sampler sees noises
    of its training law whatever λ (Ma et al. search the sphere of radius λ around the pivot).
    """
    z = randn_like(pivot.new_empty(count, *pivot.shape), generator)
    return (pivot[None] + step * z) / math.sqrt(1 + step**2)


def zero_order_search(sample: Callable[[Tensor], Tensor], reward: Callable[[Tensor], Tensor], pivot: Tensor, *,
                      iterations: int, count: int, step: float = 0.5, generator: Generator = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-order search (Ma et al. 2025): from the pivot noise, sample ``count`` neighbours, move to the
    best if it improves the reward, repeat ``iterations`` times.

    Costs 1 + ``iterations``·``count`` samples per item. Returns ``(x0, noise, reward)`` of the final pivot.
    """
    if not isinstance(iterations, int) or iterations < 0 or not isinstance(count, int) or count < 1:
        raise ValueError(f"iterations must be an int >= 0 and count an int >= 1, got {iterations!r}, {count!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0 (the neighbourhood size λ), got {step!r}")
    x0, noise, best_r = random_search(sample, reward, pivot[None])
    for _ in range(iterations):
        cand_x0, cand_noise, cand_r = random_search(sample, reward, neighbours(noise, count, step, generator))
        better = cand_r > best_r
        keep = better.view(-1, *[1] * (noise.ndim - 1))
        x0, noise = torch.where(keep, cand_x0, x0), torch.where(keep, cand_noise, noise)
        best_r = torch.where(better, cand_r, best_r)
    return x0, noise, best_r
