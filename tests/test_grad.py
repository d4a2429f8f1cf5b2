"""Gradients through odeint / oderevert / sdeint (issue 26): exactness on closed-form denoisers, equality of the
three modes, finite differences for conditioning tensors and parameters, pathwise SDE gradients, counted
recomputation, peak memory on the shipped Fashion UNet, and early errors."""
import pytest
import torch

import kdiff_align as ka
from kdiff_align.sampling import ADAPTIVE_METHODS, FIXED_METHODS, MULTISTEP_METHODS, SDE_METHODS
from kdiff_align.models import toy
from kdiff_align.sampling.grad import peak_memory
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser

MODES = ("full", "checkpoint", "adjoint")
ODE_METHODS = FIXED_METHODS + MULTISTEP_METHODS


def mixture64():
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -1.5]])
    return MixtureDenoiser(means, torch.tensor([0.5, 0.7, 0.3]), torch.tensor([0.5, 0.3, 0.2])).double()


def grid(n=8, sigma_min=0.02, sigma_max=10.0):
    return ka.get_sigmas_karras(n, sigma_min, sigma_max).double()


def grad_of(sampler, model, x, sigmas, loss=lambda y: (y**2).sum(), **kw):
    """∂loss(sampler(model, x, sigmas, **kw))/∂x, with the sampler's output."""
    x = x.clone().requires_grad_()
    y = sampler(model, x, sigmas, **kw)
    (g,) = torch.autograd.grad(loss(y), x)
    return g, y.detach()


# Relative error |J_h − J|/J of the discrete Jacobian at 32 Karras steps (σ 0.002..80, float64), measured:
# euler 0.094, heun 0.018, rk4 1.2e-4, dpmpp_2m 0.020, unipc 0.0041; the bounds are about 3x those.
JACOBIAN_TOL = {"euler": 0.3, "heun": 0.06, "rk4": 4e-4, "dpmpp_2m": 0.06, "unipc": 0.015}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", JACOBIAN_TOL)
def test_gradient_matches_the_closed_form_jacobian_of_the_gaussian_flow(method, mode):
    """x_b = μ + (x_a − μ)·√(s² + σ_b²)/√(s² + σ_a²): the gradient is exactly the discrete map's (linear)
    Jacobian J_h = (x_b − μ)/(x_a − μ), and J_h is the closed-form J within the solver's discretisation error."""
    model = GaussianDenoiser(torch.linspace(-1, 2, 3), torch.tensor([0.3, 0.7, 1.5])).double()
    sigmas = ka.get_sigmas_karras(32, 0.002, 80.0).double()[:-1]  # a split grid: the state at σ_min
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    w = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g, y = grad_of(ka.odeint, model, x, sigmas, method=method, grad=mode, disable=True,
                   loss=lambda y: (w * y).sum())
    j_h = (y - model.mean) / (x - model.mean)
    torch.testing.assert_close(g, w * j_h, rtol=1e-10, atol=0)
    var = model.std.double() ** 2
    j = ((var + sigmas[-1] ** 2) / (var + sigmas[0] ** 2)).sqrt()
    assert ((j_h - j).abs() / j).max() < JACOBIAN_TOL[method]


@pytest.mark.parametrize("method", ODE_METHODS)
def test_checkpoint_and_adjoint_equal_full_on_a_nonlinear_mixture(method):
    """Same gradient to float64 round-off: recomputing a step at a wrong state or with a wrong history
    would show on the mixture, whose Jacobian varies with x."""
    model, sigmas = mixture64(), grid()
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 10
    grads = {mode: grad_of(ka.odeint, model, x, sigmas, method=method, grad=mode, disable=True) for mode in MODES}
    reference, y = grads["full"]
    torch.testing.assert_close(y, ka.odeint(model, x, sigmas, method=method, disable=True), rtol=0, atol=0)
    assert reference.abs().max() > 1e-3
    for mode in ("checkpoint", "adjoint"):
        torch.testing.assert_close(grads[mode][0], reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["heun", "dpmpp_2m"])
def test_oderevert_gradient_modes_agree(method):
    model, sigmas = mixture64(), ka.schedules.revert_sigmas(grid()).double()
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = [grad_of(ka.oderevert, model, x, sigmas, method=method, grad=mode, disable=True)[0] for mode in MODES]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_adjoint_matches_unrolled_within_its_tolerance(method):
    """torchdiffeq's continuous adjoint re-solves the state backwards: its gradient equals the unrolled one
    to the solver tolerance (rtol = atol = 1e-7 here; observed differences ~1e-7 relative)."""
    model, sigmas = mixture64(), grid(4, 0.05, 10.0)[:-1]
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 5
    kw = dict(method=method, rtol=1e-7, atol=1e-7, disable=True)
    full, _ = grad_of(ka.odeint, model, x, sigmas, grad="full", **kw)
    adjoint, _ = grad_of(ka.odeint, model, x, sigmas, grad="adjoint", **kw)
    torch.testing.assert_close(adjoint, full, rtol=1e-4, atol=1e-6)


