"""The main job, ``kdiff-align demo``: plain sampling and reward alignment on the shipped Fashion-MNIST model.

For each reward (the classifier logit of ``CLASS_NAME``, differentiable; the JPEG compressibility,
non-differentiable) every entry of ``methods()`` turns the same initial noises into images; the demo
writes one image grid per method, a reward-against-NFE plot and ``results.json``, and prints a table.

A method entry is ``fn(pipe, x_T, reward, generator, disable, steps) -> (images, nfe)``: ``x_T`` is
``[B, *latent_shape]`` noise at σ_max, ``reward(x0) -> [B]``, ``nfe`` the network evaluations spent
per output image: a number of forward evaluations, or ``utils.nfe_summary(forward, backward)`` for a
method that backpropagates through the network (``results.json`` holds ``nfe_forward``,
``nfe_backward`` and ``nfe``, their total in forward equivalents). Add an alignment method by adding
one entry to the dict returned by ``methods``.

``constrained_baselines()`` are methods that follow a constraint instead of the reward (inexact-Newton
inpainting: the left half is fixed): they run once, are scored under every reward for reference, and
their grid shows the constraint (the fixed half) above the completions; the table and the plot label
them as constrained baselines that ignore the reward.
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import rewards, sampling
from ..align import search
from ..align.demon import auto_beta, sample_demon
from ..align.newton import Mask, linear_residual, sample_constrained
from ..align.smc import sample_smc
from ..models import toy
from ..testing import CountingDenoiser
from ..utils import atomic_write, nfe_summary

CLASS_NAME = "bag"


def unconditional(pipe) -> CountingDenoiser:
    """The pipeline's null-class denoiser D(x, σ), counting the rows it evaluates."""
    return CountingDenoiser(pipe.null_denoiser())


def plain(pipe, x_T: Tensor, reward, generator, disable, steps: int) -> tuple[Tensor, float]:
    """Plain PF-ODE sampling (Heun), ignoring the reward."""
    model = unconditional(pipe)
    x0 = sampling.odeint(model, x_T, pipe.sigmas(steps), disable=disable)
    return x0, model.rows / x_T.shape[0]


def best_of_n(pipe, x_T: Tensor, reward, generator, disable, steps: int, n: int = 4) -> tuple[Tensor, float]:
    """Best-of-N: N independent plain samples per output (``x_T`` and N − 1 fresh noises), keep the best."""
    b, model, sigmas = x_T.shape[0], unconditional(pipe), pipe.sigmas(steps)
    extra = torch.randn((n - 1) * b, *x_T.shape[1:], generator=generator, dtype=x_T.dtype) * pipe.init_sigma
    starts = torch.cat([x_T, extra.to(x_T.device)]).view(n, b, *x_T.shape[1:])
    x0, _, _ = search.random_search(lambda x: sampling.odeint(model, x, sigmas, disable=disable), reward, starts)
    return x0, model.rows / b


def demon(pipe, x_T: Tensor, reward, generator, disable, steps: int, K: int = 4) -> tuple[Tensor, float]:
    """Sampling Demon (tanh, adaptive τ, one-step x̂₀ look-ahead, K candidates per step)."""
    model, sigmas = unconditional(pipe), pipe.sigmas(steps)
    x0 = sample_demon(model, x_T, sigmas, reward, K=K, beta=auto_beta(sigmas), generator=generator, disable=disable)
    return x0, model.rows / x_T.shape[0]


def smc_steering(pipe, x_T: Tensor, reward, generator, disable, steps: int, n: int = 4,
                 alpha: float = 0.1) -> tuple[Tensor, float]:
    """SMC / FK steering (gradient-free prior proposal, tempered twist): N particles, one drawn by weight."""
    model = unconditional(pipe)
    extra = torch.randn(x_T.shape[0], n - 1, *x_T.shape[1:], generator=generator, dtype=x_T.dtype) * pipe.init_sigma
    x = torch.cat([x_T[:, None], extra.to(x_T.device)], 1)
    res = sample_smc(model, x, pipe.sigmas(steps), reward, num_particles=n, alpha=alpha, proposal="prior",
                     select="draw", generator=generator, disable=disable)
    return res.x0, model.rows / x_T.shape[0]


