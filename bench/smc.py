"""SMC tempering (DAS / FK steering): step cost and reward per NFE against best-of-N; ratios from one run.

    python bench/smc.py [--quick]

1. Prior proposal (FK, gradient-free): time per step ÷ one network call at batch B·N (target ≤ 1.15).
2. Guided proposal (DAS): time per step ÷ one forward call at batch B·N (the gradient pass through
   the denoiser and the reward), and the same with ``grad="detached"`` (no network backward).
3. Mean reward against NFE per output image, SMC vs best-of-N (N independent plain ancestral samples,
   keep the highest reward), both with N·S network evaluations per output. On the shipped Fashion-MNIST
   model (classifier logit of "bag") when its weights are present, else on a 2-D Gaussian mixture.
"""
import argparse
import statistics
import time

import torch

import kdiff_align as ka
from kdiff_align.align import smc
from kdiff_align.rewards import brightness
from kdiff_align.testing import MixtureDenoiser
from overhead import ConvNet, Timed


def call_time(net, x, sigma, repeats=10):
    """Median wall time of one forward call."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            net(x, sigma)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_costs(groups=4, n=16, steps=20, size=32, channels=64):
    """Per-step wall time of sample_smc ÷ one network call of B·N rows (ConvNet, brightness reward).

    The forward calls are timed inside the same run (one per step), which keeps the ratio steady when
    other processes load the machine; the ratio to a standalone call timed beforehand is printed too.
    """
    torch.manual_seed(0)
    net = ConvNet(channels).eval().requires_grad_(False)
    sigmas = ka.get_sigmas_karras(steps, 0.002, 80.0)
    x = torch.randn(groups, n, 3, size, size) * sigmas[0]
    one_call = call_time(net, x.flatten(0, 1), torch.full((groups * n,), 1.0))
    print(f"ConvNet {channels} ch, {size}×{size}×3, B={groups} groups × N={n} particles, {steps} steps; "
          f"one call at batch {groups * n}: {one_call * 1e3:.1f} ms")
    for label, kw in (("prior (FK)", dict(proposal="prior")),
                      ("guided, full gradient (DAS)", dict(proposal="guided")),
                      ("guided, detached gradient", dict(proposal="guided", grad="detached"))):
        timed = Timed(net)
        start = time.perf_counter()
        res = smc.sample_smc(timed, x, sigmas, brightness, num_particles=n, alpha=0.01, disable=True,
                             generator=torch.Generator().manual_seed(0), **kw)
        wall = time.perf_counter() - start
        print(f"  {label:30s} time per step / its forward call: {wall / timed.seconds:4.2f}   "
              f"(/ the standalone call: {wall / steps / one_call:4.2f}; {int(res.resampled.sum())} resamplings)")


def fashion_setup():
    """(model, reward, latent shape, init σ, sigma grid fn, label) for the Fashion-MNIST model, or None."""
    try:
        from kdiff_align import toy
        pipe = toy.load("fashion")
    except Exception as error:  # weights not shipped yet
        print(f"(Fashion-MNIST model unavailable: {type(error).__name__}: {error}; using a 2-D mixture)")
        return None
    null = len(pipe.class_names)

    def model(x, sigma):
        return pipe.denoiser(x, sigma, class_labels=torch.full((x.shape[0],), null, dtype=torch.long))

    return model, toy.classifier_reward(pipe, "bag"), pipe.latent_shape, pipe.init_sigma, pipe.sigmas, \
        "Fashion-MNIST, unconditional, reward = classifier logit of 'bag'"


def mixture_setup():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    model = MixtureDenoiser(means, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.6, 0.3, 0.1]))
    reward = lambda x: -((x - torch.tensor([0.5, 3.0])) ** 2).sum(1)  # noqa: E731  (the 10% mode)
    return model, reward, (2,), 20.0, lambda s: ka.get_sigmas_karras(s, 0.002, 20.0), \
        "2-D mixture of 3 Gaussians, reward = −‖x − (0.5, 3)‖² (towards the 10% mode)"


@torch.no_grad()
def reward_vs_nfe(setup, groups=16, steps=20, budgets=(2, 4, 8), alphas=(1.0, 0.1)):
    """Mean reward of one output per group at N·S NFE: SMC (draw by weight; argmax) vs best-of-N."""
    model, reward, shape, init_sigma, sigma_fn, label = setup
    sigmas = sigma_fn(steps)
    print(f"\nReward vs NFE per output ({label}; {steps} ancestral steps, {groups} outputs, seed 0)")
    print(f"  {'N':>3} {'NFE':>5}  {'plain':>7}  {'best-of-N':>9}  " +
          "  ".join(f"{'SMC α=' + str(a) + ' draw':>15}  {'argmax':>7}" for a in alphas))
    for n in budgets:
        x = torch.randn(groups, n, *shape, generator=torch.Generator().manual_seed(n)) * init_sigma
        plain = ka.sdeint(model, x.flatten(0, 1), sigmas, generator=torch.Generator().manual_seed(1), disable=True)
        r_plain = reward(plain).double().view(groups, n)
        row = [f"{n:>3} {n * steps:>5}", f"{r_plain.mean():7.3f}", f"{r_plain.max(1).values.mean():9.3f}"]
        for alpha in alphas:
            res = smc.sample_smc(model, x, sigmas, reward, num_particles=n, alpha=alpha, proposal="prior",
                                 disable=True, generator=torch.Generator().manual_seed(1))
            w = res.log_weights.exp()
            drawn = (w * res.rewards).sum(1).mean()  # expected reward of one particle drawn by weight
            best = res.rewards.gather(1, res.log_weights.argmax(1, keepdim=True)).mean()
            row.append(f"{drawn:15.3f}  {best:7.3f}")
        print("  " + "  ".join(row))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--groups", type=int, default=8, help="outputs (SMC groups) per budget")
    parser.add_argument("--steps", type=int, default=10, help="ancestral steps for reward vs NFE")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on the shared 2-core machine, OpenMP barriers make small ops erratic
    step_costs(steps=8 if args.quick else 20)
    setup = fashion_setup() or mixture_setup()
    reward_vs_nfe(setup, groups=4 if args.quick else args.groups, steps=6 if args.quick else args.steps)


if __name__ == "__main__":
    main()