class ShiftedMixture(torch.nn.Module):
    """D(x, σ; c) = M(x − a·c, σ) + a·c: the mixture translated by a·c, a learnable scale a and c a condition."""

    def __init__(self):
        super().__init__()
        self.mixture, self.scale = mixture64(), torch.nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def forward(self, x, sigma, cond):
        shift = self.scale * cond
        return self.mixture(x - shift, sigma) + shift


@pytest.mark.parametrize("sampler", ["odeint", "sdeint"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_to_a_condition_and_a_parameter_match_finite_differences(sampler, mode):
    """Central differences (float64, h = 1e-5: truncation ~h² ≈ 1e-10, round-off ~1e-11/h) agree to 1e-6;
    the SDE path reuses one seed, so its gradient is the pathwise one."""
    model, sigmas = ShiftedMixture(), grid(6)
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 10
    cond = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64, requires_grad=True)

    def loss(c, m=model, **kw):
        kw = dict(method="heun", **kw) if sampler == "odeint" else dict(beta=0.3, generator=torch.Generator()
                                                                           .manual_seed(6), **kw)
        return (getattr(ka, sampler)(m, x, sigmas, extra_args={"cond": c}, disable=True, **kw) ** 2).sum()

    g_cond, g_scale = torch.autograd.grad(loss(cond, grad=mode), [cond, model.scale])
    h = 1e-5
    with torch.no_grad():
        for k in range(cond.numel()):
            e = torch.zeros_like(cond).flatten().index_fill(0, torch.tensor(k), h).view_as(cond)
            fd = (loss(cond + e) - loss(cond - e)) / (2 * h)
            assert abs(g_cond.flatten()[k] - fd) < 1e-6 * max(1.0, abs(fd))
        model.scale += h
        up = loss(cond)
        model.scale -= 2 * h
        fd = (up - loss(cond)) / (2 * h)
        model.scale += h
    assert abs(g_scale - fd) < 1e-6 * max(1.0, abs(fd)) and abs(fd) > 1e-3


@pytest.mark.parametrize("method", SDE_METHODS)
def test_sde_gradient_is_pathwise_with_the_noise_drawn_once(method):
    """Every SDE method: the sample with a graph equals the no-graph sample of the same seed (the noise is not
    redrawn), checkpoint/adjoint recomputation reuses it (equal to full), and the gradient matches central
    differences of the seeded map."""
    model, sigmas = mixture64(), grid(6)
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 10
    kw = dict(beta=0.5) if method == "ancestral" else dict(method=method, eta=1.0)

    def run(x, **grad_kw):
        return ka.sdeint(model, x, sigmas, generator=torch.Generator().manual_seed(8), disable=True, **kw, **grad_kw)

    plain = run(x)
    grads = {}
    for mode in MODES:
        grads[mode], y = grad_of(lambda _, x, __, **kw: run(x, **kw), None, x, None, grad=mode)
        torch.testing.assert_close(y, plain, rtol=0, atol=0)
    for mode in ("checkpoint", "adjoint"):
        torch.testing.assert_close(grads[mode], grads["full"], rtol=1e-12, atol=1e-14)
    h, e = 1e-5, torch.zeros_like(x)
    e[0, 1] = h
    fd = ((run(x + e) ** 2).sum() - (run(x - e) ** 2).sum()) / (2 * h)
    assert abs(grads["full"][0, 1] - fd) < 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("mode", MODES)
def test_recomputation_is_counted(mode):
    """Rows through the denoiser: full = one pass; checkpoint and adjoint evaluate every step twice."""
    model, sigmas = CountingDenoiser(mixture64()), grid(5)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    ka.odeint(model, x, sigmas, method="heun", grad=mode, disable=True).sum().backward()
    forward_rows = 2 * (2 * 4 + 1)  # batch 2 × (4 Heun steps of 2 evaluations + the final x = D)
    assert model.rows == (forward_rows if mode == "full" else 2 * forward_rows)


@pytest.mark.parametrize("mode", MODES)
def test_grad_last_backpropagates_through_the_last_k_steps_only(mode):
    """DRaFT-K: the parameter gradient equals that of the last K steps started from the no-graph state, and
    nothing reaches x_T."""
    model, sigmas = ShiftedMixture(), grid(6)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    extra = {"cond": torch.tensor([[0.3, -0.2]], dtype=torch.float64)}
    y = ka.odeint(model, x, sigmas, extra_args=extra, method="dpmpp_2m", grad=mode, grad_last=2, disable=True)
    (g,) = torch.autograd.grad((y**2).sum(), model.scale)
    ref = ka.odeint(model, x.detach(), sigmas, extra_args=extra, method="dpmpp_2m", grad="full", disable=True)
    (g_all,) = torch.autograd.grad((ref**2).sum(), model.scale)
    assert not torch.allclose(g, g_all)  # fewer steps differentiated: a different (truncated) gradient
    with pytest.raises(RuntimeError):
        torch.autograd.grad((y**2).sum(), x)  # x_T is not in the graph
    y_full = ka.odeint(model, x, sigmas, extra_args=extra, method="dpmpp_2m", grad=mode, grad_last=6, disable=True)
    (g6,) = torch.autograd.grad((y_full**2).sum(), model.scale)
    torch.testing.assert_close(g6, g_all, rtol=1e-12, atol=1e-14)


def test_grad_last_equals_the_gradient_of_the_last_steps_run_alone():
    """On a one-step method the last K steps are a grid of their own: same parameter gradient."""
    model, sigmas = ShiftedMixture(), grid(6)
    x = torch.randn(2, 2, dtype=torch.float64)
    extra = {"cond": torch.tensor([[0.3, -0.2]], dtype=torch.float64)}
    y = ka.odeint(model, x, sigmas, extra_args=extra, method="heun", grad="checkpoint", grad_last=2, disable=True)
    (g,) = torch.autograd.grad((y**2).sum(), model.scale)
    x_mid = ka.odeint(model, x, sigmas[:-2], extra_args=extra, method="heun", disable=True)
    tail = ka.odeint(model, x_mid, sigmas[-3:], extra_args=extra, method="heun", grad="full", disable=True)
    (g_tail,) = torch.autograd.grad((tail**2).sum(), model.scale)
    torch.testing.assert_close(g, g_tail, rtol=1e-12, atol=1e-14)


def test_default_keeps_no_graph_and_callbacks_see_every_step():
    model, sigmas = mixture64(), grid(4)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert ka.odeint(model, x, sigmas, disable=True).grad_fn is None
    assert ka.sdeint(model, x, sigmas, beta=0.5, disable=True).grad_fn is None
    for mode in MODES:
        seen = []
        y = ka.odeint(model, x, sigmas, method="unipc", grad=mode, callback=seen.append, disable=True)
        assert [info["i"] for info in seen] == [0, 1, 2, 3] and y.requires_grad
        assert all(info["denoised"].grad_fn is None for info in seen)


def test_pipeline_methods_take_grad():
    pipe = toy.load("digits")
    x = pipe.get_init_latent(1, generator=torch.Generator().manual_seed(0)).requires_grad_()
    condition = {"prompts": ["3"], "cfgs": [2.0]}
    grads = [torch.autograd.grad(pipe.odeint(x, condition, 3, method="euler", grad=mode, disable=True).sum(), x)[0]
             for mode in MODES]
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-7)  # float32 model, same ops


