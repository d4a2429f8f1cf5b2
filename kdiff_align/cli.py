"""Command line: ``kdiff-align demo [--out DIR] [--quick]``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import sampling, schedules
from .testing import MixtureDenoiser


def toy_mixture() -> MixtureDenoiser:
    """A 2-D mixture of three Gaussians, the demo's closed-form model."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    return MixtureDenoiser(means, torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.5, 0.3, 0.2]))


def mixture_demo(out: Path, n: int, steps: int, seed: int = 0, disable: bool | None = None) -> dict:
    """Sample the toy mixture with odeint (Heun, dopri5) and sdeint (DDPM, β-SDE); plot against the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = toy_mixture()
    sigmas = schedules.get_sigmas_karras(steps, 0.002, 20.0)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    runs = {
        "data": lambda: model.sample(n, torch.Generator().manual_seed(seed + 1)),
        "odeint heun": lambda: sampling.odeint(model, x_T, sigmas, disable=disable),
        "odeint dopri5": lambda: sampling.odeint(model, x_T, sigmas, method="dopri5", disable=disable),
        "sdeint eta=1": lambda: sampling.sdeint(model, x_T, sigmas, generator=torch.Generator().manual_seed(seed + 2),
                                                disable=disable),
        "sdeint beta=0.1": lambda: sampling.sdeint(model, x_T, sigmas, beta=0.1, disable=disable,
                                                   generator=torch.Generator().manual_seed(seed + 3)),
    }
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), sharex=True, sharey=True)
    table = {}
    for ax, (name, run) in zip(axes, runs.items()):
        start = time.perf_counter()
        x0 = run()
        seconds = time.perf_counter() - start
        weights = torch.bincount(model.classify(x0), minlength=3).float() / n
        table[name] = (weights.tolist(), seconds)
        ax.scatter(x0[:, 0], x0[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{name}\nmodes " + " ".join(f"{w:.2f}" for w in weights.tolist()), fontsize=9)
    fig.suptitle(f"Gaussian-mixture toy, {steps} steps, true mode weights 0.50 0.30 0.20")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "mixture_samples.png", dpi=100)
    plt.close(fig)
    return table


def demo(args) -> int:
    out = Path(args.out)
    n, steps = (500, 10) if args.quick else (4000, 40)
    table = mixture_demo(out, n, steps, disable=args.no_progress or None)
    print(f"{'run':<18}{'mode weights':<24}{'seconds':>8}")
    for name, (weights, seconds) in table.items():
        print(f"{name:<18}{' '.join(f'{w:.3f}' for w in weights):<24}{seconds:>8.2f}")
    print(f"wrote {out / 'mixture_samples.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdiff-align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the offline demo and write pictures to --out")
    p_demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p_demo.add_argument("--quick", action="store_true", help="smaller sizes, for tests")
    p_demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
