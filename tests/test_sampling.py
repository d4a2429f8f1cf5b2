import pytest
import torch
from hypothesis import given, strategies as st

import kdiff_align as ka
from kdiff_align import sampling
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser
from kdiff_align.utils import generators, to_d
from strategies import gaussian_problems, mixture_denoisers, seeds

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian64(dim=3, std=0.7):
    model = GaussianDenoiser(torch.linspace(-1, 2, dim), std).double()
    return model


def exact_x0(model, x_T, sigmas):
    """Exact flow to σ_min followed by the samplers' own final Euler step x = D(x, σ_min)."""
    x_min = model.flow(x_T, sigmas[0].double(), sigmas[-2].double())
    return model(x_min, sigmas[-2].double().expand(x_T.shape[0]))


def mixture():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5]])
    return MixtureDenoiser(means, torch.tensor([0.4, 0.6]), torch.tensor([0.7, 0.3]))


# Tolerances: max abs errors measured at 32 Karras steps (σ 0.002..80, float64, |x_T| ~ 80) were
# euler 0.18, heun 0.031, dpm2 0.018, rk4 1.6e-4, dopri5 4.2e-4, bosh3 2.2e-3, adaptive_heun 4.0e-4
# (rtol = atol = 1e-4), lms 0.015, dpmpp_2m 0.034, dpmpp_3m 0.0094, unipc 0.0055, ipndm 0.011, deis 0.0023;
# the bounds are about 3x those.
TOLERANCES = {"euler": 0.6, "heun": 0.1, "dpm2": 0.06, "rk4": 5e-4, "dopri5": 1.5e-3, "bosh3": 7e-3,
              "adaptive_heun": 1.5e-3, "lms": 0.05, "dpmpp_2m": 0.1, "dpmpp_3m": 0.03, "unipc": 0.02,
              "ipndm": 0.035, "deis": 0.007}


@pytest.mark.parametrize("method", ka.sampling.METHODS)
def test_odeint_matches_closed_form_gaussian_flow(method):
    model = gaussian64()
    sigmas = ka.get_sigmas_karras(32, SIGMA_MIN, SIGMA_MAX).double()
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    x0 = ka.odeint(model, x_T, sigmas, method=method, disable=True)
    err = (x0 - exact_x0(model, x_T, sigmas)).abs().max().item()
    assert err < TOLERANCES[method], f"{method}: {err}"


@pytest.mark.parametrize("method", list(ka.sampling.ADAPTIVE_METHODS))
def test_adaptive_tolerance_controls_error(method):
    model = gaussian64()
    sigmas = ka.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX).double()
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    errs = [(ka.odeint(model, x_T, sigmas, method=method, rtol=tol, atol=tol, disable=True)
             - exact_x0(model, x_T, sigmas)).abs().max().item() for tol in (1e-3, 1e-7)]
    assert errs[1] < errs[0] / 10, errs


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("dpm2", 2), ("rk4", 4)])
def test_fixed_grid_convergence_order(method, order):
    model = gaussian64()
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * SIGMA_MAX
    errs = []
    for n in (16, 32):
        sigmas = ka.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double()
        errs.append((ka.odeint(model, x_T, sigmas, method=method, disable=True) - exact_x0(model, x_T, sigmas))
                    .abs().max().item())
    ratio = errs[0] / errs[1]
    # doubling the steps divides the error by about 2**order; allow a third of an order of slack
    assert 2 ** (order - 0.35) < ratio < 2 ** (order + 0.6), (errs, ratio)


