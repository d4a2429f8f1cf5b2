import pytest
import torch
from hypothesis import given, strategies as st

from kdiff_align import schedules
from strategies import sigma_ranges, sigma_schedules


@pytest.mark.parametrize("fn", [schedules.get_sigmas_karras, schedules.get_sigmas_exponential,
                                schedules.get_sigmas_polyexponential])
@given(n=st.integers(1, 200), rng=sigma_ranges())
def test_schedule_shape_ends_and_monotone(fn, n, rng):
    sigma_min, sigma_max = rng
    sigmas = fn(n, sigma_min, sigma_max)
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0
    torch.testing.assert_close(sigmas[0], torch.tensor(sigma_max), rtol=1e-5, atol=0)
    torch.testing.assert_close(sigmas[-2], torch.tensor(sigma_min if n > 1 else sigma_max), rtol=1e-5, atol=0)
    assert (sigmas[1:] < sigmas[:-1]).all()


@given(n=st.integers(2, 100))
def test_vp_schedule_decreasing(n):
    sigmas = schedules.get_sigmas_vp(n)
    assert sigmas.shape == (n + 1,) and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()


def test_karras_rho_spacing():
    sigmas = schedules.get_sigmas_karras(10, 0.1, 10.0, rho=7.0)[:-1].double()
    steps = sigmas ** (1 / 7)
    torch.testing.assert_close(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(9), rtol=1e-4, atol=1e-6)


def test_exponential_is_polyexponential_rho_1():
    torch.testing.assert_close(schedules.get_sigmas_exponential(17, 0.01, 50.0),
                               schedules.get_sigmas_polyexponential(17, 0.01, 50.0, rho=1.0))


@pytest.mark.parametrize("args", [(0, 0.1, 1.0), (5, 1.0, 0.5), (5, 0.0, 1.0), (2.5, 0.1, 1.0)])
def test_bad_schedule_arguments(args):
    with pytest.raises(ValueError, match="n must|sigma_min"):
        schedules.get_sigmas_karras(*args)


def test_revert_sigmas_drops_zero_and_flips():
    sigmas = schedules.get_sigmas_karras(5, 0.1, 10.0)
    rev = schedules.revert_sigmas(sigmas)
    assert rev.shape == (5,) and (rev[1:] > rev[:-1]).all() and rev[0] > 0


def _alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_sd_sigma_range():
    sig = schedules.sigmas_from_alphas_cumprod(_alphas_cumprod())
    assert abs(sig[-1].item() - 14.6146) < 1e-3 and abs(sig[0].item() - 0.02917) < 1e-4


@given(t=st.lists(st.floats(0, 999, width=32), min_size=1, max_size=16))
def test_sigma_t_round_trip(t):
    table = schedules.sigmas_from_alphas_cumprod(_alphas_cumprod())
    t = torch.tensor(t)
    back = schedules.sigma_to_t(schedules.t_to_sigma(t, table), table)
    torch.testing.assert_close(back, t, atol=2e-3, rtol=0)


def test_sigma_to_t_at_table_points_and_quantize():
    table = schedules.sigmas_from_alphas_cumprod(_alphas_cumprod())
    idx = torch.tensor([0, 10, 500, 999])
    sig = table[idx].float()
    torch.testing.assert_close(schedules.sigma_to_t(sig, table), idx.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(schedules.sigma_to_t(sig * 1.001, table, quantize=True), idx.float())


def test_bad_alphas_table():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        schedules.sigmas_from_alphas_cumprod(torch.tensor([0.5, 1.5]))


@given(sigmas=sigma_schedules())
def test_strategy_schedules_are_valid_sampling_grids(sigmas):
    from kdiff_align.utils import check_sigmas
    check_sigmas(sigmas, decreasing=True)
