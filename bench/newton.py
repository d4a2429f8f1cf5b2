"""Inexact-Newton constraint cost against DPS (CPU); prints ratios from one run.

    python bench/newton.py [--threads 1] [--steps 20] [--skip-toy] [--iteration-only]
    python bench/newton.py --tune [--steps 20]     # Newton vs DPS at their best-tuned step sizes

``--tune``: Fashion-MNIST inpainting (left half of real test images known, unconditional model, 20
steps). Each method's step size is tuned on a small grid (DPS: ζ ∈ {0.1, 0.3, 0.5, 1, 2, 4} in the
published VP parametrisation; Newton: the λ schedule (λ₀, λ₀/5) with λ₀ ∈ {1/32, 1/16, 1/8, 1/4, 1/2, 1}, K = 5)
for the lowest known-pixel RMS on 8 tuning images, and the best setting is reported on 8 other
images, with NFE by the NFE rule (forward, backward, total in forward equivalents). It also measures
the cost of one backward row relative to a forward row (``utils.BACKWARD_COST``).

Models: a random-weight SD-like diffusers ``UNet2DConditionModel`` (4×16×16 latents, cross-attention,
batch 2) and, when its weights are shipped, the Fashion-MNIST toy model (1×28×28, batch 8). Task: latent
inpainting, left half known. Targets (issue 8): one Newton iteration ≤ 2.1 forward passes; a Newton
sample ÷ a DPS sample of the same steps ≤ 0.6 in wall time, with far less peak memory.

Memory is reported two ways: the bytes autograd saves for one D(x) call with gradients (what DPS holds
until its backward pass; Newton builds no graph), and the peak resident set size during one sample in a fresh
child process (``/proc/self/statm`` sampled every 2 ms) minus its RSS just before the sample.
"""
import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import torch

import kdiff_align as ka
from kdiff_align.align import newton
from kdiff_align.align.dps import sample_dps


def sd_like(seed: int = 0):
    """A tiny random SD-like UNet (eps, scaled-linear β) as a denoiser, its conditioning and latent shape."""
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval().requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = ka.external.DiffusersDenoiser(unet, scheduler)
    batch = 2
    extra = {"encoder_hidden_states": torch.randn(batch, 8, 32)}
    return model, extra, (batch, 4, 16, 16), model.sigma_min, model.sigma_max


def toy_fashion():
    from kdiff_align import toy
    pipe = toy.load("fashion")
    batch = 8
    extra = pipe.class_labels([""] * batch)  # the null class: unconditional
    return pipe.denoiser, extra, (batch, *pipe.latent_shape), pipe.sigma_min, pipe.sigma_max


MODELS = {"sd_like": sd_like, "fashion": toy_fashion}


def problem(name: str, steps: int):
    model, extra, shape, sigma_min, sigma_max = MODELS[name]()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g) * sigma_max
    mask = torch.zeros(1, 1, *shape[-2:])
    mask[..., : shape[-1] // 2] = 1
    y = torch.randn(shape, generator=g).clamp(-1, 1) * mask
    sigmas = ka.get_sigmas_karras(steps, max(sigma_min, 0.03), min(sigma_max, 14.6))
    return model, extra, x_T, sigmas, newton.linear_residual(newton.Mask(mask), y)


def run_sample(kind: str, model, extra, x_T, sigmas, residual, n_iter: int):
    g = torch.Generator().manual_seed(1)
    if kind == "plain":
        return ka.sdeint(model, x_T, sigmas, extra_args=extra, eta=0.16, generator=g, disable=True)
    if kind == "dps":
        return sample_dps(model, x_T, sigmas, residual, zeta=0.5, eta=0.16, extra_args=extra, generator=g,
                          disable=True)
    return newton.sample_constrained(model, x_T, sigmas, residual, n_iter=n_iter, eta=0.16, extra_args=extra,
                                     generator=g, disable=True)


def rss_mib() -> float:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(name: str, kind: str, steps: int, n_iter: int) -> None:
    """Run one sample in this fresh process; print the peak RSS above the RSS before it (sampled every 2 ms)."""
    model, extra, x_T, sigmas, residual = problem(name, steps)
    with torch.no_grad():
        model(x_T, sigmas[:1].expand(x_T.shape[0]), **extra)  # warm-up
    base, peak, done = rss_mib(), [0.0], threading.Event()

    def monitor():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)
    thread = threading.Thread(target=monitor)
    thread.start()
    run_sample(kind, model, extra, x_T, sigmas, residual, n_iter)
    done.set()
    thread.join()
    print(json.dumps({"peak_mib": max(peak[0], rss_mib()) - base}))


