"""``kdiff-align arena``: every inference-time scaling method at equal compute on the shipped Fashion-MNIST model.

Unconditional sampling (null class) of the 28×28 model; every method starts from the same noises and
gets the same budgets of network evaluations (NFE) per image; its hyper-parameters (steps, N, K,
particles, iterations) are the largest whose cost formula fits the budget, and the NFE reported is
the one counted by ``testing.CountingDenoiser`` (forward rows) plus the backward rows (a backward pass
through the network counts as one evaluation). Scores per (method, budget), see ``score``: the target
reward (mean ± s.e.m. over images), a held-out reward no method sees, diversity and fidelity in the
held-out classifier's feature space (``toy.load_heldout_classifier``), and wall time per image.

Methods (``METHODS``; the ``--sampler`` ODE solver is used wherever a method integrates the PF-ODE):
``plain-ode`` (more solver steps), ``plain-sde`` (ancestral steps), ``best_of_n-ode`` (N samples on the
usual 20-step grid), ``demon-{tanh,boltzmann,optimal}-{tweedie,rollout}`` (Sampling Demon; the rollout
look-ahead uses the solver), ``smc-{fk,das}-{resample,argmax}`` (FK steering's prior proposal, DAS's
guided proposal; one resampled draw or the highest-weight particle), ``guidance-dps`` (reward gradient
guidance, ``align.guidance``) and ``search-{random,zero-order}`` (Ma et al. 2025, ``align.search``, on
10-step samples). Gradient methods are skipped for non-differentiable rewards. SMC moves by its ancestral
kernel and Demon by the β-SDE with a Heun tail whatever the solver; adaptive solvers (dopri5, ...) take the
evaluations their tolerance needs, so their counted NFE need not match the budget.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .. import metrics, rewards, sampling
from ..align import guidance, search
from ..align.demon import DEMON_TYPES, auto_beta, demon_steps, rollout_steps, sample_demon
from ..align.smc import sample_smc, tempering_schedule
from ..models import toy
from ..testing import CountingDenoiser
from ..utils import atomic_write

CLASS_NAME = "bag"
BUDGETS = (40, 80, 160, 320)
KEYS = ("method", "reward_name", "budget_nfe", "nfe", "reward", "reward_sem", "heldout_reward", "diversity",
        "fidelity_fd", "seconds")
FAMILIES = ("plain", "best_of_n", "demon", "smc", "guidance", "search")
BASE_STEPS, SEARCH_STEPS, DEMON_GRIDS, SMC_GRIDS = 20, 10, (20, 16, 12), (20, 10, 5)
ROLLOUT_C_STEPS, ODE_AFTER = 2, 0.11
DEFAULT_ALPHA = {"logit": 1.0, "jpeg": 0.02}  # SMC temperature α per built-in reward (its scale)
DEFAULT_SCALE = {"logit": 2.0}  # guidance strength s per built-in differentiable reward


@dataclass
class Task:
    """One reward's run: the counting model, the reward, its flags and the shared standard-normal noises."""
    pipe: toy.ToyPipeline
    model: CountingDenoiser
    reward: Callable[[Tensor], Tensor]
    differentiable: bool
    noise: Tensor
    sampler: str
    alpha: float
    scale: float
    seed: int


# ------------------------------------------------------------------------------------ cost formulas

def ode_rows(sampler: str, steps: int) -> int:
    """Network rows of ``odeint`` over ``steps`` steps: (steps − 1) solver steps and the final Euler step."""
    return (steps - 1) * sampling.NFE_PER_STEP.get(sampler, 1) + 1


def fit_steps(sampler: str, budget: float, per_row: int = 1, most: int | None = None) -> int | None:
    """The most steps (≥ 2, ≤ ``most``) whose ``per_row``·``ode_rows`` fits ``budget``; None if none does."""
    steps = 2 if per_row * ode_rows(sampler, 2) <= budget else None
    while steps is not None and (most is None or steps < most) and per_row * ode_rows(sampler, steps + 1) <= budget:
        steps += 1
    return steps


