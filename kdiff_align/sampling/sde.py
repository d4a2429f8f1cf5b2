"""Stochastic samplers (ancestral DPM-2 / DPM-Solver++(2S), DPM-Solver++ SDE, 2M SDE, 3M SDE) and a
Brownian-tree noise sampler built on torchsde.

All work in t = −log σ with data prediction D. With η = 0 the 2M/3M SDE solvers reduce to the
ODE solvers ``dpmpp_2m`` / ``dpmpp_3m``. Noise comes from ``noise_sampler(sigma, sigma_next)``; a
``BrownianTreeNoiseSampler`` makes the sample a function of one Brownian path per item, so refining
the grid converges instead of drawing new noise.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torchsde
from torch import Tensor

from ..utils import Generator, as_sigma, check_generator, default_noise_sampler
from .grad import fixed_noise, run_steps

SDE_METHODS = ("ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
BROWNIAN_METHODS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
SOLVER_TYPES = ("midpoint", "heun")


class BrownianTreeNoiseSampler:
    """``noise_sampler(sigma, sigma_next)``: (W(σ_next) − W(σ))/√|σ_next − σ| of torchsde Brownian trees.

    Args:
        x: a tensor with the shape, dtype and device of the noise.
        sigma_min: the low end of the interval the tree covers (queries must stay inside it).
        sigma_max: its high end.
        seed: an int (one tree for the whole batch) or one int per batch item (one tree per item, so
            an item's noise does not depend on its batch). None draws a seed from the global RNG.
        transform: maps σ to the tree's time (identity by default, as in k-diffusion).
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed: int | Sequence[int] | None = None,
                 transform: Callable = lambda sigma: sigma):
        self.transform = transform
        t0, t1 = sorted(self._time(v) for v in (sigma_min, sigma_max))
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = not isinstance(seed, int)
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"seed is a list of {len(seed)} seeds, expected one per batch item ({x.shape[0]})")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s))
                      for s in (seed if self.batched else [seed])]

    def _time(self, sigma) -> float:
        return float(self.transform(torch.as_tensor(sigma, dtype=torch.float64)))

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0, t1 = self._time(sigma), self._time(sigma_next)
        sign = 1.0 if t0 < t1 else -1.0
        lo, hi = min(t0, t1), max(t0, t1)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / abs(t1 - t0) ** 0.5


def tree_time(sigma: Tensor) -> Tensor:
    """The time τ = atan(log σ) ∈ [−π/2, π/2] of the default Brownian tree: one range for every σ ≥ 0."""
    return sigma.log().atan()


def tree_seeds(generator: Generator, batch: int, *, draw: bool = False) -> int | list[int]:
    """The Brownian-tree seed(s) of ``generator`` (None: the global RNG), one per item for a list.

    A seed is the generator's next 63-bit draw, read from a copy of its state unless ``draw``, so
    reading it leaves the generator unchanged and two calls from the same state get the same tree.
    """
    check_generator(generator, batch)
    single = generator is None or isinstance(generator, torch.Generator)
    gens = [torch.default_generator if generator is None else generator] if single else list(generator)
    seeds = []
    for g in gens:
        if not draw:
            copy = torch.Generator(g.device)
            copy.set_state(g.get_state())
            g = copy
        seeds.append(int(torch.randint(0, 2**63 - 1, [], generator=g, device=g.device)))
    return seeds[0] if single else seeds


def _t(sigma: float) -> float:
    return -math.log(sigma)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``utils.get_ancestral_step`` on floats: (σ_down, σ_up) with σ_down² + σ_up² = σ_next²."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def dpm2_ancestral_step(model, x, sigma, sigma_next, denoised, extra_args, eta, s_noise, noise):
    """Ancestral DPM-Solver-2 (k-diffusion): a midpoint step in log σ to σ_down, then σ_up of fresh noise."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    d = (x - denoised) / sigma
    if sigma_down == 0:
        return x + d * (sigma_down - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_down)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - model(x_2, as_sigma(sigma_mid, x), **extra_args)) / sigma_mid
    x = x + d_2 * (sigma_down - sigma)
    return x + noise() * s_noise * sigma_up if sigma_up else x


def dpmpp_2s_ancestral_step(model, x, sigma, sigma_next, denoised, extra_args, eta, s_noise, noise):
    """Ancestral DPM-Solver++(2S): a singlestep second-order data-prediction step to σ_down, then noise."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    if sigma_down == 0:
        x = denoised
    else:
        h = _t(sigma_down) - _t(sigma)
        sigma_s = math.exp(-(_t(sigma) + h / 2))
        x_2 = (sigma_s / sigma) * x - math.expm1(-h / 2) * denoised
        denoised_2 = model(x_2, as_sigma(sigma_s, x), **extra_args)
        x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
    return x + noise() * s_noise * sigma_up if sigma_up else x


