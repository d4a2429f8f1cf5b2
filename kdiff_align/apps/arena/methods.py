"""The arena's method runners: ``METHODS`` maps a name to ``run(task, budget, generator)``.

Each runner returns ``(x0, backward rows, settings text)``, or None when no setting fits the budget.
A new method is a function here and one entry in ``METHODS`` (its cost formula goes in ``costs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ... import sampling
from ...align import guidance, noise_opt, search
from ...align.demon import DEMON_TYPES, auto_beta, sample_demon
from ...align.smc import sample_smc
from ...models import toy
from ...testing import CountingDenoiser
from .costs import (BASE_STEPS, ODE_AFTER, ROLLOUT_C_STEPS, SEARCH_STEPS, demon_config, fit_steps, ode_rows,
                    noise_opt_plan, search_plan, smc_config)


@dataclass
class Task:
    """One reward's run: the counting model, the reward, its flags and the shared standard-normal noises."""
    pipe: toy.ToyPipeline
    model: CountingDenoiser
    reward: Callable[[Tensor], Tensor]
    differentiable: bool
    noise: Tensor
    sampler: "str | sampling.TunedSampler"  # the PF-ODE solver: a method name or a tuned grid
    alpha: float
    scale: float
    seed: int
    tau: float | str = "adaptive"  # Demon's temperature
    step: float = 0.5  # the zero-order search's neighbour distance λ


def ode_sampler(task: Task, steps: int, model=None) -> Callable[[Tensor], Tensor]:
    """``sample(n) -> x0``: the PF-ODE with the task's solver from σ_max·n over ``steps`` steps."""
    sigmas = task.pipe.sigmas(steps)
    return lambda n: sampling.odeint(model or task.model, n * task.pipe.init_sigma, sigmas, method=task.sampler,
                                     disable=True)


def _noises(task: Task, n: int, generator) -> Tensor:
    """``[n, B, ...]``: the shared noises first, then n − 1 fresh standard-normal sets."""
    extra = torch.randn(n - 1, *task.noise.shape, generator=generator)
    return torch.cat([task.noise[None], extra])


def plain_ode(task: Task, budget: int, generator):
    """Plain PF-ODE sampling, spending the budget on solver steps."""
    steps = fit_steps(task.sampler, budget)
    return None if steps is None else (ode_sampler(task, steps)(task.noise), 0, f"{steps} steps")


def plain_sde(task: Task, budget: int, generator):
    """Plain ancestral (DDPM, η = 1) sampling with one evaluation per step."""
    steps = int(budget)
    if steps < 2:
        return None
    x0 = sampling.sdeint(task.model, task.noise * task.pipe.init_sigma, task.pipe.sigmas(steps), eta=1.0,
                         generator=generator, disable=True)
    return x0, 0, f"{steps} ancestral steps"


