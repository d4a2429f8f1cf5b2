"""The reward contract and the adapters every reward source builds on.

A reward is ``reward(x0: Tensor[B, ...]) -> Tensor[B]``, higher is better. ``check_rewards`` is the one
check every method applies to what a reward returns; ``pil_reward``, ``latent_reward`` and ``on_pils``
adapt scores written for PIL images, decoded images or tensors; ``image_data_url`` encodes an image for
a web page or an API request.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from ..image import from_pil, to_pil


def check_rewards(values, batch: int, name: str = "reward", *, per_item: int = 1, terms: str | None = None,
                  keep_graph: bool = False) -> Tensor:
    """The reward contract of every method: one real value per row, a ``Tensor[batch·per_item]``.

    NaN and +inf fail; −inf is allowed and marks a rejected sample (zero weight in SMC, the lowest weight in
    Demon, never picked by best-of-N unless every candidate is rejected). Lists, ``[rows, 1]`` and other
    shapes fail with a message in the caller's terms.

    Args:
        batch: the user's batch size B (images, prompts or groups).
        per_item: rows per batch item (Demon's K candidates, SMC's N particles); rows = batch·per_item.
        terms: how the rows read to the user, e.g. ``"2 images x 4 candidates"`` (default ``"a batch of B"``).
        keep_graph: return the tensor itself (autograd graph kept) instead of a detached float64 copy.
    """
    rows = batch * per_item
    terms = terms or f"a batch of {rows}"
    expected = f"a torch.Tensor of shape [{rows}] (one value per row: {terms})"
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must return {expected}, got {type(values).__name__}")
    if values.shape != (rows,):
        hint = "; drop the trailing dimension (e.g. .squeeze(-1))" if values.numel() == rows else ""
        raise ValueError(f"{name} returned {values.numel()} values of shape {tuple(values.shape)} for {terms}; "
                         f"expected shape [{rows}]{hint}")
    if values.is_complex():
        raise TypeError(f"{name} must return real numbers, got dtype {values.dtype}")
    bad = torch.isnan(values) | (values == math.inf)
    if bad.any():
        raise ValueError(f"{name} returned NaN or +inf for {terms} at rows {torch.nonzero(bad).flatten().tolist()[:10]}"
                         " (-inf is allowed: it rejects a sample)")
    return values if keep_graph else values.detach().to(torch.float64)


def check_reward_tensor(r: Tensor, batch: int, name: str = "reward") -> Tensor:
    """``check_rewards`` keeping the autograd graph (for differentiable rewards)."""
    return check_rewards(r, batch, name, keep_graph=True)


def pil_reward(fn: Callable[[list[Image.Image]], Sequence[float]], decode: Callable | None = None) -> Callable:
    """Adapt ``fn(pils) -> list[float]`` to ``reward(x0) -> Tensor[B]`` (decoding latents with ``decode``)."""

    def reward(x0: Tensor) -> Tensor:
        with torch.no_grad():
            images = to_pil((decode(x0) if decode is not None else x0).clamp(-1, 1))
        values = torch.as_tensor(fn(images), dtype=torch.float64)  # fn gives one float per PIL image
        return check_rewards(values, x0.shape[0], getattr(fn, "__name__", "reward"), terms=f"{len(images)} images")\
            .to(x0.device)

    return reward


def latent_reward(score: Callable[[Tensor], Tensor], decode: Callable | None = None, name: str = "reward") -> Callable:
    """``reward(x0) = score(decode(x0))``, differentiable when ``decode`` and ``score`` are; checked output."""

    def reward(x0: Tensor) -> Tensor:
        return check_reward_tensor(score(decode(x0) if decode is not None else x0), x0.shape[0], name)

    return reward


def on_pils(score: Callable[[Tensor], Tensor], device="cpu") -> Callable[[list[Image.Image]], list[float]]:
    """Adapt a tensor score to ``rewards(pils) -> list[float]`` (for ``DemonGenerator``-style subclasses)."""

    def rewards(pils: Sequence[Image.Image]) -> list[float]:
        with torch.no_grad():
            images = from_pil([p.convert("RGB") for p in pils], device=device)
            return check_rewards(score(images), len(pils), getattr(score, "__name__", "reward")).tolist()

    return rewards


def image_data_url(image: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert(image.mode if image.mode in ("L", "RGB", "RGBA") else "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