def saved_activations_mib(model, x, sigma, extra) -> float:
    """Bytes autograd saves for the backward pass of one D(x) call (what DPS must hold), in MiB."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().requires_grad_(), sigma, **extra)
    return sum(seen.values()) / 2**20


def peak_rss(name, kind, steps, n_iter, threads) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", name, kind, "--steps", str(steps), "--n-iter",
                          str(n_iter), "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def bench(name: str, steps: int, threads: int, iteration_only: bool = False) -> None:
    model, extra, x_T, sigmas, residual = problem(name, steps)
    print(f"\n== {name}: batch {x_T.shape[0]}, shape {tuple(x_T.shape[1:])}, {steps} steps, {threads} thread(s)")
    sigma = torch.full((x_T.shape[0],), 1.0)
    x = x_T / sigmas[0] * 1.0
    denoised = model(x, sigma, **extra)  # warm-up
    k = 5  # paired, interleaved timings of 2k plain calls and k Newton iterations; median ratio over 5 pairs
    per_iter, t_fwd = [], []
    for _ in range(5):
        t_fwd.append(timed(lambda: [model(x, sigma, **extra) for _ in range(2 * k)]) / (2 * k))
        per_iter.append(timed(lambda: newton.newton_step(model, x, sigma, residual, n_iter=k, extra_args=extra,
                                                         denoised=denoised)) / k / t_fwd[-1])
    t_fwd = sorted(t_fwd)[2]
    t_dps = timed(lambda: newton.vjp(model, x, sigma, residual(denoised), extra_args=extra), repeat=5)
    print(f"forward pass {t_fwd * 1e3:.1f} ms; one Newton iteration = {sorted(per_iter)[2]:.2f} forward passes "
          f"(median of 5 paired runs, range {min(per_iter):.2f}–{max(per_iter):.2f}; target ≤ 2.1); "
          f"one DPS update (forward with graph + backward) = {t_dps / t_fwd:.2f} forward passes")
    if iteration_only:
        return
    t_plain = timed(lambda: run_sample("plain", model, extra, x_T, sigmas, residual, 0))
    t_dps_sample = timed(lambda: run_sample("dps", model, extra, x_T, sigmas, residual, 0))
    print(f"plain sample {t_plain:.2f} s; DPS sample {t_dps_sample:.2f} s", flush=True)
    for n_iter in (1, 5):
        t_sample = timed(lambda: run_sample("newton", model, extra, x_T, sigmas, residual, n_iter))
        print(f"Newton K={n_iter}: sample {t_sample:.2f} s ({1 + 2 * n_iter} calls/step), ÷ DPS sample = "
              f"{t_sample / t_dps_sample:.2f} (target ≤ 0.6); ÷ DPS at its own 1000-step budget "
              f"(extrapolated from the per-step time) = {t_sample / (t_dps_sample / steps * 1000):.3f}")
    print(f"autograd activations DPS holds per step: {saved_activations_mib(model, x, sigma, extra):.1f} MiB; "
          "Newton: 0 (no graph)")
    rss = {kind: peak_rss(name, kind, steps, 5, threads) for kind in ("plain", "dps", "newton")}
    print(f"peak RSS during one sample above the RSS before it: plain +{rss['plain']:.1f} MiB, "
          f"DPS +{rss['dps']:.1f} MiB, Newton K=5 +{rss['newton']:.1f} MiB")


DPS_ZETAS = (0.1, 0.3, 0.5, 1.0, 2.0, 4.0)
NEWTON_LR0 = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0)


def backward_cost(model, x, sigma, extra, repeat: int = 15) -> float:
    """Median over paired runs of (forward with graph + backward − plain forward) / plain forward."""
    def fwd():
        with torch.no_grad():
            model(x, sigma, **extra)

    def fwd_bwd():
        with torch.enable_grad():
            x_ = x.detach().requires_grad_()
            out = model(x_, sigma, **extra)
            torch.autograd.grad(out, x_, torch.ones_like(out))
    ratios = []
    for _ in range(repeat):
        t_f, t_fb = timed(lambda: [fwd() for _ in range(3)]), timed(lambda: [fwd_bwd() for _ in range(3)])
        ratios.append((t_fb - t_f) / t_f)
    return sorted(ratios)[repeat // 2]


def inpainting_task(pipe, first: int, batch: int = 8):
    """Left-half inpainting of ``batch`` shipped test images from index ``first`` (every 37th image)."""
    from kdiff_align import toy
    images = toy.load_fashion_mnist("eval")[0][first * 37:(first + batch) * 37:37]
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14] = 1
    return newton.linear_residual(newton.Mask(mask), images * mask), mask, images


def known_rms(x0, mask, images) -> float:
    return float(((x0 - images) * mask).pow(2).sum() / (mask.sum() * x0.shape[0])) ** 0.5


def run_method(method, value, pipe, task, steps, seed):
    residual, mask, images = task
    extra = pipe.class_labels([""] * images.shape[0])
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * pipe.sigma_max
    sigmas, g = pipe.sigmas(steps), torch.Generator().manual_seed(seed + 1)
    if method == "DPS":
        x0, info = sample_dps(pipe.denoiser, x_T, sigmas, residual, zeta=value, extra_args=extra, generator=g,
                              disable=True, return_info=True)
        nfe = info["nfe"]
    else:
        model = ka.testing.CountingDenoiser(pipe.denoiser)
        x0 = newton.sample_constrained(model, x_T, sigmas, residual, n_iter=5, lr=(value, value / 5), extra_args=extra,
                                       generator=g, disable=True)
        nfe = ka.utils.nfe_summary(model.calls)  # calls of the whole batch = evaluations per sample
    return known_rms(x0, mask, images), nfe


def tune(steps: int) -> None:
    """Both methods at their best step size on the tuning images, reported on held-out images."""
    from kdiff_align import toy
    pipe = toy.load("fashion")
    x = torch.randn(8, 1, 28, 28)
    extra = pipe.class_labels([""] * 8)
    print(f"backward row / forward row on the Fashion UNet (batch 8, median of 15): "
          f"{backward_cost(pipe.denoiser, x, torch.full((8,), 2.0), extra):.2f} (utils.BACKWARD_COST = "
          f"{ka.utils.BACKWARD_COST})")
    tuning, held_out = inpainting_task(pipe, 0), inpainting_task(pipe, 8)
    for method, grid in (("DPS", DPS_ZETAS), ("Newton", NEWTON_LR0)):
        scores = {v: run_method(method, v, pipe, tuning, steps, 0)[0] for v in grid}
        best = min(scores, key=scores.get)
        rms, nfe = run_method(method, best, pipe, held_out, steps, 100)
        label = "zeta" if method == "DPS" else "lambda0"
        print(f"{method:<7} tuning known-pixel RMS " + ", ".join(f"{label}={v:g}: {r:.3f}" for v, r in scores.items()))
        print(f"{method:<7} best {label}={best:g}: held-out known-pixel RMS {rms:.3f}; NFE per sample: "
              f"{nfe['forward']} forward + {nfe['backward']} backward = {nfe['total']:.0f} forward equivalents",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--iteration-only", action="store_true", help="only the per-iteration cost line")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "KIND"))
    parser.add_argument("--tune", action="store_true", help="Newton vs DPS at their best-tuned step sizes")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    if args.tune:
        return tune(args.steps)
    if args.child:
        return child(args.child[0], args.child[1], args.steps, args.n_iter)
    for name in MODELS:
        if name == "fashion" and args.skip_toy:
            continue
        try:
            bench(name, args.steps, args.threads, args.iteration_only)
        except FileNotFoundError as err:
            print(f"\n== {name}: skipped ({err})")


if __name__ == "__main__":
    main()
