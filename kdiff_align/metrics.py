"""Sample metrics in a classifier's feature space: Fréchet distance (a small-scale FID) and diversity."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


@torch.no_grad()
def features(classifier, x: Tensor, chunk: int = 1000) -> np.ndarray:
    """Penultimate features ``classifier.features(x)`` of images ``x`` as float64 ``[N, F]``, in chunks."""
    if len(x) == 0:
        raise ValueError("x must hold at least one image")
    return torch.cat([classifier.features(x[i:i + chunk]) for i in range(0, len(x), chunk)]).double().cpu().numpy()


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative rounding eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(w.clip(0))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between Gaussians fitted to two feature sets ``[N, F]``.

    tr((Σ₁Σ₂)^½) is computed as tr((Σ₁^½ Σ₂ Σ₁^½)^½), whose matrix is symmetric (same eigenvalues as
    Σ₁Σ₂), so the result is real and exact for rank-deficient covariances of few samples.
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"f1 and f2 must be [N, F] feature sets with N >= 2 and the same F, got {f1.shape}, {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def mean_pairwise_distance(f: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of ``f`` ``[N, F]`` (0 for N < 2)."""
    f = np.asarray(f, dtype=np.float64)
    if len(f) < 2:
        return 0.0
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(f), 1)].mean())


def distinct_fraction(labels: Tensor, n_classes: int) -> float:
    """Distinct predicted classes among ``labels`` over the most possible, min(N, ``n_classes``)."""
    labels = torch.as_tensor(labels)
    return labels.unique().numel() / min(len(labels), n_classes) if len(labels) else 0.0
