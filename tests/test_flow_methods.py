"""Demon, SMC and inexact Newton run unchanged on a rectified-flow model.

The flow model is the exact velocity v = E[ε − x₀ | x_t] of closed-form data (Gaussian, two-mode mixture),
wrapped by ``FlowDenoiser`` and sampled on the shifted flow schedule (SD3's shift 3). FlowDenoiser turns it
back into the data's exact denoiser, so (1) each method returns the same samples as on the unwrapped
denoiser (float64, round-off only) and (2) each method's own property holds on the flow model: Demon raises
the reward, SMC's weighted particles match the analytic tilt, Newton's constraint residual drops.
"""
import pytest
import torch

import kdiff_align as ka
from kdiff_align.align import demon, newton, smc
from kdiff_align.external import FlowDenoiser
from kdiff_align.schedules import get_sigmas_flow
from kdiff_align.testing import GaussianDenoiser, MixtureDenoiser
from kdiff_align.utils import append_dims
from test_demon import prefer_rare, two_modes
from test_smc import M, assert_matches, chain_law, quadratic, tilt

T_SCALE = 1000.0  # as diffusers' SD3 transformer sees t



class ExactVelocity(torch.nn.Module):
    """v(x_t, t·t_scale) = E[ε − x₀ | x_t] for data whose exact denoiser is ``denoiser`` (x = x_t/(1 − t))."""

    def __init__(self, denoiser, t_scale=T_SCALE):
        super().__init__()
        self.denoiser, self.t_scale = denoiser, t_scale

    def forward(self, x_t, t_scaled):
        t = t_scaled / self.t_scale
        sigma = t / (1 - t)
        x = x_t / append_dims(1 - t, x_t.ndim)
        x0 = self.denoiser(x, sigma)
        return (x - x0) / append_dims(sigma, x.ndim) - x0


def flow(denoiser) -> FlowDenoiser:
    return FlowDenoiser(ExactVelocity(denoiser), t_scale=T_SCALE)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- Sampling Demon --------------------------------------------------------------------------------

# shift 3 from t = 0.964 (σ = 27) down to t = 0.003 (σ = 0.003) in 24 steps: σ-steps ≤ 8.4, so β·Δσ < 1 (Demon
# warns beyond that: the β-SDE step is then inaccurate and over-shoots the reward further)
DEMON_SIGMAS = get_sigmas_flow(24, shift=3.0, t_max=0.9)


def test_demon_raises_the_reward_on_a_flow_model():
    model = flow(two_modes())
    x = torch.randn(128, 2, generator=gen(0)) * DEMON_SIGMAS[0]
    plain = ka.odeint(model, x, DEMON_SIGMAS, disable=True)
    out = demon.sample_demon(model, x, DEMON_SIGMAS, prefer_rare, K=6, generator=gen(1), disable=True)
    # Plain sampling puts ~20% in the +2 mode (mean reward ≈ −1.2; 128 draws: ±0.35 at 2σ). Demon moves
    # almost every sample there, as on the Karras schedule of tests/test_demon.py (the unbounded linear
    # reward even pulls them into the mode's right tail: measured mean 4.6 here, 3.6 on Karras): a gain of 2
    # and 80% in the preferred mode are far inside what it reaches.
    assert prefer_rare(plain).mean() < -0.4
    assert prefer_rare(out).mean() > prefer_rare(plain).mean() + 2.0
    assert (two_modes().classify(out) == 1).float().mean() > 0.8


def test_demon_on_the_flow_model_equals_demon_on_its_denoiser():
    """Same noise, same generator, float64: the flow wrapper only adds round-off (t ↔ σ, x ↔ x_t)."""
    mixture = two_modes().double()
    x = torch.randn(16, 2, generator=gen(2), dtype=torch.float64) * DEMON_SIGMAS[0]
    sigmas = DEMON_SIGMAS.double()
    ours = demon.sample_demon(flow(mixture), x, sigmas, prefer_rare, K=4, r_of_c="baseline", c_steps=3,
                              generator=gen(3), disable=True)
    ref = demon.sample_demon(mixture, x, sigmas, prefer_rare, K=4, r_of_c="baseline", c_steps=3,
                             generator=gen(3), disable=True)
    # D through the wrapper differs by ~1e-16·σ_max relatively per call; tanh weights are smooth in the
    # rewards, so the difference stays at round-off level (1e-9 is 10⁶ × float64 epsilon).
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


# ---- SMC tempering ---------------------------------------------------------------------------------

SMC_SIGMAS = get_sigmas_flow(20, shift=3.0, t_max=0.99)  # σ from 299 to 0.003, then 0


