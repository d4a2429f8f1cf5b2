"""Importance weights and resampling schemes for particle methods (SMC; Douc & Cappé 2005, Gerber et al. 2019).

``resample`` maps log-weights ``[..., N]`` to ancestor indices by systematic, stratified, multinomial,
residual or SSP resampling; each keeps the expected offspring count N·wᵢ, and they differ in variance.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RESAMPLING = ("systematic", "stratified", "multinomial", "residual", "ssp")


# --- weights -----------------------------------------------------------------------------------

def normalize(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised log-weights (logsumexp 0 over the last axis) and the log normaliser."""
    log_sum = log_w.logsumexp(-1, keepdim=True)
    return log_w - log_sum, log_sum.squeeze(-1)


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size (Σw)²/Σw² over the last axis, from unnormalised log-weights; in [1, N]."""
    return (2 * log_w.logsumexp(-1) - (2 * log_w).logsumexp(-1)).exp()


# --- resampling --------------------------------------------------------------------------------

def uniforms(rows: int, n: int, generator, device) -> Tensor:
    """``[rows, n]`` float64 uniforms: from one generator, or row b from ``generator[b]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand((rows, n), generator=generator, dtype=torch.float64, device=device)
    if len(generator) != rows:
        raise ValueError(f"generator is a list of {len(generator)}, expected one per group ({rows})")
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64, device=device) for g in generator])


def _counts_to_index(counts: Tensor) -> Tensor:
    """Offspring counts ``[B, N]`` (rows summing to N) → sorted ancestor indices ``[B, N]``."""
    slots = torch.arange(counts.shape[-1], device=counts.device).expand_as(counts).contiguous()
    return torch.searchsorted(counts.cumsum(-1).contiguous(), slots, right=True)


def _grid_counts(cum: Tensor, u: Tensor) -> Tensor:
    """Offspring of the grid (k + u)/1, k = 0, 1, …, falling in each cell of the cumulative mass ``cum``."""
    hits = torch.ceil(cum - u).clamp(min=0)
    return (hits - torch.nn.functional.pad(hits[..., :-1], (1, 0))).long()


def _ssp_counts(n_w: Tensor, u: Tensor) -> Tensor:
    """Srinivasan sampling process (Gerber, Chopin & Whiteley 2019): pairwise-coupled fractional parts.

    One open fractional mass meets each next particle in turn: if the two add to less than 1 one of them
    takes both (chosen proportionally to its mass), otherwise one of them gets a whole child and the other
    keeps the excess. Each exchange preserves expected mass, so E[offspring] = N·W and offspring ∈
    {⌊N·W⌋, ⌈N·W⌉}.
    """
    counts = n_w.floor()
    xi = n_w - counts
    rows = torch.arange(n_w.shape[0], device=n_w.device)
    open_ = torch.zeros_like(rows)
    for k in range(1, n_w.shape[1]):
        p, q = xi[rows, open_], xi[:, k]
        s = p + q
        merge = s < 1
        open_wins = torch.where(merge, u[:, k - 1] * s < p, u[:, k - 1] * (2 - s) < 1 - q)
        winner, loser = torch.where(open_wins, open_, k), torch.where(open_wins, k, open_)
        xi[rows, winner] = torch.where(merge, s, 0.0)
        xi[rows, loser] = torch.where(merge, 0.0, s - 1)
        counts[rows, winner] += (~merge).double()
        open_ = torch.where(merge, winner, loser)
    counts[rows, open_] += xi[rows, open_].round()
    return counts.long()


def _residual_counts(n_w: Tensor, u: Tensor) -> Tensor:
    """Residual resampling (Liu & Chen 1998): ⌊N·W⌋ copies, then R remainders drawn i.i.d. ∝ N·W − ⌊N·W⌋.

    ``u`` ``[B, N]`` uniforms; the first R of row b drive its R multinomial draws (R varies by row).
    """
    n = n_w.shape[-1]
    floor = n_w.floor()
    frac = n_w - floor
    remaining = n - floor.sum(-1, keepdim=True)
    cdf = frac.cumsum(-1)
    cdf = (cdf / cdf[:, -1:].clamp_min(1e-300)).contiguous()
    draws = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=n - 1)
    used = torch.arange(n, device=n_w.device) < remaining.round()
    extra = torch.zeros_like(floor).scatter_add_(-1, draws, used.to(floor.dtype))
    return (floor + extra).long()


def resample(log_w: Tensor, method: str = "systematic", generator=None) -> Tensor:
    """Ancestor indices ``[B, N]`` drawn from the normalised weights of each row of ``log_w`` ``[B, N]``.

    Schemes (Douc & Cappé 2005; Gerber et al. 2019), all unbiased, E[offspring_j] = N·W_j:
    ``multinomial`` (i.i.d.), ``stratified`` (one uniform per stratum), ``systematic`` (one uniform
    per row), ``residual`` (⌊N·W⌋ copies, then R = N − Σ⌊N·W⌋ i.i.d. draws with probabilities
    ∝ N·W − ⌊N·W⌋) and ``ssp``; systematic and ssp keep offspring within ⌊N·W⌋..⌈N·W⌉ (stratified
    within one of them, residual within ⌊N·W⌋..⌊N·W⌋ + R). Runs on ``log_w``'s device; ``generator``
    is one ``torch.Generator`` or one per row.
    """
    if method not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}; got {method!r}")
    if log_w.ndim != 2:
        raise ValueError(f"log_w must be [B, N], got shape {tuple(log_w.shape)}")
    log_w = log_w.to(torch.float64)
    if torch.isnan(log_w).any() or (log_w == math.inf).any() or (log_w == -math.inf).all(-1).any():
        raise ValueError("log_w must have no NaN or +inf and at least one finite entry per row")
    batch, n = log_w.shape
    weights = normalize(log_w)[0].exp()
    if method == "systematic":
        cum = (n * weights).cumsum(-1)
        cum[:, -1] = n
        return _counts_to_index(_grid_counts(cum, uniforms(batch, 1, generator, log_w.device)))
    if method == "residual":
        return _counts_to_index(_residual_counts(n * weights, uniforms(batch, n, generator, log_w.device)))
    if method == "ssp":
        return _counts_to_index(_ssp_counts(n * weights, uniforms(batch, n - 1, generator, log_w.device)))
    u = uniforms(batch, n, generator, log_w.device)
    u = (torch.arange(n, device=log_w.device) + u) / n if method == "stratified" else u.sort(-1).values
    cdf = weights.cumsum(-1)
    cdf = (cdf / cdf[:, -1:]).contiguous()
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=n - 1)
