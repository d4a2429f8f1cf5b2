"""``kdiff-align demon``: a plain and a Demon image of one prompt, side by side, with the reward per step."""
from __future__ import annotations

import torch

from ..align.demon import RewardDemon, plot_rewards, save_comparison
from ..models import load_model
from . import cliargs
from .reward_specs import RewardFactory, reward_label


def cli_beta(beta) -> str | float:
    """The command line's β: a number as given, or ``"auto"``, which ``sample_demon`` resolves per step
    (``align.demon.auto_betas``: β ≤ 0.1, β·|Δσ| ≤ 1 and a bounded Heun β-SDE variance)."""
    return "auto" if beta == "auto" else float(beta)


def add_cli(sub) -> None:
    """``kdiff-align demon``: a plain and a Demon image of one prompt, side by side, with the reward per step."""
    p = cliargs.subparser(sub, "demon", help="Sampling Demon on a shipped toy model or a local diffusers folder",
                          description=CLI_DESCRIPTION)
    cliargs.add_model_argument(p)
    p.add_argument("--prompt", required=True, help="the prompt (a class name for the toy models)")
    cliargs.add_reward_arguments(p)
    p.add_argument("--reward-class", default=None, help="deprecated: use --reward classifier:CLASS")
    cliargs.add_steps_argument(p)
    cliargs.add_demon_arguments(p)
    cliargs.add_sampler_argument(p, "PF-ODE method of the plain image, the tail after --ode-after and the "
                                    "baseline rollouts")
    p.add_argument("--cfg", type=cliargs.float_in(), default=3.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=cliargs.seed, default=0, help="seed of the initial noise and of the candidates")
    p.add_argument("--out", type=cliargs.out_dir, default="experiments/demon",
                   help="experiment directory (each run makes a fresh folder inside)")
    p.add_argument("--save-pils", action="store_true", help="save every candidate's look-ahead image")
    p.add_argument("--max-batch", type=cliargs.positive_int, default=None, help="the most rows per network call")
    p.add_argument("--device", type=cliargs.device, default=None, help="cuda when available, else cpu")
    p.add_argument("--fp16", action="store_true", help="run diffusers networks in float16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cli_main, interrupted=cli_interrupted)


CLI_DESCRIPTION = """Sampling Demon on one prompt: a plain PF-ODE image and a Demon image from the same noise.

Writes a fresh folder under --out with comparison.png (plain vs Demon, side by side, with their
rewards), rewards.png (the K candidates' reward, mean and std, at every Demon step, named by reward
and class), plain_ode.png, demon.png, rewards.csv, result.json and config.json. A run that stops
early leaves its folder marked by an INCOMPLETE file.

    kdiff-align demon --model toy:fashion --prompt sneaker --reward classifier:sandal --K 8
"""


def cli_reward(args) -> str:
    """``--reward`` with the deprecated ``--reward-class CLASS`` folded in (``classifier:CLASS``)."""
    if args.reward_class is None:
        return args.reward
    cliargs.deprecated("--reward-class CLASS", "--reward classifier:CLASS")
    if args.reward != "classifier":
        raise ValueError(f"--reward-class needs --reward classifier, got --reward {args.reward}")
    return f"classifier:{args.reward_class}"


def cli_interrupted(args) -> str:
    return (f"the unfinished run folder under {args.out} is marked by an INCOMPLETE file; rerun the command "
            "for a fresh run")


def cli_main(args) -> int:
    """Run ``kdiff-align demon``: check, load the model, generate, write the comparison and the reward plot."""
    spec = cli_reward(args)
    if args.steps < 2:
        raise ValueError(f"--steps: demon needs >= 2 steps (Demon steps, then the step to 0), got {args.steps}")
    cliargs.check_reward_options(spec, args.model, args)
    cliargs.check_prompts([args.prompt], args.model)
    kind, arg = cliargs.reward_kind(spec)
    if kind == "classifier":
        cliargs.check_prompts([arg or args.prompt], args.model, "--reward classifier")
    cliargs.warn_sampler_mismatch(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_model(args.model, device, torch.float16 if args.fp16 else None)
    reward, label = RewardFactory(spec, pipe, args)(args.prompt), reward_label(spec, args.prompt)
    beta = cli_beta(args.beta)
    gen = RewardDemon(reward, cfg=args.cfg, beta=beta, tau=args.tau, K=args.K, T=args.steps,
                      demon_type=args.demon_type, r_of_c=args.r_of_c, c_steps=args.c_steps, ode_after=args.ode_after,
                      seed=args.seed, save_pils=args.save_pils, ylabel=label, experiment_directory=args.out,
                      pipeline=pipe, max_batch=args.max_batch, disable=args.no_progress or None,
                      method=args.sampler)
    out = gen.generate(args.prompt)
    betas = out["info"]["beta"]
    shown = (f"{betas[0]:.3g}" if len(set(betas)) == 1 else f"{min(betas):.2g} to {max(betas):.2g} per step"
             if betas else "none (no Demon step)")
    title = f"{args.prompt!r}: Demon ({args.demon_type}, K={args.K}, {args.steps} steps, beta={shown})"
    plot_rewards(out["info"], out["directory"] / "rewards.png", label, f"{title}\nreward: {label}")
    save_comparison(out, out["directory"] / "comparison.png", label, title)
    print(f"{label}: plain ODE {out['plain_reward']:.4f}, Demon {out['demon_reward']:.4f} "
          f"({out['demon_steps']} Demon steps, {out['nfe']['network_rows']} network rows, "
          f"{out['nfe']['reward_calls']} reward calls on {out['nfe']['reward_rows']} images, {out['seconds']:.1f} s)")
    print(f"wrote {out['directory']} (comparison.png, rewards.png, ...)")
    return 0
