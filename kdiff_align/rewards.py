"""Rewards: ``reward(x0: Tensor[B, ...]) -> Tensor[B]``, higher is better.

Image rewards written for PIL images are adapted by ``pil_reward``, which decodes x̂₀ once per call.
Non-differentiable rewards (JPEG size, a VLM, a person) are fine for Demon and FK steering.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from .image import to_pil


def check_rewards(values, batch: int, name: str = "reward") -> Tensor:
    """Turn reward output into a finite float ``[B]`` tensor, or fail naming what was wrong."""
    r = torch.as_tensor(values, dtype=torch.float64).reshape(-1) if not isinstance(values, Tensor) \
        else values.detach().to(torch.float64).reshape(-1)
    if r.shape[0] != batch:
        raise ValueError(f"{name} returned {r.shape[0]} values for a batch of {batch}")
    if not torch.isfinite(r).all():
        raise ValueError(f"{name} returned non-finite values at indices {torch.nonzero(~torch.isfinite(r)).flatten().tolist()}")
    return r


def pil_reward(fn: Callable[[list[Image.Image]], Sequence[float]], decode: Callable | None = None) -> Callable:
    """Adapt ``fn(pils) -> list[float]`` to ``reward(x0) -> Tensor[B]`` (decoding latents with ``decode``)."""

    def reward(x0: Tensor) -> Tensor:
        with torch.no_grad():
            images = to_pil((decode(x0) if decode is not None else x0).clamp(-1, 1))
        return check_rewards(fn(images), x0.shape[0], getattr(fn, "__name__", "reward")).to(x0.device)

    return reward


def jpeg_size_kb(images: Sequence[Image.Image], quality: int = 95) -> list[float]:
    """Size in kB of each image saved as JPEG at ``quality`` (non-differentiable)."""
    sizes = []
    for im in images:
        buffer = io.BytesIO()
        im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(decode: Callable | None = None, quality: int = 95) -> Callable:
    """Reward = −JPEG size in kB (smaller files score higher; DDPO's compressibility task)."""
    return pil_reward(lambda pils: [-s for s in jpeg_size_kb(pils, quality)], decode)


def jpeg_incompressibility(decode: Callable | None = None, quality: int = 95) -> Callable:
    """Reward = JPEG size in kB (busier images score higher)."""
    return pil_reward(lambda pils: jpeg_size_kb(pils, quality), decode)


def brightness(x0: Tensor) -> Tensor:
    """Mean pixel value of images in [-1, 1] (differentiable)."""
    return x0.flatten(1).mean(1)


def contrast(x0: Tensor) -> Tensor:
    """Per-image pixel standard deviation (differentiable)."""
    return x0.flatten(1).std(1) if x0[0].numel() > 1 else torch.zeros(x0.shape[0], device=x0.device)

