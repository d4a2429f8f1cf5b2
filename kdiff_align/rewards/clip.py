"""CLIP rewards from local weights (transformers; no torchvision, no open_clip): PickScore, CLIP score, aesthetic.

``CLIPScorer`` preprocesses ``[B, 3, H, W]`` tensors in [-1, 1] differentiably, as ``CLIPImageProcessor``
does on PIL images; the ``*_reward`` functions turn a scorer into ``reward(x0) -> Tensor[B]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .base import latent_reward

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


def aesthetic_reward(scorer: AestheticScorer, decode: Callable | None = None) -> Callable:
    """Aesthetic score of x̂₀ (latents decoded by ``decode``, e.g. ``pipe.decode``), ``[B]``."""
    return latent_reward(scorer, decode, "aesthetic_reward")


def pickscore_reward(scorer: CLIPScorer, prompts: str | Sequence[str], decode: Callable | None = None) -> Callable:
    """PickScore-style reward of x̂₀ for ``prompts`` (one, or one per batch item)."""
    return latent_reward(lambda images: pick_score(scorer, images, prompts), decode, "pickscore_reward")


def clip_score_reward(scorer: CLIPScorer, prompts: str | Sequence[str], decode: Callable | None = None) -> Callable:
    """CLIP-score reward of x̂₀ for ``prompts`` (one, or one per batch item)."""
    return latent_reward(lambda images: clip_score(scorer, images, prompts), decode, "clip_score_reward")
