"""Tempered, twisted SMC for reward alignment: DAS and Feynman–Kac steering over the ancestral kernel.

Target p_tar(x₀) ∝ p_θ(x₀)·exp(r(x₀)/α) (Kim et al. 2025, DAS; Singhal et al. 2025, FK steering with
λ_FK = 1/α). Particles move by the ancestral kernel of ``sampling.sde_step`` (η = 1: DDPM), either
plain (``proposal="prior"``, gradient-free FK) or with the reward-gradient drift σ_up²·λ·∇r(x̂₀)/α
(``proposal="guided"``, DAS/TDS). Potentials are evaluated on r(D(x, σ_i)) with tempering λ_i; the
last step always weighs by the exact r(x₀)/α, so the target holds whatever the schedule. Log-weights
live in float64 per group ``[B, N]``, and every per-particle cache is re-indexed on resampling (the
DAS reference code forgets the twist, which biases it). ``docs/smc.md`` states the algorithm.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import trange

from ..cond import batched_call, broadcast_kwargs, slice_kwargs
from ..rewards import check_rewards
from ..sampling import sde_step
from ..utils import (CountingReward, append_dims, check_finite, check_generator, check_sigmas, check_state,
                     get_ancestral_step, nfe_summary)
from .resampling import RESAMPLING, ess, normalize, resample, uniforms

TEMPERING = ("exp", "linear", "none", "adaptive")
POTENTIALS = ("diff", "max", "sum")
SELECT = ("all", "resample", "draw", "argmax")
GRADS = ("full", "detached")
CESS_WARN = 0.05  # warn when an incremental weight's conditional ESS falls below this fraction of N


@dataclass
class SMCResult:
    """Particles, weights and traces of ``sample_smc``; ``S`` steps, ``B`` groups of ``N`` particles.

    ``x0`` and ``rewards`` are ``[B, N, ...]`` (``select="all"``, or ``"resample"``: N draws by weight
    in random slot order) or ``[B, ...]`` (``"draw"``: one particle drawn by weight, a draw from the
    weighted particles; ``"argmax"``: the highest-weight particle, a best-of-N by weight, not a draw).
    Traces are per step: ``ess`` after reweighting (before resampling), ``lambdas`` the tempering used by the potential,
    ``resampled`` and ``ancestors`` (identity where not resampled), the weighted ``reward_mean`` and
    ``reward_max`` of r(x̂₀) (NaN at steps without a potential), ``nonfinite`` the number of particles
    with zero weight (log-weight −inf, from a reward of −inf). ``nfe`` counts rows by kind (``denoiser``
    without graph, ``denoiser_grad`` with graph and one backward each, ``reward``, ``reward_grad``) and,
    by the NFE rule (``utils.nfe_summary``), ``forward`` (denoiser rows), ``backward`` (backward rows
    through the denoiser), ``total`` (forward equivalents), ``reward_calls`` and ``reward_rows`` (calls of
    the reward and of ``proposal_reward``, and the rows they scored, counted).
    ``min_cess`` ``[B]`` is the smallest conditional ESS N·(ΣW·w̃)²/ΣW·w̃² of any reweighting (W the
    weights before it, w̃ the incremental weight): below ``CESS_WARN``·N, Ẑ and the weighted estimates
    rest on a few particles and ``sample_smc`` warns.
    """
    x0: Tensor
    log_weights: Tensor
    log_Z: Tensor
    ess: Tensor
    lambdas: Tensor
    resampled: Tensor
    ancestors: Tensor
    reward_mean: Tensor
    reward_max: Tensor
    nonfinite: Tensor
    rewards: Tensor
    nfe: dict = field(default_factory=dict)
    select: str = "all"
    min_cess: Tensor | None = None

    @property
    def unique_ancestors(self) -> Tensor:
        """``[B]``: how many initial particles still have descendants at the end (lineage collapse)."""
        lineage = torch.arange(self.ancestors.shape[-1], device=self.ancestors.device).expand_as(self.ancestors[0])
        for step in self.ancestors:
            lineage = lineage.gather(-1, step)
        return torch.tensor([row.unique().numel() for row in lineage])


# --- tempering ---------------------------------------------------------------------------------

def tempering_schedule(kind: str, steps: int, *, reach: float = 0.87, gamma: float | None = None,
                       start: int = 0) -> Tensor:
    """λ_0 … λ_S (``steps + 1`` float64 values in [0, 1], monotone, λ_S = 1) for the twist at step i.

    Args:
        kind: ``"exp"`` (DAS: λ_i = (1+γ)^(i−start) − 1), ``"linear"`` or ``"none"`` (λ ≡ 1, FK).
        reach: fraction of the steps at which λ first reaches 1 (at step ⌈reach·S⌉), whatever S;
            DAS's γ = 0.008 at 100 steps is reach ≈ 0.87.
        gamma: DAS's γ for ``"exp"``; overrides ``reach`` (then the step where λ = 1 depends on S).
        start: steps before this have λ = 0 (DAS's ``tempering_start``·S).
    """
    if kind not in ("exp", "linear", "none"):
        raise ValueError(f"tempering kind must be 'exp', 'linear' or 'none'; got {kind!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0 < reach <= 1:
        raise ValueError(f"reach must be in (0, 1], got {reach}")
    if not 0 <= start < steps:
        raise ValueError(f"start must be in [0, steps), got {start}")
    i = torch.arange(steps + 1, dtype=torch.float64) - start
    if kind == "none":
        return torch.ones(steps + 1, dtype=torch.float64)
    if gamma is not None:
        if kind != "exp" or not gamma > 0:
            raise ValueError(f"gamma must be > 0 and only applies to kind='exp', got {gamma} with {kind!r}")
        lam = (1 + gamma) ** i - 1
    else:
        n_reach = max(math.ceil(reach * steps - 1e-9), start + 1)
        lam = 2 ** (i / (n_reach - start)) - 1 if kind == "exp" else i / (n_reach - start)
        lam[n_reach:] = 1
    lam = lam.clamp(0, 1)
    lam[-1] = 1
    return lam


def adaptive_lambda(log_w: Tensor, base: Tensor, delta: Tensor, target: float = 0.9, lo=0.0, hi=1.0,
                    iters: int = 30) -> Tensor:
    """Largest λ ∈ [lo, hi] per row whose conditional ESS ≥ ``target``·N, by bisection (Zhou et al. 2016).

    The incremental log-weight is ``base + λ·delta``; CESS = N·(Σ W w)² / Σ W w² with W the current
    normalised weights. Returns ``lo`` where even it misses the target, ``hi`` where it is met there.
    """
    n = log_w.shape[-1]
    log_w = normalize(log_w.to(torch.float64))[0]
    base, delta = base.to(torch.float64), delta.to(torch.float64)
    lo = torch.as_tensor(lo, dtype=torch.float64, device=log_w.device).expand(log_w.shape[0]).clone()
    hi = torch.as_tensor(hi, dtype=torch.float64, device=log_w.device).expand(log_w.shape[0]).clone()

    def cess(lam):
        inc = base + torch.where(lam[:, None] == 0, 0.0, lam[:, None] * delta)
        inc = torch.where(torch.isneginf(log_w), 0.0, inc)
        return (2 * (log_w + inc).logsumexp(-1) - (log_w + 2 * inc).logsumexp(-1)).exp() * n

    ok_hi = cess(hi) >= target * n
    low, high = lo.clone(), hi.clone()
    for _ in range(iters):
        mid = (low + high) / 2
        ok = cess(mid) >= target * n
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    return torch.where(ok_hi, hi, low)


# --- one step's network work -------------------------------------------------------------------

def reindex(state: dict, ancestors: Tensor) -> dict:
    """Re-index every per-particle cache ``[B, N, ...]`` by the ancestors ``[B, N]`` (x, D, r, ∇r, potentials)."""
    rows = torch.arange(ancestors.shape[0], device=ancestors.device)[:, None]
    return {k: v[rows, ancestors] if isinstance(v, Tensor) else v for k, v in state.items()}


def _check_reward(values, rows: int, step: int, name: str = "reward", terms: str = "") -> Tensor:
    """Float64 ``[rows]`` rewards by ``rewards.check_rewards`` (−inf allowed: zero target density)."""
    where = f"{terms or f'{rows} particles'} at step {step}"
    return check_rewards(values, rows, name, terms=where)


def _rows_terms(i: int, rows: int, total: int, n: int) -> str:
    """Rows ``i .. i+rows`` of B images x N particles, in the user's terms."""
    whole = f"{total // n} images x {n} particles"
    return whole if rows == total else f"rows {i}-{i + rows - 1} of {whole}"


def _grad_rows(model, x, sigma, kwargs, reward_fn, grad, sigma_data, max_batch, nfe, step, n=1):
    """D(x, σ) with ∇_x r(D) per row, in chunks of ``max_batch``: full Jacobian or scalar k(σ)·∇_D r."""
    chunk = x.shape[0] if max_batch is None else max_batch
    kwargs = broadcast_kwargs(kwargs, x.shape[0]) if chunk < x.shape[0] else kwargs
    denoised, rewards, grads = [], [], []
    for i in range(0, x.shape[0], chunk):
        sl = slice(i, i + chunk)
        with torch.enable_grad():
            if grad == "full":
                x_c = x[sl].detach().requires_grad_(True)
                d_c = model(x_c, sigma[sl], **slice_kwargs(kwargs, sl))
                leaf = x_c
            else:
                with torch.no_grad():
                    d_c = model(x[sl], sigma[sl], **slice_kwargs(kwargs, sl))
                d_c = leaf = d_c.detach().requires_grad_(True)
            r_c = reward_fn(d_c)
            _check_reward(r_c, d_c.shape[0], step, "the guiding reward", _rows_terms(i, d_c.shape[0], x.shape[0], n))
            if not r_c.requires_grad:
                raise TypeError("proposal='guided' needs a differentiable reward (or proposal_reward); "
                                "use proposal='prior' for gradient-free rewards")
            (g_c,) = torch.autograd.grad(r_c.sum(), leaf)
        if grad == "detached":
            k = sigma_data**2 / (sigma_data**2 + sigma[sl] ** 2)
            g_c = g_c * append_dims(k, g_c.ndim)
        denoised.append(d_c.detach())
        rewards.append(r_c.detach())
        grads.append(g_c.detach())
        nfe["calls"] += 1
    rows = x.shape[0]
    nfe["denoiser_grad" if grad == "full" else "denoiser"] += rows
    nfe["reward_grad"] += rows
    return torch.cat(denoised), torch.cat(rewards), torch.cat(grads)


def _evaluate(model, x, sigma, kwargs, guide, grad, sigma_data, max_batch, nfe, step):
    """D(x, σ) for all B·N particles ``[B, N, ...]`` in one call; also r(D) and ∇_x r(D) when ``guide`` is given."""
    groups, n = x.shape[:2]
    flat = x.reshape(groups * n, *x.shape[2:])
    if guide is None:
        nfe["calls"] += -(-groups * n // (max_batch or groups * n))
        nfe["denoiser"] += groups * n
        return batched_call(model, flat, sigma, kwargs, max_batch).view_as(x), None, None
    denoised, r, g = _grad_rows(model, flat, sigma, kwargs, guide, grad, sigma_data, max_batch, nfe, step, n)
    return denoised.view_as(x), _check_reward(r, groups * n, step, terms=_rows_terms(0, groups * n, groups * n, n)) \
        .view(groups, n), g.view_as(x)


def _reward_rows(reward, denoised, max_batch, nfe, step) -> Tensor:
    """r(x̂₀) ``[B, N]`` for particles ``[B, N, ...]``, in chunks of ``max_batch`` rows, checked."""
    flat = denoised.flatten(0, 1)
    chunk = flat.shape[0] if max_batch is None else max_batch
    with torch.no_grad():
        values = [_check_reward(reward(flat[i:i + chunk]), flat[i:i + chunk].shape[0], step,
                                terms=_rows_terms(i, flat[i:i + chunk].shape[0], flat.shape[0], denoised.shape[1]))
                  for i in range(0, flat.shape[0], chunk)]
    nfe["reward"] += flat.shape[0]
    return torch.cat(values).view(denoised.shape[:2])


def _resample_groups(log_w: Tensor, todo: Tensor, method: str, generator) -> Tensor:
    """Ancestors ``[B, N]``: resampled for the groups in ``todo``, identity for the others."""
    ancestors = torch.arange(log_w.shape[1], device=log_w.device).repeat(log_w.shape[0], 1)
    rows = torch.nonzero(todo).flatten()
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = [generator[b] for b in rows.tolist()]
    ancestors[rows] = resample(log_w[rows], method, generator)
    return ancestors


def _noise(shape, groups: int, generator, device, dtype) -> Tensor:
    """Standard normal ``[B·N, ...]``: from one generator, or group b's rows from ``generator[b]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    per_group = (shape[0] // groups,) + tuple(shape[1:])
    return torch.cat([torch.randn(per_group, generator=g, device=device, dtype=dtype) for g in generator])


def _potential(kind: str, t: Tensor, state: dict, last: bool, r_over_alpha: Tensor) -> Tensor:
    """Incremental log-potential; updates ``state["applied"]`` (log-potentials applied on the lineage).

    ``diff`` is the DAS twist / FK difference potential: t_i − t_prev. ``max`` and ``sum`` (FK) apply
    max(t_i, m) or t_i + s each time; the last step applies the terminal correction r(x₀)/α − applied,
    so every potential targets p_θ·exp(r/α).
    """
    applied = state["applied"]
    if last:
        inc = r_over_alpha - applied
    elif kind == "diff":
        inc = t - applied
    else:
        first = state["phi"] is None
        phi = t if first else (torch.maximum(t, state["phi"]) if kind == "max" else state["phi"] + t)
        state["phi"], inc = phi, phi
    state["applied"] = applied + inc if kind != "diff" or last else t
    return torch.where(torch.isneginf(applied) & torch.isneginf(r_over_alpha), -math.inf, inc)


def _potential_steps(steps: int, every: int, window) -> Tensor:
    """Boolean ``[S]``: steps where potentials are evaluated and resampling considered (the last always)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"resample_every must be a positive int, got {every!r}")
    start, end = (0, steps - 1) if window is None else window
    if not (0 <= start <= end < steps):
        raise ValueError(f"resample_window must be (start, end) step indices with 0 <= start <= end < {steps}, "
                         f"got {window!r}")
    mask = torch.zeros(steps, dtype=torch.bool)
    mask[start:end + 1:every] = True
    mask[-1] = True
    return mask


# --- the sampler -------------------------------------------------------------------------------

def _check_args(model, x, sigmas, reward, num_particles, alpha, tempering, proposal, grad, potential, eta,
                ess_threshold, resampling, select, generator):
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser D(x, sigma, **extra_args), got {type(model).__name__}")
    if not callable(reward):
        raise TypeError(f"reward must be a callable x0[B, ...] -> Tensor[B], got {type(reward).__name__}")
    check_finite(x, "x")
    check_sigmas(sigmas, decreasing=True)
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    if x.ndim < 3 or x.shape[1] != num_particles:
        raise ValueError(f"x must be [B, N={num_particles}, *shape] (B groups of N particles), got {tuple(x.shape)}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    for name, value, allowed in (("proposal", proposal, ("guided", "prior")), ("grad", grad, GRADS),
                                 ("potential", potential, POTENTIALS), ("resampling", resampling, RESAMPLING),
                                 ("select", select, SELECT)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if not isinstance(tempering, Tensor) and tempering not in TEMPERING:
        raise ValueError(f"tempering must be one of {', '.join(TEMPERING)} or a tensor of S+1 values; got {tempering!r}")
    if tempering == "adaptive" and potential != "diff":
        raise ValueError("tempering='adaptive' needs potential='diff' (its increment is linear in λ)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta == 0:
        warnings.warn("eta=0 makes the kernel deterministic: resampled copies stay identical and the guided "
                      "drift has no effect; use eta > 0")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in [0, 1] (1 resamples at every potential step), got {ess_threshold}")
    if isinstance(generator, (list, tuple)) and len(generator) != x.shape[0]:
        raise ValueError(f"generator must be a torch.Generator or a list of one per group ({x.shape[0]}), "
                         f"got a list of {len(generator)}")
    check_generator(generator, x.shape[0])


def tempering_lambdas(tempering, steps: int, reach=0.87, gamma=None, device="cpu") -> Tensor | None:
    """λ for the potential of each step ``[S]`` (λ_S = 1 on the last step, where x₀ = D), None if adaptive."""
    if isinstance(tempering, Tensor):
        lam = tempering.to(device=device, dtype=torch.float64).flatten()
        if lam.shape[0] != steps + 1 or not ((lam >= 0) & (lam <= 1)).all():
            raise ValueError(f"a tempering tensor must hold S+1={steps + 1} values in [0, 1], got {tempering}")
    elif tempering == "adaptive":
        return None
    else:
        lam = tempering_schedule(tempering, steps, reach=reach, gamma=gamma).to(device)
    lam = lam[:steps].clone()
    lam[-1] = 1.0  # x₀ = D(x, σ_{S−1}): the last potential is the exact terminal r(x₀)/α
    return lam


def _expand_args(extra_args: dict | None, groups: int, n: int) -> dict:
    """Repeat group-level conditioning tensors (batch B) to the B·N particle rows; batch 1 and B·N pass."""
    def expand(v):
        if isinstance(v, dict):
            return {k: expand(w) for k, w in v.items()}
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == groups and groups * n != groups:
            return v.repeat_interleave(n, 0)
        return v
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    return {k: expand(v) for k, v in (extra_args or {}).items()}


@torch.no_grad()
def sample_smc(model, x: Tensor, sigmas: Tensor, reward: Callable[[Tensor], Tensor], *, num_particles: int,
               alpha: float = 1.0, tempering: str | Tensor = "exp", reach: float = 0.87, gamma: float | None = None,
               adaptive_target: float = 0.9, proposal: str = "guided", proposal_reward: Callable | None = None,
               grad: str = "full", sigma_data: float = 1.0, potential: str = "diff", eta: float = 1.0,
               ess_threshold: float = 0.5, resampling: str = "systematic", resample_every: int = 1,
               resample_window: tuple[int, int] | None = None, max_batch: int | None = None, select: str = "all",
               extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SMCResult:
    """Sample p_θ(x₀)·exp(r(x₀)/α) with tempered SMC: DAS (guided) or FK steering (prior proposal).

    Args:
        x: ``[B, N, *shape]`` noise at ``sigmas[0]``: B independent groups (prompts) of N particles,
            all evaluated in one network call per step (split by ``max_batch`` rows).
        reward: ``r(x0[B·N, ...]) -> [B·N]``; differentiable for ``proposal="guided"`` unless
            ``proposal_reward`` (a differentiable surrogate that only drives the drift) is given.
            NaN or +inf raise; −inf marks zero target density and is counted in ``nonfinite``.
        tempering: ``"exp"`` (DAS), ``"linear"``, ``"none"`` (λ ≡ 1, FK), ``"adaptive"`` (bisection on
            the conditional ESS to ``adaptive_target``) or a tensor λ_0…λ_S; λ reaches 1 at step
            ⌈reach·S⌉ (or DAS's ``gamma``), and the last step always weighs by r(x₀)/α.
        proposal: ``"guided"`` adds σ_up²·λ_{i+1}·∇_x r(D(x, σ_i))/α to the ancestral mean and corrects
            with the closed-form log-ratio; ``"prior"`` is the plain kernel (no gradients).
        grad: ``"full"`` differentiates through the denoiser; ``"detached"`` replaces ∂D/∂x by
            σ_data²/(σ_data² + σ²) (no network backward; weights stay exact, only the ESS changes).
        potential: ``"diff"`` (the DAS twist λ_i·r/α, FK's difference potential), ``"max"`` or ``"sum"``
            (FK), each with the terminal correction.
        ess_threshold: resample a group when ESS < ``ess_threshold``·N; 1 resamples at every
            potential step, 0 never.
        resample_every: evaluate potentials (rewards) and consider resampling only every this many
            steps inside ``resample_window`` (FK's sparse intervals), and at the last step.
        resample_window: ``(start, end)`` step indices of those sparse steps.
        select: ``"all"`` (weighted particles), ``"resample"`` (N equally weighted draws per group, in
            random slot order, so any one slot is a draw by weight), ``"draw"`` (one particle per
            group drawn with probability W_j from ``generator``: the unbiased single image) or
            ``"argmax"`` (the highest-weight particle of each group: best-of-N by weight, biased).
            ``log_Z`` and the weighted estimates are unreliable when an incremental weight's
            conditional ESS falls below ``CESS_WARN``·N (``min_cess``); the sampler then warns.
        generator: one ``torch.Generator``, or one per group so a group's run does not depend on others.
        sigma_data: also the data's RMS scale for ``utils.check_state``: the particles after every step
            must keep their RMS within ``DIVERGENCE_C``·√(σ² + σ_data²) (and x̂₀ within
            ``DIVERGENCE_C``·σ_data), or the run stops with a ``DivergedError`` naming the step and σ.
    """
    _check_args(model, x, sigmas, reward, num_particles, alpha, tempering, proposal, grad, potential, eta,
                ess_threshold, resampling, select, generator)
    groups, n = x.shape[0], x.shape[1]
    steps = len(sigmas) - 1
    lam_sched = tempering_lambdas(tempering, steps, reach, gamma, x.device)
    at_potential = _potential_steps(steps, resample_every, resample_window)
    kwargs = _expand_args(extra_args, groups, n)
    reward = CountingReward(reward)
    guide = CountingReward(proposal_reward) if proposal_reward is not None else reward
    setting = ("the guided drift is too strong: use a larger alpha, proposal='prior' or more steps"
               if proposal == "guided" else "use more steps")
    f64 = dict(dtype=torch.float64, device=x.device)
    nfe = dict(calls=0, denoiser=0, denoiser_grad=0, reward=0, reward_grad=0)
    trace = {k: torch.full((steps, groups), math.nan, **f64) for k in ("ess", "lambdas", "reward_mean", "reward_max")}
    resampled = torch.zeros(steps, groups, dtype=torch.bool, device=x.device)
    ancestors = torch.arange(n, device=x.device).repeat(steps, groups, 1)
    nonfinite = torch.zeros(steps, groups, dtype=torch.long, device=x.device)
    log_w = torch.full((groups, n), -math.log(n), **f64)
    log_z = torch.zeros(groups, **f64)
    lam = torch.zeros(groups, **f64)
    min_cess = torch.full((groups,), float(n), **f64)
    state = {"x": x, "applied": torch.zeros(groups, n, **f64), "phi": None}

    def reweight(inc):
        nonlocal log_w, log_z, min_cess
        new = torch.where(torch.isneginf(log_w), -math.inf, log_w + inc)
        if torch.isnan(new).any():
            raise ValueError("NaN incremental log-weight (an infinite reward or drift); check the reward")
        if torch.isneginf(new).all(-1).any():
            dead = torch.nonzero(torch.isneginf(new).all(-1)).flatten().tolist()
            raise ValueError(f"every particle of groups {dead} has zero weight (reward −inf); no estimate")
        sq = torch.where(torch.isneginf(log_w), -math.inf, log_w + 2 * inc)
        cess = (2 * new.logsumexp(-1) - sq.logsumexp(-1)).exp() * n  # N(ΣW·w̃)²/ΣW·w̃², W normalised
        min_cess = torch.minimum(min_cess, cess)
        log_w, lse = normalize(new)
        log_z = log_z + lse

    for i in trange(steps, disable=disable):
        last = i == steps - 1
        sigma = torch.full((groups * n,), float(sigmas[i]), dtype=x.dtype, device=x.device)
        need_grad = proposal == "guided" and not last and eta > 0 and (lam_sched is None or lam_sched[i + 1] > 0)
        denoised, r, g = _evaluate(model, state["x"], sigma, kwargs, guide if need_grad else None, grad, sigma_data,
                                   max_batch, nfe, i)
        state["denoised"], state["grad"] = denoised, g
        if at_potential[i]:
            r = _reward_rows(reward, denoised, max_batch, nfe, i) if r is None or proposal_reward is not None else r
            if last:
                lam = torch.ones(groups, **f64)
            elif lam_sched is None:  # CESS of the extra tilt exp((λ − λ_prev)·r/α) given the weights so far
                t_prev = torch.where(lam[:, None] == 0, 0.0, lam[:, None] * r / alpha)
                lam = adaptive_lambda(log_w + t_prev - state["applied"], -t_prev, r / alpha, adaptive_target, lo=lam)
            else:
                lam = lam_sched[i].expand(groups)
            t = torch.where(lam[:, None] == 0, 0.0, lam[:, None] * r / alpha)  # λ = 0 ignores even r = −inf
            inc = _potential(potential, t, state, last, r / alpha)
            reweight(inc)
            state["reward"] = r
            w = log_w.exp()
            finite_r = torch.where(torch.isneginf(r), 0.0, r)
            trace["reward_mean"][i] = (w * finite_r).sum(-1)
            trace["reward_max"][i] = r.max(-1).values
        trace["ess"][i], trace["lambdas"][i] = ess(log_w), lam
        nonfinite[i] = torch.isneginf(log_w).sum(-1)
        if callback is not None:
            callback({"x": state["x"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": state["denoised"], "log_w": log_w, "ess": trace["ess"][i], "lambda": lam,
                      "reward": state.get("reward") if at_potential[i] else None})
        if last:
            break
        if at_potential[i]:
            resampled[i] = (trace["ess"][i] < ess_threshold * n) | (ess_threshold >= 1)
            if resampled[i].any():
                ancestors[i] = _resample_groups(log_w, resampled[i], resampling, generator)
                state = reindex(state, ancestors[i])
                log_w[resampled[i]] = -math.log(n)
        state["x"], log_ratio = _propose(model, state, sigmas[i], sigmas[i + 1], eta, groups, n, generator,
                                         lam if lam_sched is None else lam_sched[i + 1].expand(groups), alpha)
        check_state(state["x"].flatten(0, 1), sigmas[i + 1], step=i, setting=setting, sigma_data=sigma_data)
        if log_ratio is not None:
            reweight(log_ratio)

    _warn_heavy_tails(min_cess, n, potential)
    check_state(state["denoised"].flatten(0, 1), 0.0, step=steps - 1, setting=setting, sigma_data=sigma_data)
    calls = reward.calls + (guide.calls if guide is not reward else 0)
    rows = reward.rows + (guide.rows if guide is not reward else 0)
    nfe.update(nfe_summary(nfe["denoiser"] + nfe["denoiser_grad"], nfe["denoiser_grad"], reward_calls=calls,
                           reward_rows=rows))
    x0, rewards, log_w = _select(select, state["denoised"], state["reward"], log_w, resampling, generator)
    return SMCResult(x0=x0, log_weights=log_w, log_Z=log_z, ess=trace["ess"], lambdas=trace["lambdas"],
                     resampled=resampled, ancestors=ancestors, reward_mean=trace["reward_mean"],
                     reward_max=trace["reward_max"], nonfinite=nonfinite, rewards=rewards, nfe=nfe, select=select,
                     min_cess=min_cess)


def _select(select: str, x0: Tensor, rewards: Tensor, log_w: Tensor, resampling: str, generator):
    """The returned particles: all (weighted), N resampled in random slot order, one drawn by weight, or argmax.

    ``resample`` shuffles the (sorted) ancestors with ``generator``, so every slot, slot 0 included, is
    marginally a draw from the weighted particles; ``draw`` is one index per group with P(j) = W_j.
    """
    groups, n = log_w.shape
    rows = torch.arange(groups, device=log_w.device)
    if select == "resample":
        idx = resample(log_w, resampling, generator)
        idx = idx.gather(-1, uniforms(groups, n, generator, log_w.device).argsort(-1))
        x0, rewards = reindex({"x0": x0, "r": rewards}, idx).values()
        return x0, rewards, torch.full_like(log_w, -math.log(n))
    if select == "draw":
        cdf = normalize(log_w)[0].exp().cumsum(-1)
        cdf = (cdf / cdf[:, -1:]).contiguous()
        j = torch.searchsorted(cdf, uniforms(groups, 1, generator, log_w.device), right=True).clamp(max=n - 1)[:, 0]
        return x0[rows, j], rewards[rows, j], log_w
    if select == "argmax":
        j = log_w.argmax(-1)
        return x0[rows, j], rewards[rows, j], log_w
    return x0, rewards, log_w


def _warn_heavy_tails(min_cess: Tensor, n: int, potential: str) -> None:
    """Warn when some reweighting left a conditional ESS below ``CESS_WARN``·N (see ``sample_smc``)."""
    worst = float(min_cess.min()) / n
    hint = "" if potential == "diff" else ", potential='diff'"
    if worst < CESS_WARN:
        warnings.warn(f"heavy-tailed SMC weights (potential={potential!r}): the conditional ESS of an "
                      f"incremental weight fell to {worst:.3f}·N < {CESS_WARN}·N in some group, so log_Z and "
                      "the weighted estimates are unreliable (few particles carry the mass); use more "
                      f"particles, a larger alpha{hint} or a gentler tempering", stacklevel=3)


def _propose(model, state, sigma, sigma_next, eta, groups, n, generator, lam_next, alpha):
    """Ancestral step from the (re-indexed) particles, plus the guided drift σ_up²·h and its log p/q.

    With h = λ_{i+1}·∇r/α and x' = μ + σ_up²h + σ_up z: log p(x'|x) − log q(x'|x) = −σ_up h·z − ½σ_up²‖h‖².
    """
    x, denoised = state["x"], state["denoised"]
    flat = x.reshape(groups * n, *x.shape[2:])
    _, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
    z = _noise(flat.shape, groups, generator, flat.device, flat.dtype) if eta > 0 else None
    x_next, _ = sde_step(model, flat, sigma, sigma_next, eta=eta, noise=z,
                         denoised=denoised.reshape(flat.shape))
    g = state["grad"]
    if g is None or z is None:
        return x_next.view_as(x), None
    h = append_dims(lam_next.to(flat.dtype).repeat_interleave(n), flat.ndim) * g.reshape(flat.shape) / alpha
    bad = ~torch.isfinite(h.flatten(1)).all(1)
    if bad.any():
        dead = torch.isneginf(state["reward"]).flatten() if state.get("reward") is not None else torch.zeros_like(bad)
        if (bad & ~dead).any():
            raise ValueError("the reward gradient is not finite for particles with finite reward "
                             f"{torch.nonzero(bad & ~dead).flatten().tolist()[:10]}")
        h = torch.where(append_dims(bad, h.ndim), 0.0, h)
    s_up = float(sigma_up)
    x_next = x_next + s_up**2 * h
    h64, z64 = h.flatten(1).double(), z.flatten(1).double()
    log_ratio = -s_up * (h64 * z64).sum(1) - 0.5 * s_up**2 * (h64**2).sum(1)
    return x_next.view_as(x), log_ratio.view(groups, n)
