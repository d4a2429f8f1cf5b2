"""Command line: kdiff-align {demo, demon, generate, arena} (kdiff-align SUB --help for each).

A bad value fails before anything is loaded or written, with one line naming the flag and exit
status 2 (--debug shows the traceback); Ctrl-C stops with one line saying what was kept (exit 130).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import cliargs, demon, generate
from .arena.cli import add_cli as add_arena
from . import demo as main_job


def demo(args) -> int:
    """kdiff-align demo: the main job of kdiff_align.apps.demo (grids, reward-vs-NFE plot, table)."""
    torch.set_num_threads(args.threads)
    results = main_job.run(args.out, quick=args.quick, disable=args.no_progress or None)
    main_job.print_table(results)
    print(f"wrote {Path(args.out) / 'reward_vs_nfe.png'} and one image grid per method")
    return 0


def demo_interrupted(args) -> str:
    return f"the pictures finished so far are in {args.out}; rerun the same command to redo them all"


def add_demo(sub) -> None:
    p = cliargs.subparser(sub, "demo", help="run the offline demo and write pictures to --out")
    p.add_argument("--out", type=cliargs.out_dir, default="demo_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=cliargs.positive_int, default=1,
                   help="torch intra-op threads (the small shipped models run fastest and most predictably on "
                        "one thread per process)")
    p.set_defaults(func=demo, interrupted=demo_interrupted)


def parser() -> cliargs.Parser:
    """The kdiff-align parser with every subcommand."""
    top = cliargs.Parser(prog="kdiff-align", description=__doc__, formatter_class=cliargs.Formatter)
    top.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = top.add_subparsers(dest="command", required=True)
    add_demo(sub)
    demon.add_cli(sub)  # kdiff-align demon --model toy:NAME|DIR --prompt ... --reward ...
    generate.add_cli(sub)  # kdiff-align generate --model ... --prompts FILE ... (shard with torchrun)
    add_arena(sub)  # kdiff-align arena [--quick] [--budgets ...] [--sampler ...]
    return top


def main(argv=None) -> int:
    """Parse and run one subcommand; Ctrl-C while parsing is one line too (the job's own is in ``cliargs.run``)."""
    try:
        args = parser().parse_args(argv)
    except KeyboardInterrupt:
        sys.stderr.write("kdiff-align: interrupted while starting; nothing was written\n")
        return 130
    return cliargs.run(args, f"kdiff-align {args.command}")


if __name__ == "__main__":
    sys.exit(main())