def test_bad_grad_arguments_fail_early_and_name_the_argument():
    model, sigmas, x = mixture64(), grid(4), torch.randn(2, 2, dtype=torch.float64)
    counting = CountingDenoiser(model)
    with pytest.raises(ValueError, match="grad must be"):
        ka.odeint(counting, x, sigmas, grad="yes")
    with pytest.raises(ValueError, match="grad_last must be a positive int"):
        ka.sdeint(counting, x, sigmas, grad="full", grad_last=0)
    with pytest.raises(ValueError, match="grad_last needs a grad mode"):
        ka.oderevert(counting, x, ka.schedules.revert_sigmas(sigmas), grad_last=2)
    with pytest.raises(ValueError, match="adaptive"):
        ka.odeint(counting, x, sigmas, method="dopri5", grad="checkpoint")
    assert counting.calls == 0


def test_adjoint_refuses_tensors_it_cannot_see():
    """A closure over a parameter hides it from the adjoint's inputs: an error, never a silently missing gradient."""
    inner = ShiftedMixture()
    cond = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y = ka.odeint(lambda x, sigma: inner(x, sigma, cond), x, grid(4), grad="adjoint", disable=True)
    with pytest.raises(ValueError, match="grad='adjoint' found a tensor"):
        y.sum().backward()


@pytest.mark.slow
def test_peak_memory_is_flat_in_steps_for_checkpoint_and_adjoint_on_the_fashion_unet():
    """Peak live tensor bytes (profiler allocation events) over forward + backward: "full" keeps every step's
    activations (linear in steps), checkpoint and adjoint one step's (peak at 50 steps ≤ 1.2× at 5)."""
    pipe = toy.load("fashion")
    model = pipe.null_denoiser()

    def peak(mode, steps):
        x = pipe.get_init_latent(1, generator=torch.Generator().manual_seed(0)).requires_grad_()
        return peak_memory(lambda: ka.odeint(model, x, pipe.sigmas(steps), method="euler", grad=mode,
                                             disable=True).sum().backward())

    full_5, full_10 = peak("full", 5), peak("full", 10)
    assert full_10 > 1.7 * full_5
    for mode in ("checkpoint", "adjoint"):
        assert peak(mode, 50) <= 1.2 * peak(mode, 5)
        assert peak(mode, 5) < full_5
