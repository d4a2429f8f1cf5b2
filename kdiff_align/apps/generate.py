"""``kdiff-align generate``: many aligned images over a prompt file, sharded across ``torchrun`` ranks.

Every (prompt, seed) pair is one item named ``p<prompt index>-s<seed>``; items go to ranks by
``experiment.shard`` (item i to rank i mod world size), so the assignment depends only on the prompt
file, the seeds and the world size, and an item's image depends only on its prompt and seed. Each rank
writes finished images into one shared ``experiment.Experiment`` directory (atomic PNG, then a manifest
line), so a rerun after a killed rank or a killed job skips finished images and redoes the rest. After
a ``torch.distributed`` barrier (gloo on CPU, NCCL on GPU) rank 0 writes the merged report:
``report.csv``, ``report.md`` (reward table) and ``grid.png``.

    torchrun --nproc_per_node 4 --no-python kdiff-align generate --model toy:fashion \\
        --prompts prompts.txt --seeds 0-7 --method demon --reward classifier --out runs/bags

Every flag is checked before anything is loaded or written; the run folder holds an ``INCOMPLETE``
file until rank 0 has written the report, and a folder without finished images takes new settings.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import sampling
from ..align.demon import sample_demon
from ..align.smc import sample_smc
from ..models import load_model
from ..rewards import check_rewards
from ..testing import CountingDenoiser
from ..utils import BACKWARD_COST, nfe_summary
from . import cliargs, experiment
from .demon import cli_beta
from .reward_specs import RewardFactory, parse_reward

METHODS = ("plain", "demon", "smc", "best_of_n")
GRID_ROWS, GRID_COLS = 16, 8  # the report grid shows at most this many prompts × seeds


# --- methods: fn(pipe, model, x_T, reward, generator, args, log) -> (x0 [1, ...], nfe per image) ----

def _odeint_counted(model, x, sigmas, method: str) -> tuple[Tensor, int]:
    """``sampling.odeint`` with ``method``, and the number of network calls it made."""
    counted = CountingDenoiser(model)
    return sampling.odeint(counted, x, sigmas, method=method, disable=True), counted.calls


def run_plain(pipe, model, x_T, reward, generator, args, log):
    """PF-ODE sampling with ``--sampler`` (Heun by default), ignoring the reward."""
    return _odeint_counted(model, x_T, pipe.sigmas(args.steps), args.sampler)


def run_best_of_n(pipe, model, x_T, reward, generator, args, log):
    """N plain samples (x_T and N − 1 more noises from the item's generator) in one batch; keep the best."""
    x = torch.cat([x_T, pipe.get_init_latent(args.n - 1, generator)]) if args.n > 1 else x_T
    candidates, calls = _odeint_counted(model, x, pipe.sigmas(args.steps), args.sampler)
    with torch.no_grad():
        scores = check_rewards(reward(candidates), args.n, "reward")
    log({"step": 0, "rewards": scores.tolist()})
    best = int(scores.argmax())
    return candidates[best:best + 1], args.n * calls


def run_demon(pipe, model, x_T, reward, generator, args, log):
    """Sampling Demon (``align.demon.sample_demon``), logging the K rewards and weights of every step."""

    def callback(info):
        if "reward" in info:
            log({"step": info["i"], "sigma": float(info["sigma"]), "rewards": info["reward"][0].tolist(),
                 "weights": info["weights"][0].tolist()})

    sigmas = pipe.sigmas(args.steps)
    x0, info = sample_demon(model, x_T, sigmas, reward, K=args.K, beta=cli_beta(args.beta),
                            tau=args.tau, demon_type=args.demon_type, r_of_c=args.r_of_c, ode_after=args.ode_after,
                            c_steps=args.c_steps,
                            generator=generator, return_info=True, callback=callback, disable=True,
                            max_batch=args.max_batch, method=args.sampler)
    return x0, info["nfe"]["network_rows"]


def run_smc(pipe, model, x_T, reward, generator, args, log, differentiable: bool = True):
    """Tempered SMC (``align.smc.sample_smc``) with ``--particles`` particles; one particle drawn by weight is kept."""
    proposal = args.proposal if args.proposal != "auto" else ("guided" if differentiable else "prior")
    x = torch.cat([x_T, pipe.get_init_latent(args.particles - 1, generator)]) if args.particles > 1 else x_T

    def callback(info):
        if info["reward"] is not None:
            log({"step": info["i"], "sigma": float(info["sigma"]), "rewards": info["reward"][0].tolist(),
                 "ess": float(info["ess"][0])})

    result = sample_smc(model, x[None], pipe.sigmas(args.steps), reward, num_particles=args.particles,
                        alpha=args.alpha, proposal=proposal, select="draw", generator=generator,
                        callback=callback, disable=True, max_batch=args.max_batch)
    return result.x0, {k: result.nfe[k] for k in ("forward", "backward", "total")}


METHOD_FNS = {"plain": run_plain, "best_of_n": run_best_of_n, "demon": run_demon, "smc": run_smc}


# --- items, configuration, distributed ---------------------------------------------------------

def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        path = cliargs.existing_file(str(path))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--prompts: {error}") from None
    return cliargs.read_prompts(path)


def parse_seeds(text) -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``: non-negative, unique, in the order given (``cliargs.seeds``)."""
    if isinstance(text, list):
        return text
    try:
        return cliargs.seeds(str(text))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"seeds: {error}") from None


def items(prompts: list[str], seeds: list[int]) -> list[tuple[str, int, int]]:
    """``(name, prompt index, seed)`` for every prompt and seed, prompt-major; names are stable ids."""
    return [(f"p{i:05d}-s{seed}", i, seed) for i in range(len(prompts)) for seed in seeds]


def run_config(args, prompts: list[str], seeds: list[int]) -> dict:
    """The settings that define the images (saved as ``config.json``; resuming requires equal ones)."""
    config = dict(model=args.model, prompts=prompts, seeds=seeds, method=args.method, reward=args.reward,
                  steps=args.steps, cfg=args.cfg, fp16=args.fp16)
    method = {"best_of_n": dict(n=args.n),
              "demon": dict(K=args.K, beta=args.beta, tau=args.tau, demon_type=args.demon_type, r_of_c=args.r_of_c,
                            c_steps=args.c_steps, ode_after=args.ode_after),
              "smc": dict(particles=args.particles, alpha=args.alpha, proposal=args.proposal)}.get(args.method, {})
    reward = dict(vlm_url=args.vlm_url, vlm_model=args.vlm_model) if args.reward == "vlm" else \
        dict(aesthetic_head=str(args.aesthetic_head)) if args.reward.startswith("aesthetic") else {}
    # the default sampler is left out, so that runs made before --sampler existed stay resumable
    sampler = {} if getattr(args, "sampler", "heun") == "heun" else {"sampler": cliargs.sampler_label(args.sampler)}
    return {**config, **sampler, **method, **reward}


def init_distributed(device: str | None, timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); a plain process is rank 0 of 1."""
    import torch.distributed as dist
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda and (world > 1 or not device)
                       else device or "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if cuda else {}))
    return rank, world, dev


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- the job -----------------------------------------------------------------------------------

def generate(args) -> Path | None:
    """Generate this rank's pending images; rank 0 writes the merged report after a barrier."""
    prompts, seeds = run_prompts(args), parse_seeds(args.seeds)
    rank, world, device = init_distributed(args.device, args.barrier_timeout)
    pipe = load_model(args.model, device, torch.float16 if args.fp16 else None)
    factory = RewardFactory(args.reward, pipe, args)
    config = run_config(args, prompts, seeds)
    secrets = [os.environ.get(args.vlm_key_env, "")] if args.vlm_key_env else []
    if rank == 0:  # rank 0 creates (or checks and repairs) the directory before the others open it
        exp = experiment.Experiment(args.out, config, secrets=secrets, reconfigure_empty=True, extendable=("seeds",))
        exp.mark_incomplete("rerun the same command to finish this run (finished images are kept)")
        say_repairs(exp, prompts, seeds)
    barrier()
    if rank != 0:
        exp = experiment.Experiment(args.out, config, secrets=secrets, repair=False)
    table = {name: (i, seed) for name, i, seed in items(prompts, seeds)}
    mine = experiment.shard(list(table), rank, world)
    pending = exp.pending(mine)
    print(f"[rank {rank}/{world}] {len(mine)} items, {len(mine) - len(pending)} already done", file=sys.stderr,
          flush=True)
    if pending:
        make = make_item_fn(args, exp, prompts, table, pipe, factory)
        experiment.run_items(exp, mine, make, disable=args.no_progress or rank != 0 or None)
    barrier()
    report = None
    if rank == 0:
        exp = experiment.Experiment(args.out, config, secrets=secrets)
        report = write_report(exp, prompts, table)
        exp.mark_complete()
    barrier()
    return report


def say_repairs(exp, prompts: list[str], seeds: list[int]) -> None:
    """Redo finished images that are damaged or lost their step record, and say so on stderr (rank 0 only)."""
    recorded = {r.get("item") for r in exp.steps() if r.get("kind") == "image"}
    exp.redo(name for name, _, _ in items(prompts, seeds) if exp.done(name) and name not in recorded)
    if exp.repaired:
        print(f"cut a torn last line of {' and '.join(exp.repaired)} (a crash mid-write)", file=sys.stderr, flush=True)
    if exp.damaged:
        print(f"regenerating {len(exp.damaged)} damaged images (missing, not decodable or unrecorded): "
              f"{', '.join(exp.damaged[:20])}{' ...' if len(exp.damaged) > 20 else ''}", file=sys.stderr, flush=True)


def run_prompts(args) -> list[str]:
    """The run's prompts (``--prompts`` file or ``--prompt``), checked against a toy model's class names."""
    prompts = cliargs.prompts_of(args)
    kind, arg = parse_reward(args.reward)
    if kind == "classifier":
        cliargs.check_prompts([arg] if arg else prompts, args.model, "--reward classifier")
    return prompts


def make_item_fn(args, exp, prompts, table, pipe, factory) -> Callable:
    """``make(name) -> PIL image`` for this run: seeded noise, the method, the final reward logged."""
    method = METHOD_FNS[args.method]
    extra = {"differentiable": factory.differentiable} if args.method == "smc" else {}

    def make(name: str):
        index, seed = table[name]
        prompt = prompts[index]
        start = time.perf_counter()
        generator = torch.Generator(pipe.device).manual_seed(seed)
        x_T = pipe.get_init_latent(1, generator)
        model = pipe.guided({"prompts": [prompt], "cfgs": [args.cfg]})
        reward = factory(prompt)
        log = lambda record: exp.log(record, item=name)  # noqa: E731
        x0, nfe = method(pipe, model, x_T, reward, generator, args, log, **extra)
        nfe = nfe if isinstance(nfe, dict) else nfe_summary(nfe)  # the NFE rule: forward, backward, total
        score = factory.final_score(reward, x0)
        exp.log({"kind": "image", "prompt_index": index, "prompt": prompt, "seed": seed, "reward": score,
                 "nfe": nfe["total"], "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"],
                 "seconds": time.perf_counter() - start}, item=name)
        return pipe.from_latent_to_pil(x0)[0]

    return make


