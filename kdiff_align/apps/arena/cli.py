"""``kdiff-align arena``: the command line of ``run_arena``; every flag is checked before any work."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ...models import toy
from .. import cliargs, experiment
from .run import BUDGETS, CLASS_NAME, check_args, run_arena
from .scores import reward_name

DESCRIPTION = """Every inference-time scaling method at equal compute on the shipped Fashion-MNIST model.

Each method gets the same noises and the same budgets of network evaluations (NFE) per image; it is
scored by the target reward, a held-out reward no method sees, diversity and a Frechet distance in the
held-out classifier's feature space. Each finished (reward, method, budget) cell is written to --out at
once: Ctrl-C or a kill keeps what is done, and rerunning the same command resumes.

    kdiff-align arena --quick --out arena_quick
    kdiff-align arena --rewards classifier:bag jpeg-small --methods plain smc --budgets 80 160 --out runs/a
"""


def add_cli(sub) -> None:
    """Register ``kdiff-align arena`` on an argparse sub-parser set."""
    p = cliargs.subparser(sub, "arena", help="every alignment method at equal NFE: reward, held-out reward, "
                                             "diversity, FD", description=DESCRIPTION)
    p.add_argument("--out", type=cliargs.out_dir, default="arena_out",
                   help="run folder; an unfinished one with the same settings is resumed")
    p.add_argument("--quick", action="store_true", help="budgets 40 and 80, 3 images (under 3 minutes)")
    p.add_argument("--budgets", nargs="+", type=cliargs.positive_int, default=list(BUDGETS), help="NFE per image")
    p.add_argument("--images", type=cliargs.int_at_least(2), default=8, help="images per method and budget")
    p.add_argument("--rewards", nargs="+", type=cliargs.reward_spec, default=["classifier", "jpeg-small"],
                   help="classifier[:CLASS] (the toy classifier's logit, CLASS default --class), jpeg-small, "
                        "jpeg-large, brightness, contrast")
    p.add_argument("--class", dest="class_name", default=CLASS_NAME, choices=toy.FASHION_CLASSES,
                   help="target class of a bare 'classifier' reward")
    cliargs.add_sampler_argument(p, help="ODE solver of every method's PF-ODE runs",
                                 tuned_cost="its counted NFE; the tuning cost is reported apart")
    p.add_argument("--methods", nargs="+", default=None, help="method names or families; not set: all of them")
    p.add_argument("--seed", type=cliargs.seed, default=0, help="seed of every noise")
    p.add_argument("--threads", type=cliargs.positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="print only the summary, not one line per cell")
    p.set_defaults(func=cli_main, interrupted=interrupted)


def check_flags(args) -> None:
    """The checks that span flags (each value alone was checked while parsing); names the flag."""
    try:
        [reward_name(spec, args.class_name) for spec in args.rewards]
    except ValueError as error:
        raise ValueError(f"--rewards: {str(error).removeprefix('rewards: ')}") from None
    try:
        check_args(args.budgets, args.images, args.sampler, args.class_name, args.methods)
    except ValueError as error:
        raise ValueError(f"--methods: {error}") from None


def interrupted(args) -> str:
    """What a Ctrl-C leaves behind, and how to go on."""
    done = len(experiment.read_jsonl(Path(args.out) / "manifest.jsonl"))
    return f"{done} finished cells are kept in {args.out}; rerun the same command to resume"


def cli_main(args) -> int:
    """``kdiff-align arena``: run, print one line per cell, write the folder."""
    check_flags(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run_arena(args.out, rewards=tuple(args.rewards), budgets=args.budgets, images=args.images,
                     methods=args.methods, class_name=args.class_name, sampler=args.sampler, seed=args.seed,
                     quick=args.quick, log=None if args.no_progress else lambda line: print(line, flush=True))
    print(f"wrote {len(rows)} rows to {Path(args.out) / 'arena.json'}, arena.md, pareto.png and one grid per method "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
