"""Sample quality of the shipped toy models; regenerates ``docs/quality.md`` and ``docs/img/*.png``.

    python bench/quality.py                 # all models, 40 samples per class and CFG weight, 12 steps
    python bench/quality.py --n 20 --models fashion --no-write --data eval

For each model and CFG weight w ∈ {0, 1, 3} (D = D_∅ + w·(D_class − D_∅), so w = 0 is unconditional) it
draws ``--n`` samples of every class with the Heun PF-ODE sampler and reports the fraction the shipped
classifier assigns to the requested class, and the Fréchet distance between the classifier's
penultimate features of all generated samples and of the test set (a small-scale FID; the train-vs-test
distance is given as the floor). Fashion-MNIST's reference images are the full test set when the Debian
package ``dataset-fashion-mnist`` is installed (``--data full``, what ``docs/quality.md`` reports), or
the shipped 3,000-image slice (``--data eval``: no data set needed; its floor is then the FD between
the slice's even and odd rows, 1,500 each, which is biased higher than the 10,000-image floor);
``--data auto`` (the default) takes the full set when present and says which it used.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdiff_align import toy  # noqa: E402
from kdiff_align.metrics import features, frechet_distance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CFGS = (0.0, 1.0, 3.0)


@torch.no_grad()
def generate(pipe, class_name: str, cfg: float, n: int, steps: int, seed: int, disable=None) -> torch.Tensor:
    """``n`` images of ``class_name`` at CFG weight ``cfg`` (Heun, ``steps`` steps), decoded to pixels."""
    x_T = pipe.get_init_latent(n, torch.Generator().manual_seed(seed))
    x0 = pipe.odeint(x_T, {"prompts": [class_name], "cfgs": [cfg]}, steps, disable=disable)
    return pipe.decode(x0).clamp(-1, 1)


def save_grid(images: dict[str, torch.Tensor], path: Path, title: str, per_class: int = 8) -> None:
    """One row per class of ``per_class`` samples, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = len(images)
    fig, axes = plt.subplots(rows, per_class, figsize=(0.9 * per_class + 0.8, 0.9 * rows + 0.4), squeeze=False)
    for ax_row, (name, x) in zip(axes, images.items()):
        for j, ax in enumerate(ax_row):
            ax.imshow(x[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=80, format="png")
    os.replace(tmp, path)
    plt.close(fig)


def reference_sets(data: str, source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(test images, their labels, floor images to compare with them, description) for ``data``."""
    full = data == "digits" or source == "full" or (  # scikit-learn ships the whole digits set
        source == "auto" and (toy.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists())
    if full:
        x_train, _ = toy.load_data(data, "train")
        x_test, y_test = toy.load_data(data, "test")
        return x_test, y_test, x_train[:len(x_test)], f"{len(x_test)} test images; floor: train vs test"
    x, y = toy.load_data(data, "eval")
    return x[1::2], y[1::2], x[::2], f"the odd rows of the shipped {len(x)}-image slice; floor: even vs odd rows"


def evaluate(name: str, n: int, steps: int, seed: int, img_dir: Path | None, source: str = "auto") -> dict:
    """Classifier test accuracy, per-class accuracy of generated samples and Fréchet distances for ``name``."""
    pipe = toy.load(name)
    data = "digits" if name == "digits" else "fashion"
    x_test, y_test, x_floor, reference = reference_sets(data, source)
    print(f"{name}: reference = {reference}", file=sys.stderr)
    with torch.no_grad():
        test_accuracy = (torch.cat([pipe.classifier(x_test[i:i + 1000]).argmax(1)
                                    for i in range(0, len(x_test), 1000)]) == y_test).float().mean().item()
    f_test = features(pipe.classifier, x_test)
    floor = frechet_distance(features(pipe.classifier, x_floor), f_test)
    report = dict(name=name, test_accuracy=test_accuracy, floor=floor, reference=reference, cfg={})
    bar = tqdm(total=len(CFGS) * len(pipe.class_names), desc=f"{name}")
    for w in CFGS:
        start, images, accuracy = time.perf_counter(), {}, {}
        for k, class_name in enumerate(pipe.class_names):
            x = generate(pipe, class_name, w, n, steps, seed + k)
            with torch.no_grad():
                accuracy[class_name] = (pipe.classifier(x).argmax(1) == k).float().mean().item()
            images[class_name] = x
            bar.update()
        f_gen = features(pipe.classifier, torch.cat(list(images.values())))
        report["cfg"][w] = dict(accuracy=accuracy, fd=frechet_distance(f_gen, f_test),
                                seconds=time.perf_counter() - start)
        if img_dir is not None:
            save_grid(images, img_dir / f"{name}_cfg{w:g}.png", f"{name}, CFG {w:g}, {steps} Heun steps")
    bar.close()
    return report


def markdown(reports: list[dict], n: int, steps: int) -> str:
    """The quality report as Markdown."""
    lines = ["# Quality of the shipped toy models", "",
             f"Regenerated by `python bench/quality.py` ({n} samples per class and CFG weight, Heun PF-ODE, "
             f"{steps} steps, σ ∈ [0.002, 80]). *Accuracy* is the fraction of samples the shipped classifier "
             "assigns to the requested class (at CFG 0 the model ignores the class, so ≈ 10% is expected). "
             "*FD* is the Fréchet distance between the classifier's penultimate features of all generated "
             "samples and of the reference images; the floor (train vs test, or two halves of the shipped slice) "
             "is given for each model. Fréchet distances from few samples "
             "are biased upward (digits: 297 test images), so compare each FD with its own model's floor.", ""]
    for r in reports:
        classes = list(next(iter(r["cfg"].values()))["accuracy"])
        lines += [f"## `{r['name']}`", "",
                  f"Reference: {r['reference']}. Classifier test accuracy: **{r['test_accuracy']:.2%}**. "
                  f"FD floor: {r['floor']:.2f}.", "",
                  "| CFG | mean accuracy | FD | " + " | ".join(classes) + " |",
                  "|---|---|---|" + "---|" * len(classes)]
        for w, c in r["cfg"].items():
            acc = c["accuracy"]
            lines.append(f"| {w:g} | **{np.mean(list(acc.values())):.1%}** | {c['fd']:.2f} | "
                         + " | ".join(f"{acc[k]:.0%}" for k in classes) + " |")
        lines += [""] + [f"![{r['name']} CFG {w:g}](img/{r['name']}_cfg{w:g}.png)" for w in r["cfg"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion", "fashion_latent", "digits"],
                        choices=sorted(toy.MODELS))
    parser.add_argument("--n", type=int, default=40, help="samples per class and CFG weight")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["auto", "full", "eval"], default="auto",
                        help="Fashion-MNIST reference images: full test set, the shipped slice, or full when "
                             "installed (default: auto)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    img_dir = None if args.no_write else ROOT / "docs" / "img"
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
    reports = [evaluate(name, args.n, args.steps, args.seed, img_dir, args.data) for name in args.models]
    text = markdown(reports, args.n, args.steps)
    print(text)
    if not args.no_write:
        path = ROOT / "docs" / "quality.md"
        path.with_name("quality.md.tmp").write_text(text + "\n")
        os.replace(path.with_name("quality.md.tmp"), path)


if __name__ == "__main__":
    main()
