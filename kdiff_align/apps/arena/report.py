"""The arena's outputs: arena.json, the markdown table, the Pareto plot and one image grid per method."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from ...utils import atomic_write

FAMILIES = ("plain", "best_of_n", "demon", "smc", "guidance", "search", "noise")  # noise: noise-opt-*
KEYS = ("method", "reward_name", "budget_nfe", "nfe", "reward_calls", "reward_rows", "reward", "reward_sem",
        "heldout_reward", "diversity", "fidelity_fd", "seconds")


def table_rows(records: list[dict]) -> list[dict]:
    """The rows of ``arena.json``: each cell record's ``KEYS``, in order."""
    return [{k: r[k] for k in KEYS} for r in records]


def tuning_line(tuning: dict | None) -> list[str]:
    """The tuned sampler's one-off cost, stated apart from every NFE column (nothing without one)."""
    if tuning is None:
        return []
    seconds = "" if tuning.get("seconds") is None else f", {tuning['seconds']:.1f} s"
    return [f"Tuned sampler `{tuning['method']}` at {tuning['nfe']} NFE per sample; tuning cost (once, not in any "
            f"NFE below): {tuning['tuning_nfe']} network calls on {tuning.get('calibration')} calibration noises"
            f"{seconds}.", ""]


def markdown(records: list[dict], *, images: int, sampler: str, seed: int, tuning: dict | None = None) -> str:
    """The arena table: one section per reward, one line per method and budget."""
    lines = [f"# Arena: {images} images per cell, solver `{sampler}`, seed {seed}", "", *tuning_line(tuning),
             "NFE = counted network rows per image (a backward pass counts as one); reward ± s.e.m. over images; "
             "held-out = the reward's held-out twin; diversity = mean pairwise distance of held-out classifier "
             "features (distinct = distinct predicted classes / min(images, 10)); FD = Fréchet distance of "
             "those features to the real images of the eval slice; seconds per image; reward calls = calls of the "
             "reward function for the cell's batch of images, reward rows = images scored per image (beside the "
             "NFE, never folded into it).", ""]
    for reward_name in dict.fromkeys(r["reward_name"] for r in records):
        lines += [f"## {reward_name}", "",
                  "| method | budget | NFE | reward calls | reward rows | reward | held-out | diversity | distinct | FD | "
                  "s/img | settings |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            if r["reward_name"] == reward_name:
                lines.append(f"| {r['method']} | {r['budget_nfe']} | {r['nfe']:.1f} | {r['reward_calls']} | "
                             f"{r['reward_rows']:.1f} | {r['reward']:+.3f} ± "
                             f"{r['reward_sem']:.3f} | {r['heldout_reward']:+.3f} | {r['diversity']:.2f} | "
                             f"{r['distinct']:.2f} | {r['fidelity_fd']:.1f} | {r['seconds']:.2f} | {r['hyper']} |")
        lines.append("")
    return "\n".join(lines)


def save_pareto(rows: list[dict], path: Path) -> None:
    """Target reward against held-out reward and against diversity, one marker per method and budget."""
    import matplotlib.pyplot as plt
    reward_names = list(dict.fromkeys(r["reward_name"] for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    markers = dict(zip(FAMILIES, "os^DvPX"))
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


def write_outputs(out: Path, records: list[dict], grids: dict, *, images: int, sampler: str, seed: int,
                  tuning: dict | None = None) -> None:
    """arena.json, arena.md, pareto.png and ``<method>.png`` (the largest budget's samples) into ``out``;
    with a tuned sampler also ``tuning.json``, its one-off cost (``tuning``) reported apart from the NFE."""
    import matplotlib
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "arena.json", lambda tmp: tmp.write_text(json.dumps(table_rows(records), indent=1)))
    if tuning is not None:
        atomic_write(out / "tuning.json", lambda tmp: tmp.write_text(json.dumps(tuning, indent=1)))
    text = markdown(records, images=images, sampler=sampler, seed=seed, tuning=tuning)
    atomic_write(out / "arena.md", lambda tmp: tmp.write_text(text))
    if records:
        save_pareto(records, out / "pareto.png")
    for name, by_reward in grids.items():
        save_grid(by_reward, out / f"{name}.png", f"{name}: largest budget, same noises")
