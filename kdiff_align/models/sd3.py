"""Rectified-flow models (Stable Diffusion 3 style) as a ``Pipeline``: flow schedule, prompt encoding, loading.

An SD3 folder holds ``transformer`` (``SD3Transformer2DModel``, a velocity model), a
``FlowMatchEulerDiscreteScheduler`` (its ``shift``), a VAE with ``scaling_factor`` and ``shift_factor``,
two CLIP text encoders with projections and optionally a T5 encoder (``text_encoder_3``). The
transformer is wrapped by ``FlowDenoiser``, so every sampler and method sees an ordinary D(x, σ)
with σ = t/(1 − t).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import image, schedules
from ..external import FlowDenoiser
from .pipeline import Pipeline
from .sd import tokenize

_FILES = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
          "text_encoder": "config.json", "tokenizer": "tokenizer_config.json", "text_encoder_2": "config.json",
          "tokenizer_2": "tokenizer_config.json", "text_encoder_3": "config.json",
          "tokenizer_3": "tokenizer_config.json"}


class FlowPipeline(Pipeline):
    """A ``Pipeline`` over a flow denoiser whose default grids are the shifted rectified-flow schedule.

    ``start_t``/``end_t`` stay σ values as everywhere else; t = σ/(1 + σ). The steps are uniform in
    unshifted time between the two ends, then shifted (SD3's schedule, truncated for SDEdit).

    Args:
        shift: SD3's timestep shift s (t ↦ s·t/(1 + (s − 1)·t)); 3.0 for SD3.
        t_max: the unshifted start time (< 1: t = 1 is σ = ∞).
        t_min: the unshifted last nonzero time (diffusers: 1/num_train_timesteps).
    """

    def __init__(self, denoiser: Callable, encode_prompts: Callable[[list[str]], dict], latent_shape,
                 *, shift: float = 1.0, t_max: float = 1 - 1e-3, t_min: float = 1e-3, **kwargs):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.shift = float(shift)
        sigma_max, sigma_min = (float(t / (1 - t)) for t in schedules.flow_shift(torch.tensor([t_max, t_min],
                                                                                       dtype=torch.float64), shift))
        # x_t = ε at the first time is x = (1 + σ_max)·ε: the flow model's pure-noise start, as diffusers'
        kwargs.setdefault("init_sigma", 1 + sigma_max)
        super().__init__(denoiser, encode_prompts, latent_shape, sigma_min=sigma_min, sigma_max=sigma_max, **kwargs)

    def sigmas(self, steps: int, start_t: float | None = None, end_t: float | None = None) -> Tensor:
        """Shifted flow grid of ``steps`` steps from σ = ``start_t`` (default σ_max) to ``end_t`` (σ_min), then 0."""
        ends = torch.tensor([self.sigma_max if start_t is None else float(start_t),
                             self.sigma_min if end_t is None else float(end_t)], dtype=torch.float64)
        if not (torch.isfinite(ends).all() and 0 < ends[1] < ends[0]):
            raise ValueError(f"need finite σ values start_t > end_t > 0, got start_t={float(ends[0])}, "
                             f"end_t={float(ends[1])}")
        unshifted = schedules.flow_shift(ends / (1 + ends), 1 / self.shift)  # the inverse of the shift by s
        return schedules.get_sigmas_flow(steps, self.shift, float(unshifted[0]), float(unshifted[1]),
                                         device=self.device)


class CastTransformer(torch.nn.Module):
    """``transformer(x_t, timestep, **cond)`` run in the transformer's dtype, returning the velocity tensor."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        cond = {k: v.to(dtype) for k, v in cond.items()}
        return self.transformer(hidden_states=x.to(dtype), timestep=t, **cond, return_dict=False)[0]


def sd3_prompt_encoder(clip_encoders: list, clip_tokenizers: list, t5_encoder, t5_tokenizer, joint_dim: int,
                       max_sequence_length: int = 256) -> Callable[[list[str]], dict]:
    """SD3 prompt encoding: both CLIPs' penultimate states side by side, zero-padded to the T5 width, followed
    by the T5 tokens (zeros without T5); the pooled projection is both CLIPs' pooled embeddings side by side.

    Args:
        joint_dim: the transformer's ``joint_attention_dim`` (the T5 width).
        max_sequence_length: T5 tokens per prompt (diffusers' default 256; also the zero block's length).
    """

    def encode(prompts: list[str]) -> dict:
        hidden, pooled = [], []
        for text_encoder, tokenizer in zip(clip_encoders, clip_tokenizers):
            out = text_encoder(tokenize(tokenizer, prompts, text_encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
        if t5_encoder is None:
            t5 = clip.new_zeros(len(prompts), max_sequence_length, joint_dim)
        else:
            ids = t5_tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
            t5 = t5_encoder(ids.to(t5_encoder.device))[0].to(clip.dtype)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    return encode


def is_sd3_folder(root: Path, index: dict) -> bool:
    """Whether a diffusers folder holds a rectified-flow SD3 model (by model_index.json or a transformer folder)."""
    return "StableDiffusion3" in str(index.get("_class_name", "")) or (root / "transformer" / "config.json").is_file()


def _require(root: Path, name: str) -> None:
    if not (root / name / _FILES[name]).is_file():
        raise FileNotFoundError(f"{root} is missing the {name!r} component of an SD3 folder: expected "
                                f"{root / name / _FILES[name]}")


def _load_text_encoders(root: Path, dtype, device) -> dict:
    """The two CLIP encoders with projections and, when the folder has one, T5 (``None`` otherwise)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
    parts = {}
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        _require(root, enc)
        _require(root, tok)
        parts[tok] = CLIPTokenizer.from_pretrained(root / tok, local_files_only=True)
        parts[enc] = CLIPTextModelWithProjection.from_pretrained(root / enc, torch_dtype=dtype,
                                                                 local_files_only=True).to(device).eval()
    parts["text_encoder_3"] = parts["tokenizer_3"] = None
    if (root / "text_encoder_3").is_dir():
        _require(root, "text_encoder_3")
        _require(root, "tokenizer_3")
        parts["tokenizer_3"] = AutoTokenizer.from_pretrained(root / "tokenizer_3", local_files_only=True)
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(root / "text_encoder_3", torch_dtype=dtype,
                                                                 local_files_only=True).to(device).eval()
    return parts


def _load_scheduler(root: Path):
    import diffusers
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    if scheduler.config.use_dynamic_shifting:
        raise ValueError(f"{root / 'scheduler'}: use_dynamic_shifting (resolution-dependent shift) is not supported; "
                         "set a fixed shift")
    return scheduler


def from_pretrained(root, torch_dtype: torch.dtype = torch.float32, device="cpu",
                    max_sequence_length: int = 256) -> FlowPipeline:
    """Load an SD3-style diffusers folder (local) as a ``FlowPipeline``; T5 is optional.

    Components are attributes with diffusers' names (``transformer``, ``vae``, ``scheduler``,
    ``text_encoder``…``tokenizer_3``; an absent T5 is ``None``). The sampler state stays float32.
    """
    import diffusers
    root, device = Path(root), torch.device(device)
    for name in ("transformer", "vae", "scheduler"):
        _require(root, name)
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(root / "transformer", local_files_only=True)
    if transformer.dtype != torch_dtype:  # diffusers' from_pretrained(torch_dtype=...) left it float32
        transformer = transformer.to(torch_dtype)
    transformer = transformer.to(device).eval()
    upcast = torch_dtype == torch.float16 and json.loads((root / "vae" / "config.json").read_text()).get(
        "force_upcast", True)
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32 if upcast else torch_dtype,
                                                  local_files_only=True).to(device).eval()
    scheduler = _load_scheduler(root)
    parts = _load_text_encoders(root, torch_dtype, device)
    config = transformer.config
    encode = sd3_prompt_encoder([parts["text_encoder"], parts["text_encoder_2"]],
                                [parts["tokenizer"], parts["tokenizer_2"]], parts["text_encoder_3"],
                                parts["tokenizer_3"], config.joint_attention_dim, max_sequence_length)
    num_train = scheduler.config.num_train_timesteps
    denoiser = FlowDenoiser(CastTransformer(transformer), t_scale=num_train)
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pipe = FlowPipeline(denoiser, encode, (config.in_channels, *size), shift=scheduler.config.shift,
                        t_min=1 / num_train, decode=lambda z: image.vae_decode(vae, z),
                        encode=lambda x: image.vae_encode(vae, x), device=device, dtype=torch.float32)
    pipe.transformer, pipe.vae, pipe.scheduler, pipe.torch_dtype = transformer, vae, scheduler, torch_dtype
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
        setattr(pipe, name, parts[name])
    return pipe
