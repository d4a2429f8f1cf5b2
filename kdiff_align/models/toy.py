"""Small real image models shipped with the package: digits (8×8) and Fashion-MNIST (28×28).

Interface:

- ``load(name, device="cpu") -> ToyPipeline`` for ``name`` in ``"digits"``, ``"fashion"``,
  ``"fashion_latent"``. The result is a :class:`kdiff_align.models.pipeline.Pipeline` whose prompts are the
  class names (``{"prompts": ["sneaker", "bag"], "cfgs": [3, 1]}``; ``""`` is the null class the models
  were trained with by classifier-free dropout) and has the extra attributes

  - ``class_names``: ``list[str]`` (``DIGITS_CLASSES`` or ``FASHION_CLASSES``);
  - ``classifier``: ``nn.Module`` mapping images in [-1, 1] ``[B, C, H, W]`` to logits ``[B, 10]``;
    ``classifier.features(x)`` gives the penultimate-layer features ``[B, 128]``;
  - ``vae``: ``None`` for the pixel models; for ``"fashion_latent"`` the :class:`VAE` whose
    ``decode``/``encode`` are the pipeline's ``decode``/``encode`` (latents ``[B, 4, 7, 7]``).

  Pixel models have ``latent_shape`` ``(1, 8, 8)`` / ``(1, 28, 28)``, data in [-1, 1]; the denoisers use
  EDM preconditioning (σ_data = 0.5) and the σ range [0.002, 80].
- ``classifier_reward(pipe, class_name) -> reward(x0) -> Tensor[B]``: the classifier's logit (or
  log-probability) of that class, differentiable, decoding latents with ``pipe.decode`` first.
- ``load_heldout_classifier()``: a second Fashion-MNIST classifier (an MLP, another seed) that no
  method optimises, for held-out rewards and feature metrics (``kdiff_align.apps.arena``).
- ``load_digits_data(split)`` and ``load_fashion_mnist(split)`` return ``(images [N, 1, H, W] in [-1, 1],
  labels [N])``. Split ``"eval"`` of Fashion-MNIST is the shipped slice of 3,000 test images
  (``kdiff_align/data/``, no data set needed); ``"train"`` and ``"test"`` read the full IDX files of the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or
  ``$KDIFF_FASHION_MNIST``).

Weights are safetensors files under ``kdiff_align/weights/``, read with the ``safetensors`` library; the
network configuration is in each file's metadata.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from safetensors import safe_open
from torch.nn import functional as F

from ..external import KarrasDenoiser
from ..utils import require
from .pipeline import Pipeline

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGITS_CLASSES = [str(i) for i in range(10)]
WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
# The shipped evaluation slice of Fashion-MNIST (first 300 test images per class; train/make_eval_slice.py)
FASHION_EVAL_SLICE = Path(__file__).parents[1] / "data" / "fashion_mnist_eval.npz"
HELDOUT_CLASSIFIER = "fashion_classifier_heldout.safetensors"  # train/README.md has its command
SIGMA_DATA, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0
MODELS = {  # name -> (diffusion weights, classifier weights, VAE weights or None, class names)
    "digits": ("digits.safetensors", "digits_classifier.safetensors", None, DIGITS_CLASSES),
    "fashion": ("fashion.safetensors", "fashion_classifier.safetensors", None, FASHION_CLASSES),
    "fashion_latent": ("fashion_latent.safetensors", "fashion_classifier.safetensors", "fashion_vae.safetensors",
                       FASHION_CLASSES),
}


# ---------------------------------------------------------------------------------------------- data

def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST IDX files (``$KDIFF_FASHION_MNIST`` or the Debian package's)."""
    return Path(os.environ.get("KDIFF_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzipped) into a uint8 array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file {path} is missing; install the Debian package dataset-fashion-mnist "
                                f"(apt-get install dataset-fashion-mnist) or set KDIFF_FASHION_MNIST to its folder")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        raise ValueError(f"{path} holds {array.size} values but its header says {dims}")
    return array.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``(images [N, 1, 28, 28] in [-1, 1], labels [N])``.

    Args:
        split: "train" or "test" (the full IDX files of the Debian package, for training and the full
            quality report), or "eval": the shipped slice of 3,000 test images (300 per class), which
            needs no data set installed and is what tests, notebooks and benchmarks use.
    """
    if split not in ("train", "test", "eval"):
        raise ValueError(f"split must be 'train', 'test' or 'eval', got {split!r}")
    if split == "eval":
        with np.load(FASHION_EVAL_SLICE, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    else:
        root = Path(root) if root is not None else fashion_mnist_dir()
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def load_digits_data(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits ``(images [N, 1, 8, 8] in [-1, 1], labels [N])``; the last 297 are "test".

    ``"eval"`` is the same as ``"test"`` (scikit-learn ships the whole set, so no slice is needed).
    """
    if split not in ("train", "test", "eval"):
        raise ValueError(f"split must be 'train', 'test' or 'eval', got {split!r}")
    load_digits = require("sklearn.datasets", "digits", 'the "digits" data set').load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8 - 1)[:, None]
    y = torch.from_numpy(digits.target.astype(np.int64))
    rows = slice(None, 1500) if split == "train" else slice(1500, None)
    return x[rows], y[rows]


