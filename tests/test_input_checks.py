"""Inputs that used to give NaN, a no-op or a shape change now fail early (issue 23, point 2): each
raises ValueError/TypeError naming the argument, before the network is called."""
import math

import pytest
import torch

import kdiff_align as ka
from kdiff_align.align import demon, dps, guidance, newton, smc
from kdiff_align.cond import cfg_denoiser
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser
from tiny import toy_pipeline

SIGMAS = ka.get_sigmas_karras(4, 0.02, 20.0)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_non_finite_cfg_weight_rejected(weight):
    pipe = toy_pipeline()
    with pytest.raises(ValueError, match=r"condition\['cfgs'\] must be finite"):
        pipe.odeint(torch.randn(2, 1, 4, 4), {"prompts": ["bag"], "cfgs": [weight]}, 3, disable=True)
    assert pipe.denoiser.calls == 0
    with pytest.raises(ValueError, match="weights must be finite"):
        cfg_denoiser(pipe.denoiser, [{"offset": torch.ones(1, 1)}], {"offset": torch.zeros(1, 1)}, [weight])


def test_conditions_must_match_the_batch():
    pipe = toy_pipeline()
    with pytest.raises(ValueError, match="condition is a list of 3 dicts but the batch has 4 items"):
        pipe.odeint(torch.randn(4, 1, 4, 4), [{"prompts": ["bag"], "cfgs": [2.0]}] * 3, 3, disable=True)
    assert pipe.denoiser.calls == 0
    # a guided denoiser built without the batch names both when it is called with another batch
    with pytest.raises(ValueError, match=r"weights has 3 rows \(one per condition.*x has batch 4"):
        pipe.guided([{"prompts": ["bag"], "cfgs": [2.0]}] * 3)(torch.randn(4, 1, 4, 4), torch.ones(4))


def test_nan_reward_stops_reward_guidance():
    model = GaussianDenoiser(torch.zeros(3), 1.0)
    guided = guidance.reward_guided_denoiser(model, lambda x0: x0.sum(1) * math.nan, 1.0)
    with pytest.raises(ValueError, match="reward returned 2 NaN or infinite values of 2"):
        ka.odeint(guided, torch.randn(2, 3), SIGMAS, disable=True)


@pytest.mark.parametrize("window,error,match", [
    ((20.0, 0.02), ValueError, "window=.*sigma_lo <= sigma_hi"),
    ((100.0, 200.0), ValueError, "window=.*selects no step of sigmas"),
    (lambda sigma: False, ValueError, "window=.*selects no step of sigmas"),
    ("late", TypeError, "window must be None"),
])
def test_newton_window_must_select_a_step(window, error, match):
    model = CountingDenoiser(GaussianDenoiser(torch.zeros(4), 1.0))
    residual = newton.linear_residual(newton.Mask(torch.ones(4)), torch.zeros(1, 4))
    with pytest.raises(error, match=match):
        newton.sample_constrained(model, torch.randn(2, 4), SIGMAS, residual, window=window, disable=True)
    assert model.calls == 0


@pytest.mark.parametrize("lr", ["abc", None, [0.5, "x"]])
def test_newton_lr_type_rejected(lr):
    model = CountingDenoiser(GaussianDenoiser(torch.zeros(4), 1.0))
    residual = newton.linear_residual(newton.Mask(torch.ones(4)), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="lr must be a number, a .start, end. tuple"):
        newton.sample_constrained(model, torch.randn(2, 4), SIGMAS, residual, lr=lr, disable=True)
    assert model.calls == 0


