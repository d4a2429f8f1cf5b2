"""A loaded model with the Sampling Demon seed's notebook API, as methods instead of globals.

``Pipeline`` is model-agnostic: it holds a conditional denoiser ``D(x, σ, **cond)``, a prompt encoder
(prompts → conditioning tensors, ``""`` unconditional), the latent shape and σ range, and optional
image decode/encode functions. Stable Diffusion folders and the shipped toy models both build one.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from .. import image, sampling, schedules
from ..cond import Condition, cat_kwargs, condition_denoiser, slice_kwargs


def _batch(x) -> int | None:
    """The batch size of a ``[B, ...]`` tensor (None otherwise: the integrator reports the bad x)."""
    return x.shape[0] if isinstance(x, Tensor) and x.ndim else None


class Pipeline:
    """The seed's API: ``get_init_latent``, ``odeint``, ``oderevert``, ``sdeint``, latent ↔ PIL.

    Args:
        denoiser: conditional denoiser ``D(x, sigma, **cond_kwargs)``.
        encode_prompts: ``list[str] -> dict`` of conditioning tensors, one row per prompt.
        latent_shape: shape of one latent (or pixel image), without the batch axis.
        sigma_min: the smallest σ of the default grids.
        sigma_max: the largest σ of the default grids.
        init_sigma: σ of ``get_init_latent`` (SD: 14.6488); defaults to ``sigma_max``.
        decode: latents ``[B, ...]`` → images in [-1, 1] ``[B, C, H, W]`` (identity for pixel models).
        encode: images in [-1, 1] → latents (identity for pixel models).
        max_batch: the most rows per network call (CFG branches × batch).
    """

    def __init__(self, denoiser: Callable, encode_prompts: Callable[[list[str]], dict], latent_shape: Sequence[int],
                 *, sigma_min: float, sigma_max: float, init_sigma: float | None = None,
                 decode: Callable | None = None, encode: Callable | None = None, device="cpu",
                 dtype=torch.float32, max_batch: int | None = None):
        self.denoiser, self.encode_prompts = denoiser, encode_prompts
        self.latent_shape = tuple(latent_shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.init_sigma = float(init_sigma if init_sigma is not None else sigma_max)
        self.decode = decode or (lambda z: z)
        self.encode = encode or (lambda x: x)
        self.device, self.dtype, self.max_batch = torch.device(device), dtype, max_batch
        self._prompt_cache: dict[str, dict] = {}

    def encode_cached(self, prompts: list[str]) -> dict:
        """Prompt embeddings, computed once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                table = self.encode_prompts(missing)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = slice_kwargs(table, slice(i, i + 1))
        return cat_kwargs([self._prompt_cache[p] for p in prompts], 1)

    def guided(self, condition: Condition, batch_size: int | None = None) -> Callable:
        """The multi-prompt CFG denoiser of ``condition`` (one network call per evaluation); with
        ``batch_size``, a list of conditions must hold 1 or ``batch_size`` dicts."""
        return condition_denoiser(self.denoiser, condition, self.encode_cached, max_batch=self.max_batch,
                                  batch_size=batch_size)

    def sigmas(self, steps: int, start_t: float | None = None, end_t: float | None = None) -> Tensor:
        """Karras grid of ``steps`` steps from ``start_t`` (default σ_max) to ``end_t`` (σ_min), then 0."""
        start = self.sigma_max if start_t is None else float(start_t)
        return schedules.get_sigmas_karras(steps, self.sigma_min if end_t is None else end_t, start,
                                           device=self.device)

    def get_init_latent(self, batch: int = 1, generator=None) -> Tensor:
        """σ_init·n with n ~ N(0, I) (the seed's ``get_init_latent``; 14.6488 for SD)."""
        return image.get_init_latent(batch, self.latent_shape, self.init_sigma, generator, self.dtype, self.device)

    def odeint(self, x: Tensor, condition: Condition, steps: int, start_t: float | None = None, **kwargs) -> Tensor:
        """Sample x from σ = ``start_t`` to 0 along the PF-ODE (Heun by default; ``method=`` picks any of
        ``sampling.METHODS``, e.g. ``"dpmpp_2m"`` or ``"unipc"`` at one UNet call per step)."""
        return sampling.odeint(self.guided(condition, _batch(x)), x, self.sigmas(steps, start_t), **kwargs)

    def oderevert(self, x: Tensor, condition: Condition, start_t: float | None = None, steps: int = 100,
                  **kwargs) -> Tensor:
        """Invert a clean latent up to σ = ``start_t`` (default σ_max) along the PF-ODE."""
        sigmas = schedules.revert_sigmas(self.sigmas(steps, start_t))
        return sampling.oderevert(self.guided(condition, _batch(x)), x, sigmas, **kwargs)

    def sdeint(self, x: Tensor, condition: Condition, beta, steps: int, start_t: float | None = None,
               **kwargs) -> Tensor:
        """Sample along the Karras β-SDE from σ = ``start_t`` (SDEdit when x comes from ``oderevert``)."""
        return sampling.sdeint(self.guided(condition, _batch(x)), x, self.sigmas(steps, start_t), beta=beta, **kwargs)

    def from_latent_to_pil(self, x: Tensor) -> list[Image.Image]:
        """Decode latents to a list of PIL images."""
        with torch.no_grad():
            return image.to_pil(self.decode(x))

    def from_pil_to_latent(self, pils) -> Tensor:
        """Encode a PIL image or a list of them to latents."""
        x = image.from_pil(pils, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return self.encode(x)