def dpmpp_sde_step(model, x, sigma, sigma_next, denoised, extra_args, eta, s_noise, noise, r=0.5):
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): two ancestral sub-steps, the second using D at t + r·h."""
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    sigma_s = math.exp(-(t + h * r))
    sd, su = ancestral_split(sigma, sigma_s, eta)
    x_2 = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised  # (t − s_)·expm1, s_ = −log sd
    if su:
        x_2 = x_2 + noise(sigma, sigma_s) * s_noise * su
    denoised_2 = model(x_2, as_sigma(sigma_s, x), **extra_args)
    sd, su = ancestral_split(sigma, sigma_next, eta)
    fac = 1 / (2 * r)
    denoised_d = (1 - fac) * denoised + fac * denoised_2
    x = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised_d
    return x + noise(sigma, sigma_next) * s_noise * su if su else x


def dpmpp_multistep_sde_step(x, sigma, sigma_next, Ds, hs, eta, s_noise, noise, order, solver_type="midpoint"):
    """DPM-Solver++(2M/3M) SDE step (k-diffusion): exact linear part with e^{−ηh}, 2nd/3rd-order D
    corrections and σ_next·√(1 − e^{−2ηh}) fresh noise.

    ``Ds``/``hs`` are newest first: [D_i, D_{i−1}, …], [h_{i−1}, …].
    """
    h = _t(sigma_next) - _t(sigma)
    h_eta = h * (eta + 1)
    x = (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-h_eta) * Ds[0]
    if order == 2 and len(Ds) > 1:
        r = hs[0] / h
        if solver_type == "heun":
            x = x + (-math.expm1(-h_eta) / (-h_eta) + 1) * (1 / r) * (Ds[0] - Ds[1])
        else:
            x = x - 0.5 * math.expm1(-h_eta) * (1 / r) * (Ds[0] - Ds[1])
    elif order == 3 and len(Ds) > 1:
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        r0 = hs[0] / h
        d1_0 = (Ds[0] - Ds[1]) / r0
        if len(Ds) > 2:
            r1 = hs[1] / h
            d1_1 = (Ds[1] - Ds[2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        else:
            x = x + phi_2 * d1_0
    if eta:
        x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
    return x


def sde_family_step(model, x, s: list[float], i: int, Ds: tuple, method: str, extra_args: dict, eta: float,
                    s_noise: float, noise_sampler: Callable, solver_type: str, r: float) -> Tensor:
    """x_{i+1} of one of the ``SDE_METHODS`` (other than "ancestral") from x_i and Ds = (D_i, D_{i−1}, …)."""
    denoised = Ds[0]
    if method in ("dpm2_ancestral", "dpmpp_2s_ancestral"):
        step = dpm2_ancestral_step if method == "dpm2_ancestral" else dpmpp_2s_ancestral_step
        noise = lambda: noise_sampler(s[i], s[i + 1])  # noqa: E731
        return step(model, x, s[i], s[i + 1], denoised, extra_args, eta, s_noise, noise)
    if s[i + 1] == 0:
        return denoised
    if method == "dpmpp_sde":
        return dpmpp_sde_step(model, x, s[i], s[i + 1], denoised, extra_args, eta, s_noise, noise_sampler, r)
    hs = [_t(s[k + 1]) - _t(s[k]) for k in range(i - 1, max(i - 3, -1), -1)]  # h_{i−1}, h_{i−2}
    order = 2 if method == "dpmpp_2m_sde" else 3
    return dpmpp_multistep_sde_step(x, s[i], s[i + 1], list(Ds), hs, eta, s_noise, noise_sampler, order, solver_type)


def sde_solve(model, x: Tensor, sigmas: Tensor, method: str, *, extra_args: dict, callback=None, disable=None,
              eta: float = 1.0, s_noise: float = 1.0, noise_sampler: Callable, solver_type: str = "midpoint",
              r: float = 0.5, grad: str | None = None, grad_last: int | None = None) -> Tensor:
    """Run one of the ``SDE_METHODS`` (other than plain "ancestral") along ``sigmas``, in a ``grad`` mode
    (the noise drawn once per path; the D history a checkpoint input)."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}; got {solver_type!r}")
    s = sigmas.tolist()
    noise_sampler = noise_sampler if grad is None else fixed_noise(noise_sampler)

    def step(i, x, *Ds):
        denoised = model(x, as_sigma(s[i], x), **extra_args)
        Ds = (denoised, *Ds[:2])
        x_next = sde_family_step(model, x, s, i, Ds, method, extra_args, eta, s_noise, noise_sampler, solver_type, r)
        return x_next, {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}, Ds

    return run_steps(step, x, len(s) - 1, callback=callback, disable=disable, grad=grad, grad_last=grad_last,
                     model=model, extra_args=extra_args)


def default_sde_noise(method: str, x: Tensor, generator: Generator) -> Callable:
    """The noise a method uses when none is given: for the DPM-Solver++ SDEs a Brownian tree over every
    σ ≥ 0 (time ``tree_time``; one tree per item for a list of generators) seeded by ``tree_seeds``
    without drawing, i.i.d. normals from ``generator`` otherwise."""
    if method in BROWNIAN_METHODS:
        return BrownianTreeNoiseSampler(x, 0.0, math.inf, tree_seeds(generator, x.shape[0]), transform=tree_time)
    return default_noise_sampler(x, generator)


def sde_run(model, x: Tensor, sigmas: Tensor, method: str, *, generator: Generator, noise_sampler: Callable | None,
            eta: float, **kw) -> Tensor:
    """``sde_solve`` with ``default_sde_noise`` when no ``noise_sampler`` is given.

    The default Brownian path is a function of σ and of the generator's state, so a grid split in
    parts sees the path of the whole grid; the part that ends at σ = 0 with η > 0 then draws the seed,
    so the generator ends where one whole run leaves it and the next run gets a new path.
    """
    default = noise_sampler is None
    noise_sampler = default_sde_noise(method, x, generator) if default else noise_sampler
    out = sde_solve(model, x, sigmas, method, eta=eta, noise_sampler=noise_sampler, **kw)
    if default and method in BROWNIAN_METHODS and eta > 0 and float(sigmas[-1]) == 0:
        tree_seeds(generator, x.shape[0], draw=True)
    return out