def kdiffusion_reference(model, x, sigmas, heun):
    """A sampler written to the k-diffusion contract (sample_euler / sample_heun with s_churn = 0)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i] * s_in, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if not heun or sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1] * s_in, model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_grid_equals_kdiffusion_contract_loop(method):
    model = mixture()
    sigmas = ka.get_sigmas_karras(12, 0.01, 20.0)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2)) * 20
    torch.testing.assert_close(ka.odeint(model, x_T, sigmas, method=method, disable=True),
                               kdiffusion_reference(model, x_T, sigmas, method == "heun"), rtol=1e-5, atol=1e-5)


def test_sdeint_eta0_equals_euler_odeint():
    model = mixture()
    sigmas = ka.get_sigmas_karras(15, 0.01, 20.0)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(3)) * 20
    torch.testing.assert_close(ka.sdeint(model, x_T, sigmas, eta=0.0, disable=True),
                               ka.odeint(model, x_T, sigmas, method="euler", disable=True), rtol=0, atol=0)


def test_beta_sde_at_beta0_is_heun_odeint():
    model = mixture()
    sigmas = ka.get_sigmas_karras(15, 0.01, 20.0)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(4)) * 20
    torch.testing.assert_close(ka.sdeint(model, x_T, sigmas, beta=0.0, disable=True),
                               ka.odeint(model, x_T, sigmas, method="heun", disable=True))


def test_sdeint_draws_no_noise_when_deterministic():
    model = mixture()
    sigmas = ka.get_sigmas_karras(5, 0.01, 20.0)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    ka.sdeint(model, torch.zeros(4, 2), sigmas, eta=0.0, generator=gen, disable=True)
    ka.sdeint(model, torch.zeros(4, 2), sigmas, beta=0.0, generator=gen, disable=True)
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("method", ["heun", "rk4", "dopri5"])
@pytest.mark.parametrize("which", ["gaussian", "mixture"])
def test_oderevert_inverts_odeint(method, which):
    model = gaussian64(2) if which == "gaussian" else mixture().double()
    sigmas = ka.get_sigmas_karras(64, 1e-3, 20.0).double()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 20
    x0 = ka.odeint(model, x_T, sigmas, method=method, disable=True)
    back = ka.oderevert(model, x0, ka.revert_sigmas(sigmas), method=method, disable=True)
    # relative to the noise scale: discretisation plus the σ_min·ε end effect (σ_min = 1e-3)
    assert ((back - x_T).abs().max() / 20).item() < 2e-3


@given(problem=gaussian_problems(), method=st.sampled_from(["euler", "heun", "dpm2"]))
def test_batch_invariance_fixed_grid(problem, method):
    mean, std, batch, seed = problem
    model = GaussianDenoiser(mean, std)
    sigmas = ka.get_sigmas_karras(6, 0.01, 10.0)
    x_T = torch.randn(batch, *mean.shape, generator=torch.Generator().manual_seed(seed)) * 10
    together = ka.odeint(model, x_T, sigmas, method=method, disable=True)
    alone = torch.cat([ka.odeint(model, x_T[i:i + 1], sigmas, method=method, disable=True) for i in range(batch)])
    torch.testing.assert_close(together, alone)


@given(seed=seeds, batch=st.integers(2, 5), beta=st.sampled_from([None, 0.3]))
def test_sdeint_per_item_generators_make_items_batch_independent(seed, batch, beta):
    model = mixture()
    sigmas = ka.get_sigmas_karras(5, 0.01, 10.0)
    x_T = torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed)) * 10
    item_seeds = [seed + i for i in range(batch)]
    together = ka.sdeint(model, x_T, sigmas, generator=generators(item_seeds), beta=beta, disable=True)
    last = ka.sdeint(model, x_T[-1:], sigmas, generator=generators(item_seeds[-1:]), beta=beta, disable=True)
    torch.testing.assert_close(together[-1:], last)


@pytest.mark.parametrize("beta", [None, 0.5, "anderson"])
def test_sdeint_seeded_reproducible(beta):
    model = mixture()
    sigmas = ka.get_sigmas_karras(8, 0.01, 10.0)
    runs = [ka.sdeint(model, torch.ones(8, 2) * 3, sigmas, beta=beta, disable=True,
                      generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)
    other = ka.sdeint(model, torch.ones(8, 2) * 3, sigmas, beta=beta, disable=True,
                      generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_noise_sampler_is_used():
    model = mixture()
    sigmas = ka.get_sigmas_karras(4, 0.01, 10.0)
    calls = []
    sampler = lambda s, s_next: calls.append((float(s), float(s_next))) or torch.zeros(3, 2)  # noqa: E731
    ka.sdeint(model, torch.ones(3, 2), sigmas, noise_sampler=sampler, disable=True)
    assert len(calls) == 3  # no noise on the last step to 0


@pytest.mark.parametrize("method,nfe", [("euler", 1), ("heun", 2), ("dpm2", 2), ("rk4", 4)])
def test_nfe_per_step_and_callback(method, nfe):
    model = CountingDenoiser(mixture())
    sigmas = ka.get_sigmas_karras(6, 0.01, 10.0)
    seen = []
    ka.odeint(model, torch.ones(2, 2), sigmas, method=method, callback=seen.append, disable=True)
    # every step to σ > 0 costs `nfe` evaluations; the last step to 0 costs one
    assert model.calls == 5 * nfe + 1
    assert [d["i"] for d in seen] == list(range(6))
    assert all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen)


def test_adaptive_callback_and_progress():
    model = CountingDenoiser(mixture())
    seen = []
    ka.odeint(model, torch.ones(2, 2) * 5, ka.get_sigmas_karras(10, 0.01, 10.0), method="dopri5",
              callback=seen.append, disable=True)
    assert seen and all(d["denoised"] is not None for d in seen)
    assert seen[-1]["sigma"] == pytest.approx(0.01)


def test_ode_step_accepts_float_and_tensor_sigma():
    model = mixture()
    x = torch.randn(3, 2)
    a, _ = ka.ode_step(model, x, 2.0, 1.0)
    b, _ = ka.ode_step(model, x, torch.full((3,), 2.0), torch.full((3,), 1.0))
    torch.testing.assert_close(a, b)


def test_sde_step_last_step_returns_denoised():
    model = mixture()
    x = torch.randn(3, 2)
    x_next, denoised = ka.sde_step(model, x, 0.5, 0.0, beta=0.2)
    assert torch.equal(x_next, denoised)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddpm", "beta"])
def test_sde_reproduces_mixture_law(kind):
    """Many-step ancestral/β-SDE sampling matches the mixture's mean, covariance and mode weights."""
    model = mixture()
    n = 20_000
    sigmas = ka.get_sigmas_karras(200, 0.002, 40.0)
    gen = torch.Generator().manual_seed(9)
    x_T = torch.randn(n, 2, generator=gen) * 40
    kw = {"beta": 1.0} if kind == "beta" else {"eta": 1.0}
    x0 = ka.sdeint(model, x_T, sigmas, generator=gen, disable=True, **kw)
    data = model.sample(200_000, torch.Generator().manual_seed(10))
    # Monte-Carlo standard errors at n = 20k: mode weight sqrt(.21/20000) ≈ 0.0032, means ≈ 0.014
    # (marginal std ≈ 1.9); tolerances are ~4 SE plus a small discretisation allowance.
    weights = torch.bincount(model.classify(x0), minlength=2).float() / n
    torch.testing.assert_close(weights, torch.tensor([0.7, 0.3]), atol=0.02, rtol=0)
    torch.testing.assert_close(x0.mean(0), data.mean(0), atol=0.07, rtol=0)
    torch.testing.assert_close(torch.cov(x0.T), torch.cov(data.T), atol=0.15, rtol=0.05)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    (torch.tensor([2.0, -1.0]), "must be positive"),
    (torch.tensor([2.0]), "at least 2"),
    (torch.tensor([[2.0, 0.0]]), "1-D"),
    (torch.tensor([2.0, float("nan"), 0.0]), "finite"),
])
def test_bad_sigmas_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        ka.odeint(mixture(), torch.zeros(1, 2), bad, disable=True)
    with pytest.raises(ValueError, match=match):
        ka.sdeint(mixture(), torch.zeros(1, 2), bad, disable=True)


