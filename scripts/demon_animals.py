"""The Sampling Demon paper's aesthetic animal evaluation: 45 animal prompts, seed 42, plain PF-ODE vs Demon.

    python scripts/demon_animals.py --model /path/to/stable-diffusion-v1-5 \
        --clip /path/to/clip-vit-large-patch14 --mlp /path/to/sac+logos+ava1-l14-linearMSE.pth \
        --r-of-c consistency --fp16 --out experiments/animals

Reward: the LAION aesthetic predictor (``kdiff_align.rewards.AestheticScorer``: an MLP 768-1024-128-64-16-1
on the L2-normalised CLIP ViT-L/14 image embedding), from local weights only, scored on the decoded x̂₀.
Writes one Demon run folder per prompt (``DemonGenerator``) and ``animals.csv`` / ``animals.md`` with the
aesthetic score of the plain PF-ODE image and of the Demon image from the same initial noise.

The grid is the reference's by default (``--grid reference``: T Karras points from 14.6488 to 0.002, then 0;
at T = 64, ode_after = 0.11 that is 45 Demon steps), as in the paper; ``--grid model`` uses SD's own σ range
14.6146 → 0.0292 (54 Demon steps at T = 64). The cost printed first is ``demon_cost`` on the grid used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from kdiff_align.align.demon import DEMON_TYPES, R_OF_C, DemonGenerator, RewardDemon, demon_steps
from kdiff_align.rewards import AestheticScorer, aesthetic_reward

ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark",
           "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose",
           "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo"]


def evaluate(gen: DemonGenerator, prompts, out: Path) -> list[dict]:
    """Plain and Demon aesthetic scores per prompt; writes animals.csv and animals.md under ``out``."""
    rows = []
    for prompt in prompts:
        result = gen.generate(prompt)
        rows.append({"prompt": prompt, "plain": result["plain_reward"], "demon": result["demon_reward"],
                     "seconds": result["seconds"], "network_rows": result["nfe"]["network_rows"],
                     "directory": str(result["directory"])})
        print(f"{prompt:<12} plain {result['plain_reward']:.3f}  demon {result['demon_reward']:.3f}", flush=True)
    write_table(rows, out)
    return rows


def write_table(rows: list[dict], out: Path) -> None:
    """animals.csv (every prompt) and animals.md (mean ± std over prompts), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    csv = ["prompt,plain,demon,seconds,network_rows,directory"] + [
        f"{r['prompt']},{r['plain']:.4f},{r['demon']:.4f},{r['seconds']:.1f},{r['network_rows']},{r['directory']}"
        for r in rows]
    plain, demon = [r["plain"] for r in rows], [r["demon"] for r in rows]
    spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    md = ["| sampler | mean aesthetic score | std over prompts | prompts improved |", "|---|---|---|---|",
          f"| plain PF-ODE | {statistics.mean(plain):.3f} | {spread(plain):.3f} | |",
          f"| Demon | {statistics.mean(demon):.3f} | {spread(demon):.3f} | "
          f"{sum(d > p for d, p in zip(demon, plain))}/{len(rows)} |"]
    for name, lines in (("animals.csv", csv), ("animals.md", md)):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local Stable Diffusion diffusers folder")
    p.add_argument("--clip", required=True, help="local CLIP ViT-L/14 folder (transformers)")
    p.add_argument("--mlp", required=True, help="aesthetic MLP weights (.pth or .safetensors)")
    p.add_argument("--out", default="experiments/animals")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--grid", default="reference", choices=["reference", "model"],
                   help="sigma range of the Karras grid: the Demon reference's 14.6488 -> 0.002 or the model's own")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--tau", default="adaptive")
    p.add_argument("--demon-type", default="tanh", choices=DEMON_TYPES)
    p.add_argument("--r-of-c", default="baseline", choices=R_OF_C)
    p.add_argument("--c-steps", type=int, default=20)
    p.add_argument("--ode-after", type=float, default=0.11)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from kdiff_align.models import from_pretrained
    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = from_pretrained(args.model, torch_dtype=dtype, device=args.device)
    scorer = AestheticScorer(args.clip, args.mlp, dtype=dtype, device=pipe.device)
    out = Path(args.out)
    tau = args.tau if args.tau == "adaptive" else float(args.tau)
    gen = RewardDemon(aesthetic_reward(scorer, pipe.decode), cfg=args.cfg, beta=args.beta, tau=tau, K=args.K,
                      T=args.T, demon_type=args.demon_type, r_of_c=args.r_of_c, c_steps=args.c_steps,
                      ode_after=args.ode_after, grid=args.grid, seed=args.seed, ylabel="Aesthetic score",
                      experiment_directory=out / "runs", pipeline=pipe, max_batch=args.max_batch,
                      disable=args.no_progress or None)
    sigmas, cost = gen.sigmas(), gen.cost()
    print(f"grid {float(sigmas[0]):.6g} -> {float(sigmas[-2]):.6g} ({args.grid}), T = {args.T}: "
          f"{demon_steps(sigmas, args.ode_after)} Demon steps, {cost['network_rows']} guided rows per Demon image "
          f"(+ {2 * args.T - 1} for the plain image)", flush=True)
    rows = evaluate(gen, ANIMALS[:args.limit], out)
    print((out / "animals.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
