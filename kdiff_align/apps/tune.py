"""``kdiff-align tune``: fit a few-step sampler to a model (and guidance scale) once, save it as JSON.

    kdiff-align tune --model toy:fashion --nfe 6 --out tuned.json
    kdiff-align generate --model toy:fashion --prompt sneaker --sampler tuned.json --out runs/fast

``sampling.tune_sampler`` solves the PF-ODE finely from ``--calib`` seeded noises (the teacher) and fits
the σ grid, solver, per-step corrections and network input σ of an ``--nfe``-evaluation sampler to its
final samples (GITS dynamic programming, a derivative-free refinement of the grid, least-squares
corrections, then ``--end-to-end`` runs fitting them through the model's gradients; from 10 NFE, where four
solvers are searched, ``--refine`` of them get corrections and the best after them is kept). Tune per guidance
scale: a grid fitted at CFG 3 is not the one for CFG 7. For a sampler that serves many prompts, tune on several
(``--prompts FILE``, one per line): calibration noise i is conditioned on prompt i mod k, so the last quarter,
held out to check the corrections, holds every prompt where it has at least k noises.
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
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="the prompt to tune on ('' = unconditional)")
    src.add_argument("--prompts", type=cliargs.existing_file,
                     help="text file, one prompt per line: the calibration noises cycle over them")
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


def calibration_prompts(args) -> list[str]:
    """The prompts to tune on (``--prompts`` file or ``--prompt``), checked against a toy model's class names and
    against ``--calib`` (at least one noise per prompt)."""
    prompts = cliargs.prompts_of(args)
    if len(prompts) > args.calib:
        raise ValueError(f"--calib: at least one calibration noise per prompt ({len(prompts)} in --prompts), "
                         f"got {args.calib}")
    return prompts


def calibration_condition(prompts: list[str], cfg: float, n: int):
    """The condition of ``n`` calibration noises: one CFG condition, or with several prompts one per noise,
    noise i on prompt i mod k."""
    if len(prompts) == 1:
        return {"prompts": prompts, "cfgs": [cfg]}
    return [{"prompts": [prompts[i % len(prompts)]], "cfgs": [cfg]} for i in range(n)]


def cli_main(args) -> int:
    """Check the flags, load the model, tune, write ``--out``."""
    out = out_file(args.out)
    prompts = calibration_prompts(args)
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_model(args.model, device)
    model = pipe.guided(calibration_condition(prompts, args.cfg, args.calib), args.calib)
    x_T = pipe.get_init_latent(args.calib, torch.Generator(device).manual_seed(args.seed))
    clock = time.perf_counter()
    tuned = sampling.tune_sampler(model, x_T, args.nfe, sigma_min=pipe.sigma_min, sigma_max=pipe.sigma_max,
                                  max_evals=args.max_evals, end_to_end=args.end_to_end, refine=args.refine,
                                  disable=args.no_progress or None)
    tuned.info.update(model=args.model, cfg=args.cfg, seed=args.seed,
                      **({"prompts": prompts} if args.prompts else {"prompt": args.prompt}))
    tuned.save(out)
    print(f"{tuned!r}\ntuning: {tuned.tuning_nfe} network calls on {args.calib} noises, "
          f"{time.perf_counter() - clock:.1f} s; wrote {out}")
    return 0