def test_oderevert_needs_increasing_positive_sigmas():
    with pytest.raises(ValueError, match="strictly increasing"):
        ka.oderevert(mixture(), torch.zeros(1, 2), torch.tensor([2.0, 1.0]), disable=True)
    with pytest.raises(ValueError, match="> 0"):
        ka.oderevert(mixture(), torch.zeros(1, 2), torch.tensor([0.0, 1.0]), disable=True)


def test_nan_input_and_unknown_method_rejected():
    sigmas = ka.get_sigmas_karras(3, 0.1, 1.0)
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        ka.odeint(mixture(), torch.tensor([[0.0, float("nan")]]), sigmas, disable=True)
    with pytest.raises(ValueError, match="euler, heun, dpm2, rk4, lms, dpmpp_2m, dpmpp_3m, unipc, ipndm, deis, dopri5"):
        ka.odeint(mixture(), torch.zeros(1, 2), sigmas, method="dpmpp_9m", disable=True)
    with pytest.raises(ValueError, match="sigma must be a float or a"):
        ka.ode_step(mixture(), torch.zeros(2, 2), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="generator is a list of 1"):
        ka.sdeint(mixture(), torch.zeros(2, 2), sigmas, generator=generators([0]), disable=True)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        ka.sdeint(mixture(), torch.zeros(2, 2), sigmas, beta=-1.0, disable=True)


def test_beta_sde_warns_on_unstable_steps():
    with pytest.warns(UserWarning, match="β·|Δσ| > 4"):
        ka.sdeint(mixture(), torch.ones(2, 2), ka.get_sigmas_karras(5, 0.01, 20.0), beta=1.0, disable=True,
                  generator=torch.Generator().manual_seed(0))


@given(model=mixture_denoisers(), seed=seeds)
def test_euler_sdeint_eta0_agree_on_random_mixtures(model, seed):
    sigmas = ka.get_sigmas_karras(6, 0.01, 10.0)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed)) * 10
    out = ka.odeint(model, x_T, sigmas, method="euler", disable=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(ka.sdeint(model, x_T, sigmas, eta=0.0, disable=True), out, rtol=0, atol=0)
