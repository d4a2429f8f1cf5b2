"""``kdiff-align tune``: fit a few-step sampler to a model (and guidance scale) once, save it as JSON.

    kdiff-align tune --model toy:fashion --nfe 6 --out tuned.json
    kdiff-align generate --model toy:fashion --prompt sneaker --sampler tuned.json --out runs/fast

``sampling.tune_sampler`` solves the PF-ODE finely from ``--calib`` seeded noises (the teacher) and fits
the σ grid, solver, per-step corrections and network input σ of an ``--nfe``-evaluation sampler to its
final samples (GITS dynamic programming, a derivative-free refinement of the grid, least-squares
corrections, then ``--end-to-end`` runs fitting them through the model's gradients; from 10 NFE, where four
solvers are searched, ``--refine`` of them get corrections and the best after them is kept). Tune per guidance
scale: a grid fitted at CFG 3 is not the one for CFG 7.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import sampling
from ..models import load_model
from . import cliargs


def out_file(text: str) -> Path:
    """A .json file to write: not a folder, in an existing folder."""
    path = Path(text)
    if path.suffix != ".json":
        raise ValueError(f"--out: expected a .json file name, got {text!r}")
    if path.is_dir() or not path.parent.resolve().is_dir():
        raise ValueError(f"--out: {text!r} must be a file in an existing folder")
    return path


def add_cli(sub) -> None:
    p = cliargs.subparser(sub, "tune", help="fit a few-step sampler to a model and save it as JSON",
                          description=__doc__)
    cliargs.add_model_argument(p)
    p.add_argument("--nfe", type=cliargs.positive_int, required=True, help="network evaluations per sample")
    p.add_argument("--out", required=True, help="the .json file to write (use it with --sampler FILE)")
    p.add_argument("--prompt", default="", help="the prompt to tune on ('' = unconditional)")
    p.add_argument("--cfg", type=cliargs.float_in(), default=3.0, help="classifier-free guidance weight")
    p.add_argument("--calib", type=cliargs.int_at_least(2), default=32, help="calibration noises")
    p.add_argument("--max-evals", type=cliargs.nonnegative_int, default=None,
                   help="sampler runs of each refined solver (default 32; 0: the best start grid only)")
    p.add_argument("--end-to-end", type=cliargs.nonnegative_int, default=None,
                   help="runs fitting the corrections through the model's gradients (default "
                        f"{sampling.tune.E2E_EVALS} // nfe; 0: least squares only)")
    p.add_argument("--refine", type=cliargs.positive_int, default=1,
                   help="solvers refined and corrected, the best after corrections kept (from 10 NFE, where "
                        "four are searched; each costs about one more fit)")
    p.add_argument("--seed", type=cliargs.seed, default=0, help="seed of the calibration noises")
    p.add_argument("--device", type=cliargs.device, default=None, help="cuda when available, else cpu")
    p.add_argument("--threads", type=cliargs.positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cli_main, interrupted=lambda args: f"nothing was written to {args.out}")


def cli_main(args) -> int:
    """Check the flags, load the model, tune, write ``--out``."""
    out = out_file(args.out)
    cliargs.check_prompts([args.prompt], args.model)
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_model(args.model, device)
    model = pipe.guided({"prompts": [args.prompt], "cfgs": [args.cfg]})
    x_T = pipe.get_init_latent(args.calib, torch.Generator(device).manual_seed(args.seed))
    clock = time.perf_counter()
    tuned = sampling.tune_sampler(model, x_T, args.nfe, sigma_min=pipe.sigma_min, sigma_max=pipe.sigma_max,
                                  max_evals=args.max_evals, end_to_end=args.end_to_end, refine=args.refine,
                                  disable=args.no_progress or None)
    tuned.info.update(model=args.model, prompt=args.prompt, cfg=args.cfg, seed=args.seed)
    tuned.save(out)
    print(f"{tuned!r}\ntuning: {tuned.tuning_nfe} network calls on {args.calib} noises, "
          f"{time.perf_counter() - clock:.1f} s; wrote {out}")
    return 0
