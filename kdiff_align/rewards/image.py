"""Image rewards that need no weights: JPEG file size (non-differentiable), brightness and contrast."""
from __future__ import annotations

import io
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from .base import pil_reward


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
