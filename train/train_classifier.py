"""Train the small CNN classifier (reward and quality metric) on digits or Fashion-MNIST.

    python train/train_classifier.py --data fashion --epochs 3 --seed 0
    python train/train_classifier.py --data digits --epochs 30 --shift 1 --seed 0
    python train/train_classifier.py --data fashion --arch mlp --epochs 4 --seed 1 --threads 1 \
        --name fashion_classifier_heldout      # the arena's held-out classifier (an MLP, another seed)

Each batch gets a random shift of up to ``--shift`` pixels. The test accuracy is printed and stored in the
weights' metadata (``kdiff_align/weights/<name>.safetensors``, ``<data>_classifier`` by default).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdiff_align import toy  # noqa: E402
from train.common import WEIGHTS, save_weights  # noqa: E402

ARCH = {"digits": dict(channels=(32, 64), size=8), "fashion": dict(channels=(32, 48, 64), size=28)}
MLP = {"digits": dict(size=8, hidden=256, feature_dim=64), "fashion": dict(size=28, hidden=256, feature_dim=128)}


def build(data: str, arch: str) -> torch.nn.Module:
    """The classifier network for ``data``: the shipped CNN or the held-out MLP (another architecture)."""
    return toy.Classifier(**ARCH[data]) if arch == "cnn" else toy.MLPClassifier(**MLP[data])


def random_shift(x: torch.Tensor, generator, pixels: int = 2) -> torch.Tensor:
    """Translate the batch by up to ``pixels`` in each direction, filling with the background value −1."""
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return F.pad(x, (pixels,) * 4, value=-1.0)[..., dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    predictions = torch.cat([classifier(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return (predictions == y).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(ARCH), required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--shift", type=int, default=2, help="largest random translation in pixels")
    parser.add_argument("--arch", choices=("cnn", "mlp"), default="cnn", help="network (default: the shipped CNN)")
    parser.add_argument("--name", default=None, help="weights file stem (default: <data>_classifier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    x, y = toy.load_data(args.data, "train")
    x_test, y_test = toy.load_data(args.data, "test")
    classifier = build(args.data, args.arch)
    steps = args.epochs * (len(x) // args.batch)
    opt = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    bar = tqdm(total=steps, desc=f"{args.data} classifier", mininterval=5)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(len(x) // args.batch):
            index = order[i * args.batch:(i + 1) * args.batch]
            logits = classifier(random_shift(x[index], generator, args.shift))
            loss = F.cross_entropy(logits, y[index], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        classifier.eval()
        test_accuracy = accuracy(classifier, x_test, y_test)
        classifier.train()
        print(f"epoch {epoch + 1}: test accuracy {test_accuracy:.4f}", flush=True)
    name = args.name or f"{args.data}_classifier"
    save_weights(classifier, WEIGHTS / f"{name}.safetensors", test_accuracy=f"{test_accuracy:.4f}",
                 epochs=args.epochs, seed=args.seed, arch=args.arch)


if __name__ == "__main__":
    main()
