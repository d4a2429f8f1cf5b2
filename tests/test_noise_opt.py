"""Noise optimisation through the differentiable sampler (issue 26): DNO and D-Flow on closed-form problems,
counted NFE, early errors, and the shipped Fashion model's "bag" logit."""
import math

import pytest
import torch

import kdiff_align as ka
from kdiff_align.align import noise_opt
from kdiff_align.models import toy
from kdiff_align.testing import GaussianDenoiser

MEAN, STD = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 0.7, 1.5])


def gaussian():
    return GaussianDenoiser(MEAN, STD).double()


def sigmas(n=16):
    return ka.get_sigmas_karras(n, 0.002, 80.0).double()


def test_dno_on_a_linear_reward_moves_the_sample_as_predicted():
    """x₀(z) = μ + A_h·z is linear (A_h diagonal, > 0) and r = w·x₀, so ∇_z r = A_h·w is constant; Adam then
    moves every coordinate of z by exactly lr·sign(∇) per step, and r rises by lr·‖A_h·w‖₁ per step. A_h is the
    closed-form A = σ_max·√((s² + σ_min²)/(s² + σ_max²))·s²/(s² + σ_min²) within RK4's error at 16 steps."""
    model, grid = gaussian(), sigmas()
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    z0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lr, k = 0.01, 5
    out = noise_opt.dno(model, z0, grid, lambda x0: x0 @ w, iterations=k, lr=lr, reg=0.0, method="rk4")
    x0 = lambda z: ka.odeint(model, z * grid[0], grid, method="rk4", disable=True)  # noqa: E731
    a_h = (x0(torch.ones(1, 3, dtype=torch.float64)) - x0(torch.zeros(1, 3, dtype=torch.float64)))[0]
    rise = out["rewards"].diff(dim=0)
    # Adam divides by √v̂ + ε with ε = 1e-8 against gradients ≥ 0.1: steps equal lr·sign to ~1e-7
    torch.testing.assert_close(rise, torch.full_like(rise, lr * (a_h * w).abs().sum().item()), rtol=1e-6, atol=0)
    var, s_max, s_min = STD.double() ** 2, grid[0], grid[-2]
    a = s_max * ((var + s_min**2) / (var + s_max**2)).sqrt() * var / (var + s_min**2)
    torch.testing.assert_close(a_h, a, rtol=5e-3, atol=0)  # RK4, 16 Karras steps: observed 1.3e-3
    # the best sample is the last evaluated one, at z0 + (k − 1)·lr·sign(A·w)
    torch.testing.assert_close(out["noise"], z0 + (k - 1) * lr * torch.sign(w), rtol=0, atol=1e-8)  # ε again
    torch.testing.assert_close(out["reward"], out["rewards"][-1])


def test_dno_shell_regulariser_keeps_the_noise_norm_near_sqrt_d():
    model, grid = gaussian(), sigmas(8)
    z0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reward = lambda x0: x0.sum(1)  # noqa: E731  unbounded: without a regulariser z walks off the shell
    norms = {}
    for reg in (0.0, 10.0):
        out = noise_opt.dno(model, z0, grid, reward, iterations=40, lr=0.1, reg=reg, method="euler")
        norms[reg] = (out["noise"].norm(dim=1) - math.sqrt(3)).abs().max()
    assert norms[10.0] < 0.5 < norms[0.0]


def test_dflow_finds_the_closed_form_optimum_of_a_quadratic_cost():
    """r = −‖x₀ − t‖² on the linear Gaussian flow: the optimum is x₀ = t (reachable: A is invertible);
    L-BFGS reaches it within 20 evaluations (observed error 1e-6)."""
    model, grid = gaussian(), sigmas()
    target = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    z0 = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = noise_opt.dflow(model, z0, grid, lambda x0: -((x0 - target) ** 2).sum(1), iterations=20)
    torch.testing.assert_close(out["x"], target, rtol=0, atol=1e-5)
    assert out["rewards"].shape[0] <= 20


@pytest.mark.parametrize("grad", ["full", "checkpoint", "adjoint"])
def test_noise_optimisation_counts_nfe_by_the_rule(grad):
    """Forward rows include recomputation (checkpoint, adjoint: twice the graph's rows); backward rows are the
    rows a backward pass went through; reward calls and rows are reported beside, not in the total."""
    model, grid = gaussian(), sigmas(4)
    z0 = torch.randn(2, 3, dtype=torch.float64)
    out = noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1), iterations=3, method="heun", grad=grad)
    rows = 3 * 2 * (2 * 3 + 1)  # iterations × batch × (3 Heun steps of 2 evaluations + the final x = D)
    assert out["nfe"] == {"forward": rows if grad == "full" else 2 * rows, "backward": rows,
                          "total": float((2 if grad == "full" else 3) * rows), "reward_calls": 3, "reward_rows": 6}


def test_dno_optimises_the_per_step_noises_of_an_sde_path():
    """With beta the per-step β-SDE noises are variables too: they receive gradients (they move), the shell
    penalty applies to them, and the reward rises."""
    model, grid = gaussian(), sigmas(6)
    z0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen = []
    out = noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1), iterations=4, lr=0.05, beta=0.1,
                        generator=torch.Generator().manual_seed(4), callback=lambda info: seen.append(info))
    assert (out["rewards"].diff(dim=0) > 0).all() and len(seen) == 4
    with pytest.raises(ValueError, match="adjoint"):
        noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1), iterations=1, beta=0.1, grad="adjoint")


def test_bad_input_fails_early():
    model, grid, z0 = gaussian(), sigmas(4), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="reward must be differentiable"):
        noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1).detach(), iterations=2)
    with pytest.raises(ValueError, match="reward must be differentiable"):
        noise_opt.dflow(model, z0, grid, lambda x0: torch.tensor(x0.sum(1).tolist()), iterations=2)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1), iterations=0)
    with pytest.raises(ValueError, match="grad must be"):
        noise_opt.dno(model, z0, grid, lambda x0: x0.sum(1), iterations=2, grad=None)
    with pytest.raises(ValueError, match="grad must be"):
        noise_opt.dflow(model, z0, grid, lambda x0: x0.sum(1), iterations=2, grad="yes")


def test_dno_raises_the_bag_logit_of_the_shipped_fashion_model():
    """Unconditional samples, 4 Euler steps, 6 Adam steps on the classifier's "bag" logit: every item's best
    logit beats its starting sample by a clear margin (observed rises of several logits)."""
    pipe = toy.load("fashion")
    z0 = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    out = noise_opt.dno(pipe.null_denoiser(), z0, pipe.sigmas(4), toy.classifier_reward(pipe, "bag"),
                        iterations=6, lr=0.1, reg=0.1)
    start = out["rewards"][0]
    assert (out["reward"] > start + 1.0).all()
    assert out["x"].shape == z0.shape and out["nfe"]["backward"] == 6 * 2 * 4


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_dflow_never_exceeds_its_evaluation_budget(iterations):
    """L-BFGS's strong-Wolfe line search asks for extra evaluations inside an iteration; the budget still holds:
    exactly ``iterations`` evaluations (reward calls), each one forward + backward pass through the flow."""
    model, grid = gaussian(), sigmas(4)
    z0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = noise_opt.dflow(model, z0, grid, lambda x0: -((x0 - 1.0) ** 4).sum(1), iterations=iterations,
                          grad="full")
    rows = iterations * 2 * 4  # evaluations × batch × 4 Euler rows (3 steps and the final x = D)
    assert out["nfe"]["reward_calls"] == iterations == out["rewards"].shape[0]
    assert out["nfe"]["forward"] == out["nfe"]["backward"] == rows
