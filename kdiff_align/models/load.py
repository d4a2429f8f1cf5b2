"""Loading a model by name: ``from_pretrained`` for local diffusers folders, ``load_model`` for CLI specs.

``from_pretrained`` is the one dispatcher over the loaders beside it: SD3-style rectified-flow folders
go to ``sd3``, every other folder (SD 1.x/2.x/SDXL) to ``sd``. ``load_model`` adds the shipped models
(``toy:NAME``) and the closed-form ``toy:mixture`` that the command line accepts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..utils import require
from . import mixture, sd, sd3, toy
from .pipeline import Pipeline


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
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is not a folder; expected a local diffusers model folder")
    for module in ("diffusers", "transformers"):
        require(module, "diffusers", "from_pretrained")
    dtype = torch.float32 if torch_dtype is None else torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if sd3.is_sd3_folder(root, sd.model_index(root)):  # rectified-flow SD3 folders (transformer + flow scheduler)
        return sd3.from_pretrained(root, dtype, device)
    return sd.load_sd(root, dtype, device)


def load_model(spec: str, device="cpu", dtype: torch.dtype | None = None) -> Pipeline:
    """``toy:NAME`` (fashion, digits, fashion_latent, mixture) or a local diffusers folder → Pipeline."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be 'toy:NAME' or a local diffusers folder, got {spec!r}")
    if spec == "toy" or spec.startswith("toy:"):
        name = spec.partition(":")[2] or "fashion"
        if name == "mixture":
            return mixture.mixture_pipeline(device)
        return toy.load(name, device=device)
    if not Path(spec).is_dir():
        raise ValueError(f"model {spec!r} is neither toy:NAME nor an existing diffusers folder")
    return from_pretrained(spec, torch_dtype=dtype, device=device)
