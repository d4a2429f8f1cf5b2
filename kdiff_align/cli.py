"""Command line: ``kdiff-align demo [--out DIR] [--quick]``, ``demon``, ``generate``, ``arena``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def demo(args) -> int:
    """``kdiff-align demo``: the main job of ``kdiff_align.demo`` (grids, reward-vs-NFE plot, table)."""
    import torch

    from . import demo as main_job
    torch.set_num_threads(args.threads)
    results = main_job.run(args.out, quick=args.quick, disable=args.no_progress or None)
    main_job.print_table(results)
    print(f"wrote {Path(args.out) / 'reward_vs_nfe.png'} and one image grid per method")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdiff-align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the offline demo and write pictures to --out")
    p_demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p_demo.add_argument("--quick", action="store_true", help="smaller sizes, for tests")
    p_demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p_demo.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the small shipped models run fastest and "
                             "most predictably on one thread per process)")
    p_demo.set_defaults(func=demo)
    from .align import demon
    demon.add_cli(sub)  # kdiff-align demon --model PATH|toy --prompt ... --reward ...
    from . import generate
    generate.add_cli(sub)  # kdiff-align generate --model ... --prompts FILE ... (shard with torchrun)
    from .apps import arena
    arena.add_cli(sub)  # kdiff-align arena [--quick] [--budgets ...] [--sampler ...]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
