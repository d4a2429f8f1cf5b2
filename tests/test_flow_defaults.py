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


# Measured ratios to LMS (k-diffusion's LMS, step for step), 128 items, at 20 / 30 steps:
#   gauss8: dpmpp_2m 0.93 / 0.96, dpmpp_3m 0.92 / 0.93, unipc 0.92 / 0.93, deis 0.93 / 0.94, ipndm 0.71 / 0.71
#   mix2d:  dpmpp_2m 1.08 / 1.62, dpmpp_3m 0.98 / 0.96, unipc 0.46 / 0.11, deis 0.81 / 0.87, ipndm 0.62 / 2.80
# The third-order methods meet the bar (no worse than LMS) at both; the runs are deterministic
# (float64, fixed seeds), so the bound is the bar itself. The second-order 2M, and iPNDM (whose fixed
# equal-step weights make it second order on uneven grids), fall behind the fourth-order LMS on the mixture
# as the steps grow: they are held to 20 steps and to ~10 % over their ratio there. Before the fine-grid
# σ steps (log-σ spread limit 2 at every length, the method's own order, UniC correcting them) the 20-step
# ratios were 1.80 / 1.11 / 1.26 / 1.11 (gauss8) and 2.44 / 1.87 / 1.41 / 1.44 (mix2d) for 2M / 3M / UniPC /
# DEIS, and before any σ step 2–40×.
BOUNDS = {20: {"dpmpp_2m": 1.2, "dpmpp_3m": 1.0, "unipc": 1.0, "deis": 1.0, "ipndm": 1.0},
          30: {"dpmpp_3m": 1.0, "unipc": 1.0, "deis": 1.0}}


@pytest.mark.parametrize("steps", [20, 30])
@pytest.mark.parametrize("name", ["gauss8", "mix2d"])
def test_default_multistep_methods_no_worse_than_lms_on_sd3_flow_grid(name, steps):
    errs = median_errors(laws()[name], steps)
    ratios = {m: errs[m] / errs["lms"] for m in BOUNDS[steps]}
    assert all(ratios[m] <= bound for m, bound in BOUNDS[steps].items()), ratios


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
    # 20 steps: the tail, where the nodes are more even in σ than in log σ (log-σ steps 0.46, 0.74, 4.0 at
    # the end); below 15 steps only where the log-σ spread also exceeds 2: the last interior step at 10
    assert [i for i in range(2, 19) if multistep.sigma_step(flow, i, 3)] == [15, 16, 17, 18]
    flow10 = ka.schedules.get_sigmas_flow(10, shift=3.0).double().tolist()
    assert [i for i in range(2, 9) if multistep.sigma_step(flow10, i, 3)] == [8]
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


def test_sd_grids_below_15_steps_keep_diffusers_algorithm_and_longer_ones_gain():
    """diffusers' SD grids: bit for bit its log-σ algorithm below 15 steps; from 15 steps the tail in σ at
    order 4 (``bench/fewstep.py sdgrid``: 0.06–1.03× its median error at 20–50 steps, 1.77× for 2M on the
    2-D mixture at 20). Here the 8-D Gaussian at 30 steps, measured 0.21–0.87×."""
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    law = laws()["gauss8"]

    def grid(steps):
        sched.set_timesteps(steps)
        sigmas = ka.schedules.sigmas_from_alphas_cumprod(sched.alphas_cumprod)[sched.timesteps.long()]
        return ka.schedules.append_zero(sigmas)

    x = torch.randn(128, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * grid(10)[0]
    for method in EXPONENTIAL:
        s = grid(10)
        assert torch.equal(ka.odeint(law, x, s, method=method, disable=True),
                           ka.odeint(law, x, s, method=method, disable=True, sigma_steps=False))
    s = grid(30)
    ref = ka.odeint(law, x, ka.get_sigmas_karras(1000, float(s[-2]), float(s[0])).double(), method="rk4", disable=True)
    for method in EXPONENTIAL:
        ours, theirs = [(ka.odeint(law, x, s, method=method, disable=True, sigma_steps=on) - ref).norm(dim=1).median()
                        for on in (True, False)]
        assert ours <= 0.95 * theirs, (method, float(ours / theirs))
