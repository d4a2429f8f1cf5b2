"""Train the small Fashion-MNIST VAE (1×28×28 ↔ 4×7×7) used by the ``fashion_latent`` model.

    python train/train_vae.py --steps 2000 --seed 0

Loss: mean squared reconstruction error + ``--beta`` × the mean KL to N(0, I). Afterwards the latent
``scale`` is set so that the scaled posterior means of the training set have standard deviation
σ_data = 0.5 (the diffusion model's). Writes ``kdiff_align/weights/fashion_vae.safetensors``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import trange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdiff_align import toy  # noqa: E402
from train.common import WEIGHTS, save_weights  # noqa: E402


def vae_loss(vae: toy.VAE, x: torch.Tensor, generator, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction MSE and KL of one batch (reparameterised sample of the posterior)."""
    mean, logvar = vae.encode_dist(x)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
    mse = (torch.tanh(vae.decoder(z)) - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    return mse, mse + beta * kl


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x, _ = toy.load_fashion_mnist("train")
    x_test, _ = toy.load_fashion_mnist("test")
    vae = toy.VAE()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps)
    bar = trange(args.steps, desc="vae", mininterval=10)
    for _ in bar:
        mse, loss = vae_loss(vae, x[torch.randint(len(x), (args.batch,), generator=generator)], generator, args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode_dist(x[i:i + 1000])[0] for i in range(0, 10000, 1000)])
        vae.scale.fill_(0.5 / means.std().item())
        test_mse = (vae.decode(vae.encode(x_test[:2000])) - x_test[:2000]).square().mean().item()
    print(f"test reconstruction MSE {test_mse:.4f}, latent scale {vae.scale.item():.4f}", flush=True)
    save_weights(vae, WEIGHTS / "fashion_vae.safetensors", test_mse=f"{test_mse:.5f}", steps=args.steps,
                 seed=args.seed, beta=args.beta)


if __name__ == "__main__":
    main()