def demon_rows(sigmas: Tensor, K: int, lookahead: str, sampler: str) -> int:
    """Rows per image of ``sample_demon`` here: per Demon step 2 + K + K·L, then the Heun tail 2m − 1.

    L = 1 for the Tweedie look-ahead, ``ode_rows`` of the rollout (``rollout_steps`` with c = 2) else.
    """
    steps = demon_steps(sigmas, ODE_AFTER)
    rows = 2 * (len(sigmas) - 1 - steps) - 1
    for i in range(steps):
        n = rollout_steps(float(sigmas[i + 1]), float(sigmas[-2]), float(sigmas[0]), ROLLOUT_C_STEPS)
        rows += 2 + K + K * (1 if lookahead == "tweedie" else ode_rows(sampler, n))
    return rows


def smc_rows(steps: int, n: int, guided: bool) -> tuple[int, int]:
    """(forward, backward) rows per image of ``sample_smc``: N per step, and N backward per guided step.

    A guided step differentiates unless it is the last or its next tempering λ is 0 (DAS's exp schedule).
    """
    lam = tempering_schedule("exp", steps)[:steps].clone()
    lam[-1] = 1.0
    return n * steps, n * int((lam[1:] > 0).sum()) if guided else 0


def demon_config(pipe, budget: float, lookahead: str, sampler: str) -> tuple[Tensor, int] | None:
    """(σ grid, K) for Demon: the first grid of ``DEMON_GRIDS`` where K = 2 fits, with the largest K that fits."""
    for steps in DEMON_GRIDS:
        sigmas = pipe.sigmas(steps)
        if demon_rows(sigmas, 2, lookahead, sampler) <= budget:
            K = 2
            while K < 256 and demon_rows(sigmas, K + 1, lookahead, sampler) <= budget:
                K += 1
            return sigmas, K
    return None


def smc_config(budget: float, guided: bool) -> tuple[int, int] | None:
    """(steps, particles N ≥ 2): the first grid of ``SMC_GRIDS`` where two particles fit, N as large as fits."""
    for steps in SMC_GRIDS:
        if sum(smc_rows(steps, 2, guided)) <= budget:
            return steps, int(budget // sum(smc_rows(steps, 1, guided)))
    return None


def _search_plan(sampler: str, budget: float) -> tuple[int, int, int] | None:
    """(steps, neighbours per round, rounds) of the zero-order search, or None below two samples."""
    steps = fit_steps(sampler, budget, most=SEARCH_STEPS)
    samples = 0 if steps is None else int(budget // ode_rows(sampler, steps))
    if samples < 2:
        return None
    count = 4 if samples >= 9 else 2 if samples >= 3 else 1
    return steps, count, (samples - 1) // count


def formula_nfe(name: str, pipe, budget: int, sampler: str = "heun") -> float | None:
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
        plan = _search_plan(sampler, budget)
        return None if plan is None else (1 + plan[1] * plan[2]) * ode_rows(sampler, plan[0])
    if family == "demon":
        config = demon_config(pipe, budget, name.split("-")[2], sampler)
        return None if config is None else demon_rows(config[0], config[1], name.split("-")[2], sampler)
    config = smc_config(budget, guided="-das-" in name)
    return None if config is None else sum(smc_rows(config[0], config[1], guided="-das-" in name))


# ------------------------------------------------------------------------------------------ methods

def _generator(task: Task, name: str, budget: int) -> torch.Generator:
    """A generator seeded by the run's seed, the method and the budget (independent of method order)."""
    return torch.Generator().manual_seed(task.seed * 1_000_003 + zlib.crc32(f"{name}|{budget}".encode()))


def _sampler(task: Task, steps: int, model=None) -> Callable[[Tensor], Tensor]:
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
    return None if steps is None else (_sampler(task, steps)(task.noise), 0, f"{steps} steps")


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
    x0, _, _ = search.random_search(_sampler(task, steps), task.reward, _noises(task, n, generator))
    return x0, 0, f"N={n}, {steps} steps"


def best_of_n(task: Task, budget: int, generator):
    """Best-of-N on the usual 20-step grid (fewer steps only when one sample does not fit)."""
    return _random_search(task, budget, generator, BASE_STEPS)


def search_random(task: Task, budget: int, generator):
    """Ma et al.'s random search over initial noises, on cheaper 10-step samples (more noises per budget)."""
    return _random_search(task, budget, generator, SEARCH_STEPS)


def search_zero_order(task: Task, budget: int, generator, step: float = 0.5):
    """Ma et al.'s zero-order search: rounds of neighbours around the best noise so far, 10-step samples."""
    plan = _search_plan(task.sampler, budget)
    if plan is None:
        return None
    steps, count, iterations = plan
    x0, _, _ = search.zero_order_search(_sampler(task, steps), task.reward, task.noise, iterations=iterations,
                                        count=count, step=step, generator=generator)
    return x0, 0, f"{iterations}×{count} neighbours, λ={step}, {steps} steps"


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
                          demon_type=demon_type, r_of_c="consistency" if lookahead == "tweedie" else "baseline",
                          c_steps=ROLLOUT_C_STEPS, ode_after=ODE_AFTER, sampler=rollout, generator=generator,
                          disable=True)
        return x0, 0, f"K={K}, {len(sigmas) - 1} steps, β={beta:.3g}"
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
    return _sampler(task, steps, guided)(task.noise), guided.backward_rows, f"s={task.scale:g}, {steps} steps"


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
}


