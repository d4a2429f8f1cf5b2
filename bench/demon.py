"""Sampling Demon benchmarks (CPU); prints ratios and figures measured in one run.

    python bench/demon.py [--quick] [--out bench/demon_out]

1. Batched candidates ÷ looped candidates (``max_batch=1``: one network call per row) for K = 16, on
   the shipped Fashion-MNIST model when its weights exist, otherwise a small conv net (said in the output).
2. Reward against NFE per image for Demon (tanh, boltzmann, optimal; Tweedie and rollout look-ahead)
   and best-of-N plain PF-ODE sampling at equal NFE, plotted to ``reward_vs_nfe.png``. The model is the
   shipped Fashion-MNIST model with its classifier logit as reward, otherwise an 8-D Gaussian mixture.
3. Our cost formula (``demon_cost``) on the reference's SD grid beside its ~21,000 / ~870 UNet pairs.
"""
import argparse
import time
from pathlib import Path

import torch

import kdiff_align as ka
from kdiff_align.align.demon import DEMON_TYPES, demon_cost, sample_demon
from kdiff_align.testing import MixtureDenoiser


class ConvNet(torch.nn.Module):
    """A small conv denoiser, 28×28×1, 4 conv layers of 32 channels (fallback model)."""

    def __init__(self, channels=32):
        super().__init__()
        conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        self.net = torch.nn.Sequential(conv(1, channels), torch.nn.SiLU(), conv(channels, channels), torch.nn.SiLU(),
                                       conv(channels, channels), torch.nn.SiLU(), conv(channels, 1))

    def forward(self, x, sigma, **_):
        c_in = (1 / (sigma**2 + 1).sqrt())[:, None, None, None]
        return x / (1 + sigma[:, None, None, None] ** 2) + self.net(x * c_in)


def toy_or_none():
    """The shipped Fashion-MNIST pipeline, or None when its weights are not there yet."""
    try:
        from kdiff_align import toy
        return toy.load("fashion")
    except (ImportError, FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"(shipped Fashion-MNIST model unavailable: {error})")
        return None


@torch.no_grad()
def batching_ratio(pipe, K=16, steps=6, repeats=3):
    """Wall time of Demon steps with the K candidates in one call ÷ one call per candidate."""
    if pipe is not None:
        model, shape, name = pipe.guided({"prompts": ["sneaker"], "cfgs": [2.0]}), pipe.latent_shape, "toy fashion, CFG"
    else:
        model, shape, name = ConvNet().eval(), (1, 28, 28), "small conv net (no toy weights)"
    sigmas = ka.get_sigmas_karras(steps, 0.1, 20.0)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    reward = lambda x0: x0.flatten(1).mean(1)  # noqa: E731

    def run(max_batch):
        start = time.perf_counter()
        sample_demon(model, x, sigmas, reward, K=K, beta=0.05, ode_after=1.0, max_batch=max_batch,
                     generator=torch.Generator().manual_seed(1), disable=True)
        return time.perf_counter() - start

    run(None), run(1)  # warm-up
    batched = min(run(None) for _ in range(repeats))
    looped = min(run(1) for _ in range(repeats))
    print(f"[1] {name}, K={K}, {steps - 1} Demon steps, batch 1: batched {batched:.3f} s, "
          f"looped {looped:.3f} s, batched / looped = {batched / looped:.3f} (target <= 0.5)")
    return batched / looped


def reward_problem(pipe, images):
    """(model, x_T, sigmas, reward, beta, name) for the reward-vs-NFE study."""
    gen = torch.Generator().manual_seed(0)
    if pipe is not None:
        from kdiff_align import toy
        sigmas = pipe.sigmas(10, start_t=20.0)  # from σ = 20 (pure noise at data std 0.5): β·|Δσ| ≤ 0.5
        x = torch.randn(images, *pipe.latent_shape, generator=gen) * 20.0
        model = pipe.guided({"prompts": ["sneaker"], "cfgs": [1.0]})
        name = "toy fashion, prompt sneaker, reward = sandal logit"
        return model, x, sigmas, toy.classifier_reward(pipe, "sandal"), 0.05, name
    dim = 8
    means = torch.zeros(2, dim)
    means[0, 0], means[1, 0] = -2.0, 2.0
    model = MixtureDenoiser(means, torch.tensor([0.6, 0.6]), torch.tensor([0.85, 0.15]))
    sigmas = ka.get_sigmas_karras(12, 0.01, 20.0)
    x = torch.randn(images, dim, generator=gen) * sigmas[0]
    reward = lambda x0: x0[:, 0] - 0.25 * x0[:, 1:].pow(2).sum(1)  # noqa: E731
    return model, x, sigmas, reward, 0.1, "8-D mixture, reward = x_0 − ¼‖rest‖²"


