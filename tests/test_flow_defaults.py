"""Default multistep solvers on SD3-shift flow grids (issue 25): exponential integrators step in σ where
a step's nodes are more evenly spaced in σ than in log σ, and stay the published algorithms elsewhere."""
import math

import numpy as np
import pytest
import torch

import kdiff_align as ka
from kdiff_align.external import FlowDenoiser
from kdiff_align.sampling import multistep
from kdiff_align.testing import GaussianDenoiser, MixtureDenoiser

EXPONENTIAL = ("dpmpp_2m", "dpmpp_3m", "unipc", "deis")


def laws() -> dict:
    """Two of ``bench/fewstep.py``'s closed-form laws (same seeds, same numbers)."""
    gen = torch.Generator().manual_seed(0)
    torch.randn(4, 8, generator=gen)  # bench's 8-D mixture means, drawn first there
    return {"gauss8": GaussianDenoiser(torch.randn(8, generator=gen), torch.logspace(-1, 0.3, 8)).double(),
            "mix2d": MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                                     torch.tensor([0.7, 0.3])).double()}


def as_flow(model):
    """The law through a rectified-flow velocity model and ``FlowDenoiser`` (SD3 convention)."""
    def velocity(x_t, t):
        return (x_t - model(x_t / (1 - t)[:, None], t / (1 - t))) / t[:, None]
    return FlowDenoiser(velocity)


def median_errors(law, steps: int, items: int = 128) -> dict:
    """Median ‖x − x_ref‖ of every multistep method at its defaults on ``get_sigmas_flow(steps, shift=3)``."""
    model, sigmas = as_flow(law), ka.schedules.get_sigmas_flow(steps, shift=3.0).double()
    dim = law.mean.shape[0] if isinstance(law, GaussianDenoiser) else law.means.shape[1]
    x = torch.randn(items, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    fine = ka.get_sigmas_karras(1000, float(sigmas[-2]), float(sigmas[0])).double()
    ref = ka.odeint(model, x, fine, method="rk4", disable=True)
    return {m: (ka.odeint(model, x, sigmas, method=m, disable=True) - ref).norm(dim=1).median().item()
            for m in multistep.MULTISTEP_METHODS}


# Measured ratios to LMS (k-diffusion's LMS, step for step) at 20 steps, 128 items; in brackets before
# this rule (log σ on every step, 3M/UniPC lowering the final order on every grid):
#   gauss8: dpmpp_2m 1.80 (9.97), dpmpp_3m 1.11 (7.40), unipc 1.26 (7.21), deis 1.11 (1.97), ipndm 0.71 (0.71)
#   mix2d:  dpmpp_2m 2.44 (30.1), dpmpp_3m 1.87 (40.0), unipc 1.41 (36.9), deis 1.44 (7.94), ipndm 0.62 (0.62)
# The bounds leave ~25 % over today's; every exponential integrator's failed before. They are not
# LMS's error: these second- and third-order methods do not reach the fourth-order LMS on this grid
# (docs/solvers.md).
BOUNDS = {"gauss8": {"dpmpp_2m": 2.3, "dpmpp_3m": 1.4, "unipc": 1.6, "deis": 1.4, "ipndm": 1.0},
          "mix2d": {"dpmpp_2m": 3.1, "dpmpp_3m": 2.4, "unipc": 1.8, "deis": 1.8, "ipndm": 1.0}}


@pytest.mark.parametrize("name", ["gauss8", "mix2d"])
def test_default_multistep_methods_near_lms_on_sd3_flow_grid(name):
    errs = median_errors(laws()[name], 20)
    ratios = {m: errs[m] / errs["lms"] for m in BOUNDS[name]}
    assert all(ratios[m] <= bound for m, bound in BOUNDS[name].items()), ratios


@pytest.mark.parametrize("method", EXPONENTIAL)
def test_sigma_steps_leave_karras_and_exponential_grids_alone(method):
    """On Karras and log-uniform grids every step stays in log σ: the published algorithms, bit for bit."""
    model = laws()["mix2d"]
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    for sigmas in [ka.get_sigmas_karras(n, 0.002, 80.0).double() for n in (5, 10, 25)] + \
                  [ka.get_sigmas_exponential(12, 0.002, 80.0).double()]:
        assert torch.equal(ka.odeint(model, x, sigmas, method=method, disable=True),
                           ka.odeint(model, x, sigmas, method=method, disable=True, sigma_steps=False))


def test_sigma_step_picks_the_more_evenly_spaced_variable():
    flow = ka.schedules.get_sigmas_flow(20, shift=3.0).double().tolist()
    # the last two interior steps (log-σ steps 0.46, 0.74, 4.0 there; even in σ), not the first ones
    assert [i for i in range(2, 19) if multistep.sigma_step(flow, i, 3)] == [17, 18]
    assert not multistep.sigma_step(flow, 19, 2) and not multistep.sigma_step(flow, 18, 1)
    vp = [14.61, 7.297, 4.082, 2.493, 1.618, 1.073, 0.6958, 0.4, 0.0]  # diffusers' SD grid, 8 steps
    assert not any(multistep.sigma_step(vp, i, min(3, i + 1)) for i in range(1, 8))


def test_sigma_weights_integrate_polynomials_in_sigma_exactly():
    """r·∫_r^1 p(u)/u² du for p of degree < number of nodes, against the closed form."""
    v, r = [1.0, 1.7, 3.1], 0.05
    w = multistep.sigma_weights(v, r)
    for m, exact in enumerate([1 - r, -r * math.log(r), r * (1 - r)]):
        assert sum(wj * u**m for wj, u in zip(w, v)) == pytest.approx(exact, rel=1e-12)
    assert np.isclose(multistep.sigma_weights([1.0], r)[0], 1 - r)  # one node: DDIM
