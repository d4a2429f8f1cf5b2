"""Rewards: ``reward(x0: Tensor[B, ...]) -> Tensor[B]``, higher is better.

Image rewards written for PIL images are adapted by ``pil_reward``, which decodes x̂₀ once per call.
Non-differentiable rewards (JPEG size, a VLM, a person) are fine for Demon and FK steering.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from .image import from_pil, to_pil


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



# --- CLIP rewards from local weights (transformers; no torchvision, no open_clip) ------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _side(value, default: int) -> int:
    """A size entry of a preprocessor config: an int, or a dict with shortest_edge/height."""
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return int(value or default)


class CLIPScorer(torch.nn.Module):
    """A transformers CLIP model from a local folder with differentiable, torchvision-free preprocessing.

    Images are ``[B, 3, H, W]`` tensors in [-1, 1]; they are resized (bicubic, antialiased) so the short
    side matches the preprocessor's ``size``, centre-cropped to ``crop_size`` and normalised with its
    mean/std, as ``CLIPImageProcessor`` does on PIL images.
    """

    def __init__(self, path, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer
        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"CLIP folder {str(path)!r} has no config.json; expected a transformers CLIPModel folder")
        self.model = CLIPModel.from_pretrained(root, torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        has_tokenizer = (root / "tokenizer_config.json").is_file() or (root / "tokenizer.json").is_file()
        self.tokenizer = CLIPTokenizer.from_pretrained(root, local_files_only=True) if has_tokenizer else None
        pre_file = root / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        image_size = self.model.config.vision_config.image_size
        self.resize, self.crop = _side(pre.get("size"), image_size), _side(pre.get("crop_size"), image_size)
        self.register_buffer("mean", torch.tensor(pre.get("image_mean", OPENAI_CLIP_MEAN))[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(pre.get("image_std", OPENAI_CLIP_STD))[:, None, None], persistent=False)
        self.to(device)

    def pixel_values(self, images: Tensor) -> Tensor:
        """[-1, 1] images → CLIP's normalised, resized and centre-cropped input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            scale = self.resize / min(h, w)
            size = (self.resize, int(w * scale)) if h <= w else (int(h * scale), self.resize)
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        return ((x - self.mean) / self.std).to(self.model.dtype)

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings ``[B, D]`` (float32)."""
        pooled = self.model.vision_model(pixel_values=self.pixel_values(images)).pooler_output
        e = self.model.visual_projection(pooled).float()
        return e / e.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised projected text embeddings ``[P, D]`` (float32)."""
        if self.tokenizer is None:
            raise ValueError("this CLIP folder has no tokenizer, so text scores are unavailable")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.mean.device)
        e = self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output).float()
        return e / e.norm(dim=-1, keepdim=True)

    def cosine(self, images: Tensor, prompts: str | Sequence[str]) -> Tensor:
        """cos(image, text) per image; ``prompts`` is one string or one per image."""
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) not in (1, images.shape[0]):
            raise ValueError(f"prompts must be one string or {images.shape[0]} (one per image), got {len(prompts)}")
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def pick_score(scorer: CLIPScorer, images: Tensor, prompts: str | Sequence[str]) -> Tensor:
    """PickScore-style score exp(logit_scale)·cos(image, text) (Kirstain et al. 2023), ``[B]``."""
    return scorer.model.logit_scale.exp().float() * scorer.cosine(images, prompts)


def clip_score(scorer: CLIPScorer, images: Tensor, prompts: str | Sequence[str], w: float = 100.0) -> Tensor:
    """CLIP-score w·max(cos(image, text), 0) (Hessel et al. 2021; w = 100 as torchmetrics reports it)."""
    return w * scorer.cosine(images, prompts).clamp_min(0)


class AestheticHead(torch.nn.Module):
    """The LAION improved aesthetic predictor's MLP 768-1024-128-64-16-1 (state-dict keys ``layers.N``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def load_state_dict(path) -> dict:
    """Tensors from a ``.safetensors`` file, or a torch pickle read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class AestheticScorer(torch.nn.Module):
    """LAION aesthetic score: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding."""

    def __init__(self, clip_path, head_path, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.clip = CLIPScorer(clip_path, dtype=dtype, device=device)
        dim = self.clip.model.config.projection_dim
        if dim != 768:
            raise ValueError(f"the aesthetic head takes 768-d CLIP ViT-L/14 embeddings; {clip_path} projects to {dim}")
        self.head = AestheticHead(dim).eval().requires_grad_(False)
        self.head.load_state_dict(load_state_dict(head_path))
        self.head.to(device)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.clip.image_embeds(images)).squeeze(-1)


def latent_reward(score: Callable[[Tensor], Tensor], decode: Callable | None = None, name: str = "reward") -> Callable:
    """``reward(x0) = score(decode(x0))``, differentiable when ``decode`` and ``score`` are; checked output."""

    def reward(x0: Tensor) -> Tensor:
        return check_reward_tensor(score(decode(x0) if decode is not None else x0), x0.shape[0], name)

    return reward


def aesthetic_reward(scorer: AestheticScorer, decode: Callable | None = None) -> Callable:
    """Aesthetic score of x̂₀ (latents decoded by ``decode``, e.g. ``pipe.decode``), ``[B]``."""
    return latent_reward(scorer, decode, "aesthetic_reward")


def pickscore_reward(scorer: CLIPScorer, prompts: str | Sequence[str], decode: Callable | None = None) -> Callable:
    """PickScore-style reward of x̂₀ for ``prompts`` (one, or one per batch item)."""
    return latent_reward(lambda images: pick_score(scorer, images, prompts), decode, "pickscore_reward")


def clip_score_reward(scorer: CLIPScorer, prompts: str | Sequence[str], decode: Callable | None = None) -> Callable:
    """CLIP-score reward of x̂₀ for ``prompts`` (one, or one per batch item)."""
    return latent_reward(lambda images: clip_score(scorer, images, prompts), decode, "clip_score_reward")


def on_pils(score: Callable[[Tensor], Tensor], device="cpu") -> Callable[[list[Image.Image]], list[float]]:
    """Adapt a tensor score to ``rewards(pils) -> list[float]`` (for ``DemonGenerator``-style subclasses)."""

    def rewards(pils: Sequence[Image.Image]) -> list[float]:
        with torch.no_grad():
            images = from_pil([p.convert("RGB") for p in pils], device=device)
            return check_rewards(score(images), len(pils), getattr(score, "__name__", "reward")).tolist()

    return rewards


from .vlm import VLMError, VLMReward  # noqa: E402  (re-exported; vlm imports this module's helpers)
from .human import HumanChoice, terminal_choice  # noqa: E402
