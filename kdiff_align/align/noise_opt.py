"""Noise optimisation through the differentiable sampler: DNO (Tang et al. 2024, "Tuning-free alignment of
diffusion models with direct noise optimization") and D-Flow (Ben-Hamu et al., ICML 2024).

Both treat the standard-normal noise z of a sample x₀ = sampler(σ_max·z) as the variable and ascend a
differentiable reward r(x₀) by backpropagating through ``odeint`` / ``sdeint`` (``grad=`` of the core,
checkpointed by default, so memory does not grow with the steps). DNO uses Adam with a regulariser that
keeps z on the Gaussian shell ‖z‖ ≈ √d (and may also optimise the per-step noises of a β-SDE path);
D-Flow runs L-BFGS through the ODE flow, whose Jacobian keeps the update near the data. Counted NFE by
the one rule: forward rows (recomputation included), backward rows, reward calls and rows beside.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..rewards import check_rewards
from ..sampling import odeint, sdeint
from ..sampling.grad import check_grad
from ..testing import CountingDenoiser
from ..utils import CountingReward, check_finite, check_sigmas, nfe_summary, randn_like


def shell_penalty(z: Tensor) -> Tensor:
    """(‖z‖ − √d)² per item: zero on the shell where N(0, I_d) puts its mass (DNO's probability regulariser)."""
    return (z.flatten(1).norm(dim=1) - math.sqrt(z[0].numel())) ** 2


def differentiable_reward(reward: Callable, x0: Tensor) -> Tensor:
    """``reward(x0)`` as a ``[B]`` tensor with a graph; a reward without one fails, saying what is needed."""
    r = check_rewards(reward(x0), x0.shape[0], "reward", keep_graph=True)
    if not r.requires_grad:
        raise ValueError("reward must be differentiable: it returned a tensor without a graph (requires_grad is "
                         "False); compute it with torch operations on x0, without .detach(), .item() or numpy")
    return r


def _objective(model, sigmas, reward, beta, method, grad, extra_args) -> Callable:
    """z (and the per-step noises) → (x₀, r[B]) through the sampler with a graph."""
    def sample(z: Tensor, steps: list[Tensor]) -> tuple[Tensor, Tensor]:
        x_T = z * sigmas[0]
        if beta is None:
            x0 = odeint(model, x_T, sigmas, extra_args=extra_args, method=method, grad=grad, disable=True)
        else:
            by_sigma = dict(zip(sigmas[:-2].tolist(), steps))
            x0 = sdeint(model, x_T, sigmas, extra_args=extra_args, beta=beta, grad=grad, disable=True,
                        noise_sampler=lambda sigma, sigma_next: by_sigma[float(sigma)])
        return x0, differentiable_reward(reward, x0)

    return sample


def _check(noise, sigmas, iterations, grad, beta) -> None:
    check_finite(noise, "noise")
    check_sigmas(sigmas, decreasing=True)
    check_grad(grad, None)
    if grad is None:
        raise ValueError("grad must be 'full', 'checkpoint' or 'adjoint' (noise optimisation needs a gradient)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int (the optimiser's step budget), got {iterations!r}")
    if beta is not None and grad == "adjoint":
        raise ValueError("grad='adjoint' cannot reach the per-step SDE noises; use grad='checkpoint' or 'full'")


def _start(noise: Tensor) -> tuple[Tensor, dict]:
    """The variable z (a leaf copy of ``noise``) and the record of the run: per item the best sample so far
    (none yet) and the reward trace."""
    z = noise.detach().clone().requires_grad_()
    best = {"x": noise.new_zeros(()), "noise": z.detach(), "reward": noise.new_full((noise.shape[0],), -math.inf)}
    return z, {**best, "rewards": []}


def _evaluate(sample: Callable, z: Tensor, steps: list[Tensor], record: dict) -> tuple[Tensor, Tensor]:
    """x₀ and r[B] of z through ``sample``, recorded: the best sample per item kept, r added to the trace."""
    x0, r = sample(z, steps)
    _keep_best(record, x0, z, r)
    record["rewards"].append(r.detach())
    return x0, r


def _keep_best(best: dict, x0: Tensor, z: Tensor, r: Tensor) -> None:
    """Per item, the highest-reward sample seen so far (every evaluated sample is a genuine sample of its z)."""
    better = r.detach() > best["reward"]
    keep = better.view(-1, *[1] * (x0.ndim - 1))
    best["x"] = torch.where(keep, x0.detach(), best["x"])
    best["noise"] = torch.where(keep, z.detach(), best["noise"])
    best["reward"] = torch.where(better, r.detach(), best["reward"])


def _notify(callback: Callable | None, iteration: int, x0: Tensor, r: Tensor) -> None:
    """``callback({"iteration", "reward", "x"})`` after an evaluation, when one is given."""
    if callback is not None:
        callback({"iteration": iteration, "reward": r.detach(), "x": x0.detach()})


def _result(record: dict, counted: CountingDenoiser, reward: CountingReward) -> dict:
    """The record with its reward trace stacked ``[evaluations, B]`` and the counted NFE."""
    return {**record, "rewards": torch.stack(record["rewards"]),
            "nfe": nfe_summary(counted.rows, counted.backward_rows, reward_calls=reward.calls, reward_rows=reward.rows)}


def dno(model, noise: Tensor, sigmas: Tensor, reward: Callable, *, iterations: int, lr: float = 0.05,
        reg: float = 1.0, beta=None, method: str = "euler", grad: str = "checkpoint",
        extra_args: dict | None = None, generator=None, callback: Callable | None = None) -> dict:
    """Direct noise optimisation (Tang et al. 2024): Adam on z to maximise Σ r(x₀(z)) − reg·Σ‖z‖-shell penalty.

    Args:
        noise: the initial standard-normal noise ``[B, ...]`` (x_T = σ_max·z).
        iterations: the step budget: forward + backward passes through the sampler.
        reg: weight of :func:`shell_penalty` on z (and on each per-step noise).
        beta: sample with the Karras β-SDE instead of the ODE, optimising its per-step noises as well
            (drawn from ``generator`` at the start); needs ``grad="checkpoint"`` or ``"full"``.
        method: the ``odeint`` method of the ODE path.
        callback: ``callback({"iteration", "reward", "x"})`` after each evaluation.

    Returns ``{"x", "noise", "reward"}`` of the best sample seen per item, ``"rewards"`` ``[iterations, B]``
    and ``"nfe"`` by the NFE rule.
    """
    _check(noise, sigmas, iterations, grad, beta)
    counted, counted_reward = CountingDenoiser(model), CountingReward(reward)
    z, record = _start(noise)
    steps = [randn_like(noise, generator).requires_grad_() for _ in range(len(sigmas) - 2)] if beta is not None else []
    sample = _objective(counted, sigmas, counted_reward, beta, method, grad, extra_args)
    optimiser = torch.optim.Adam([z, *steps], lr=lr)
    for k in range(iterations):
        x0, r = _evaluate(sample, z, steps, record)
        penalty = sum(shell_penalty(v).sum() for v in [z, *steps])
        optimiser.zero_grad()
        (reg * penalty - r.sum()).backward()
        optimiser.step()
        _notify(callback, k, x0, r)
    return _result(record, counted, counted_reward)


class _BudgetSpent(Exception):
    """Raised inside L-BFGS's closure once ``iterations`` evaluations are spent."""


def dflow(model, noise: Tensor, sigmas: Tensor, reward: Callable, *, iterations: int, lr: float = 1.0,
          reg: float = 0.0, method: str = "euler", grad: str = "adjoint", extra_args: dict | None = None,
          callback: Callable | None = None) -> dict:
    """D-Flow (Ben-Hamu et al. 2024): L-BFGS (strong Wolfe line search) on the source noise through the PF-ODE.

    Args:
        iterations: the budget of objective evaluations (each one forward + backward through the flow),
            never exceeded, not even inside a line search.
        reg: optional weight of :func:`shell_penalty` (0: the flow's Jacobian is the only regulariser).

    Returns the same dictionary as :func:`dno`.
    """
    _check(noise, sigmas, iterations, grad, None)
    counted, counted_reward = CountingDenoiser(model), CountingReward(reward)
    z, record = _start(noise)
    sample = _objective(counted, sigmas, counted_reward, None, method, grad, extra_args)
    optimiser = torch.optim.LBFGS([z], lr=lr, max_iter=iterations, max_eval=iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        if len(record["rewards"]) == iterations:  # a line search may ask for more than max_eval: the budget is hard
            raise _BudgetSpent
        optimiser.zero_grad()
        x0, r = _evaluate(sample, z, [], record)
        _notify(callback, len(record["rewards"]) - 1, x0, r)
        loss = reg * shell_penalty(z).sum() - r.sum()
        loss.backward()
        return loss

    try:
        optimiser.step(closure)
    except _BudgetSpent:
        pass
    return _result(record, counted, counted_reward)
