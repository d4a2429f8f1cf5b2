"""Hypothesis strategies for the package's domains (integer seeds -> torch generators)."""
import torch
from hypothesis import strategies as st


@st.composite
def sigma_ranges(draw):
    sigma_min = draw(st.floats(1e-3, 1.0))
    sigma_max = draw(st.floats(sigma_min * 1.5, 200.0))
    return sigma_min, sigma_max


@st.composite
def gaussian_problems(draw):
    """(mean, std, batch, seed) for a GaussianDenoiser of a small sample shape."""
    dim = draw(st.integers(1, 4))
    mean = draw(st.lists(st.floats(-3, 3, width=32), min_size=dim, max_size=dim))
    std = draw(st.floats(0.25, 2.0, width=32))
    return torch.tensor(mean), std, draw(st.integers(1, 5)), draw(st.integers(0, 2**31 - 1))


seeds = st.integers(0, 2**31 - 1)
