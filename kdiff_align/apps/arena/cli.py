"""``kdiff-align arena``: the command line of ``run_arena``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ... import sampling
from .run import BUDGETS, CLASS_NAME, check_args, run_arena


def add_cli(sub) -> None:
    """Register ``kdiff-align arena`` on an argparse sub-parser set."""
    p = sub.add_parser("arena", help="every alignment method at equal NFE: reward, held-out reward, diversity, FD",
                       description="every inference-time scaling method at equal compute on the shipped "
                                   "Fashion-MNIST model")
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
