"""Rectified-flow (SD3-style) models through FlowDenoiser."""
import pytest
import torch

import kdiff_align as ka
from kdiff_align.external import FlowDenoiser
from kdiff_align.schedules import flow_shift, get_sigmas_flow
from kdiff_align.testing import GaussianDenoiser

from tiny import GaussianVelocity


@pytest.mark.parametrize("t_scale", [1.0, 1000.0])
def test_flow_denoiser_equals_gaussian_denoiser(t_scale):
    gaussian = GaussianDenoiser(torch.tensor([0.3, -1.0, 2.0]), 0.6).double()
    model = FlowDenoiser(GaussianVelocity(gaussian, t_scale), t_scale=t_scale)
    x = torch.randn(5, 3, dtype=torch.float64) * 4
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 300.0], dtype=torch.float64)
    torch.testing.assert_close(model(x, sigma), gaussian(x, sigma), rtol=1e-10, atol=1e-10)


def test_flow_schedule_shape_and_shift():
    sigmas = get_sigmas_flow(10, shift=3.0)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    t = sigmas[:-1] / (1 + sigmas[:-1])
    torch.testing.assert_close(t.double(), flow_shift(torch.linspace(0.999, 0.001, 10, dtype=torch.float64), 3.0),
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="t_max"):
        get_sigmas_flow(4, t_max=1.0)


def test_euler_matches_diffusers_flow_match_scheduler():
    """Our Euler odeint on the wrapped model equals diffusers' FlowMatchEulerDiscreteScheduler loop.

    Both are the same update written in different coordinates (x_t' = x_t + (t' − t)v ⇔
    x' = x + (σ' − σ)(x − D)/σ), so they agree to float64 round-off.
    """
    diffusers = pytest.importorskip("diffusers")
    gaussian = GaussianDenoiser(torch.tensor([0.5, -0.5]), 0.8).double()
    velocity = GaussianVelocity(gaussian, 1000.0)
    sigmas = get_sigmas_flow(12, shift=3.0).double()
    t = (sigmas[:-1] / (1 + sigmas[:-1])).tolist()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=t)
    x_t = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = x_t.clone()
    for timestep in scheduler.timesteps:
        v = velocity(theirs, timestep.double().expand(4))
        theirs = scheduler.step(v, timestep, theirs).prev_sample
    ours = ka.odeint(FlowDenoiser(velocity, t_scale=1000.0), x_t * (1 + sigmas[0]), sigmas, method="euler",
                     disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_flow_odeint_reaches_data_law():
    gaussian = GaussianDenoiser(torch.tensor([1.0, -2.0]), 0.5)
    model = FlowDenoiser(GaussianVelocity(gaussian))
    sigmas = get_sigmas_flow(30, shift=3.0)
    x0 = ka.odeint(model, torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)) * sigmas[0], sigmas,
                   disable=True)
    # 4000 samples: standard errors 0.008 (mean) and ~0.006 (std); 0.04 covers those plus the t_max < 1 start
    torch.testing.assert_close(x0.mean(0), torch.tensor([1.0, -2.0]), atol=0.04, rtol=0)
    torch.testing.assert_close(x0.std(0), torch.tensor([0.5, 0.5]), atol=0.04, rtol=0)