def _random_search(task: Task, budget: int, generator, most: int):
    steps = fit_steps(task.sampler, budget, most=most)
    if steps is None:
        return None
    n = int(budget // ode_rows(task.sampler, steps))
    x0, _, _ = search.random_search(ode_sampler(task, steps), task.reward, _noises(task, n, generator))
    return x0, 0, f"N={n}, {steps} steps"


def best_of_n(task: Task, budget: int, generator):
    """Best-of-N on the usual 20-step grid (fewer steps only when one sample does not fit)."""
    return _random_search(task, budget, generator, BASE_STEPS)


def search_random(task: Task, budget: int, generator):
    """Ma et al.'s random search over initial noises, on cheaper 10-step samples (more noises per budget)."""
    return _random_search(task, budget, generator, SEARCH_STEPS)


def search_zero_order(task: Task, budget: int, generator):
    """Ma et al.'s zero-order search: rounds of neighbours around the best noise so far, 10-step samples."""
    plan = search_plan(task.sampler, budget)
    if plan is None:
        return None
    steps, count, iterations = plan
    x0, _, _ = search.zero_order_search(ode_sampler(task, steps), task.reward, task.noise, iterations=iterations,
                                        count=count, step=task.step, generator=generator)
    return x0, 0, f"{iterations}×{count} neighbours, λ={task.step:g}, {steps} steps"


def demon(demon_type: str, lookahead: str):
    """Sampling Demon with ``demon_type`` weights and the Tweedie or rollout look-ahead (K fitted to the budget)."""
    def run(task: Task, budget: int, generator):
        config = demon_config(task.pipe, budget, lookahead, task.sampler)
        if config is None:
            return None
        sigmas, K = config
        beta = auto_beta(sigmas, ODE_AFTER)  # β·|Δσ| ≤ 1 keeps the β-SDE step accurate
        rollout = None if task.sampler == "heun" else partial(sampling.odeint, method=task.sampler)
        x0 = sample_demon(task.model, task.noise * task.pipe.init_sigma, sigmas, task.reward, K=K, beta=beta,
                          tau=task.tau, demon_type=demon_type, r_of_c="consistency" if lookahead == "tweedie" else "baseline",
                          c_steps=ROLLOUT_C_STEPS, ode_after=ODE_AFTER, sampler=rollout, generator=generator,
                          disable=True)
        tau = task.tau if isinstance(task.tau, str) else f"{task.tau:g}"
        return x0, 0, f"K={K}, {len(sigmas) - 1} steps, β={beta:.3g}, τ={tau}"
    return run


def smc(proposal: str, select: str):
    """SMC with the prior (FK steering) or guided (DAS) proposal; ``select`` one resampled draw or the argmax."""
    def run(task: Task, budget: int, generator):
        guided = proposal == "guided"
        if guided and not task.differentiable:
            return None
        config = smc_config(budget, guided)
        if config is None:
            return None
        steps, n = config
        x = torch.cat([task.noise[:, None], torch.randn(len(task.noise), n - 1, *task.noise.shape[1:],
                                                        generator=generator)], 1) * task.pipe.init_sigma
        res = sample_smc(task.model, x, task.pipe.sigmas(steps), task.reward, num_particles=n, alpha=task.alpha,
                         proposal=proposal, select=select, generator=generator, disable=True)
        x0 = res.x0 if select == "argmax" else res.x0[:, 0]
        return x0, res.nfe["denoiser_grad"], f"N={n}, {steps} steps, α={task.alpha:g}"
    return run


def reward_guidance(task: Task, budget: int, generator):
    """PF-ODE of the reward-guided denoiser (``align.guidance``); each evaluation adds a backward pass."""
    steps = fit_steps(task.sampler, budget, per_row=2) if task.differentiable else None
    if steps is None:
        return None
    guided = guidance.reward_guided_denoiser(task.model, task.reward, task.scale)
    return ode_sampler(task, steps, guided)(task.noise), guided.backward_rows, f"s={task.scale:g}, {steps} steps"


def noise_optimisation(kind: str):
    """DNO (Adam, shell regulariser 0.1) or D-Flow (L-BFGS) on the initial noise (``align.noise_opt``), through
    a short PF-ODE with autograd's full graph; the best evaluated sample per image is kept."""
    def run(task: Task, budget: int, generator):
        plan = noise_opt_plan(task.sampler, budget) if task.differentiable else None
        if plan is None:
            return None
        steps, evaluations = plan
        optimise, kw = (noise_opt.dno, dict(lr=0.1, reg=0.1)) if kind == "dno" else (noise_opt.dflow, dict(lr=0.5))
        out = optimise(task.model, task.noise, task.pipe.sigmas(steps), task.reward, iterations=evaluations,
                       method=task.sampler, grad="full", **kw)
        rule = "Adam" if kind == "dno" else "L-BFGS"
        return out["x"], out["nfe"]["backward"], f"{evaluations} {rule} evaluations, {steps} steps"
    return run


METHODS: dict[str, Callable] = {
    "plain-ode": plain_ode,
    "plain-sde": plain_sde,
    "best_of_n-ode": best_of_n,
    **{f"demon-{t}-{look}": demon(t, look) for look in ("tweedie", "rollout") for t in DEMON_TYPES},
    "smc-fk-resample": smc("prior", "resample"),
    "smc-fk-argmax": smc("prior", "argmax"),
    "smc-das-resample": smc("guided", "resample"),
    "smc-das-argmax": smc("guided", "argmax"),
    "guidance-dps": reward_guidance,
    "search-random": search_random,
    "search-zero-order": search_zero_order,
    "noise-opt-dno": noise_optimisation("dno"),
    "noise-opt-dflow": noise_optimisation("dflow"),
}
