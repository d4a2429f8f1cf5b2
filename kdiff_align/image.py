"""Pixel and latent ↔ PIL converters, batched, lists in and out (no batch-1 asserts); notebook figures."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .utils import Generator, randn_like


def to_pil(x: Tensor) -> list[Image.Image]:
    """``[B, C, H, W]`` images in [-1, 1] to a list of PIL images (C = 1 gives mode "L", 3 "RGB")."""
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"x must be [B, C, H, W] with C in (1, 3, 4), got shape {tuple(x.shape)}")
    u8 = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arrays = u8.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def from_pil(images: Image.Image | Sequence[Image.Image], dtype=torch.float32, device="cpu") -> Tensor:
    """A PIL image or a list of same-size PIL images to ``[B, C, H, W]`` in [-1, 1] (exact uint8 round trip)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ValueError("images must hold at least one PIL image")
    arrays = [np.asarray(im) for im in images]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"all images must have the same size and mode, got shapes {[a.shape for a in arrays]}")
    u8 = torch.from_numpy(np.stack(arrays))
    u8 = u8[..., None] if u8.ndim == 3 else u8
    return (u8.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1).to(device)


def _vae_factors(vae) -> tuple[float, float]:
    config = vae.config
    scaling = getattr(config, "scaling_factor", None) or 1.0
    shift = getattr(config, "shift_factor", None) or 0.0
    return float(scaling), float(shift)


def vae_decode(vae, z: Tensor) -> Tensor:
    """Latents → images in [-1, 1] through a diffusers-style VAE (differentiable; float32 out)."""
    if z.ndim != 4:
        raise ValueError(f"z must be a [B, C, h, w] latent, got shape {tuple(z.shape)}")
    scaling, shift = _vae_factors(vae)
    param = next(vae.parameters())
    return vae.decode((z / scaling + shift).to(param.device, param.dtype)).sample.float()


def vae_encode(vae, x: Tensor, generator: Generator = None) -> Tensor:
    """Images in [-1, 1] → scaled latents (posterior mean, or a sample when ``generator`` is given)."""
    scaling, shift = _vae_factors(vae)
    param = next(vae.parameters())
    x = x.to(param.device, param.dtype)
    if x.shape[1] == 1 and getattr(vae.config, "in_channels", 1) == 3:
        x = x.repeat(1, 3, 1, 1)
    dist = vae.encode(x).latent_dist
    z = dist.mean if generator is None else dist.mean + dist.std * randn_like(dist.mean, generator)
    return ((z - shift) * scaling).float()


def from_latent_to_pil(vae, z: Tensor) -> list[Image.Image]:
    """Decode latents with a diffusers-style VAE (its ``scaling_factor``/``shift_factor``) to PIL images."""
    with torch.no_grad():
        return to_pil(vae_decode(vae, z))


def from_pil_to_latent(vae, images: Image.Image | Sequence[Image.Image], generator: Generator = None) -> Tensor:
    """Encode PIL images to scaled latents (posterior mean, or a sample when ``generator`` is given)."""
    with torch.no_grad():
        return vae_encode(vae, from_pil(images), generator)


def get_init_latent(batch: int, shape: Sequence[int], sigma_max: float, generator: Generator = None,
                    dtype=torch.float32, device="cpu") -> Tensor:
    """Initial state σ_max·n, n ~ N(0, I), of shape ``[batch, *shape]``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    template = torch.empty(batch, *shape, dtype=dtype, device=device)
    return randn_like(template, generator) * sigma_max


def figure_dir() -> Path:
    """Where notebooks save figures: ``$KDIFF_NOTEBOOK_OUT``, else ``notebooks/out`` from the repository root
    (``out`` elsewhere, e.g. Jupyter started in ``notebooks/``); both are ignored by git."""
    if os.environ.get("KDIFF_NOTEBOOK_OUT"):
        return Path(os.environ["KDIFF_NOTEBOOK_OUT"])
    return Path("notebooks/out") if Path("notebooks").is_dir() else Path("out")


def save_figure(fig, name: str, folder: str | os.PathLike | None = None) -> Path:
    """Save a matplotlib figure as ``folder/name`` (default ``figure_dir()``), show it inline when run in a
    Jupyter kernel, close it, and print where it went."""
    import matplotlib.pyplot as plt
    path = Path(folder) if folder is not None else figure_dir()
    path.mkdir(parents=True, exist_ok=True)
    path = path / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    try:
        from IPython import get_ipython
        in_kernel = getattr(get_ipython(), "kernel", None) is not None
    except ImportError:
        in_kernel = False
    if in_kernel:
        from IPython.display import display
        display(fig)
    plt.close(fig)  # else Jupyter's inline backend would show it a second time
    print(f"figure saved to {path}")
    return path
