"""The few-step benchmark's peers and references (``bench/_diffusers.py``, ``bench/fewstep.py``): diffusers'
scheduler objects driven on any σ grid with a VE denoiser, and the reference's own error estimate."""
import sys
from pathlib import Path

import diffusers
import pytest
import torch

import kdiff_align as ka
from kdiff_align.external import DiffusersDenoiser
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _diffusers  # noqa: E402
import fewstep  # noqa: E402
from test_solvers import BETAS, unet  # noqa: E402, F401  (the tiny random UNet fixture)


@pytest.mark.parametrize("name", list(_diffusers.SCHEDULERS))
def test_driver_reproduces_the_diffusers_loop_on_its_own_grid(unet, name):
    """Our σ grid, prediction_type "sample" and a VE D give the numbers of diffusers' own ε-loop."""
    cls, config = _diffusers.SCHEDULERS[name]
    scheduler = cls(**BETAS, **config)
    scheduler.set_timesteps(8)
    theirs = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
    vp = cls is not diffusers.LMSDiscreteScheduler  # these hold x·√ᾱ, LMS the VE state x
    scale = lambda s: (1 + s**2) ** 0.5 if vp else 1.0  # noqa: E731
    sigmas = scheduler.sigmas.float()  # VE σ of each timestep, then 0 (DEIS: σ of t = 0)
    x = theirs * scale(sigmas[0])
    with torch.no_grad():
        for t in scheduler.timesteps:
            theirs = scheduler.step(unet(scheduler.scale_model_input(theirs, t), t).sample, t, theirs).prev_sample
    counting = CountingDenoiser(DiffusersDenoiser(unet, cls(**BETAS)))
    ours = _diffusers.solver(name)(counting, x, sigmas)
    assert counting.calls == 8
    # float32 either way; the UNet sees t recovered from σ by log-σ interpolation (exact to ~1e-6 at
    # integer timesteps), as in tests/test_solvers.py: measured gap ≤ 6e-5 (LMS) on states of size ~40
    torch.testing.assert_close(ours, theirs * scale(sigmas[-1]), rtol=1e-5, atol=2e-4)


# Our copies, which tests/test_solvers.py matches to diffusers step for step; 3M is diffusers' own
# third-order rule (ours differs), checked by the loop test above only.
LOG = {"sigma_steps": False}  # diffusers' algorithms extrapolate in log σ on every step
OURS = {"dpmpp_2m": ("dpmpp_2m", LOG), **{f"unipc{p}": ("unipc", {"order": p, **LOG}) for p in (1, 2, 3)},
        **{f"deis{p}": ("deis", {"order": p, "lower_order_final": True, **LOG}) for p in (2, 3)},
        "lms": ("lms", {"lower_order_final": False})}


@pytest.mark.parametrize("grid", ["karras", "sd3_flow"])
@pytest.mark.parametrize("name", list(OURS))
def test_driver_on_our_grids_ending_in_zero(name, grid):
    """On a Karras grid and SD3's shifted flow grid (σ from ~3000, then 0) the driven schedulers step
    to σ = 0 (DEIS via DEIS_ZERO·σ_min) and give our solvers' numbers, one D call per step."""
    model = MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                            torch.tensor([0.7, 0.3])).double()
    sigmas = (ka.get_sigmas_karras(7, 0.002, 80.0) if grid == "karras" else
              ka.schedules.get_sigmas_flow(7, shift=3.0)).double()
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    counting = CountingDenoiser(model)
    theirs = _diffusers.solver(name)(counting, x, sigmas)
    method, kw = OURS[name]
    ours = ka.odeint(model, x, sigmas, method=method, disable=True, **kw)
    assert counting.calls == 7 and theirs.dtype == torch.float64
    # exact formulas agree to float64 rounding of the starting state (size ~σ_max): measured ≤ 1e-13
    # on the Karras grid, ≤ 7e-9 (DEIS) from σ_max ≈ 3000; diffusers' DPM-Solver++ rounds its state
    # to float32 every step: relative 6e-8 a step on data of size ~3, 7 steps
    tol = 1e-5 if name == "dpmpp_2m" else 1e-11 * sigmas[0].item()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)