def image_records(exp, table: dict) -> dict[str, dict]:
    """The ``kind == "image"`` record of every finished item (from the attempt that saved it)."""
    records = {r["item"]: r for r in exp.steps() if r.get("kind") == "image" and r.get("item") in exp.finished}
    missing = sorted(set(table) - set(records))
    if missing:
        raise RuntimeError(f"{len(missing)} images are not finished in {exp.directory}: {missing[:10]}")
    return records


def _atomic_text(path: Path, text: str) -> None:
    experiment.atomic_write_bytes(path, text.encode("utf-8"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item() if len(values) > 1 else 0.0


def write_report(exp, prompts: list[str], table: dict) -> Path:
    """``report.csv`` (one row per image), ``report.md`` (per-prompt reward table), ``grid.png``."""
    records, config = image_records(exp, table), exp.config
    fields = ["name", "prompt_index", "prompt", "seed", "reward", "nfe", "nfe_forward", "nfe_backward", "seconds",
              "file"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for name in table:
        r = records[name]
        writer.writerow({**{k: r.get(k) for k in fields}, "name": name, "file": f"images/{name}.png"})
    _atomic_text(exp.directory / "report.csv", buffer.getvalue())
    lines = [f"# Generation report: {config['method']} on {config['model']}", "",
             f"{len(records)} images ({len(prompts)} prompts × {len(config['seeds'])} seeds), reward "
             f"`{config['reward']}`, {config['steps']} steps, CFG {config['cfg']}.", "",
             f"NFE = forward + {BACKWARD_COST:g} × backward evaluations (forward equivalents; `report.csv` has both).",
             "", "| prompt | images | reward mean | reward std | NFE / image |", "|---|---|---|---|---|"]
    for i, prompt in enumerate(prompts):
        rows = [records[name] for name, (j, _) in table.items() if j == i]
        mean, std = _mean_std([r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))])
        nfe = sum(r["nfe"] for r in rows) / len(rows)
        lines.append(f"| {prompt or '(unconditional)'} | {len(rows)} | {mean:.4f} | {std:.4f} | {nfe:.0f} |")
    mean, std = _mean_std([r["reward"] for r in records.values() if isinstance(r.get("reward"), (int, float))])
    lines += [f"| **all** | {len(records)} | {mean:.4f} | {std:.4f} | "
              f"{sum(r['nfe'] for r in records.values()) / len(records):.0f} |", "",
              "Per-image values: `report.csv`; images: `images/`; grid: `grid.png`.", ""]
    _atomic_text(exp.directory / "report.md", "\n".join(lines))
    save_grid(exp, prompts, table, records, exp.directory / "grid.png")
    return exp.directory / "report.md"


def save_grid(exp, prompts, table, records, path: Path) -> None:
    """One row per prompt, one column per seed (at most 16 × 8), each titled with its reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    seeds = list(dict.fromkeys(seed for _, seed in table.values()))[:GRID_COLS]
    rows = list(range(min(len(prompts), GRID_ROWS)))
    fig, axes = plt.subplots(len(rows), len(seeds), figsize=(1.4 * len(seeds) + 1, 1.5 * len(rows) + 0.3),
                             squeeze=False)
    for r, i in enumerate(rows):
        for c, seed in enumerate(seeds):
            name, ax = f"p{i:05d}-s{seed}", axes[r][c]
            with Image.open(exp.image_path(name)) as im:
                ax.imshow(im.convert("RGB"))
            score = records[name].get("reward")
            ax.set_title(f"s{seed}" + (f": {score:.2f}" if isinstance(score, (int, float)) else ""), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel((prompts[i] or "(uncond.)")[:24], fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    experiment.atomic_write_bytes(path, buffer.getvalue())


# --- command line ------------------------------------------------------------------------------

def add_cli(sub) -> None:
    """The ``generate`` subcommand."""
    p = cliargs.subparser(sub, "generate", help="generate images for a prompt file × seeds; shard with torchrun",
                          description=__doc__)
    add_arguments(p)
    p.set_defaults(func=cli_main, interrupted=interrupted)


def add_arguments(p) -> None:
    cliargs.add_model_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=cliargs.existing_file,
                     help="text file, one prompt per line (class names for toy models)")
    src.add_argument("--prompt", help="a single prompt")
    p.add_argument("--seeds", type=cliargs.seeds, default="0-3", help="seeds, e.g. 0-7, 0,3,5 or 0-7,9")
    p.add_argument("--method", default="plain", choices=METHODS, help="how each image is made")
    cliargs.add_reward_arguments(p)
    p.add_argument("--out", type=cliargs.out_dir, required=True,
                   help="experiment directory; an existing one is resumed")
    cliargs.add_steps_argument(p)
    cliargs.add_sampler_argument(p, "PF-ODE method of plain / best_of_n sampling and of Demon's tail and rollouts")
    p.add_argument("--cfg", type=cliargs.float_in(), default=3.0, help="classifier-free guidance weight")
    p.add_argument("--n", type=cliargs.positive_int, default=4, help="best_of_n: candidates per image")
    cliargs.add_demon_arguments(p, prefix="demon: ")
    p.add_argument("--particles", type=cliargs.positive_int, default=8, help="smc: particles per image")
    p.add_argument("--alpha", type=cliargs.positive_float, default=1.0, help="smc: target p(x)·exp(r/α), α > 0")
    p.add_argument("--proposal", default="auto", choices=("auto", "guided", "prior"),
                   help="smc: auto = guided for differentiable rewards, else prior")
    p.add_argument("--device", type=cliargs.device, default=None,
                   help="cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--fp16", action="store_true", help="run diffusers networks in float16")
    p.add_argument("--max-batch", type=cliargs.positive_int, default=None, help="the most rows per network call")
    p.add_argument("--barrier-timeout", type=cliargs.positive_float, default=24 * 3600.0,
                   help="seconds ranks wait for each other")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_args(args) -> None:
    """Fail before any work on settings that cannot work together (single values are checked by their types)."""
    cliargs.check_reward_options(args.reward, args.model, args)
    run_prompts(args)


def interrupted(args) -> str:
    """What a Ctrl-C leaves behind, and how to go on."""
    done = len(experiment.read_jsonl(Path(args.out) / "manifest.jsonl"))
    return f"{done} finished images are kept in {args.out}; rerun the same command to resume"


def cli_main(args) -> int:
    import torch.distributed as dist
    check_args(args)
    cliargs.warn_sampler_mismatch(args)
    try:
        report = generate(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if report is not None:
        print(f"wrote {report}, {report.with_name('report.csv')} and {report.with_name('grid.png')}")
    return 0


def main(argv=None) -> int:
    """``python -m kdiff_align.apps.generate``: the same as ``kdiff-align generate``."""
    parser = cliargs.Parser(prog="kdiff-align generate", description=cliargs.plain(__doc__),
                            formatter_class=cliargs.Formatter)
    add_arguments(parser)
    cliargs.add_debug(parser)
    parser.set_defaults(func=cli_main, interrupted=interrupted)
    return cliargs.run(parser.parse_args(argv), parser.prog)


if __name__ == "__main__":
    sys.exit(main())