def load_data(name: str, split: str = "train") -> tuple[Tensor, Tensor]:
    """Images and labels of data set ``name`` ("digits" or "fashion"); ``split`` is "train", "test" or "eval"."""
    if name == "digits":
        return load_digits_data(split)
    if name == "fashion":
        return load_fashion_mnist(split)
    raise ValueError(f"data set name must be 'digits' or 'fashion', got {name!r}")


# ------------------------------------------------------------------------------------------ networks

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with the noise/class embedding added as a per-channel shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """A small class-conditional UNet ``F(x, c_noise, class_labels)``; label ``n_classes`` is the null class."""

    def __init__(self, in_channels: int = 1, channels=(32, 64, 128), n_classes: int = 10, emb_dim: int = 128,
                 patch: int = 1):
        super().__init__()
        self.config = dict(in_channels=in_channels, channels=list(channels), n_classes=n_classes, emb_dim=emb_dim,
                           patch=patch)
        self.patch = patch
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(200), emb_dim // 4)), persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(n_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels * patch**2, channels[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(c_prev, c, emb_dim) for c_prev, c in zip([channels[0], *channels], channels))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])
        self.mid = ResBlock(channels[-1], channels[-1], emb_dim)
        self.upsample = nn.ModuleList(nn.Conv2d(c_hi, c, 3, padding=1) for c, c_hi in zip(channels[:-1], channels[1:]))
        self.up = nn.ModuleList(ResBlock(2 * c, c, emb_dim) for c in channels)
        self.norm_out, self.conv_out = _norm(channels[0]), nn.Conv2d(channels[0], in_channels * patch**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor) -> Tensor:
        angles = c_noise[:, None].float() * self.freqs
        emb = self.noise_mlp(torch.cat([angles.cos(), angles.sin()], 1)) + self.class_emb(class_labels)
        emb = F.silu(emb)
        h, skips = self.conv_in(F.pixel_unshuffle(x, self.patch)), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, size=skips[i].shape[-2:], mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], 1), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch)


