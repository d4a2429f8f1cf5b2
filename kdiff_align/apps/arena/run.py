"""The arena run: every method at every budget on every reward, scored on the same noises (``run_arena``)."""
from __future__ import annotations

import math
import os
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ... import sampling
from ...models import toy
from ...testing import CountingDenoiser
from .methods import METHODS, Task
from .report import write_outputs
from .scores import is_differentiable, reference_features, resolve_rewards, score

CLASS_NAME = "bag"
BUDGETS = (40, 80, 160, 320)
KEYS = ("method", "reward_name", "budget_nfe", "nfe", "reward", "reward_sem", "heldout_reward", "diversity",
        "fidelity_fd", "seconds")


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


def cell_generator(task: Task, name: str, budget: int) -> torch.Generator:
    """A generator seeded by the run's seed, the method and the budget (independent of method order)."""
    return torch.Generator().manual_seed(task.seed * 1_000_003 + zlib.crc32(f"{name}|{budget}".encode()))


def run_cell(task: Task, name: str, budget: int) -> tuple[Tensor, float, str, float] | None:
    """Run method ``name`` at ``budget``: (x0, counted NFE per image, hyper-parameters, seconds per image)."""
    task.model.rows = 0
    start = time.perf_counter()
    out = METHODS[name](task, budget, cell_generator(task, name, budget))
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
    for reward_name, (reward, held, alpha, scale) in resolve_rewards(pipe, rewards, class_name, heldout).items():
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
