"""One reward contract (``rewards.check_rewards``) for Demon and SMC: same shapes, same ±inf/NaN rules, messages
in the user's terms (B images x K candidates / N particles)."""
import math

import pytest
import torch

import kdiff_align as ka
from kdiff_align import rewards
from kdiff_align.align import smc
from kdiff_align.align.demon import demon_weights, sample_demon
from kdiff_align.testing import MixtureDenoiser

SIGMAS = ka.get_sigmas_karras(8, 0.01, 20.0)
B, K = 2, 3  # the user's batch and the candidates (Demon) / particles (SMC) per item


def two_modes():
    """Modes at x₀ = −2 (weight 0.8) and +2 (weight 0.2), std 0.5."""
    return MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2]))


def run(method, reward, n=K, batch=B, sigmas=SIGMAS, beta=0.05):
    """Demon (K = n) or FK-steering SMC (N = n) on ``two_modes``, seeded; outputs ``[B, 2]`` / ``[B, N, 2]``."""
    g = torch.Generator().manual_seed(0)
    if method == "demon":
        x = torch.randn(batch, 2, generator=g) * sigmas[0]
        return sample_demon(two_modes(), x, sigmas, reward, K=n, beta=beta, generator=g, disable=True)
    x = torch.randn(batch, n, 2, generator=g) * sigmas[0]
    return smc.sample_smc(two_modes(), x, sigmas, reward, num_particles=n, proposal="prior", alpha=1.0,
                          generator=g, disable=True).x0


TERMS = {"demon": f"{B} images x {K} candidates", "smc": f"{B} images x {K} particles"}
BAD = {  # case -> (reward, error, message)
    "list": (lambda x: x[:, 0].tolist(), TypeError, r"must return a torch.Tensor of shape \[6\].*got list"),
    "column": (lambda x: x[:, :1], ValueError, r"shape \(6, 1\).*expected shape \[6\]; drop the trailing"),
    "short": (lambda x: x[1:, 0], ValueError, r"returned 5 values"),
    "nan": (lambda x: torch.where(torch.arange(len(x)) == 1, math.nan, 0.0), ValueError, r"NaN or \+inf.*rows \[1\]"),
    "+inf": (lambda x: torch.full((x.shape[0],), math.inf), ValueError, r"NaN or \+inf"),
    "complex": (lambda x: x[:, 0] + 0j, TypeError, "real numbers"),
}


@pytest.mark.parametrize("method", ["demon", "smc"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_both_methods_reject_the_same_rewards_in_the_users_terms(method, case):
    reward, error, match = BAD[case]
    with pytest.raises(error, match=match) as caught:
        run(method, reward)
    assert TERMS[method] in str(caught.value) or case in ("complex", "list") and "6" in str(caught.value)


@pytest.mark.parametrize("method", ["demon", "smc"])
def test_minus_inf_rejects_samples_in_both_methods(method):
    """r = 0 for x₀ > −1.5, −inf below (most of the heavy −2 mode). Plain sampling lands above −1.5 with
    probability 0.2 + 0.8·P(N(−2, 0.5²) > −1.5) ≈ 0.33 (measured 0.36 on these 64 seeded items); a method
    that ignored −inf, or read it as a tie, would stay there (binomial SE 0.06), so ≥ 0.7 (6 SE above;
    measured 0.95 Demon, 0.85 SMC) shows the rejection steers. Seeded, so the run is reproducible."""
    fence = lambda x: torch.where(x[:, 0] > -1.5, 0.0, -math.inf)  # noqa: E731
    out = run(method, fence, n=8, batch=64, sigmas=ka.get_sigmas_karras(16, 0.01, 20.0), beta=0.1)
    out = out.flatten(0, -2) if method == "smc" else out
    assert torch.isfinite(out).all()
    assert (out[:, 0] > -1.5).float().mean() >= 0.7


def test_demon_weights_give_rejected_candidates_the_lowest_weight():
    r = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [-math.inf] * 4, [1.0, 1.0, -math.inf, 1.0]], dtype=torch.float64)
    tanh, tau = demon_weights(r, "tanh")
    torch.testing.assert_close(tau[0], torch.tensor(1.0, dtype=torch.float64))  # std of {0, 1, 2}
    torch.testing.assert_close(tanh[0], torch.tensor([math.tanh(-1), 0.0, -1.0, math.tanh(1)], dtype=torch.float64))
    assert (tanh[1] == 1).all()  # everything rejected: no information, uniform weights
    torch.testing.assert_close(tanh[2], torch.tensor([0.0, 0.0, -1.0, 0.0], dtype=torch.float64))
    boltzmann, _ = demon_weights(r, "boltzmann")
    assert boltzmann[0, 2] == 0 and boltzmann[2, 2] == 0
    torch.testing.assert_close(boltzmann[2, [0, 1, 3]], torch.full((3,), 1 / 3, dtype=torch.float64))
    optimal, _ = demon_weights(r, "optimal")
    assert optimal[0].tolist() == [-1.0, 0.0, -1.0, 1.0]
    assert all(torch.isfinite(w).all() for w in (tanh, boltzmann, optimal))


def test_check_rewards_accepts_the_contract_and_keeps_graphs_on_request():
    x = torch.tensor([1.0, -math.inf, 2.0], requires_grad=True)
    r = rewards.check_rewards(x, 3)
    assert r.dtype == torch.float64 and not r.requires_grad and r[1] == -math.inf
    assert rewards.check_rewards(x * 2, 3, keep_graph=True).requires_grad
    assert rewards.check_rewards(torch.tensor([1, 0]), 1, per_item=2).tolist() == [1.0, 0.0]  # ints, bools are real
    with pytest.raises(ValueError, match=r"for 1 image x 3 candidates; expected shape \[3\]"):
        rewards.check_rewards(torch.zeros(2), 1, per_item=3, terms="1 image x 3 candidates")