def newton_inpainting(pipe, x_T: Tensor, generator, disable, steps: int, n_iter: int = 3) -> tuple[Tensor, float, dict]:
    """Inexact-Newton inpainting (forward passes only): the left half is fixed to a class-conditional sample of
    ``CLASS_NAME`` (its calls counted too), the rest completed by the unconditional model; ignores the reward.

    Returns the completions, the NFE per image and the constraint ``{"known": [B, ...], "mask": [1, 1, H, W]}``.
    """
    model, b = CountingDenoiser(pipe.denoiser), x_T.shape[0]
    labels = lambda c: {"class_labels": torch.full((b,), c, dtype=torch.long, device=x_T.device)}
    noise = torch.randn(x_T.shape, generator=generator, dtype=x_T.dtype).to(x_T.device) * pipe.init_sigma
    known = sampling.odeint(model, noise, pipe.sigmas(steps), extra_args=labels(pipe.class_names.index(CLASS_NAME)),
                            disable=disable)
    mask = torch.zeros(1, 1, *x_T.shape[-2:], device=x_T.device)
    mask[..., : x_T.shape[-1] // 2] = 1
    x0 = sample_constrained(model, x_T, pipe.sigmas(steps), linear_residual(Mask(mask), known * mask), n_iter=n_iter,
                            extra_args=labels(len(pipe.class_names)), generator=generator, disable=disable)
    return x0, model.rows / b, {"known": known * mask, "mask": mask}


def methods() -> dict[str, Callable]:
    """The demo's methods, in table order: name → ``fn(pipe, x_T, reward, generator, disable, steps)``."""
    return {
        "plain": plain,
        "best-of-4": best_of_n,
        "demon K=4": demon,
        "SMC N=4": smc_steering,
    }


def constrained_baselines() -> dict[str, Callable]:
    """Baselines that follow a constraint, not the reward: name → ``fn(pipe, x_T, generator, disable, steps)``
    returning ``(images, nfe, constraint)``."""
    return {"Newton inpaint": newton_inpainting}


def slug(name: str) -> str:
    """A method's file name stem, lower-case, letters, digits and dashes: ``"demon K=4"`` → ``"demon-k4"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("=", "")).strip("-")


def demo_rewards(pipe) -> dict[str, Callable]:
    """The demo's rewards: a differentiable classifier logit and the non-differentiable JPEG size."""
    return {
        f"logit '{CLASS_NAME}'": toy.classifier_reward(pipe, CLASS_NAME),
        "-JPEG kB": rewards.jpeg_compressibility(pipe.decode),
    }


def grid_rows(images: dict[str, Tensor], scores: dict[str, Tensor]) -> list[tuple[str, Tensor, list[str]]]:
    """The rows of a method's grid: one per reward, or a single row when every reward got the same images
    (a method that ignores the reward), titled with each reward's score of each image."""
    first = next(iter(images.values()))
    if len(images) > 1 and all(torch.equal(x, first) for x in images.values()):
        titles = ["\n".join(f"{scores[name][j]:.2f}" for name in scores) for j in range(len(first))]
        return [("same samples for every reward\n(" + " / ".join(scores) + ")", first, titles)]
    return [(name, x, [f"{s:.2f}" for s in scores[name]]) for name, x in images.items()]


def save_grid(images: dict[str, Tensor], scores: dict[str, Tensor], path: Path, title: str) -> None:
    """One row of images per reward (one row in all when the images do not depend on it), titled with rewards."""
    import matplotlib.pyplot as plt
    rows = grid_rows(images, scores)
    cols = max(len(x) for _, x, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(max(1.3 * cols, 4.0), 1.6 * len(rows) + 0.6), squeeze=False)
    for ax_row, (label, x, titles) in zip(axes, rows):
        for j, ax in enumerate(ax_row):
            ax.axis("off")
            if j < len(x):
                ax.imshow(x[j, 0].clamp(-1, 1).cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_title(titles[j], fontsize=7 if "\n" in titles[j] else 8)
        ax_row[0].text(-0.15, 0.5, label, transform=ax_row[0].transAxes, rotation=90, va="center", ha="right",
                       fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def save_constraint_grid(known: Tensor, mask: Tensor, x0: Tensor, scores: dict[str, Tensor], path: Path,
                         title: str) -> None:
    """A constrained baseline: the constraint (fixed pixels; the free part grey) above the completions."""
    import matplotlib.pyplot as plt
    cols = x0.shape[0]
    fig, axes = plt.subplots(2, cols, figsize=(max(1.3 * cols, 4.0), 3.8), squeeze=False)
    shown = torch.where(mask.bool(), known, torch.zeros_like(known)).cpu()
    edge = int(mask[0, 0, 0].sum()) - 0.5  # the column where the free part starts
    for j in range(cols):
        for row, image in enumerate((shown, x0.cpu())):
            ax = axes[row][j]
            ax.axis("off")
            ax.imshow(image[j, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.axvline(edge, color="red", lw=1, ls="--")
        axes[1][j].set_title("\n".join(f"{scores[name][j]:.2f}" for name in scores), fontsize=7)
    for row, label in enumerate(("constraint:\nleft half fixed", "completion\n(" + " / ".join(scores) + ")")):
        axes[row][0].text(-0.15, 0.5, label, transform=axes[row][0].transAxes, rotation=90, va="center",
                          ha="right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def reward_plot(results: list[dict]):
    """Mean reward (± standard error) against network evaluations per image, one panel per reward;
    constrained baselines (which ignore the reward) are open squares. The legend sits below the panels,
    and the log axis is labelled in plain numbers at doublings (10, 20, 40, 80, 160, not 4×10¹)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    names = list(dict.fromkeys(r["reward"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in results if r["reward"] == name]
        for r in rows:
            baseline = r.get("kind") == "constrained"
            ax.errorbar(r["nfe"], r["mean"], yerr=r["sem"], fmt="s" if baseline else "o", capsize=3,
                        mfc="none" if baseline else None,
                        label=r["method"] + (" (constrained baseline, ignores the reward)" if baseline else ""))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([10 * 2.0 ** k for k in range(-3, 12)]))  # 5, 10, 20, 40, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel="network evaluations per image", ylabel=name, title=name)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    rows_of_legend = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.07 * rows_of_legend + 0.04, 1, 1))
    return fig


def save_plot(results: list[dict], path: Path) -> None:
    """``reward_plot`` written to ``path``."""
    import matplotlib.pyplot as plt
    fig = reward_plot(results)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def run(out: str | os.PathLike = "demo_out", quick: bool = False, disable: bool | None = None, seed: int = 0,
        device="cpu") -> list[dict]:
    """Run every method on every reward, write the grids, the plot and ``results.json``; return the rows."""
    import matplotlib
    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch, steps = (2, 5) if quick else (8, 20)
    pipe = toy.load("fashion", device)
    x_T = pipe.get_init_latent(batch, torch.Generator().manual_seed(seed))
    results, reward_fns = [], demo_rewards(pipe)
    for method, fn in methods().items():
        images, scores = {}, {}
        for reward_name, reward in reward_fns.items():
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:  # reported in the summary, not as Python warnings
                warnings.simplefilter("always")
                x0, nfe = fn(pipe, x_T, reward, torch.Generator().manual_seed(seed + 1), disable, steps)
            seconds = time.perf_counter() - start
            images[reward_name], scores[reward_name] = x0.detach().cpu(), _score(reward, x0, batch, reward_name)
            row = _row(method, reward_name, scores[reward_name], nfe, seconds / batch, "reward")
            results.append({**row, "notes": list(dict.fromkeys(str(w.message) for w in caught))})
        save_grid(images, scores, out / f"{slug(method)}.png",
                  f"{method}: {batch} samples from the same noises, {steps} steps")
    for method, fn in constrained_baselines().items():  # one run: the result does not depend on the reward
        start = time.perf_counter()
        x0, nfe, constraint = fn(pipe, x_T, torch.Generator().manual_seed(seed + 1), disable, steps)
        seconds = time.perf_counter() - start
        scores = {name: _score(reward, x0, batch, name) for name, reward in reward_fns.items()}
        results += [_row(method, name, r, nfe, seconds / batch, "constrained") for name, r in scores.items()]
        save_constraint_grid(constraint["known"], constraint["mask"], x0.detach(), scores, out / f"{slug(method)}.png",
                             f"{method}: constrained baseline, {steps} steps\n"
                             "ignores the reward (scored for reference)")
    save_plot(results, out / "reward_vs_nfe.png")
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    return results


def _score(reward, x0: Tensor, batch: int, name: str) -> Tensor:
    with torch.no_grad():
        return rewards.check_rewards(reward(x0), batch, name).float().cpu()


def _row(method: str, reward: str, r: Tensor, nfe: float | dict, seconds: float, kind: str) -> dict:
    """One results row; ``kind`` is ``reward`` (aligned to it) or ``constrained`` (ignores it); ``nfe`` is a
    forward count or ``utils.nfe_summary``'s dict (the row's ``nfe`` is its total in forward equivalents);
    ``seconds`` is wall time per image, like the NFE."""
    nfe = nfe if isinstance(nfe, dict) else nfe_summary(nfe)  # the NFE rule
    sem = (r.std() / len(r) ** 0.5).item() if len(r) > 1 else 0.0
    return dict(method=method, reward=reward, kind=kind, mean=r.mean().item(), sem=sem, nfe=float(nfe["total"]),
                nfe_forward=nfe["forward"], nfe_backward=nfe["backward"], seconds_per_image=seconds)


def print_table(results: list[dict]) -> None:
    """The results as an aligned text table (NFE and seconds per image); constrained baselines are starred,
    and what a method warned about is a note under the table."""
    print(f"{'method':<17}{'reward':<16}{'mean':>9}{'± sem':>8}{'NFE/img':>9}{'s/img':>8}")
    for r in results:
        star = "*" if r.get("kind") == "constrained" else ""
        print(f"{r['method'] + star:<17}{r['reward']:<16}{r['mean']:>9.3f}{r['sem']:>8.3f}{r['nfe']:>9.0f}"
              f"{r['seconds_per_image']:>8.3f}")
    if any(r.get("kind") == "constrained" for r in results):
        print("* constrained baseline: follows its constraint (left half fixed) and ignores the reward; "
              "scored for reference")
    for r in results:
        for note in r.get("notes", ()):
            print(f"note: {r['method']}, {r['reward']}: {note}")
