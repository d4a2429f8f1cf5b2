"""Train a class-conditional EDM diffusion model (with classifier-free dropout) on digits or Fashion-MNIST.

    python train/train_diffusion.py --model fashion --steps 2500 --seed 0

``--model fashion_latent`` trains on the latents of the shipped VAE (train it first). The EMA weights are
written to ``kdiff_align/weights/<model>.safetensors`` every ``--save-every`` steps; ``--state`` keeps a
resumable checkpoint, so an interrupted run continued with the same command gives the same weights.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from tqdm import trange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdiff_align import toy  # noqa: E402
from kdiff_align.external import KarrasDenoiser  # noqa: E402
from train.common import WEIGHTS, ema_update, load_state, save_state, save_weights  # noqa: E402

ARCH = {  # model -> UNet keyword arguments
    "digits": dict(in_channels=1, channels=(64, 128), patch=1),
    "fashion": dict(in_channels=1, channels=(48, 96, 128), patch=2),
    "fashion_latent": dict(in_channels=4, channels=(96, 160), patch=1),
}


@torch.no_grad()
def training_data(model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images (or VAE latents for ``fashion_latent``) and labels."""
    if model != "fashion_latent":
        return toy.load_data(model, "train")
    x, y = toy.load_fashion_mnist("train")
    vae = toy.load_module(toy.VAE, "fashion_vae.safetensors")
    return torch.cat([vae.encode(x[i:i + 1000]) for i in range(0, len(x), 1000)]), y


def edm_loss(denoiser, x0: torch.Tensor, labels: torch.Tensor, generator, p_mean=-1.2, p_std=1.2) -> torch.Tensor:
    """EDM loss (Karras et al. 2022, eq. 8): λ(σ)·‖D(x0 + σn, σ) − x0‖², ln σ ~ N(P_mean, P_std²)."""
    b = x0.shape[0]
    sigma = (torch.randn(b, generator=generator) * p_std + p_mean).exp()
    noise = torch.randn(x0.shape, generator=generator)
    denoised = denoiser(x0 + sigma[:, None, None, None] * noise, sigma, class_labels=labels)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight[:, None, None, None] * (denoised - x0) ** 2).mean()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCH), required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--p-uncond", type=float, default=0.1, help="classifier-free dropout probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--state", type=Path, default=None, help="resumable checkpoint (.pt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y = training_data(args.model)
    n_classes = 10
    net = toy.UNet(n_classes=n_classes, **ARCH[args.model])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(args.seed)
    start = 0
    if (state := load_state(args.state)) is not None:
        net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        generator.set_state(state["generator"])
        start = state["step"]
    denoiser = KarrasDenoiser(net, toy.SIGMA_DATA)
    print(f"{args.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(x)} examples, "
          f"steps {start}..{args.steps}", flush=True)
    out = WEIGHTS / f"{args.model}.safetensors"
    bar = trange(start, args.steps, desc=args.model, mininterval=10)
    started = time.time()
    for step in bar:
        index = torch.randint(len(x), (args.batch,), generator=generator)
        labels = torch.where(torch.rand(args.batch, generator=generator) < args.p_uncond, n_classes, y[index])
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        loss = edm_loss(denoiser, x[index], labels, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_weights(ema, out, torch.float16, steps=step + 1, seed=args.seed, batch=args.batch, lr=args.lr,
                         p_uncond=args.p_uncond)
            if args.state is not None:
                save_state(args.state, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                           generator=generator.get_state(), step=step + 1)
            print(f"step {step + 1} loss {loss.item():.4f} saved {out.name} ({time.time() - started:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()
