"""The arena's cost formulas: network rows per image of each method's settings, and the fit to a budget.

A backward pass through the network counts as one row; each method's hyper-parameters are the largest
whose formula fits the budget (``tests/test_arena.py`` checks every formula against counted rows). A
``sampling.TunedSampler`` as the solver runs its own grid: its rows are its counted NFE, whatever the steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import sampling
from ...align.demon import demon_steps, rollout_steps
from ...align.smc import tempering_lambdas

BASE_STEPS, SEARCH_STEPS, DEMON_GRIDS, SMC_GRIDS = 20, 10, (20, 16, 12), (20, 10, 5)
NOISE_OPT_STEPS = 6  # few steps, many optimiser steps: the noise-optimisation papers' trade
ROLLOUT_C_STEPS, ODE_AFTER = 2, 0.11
DEMON_MAX_K = 256  # Demon's candidates per step are capped here however large the budget


def ode_rows(sampler, steps: int) -> int:
    """Network rows of ``odeint`` over ``steps`` steps: (steps − 1) solver steps and the final Euler step.

    A tuned sampler integrates its own grid from σ_max: its ``nfe`` rows, whatever ``steps``.
    """
    if sampling.is_tuned(sampler):
        return sampler.nfe
    return (steps - 1) * sampling.NFE_PER_STEP.get(sampler, 1) + 1


def tail_rows(sampler, sigma: float, steps: int) -> int:
    """Rows of an ``odeint`` from σ down to 0 over ``steps`` steps (a tuned sampler: its grid below σ)."""
    if sampling.is_tuned(sampler):
        return len(sampler.along(torch.tensor([sigma, 0.0], dtype=torch.float64))) - 1
    return ode_rows(sampler, steps)


def fit_steps(sampler, budget: float, per_row: int = 1, most: int | None = None) -> int | None:
    """The most steps (≥ 2, ≤ ``most``) whose ``per_row``·``ode_rows`` fits ``budget``; None if none does.

    A tuned sampler has one setting: its ``nfe`` steps if they fit (``most`` does not apply), else None.
    """
    if sampling.is_tuned(sampler):
        return sampler.nfe if per_row * sampler.nfe <= budget else None
    steps = 2 if per_row * ode_rows(sampler, 2) <= budget else None
    while steps is not None and (most is None or steps < most) and per_row * ode_rows(sampler, steps + 1) <= budget:
        steps += 1
    return steps


def demon_rows(sigmas: Tensor, K: int, lookahead: str, sampler) -> int:
    """Rows per image of ``sample_demon`` here: per Demon step 2 + K + K·L, then the Heun tail 2m − 1.

    L = 1 for the Tweedie look-ahead, ``tail_rows`` of the rollout from σ_{i+1} (``rollout_steps`` with
    c = 2) else; the tail after ``ODE_AFTER`` is Heun whatever the sampler.
    """
    steps = demon_steps(sigmas, ODE_AFTER)
    rows = 2 * (len(sigmas) - 1 - steps) - 1
    for i in range(steps):
        n = rollout_steps(float(sigmas[i + 1]), float(sigmas[-2]), float(sigmas[0]), ROLLOUT_C_STEPS)
        rows += 2 + K + K * (1 if lookahead == "tweedie" else tail_rows(sampler, float(sigmas[i + 1]), n))
    return rows


def smc_rows(steps: int, n: int, guided: bool) -> tuple[int, int]:
    """(forward, backward) rows per image of ``sample_smc``: N per step, and N backward per guided step.

    A guided step differentiates unless it is the last or its next tempering λ is 0 (DAS's exp schedule).
    """
    lam = tempering_lambdas("exp", steps)  # sample_smc's default schedule
    return n * steps, n * int((lam[1:] > 0).sum()) if guided else 0


def demon_config(pipe, budget: float, lookahead: str, sampler) -> tuple[Tensor, int] | None:
    """(σ grid, K) for Demon: the first grid of ``DEMON_GRIDS`` where K = 2 fits, with the largest K that fits."""
    for steps in DEMON_GRIDS:
        sigmas = pipe.sigmas(steps)
        if demon_rows(sigmas, 2, lookahead, sampler) <= budget:
            return sigmas, _largest_k(sigmas, budget, lookahead, sampler)
    return None


def _largest_k(sigmas: Tensor, budget: float, lookahead: str, sampler, most: int = DEMON_MAX_K) -> int:
    """The largest K ≤ ``most`` whose ``demon_rows`` fit ``budget``, given that K = 2 fits (rows are affine in K)."""
    at_2 = demon_rows(sigmas, 2, lookahead, sampler)
    slope = demon_rows(sigmas, 3, lookahead, sampler) - at_2
    if slope == 0 or at_2 + (most - 2) * slope <= budget:
        return most
    return 2 + int((budget - at_2) // slope)


def smc_config(budget: float, guided: bool) -> tuple[int, int] | None:
    """(steps, particles N ≥ 2): the first grid of ``SMC_GRIDS`` where two particles fit, N as large as fits."""
    for steps in SMC_GRIDS:
        if sum(smc_rows(steps, 2, guided)) <= budget:
            return steps, int(budget // sum(smc_rows(steps, 1, guided)))
    return None


def search_plan(sampler, budget: float) -> tuple[int, int, int] | None:
    """(steps, neighbours per round, rounds) of the zero-order search, or None below two samples."""
    steps = fit_steps(sampler, budget, most=SEARCH_STEPS)
    samples = 0 if steps is None else int(budget // ode_rows(sampler, steps))
    if samples < 2:
        return None
    count = 4 if samples >= 9 else 2 if samples >= 3 else 1
    return steps, count, (samples - 1) // count


def noise_opt_plan(sampler, budget: float) -> tuple[int, int] | None:
    """(steps, evaluations) of DNO / D-Flow: each evaluation is one forward and one backward pass through an
    ODE of at most ``NOISE_OPT_STEPS`` steps (``grad="full"``, no recomputation); None below 2 evaluations."""
    steps = fit_steps(sampler, budget / 2, most=NOISE_OPT_STEPS)
    evaluations = 0 if steps is None else int(budget // (2 * ode_rows(sampler, steps)))
    return None if evaluations < 2 else (steps, evaluations)


def formula_nfe(name: str, pipe, budget: int, sampler="heun") -> float | None:
    """The NFE per image that method ``name`` should spend at ``budget`` by its cost formula (None: no fit)."""
    family = name.split("-")[0]
    if name == "plain-ode" or name == "guidance-dps":
        per_row = 2 if family == "guidance" else 1
        steps = fit_steps(sampler, budget, per_row=per_row)
        return None if steps is None else per_row * ode_rows(sampler, steps)
    if name == "plain-sde":
        return budget if budget >= 2 else None
    if name in ("best_of_n-ode", "search-random"):
        steps = fit_steps(sampler, budget, most=BASE_STEPS if family == "best_of_n" else SEARCH_STEPS)
        return None if steps is None else budget // ode_rows(sampler, steps) * ode_rows(sampler, steps)
    if name == "search-zero-order":
        plan = search_plan(sampler, budget)
        return None if plan is None else (1 + plan[1] * plan[2]) * ode_rows(sampler, plan[0])
    if name.startswith("noise-opt-"):
        plan = noise_opt_plan(sampler, budget)
        return None if plan is None else 2 * plan[1] * ode_rows(sampler, plan[0])
    if family == "demon":
        config = demon_config(pipe, budget, name.split("-")[2], sampler)
        return None if config is None else demon_rows(config[0], config[1], name.split("-")[2], sampler)
    config = smc_config(budget, guided="-das-" in name)
    return None if config is None else sum(smc_rows(config[0], config[1], guided="-das-" in name))