def test_mask_must_broadcast_to_x():
    model = GaussianDenoiser(torch.zeros(1, 4, 4), 1.0)
    residual = newton.linear_residual(newton.Mask(torch.ones(1, 1, 3, 3)), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 3, 3\) does not broadcast to x of shape \(2, 1, 4"):
        newton.sample_constrained(model, torch.randn(2, 1, 4, 4), SIGMAS, residual, disable=True)


@pytest.mark.parametrize("value", [2.0, -0.5, math.nan])
def test_mask_values_must_lie_in_unit_interval(value):
    mask = torch.ones(1, 4)
    mask[0, 1] = value
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        newton.Mask(mask)


def test_measurement_batch_must_match_x():
    model = GaussianDenoiser(torch.zeros(4), 1.0)
    residual = newton.linear_residual(newton.Mask(torch.ones(4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"y of shape \(3, 4\) does not match A x̂₀ of shape \(4, 4\): y's batch"):
        newton.sample_constrained(model, torch.randn(4, 4), SIGMAS, residual, disable=True)


def test_integer_x_rejected():
    model = CountingDenoiser(GaussianDenoiser(torch.zeros(2), 1.0))
    x = torch.tensor([[3, 4]])
    for run in (lambda: ka.odeint(model, x, SIGMAS, disable=True), lambda: ka.sdeint(model, x, SIGMAS, disable=True),
                lambda: ka.oderevert(model, x, ka.revert_sigmas(SIGMAS), disable=True)):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
            run()
    assert model.calls == 0


RUNS_1D = [("odeint", {"method": "heun"}), ("odeint", {"method": "dpmpp_2m"}), ("odeint", {"method": "dopri5"}),
           ("sdeint", {"method": "ancestral"}), ("sdeint", {"method": "dpmpp_2m_sde"}),
           ("sdeint", {"beta": 0.1}), ("oderevert", {"method": "heun"})]


@pytest.mark.parametrize("name,kw", RUNS_1D)
def test_1d_x_is_a_batch_of_scalars(name, kw):
    """A 1-D x is B items of shape (): the output keeps x's shape and equals the [B, 1] run."""
    model, x = GaussianDenoiser(torch.tensor(0.5), 0.7), torch.randn(5, generator=torch.Generator().manual_seed(0))
    sigmas = ka.revert_sigmas(SIGMAS) if name == "oderevert" else SIGMAS
    run = lambda x: getattr(ka, name)(model, x, sigmas, disable=True,  # noqa: E731
                                      **({"generator": torch.Generator().manual_seed(1)} if name == "sdeint" else {}),
                                      **kw)
    out = run(x)
    assert out.shape == x.shape
    # the same operations on a [B, 1] view; adaptive step control sees the same RMS error norm
    torch.testing.assert_close(out, run(x[:, None])[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["odeint", "sdeint", "oderevert"])
def test_denoiser_changing_the_shape_rejected(name):
    """A mixture of 1-D items given a 1-D x used to broadcast the state to [2, 2] ([1, 2] for sdeint)."""
    model = MixtureDenoiser(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    sigmas = ka.revert_sigmas(SIGMAS) if name == "oderevert" else SIGMAS
    with pytest.raises(ValueError, match=r"model returned x̂₀ of shape \(.*\) for x of shape \(2,\)"):
        getattr(ka, name)(model, torch.randn(2), sigmas, disable=True)


@pytest.mark.parametrize("beta,error,match", [("abc", TypeError, "beta must be a number >= 0, 'anderson' or a"),
                                              (math.nan, ValueError, "beta must be >= 0 and finite"),
                                              (-1.0, ValueError, "beta must be >= 0")])
def test_sdeint_beta_checked_first(beta, error, match):
    model = CountingDenoiser(GaussianDenoiser(torch.zeros(2), 1.0))
    with pytest.raises(error, match=match):
        ka.sdeint(model, torch.randn(2, 2), SIGMAS, beta=beta, disable=True)
    assert model.calls == 0


@pytest.mark.parametrize("eta,error", [("1", TypeError), (math.nan, ValueError), (-0.5, ValueError)])
def test_sdeint_eta_checked_first(eta, error):
    with pytest.raises(error, match="eta must be"):
        ka.sdeint(GaussianDenoiser(torch.zeros(2), 1.0), torch.randn(2, 2), SIGMAS, eta=eta, disable=True)


def test_integer_seed_as_generator_rejected():
    model = CountingDenoiser(GaussianDenoiser(torch.zeros(2), 1.0))
    hint = r"generator must be None, a torch.Generator .* got int \(for a seed use torch.Generator\(\).manual_seed"
    with pytest.raises(TypeError, match=hint):
        smc.sample_smc(model, torch.randn(1, 4, 2), SIGMAS, lambda x0: x0.sum(1), num_particles=4, generator=0,
                       disable=True)
    with pytest.raises(TypeError, match=hint):
        ka.sdeint(model, torch.randn(2, 2), SIGMAS, generator=0, disable=True)
    assert model.calls == 0


def test_sigmas_may_end_above_zero_only_where_documented():
    """odeint/sdeint accept a split grid (ending above 0) and return the state there; the alignment
    samplers, which return x̂₀, need the final 0 (docs/concepts.md, "Sigmas")."""
    model, x = GaussianDenoiser(torch.zeros(2), 1.0), torch.randn(3, 2)
    split = SIGMAS[:-1]
    assert split[-1] > 0
    assert ka.odeint(model, x, split, disable=True).shape == x.shape
    assert ka.sdeint(model, x, split, disable=True).shape == x.shape
    residual = newton.linear_residual(newton.Mask(torch.ones(2)), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="sigmas must be positive and end in exactly one 0"):
        newton.sample_constrained(model, x, split, residual, disable=True)
    with pytest.raises(ValueError, match="sigmas must be positive and end in exactly one 0"):
        smc.sample_smc(model, x[None], split, lambda x0: x0.sum(1), num_particles=3, disable=True)
    with pytest.raises(ValueError, match="sigmas must be positive and end in exactly one 0"):
        dps.sample_dps(model, x, split, residual, disable=True)
    with pytest.raises(ValueError, match="sigmas must be positive and end in exactly one 0"):
        demon.sample_demon(model, x, split, lambda x0: x0.sum(1), K=2, beta=0.1, disable=True)
