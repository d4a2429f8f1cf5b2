"""Hypothesis strategies for property-testing samplers (needs ``hypothesis``; see ``kdiff_align.testing``).

Seeds are drawn as integers and turned into ``torch.Generator``s by the test, because Hypothesis
controls Python's and NumPy's randomness but not torch's.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .schedules import get_sigmas_karras
from .testing import GaussianDenoiser, MixtureDenoiser

seeds = st.integers(0, 2**31 - 1)


@st.composite
def sigma_ranges(draw, low: float = 1e-3, high: float = 200.0):
    """(σ_min, σ_max) with σ_max ≥ 1.5·σ_min."""
    sigma_min = draw(st.floats(low, high / 1.5))
    return sigma_min, draw(st.floats(sigma_min * 1.5, high))


@st.composite
def sigma_schedules(draw, max_steps: int = 50):
    """A Karras grid: n steps, random range and ρ, ending in 0."""
    sigma_min, sigma_max = draw(sigma_ranges())
    return get_sigmas_karras(draw(st.integers(1, max_steps)), sigma_min, sigma_max, rho=draw(st.floats(1.0, 10.0)))


@st.composite
def gaussian_problems(draw, max_dim: int = 4):
    """(mean, std, batch, seed) for a ``GaussianDenoiser`` of a small sample shape."""
    dim = draw(st.integers(1, max_dim))
    mean = draw(st.lists(st.floats(-3, 3, width=32), min_size=dim, max_size=dim))
    std = draw(st.floats(0.25, 2.0, width=32))
    return torch.tensor(mean), std, draw(st.integers(1, 5)), draw(seeds)


@st.composite
def gaussian_denoisers(draw, max_dim: int = 4):
    """A ``GaussianDenoiser`` with random mean and isotropic std."""
    mean, std, _, _ = draw(gaussian_problems(max_dim))
    return GaussianDenoiser(mean, std)


@st.composite
def mixture_denoisers(draw, max_components: int = 3, dim: int = 2):
    """A ``MixtureDenoiser`` with separated random means, stds in [0.25, 1] and positive weights."""
    k = draw(st.integers(1, max_components))
    means = draw(hnp.arrays(np.float32, (k, dim), elements=st.floats(-4, 4, width=32)))
    stds = draw(hnp.arrays(np.float32, (k,), elements=st.floats(0.25, 1.0, width=32)))
    weights = draw(hnp.arrays(np.float32, (k,), elements=st.floats(0.125, 1.0, width=32)))
    return MixtureDenoiser(torch.from_numpy(means), torch.from_numpy(stds), torch.from_numpy(weights))


@st.composite
def conditions(draw, prompts=("cat", "dog", "bird", "fish"), max_prompts: int = 3):
    """A ``{"prompts": [...], "cfgs": [...]}`` dict over a fixed vocabulary."""
    chosen = draw(st.lists(st.sampled_from(list(prompts)), min_size=1, max_size=max_prompts))
    cfgs = draw(st.lists(st.floats(-2, 10, width=32), min_size=len(chosen), max_size=len(chosen)))
    return {"prompts": chosen, "cfgs": cfgs}


def uint8_images(max_batch: int = 3, max_side: int = 9):
    """``[B, C, H, W]`` uint8 arrays with C in (1, 3)."""
    shapes = st.tuples(st.integers(1, max_batch), st.sampled_from([1, 3]), st.integers(1, max_side),
                       st.integers(1, max_side))
    return hnp.arrays(np.uint8, shapes)