def test_fewstep_peers_are_diffusers_objects_with_counted_steps():
    """Every non-k-diffusion peer is a driven diffusers scheduler and fits budget NFE in budget steps."""
    peers = fewstep.peer_solvers(None)
    assert sorted(peers) == sorted(f"diffusers.{n}" for n in _diffusers.SCHEDULERS)
    model, x = GaussianDenoiser(torch.zeros(3), 0.5).double(), torch.zeros(4, 3, dtype=torch.float64)
    assert {fewstep.steps_for(f, model, x, 6) for f in peers.values()} == {6}


def test_reference_self_error_estimates_its_true_error():
    """Heun is second order: the 2000- vs 4000-step gap the benchmark prints is ≈ 3/4 of the 2000-step
    reference's true error (closed-form flow on a Gaussian), so it is an honest error bar."""
    law = GaussianDenoiser(torch.linspace(-1, 2, 8), torch.logspace(-1.5, 0.3, 8)).double()
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 80
    ref = fewstep.heun_reference(law, x, 0.002, 80.0)
    gap = fewstep.scores(ref, fewstep.heun_reference(law, x, 0.002, 80.0, 4000))["rms"]
    exact = law(law.flow(x, torch.tensor(80.0), torch.tensor(0.002)), torch.full((16,), 0.002).double())
    true = fewstep.scores(ref, exact)["rms"]
    assert 0.6 * true < gap < 0.9 * true, (gap, true)


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc3", "deis3"])
def test_vp_state_gives_the_flow_coordinate_solve(name):
    """Driving in VP coordinates on an SD3 flow grid gives diffusers' own flow-coordinate solve
    (``use_flow_sigmas``, state x/(1 + σ)): the updates see the grid only through λ = −log σ."""
    model = MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                            torch.tensor([0.7, 0.3])).double()
    sigmas = ka.schedules.get_sigmas_flow(7, shift=3.0).double()
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    cls, config = _diffusers.SCHEDULERS[name]
    scheduler = _diffusers.scheduler_on(cls, {**config, "use_flow_sigmas": True}, sigmas)
    t_flow = sigmas / (1 + sigmas)
    scheduler.sigmas = torch.cat([t_flow[:-1], scheduler.sigmas[-1:] / (1 + scheduler.sigmas[-1:])])
    state = x / (1 + sigmas[0])
    for i, t in enumerate(scheduler.timesteps):
        state = scheduler.step(model(state * (1 + sigmas[i]), sigmas[i].expand(32)), t, state).prev_sample
    flow = state / (1 - scheduler.sigmas[-1])
    # measured ≤ 3e-13 (DPM-Solver++: 2e-6, its float32 state, as above)
    tol = 1e-5 if name == "dpmpp_3m" else 1e-11 * sigmas[0].item()
    torch.testing.assert_close(_diffusers.solver(name)(model, x, sigmas), flow, rtol=0, atol=tol)


def test_fewstep_flip_test_is_exact_mcnemar_on_the_discordant_items():
    none, first3 = torch.zeros(10, dtype=torch.bool), torch.arange(10) < 3
    assert fewstep.more_flips_p(first3, none) == pytest.approx(1 / 8)  # 3 of 3 discordant items ours: (1/2)^3
    assert fewstep.more_flips_p(first3, first3) == 1.0  # the same items: nothing to tell apart
    assert fewstep.more_flips_p(none, first3) == 1.0  # the peer flips more
    both, ours = torch.arange(10) < 5, (torch.arange(10) < 5) | (torch.arange(10) >= 8)  # 2 discordant, both ours
    assert fewstep.more_flips_p(ours, both) == pytest.approx(1 / 4)
    law = MixtureDenoiser(torch.tensor([[-2.0], [2.0]]), torch.tensor([0.3, 0.3]), torch.tensor([0.5, 0.5]))
    x, ref = torch.tensor([[-2.0], [1.9], [2.1]]), torch.tensor([[-2.0], [-1.9], [2.0]])
    assert fewstep.flipped(x, ref, law).tolist() == [False, True, False]
    assert fewstep.flipped(x, ref, None) is None
