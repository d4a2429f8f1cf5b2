"""Multistep ODE solvers, SDE families, Brownian-tree noise, split grids, log-likelihood and the
k-diffusion drop-ins: convergence orders on the closed-form Gaussian flow, step-for-step agreement
with diffusers' schedulers on a tiny random UNet and with k-diffusion's own sampling.py."""
import math
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from hypothesis import given, strategies as st

import kdiff_align as ka
from kdiff_align import sampling
from kdiff_align.external import DiffusersDenoiser, FlowDenoiser
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser
from kdiff_align.utils import generators
from strategies import gaussian_problems, seeds, sigma_schedules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _kdiffusion  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian64(dim=3, std=0.7):
    return GaussianDenoiser(torch.linspace(-1, 2, dim), std).double()


def mixture():
    return MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                           torch.tensor([0.7, 0.3])).double()


def exact_x0(model, x_T, sigmas):
    """Exact flow to σ_min followed by the final step x = D(x, σ_min)."""
    x_min = model.flow(x_T, sigmas[0], sigmas[-2])
    return model(x_min, sigmas[-2].expand(x_T.shape[0]))


def x_T_of(n=16, dim=3, seed=1, scale=SIGMA_MAX):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.fixture(scope="module")
def K():
    module = _kdiffusion.load()
    if module is None:
        pytest.skip("k-diffusion 0.1.1 could not be downloaded (no network): the drop-in comparison needs it")
    return module


