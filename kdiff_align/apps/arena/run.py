"""The arena run: every method at every budget on every reward, scored on the same noises (``run_arena``)."""
from __future__ import annotations

import argparse
import math
import os
import re
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

from ... import sampling
from ...image import from_pil, to_pil
from ...models import toy
from ...testing import CountingDenoiser
from ...utils import CountingReward, nfe_summary
from .. import cliargs, experiment
from .methods import METHODS, Task
from .report import table_rows, write_outputs
from .scores import is_differentiable, reference_features, resolve_rewards, score

CLASS_NAME = "bag"
BUDGETS = (40, 80, 160, 320)


def check_args(budgets, images: int, sampler, class_name: str, methods) -> list[str]:
    """Fail early on bad arguments (each message names its argument); return the method names to run."""
    if not budgets or not all(isinstance(b, int) and b >= 1 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive ints (NFE per image), got {budgets!r}")
    if not isinstance(images, int) or images < 2:
        raise ValueError(f"images must be an int >= 2 (per method and budget), got {images!r}")
    sampling.check_method(sampler, tuned=True)
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


def run_cell(task: Task, name: str, budget: int) -> dict | None:
    """Run method ``name`` at ``budget``: x0, counted NFE per image (``utils.nfe_summary``), settings, seconds.

    The NFE is counted: forward rows by the task's ``CountingDenoiser``, backward rows as the method
    reports them, reward calls and rows by a ``CountingReward`` around the reward the method receives
    (calls for the whole batch of images, rows per image).
    """
    task.model.rows = 0
    counted = CountingReward(task.reward)
    start = time.perf_counter()
    out = METHODS[name](replace(task, reward=counted), budget, cell_generator(task, name, budget))
    if out is None:
        return None
    x0, backward, hyper = out
    b = len(task.noise)
    nfe = nfe_summary(task.model.rows / b, backward / b, reward_calls=counted.calls, reward_rows=counted.rows)
    return dict(x0=x0.detach(), nfe=nfe["total"], reward_calls=nfe["reward_calls"], reward_rows=counted.rows / b,
                hyper=hyper, seconds=(time.perf_counter() - start) / b)


def cell_name(reward_name: str, method: str, budget: int) -> str:
    """The run folder's name of one (reward, method, budget) cell, e.g. ``classifier-bag_plain-ode_b40``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{reward_name}_{method}_b{budget}")


def check_out(out) -> Path:
    """Fail before any work when ``out`` cannot be the run folder (a file, or a place that takes no new files)."""
    try:
        return cliargs.out_dir(os.fspath(out))
    except (argparse.ArgumentTypeError, TypeError) as error:
        raise ValueError(f"out: {error}") from None


def run_arena(out: str | os.PathLike | None = "arena_out", *, rewards=("classifier", "jpeg-small"), budgets=BUDGETS,
              images: int = 8, methods=None, class_name: str = CLASS_NAME, sampler="heun", seed: int = 0,
              quick: bool = False, strengths: dict | None = None, log: Callable[[str], None] | None = None,
              device="cpu") -> list[dict]:
    """Every method at every budget on every reward; writes arena.json/.md, pareto.png and grids to ``out``.

    Each finished (reward, method, budget) cell is written to ``out`` as it completes (an
    ``experiment.Experiment`` folder: its record in ``steps.jsonl``, its samples in ``images/``), so
    an interrupted run keeps what is done and the same call resumes it; other settings need a new folder.

    Args:
        rewards: reward specs of the command line (``"classifier"`` — the shipped classifier's logit of
            ``class_name`` — or ``"classifier:CLASS"``, ``"jpeg-small"``, ``"jpeg-large"``, ``"brightness"``,
            ``"contrast"``; ``"logit"`` and ``"jpeg"`` are old names) or a dict name → ``reward(x0)`` or
            ``(reward, heldout_reward)``.
        budgets: NFE per image; a method whose cheapest setting does not fit a budget has no row there.
        methods: names or families of ``METHODS`` (default all).
        sampler: the PF-ODE solver of every method's ODE runs: a ``sampling.METHODS`` name or a
            ``sampling.TunedSampler`` (its grid and counted NFE replace the methods' step counts; Demon's
            rollouts use it, its tail stays Heun; its tuning cost goes to ``tuning.json``, apart).
        quick: budgets (40, 80) and 3 images, for a smoke run.
        strengths: overrides of the methods' strengths for every reward: ``alpha`` (SMC's tilt
            p·exp(r/α); default 1 for the classifier, 0.02 for JPEG sizes), ``scale`` (guidance's s;
            default 1/α, the same tilt), ``tau`` (Demon's temperature, default ``"adaptive"``) and
            ``step`` (the zero-order search's λ, default 0.5).
        out: output folder, or None to write nothing.
    Returns the rows of ``arena.json`` (exactly the keys ``KEYS``).
    """
    if quick:
        budgets, images = (40, 80), 3
    names = check_args(list(budgets), images, sampler, class_name, methods)
    strengths = check_strengths(strengths)
    folder = None if out is None else check_out(out)
    pipe = toy.load("fashion", device)
    check_tuned(sampler, pipe)
    heldout = toy.load_heldout_classifier(device)
    resolved = resolve_rewards(pipe, rewards, class_name, heldout)
    label, tuning = sampler_record(sampler)
    config = dict(rewards=list(resolved), budgets=list(budgets), images=images, methods=names,
                  sampler=label if tuning is None else sampler.to_dict(), seed=seed,
                  **({"strengths": strengths} if strengths else {}))
    exp = None if folder is None else open_run(folder, config)
    noise = torch.randn(images, *pipe.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    records, finished = [], finished_cells(exp)
    for reward_name, spec in resolved.items():
        task = Task(pipe, CountingDenoiser(pipe.null_denoiser()), spec.reward, is_differentiable(spec.reward, pipe),
                    noise, sampler, spec.alpha, spec.scale, seed)
        task = replace(task, **strengths)
        ref = reference_features(pipe, heldout, spec.ref_class)
        for name in names:
            for budget in budgets:
                record = finished.get(cell_name(reward_name, name, budget)) or \
                    cell_record(exp, task, spec, heldout, ref, (reward_name, name, budget))
                if record is not None:
                    records.append(record)
                    if log is not None:
                        log(progress_line(record))
    if exp is not None:
        write_outputs(folder, records, grids(exp, records, max(budgets)), images=images, sampler=label, seed=seed,
                      tuning=tuning)
        exp.mark_complete()
    return table_rows(records)


def check_tuned(sampler, pipe) -> None:
    """A tuned sampler must start at the arena model's σ_max (its grid, and so its counted NFE, is for that)."""
    start, sigma_max = (float(sampler.sigmas[0]), float(pipe.sigmas(2)[0])) if sampling.is_tuned(sampler) else (1, 1)
    if abs(start / sigma_max - 1) > 1e-4:
        raise ValueError(f"sampler: a tuned grid from sigma_max={sigma_max:g} (tune it on toy:fashion), "
                         f"got one from {start:g}")


def sampler_record(sampler) -> tuple[str, dict | None]:
    """The solver's label, and for a tuned sampler its one-off tuning cost (NFE, seconds if recorded)."""
    label = cliargs.sampler_label(sampler)
    if not sampling.is_tuned(sampler):
        return label, None
    return label, dict(sampler=label, method=sampler.method, nfe=sampler.nfe, tuning_nfe=sampler.tuning_nfe,
                       tuning_rows=sampler.info.get("tuning_rows"), calibration=sampler.info.get("calibration"),
                       seconds=sampler.info.get("seconds"))


def check_strengths(strengths: dict | None) -> dict:
    """``strengths`` as a dict of known keys with valid values (α, s, λ > 0; τ > 0 or "adaptive")."""
    strengths = dict(strengths or {})
    unknown = sorted(set(strengths) - {"alpha", "scale", "tau", "step"})
    if unknown:
        raise ValueError(f"strengths keys must be alpha, scale, tau, step; got {unknown}")
    for key, value in strengths.items():
        if not (key == "tau" and value == "adaptive") and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"strengths[{key!r}] must be a positive number{' or adaptive' * (key == 'tau')}, "
                             f"got {value!r}")
    return strengths


def open_run(folder: Path, config: dict):
    """The run folder (``experiment.Experiment``), marked INCOMPLETE until the report is written."""
    exp = experiment.Experiment(folder, config, reconfigure_empty=True)
    exp.mark_incomplete("rerun the same command to finish this arena run (finished cells are kept)")
    return exp


def finished_cells(exp) -> dict[str, dict]:
    """The records of the cells an earlier run of this folder finished (none without a folder)."""
    if exp is None:
        return {}
    return {r["item"]: r for r in exp.steps() if r.get("kind") == "cell" and r.get("item") in exp.finished}


def cell_record(exp, task: Task, spec, heldout, ref, key: tuple[str, str, int]) -> dict | None:
    """Run one (reward, method, budget) cell, score it and save it to ``exp`` at once (None: no setting fits)."""
    reward_name, name, budget = key
    cell = run_cell(task, name, budget)
    if cell is None:
        return None
    s = score(cell["x0"], task.pipe, spec.reward, spec.heldout, heldout, ref)
    b = len(task.noise)
    record = dict(kind="cell", method=name, reward_name=reward_name, budget_nfe=budget, nfe=cell["nfe"],
                  reward_calls=cell["reward_calls"], reward_rows=cell["reward_rows"],
                  reward=s["reward"].mean().item(), reward_sem=(s["reward"].std() / math.sqrt(b)).item(),
                  heldout_reward=s["heldout"].mean().item(), diversity=s["diversity"], fidelity_fd=s["fd"],
                  seconds=cell["seconds"], hyper=cell["hyper"], distinct=s["distinct"],
                  rewards=s["reward"].tolist(), heldout_rewards=s["heldout"].tolist())
    if exp is not None:
        exp.log(record, item=cell_name(*key))
        exp.save_image(cell_name(*key), strip(task.pipe.decode(cell["x0"]).clamp(-1, 1)))
    return record


def strip(images: Tensor):
    """``[B, C, H, W]`` images in [-1, 1] side by side as one PIL image (a cell's samples in the run folder)."""
    return to_pil(torch.cat(list(images.cpu()), dim=-1)[None])[0]


def grids(exp, records: list[dict], budget: int) -> dict:
    """method → reward → (images, rewards) of each method's cells at ``budget``, read back from the run folder."""
    out = {}
    for r in records:
        if r["budget_nfe"] == budget:
            with Image.open(exp.image_path(cell_name(r["reward_name"], r["method"], budget))) as im:
                x = from_pil(im.convert("L"))
            out.setdefault(r["method"], {})[r["reward_name"]] = (torch.stack(x[0].chunk(len(r["rewards"]), dim=-1)),
                                                                   torch.tensor(r["rewards"]))
    return out


def progress_line(r: dict) -> str:
    """One line per finished cell: the table's numbers and the settings."""
    return (f"  {r['reward_name']:<15} {r['method']:<24} B={r['budget_nfe']:<4} NFE {r['nfe']:6.1f}  reward "
            f"{r['reward']:+.3f} ± {r['reward_sem']:.3f}  held-out {r['heldout_reward']:+.3f}  div "
            f"{r['diversity']:.2f}  FD {r['fidelity_fd']:.1f}  {r['seconds']:.2f} s/img  ({r['hyper']})")