class Classifier(nn.Module):
    """A small CNN: images in [-1, 1] → logits; ``features`` gives the penultimate layer."""

    def __init__(self, in_channels: int = 1, channels=(32, 64, 128), n_classes: int = 10, feature_dim: int = 128,
                 size: int = 28):
        super().__init__()
        self.config = dict(in_channels=in_channels, channels=list(channels), n_classes=n_classes,
                           feature_dim=feature_dim, size=size)
        layers, c_prev = [], in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_prev, c, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            c_prev, size = c, size if i == 0 else (size + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_prev * size * size, feature_dim)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` (used for the Fréchet distance)."""
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLPClassifier(nn.Module):
    """A two-hidden-layer MLP on flattened images: the arena's held-out classifier (another architecture)."""

    def __init__(self, in_channels: int = 1, size: int = 28, hidden: int = 256, feature_dim: int = 128,
                 n_classes: int = 10):
        super().__init__()
        self.config = dict(in_channels=in_channels, size=size, hidden=hidden, feature_dim=feature_dim,
                           n_classes=n_classes)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, hidden), nn.SiLU(),
                                  nn.Linear(hidden, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class VAE(nn.Module):
    """A small VAE, 1×28×28 images in [-1, 1] ↔ 4×7×7 latents (scaled to standard deviation σ_data = 0.5)."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, width=width)
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w // 2, 3, padding=1), nn.SiLU(), nn.Conv2d(w // 2, w // 2, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(w // 2, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(w, w // 2, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(w // 2, w // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, in_channels, 3, padding=1))
        self.register_buffer("scale", torch.ones(()))

    def encode_dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance of the unscaled latent."""
        mean, logvar = self.encoder(x).chunk(2, 1)
        return mean, logvar.clamp(-30, 20)

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] → scaled latents (the posterior mean, deterministic)."""
        return self.encode_dist(x)[0] * self.scale

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents → images in [-1, 1]."""
        return torch.tanh(self.decoder(z / self.scale))


# ------------------------------------------------------------------------------------------- weights

def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read with the ``safetensors`` library."""
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def load_module(cls, filename: str, device="cpu") -> nn.Module:
    """Build ``cls(**config)`` from a shipped weights file's metadata and load its tensors (in float32)."""
    path = WEIGHTS_DIR / filename
    if not path.exists():
        raise FileNotFoundError(f"shipped weights {path} are missing; train them with the commands in train/README.md")
    tensors, metadata = read_safetensors(path)
    module = cls(**json.loads(metadata["config"]))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return module.to(device).eval().requires_grad_(False)


class ToyPipeline(Pipeline):
    """A :class:`Pipeline` over a shipped toy model, with ``class_names``, ``classifier``, ``vae`` and ``net``."""

    def __init__(self, net: UNet, class_names: list[str], classifier: nn.Module, vae: VAE | None, latent_shape,
                 device="cpu"):
        self.net, self.class_names, self.classifier, self.vae = net, list(class_names), classifier, vae
        super().__init__(KarrasDenoiser(net, SIGMA_DATA), self.class_labels, latent_shape, sigma_min=SIGMA_MIN,
                         sigma_max=SIGMA_MAX, decode=vae.decode if vae is not None else None,
                         encode=vae.encode if vae is not None else None, device=device)

    def class_labels(self, prompts: list[str]) -> dict:
        """Prompts (class names, ``""`` for the null class) → ``{"class_labels": LongTensor}``."""
        unknown = [p for p in prompts if p and p not in self.class_names]
        if unknown:
            raise ValueError(f"unknown prompt(s) {unknown}; prompts must be '' or one of {self.class_names}")
        labels = [self.class_names.index(p) if p else len(self.class_names) for p in prompts]
        return {"class_labels": torch.tensor(labels, device=self.device)}

    def null_denoiser(self) -> Callable[..., Tensor]:
        """D(x, σ) of the null class ``""``: the unconditional model (trained by classifier-free dropout)."""
        null = len(self.class_names)

        def denoise(x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
            labels = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
            return self.denoiser(x, sigma, class_labels=labels, **kwargs)

        return denoise


def load(name: str, device="cpu") -> ToyPipeline:
    """The shipped model ``name`` ("digits", "fashion" or "fashion_latent") as a :class:`ToyPipeline`."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    net_file, classifier_file, vae_file, class_names = MODELS[name]
    net = load_module(UNet, net_file, device)
    classifier = load_module(Classifier, classifier_file, device)
    vae = load_module(VAE, vae_file, device) if vae_file else None
    side = 8 if name == "digits" else 28
    latent_shape = (vae.config["latent_channels"], 7, 7) if vae is not None else (1, side, side)
    return ToyPipeline(net, class_names, classifier, vae, latent_shape, device)


def load_heldout_classifier(device="cpu") -> MLPClassifier:
    """The held-out Fashion-MNIST classifier: an MLP trained with another seed, 88.9% test accuracy."""
    return load_module(MLPClassifier, HELDOUT_CLASSIFIER, device)


def classifier_reward(pipe: ToyPipeline, class_name: str, log_prob: bool = False):
    """Reward = the classifier's logit (or log-probability) of ``class_name`` on decoded x̂₀ (differentiable)."""
    if class_name not in pipe.class_names:
        raise ValueError(f"class_name must be one of {pipe.class_names}, got {class_name!r}")
    index = pipe.class_names.index(class_name)

    def reward(x0: Tensor) -> Tensor:
        images = pipe.decode(x0) if pipe.vae is not None else x0
        logits = pipe.classifier(images)
        return (logits.log_softmax(1) if log_prob else logits)[:, index]

    return reward
