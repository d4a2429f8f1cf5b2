"""Wrappers that turn networks into denoisers D(x, σ) (k-diffusion's ``external`` module).

A discrete-time ε- or v-predicting network with its ᾱ table becomes a variance-exploding denoiser:
x_VE = x_VP/√ᾱ, σ = √((1 − ᾱ)/ᾱ), and σ ↔ t by linear interpolation of log σ. diffusers'
``UNet2DModel``/``UNet2DConditionModel`` and any callable ``net(x, t, **kwargs)`` work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .schedules import log_sigma_to_t, sigmas_from_alphas_cumprod, t_to_sigma
from .utils import append_dims

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def model_output(out) -> Tensor:
    """The tensor inside a network's return value (diffusers output object, tuple or tensor)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find a tensor in the network output of type {type(out).__name__}")


class DiscreteDenoiser(torch.nn.Module):
    """D(x, σ) from a discrete-time ε/v/x₀-predicting network and its ``alphas_cumprod`` table.

    Args:
        prediction_type: ``"epsilon"`` (c_out = −σ), ``"v_prediction"`` (c_skip = 1/(σ²+1),
            c_out = −σ/√(σ²+1)) or ``"sample"``.
        quantize: round t to the nearest training timestep instead of interpolating.
    """

    def __init__(self, net, alphas_cumprod, prediction_type: str = "epsilon", quantize: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.net, self.prediction_type, self.quantize = net, prediction_type, quantize
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)  # float64, for σ → t

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return log_sigma_to_t(sigma, self.log_sigmas, self.quantize)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t_to_sigma(t, self.sigmas)

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        c_in = append_dims(1 / (sigma**2 + 1) ** 0.5, x.ndim)
        t = self.sigma_to_t(sigma).to(x.device)
        out = model_output(self.net(x * c_in, t, **kwargs)).to(x.dtype)
        sigma_ = append_dims(sigma, x.ndim)
        if self.prediction_type == "epsilon":
            return x - sigma_ * out
        if self.prediction_type == "v_prediction":
            return x * c_in**2 - sigma_ * c_in * out
        return out


def DiffusersDenoiser(unet, scheduler, quantize: bool = False) -> DiscreteDenoiser:
    """D(x, σ) for a diffusers UNet and its DDPM-family scheduler (ᾱ table and prediction type)."""
    return DiscreteDenoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, quantize)


class KarrasDenoiser(torch.nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): D = c_skip·x + c_out·F(c_in·x, c_noise)."""

    def __init__(self, net, sigma_data: float = 1.0):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def get_scalings(self, sigma: Tensor):
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
        c_in = 1 / (sigma**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out, c_in

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.get_scalings(sigma))
        return x * c_skip + model_output(self.net(x * c_in, sigma.log() / 4, **kwargs)) * c_out


class FlowDenoiser(torch.nn.Module):
    """D(x, σ) from a rectified-flow velocity model (SD3 convention: x_t = (1 − t)x₀ + tε, v = ε − x₀).

    In our parametrisation x = x_t/(1 − t) and σ = t/(1 − t), so t = σ/(1 + σ), x_t = x/(1 + σ) and
    D = x_t − t·v. The Euler step of the PF-ODE in σ equals the flow Euler step x_t' = x_t + (t' − t)·v.

    Args:
        t_scale: the network is called with ``t * t_scale`` (1000 for diffusers' SD3 transformer).
    """

    def __init__(self, model, *, t_scale: float = 1.0):
        super().__init__()
        self.model, self.t_scale = model, t_scale

    def forward(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        t = sigma / (1 + sigma)
        x_t = x / append_dims(1 + sigma, x.ndim)
        v = model_output(self.model(x_t, t * self.t_scale, **kwargs)).to(x.dtype)
        return x_t - append_dims(t, x.ndim) * v
