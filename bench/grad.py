"""Gradients through the sampler: peak memory and time of "checkpoint" / "adjoint" against "full" (CPU, one run).

    python bench/grad.py [--steps 5 20 50] [--batch 4] [--method euler] [--threads 1]

Model: the shipped Fashion-MNIST UNet (1×28×28), unconditional (the null class), a Karras grid of each
number of steps. One measurement = ``odeint(..., grad=mode)`` forward plus ``loss.backward()`` for a
loss on the sample, with gradients w.r.t. x_T. Peak memory is the peak of live tensor bytes from the
profiler's allocation events over forward + backward (``sampling.grad.peak_memory``; deterministic,
and it sees what checkpointing recomputes); time is wall time of the same pass without the profiler.
Rows through the denoiser are counted (``testing.CountingDenoiser``), recomputation included.
Target (issue 26): "full" grows linearly with steps, "checkpoint" and "adjoint" stay flat (peak at
50 steps ≤ 1.2× the peak at 5 steps).
"""
import argparse
import time

import torch

import kdiff_align as ka
from kdiff_align.models import toy
from kdiff_align.sampling.grad import peak_memory
from kdiff_align.testing import CountingDenoiser

MODES = ("full", "checkpoint", "adjoint")


def measure(model, pipe, steps: int, batch: int, method: str, mode: str) -> dict:
    """Peak bytes, seconds and counted rows of one forward + backward pass through ``steps`` steps."""
    x = pipe.get_init_latent(batch, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def run():
        ka.odeint(model, x, pipe.sigmas(steps), method=method, grad=mode, disable=True).square().sum().backward()

    peak = peak_memory(run)
    model.rows = 0
    start = time.perf_counter()
    run()
    return {"peak": peak, "seconds": time.perf_counter() - start, "rows": model.rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--method", default="euler")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = toy.load("fashion")
    model = CountingDenoiser(pipe.null_denoiser())
    results = {(mode, n): measure(model, pipe, n, args.batch, args.method, mode) for n in args.steps for mode in MODES}
    print(f"Fashion UNet, batch {args.batch}, {args.method}; peak MB / seconds / rows, and ratios to 'full'")
    print("| steps | mode | peak MB | ÷ full | ÷ own peak at %d steps | s | ÷ full | rows |" % args.steps[0])
    print("|---|---|---|---|---|---|---|---|")
    for n in args.steps:
        full = results["full", n]
        for mode in MODES:
            r = results[mode, n]
            print(f"| {n} | {mode} | {r['peak'] / 1e6:.2f} | {r['peak'] / full['peak']:.3f} | "
                  f"{r['peak'] / results[mode, args.steps[0]]['peak']:.3f} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / full['seconds']:.2f} | {r['rows']} |")
    first, last = args.steps[0], args.steps[-1]
    print(f"== grad: peak memory and time against 'full' (batch {args.batch}, {args.method})")
    for mode in MODES:
        target = " (target ≤ 1.2)" if mode != "full" else ""
        print(f"{mode} peak at {last} steps / at {first} steps: "
              f"{results[mode, last]['peak'] / results[mode, first]['peak']:.3f}{target}")
    for mode in MODES[1:]:
        print(f"{mode} peak / full peak at {last} steps: "
              f"{results[mode, last]['peak'] / results['full', last]['peak']:.3f}")
        print(f"{mode} time / full time at {last} steps: "
              f"{results[mode, last]['seconds'] / results['full', last]['seconds']:.2f}")


if __name__ == "__main__":
    main()
