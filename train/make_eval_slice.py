"""Write the shipped Fashion-MNIST evaluation slice: the first 300 test images of each class.

Run from the repository root (needs the Debian package ``dataset-fashion-mnist`` or
``$KDIFF_FASHION_MNIST``)::

    python train/make_eval_slice.py

The slice (``kdiff_align/data/fashion_mnist_eval.npz``: ``images`` uint8 [3000, 28, 28], ``labels`` uint8
[3000], ``test_index`` int32 [3000], the rows' positions in the official test set) is what tests,
notebooks and benchmarks use as real images; training always reads the full IDX files.
"""
import numpy as np

from kdiff_align import toy

PER_CLASS = 300


def main() -> None:
    root = toy.fashion_mnist_dir()
    images = toy.read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = toy.read_idx(root / "t10k-labels-idx1-ubyte.gz")
    rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)]))
    out = toy.FASHION_EVAL_SLICE
    out.parent.mkdir(exist_ok=True)
    np.savez_compressed(out, images=images[rows], labels=labels[rows], test_index=rows.astype(np.int32))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(rows)} images)")


if __name__ == "__main__":
    main()