# ------------------------------------------------------------------------------------------- scores

def png_size_kb(images: list) -> list[float]:
    """Size in kB of each image saved as PNG (lossless: another coder than the JPEG reward's)."""
    sizes = []
    for im in images:
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        sizes.append(buffer.tell() / 1000)
    return sizes


def builtin_rewards(pipe, class_name: str, heldout) -> dict[str, tuple[Callable, Callable, str]]:
    """name → (target reward, held-out reward, key of the α/scale defaults) for the built-in rewards.

    The logit's held-out twin is the held-out classifier's logit of the same class; the JPEG size's
    is the PNG size (−kB both), which rewards simple images without JPEG's quantisation blocks.
    """
    index = pipe.class_names.index(class_name)
    return {f"logit-{class_name}": (toy.classifier_reward(pipe, class_name), lambda x: heldout(x)[:, index], "logit"),
            "jpeg": (rewards.jpeg_compressibility(pipe.decode),
                     rewards.pil_reward(lambda pils: [-s for s in png_size_kb(pils)]), "jpeg")}


def is_differentiable(reward: Callable, pipe) -> bool:
    """Whether ``reward`` returns a tensor with a gradient on a probe input (one reward call, no network)."""
    probe = torch.zeros(1, *pipe.latent_shape, device=pipe.device, requires_grad=True)
    with torch.enable_grad():
        try:
            r = reward(probe)
        except Exception:
            return False
    return isinstance(r, Tensor) and r.requires_grad


def reference_features(pipe, heldout, class_name: str | None) -> np.ndarray:
    """Held-out classifier features of the shipped eval slice: the images of ``class_name``, or all."""
    x, y = toy.load_fashion_mnist("eval")
    if class_name is not None:
        x = x[y == pipe.class_names.index(class_name)]
    return metrics.features(heldout, x.to(pipe.device))


def score(x0: Tensor, pipe, reward, heldout_reward, heldout, ref: np.ndarray) -> dict:
    """Target and held-out rewards ``[B]``, diversity, distinct-class fraction and FD of samples ``x0``."""
    with torch.no_grad():
        r = rewards.check_rewards(reward(x0), len(x0), "reward")
        images = pipe.decode(x0).clamp(-1, 1)
        h = rewards.check_rewards(heldout_reward(images), len(x0), "held-out reward")
        labels = heldout(images).argmax(1)
    f = metrics.features(heldout, images)
    return dict(reward=r, heldout=h, diversity=metrics.mean_pairwise_distance(f),
                distinct=metrics.distinct_fraction(labels, len(pipe.class_names)),
                fd=metrics.frechet_distance(f, ref) if len(f) >= 2 else math.nan)


# ------------------------------------------------------------------------------------------ the run

