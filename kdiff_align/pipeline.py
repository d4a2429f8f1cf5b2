"""A loaded model with the Sampling Demon seed's notebook API, as methods instead of globals.

``Pipeline`` is model-agnostic: it holds a conditional denoiser ``D(x, σ, **cond)``, a prompt encoder
(prompts → conditioning tensors, ``""`` unconditional), the latent shape and σ range, and optional
image decode/encode functions. Stable Diffusion folders and the shipped toy models both build one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from . import image, sampling, schedules
from .cond import Condition, cat_kwargs, condition_denoiser, slice_kwargs
from .external import DiscreteDenoiser


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

    def guided(self, condition: Condition) -> Callable:
        """The multi-prompt CFG denoiser of ``condition`` (one network call per evaluation)."""
        return condition_denoiser(self.denoiser, condition, self.encode_cached, max_batch=self.max_batch)

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
        return sampling.odeint(self.guided(condition), x, self.sigmas(steps, start_t), **kwargs)

    def oderevert(self, x: Tensor, condition: Condition, start_t: float | None = None, steps: int = 100,
                  **kwargs) -> Tensor:
        """Invert a clean latent up to σ = ``start_t`` (default σ_max) along the PF-ODE."""
        sigmas = schedules.revert_sigmas(self.sigmas(steps, start_t))
        return sampling.oderevert(self.guided(condition), x, sigmas, **kwargs)

    def sdeint(self, x: Tensor, condition: Condition, beta, steps: int, start_t: float | None = None,
               **kwargs) -> Tensor:
        """Sample along the Karras β-SDE from σ = ``start_t`` (SDEdit when x comes from ``oderevert``)."""
        return sampling.sdeint(self.guided(condition), x, self.sigmas(steps, start_t), beta=beta, **kwargs)

    def from_latent_to_pil(self, x: Tensor) -> list[Image.Image]:
        """Decode latents to a list of PIL images."""
        with torch.no_grad():
            return image.to_pil(self.decode(x))

    def from_pil_to_latent(self, pils) -> Tensor:
        """Encode a PIL image or a list of them to latents."""
        x = image.from_pil(pils, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return self.encode(x)


# --- Stable Diffusion (1.x, 2.x with v-prediction, SDXL) from a local diffusers folder -------------

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


def _model_index(root: Path) -> dict:
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


def _tokens(tokenizer, prompts: list[str], device) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def sd_prompt_encoder(text_encoder, tokenizer) -> Callable[[list[str]], dict]:
    """SD 1.x/2.x prompt encoding: the text encoder's last hidden state, as diffusers does."""

    def encode(prompts: list[str]) -> dict:
        hidden = text_encoder(_tokens(tokenizer, prompts, text_encoder.device))[0]
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
            out = text_encoder(_tokens(tokenizer, prompts, text_encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
        hidden = torch.cat(hidden, dim=-1)
        if zero_uncond:
            keep = torch.tensor([p != "" for p in prompts], device=hidden.device)
            hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
        ids = time_ids.to(hidden.device, hidden.dtype).expand(len(prompts), -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}

    return encode


def from_pretrained(path, torch_dtype: torch.dtype | None = None, device=None) -> Pipeline:
    """Load a Stable Diffusion (1.x, 2.x, SDXL, or SD3 via ``sd3.from_pretrained``) local diffusers folder.

    Nothing is downloaded. Components are attributes with diffusers' names (``unet``, ``vae``,
    ``scheduler``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``; absent ones are
    ``None``). D(x, σ) comes from the UNet and the scheduler's ᾱ table and prediction type; the sampler
    state stays float32 while the networks run in ``torch_dtype``.

    Args:
        torch_dtype: the networks' dtype (default float32). An fp16 VAE whose config asks for
            ``force_upcast`` (SDXL's) is kept in float32.
        device: where the networks run (default: CUDA when available, else CPU).
    """
    import diffusers
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is not a folder; expected a local diffusers model folder")
    dtype = torch.float32 if torch_dtype is None else torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    index = _model_index(root)
    from . import sd3
    if sd3.is_sd3_folder(root, index):  # rectified-flow SD3 folders (transformer + flow scheduler)
        return sd3.from_pretrained(root, dtype, device)
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
