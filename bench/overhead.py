"""Sampler overhead and batched-vs-looped CFG on a small conv net (CPU); prints ratios from one run.

    python bench/overhead.py

Targets (issue 3): odeint/sdeint wall time ÷ time inside the network ≤ 1.05;
batched 3-prompt CFG ÷ looped CFG ≤ 0.6 at batch 1.
"""
import os
import time

import torch

import kdiff_align as ka


class ConvNet(torch.nn.Module):
    """A small conditional conv denoiser: 4 conv layers, embedding added as a bias."""

    def __init__(self, channels=64):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.mid = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1),
                                                             torch.nn.SiLU()) for _ in range(2)])
        self.out = torch.nn.Conv2d(channels, 3, 3, padding=1)
        self.emb = torch.nn.Linear(8, channels)

    def forward(self, x, sigma, emb=None):
        c_in = (1 / (sigma**2 + 1).sqrt())[:, None, None, None]
        h = self.inp(x * c_in) + (sigma.log()[:, None, None, None] / 4)
        if emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return x / (1 + sigma[:, None, None, None] ** 2) + self.out(self.mid(h))


class Timed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def overhead(run, timed):
    timed.seconds = 0.0
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / timed.seconds


@torch.no_grad()
def main():
    torch.manual_seed(0)
    net = Timed(ConvNet().eval())
    x = torch.randn(8, 3, 32, 32) * 80
    sigmas = ka.get_sigmas_karras(30, 0.002, 80.0)
    net(x[:1], sigmas[:1])  # warm-up
    print(f"odeint heun  wall / network: {overhead(lambda: ka.odeint(net, x, sigmas, disable=True), net):.3f}")
    print(f"odeint dopri5 wall / network: "
          f"{overhead(lambda: ka.odeint(net, x, sigmas, method='dopri5', disable=True), net):.3f}")
    gen = torch.Generator().manual_seed(0)
    print(f"sdeint eta=1 wall / network: "
          f"{overhead(lambda: ka.sdeint(net, x, sigmas, generator=gen, disable=True), net):.3f}")
    print(f"sdeint beta  wall / network: "
          f"{overhead(lambda: ka.sdeint(net, x, sigmas, beta=0.1, generator=gen, disable=True), net):.3f}")

    for size, channels in ((8, 16), (8, 32), (32, 64)):
        cfg_ratio(sigmas, size, channels)


def cfg_ratio(sigmas, size, channels):
    """Batched (one call of 4 rows) vs looped (4 calls of 1 row) 3-prompt CFG at batch 1."""
    torch.manual_seed(0)
    net = ConvNet(channels).eval()
    embs = [{"emb": torch.randn(1, 8)} for _ in range(3)]
    uncond, weights = {"emb": torch.zeros(1, 8)}, [3.0, 1.0, 0.5]
    batched = ka.cfg_denoiser(net, embs, uncond, weights)

    def looped(x, sigma):
        d_u = net(x, sigma, **uncond)
        return d_u + sum(w * (net(x, sigma, **e) - d_u) for w, e in zip(weights, embs))

    x1 = torch.randn(1, 3, size, size) * 80
    times = {"looped": float("inf"), "batched": float("inf")}
    for _ in range(5):  # alternate and keep each one's best run
        for name, model in (("looped", looped), ("batched", batched)):
            start = time.perf_counter()
            ka.odeint(model, x1, sigmas, method="euler", disable=True)
            times[name] = min(times[name], time.perf_counter() - start)
    print(f"3-prompt CFG at batch 1, {size}x{size} images, {channels} channels, batched / looped: "
          f"{times['batched'] / times['looped']:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("KDIFF_BENCH_THREADS", "1")))
    main()
