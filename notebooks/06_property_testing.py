# %% [markdown]
# # Property-test your own sampler
# `kdiff_align.testing` ships closed-form denoisers and `kdiff_align.strategies` Hypothesis strategies (`sigma_schedules`,
# `gaussian_problems`, `mixture_denoisers`, `conditions`, `uint8_images`, `seeds`). A sampler is
# correct when, for *every* schedule and Gaussian the strategies produce, it lands near the exact
# probability-flow solution; Hypothesis searches for the counterexample.

# %%
import torch
from hypothesis import given, settings

import kdiff_align as ka
from kdiff_align.strategies import gaussian_problems, seeds
from kdiff_align.testing import GaussianDenoiser


def my_sampler(model, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """A midpoint-in-log-σ sampler (DPM-Solver-2 style) written from ode_step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, _ = ka.ode_step(model, x, sigma, sigma_next, method="dpm2")
    return x


@settings(max_examples=30, deadline=None)
@given(problem=gaussian_problems(), seed=seeds)
def test_my_sampler_follows_the_exact_flow(problem, seed):
    mean, std, batch, _ = problem
    model = GaussianDenoiser(mean, std).double()
    sigmas = ka.get_sigmas_karras(40, 0.002, 10.0).double()
    x_T = torch.randn(batch, *mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    exact = model(model.flow(x_T, sigmas[0], sigmas[-2]), sigmas[-2].expand(batch))
    assert (my_sampler(model, x_T, sigmas) - exact).abs().max() < 0.05


test_my_sampler_follows_the_exact_flow()
print("my_sampler passed 30 random Gaussian problems")

# %% [markdown]
# A broken sampler (Euler with the step size off by 10%) is caught, and Hypothesis shrinks the
# failing case to a small one.

# %%
def broken_sampler(model, x, sigmas, **_):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, _ = ka.ode_step(model, x, sigma, sigma + 0.9 * (sigma_next - sigma), method="euler")
    return x


my_sampler = broken_sampler
try:
    test_my_sampler_follows_the_exact_flow()
    print("not caught?!")
except AssertionError:
    print("broken sampler caught")
