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
from ..utils import CountingReward, Generator, check_state, randn_like


def _round(sample: Callable[[Tensor], Tensor], reward, noises: Tensor, sigma_data: float, step) -> tuple:
    """One batched round: sample every noise ``[N, B, ...]``, check the samples, score them, keep each item's best."""
    if noises.ndim < 3:
        raise ValueError(f"noises must be [N, B, ...] (N candidates for B items), got {tuple(noises.shape)}")
    n, b = noises.shape[:2]
    x0 = check_state(sample(noises.flatten(0, 1)), 0.0, step=step, sigma_data=sigma_data,
                     setting="the sampler returned diverged samples: give it more steps or a stable method")
    with torch.no_grad():
        r = check_rewards(reward(x0), n * b, "reward")
    best_r, index = r.view(n, b).max(0)
    items = torch.arange(b, device=noises.device)
    return x0.view(n, b, *x0.shape[1:])[index, items], noises[index, items], best_r


def random_search(sample: Callable[[Tensor], Tensor], reward: Callable[[Tensor], Tensor], noises: Tensor, *,
                  sigma_data: float = 1.0, return_info: bool = False):
    """Random search (best-of-N): sample every noise, keep each item's highest-reward sample.

    Args:
        noises: ``[N, B, ...]``: N candidate noises for each of B items, all sampled in one call.
        sigma_data: the data's RMS scale: samples whose per-item RMS exceeds ``DIVERGENCE_C``·σ_data
            (or that are not finite) stop the search with a ``DivergedError`` (``utils.check_state``).
        return_info: also return ``info`` with ``sample_calls``/``sample_rows`` (calls of ``sample`` and
            noises sampled; the network cost is ``sample_rows`` times the sampler's per-sample NFE) and
            ``reward_calls``/``reward_rows``, counted.

    Returns ``(x0 [B, ...], noise [B, ...], reward [B])`` of the winners, and ``info`` with ``return_info``.
    """
    counted = CountingReward(reward)
    x0, noise, best_r = _round(sample, counted, noises, sigma_data, "0 (the sampled candidates)")
    info = dict(sample_calls=1, sample_rows=noises.shape[0] * noises.shape[1], reward_calls=counted.calls,
                reward_rows=counted.rows)
    return (x0, noise, best_r, info) if return_info else (x0, noise, best_r)


def neighbours(pivot: Tensor, count: int, step: float, generator: Generator = None) -> Tensor:
    """``count`` noises ``[count, B, ...]`` around ``pivot``: (n + λz)/√(1 + λ²), z ~ N(0, I), λ = ``step``.

    The rescaling keeps each neighbour standard normal when the pivot is, so the sampler sees noises
    of its training law whatever λ (Ma et al. search the sphere of radius λ around the pivot).
    """
    z = randn_like(pivot.new_empty(count, *pivot.shape), generator)
    return (pivot[None] + step * z) / math.sqrt(1 + step**2)


def zero_order_search(sample: Callable[[Tensor], Tensor], reward: Callable[[Tensor], Tensor], pivot: Tensor, *,
                      iterations: int, count: int, step: float = 0.5, generator: Generator = None,
                      sigma_data: float = 1.0, return_info: bool = False):
    """Zero-order search (Ma et al. 2025): from the pivot noise, sample ``count`` neighbours, move to the
    best if it improves the reward, repeat ``iterations`` times.

    Costs 1 + ``iterations``·``count`` samples per item. Returns ``(x0, noise, reward)`` of the final pivot,
    and with ``return_info`` the counts of ``random_search`` summed over the rounds; ``sigma_data`` as there.
    """
    if not isinstance(iterations, int) or iterations < 0 or not isinstance(count, int) or count < 1:
        raise ValueError(f"iterations must be an int >= 0 and count an int >= 1, got {iterations!r}, {count!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0 (the neighbourhood size λ), got {step!r}")
    counted = CountingReward(reward)
    x0, noise, best_r = _round(sample, counted, pivot[None], sigma_data, "0 (the pivot's sample)")
    for k in range(iterations):
        cand_x0, cand_noise, cand_r = _round(sample, counted, neighbours(noise, count, step, generator), sigma_data,
                                             f"{k + 1} (iteration {k + 1}'s neighbours)")
        better = cand_r > best_r
        keep = better.view(-1, *[1] * (noise.ndim - 1))
        x0, noise = torch.where(keep, cand_x0, x0), torch.where(keep, cand_noise, noise)
        best_r = torch.where(better, cand_r, best_r)
    info = dict(sample_calls=1 + iterations, sample_rows=pivot.shape[0] * (1 + iterations * count),
                reward_calls=counted.calls, reward_rows=counted.rows)
    return (x0, noise, best_r, info) if return_info else (x0, noise, best_r)
