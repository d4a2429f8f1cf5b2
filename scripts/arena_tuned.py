"""docs/arena.md's section on tuned few-step samplers: the selection methods at 80 NFE on a tuned grid
against the same methods on the default Heun grids, same noises, paired 95% intervals.

    kdiff-align tune --model toy:fashion --nfe 5 --calib 32 --seed 1000 --out scripts/arena_tuned5.json
    python scripts/arena_tuned.py --sampler scripts/arena_tuned5.json --out arena_tuned_out --images 64

(``scripts/arena_tuned6.json``, the same tuner at 6 NFE, and ``scripts/arena_tuned6_gits.json``, the bare GITS
grid of an earlier tuner, run the same way; the section's hand-written paragraphs compare them.)

The arena samples unconditionally (null class); the calibration noises (seed 1000) are not the arena's
images (seed 0). Both run folders resume; the section replaces the one at the end of docs/arena.md (its
Finding paragraphs are written by hand; ``scripts/arena_report.py`` keeps the section when it regenerates
the page).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arena_report import IMAGES, REWARD, SEED, TUNED_SECTION, cells, paired

from kdiff_align.apps.arena import run_arena
from kdiff_align.sampling import TunedSampler

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["plain-ode", "best_of_n-ode", "search-random", "search-zero-order"]
BUDGET, TARGET = 80, 1.0


def run(folder: Path, sampler, images: int) -> dict:
    run_arena(folder, rewards=(REWARD,), budgets=(BUDGET,), images=images, seed=SEED, methods=METHODS,
              sampler=sampler, log=lambda line: print(line, flush=True))
    return cells(folder)


def section(tuned: TunedSampler, heun: dict, fast: dict, command: str, images: int) -> str:
    """The markdown section: both tables, the paired differences, the verdict on the issue's target."""
    lines = [TUNED_SECTION.strip(), "",
             "`kdiff-align arena --sampler tuned.json` (or `run_arena(sampler=TunedSampler.load(...))`) runs every "
             "method's PF-ODE on the tuned grid: plain, best-of-N and search samples, guidance's guided ODE, the "
             "noise optimisers' ODE and Demon's rollout look-aheads (its tail after σ = 0.11 stays Heun). Each "
             "method's settings are fitted to the budget with the tuned sampler's counted NFE (one row per σ "
             "step; `tests/test_arena.py` checks the counted rows against the formulas); the tuning cost is "
             "written apart, to `tuning.json` and the head of `arena.md`. SMC and ancestral sampling integrate "
             "no PF-ODE and are unchanged.", "",
             f"Written by `{command}` (after `kdiff-align tune --model toy:fashion "
             f"--nfe {tuned.nfe} --calib {tuned.info.get('calibration')} --seed {tuned.info.get('seed')} --out "
             f"...`). Tuned sampler: `{tuned.method}` on {tuned.nfe} σ values "
             f"({', '.join(f'{s:.3g}' for s in tuned.sigmas.tolist())}); tuning cost, once and in no NFE below: "
             f"{tuned.tuning_nfe} network calls on the {tuned.info.get('calibration')} calibration noises "
             f"(seed {tuned.info.get('seed')}; the arena's images are seed {SEED}), "
             f"{tuned.info.get('seconds', float('nan')):.0f} s at one thread. Same {images} noises for both "
             f"solvers, budget {BUDGET} NFE, reward `{REWARD}`.", "",
             "| method | solver | NFE | reward ± s.e.m. | held-out | FD | settings |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for label, found in (("heun", heun), ("tuned", fast)):
            r = found[m, BUDGET]
            lines.append(f"| {m} | {label} | {r['nfe']:.1f} | {r['reward']:+.3f} ± {r['reward_sem']:.3f} | "
                         f"{r['heldout_reward']:+.3f} | {r['fidelity_fd']:.1f} | {r['hyper']} |")
    lines += ["", "Paired per-image differences, tuned − Heun (95% t-interval):", "",
              "| method | reward | mean difference | 95% interval | pairs | FD tuned − Heun |",
              "|---|---|---|---|---|---|"]
    for m in METHODS:
        for key, what in (("rewards", "target"), ("heldout_rewards", "held-out")):
            mean, half, n = paired(fast[m, BUDGET], heun[m, BUDGET], key)
            fd = fast[m, BUDGET]["fidelity_fd"] - heun[m, BUDGET]["fidelity_fd"]
            lines.append(f"| {m} | {what} | {mean:+.3f} | [{mean - half:+.3f}, {mean + half:+.3f}] | {n} | {fd:+.1f} |")
    return "\n".join(lines + best_against_best(heun, fast)) + "\n"


def best_against_best(heun: dict, fast: dict) -> list[str]:
    """The selection method with the highest mean target reward on each solver, paired against each other,
    and the verdict on the issue's target (≥ TARGET logits, FD no worse)."""
    pick = lambda found: max(METHODS[1:], key=lambda m: found[m, BUDGET]["reward"])  # noqa: E731
    ours, theirs = pick(fast), pick(heun)
    mine, other = fast[ours, BUDGET], heun[theirs, BUDGET]
    fd = mine["fidelity_fd"] - other["fidelity_fd"]
    diffs = {what: paired(mine, other, key) for key, what in (("rewards", "target"), ("heldout_rewards", "held-out"))}
    lines = ["", f"Best selection method against best: {ours} on the tuned sampler − {theirs} on Heun "
             "(paired, 95% t-interval):", "", "| reward | mean difference | 95% interval | pairs | FD tuned − Heun |",
             "|---|---|---|---|---|"]
    lines += [f"| {what} | {mean:+.3f} | [{mean - half:+.3f}, {mean + half:+.3f}] | {n} | {fd:+.1f} |"
              for what, (mean, half, n) in diffs.items()]
    verdict = "met" if diffs["target"][0] >= TARGET and fd <= 0 else "not met"
    return lines + ["", f"Target (best against best ≥ +{TARGET:.1f} logit on the target reward, FD no worse): "
                    f"**{verdict}**."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sampler", type=Path, required=True, help="the tuned sampler's JSON (kdiff-align tune)")
    p.add_argument("--out", type=Path, default=Path("arena_tuned_out"))
    p.add_argument("--images", type=int, default=IMAGES)
    args = p.parse_args(argv)
    tuned = TunedSampler.load(args.sampler)
    heun = run(args.out / "heun", "heun", args.images)
    fast = run(args.out / "tuned", tuned, args.images)
    command = f"python scripts/arena_tuned.py --sampler {args.sampler} --out {args.out} --images {args.images}"
    text = section(tuned, heun, fast, command, args.images)
    print(text)
    doc = ROOT / "docs" / "arena.md"
    old = doc.read_text()
    kept = (old[:old.index(TUNED_SECTION)] if TUNED_SECTION in old else old).rstrip("\n") + "\n"
    doc.write_text(kept + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