@torch.no_grad()
def best_of_n(model, x_T, sigmas, reward, ns, seed=10):
    """[(NFE per image, mean over images of the best reward among n plain PF-ODE samples)] for n in ``ns``."""
    scores = []
    for j in range(max(ns)):  # sample j of every image: x_T itself, then fresh noise
        x = x_T if j == 0 else torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed + j)) * sigmas[0]
        scores.append(reward(ka.odeint(model, x, sigmas, disable=True)).double())
    scores, plain_nfe = torch.stack(scores), 2 * (len(sigmas) - 1) - 1
    return [(n * plain_nfe, float(scores[:n].max(0).values.mean())) for n in ns]


def reward_vs_nfe(pipe, out: Path, quick: bool):
    images = 2 if quick else 4
    model, x_T, sigmas, reward, beta, name = reward_problem(pipe, images)
    print(f"[2] {name}; {images} images, {len(sigmas) - 1}-step grid; NFE = network rows per image")
    ns = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32]
    curves = {"best-of-N (plain ODE)": best_of_n(model, x_T, sigmas, reward, ns)}
    for demon_type in DEMON_TYPES:
        for r_of_c, c_steps, Ks in (("consistency", None, [2, 4, 8]), ("baseline", 2, [2, 8])):
            for K in (Ks[::2] if quick else Ks):
                x, info = sample_demon(model, x_T, sigmas, reward, K=K, beta=beta, demon_type=demon_type,
                                       r_of_c=r_of_c, c_steps=c_steps, ode_after=0.05, return_info=True,
                                       disable=True, generator=torch.Generator().manual_seed(2))
                nfe = info["nfe"]["network_rows"] / images
                label = f"Demon {demon_type}, {'Tweedie' if r_of_c == 'consistency' else 'rollout c=2'}"
                curves.setdefault(label, []).append((nfe, float(reward(x).double().mean())))
    for label, points in curves.items():
        print(f"    {label:<32}" + "  ".join(f"{nfe:7.0f}:{value:+.3f}" for nfe, value in points))
    plot(curves, out / ("reward_vs_nfe.png" if pipe is not None else "reward_vs_nfe_mixture.png"), name)
    return curves


def plot(curves, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        nfe, value = zip(*points)
        style = "k-o" if label.startswith("best") else ("-o" if "Tweedie" in label else "--s")
        ax.plot(nfe, value, style, label=label, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (rows) per image")
    ax.set_ylabel("mean final reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"    wrote {path}")


def cost_table():
    """Guided evaluations (CFG pairs) per SD image on the reference grid (T = 64, σ 14.6488 → 0.002)."""
    sigmas = ka.get_sigmas_karras(64, 2e-3, 14.6488)
    rows = [("rollout look-ahead, c_steps = 20", dict(r_of_c="baseline", c_steps=20), "21,317"),
            ("consistency model (LCM) look-ahead", dict(r_of_c="consistency", consistency_model=True), "869 + 720 LCM"),
            ("Tweedie look-ahead x̂₀ = D(x, σ)", dict(r_of_c="consistency"), "—")]
    print("[3] cost per SD image, K = 16, T = 64, ode_after = 0.11 (CFG pairs = guided D evaluations)")
    for label, kw, reference in rows:
        cost = demon_cost(sigmas, K=16, ode_after=0.11, **kw)
        extra = f" + {cost['consistency_rows']} LCM" if cost["consistency_rows"] else ""
        print(f"    {label:<38} ours {cost['network_rows']:>6}{extra:<10} reference {reference}"
              f"   ({cost['reward_calls']} reward calls of 16 images; the plain-ODE image adds 127)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/demon_out")
    parser.add_argument("--mixture", action="store_true", help="also run part 2 on the 8-D mixture")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = toy_or_none()
    batching_ratio(pipe, repeats=2 if args.quick else 3)
    reward_vs_nfe(pipe, Path(args.out), args.quick)
    if args.mixture and pipe is not None:
        reward_vs_nfe(None, Path(args.out), args.quick)
    cost_table()


if __name__ == "__main__":
    main()