def check_args(budgets, images: int, sampler: str, class_name: str, methods) -> list[str]:
    """Fail early on bad arguments (each message names its argument); return the method names to run."""
    if not budgets or not all(isinstance(b, int) and b >= 1 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive ints (NFE per image), got {budgets!r}")
    if not isinstance(images, int) or images < 2:
        raise ValueError(f"images must be an int >= 2 (per method and budget), got {images!r}")
    sampling.check_method(sampler)
    if class_name not in toy.FASHION_CLASSES:
        raise ValueError(f"class_name must be one of {', '.join(toy.FASHION_CLASSES)}, got {class_name!r}")
    names = list(METHODS) if methods is None else [m for m in METHODS if any(m == p or m.startswith(p + "-")
                                                                         for p in methods)]
    unknown = [p for p in methods or () if not any(m == p or m.startswith(p + "-") for m in METHODS)]
    if unknown or not names:
        raise ValueError(f"methods must be names or families of {', '.join(METHODS)}; got {unknown or methods}")
    return names


def _resolve_rewards(pipe, spec, class_name: str, heldout_classifier) -> dict:
    """Reward spec → name → (reward, held-out reward, α, s): "logit"/"jpeg" or user ``reward(x0)`` callables.

    A user reward's held-out twin is the held-out classifier's top log-probability (the sample still
    looks like some garment) unless given as a ``(reward, heldout_reward)`` pair.
    """
    builtin = builtin_rewards(pipe, class_name, heldout_classifier)
    short = {"logit": f"logit-{class_name}", "jpeg": "jpeg"}
    items = {s: s for s in spec} if isinstance(spec, (list, tuple)) else dict(spec)
    out = {}
    for name, value in items.items():
        if isinstance(value, str):
            if value not in short:
                raise ValueError(f"rewards must be 'logit', 'jpeg' or reward(x0) callables, got {value!r}")
            reward, held, key = builtin[short[value]]
            out[short[value]] = (reward, held, DEFAULT_ALPHA[key], DEFAULT_SCALE.get(key, 0.0))
            continue
        reward, held = value if isinstance(value, tuple) else (value, None)
        if not callable(reward):
            raise TypeError(f"rewards[{name!r}] must be a callable reward(x0) -> Tensor[B], got {type(reward).__name__}")
        held = held or (lambda x: heldout_classifier(x).log_softmax(1).max(1).values)
        out[name] = (reward, held, 1.0, 1.0)
    return out


def run_cell(task: Task, name: str, budget: int) -> tuple[Tensor, float, str, float] | None:
    """Run method ``name`` at ``budget``: (x0, counted NFE per image, hyper-parameters, seconds per image)."""
    task.model.rows = 0
    start = time.perf_counter()
    out = METHODS[name](task, budget, _generator(task, name, budget))
    if out is None:
        return None
    x0, backward, hyper = out
    seconds = (time.perf_counter() - start) / len(task.noise)
    return x0.detach(), (task.model.rows + backward) / len(task.noise), hyper, seconds


def run_arena(out: str | os.PathLike | None = "arena_out", *, rewards=("logit", "jpeg"), budgets=BUDGETS,
              images: int = 8, methods=None, class_name: str = CLASS_NAME, sampler: str = "heun", seed: int = 0,
              quick: bool = False, log: Callable[[str], None] | None = None, device="cpu") -> list[dict]:
    """Every method at every budget on every reward; writes arena.json/.md, pareto.png and grids to ``out``.

    Args:
        rewards: names (``"logit"``: the shipped classifier's logit of ``class_name``, differentiable;
            ``"jpeg"``: −JPEG kB) or a dict name → ``reward(x0)`` or ``(reward, heldout_reward)``.
        budgets: NFE per image; a method whose cheapest setting does not fit a budget has no row there.
        methods: names or families of ``METHODS`` (default all).
        quick: budgets (40, 80) and 3 images, for a smoke run.
        out: output folder, or None to write nothing.
    Returns the rows of ``arena.json`` (exactly the keys ``KEYS``).
    """
    if quick:
        budgets, images = (40, 80), 3
    names = check_args(list(budgets), images, sampler, class_name, methods)
    pipe = toy.load("fashion", device)
    heldout = toy.load_heldout_classifier(device)
    noise = torch.randn(images, *pipe.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rows, details, grids = [], [], {}
    for reward_name, (reward, held, alpha, scale) in _resolve_rewards(pipe, rewards, class_name, heldout).items():
        differentiable = is_differentiable(reward, pipe)
        ref = reference_features(pipe, heldout, class_name if reward_name.startswith("logit-") else None)
        model = CountingDenoiser(pipe.null_denoiser())
        task = Task(pipe, model, reward, differentiable, noise, sampler, alpha, scale, seed)
        for name in names:
            for budget in budgets:
                cell = run_cell(task, name, budget)
                if cell is None:
                    continue
                x0, nfe, hyper, seconds = cell
                s = score(x0, pipe, reward, held, heldout, ref)
                rows.append(dict(method=name, reward_name=reward_name, budget_nfe=budget, nfe=nfe,
                                 reward=s["reward"].mean().item(),
                                 reward_sem=(s["reward"].std() / math.sqrt(images)).item(),
                                 heldout_reward=s["heldout"].mean().item(), diversity=s["diversity"],
                                 fidelity_fd=s["fd"], seconds=seconds))
                details.append(dict(hyper=hyper, distinct=s["distinct"]))
                if budget == max(budgets):
                    grids.setdefault(name, {})[reward_name] = (pipe.decode(x0).clamp(-1, 1).cpu(), s["reward"])
                if log is not None:
                    r = rows[-1]
                    log(f"  {reward_name:<10} {name:<24} B={budget:<4} NFE {nfe:6.1f}  reward {r['reward']:+.3f}"
                        f" ± {r['reward_sem']:.3f}  held-out {r['heldout_reward']:+.3f}  div {r['diversity']:.2f}"
                        f"  FD {r['fidelity_fd']:.1f}  {seconds:.2f} s/img  ({hyper})")
    if out is not None:
        write_outputs(Path(out), rows, details, grids, images=images, sampler=sampler, seed=seed)
    return rows


# ------------------------------------------------------------------------------------------ outputs

def markdown(rows: list[dict], details: list[dict], *, images: int, sampler: str, seed: int) -> str:
    """The arena table: one section per reward, one line per method and budget."""
    lines = [f"# Arena: {images} images per cell, solver `{sampler}`, seed {seed}", "",
             "NFE = counted network rows per image (a backward pass counts as one); reward ± s.e.m. over images; "
             "held-out = the reward's held-out twin; diversity = mean pairwise distance of held-out classifier "
             "features (distinct = distinct predicted classes / min(images, 10)); FD = Fréchet distance of "
             "those features to the real images of the eval slice; seconds per image.", ""]
    for reward_name in dict.fromkeys(r["reward_name"] for r in rows):
        lines += [f"## {reward_name}", "",
                  "| method | budget | NFE | reward | held-out | diversity | distinct | FD | s/img | settings |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r, d in zip(rows, details):
            if r["reward_name"] == reward_name:
                lines.append(f"| {r['method']} | {r['budget_nfe']} | {r['nfe']:.1f} | {r['reward']:+.3f} ± "
                             f"{r['reward_sem']:.3f} | {r['heldout_reward']:+.3f} | {r['diversity']:.2f} | "
                             f"{d['distinct']:.2f} | {r['fidelity_fd']:.1f} | {r['seconds']:.2f} | {d['hyper']} |")
        lines.append("")
    return "\n".join(lines)


def save_pareto(rows: list[dict], path: Path) -> None:
    """Target reward against held-out reward and against diversity, one marker per method and budget."""
    import matplotlib.pyplot as plt
    reward_names = list(dict.fromkeys(r["reward_name"] for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    markers = dict(zip(FAMILIES, "os^DvP"))
    fig, axes = plt.subplots(len(reward_names), 2, figsize=(11, 4 * len(reward_names)), squeeze=False)
    for ax_row, reward_name in zip(axes, reward_names):
        for ax, key, label in zip(ax_row, ("heldout_reward", "diversity"), ("held-out reward", "diversity")):
            for colour, name in zip(colours, names):
                pts = [r for r in rows if r["method"] == name and r["reward_name"] == reward_name]
                if pts:
                    ax.plot([p["reward"] for p in pts], [p[key] for p in pts], "-", color=colour, lw=0.8, alpha=0.6)
                    ax.scatter([p["reward"] for p in pts], [p[key] for p in pts], color=colour,
                               s=[12 * math.log2(p["budget_nfe"] / 10 + 1) ** 2 for p in pts],
                               marker=markers[name.split("-")[0]], label=name)
            ax.set(xlabel=f"target reward ({reward_name})", ylabel=label, title=f"{reward_name}: reward vs {label}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, title="marker size ∝ log budget")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def save_grid(images: dict[str, tuple[Tensor, Tensor]], path: Path, title: str) -> None:
    """One row per reward of the samples, each titled with its target reward."""
    import matplotlib.pyplot as plt
    cols = max(len(x) for x, _ in images.values())
    fig, axes = plt.subplots(len(images), cols, figsize=(1.1 * cols + 0.6, 1.3 * len(images) + 0.4), squeeze=False)
    for ax_row, (reward_name, (x, r)) in zip(axes, images.items()):
        for j, ax in enumerate(ax_row):
            ax.axis("off")
            if j < len(x):
                ax.imshow(x[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_title(f"{r[j]:.2f}", fontsize=7)
        ax_row[0].text(-0.15, 0.5, reward_name, transform=ax_row[0].transAxes, rotation=90, va="center",
                       ha="right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], details: list[dict], grids: dict, *, images: int, sampler: str,
                  seed: int) -> None:
    """arena.json, arena.md, pareto.png and ``<method>.png`` (the largest budget's samples) into ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "arena.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
    text = markdown(rows, details, images=images, sampler=sampler, seed=seed)
    atomic_write(out / "arena.md", lambda tmp: tmp.write_text(text))
    if rows:
        save_pareto(rows, out / "pareto.png")
    for name, by_reward in grids.items():
        save_grid(by_reward, out / f"{name}.png", f"{name}: largest budget, same noises")


# ---------------------------------------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    """Register ``kdiff-align arena`` on an argparse sub-parser set."""
    p = sub.add_parser("arena", help="every alignment method at equal NFE: reward, held-out reward, diversity, FD",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="arena_out", help="output folder (default: arena_out)")
    p.add_argument("--quick", action="store_true", help="budgets 40 and 80, 3 images (under 3 minutes)")
    p.add_argument("--budgets", nargs="+", default=None, help=f"NFE per image (default: {' '.join(map(str, BUDGETS))})")
    p.add_argument("--images", default=None, help="images per method and budget (default: 8)")
    p.add_argument("--rewards", nargs="+", default=["logit", "jpeg"], help="logit and/or jpeg (default: both)")
    p.add_argument("--class", dest="class_name", default=CLASS_NAME, help=f"target class (default: {CLASS_NAME})")
    p.add_argument("--sampler", default="heun", help=f"ODE solver, one of {', '.join(sampling.METHODS)}")
    p.add_argument("--methods", nargs="+", default=None, help="method names or families (default: all)")
    p.add_argument("--seed", default="0", help="seed of every noise (default: 0)")
    p.add_argument("--threads", default="1", help="torch intra-op threads (default: 1)")
    p.set_defaults(func=cli_main)


def _ints(values, name: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{name} must be integers, got {' '.join(values)}") from None


def cli_main(args) -> int:
    """``kdiff-align arena``: run, print one line per cell, write the folder; a bad argument is one line, exit 2."""
    try:
        budgets = _ints(args.budgets, "--budgets") if args.budgets else list(BUDGETS)
        images = _ints([args.images], "--images")[0] if args.images is not None else 8
        seed, threads = _ints([args.seed], "--seed")[0], _ints([args.threads], "--threads")[0]
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        bad = [r for r in args.rewards if r not in ("logit", "jpeg")]
        if bad:
            raise ValueError(f"--rewards must be logit and/or jpeg, got {' '.join(bad)}")
        check_args(budgets, images, args.sampler, args.class_name, args.methods)
    except ValueError as error:
        print(f"kdiff-align arena: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows = run_arena(args.out, rewards=tuple(args.rewards), budgets=budgets, images=images, methods=args.methods,
                     class_name=args.class_name, sampler=args.sampler, seed=seed, quick=args.quick,
                     log=lambda line: print(line, flush=True))
    print(f"wrote {len(rows)} rows to {Path(args.out) / 'arena.json'}, arena.md, pareto.png and one grid per method "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
