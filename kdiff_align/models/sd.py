"""Stable Diffusion 1.x, 2.x (ε or v-prediction) and SDXL from a local diffusers folder, as a ``Pipeline``.

The UNet and the scheduler's ᾱ table become a ``DiscreteDenoiser``; prompts go through one or two CLIP
text encoders as diffusers does. ``kdiff_align.models.from_pretrained`` dispatches here or to ``sd3``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import image
from ..external import DiscreteDenoiser
from .pipeline import Pipeline

_COMPONENT_FILES = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
                    "text_encoder": "config.json", "tokenizer": "tokenizer_config.json",
                    "text_encoder_2": "config.json", "tokenizer_2": "tokenizer_config.json"}


class CastUNet(torch.nn.Module):
    """``unet(x, t, **cond)`` run in the UNet's dtype on float32 sampler states, returning the tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        dtype = next(self.unet.parameters()).dtype  # O(1); diffusers' ``unet.dtype`` walks every module
        return self.unet(x.to(dtype), t, **cond, return_dict=False)[0]


def model_index(root: Path) -> dict:
    """The folder's ``model_index.json`` as a dict (empty when the file is absent)."""
    index = root / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _check_component(root: Path, name: str) -> None:
    folder = root / name
    if not (folder / _COMPONENT_FILES[name]).is_file():
        raise FileNotFoundError(f"{root} is missing the {name!r} component: expected {folder / _COMPONENT_FILES[name]}")


def _load_text_encoders(root: Path, sdxl: bool, dtype, device) -> dict:
    """Tokenizer(s) and text encoder(s); SDXL's second encoder has a projection (pooled embedding)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    parts = {}
    for enc, tok in [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if sdxl else []):
        _check_component(root, enc)
        _check_component(root, tok)
        cls = CLIPTextModelWithProjection if enc == "text_encoder_2" else CLIPTextModel
        parts[tok] = CLIPTokenizer.from_pretrained(root / tok, local_files_only=True)
        parts[enc] = cls.from_pretrained(root / enc, torch_dtype=dtype, local_files_only=True).to(device).eval()
    return parts


def tokenize(tokenizer, prompts: list[str], device) -> Tensor:
    """Token ids padded and truncated to the tokenizer's length, as CLIP text encoders expect."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def sd_prompt_encoder(text_encoder, tokenizer) -> Callable[[list[str]], dict]:
    """SD 1.x/2.x prompt encoding: the text encoder's last hidden state, as diffusers does."""

    def encode(prompts: list[str]) -> dict:
        hidden = text_encoder(tokenize(tokenizer, prompts, text_encoder.device))[0]
        return {"encoder_hidden_states": hidden}

    return encode


def sdxl_prompt_encoder(encoders: list, tokenizers: list, time_ids: Tensor,
                        zero_uncond: bool = True) -> Callable[[list[str]], dict]:
    """SDXL prompt encoding: penultimate hidden states of both encoders side by side, the second
    encoder's pooled projection and the size/crop time ids as ``added_cond_kwargs``.

    Args:
        time_ids: ``[6]`` (original size, crop top-left, target size), shared by all prompts.
        zero_uncond: the empty prompt maps to zero embeddings (diffusers' ``force_zeros_for_empty_prompt``).
    """

    def encode(prompts: list[str]) -> dict:
        hidden, pooled = [], None
        for text_encoder, tokenizer in zip(encoders, tokenizers):
            out = text_encoder(tokenize(tokenizer, prompts, text_encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
        hidden = torch.cat(hidden, dim=-1)
        if zero_uncond:
            keep = torch.tensor([p != "" for p in prompts], device=hidden.device)
            hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
        ids = time_ids.to(hidden.device, hidden.dtype).expand(len(prompts), -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}

    return encode


def load_sd(root: Path, dtype: torch.dtype, device: torch.device) -> Pipeline:
    """An SD 1.x/2.x/SDXL folder as a ``Pipeline`` (``kdiff_align.models.from_pretrained`` checks the arguments)."""
    import diffusers
    index = model_index(root)
    for name in ("unet", "vae", "scheduler"):
        _check_component(root, name)

    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, local_files_only=True)
    unet = unet.to(device).eval()
    upcast = dtype == torch.float16 and json.loads((root / "vae" / "config.json").read_text()).get("force_upcast", True)
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32 if upcast else dtype,
                                                  local_files_only=True).to(device).eval()
    scheduler = _load_scheduler(root)
    sdxl = unet.config.addition_embed_type == "text_time"
    parts = _load_text_encoders(root, sdxl, dtype, device)

    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    encode = _prompt_encoder(parts, sdxl, size, 2 ** (len(vae.config.block_out_channels) - 1),
                             index.get("force_zeros_for_empty_prompt", True))
    denoiser = DiscreteDenoiser(CastUNet(unet), scheduler.alphas_cumprod, scheduler.config.prediction_type).to(device)
    pipe = Pipeline(denoiser, encode, (unet.config.in_channels, *size), sigma_min=denoiser.sigma_min,
                    sigma_max=denoiser.sigma_max, init_sigma=(denoiser.sigma_max**2 + 1) ** 0.5,
                    decode=lambda z: image.vae_decode(vae, z), encode=lambda x: image.vae_encode(vae, x),
                    device=device, dtype=torch.float32)
    pipe.unet, pipe.vae, pipe.scheduler, pipe.torch_dtype = unet, vae, scheduler, dtype
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        setattr(pipe, name, parts.get(name))
    return pipe


def _prompt_encoder(parts: dict, sdxl: bool, size: tuple, vae_scale: int, zero_uncond: bool) -> Callable:
    """SD or SDXL prompt encoding; SDXL's time ids describe an uncropped image of the UNet's native size."""
    if not sdxl:
        return sd_prompt_encoder(parts["text_encoder"], parts["tokenizer"])
    pixels = [s * vae_scale for s in size]
    time_ids = torch.tensor([*pixels, 0, 0, *pixels], dtype=torch.float32)
    return sdxl_prompt_encoder([parts["text_encoder"], parts["text_encoder_2"]],
                               [parts["tokenizer"], parts["tokenizer_2"]], time_ids, zero_uncond)


def _load_scheduler(root: Path):
    """The folder's scheduler (any diffusers class with an ᾱ table: DDIM, PNDM, Euler, DPM-Solver, ...)."""
    import diffusers
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None) or diffusers.DDPMScheduler
    scheduler = cls.from_pretrained(root / "scheduler", local_files_only=True)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"scheduler {type(scheduler).__name__} in {root / 'scheduler'} has no alphas_cumprod table; "
                         "only discrete-time ε/v-prediction models (SD 1.x/2.x, SDXL) are supported")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type must be 'epsilon' or 'v_prediction', "
                         f"got {scheduler.config.prediction_type!r}")
    return scheduler
