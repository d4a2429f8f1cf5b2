"""Tiny offline components shared by the tests: a CLIP tokenizer, a conditional Gaussian pipeline, exact
discrete-time (ε/v) and rectified-flow networks of Gaussian data."""
import string

import torch

from kdiff_align.models.pipeline import Pipeline
from kdiff_align.schedules import t_to_sigma
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser


def tiny_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges) built without any download."""
    from transformers import CLIPTokenizer
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def toy_pipeline():
    """Condition = a mean offset; D is the exact Gaussian denoiser around that mean."""
    base = GaussianDenoiser(torch.zeros(1, 4, 4), 0.5)

    def net(x, sigma, offset):
        return base(x - offset[:, :, None, None], sigma) + offset[:, :, None, None]

    def encode(prompts):
        return {"offset": torch.tensor([[0.0 if p == "" else float(len(p)) / 4] for p in prompts])}

    return Pipeline(CountingDenoiser(net), encode, (1, 4, 4), sigma_min=0.002, sigma_max=10.0)


def alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class ExactNet(torch.nn.Module):
    """A discrete-time VP network that predicts the exact ε (or v) of a Gaussian's data law."""

    def __init__(self, gaussian, table, prediction_type):
        super().__init__()
        self.gaussian, self.table, self.prediction_type = gaussian, table, prediction_type

    def forward(self, x_vp, t):
        sigma = t_to_sigma(t, self.table).to(x_vp)
        c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None]
        x = x_vp / c_in
        x0 = self.gaussian(x, sigma)
        eps = (x - x0) / sigma[:, None]
        return eps if self.prediction_type == "epsilon" else c_in * eps - sigma[:, None] * c_in * x0


class GaussianVelocity(torch.nn.Module):
    """Exact velocity E[ε − x₀ | x_t] of Gaussian data, called as v(x_t, t·t_scale)."""

    def __init__(self, gaussian, t_scale=1.0):
        super().__init__()
        self.gaussian, self.t_scale = gaussian, t_scale

    def forward(self, x_t, t_scaled):
        t = t_scaled / self.t_scale
        sigma = t / (1 - t)
        x = x_t / (1 - t)[:, None]
        x0 = self.gaussian(x, sigma)
        return (x - x0) / sigma[:, None] - x0