# Claimed global orders. UniPC-p with its corrector is of order p + 1; iPNDM's equal-step weights on
# a non-uniform (Karras) grid leave it second order; DEIS-3 and LMS-4 are Lagrange methods of order 3, 4.
ORDERS = [("lms", {}, 4), ("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 3), ("unipc", {}, 4), ("unipc", {"order": 2}, 3),
          ("unipc", {"variant": "bh1"}, 4), ("ipndm", {}, 2), ("deis", {}, 3), ("deis", {"order": 2}, 2)]


@pytest.mark.parametrize("method,kw,order", ORDERS)
def test_convergence_order_on_gaussian_flow(method, kw, order):
    model, x_T = gaussian64(), x_T_of()
    errs = []
    for n in (64, 128):
        sigmas = ka.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double()
        errs.append((ka.odeint(model, x_T, sigmas, method=method, disable=True, **kw)
                     - exact_x0(model, x_T, sigmas)).abs().max().item())
    # log2 of the error ratio measured at 64 → 128 steps lies within 0.25 of the order for all of them
    # (lms 3.77, 3m 3.09, unipc 4.05, deis 2.88 ...); a wrong coefficient drops it by a whole order.
    assert order - 0.35 < math.log2(errs[0] / errs[1]) < order + 0.6, errs


@pytest.mark.parametrize("method", sampling.MULTISTEP_METHODS)
def test_multistep_one_evaluation_per_step(method):
    model, seen = CountingDenoiser(mixture()), []
    ka.odeint(model, torch.ones(2, 2, dtype=torch.float64), ka.get_sigmas_karras(7, 0.01, 10.0).double(),
              method=method, callback=seen.append, disable=True)
    assert model.calls == 7 and [d["i"] for d in seen] == list(range(7))


@pytest.mark.parametrize("method", sampling.MULTISTEP_METHODS)
def test_multistep_on_flow_matching_grid(method):
    """Through ``FlowDenoiser`` on a shifted rectified-flow grid, errors fall faster than first order."""
    gauss = gaussian64()

    def velocity(x_t, t):  # v = (x_t − D_flow)/t of the Gaussian data law, in flow coordinates
        sigma = t / (1 - t)
        return (x_t - gauss(x_t / (1 - t)[:, None], sigma)) / t[:, None]

    model = FlowDenoiser(velocity)

    def error(n, **kw):
        sigmas = ka.schedules.get_sigmas_flow(n, shift=3.0).double()
        x_T = x_T_of(scale=1.0) * sigmas[0]
        return (ka.odeint(model, x_T, sigmas, method=method, disable=True, **kw)
                - exact_x0(gauss, x_T, sigmas)).abs().max().item()

    # In log σ on every step (the published algorithms) Euler's error halves exactly (0.244 → 0.122)
    # and the multistep ones fall 2.7× (ipndm) to 50× (dpmpp_3m) at 24 → 48 steps, still
    # pre-asymptotic on this grid (σ_max = 999), so 2.5× is the bar.
    # (orders lowered on the last steps).
    logs = [error(n, sigma_steps=False, lower_order_final=True) for n in (24, 48)]
    assert logs[1] < logs[0] / 2.5, logs
    # At the defaults (σ steps on the tail, ``multistep.sigma_step``, of order up to 4 from 15 steps; full
    # order to the end) the errors are smaller still and fall 16× (dpmpp_2m) to 213× (dpmpp_3m) from 24 to
    # 96 steps (before the fine-grid σ steps 4.0–65×); 2.5× stays the bar.
    errs = [error(n) for n in (24, 48, 96)]
    if method not in ("lms", "ipndm"):  # these never lower the order nor switch
        assert errs[0] <= logs[0] and errs[1] <= logs[1], (errs, logs)
    assert errs[2] < errs[0] / 2.5, errs


# --- diffusers schedulers, step for step -------------------------------------------------------------

@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"))
    return net.eval()


BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SCHEDULERS = [
    ("dpmpp_2m", {}, diffusers.DPMSolverMultistepScheduler, {}),
    ("unipc", {"order": 2}, diffusers.UniPCMultistepScheduler, {"solver_order": 2}),
    ("unipc", {"order": 3}, diffusers.UniPCMultistepScheduler, {"solver_order": 3}),
    # bh1's B(h) = −h is infinite on a step to σ = 0 (diffusers returns NaN there): end at σ_min instead
    ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": True}, diffusers.UniPCMultistepScheduler,
     {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    # DEIS ends at σ(t = 0) > 0, where our default keeps the full order: ask for diffusers' lowering
    ("deis", {"order": 3, "lower_order_final": True}, diffusers.DEISMultistepScheduler, {"solver_order": 3}),
    ("deis", {"order": 2, "lower_order_final": True}, diffusers.DEISMultistepScheduler, {"solver_order": 2}),
    ("lms", {"lower_order_final": False}, diffusers.LMSDiscreteScheduler, {}),
]


@pytest.mark.parametrize("method,kw,cls,config", SCHEDULERS)
def test_matches_diffusers_scheduler_step_for_step(unet, method, kw, cls, config):
    steps = 8  # < 15: diffusers' DPM/DEIS lower their order on the last steps, as ours do by default
    scheduler = cls(**BETAS, **config)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()  # VE σ of each timestep, then diffusers' final σ (0, or σ of t = 0)
    model = DiffusersDenoiser(unet, scheduler)
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
    theirs, states = latents, []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(theirs, t), t).sample
            theirs = scheduler.step(out, t, theirs).prev_sample
            states.append(theirs)
    vp = cls is not diffusers.LMSDiscreteScheduler  # these hold x·√ᾱ; LMS holds the VE state
    scale = lambda s: (1 + s**2) ** 0.5 if vp else 1.0  # noqa: E731
    x = latents * scale(sigmas[0].float())
    kw = {**kw, "sigma_steps": False}  # diffusers extrapolates in log σ on every step
    ours = ka.odeint(model, x, sigmas.float(), method=method, disable=True, **kw)
    # Same float32 arithmetic up to operation order (our UNet sees t recovered from σ by log-σ
    # interpolation, exact at the integer timesteps to ~1e-6): over 8 steps the measured gap is ≤ 3e-5
    # on states of size ~3; 2e-4 + 1e-4·|x| leaves several times that.
    torch.testing.assert_close(ours, theirs * scale(sigmas[-1].float()), rtol=1e-4, atol=2e-4)
    # and step for step: the split grid sigmas[:k + 2] reproduces diffusers' state after step k
    # (before its corrector, for UniPC, which corrects a state only on the next step)
    if method != "unipc":
        for k in (2, 5):
            part = ka.odeint(model, x, sigmas[:k + 2].float(), method=method, disable=True,
                             **{**kw, "lower_order_final": False})
            torch.testing.assert_close(part, states[k] * scale(sigmas[k + 1].float()), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("method,below", [("deis", 15), ("dpmpp_3m", 15), ("unipc", 15), ("lms", 0),
                                          ("ipndm", 0)])
def test_default_lower_order_final_follows_diffusers(method, below):
    """The exponential integrators lower the final orders only below 15 steps (diffusers' documented
    rule; its UniPC code lowers them on every grid: ``lower_order_final=True``); LMS (k-diffusion's)
    and iPNDM never."""
    model, x = mixture(), x_T_of(8, 2, seed=2)
    for n in (8, 14, 15, 24):
        sigmas = ka.get_sigmas_karras(n, 0.01, SIGMA_MAX).double()
        lowered = below is None or n < below
        default = ka.odeint(model, x, sigmas, method=method, disable=True)
        assert torch.equal(default, ka.odeint(model, x, sigmas, method=method, disable=True,
                                              lower_order_final=lowered)), n
        assert not torch.equal(default, ka.odeint(model, x, sigmas, method=method, disable=True,
                                                  lower_order_final=not lowered)), n


# --- k-diffusion drop-ins ------------------------------------------------------------------------

GRID_SAMPLERS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
                 "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
                 "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("name", GRID_SAMPLERS)
def test_kdiffusion_dropins_give_the_same_numbers(K, name):
    model, sigmas = mixture(), ka.get_sigmas_karras(12, 0.01, 20.0).double()
    x = x_T_of(8, 2, seed=0, scale=20.0)
    kw = {"s_churn": 1.0} if name in ("sample_euler", "sample_heun", "sample_dpm_2") else {}
    seen = {}
    for side, module in (("k", K), ("ours", sampling)):
        calls = []
        torch.manual_seed(5)  # both draw their noise (or Brownian-tree seed) from the global RNG
        out = getattr(module, name)(model, x, sigmas, None, lambda d: calls.append(d["i"]), True, **kw)
        seen[side] = out, calls
    # float64 on both sides with the same operations up to order: measured ≤ 8e-14
    torch.testing.assert_close(seen["ours"][0], seen["k"][0], rtol=1e-9, atol=1e-9)
    assert seen["ours"][1] == seen["k"][1]


@pytest.mark.parametrize("name,kw", [("sample_dpm_fast", {"n": 10}), ("sample_dpm_fast", {"n": 11, "eta": 1.0}),
                                     ("sample_dpm_adaptive", {"return_info": True}),
                                     ("sample_dpm_adaptive", {"return_info": True, "order": 2, "eta": 0.5})])
def test_kdiffusion_dpm_solver_dropins(K, name, kw):
    model, x = mixture(), x_T_of(8, 2, seed=0, scale=20.0)
    torch.manual_seed(5)
    theirs = getattr(K, name)(model, x, 0.01, 20.0, disable=True, **kw)
    torch.manual_seed(5)
    ours = getattr(sampling, name)(model, x, 0.01, 20.0, disable=True, **kw)
    if kw.get("return_info"):
        assert ours[1] == theirs[1]  # same accepted/rejected steps and NFE
        ours, theirs = ours[0], theirs[0]
    # k-diffusion keeps t = −log σ in float32 tensors, we in float64: measured ≤ 4e-5 on |x| ≤ 3
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)


def test_dpm_adaptive_counts_nfe_and_ignores_the_grid():
    model = CountingDenoiser(mixture())
    _, info = sampling.sample_dpm_adaptive(model, x_T_of(4, 2, scale=20.0), 0.01, 20.0, return_info=True,
                                           disable=True)
    assert info["nfe"] == model.calls and info["n_accept"] > 0


@pytest.mark.parametrize("name", ["sample_unipc", "sample_ipndm", "sample_deis"])
def test_our_extra_samplers_have_the_kdiffusion_signature(name):
    model, sigmas = mixture(), ka.get_sigmas_karras(10, 0.01, 20.0).double()
    x = x_T_of(4, 2, scale=20.0)
    method = name.removeprefix("sample_")
    torch.testing.assert_close(getattr(sampling, name)(model, x, sigmas, {}, None, True),
                               ka.odeint(model, x, sigmas, method=method, disable=True), rtol=0, atol=0)


def test_churn_noise_only_on_churned_steps():
    model, sigmas = mixture(), ka.get_sigmas_karras(8, 0.01, 20.0).double()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    plain = sampling.sample_euler(model, x_T_of(2, 2), sigmas, disable=True, generator=gen)
    assert torch.equal(gen.get_state(), state)  # γ = 0 everywhere: no draws
    churned = sampling.sample_euler(model, x_T_of(2, 2), sigmas, disable=True, s_churn=2.0, s_tmin=1.0,
                                    generator=gen)
    assert not torch.equal(gen.get_state(), state) and not torch.equal(plain, churned)


# --- SDE families and the Brownian tree --------------------------------------------------------------

def test_sde_solvers_at_eta0_are_the_ode_solvers(K):
    model, sigmas, x = mixture(), ka.get_sigmas_karras(12, 0.01, 20.0).double(), x_T_of(8, 2, scale=20.0)
    torch.testing.assert_close(ka.sdeint(model, x, sigmas, method="dpmpp_2m_sde", eta=0.0, disable=True),
                               ka.odeint(model, x, sigmas, method="dpmpp_2m", disable=True), rtol=1e-12, atol=1e-12)
    # our dpmpp_3m uses the exact weight 2·I₂/h² of the second difference where k-diffusion's 3M (and
    # so its 3m_sde at η = 0, which ours reproduces) has half of it: order 3 instead of ≈ 2 (see docs)
    torch.testing.assert_close(ka.sdeint(model, x, sigmas, method="dpmpp_3m_sde", eta=0.0, disable=True),
                               K.sample_dpmpp_3m_sde(model, x, sigmas, eta=0.0, disable=True), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # 6–20 s each (machine load): torchsde answers each Brownian-tree query by bisection
@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_brownian_tree_sde_converges_as_steps_grow(method):
    model = gaussian64()
    x_T = x_T_of(6)
    run = lambda n, seed: ka.sdeint(model, x_T, ka.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double(),  # noqa: E731
                                    method=method, generator=generators(range(seed, seed + 6)), disable=True)
    coarse, fine, other = run(50, 0), run(200, 0), run(200, 100)
    same_path = (coarse - fine).norm(dim=1).mean().item()
    new_noise = (other - fine).norm(dim=1).mean().item()
    # the same Brownian path at 50 and 200 steps differs by discretisation error only, fresh noise by
    # the data spread (≈ 1.4 for two draws of N(μ, 0.7² I₃)): 0.15 of that separates the two regimes
    assert same_path < 0.15 * new_noise, (same_path, new_noise)


def test_brownian_tree_per_item_seeds_make_items_batch_independent():
    model, sigmas, x = mixture(), ka.get_sigmas_karras(10, 0.01, 20.0).double(), x_T_of(3, 2, scale=20.0)
    together = ka.sdeint(model, x, sigmas, method="dpmpp_2m_sde", generator=generators([1, 2, 3]), disable=True)
    alone = ka.sdeint(model, x[2:], sigmas, method="dpmpp_2m_sde", generator=generators([3]), disable=True)
    torch.testing.assert_close(together[2:], alone, rtol=1e-12, atol=1e-12)


# --- split grids ------------------------------------------------------------------------------------

@given(k=st.integers(2, 10), method=st.sampled_from(list(sampling.FIXED_METHODS)))
def test_split_grids_compose_for_one_step_methods(k, method):
    model, sigmas, x = mixture(), ka.get_sigmas_karras(11, 0.01, 20.0).double(), x_T_of(4, 2, scale=20.0)
    half = ka.odeint(model, x, sigmas[:k], method=method, disable=True)
    torch.testing.assert_close(ka.odeint(model, half, sigmas[k - 1:], method=method, disable=True),
                               ka.odeint(model, x, sigmas, method=method, disable=True), rtol=1e-12, atol=1e-12)


def test_split_grids_compose_for_sdeint_with_one_generator():
    model, sigmas, x = mixture(), ka.get_sigmas_karras(11, 0.01, 20.0).double(), x_T_of(4, 2, scale=20.0)
    gen = torch.Generator().manual_seed(0)
    half = ka.sdeint(model, x, sigmas[:6], generator=gen, disable=True)
    two = ka.sdeint(model, half, sigmas[5:], generator=gen, disable=True)
    torch.testing.assert_close(two, ka.sdeint(model, x, sigmas, generator=torch.Generator().manual_seed(0),
                                              disable=True), rtol=1e-12, atol=1e-12)


ONE_STEP_SDES = ("ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")


@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("method", ONE_STEP_SDES)
def test_split_grids_compose_bit_for_bit_for_one_step_sdes(method, per_item):
    """One generator (or one per item) through two calls gives the whole grid's sample bit for bit,
    Brownian-tree methods included, and leaves the generator where one whole run leaves it."""
    model, sigmas, x = mixture(), ka.get_sigmas_karras(11, 0.01, 20.0).double(), x_T_of(4, 2, scale=20.0)
    gen = lambda: generators([7, 8, 9, 10]) if per_item else torch.Generator().manual_seed(7)  # noqa: E731
    run = lambda x, s, g: ka.sdeint(model, x, s, method=method, generator=g, disable=True)  # noqa: E731
    g_split, g_whole = gen(), gen()
    states = lambda g: [h.get_state() for h in (g if per_item else [g])]  # noqa: E731
    first = run(x, sigmas[:5], g_split)
    if method in sampling.BROWNIAN_METHODS:  # the tree's seed is read, not drawn, before σ = 0
        assert all(torch.equal(a, b) for a, b in zip(states(g_split), states(g_whole)))
    two = run(first, sigmas[4:], g_split)
    whole = run(x, sigmas, g_whole)
    assert torch.equal(two, whole)
    assert all(torch.equal(a, b) for a, b in zip(states(g_split), states(g_whole)))
    # the generator moved on: the next whole run from it is a different sample
    assert (run(x, sigmas, g_whole) - whole).abs().max() > 0.1


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_split_grids_compose_for_multistep_sdes_within_discretisation_error(method):
    """Same Brownian path in both parts; only the restarted history differs from the whole run."""
    model, x = gaussian64(), x_T_of(16)
    sigmas = ka.get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX).double()
    run = lambda x, s, seed: ka.sdeint(model, x, s, method=method, disable=True,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    whole, other = run(x, sigmas, 0), run(x, sigmas, 1)
    two = run(run(x, sigmas[:20], 0), sigmas[19:], 0)
    fine = ka.sdeint(model, x, ka.get_sigmas_karras(160, SIGMA_MIN, SIGMA_MAX).double(), method=method,
                     disable=True, generator=torch.Generator().manual_seed(0))
    split_gap, error = (two - whole).norm(dim=1).mean(), (whole - fine).norm(dim=1).mean()
    # the split differs from the whole run by less than one run's discretisation error (measured against
    # 4× the steps on the same path: gap 0.06–0.14× the error), and that error is far below what a fresh
    # path moves the sample (1.6, the data spread; error 0.03–0.04)
    assert split_gap < error < 0.1 * (other - whole).norm(dim=1).mean(), (split_gap, error)


DRAW_FREE_AT_ETA0 = [("sample_dpm_2_ancestral", None), ("sample_dpmpp_2s_ancestral", None),
                     ("sdeint", "dpm2_ancestral"), ("sdeint", "dpmpp_2s_ancestral"), ("sdeint", "dpmpp_sde"),
                     ("sdeint", "dpmpp_2m_sde"), ("sdeint", "dpmpp_3m_sde"), ("sdeint", "ancestral")]


@pytest.mark.parametrize("name,method", DRAW_FREE_AT_ETA0)
def test_deterministic_steps_draw_nothing(name, method):
    """At η = 0 the generator's state is unchanged, and the sample is the deterministic solver's."""
    model, sigmas, x = mixture(), ka.get_sigmas_karras(10, 0.01, 20.0).double(), x_T_of(4, 2, scale=20.0)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    kw = {"method": method} if method else {}
    out = getattr(sampling, name)(model, x, sigmas, eta=0.0, generator=gen, disable=True, **kw)
    assert torch.equal(gen.get_state(), state)
    method = method or name.removeprefix("sample_").replace("dpm_2", "dpm2")
    # the η = 0 forms are ODE solvers: DDIM = Euler, DPM-2 ancestral = dpm2 (midpoint in log σ),
    # DPM-Solver++ SDE with r = 1/2 = DPM-Solver++(2S), 2M/3M SDE = the 2M ODE / k-diffusion's 3M
    ode = {"ancestral": lambda: ka.odeint(model, x, sigmas, method="euler", disable=True),
           "dpm2_ancestral": lambda: ka.odeint(model, x, sigmas, method="dpm2", disable=True),
           "dpmpp_sde": lambda: ka.sdeint(model, x, sigmas, method="dpmpp_2s_ancestral", eta=0.0, disable=True),
           "dpmpp_2m_sde": lambda: ka.odeint(model, x, sigmas, method="dpmpp_2m", disable=True)}
    if method in ode:  # same operations up to order, float64: round-off only
        torch.testing.assert_close(out, ode[method](), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", sampling.MULTISTEP_METHODS + ("dopri5",))
def test_split_grids_compose_for_multistep_within_discretisation_error(method):
    """The second half restarts the warm-up, so the composition differs from one run, but by no more
    than a few times one run's own error against the exact flow."""
    model, sigmas, x_T = gaussian64(), ka.get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX).double(), x_T_of()
    one = ka.odeint(model, x_T, sigmas, method=method, disable=True)
    two = ka.odeint(model, ka.odeint(model, x_T, sigmas[:20], method=method, disable=True), sigmas[19:],
                    method=method, disable=True)
    assert sigmas[:20][-1] > 0
    error = (one - exact_x0(model, x_T, sigmas)).abs().max().item()
    # measured: the restarted warm-up (first order at σ ≈ 1) adds 1.1–1.6× one run's error, 3.5× for
    # deis, whose own error is the smallest (1.6e-3)
    assert (two - one).abs().max().item() <= 4 * max(error, 1e-6), error


# --- log-likelihood ----------------------------------------------------------------------------------

def test_log_likelihood_exact_trace_matches_closed_form():
    # zero-mean data so the N(0, σ_max²) prior differs from the true marginal only by s²/σ_max² ≈ 1e-6
    model = GaussianDenoiser(torch.zeros(3), torch.tensor([0.5, 1.0, 2.0])).double()
    x = model.sample(6, torch.Generator().manual_seed(0)).double()
    ll, info = ka.sampling.log_likelihood(model, x, 0.01, 500.0, exact_trace=True, atol=1e-8, rtol=1e-8)
    # dopri5 at 1e-8 tolerances: the measured error is ~1e-6 relative, well inside 1e-4
    torch.testing.assert_close(ll, model.log_prob(x, 0.01), rtol=1e-4, atol=0)
    assert info["nfe"] > 0


def test_log_likelihood_hutchinson_within_a_few_percent():
    model = mixture()
    x = model.sample(4, torch.Generator().manual_seed(1)).double().repeat_interleave(64, 0)
    ll, _ = ka.sampling.log_likelihood(model, x, 0.01, 200.0, generator=torch.Generator().manual_seed(2))
    mean = ll.view(4, 64).mean(1)
    exact = model.log_prob(x[::64], 0.01)
    # 64 Rademacher probes per point: the spread of the estimate is measured at ~0.3 per probe, so the
    # mean's is ~0.04; with |log p| ≈ 2–4 a 5% tolerance is several standard errors
    torch.testing.assert_close(mean, exact, rtol=0.05, atol=0.1)


# --- properties over grids, bad input ------------------------------------------------------------------

@given(sigmas=sigma_schedules(max_steps=20), method=st.sampled_from(list(sampling.MULTISTEP_METHODS)),
       problem=gaussian_problems())
def test_multistep_batch_invariant_and_finite_on_random_grids(sigmas, method, problem):
    mean, std, batch, seed = problem
    model = GaussianDenoiser(mean, std).double()
    x_T = torch.randn(batch, *mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_T = x_T * float(sigmas[0])
    together = ka.odeint(model, x_T, sigmas.double(), method=method, disable=True)
    alone = torch.cat([ka.odeint(model, x_T[i:i + 1], sigmas.double(), method=method, disable=True)
                       for i in range(batch)])
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together, alone)


@given(sigmas=sigma_schedules(max_steps=20), seed=seeds)
def test_dpmpp_2m_is_exact_on_a_point_mass(sigmas, seed):
    """For data at a single point D is constant, and an exponential integrator is exact on any grid."""
    model = GaussianDenoiser(torch.tensor([1.5, -0.5]), 1e-9).double()  # D constant to ~1e-18·|x|/σ²
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * float(sigmas[0])
    for method in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        out = ka.odeint(model, x_T, sigmas.double(), method=method, disable=True)
        torch.testing.assert_close(out, model.mean.expand(3, 2).double(), rtol=0, atol=1e-6)


def test_bad_solver_options_rejected():
    model, sigmas = mixture(), ka.get_sigmas_karras(4, 0.1, 1.0).double()
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="order must be an integer in 1..2 for dpmpp_2m"):
        ka.odeint(model, x, sigmas, method="dpmpp_2m", order=3, disable=True)
    with pytest.raises(ValueError, match="variant must be one of bh1, bh2"):
        ka.odeint(model, x, sigmas, method="unipc", variant="bh3", disable=True)
    with pytest.raises(TypeError, match="order only apply to the multistep methods"):
        ka.odeint(model, x, sigmas, method="heun", order=2, disable=True)
    with pytest.raises(ValueError, match="method must be one of ancestral"):
        ka.sdeint(model, x, sigmas, method="dpmpp_2m", disable=True)
    with pytest.raises(ValueError, match="solver_type must be one of midpoint, heun"):
        ka.sdeint(model, x, sigmas, method="dpmpp_2m_sde", solver_type="rk", disable=True)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        ka.odeint(model, x, torch.tensor([1.0, -0.5], dtype=torch.float64), disable=True)
    with pytest.raises(ValueError, match="seed is a list of 1 seeds"):
        sampling.BrownianTreeNoiseSampler(torch.zeros(2, 2), 0.1, 1.0, seed=[1])
    with pytest.raises(ValueError, match="sigma_min and sigma_max must be > 0"):
        sampling.sample_dpm_fast(model, x, 0.0, 1.0, 6)


# --- alignment methods use the solvers ---------------------------------------------------------------

def test_demon_tail_and_rollouts_use_the_chosen_method():
    from kdiff_align.align.demon import sample_demon
    model, sigmas = mixture(), ka.get_sigmas_karras(8, 0.01, 20.0).double()
    x = x_T_of(2, 2, scale=20.0)
    reward = lambda x0: -x0[:, 0]  # noqa: E731
    calls = {}
    for method in ("heun", "dpmpp_2m"):
        _, info = sample_demon(model, x, sigmas, reward, K=3, ode_after=1.0, r_of_c="baseline", c_steps=3,
                               generator=generators([0, 1]), return_info=True, disable=True, method=method)
        calls[method] = info["nfe"]["network_calls"]
        steps, tail = info["demon_steps"], len(sigmas) - 1 - info["demon_steps"]
    assert 0 < steps and tail > 1
    # the m-step tail costs 2m − 1 Heun calls and m with dpmpp_2m; each baseline rollout of n steps
    # 2n − 1 calls against n: the multistep run is strictly cheaper by at least the tail's m − 1
    assert calls["heun"] - calls["dpmpp_2m"] >= tail - 1, calls
    with pytest.raises(ValueError, match="method must be one of"):
        sample_demon(model, x, sigmas, reward, K=2, method="dpmpp_9m", disable=True)


def test_newton_outer_sampler_can_be_multistep():
    from kdiff_align.align.newton import sample_constrained
    model, sigmas = mixture(), ka.get_sigmas_karras(8, 0.01, 20.0).double()
    x = x_T_of(3, 2, scale=20.0)
    # zero Newton iterations: no constraint step, so the sampler alone must reproduce odeint (a window
    # selecting no step is an error since issue 23)
    out, info = sample_constrained(model, x, sigmas, lambda x0: torch.zeros_like(x0), sampler="dpmpp_2m",
                                   n_iter=0, return_info=True, disable=True)
    torch.testing.assert_close(out, ka.odeint(model, x, sigmas, method="dpmpp_2m", disable=True),
                               rtol=1e-12, atol=1e-12)
    assert info["nfe"]["forward"] == info["nfe"]["total"] == len(sigmas) - 1


@pytest.mark.parametrize("method", sampling.SDE_METHODS[1:])
def test_every_sde_method_is_seeded_and_lands_near_the_data(method):
    model, sigmas = mixture(), ka.get_sigmas_karras(30, 0.01, 20.0).double()
    x = x_T_of(64, 2, scale=20.0)
    runs = [ka.sdeint(model, x, sigmas, method=method, generator=torch.Generator().manual_seed(3), disable=True)
            for _ in range(2)]
    assert torch.equal(*runs)
    # every sample ends within a few component widths of a mode: log p > −10 (a point 3 widths from the
    # nearer mode has log p ≈ −6; x_T itself, at ~20 from both, has log p < −200)
    assert (model.log_prob(runs[0]) > -10).all()


@pytest.mark.parametrize("method", ["dpmpp_2m", "unipc", "deis"])
def test_oderevert_with_multistep_inverts_odeint(method):
    model, sigmas = gaussian64(2), ka.get_sigmas_karras(64, 1e-3, 20.0).double()
    x_T = x_T_of(16, 2, seed=6, scale=20.0)
    x0 = ka.odeint(model, x_T, sigmas, method=method, disable=True)
    back = ka.oderevert(model, x0, ka.revert_sigmas(sigmas), method=method, disable=True)
    # as for the one-step methods in test_sampling: discretisation plus the σ_min·ε end effect
    assert ((back - x_T).abs().max() / 20).item() < 2e-3
