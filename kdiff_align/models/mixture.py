"""``toy:mixture``: a closed-form class-conditional model of 1×8×8 images, for tests and quick examples.

Three classes (``dark``, ``grey``, ``light``) are Gaussians; the null class is their mixture. D is the
exact posterior mean, so runs need no weights and finish in milliseconds.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..testing import MixtureDenoiser
from .pipeline import Pipeline

MIXTURE_CLASSES = ["dark", "grey", "light"]


class MixtureImageDenoiser(torch.nn.Module):
    """Exact class-conditional denoiser of a 3-class Gaussian mixture of 1×8×8 images (``toy:mixture``).

    Class c is N(μ_c, s² I); the null class (label 3) is their equal-weight mixture. D is the closed
    form posterior mean, so runs are fast and need no weights (tests and examples).
    """

    def __init__(self, std: float = 0.25):
        super().__init__()
        ramp = torch.linspace(-0.3, 0.3, 8)
        means = torch.stack([level + ramp[None, :] * ramp[:, None] * 4 for level in (-0.6, 0.0, 0.6)])[:, None]
        self.register_buffer("means", means)
        self.std = std
        self.mixture = MixtureDenoiser(means, torch.full((3,), std), torch.ones(3))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        mean = self.means[class_labels.clamp_max(2)]
        shrink = self.std**2 / (self.std**2 + sigma.to(x).reshape(-1, 1, 1, 1) ** 2)
        conditional = mean + shrink * (x - mean)
        null = (class_labels == 3).reshape(-1, 1, 1, 1)
        return torch.where(null, self.mixture(x, sigma), conditional)


def mixture_pipeline(device="cpu") -> Pipeline:
    """``toy:mixture``: a closed-form Pipeline whose prompts are ``dark``, ``grey``, ``light`` (``""``: all)."""

    def class_labels(prompts: list[str]) -> dict:
        unknown = [p for p in prompts if p and p not in MIXTURE_CLASSES]
        if unknown:
            raise ValueError(f"unknown prompt(s) {unknown}; prompts must be '' or one of {MIXTURE_CLASSES}")
        labels = [MIXTURE_CLASSES.index(p) if p else 3 for p in prompts]
        return {"class_labels": torch.tensor(labels, device=device)}

    pipe = Pipeline(MixtureImageDenoiser().to(device), class_labels, (1, 8, 8), sigma_min=0.002, sigma_max=20.0,
                    device=device)
    pipe.class_names = list(MIXTURE_CLASSES)
    return pipe