@pytest.mark.parametrize("proposal", ["guided", "prior"])
def test_smc_weighted_particles_match_the_tilt_on_a_flow_model(proposal):
    """tests/test_smc.py's check (the discretised ancestral chain of N(m, I) data, tilted by exp(r/α), is
    Gaussian in closed form) on the flow schedule through the flow wrapper: 200 independent runs of 64."""
    groups, n = 200, 64
    x = torch.randn(groups, n, 2, generator=gen(0)) * SMC_SIGMAS[0]
    res = smc.sample_smc(flow(GaussianDenoiser(M, 1.0)), x, SMC_SIGMAS, quadratic, num_particles=n, alpha=1.0,
                         proposal=proposal, disable=True, generator=gen(1))
    mean, var, _ = tilt("quadratic", *chain_law(SMC_SIGMAS, M, 1.0), 1.0)
    assert_matches(res, mean, var)  # 4 standard errors across runs + the O(1/N) self-normalisation bias


def test_smc_on_the_flow_model_equals_smc_on_its_denoiser():
    gaussian = GaussianDenoiser(M.double(), 1.0)
    x = torch.randn(3, 16, 2, generator=gen(4), dtype=torch.float64) * SMC_SIGMAS[0]
    kw = dict(num_particles=16, alpha=0.5, disable=True)
    ours = smc.sample_smc(flow(gaussian), x, SMC_SIGMAS.double(), quadratic, generator=gen(5), **kw)
    ref = smc.sample_smc(gaussian, x, SMC_SIGMAS.double(), quadratic, generator=gen(5), **kw)
    # resampling is discontinuous in the weights, but the weights differ at round-off level only (1e-13
    # measured scale), far from any systematic-resampling threshold: identical ancestry, round-off states
    assert torch.equal(ours.resampled, ref.resampled)
    torch.testing.assert_close(ours.x0, ref.x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.log_weights, ref.log_weights, rtol=1e-9, atol=1e-9)


# ---- inexact Newton --------------------------------------------------------------------------------

def four_d_mixture():
    means = torch.tensor([[1.5] * 4, [-1.0] * 4, [0.5, -2.0, 0.0, 0.0]])
    return MixtureDenoiser(means, torch.tensor([0.4, 0.7, 0.5]), torch.tensor([0.3, 0.5, 0.2]))


MASK = torch.tensor([1.0, 1.0, 0.0, 0.0])
Y = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
NEWTON_SIGMAS = get_sigmas_flow(20, shift=3.0, t_max=0.95)


def observed_rms(x):
    return (MASK * (x - Y)).pow(2).sum(1).div(2).sqrt()


def test_newton_inpainting_residual_drops_on_a_flow_model():
    model = flow(four_d_mixture())
    x_T = torch.randn(64, 4, generator=gen(6)) * NEWTON_SIGMAS[0]
    residual = newton.linear_residual(newton.Mask(MASK), Y)
    out, info = newton.sample_constrained(model, x_T, NEWTON_SIGMAS, residual, generator=gen(7), disable=True,
                                          return_info=True)
    plain = ka.sdeint(model, x_T, NEWTON_SIGMAS, eta=0.16, generator=gen(7), disable=True)
    # the reference setting (K = 5, λ = 0.5 → 0.1, η = 0.16) brings the observed coordinates close to y
    # (tests/test_newton.py asks RMS < 0.1 and < 0.2 × unconstrained on a Gaussian; same bounds here)
    assert observed_rms(out).mean() < 0.1
    assert observed_rms(out).mean() < 0.2 * observed_rms(plain).mean()
    # within each step the Newton iterations lower the residual: the recorded post-step RMS at the last
    # constrained step is far below the unconstrained sample's
    assert info["residual"][:, -1].mean() < 0.2 * observed_rms(plain).mean()


@pytest.mark.parametrize("sigma", [0.2, 2.0, 20.0])
def test_newton_step_on_the_flow_model_equals_newton_step_on_its_denoiser(sigma):
    """One constraint step (K = 5, the reference's λ schedule) agrees to round-off.

    (Whole constrained runs are compared statistically above, not element-wise: once e ≈ 0 the normalised
    step's direction J·e/‖J·e‖ is set by round-off, so two runs differing by 1e-16 part ways — measured
    1e-7 after one iteration per step, 2e-4 after five, 0.3 with l2 normalisation.)"""
    mixture = four_d_mixture().double()
    x = torch.randn(8, 4, generator=gen(8), dtype=torch.float64) * (1 + sigma)
    residual = newton.linear_residual(newton.Mask(MASK.double()), Y.double())
    ours, d_ours, info = newton.newton_step(flow(mixture), x, sigma, residual, return_info=True)
    ref, d_ref = newton.newton_step(mixture, x, sigma, residual)
    assert (info["residual"][:, -1] < info["residual"][:, 0]).all()  # the step does move towards y
    # D agrees to ~1e-15 (measured); the FD JVP divides that by h = 5e-3 and five ∞-normalised steps keep
    # it (no tie of the largest entry here): 1e-9 is far above round-off and far below any real difference
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-9, atol=1e-9)
