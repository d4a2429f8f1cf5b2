"""Sampling Demon (Yeh, Lee & Chen, ICLR 2025): reward alignment by choosing among candidate noises.

At each step σ → σ' of the Karras β-SDE (``sampling.sde_step(beta=...)``) Demon draws K noises z_k,
takes the Heun step with each, looks every candidate ahead to x̂₀ (the denoiser's own Tweedie
estimate, a supplied consistency model, or a PF-ODE rollout), scores the look-aheads with the reward
and takes the real step with z* = √N·Σ b_k z_k / ‖Σ b_k z_k‖, b_k the reward weights. Unlike the
authors' code: the adaptive τ is recomputed at every step (theirs freezes after the first), with a floor
and uniform weights when the rewards have no spread (theirs divides by a zero or NaN τ); ``optimal``
weights are centred rewards (theirs uses raw ones); the sampler ends at σ = 0 instead of decoding the
σ_min latent; B items × K candidates go through one network call (theirs runs batch 1); all noise comes
from ``generator=`` (no global RNG); K = 1 works and a run folder is never reused; and D(x, σ) of the
chosen step is reused instead of recomputed (one network evaluation saved per step).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from ... import sampling, schedules
from ...cond import batched_call
from ...rewards import check_rewards
from ...utils import (CountingReward, as_sigma, check_finite, check_generator, check_sigmas, check_state, nfe_summary,
                      randn_like)

DEMON_TYPES = ("tanh", "boltzmann", "optimal")
R_OF_C = ("consistency", "baseline")
SPREAD_MIN = 1e-8  # rewards whose std is below this have no spread: uniform weights, and the floor of τ


def finite_mean_std(r: Tensor) -> tuple[Tensor, Tensor]:
    """Per-item mean and (unbiased) std of the finite rewards of ``r`` ``[B, K]``; std 0 below two of them."""
    if torch.isfinite(r).all():
        return r.mean(1), (r.std(1) if r.shape[1] > 1 else r.new_zeros(r.shape[0]))
    ok = torch.isfinite(r)
    n = ok.sum(1)
    mean = torch.where(ok, r, 0.0).sum(1) / n.clamp_min(1)
    var = torch.where(ok, r - mean[:, None], 0.0).square().sum(1) / (n - 1).clamp_min(1)
    return mean, torch.where(n > 1, var.sqrt(), 0.0)


def demon_weights(rewards: Tensor, demon_type: str = "tanh", tau="adaptive") -> tuple[Tensor, Tensor]:
    """Demon's noise weights b ``[B, K]`` from rewards ``[B, K]``, and the τ ``[B]`` used (float64).

    tanh: b = tanh((r − r̄)/τ); boltzmann: b = softmax(r/τ); optimal: b = r − r̄ (centred, unlike the
    reference). ``tau="adaptive"`` is the per-item std of the K rewards, recomputed at every call and
    floored at ``SPREAD_MIN``; items whose rewards have no spread (std < ``SPREAD_MIN``, or K = 1) and no
    rejected candidate get uniform weights, so z* is the normalised mean noise and nothing is ever NaN.
    A reward of −inf rejects its candidate (``check_rewards``): r̄ and the std are taken over the others,
    and it gets the lowest weight the weighting gives (tanh −1, Boltzmann 0, optimal the lowest finite
    candidate's).
    """
    r = rewards.detach().double()
    ok = torch.isfinite(r)
    mean, spread = finite_mean_std(r)
    tau_b = spread.clamp_min(SPREAD_MIN) if tau == "adaptive" else r.new_full(r.shape[:1], float(tau))
    centred = torch.where(ok, r - mean[:, None], 0.0)
    if demon_type == "tanh":
        b = torch.where(ok, torch.tanh(centred / tau_b[:, None]), -1.0)
    elif demon_type == "boltzmann":
        b = torch.softmax(torch.where(ok, centred / tau_b[:, None], -math.inf), 1)
    elif demon_type == "optimal":
        lowest = torch.where(ok, centred, math.inf).min(1, keepdim=True).values
        b = torch.where(ok, centred, lowest)
    else:
        raise ValueError(f"demon_type must be one of {', '.join(DEMON_TYPES)}, got {demon_type!r}")
    flat = ((spread < SPREAD_MIN) & (ok.all(1) | ~ok.any(1)))[:, None]  # ties, or every candidate rejected
    return torch.where(flat, torch.ones_like(b), b), tau_b


def combine_noise(z: Tensor, b: Tensor) -> Tensor:
    """z* = √N·Σ_k b_k z_k / ‖Σ_k b_k z_k‖ per item: the weighted noise projected on the √N sphere.

    Args:
        z: candidate noises ``[B, K, ...]``; N is the number of elements of one item.
        b: weights ``[B, K]``. An item whose weighted sum vanishes falls back to the mean noise.

    Computed in z's dtype, at least float32 (float16/bfloat16 noises are combined in float32).
    """
    work = torch.promote_types(z.dtype, torch.float32)
    zw = z.to(work)
    s = torch.einsum("bk,bk...->b...", b.to(z.device, work), zw)
    norm = s.flatten(1).norm(dim=1)
    mean = zw.mean(1)
    degenerate = (norm == 0) | ~torch.isfinite(norm)
    s = torch.where(degenerate.view(-1, *[1] * (s.ndim - 1)), mean, s)
    norm = s.flatten(1).norm(dim=1)
    return (s * (math.sqrt(s[0].numel()) / norm).view(-1, *[1] * (s.ndim - 1))).to(z.dtype)


def rollout_steps(sigma: float, sigma_min: float, sigma_max: float, c_steps: int, rho: float = 7.0) -> int:
    """Steps of the look-ahead rollout from σ: the reference's ``best_stepnum`` + 1 (σ-proportional).

    n(σ) = max(⌈c·(σ^{1/ρ} − σ_min^{1/ρ}) / (σ_max^{1/ρ} − σ_min^{1/ρ})⌉, 0) + 1, i.e. n(σ) − 1 Heun steps
    on a Karras grid down to σ_min and the Euler step to 0: 2·n(σ) − 1 evaluations per candidate.
    """
    span = sigma_max ** (1 / rho) - sigma_min ** (1 / rho)
    frac = (sigma ** (1 / rho) - sigma_min ** (1 / rho)) / span if span > 0 else 0.0
    return max(math.ceil(c_steps * frac - 1e-9), 0) + 1


def _rollout_sigmas(sigma_next: float, sigma_min: float, n: int, device) -> Tensor:
    if n == 1 or sigma_next <= sigma_min:
        return torch.tensor([sigma_next, 0.0], device=device)
    return schedules.get_sigmas_karras(n, sigma_min, sigma_next, device=device)


def _repeat_rows(kwargs: dict, K: int, batch: int) -> dict:
    """Repeat every conditioning tensor of batch ``batch`` K times per item (row order b·K + k)."""
    return {k: v.repeat_interleave(K, 0) if isinstance(v, Tensor) and v.ndim and v.shape[0] == batch
            else _repeat_rows(v, K, batch) if isinstance(v, dict) else v for k, v in kwargs.items()}


def _counted(model, counts: dict, kind: str, max_batch: int | None) -> Callable:
    """``model`` chunked by ``max_batch`` rows, counting its calls and rows under ``kind``."""

    def call(x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        counts[f"{kind}_calls"] += 1 if max_batch is None else math.ceil(x.shape[0] / max_batch)
        counts[f"{kind}_rows"] += x.shape[0]
        return batched_call(model, x, sigma, kwargs, max_batch)

    return call


def demon_candidates(model, x: Tensor, sigma, sigma_next, denoised: Tensor, *, K: int, beta=0.1,
                     extra_args: dict | None = None, generator=None) -> tuple[Tensor, Tensor]:
    """K β-SDE Heun candidates per item, f1 = ``denoised`` shared, f2 in one call of B·K rows.

    Returns the noises ``[B, K, ...]`` (item b's K noises drawn from its own generator when
    ``generator`` is a list) and the candidates at σ' ``[B·K, ...]`` (row b·K + k).
    """
    batch = x.shape[0]
    z = randn_like(x.new_empty(batch, K, *x.shape[1:]), generator)
    x_next, _ = sampling.sde_step(model, x.repeat_interleave(K, 0), sigma, sigma_next, beta=beta,
                                  extra_args=_repeat_rows(extra_args or {}, K, batch), noise=z.flatten(0, 1),
                                  denoised=denoised.repeat_interleave(K, 0))
    return z, x_next


def lookahead(model, x: Tensor, sigma: float, r_of_c: str = "consistency", *, extra_args: dict | None = None,
              consistency_model=None, sampler=None, c_steps: int = 20, sigma_min: float = 2e-3,
              sigma_max: float = 14.6488, method: str = "heun") -> Tensor:
    """r∘c's c: x̂₀ of states at σ by one step (``consistency``) or by a PF-ODE rollout (``baseline``).

    Args:
        consistency_model: a one-step map ``c(x, sigma, **extra_args) -> x̂₀`` (e.g. an LCM wrapped as a
            denoiser); ``None`` uses the denoiser's own Tweedie estimate x̂₀ = D(x, σ).
        sampler: the rollout sampler (any ``sampler(model, x, sigmas, extra_args=, disable=)``, e.g. a
            k-diffusion ``sample_*``); ``None`` is ``odeint`` with ``method`` (default Heun) over
            ``rollout_steps`` Karras steps.
        method: the ``odeint`` method of the default rollout (e.g. ``"dpmpp_2m"``: one evaluation per step).
    """
    extra_args = extra_args or {}
    if r_of_c == "consistency":
        return (consistency_model or model)(x, as_sigma(sigma, x), **extra_args)
    n = rollout_steps(float(sigma), sigma_min, sigma_max, c_steps)
    sigmas = _rollout_sigmas(float(sigma), sigma_min, n, x.device)
    if sampler is not None:
        return sampler(model, x, sigmas, extra_args=extra_args, disable=True)
    return sampling.odeint(model, x, sigmas, extra_args=extra_args, disable=True, method=method)


def _score(reward, x0: Tensor, batch: int, step: int, sigma: float) -> Tensor:
    """Rewards of the B·K look-aheads, checked by ``check_rewards`` in the user's terms; failures name the step."""
    K = x0.shape[0] // batch
    try:
        return check_rewards(reward(x0), batch, "reward", per_item=K, terms=f"{batch} images x {K} candidates")
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"while scoring the Demon candidates at step {step} (sigma={sigma:.4g})")
        raise


def demon_steps(sigmas: Tensor, ode_after: float | None) -> int:
    """Number of Demon steps: those from σ ≥ ``ode_after`` that do not land on σ = 0."""
    start, nxt = sigmas[:-1], sigmas[1:]
    steer = (start >= (ode_after or 0.0)) & (nxt > 0)
    return int(steer.cumprod(0).sum())


AUTO_BETA_VARIANCE = 1.5  # beta="auto": the Heun β-SDE steps together may leave at most this multiple of the variance


def heun_variance_ratio(beta: float, sigma: float, sigma_next: float) -> float:
    """Var(x') / σ'² after one Heun β-SDE step σ → σ' (``sampling.sde_step(beta=)``) on point-mass data.

    With D ≡ x₀ and y = x − x₀ ~ N(0, σ²), the step is y' = A·y + a·z with k = (1 + βσ)/σ,
    k' = (1 + βσ')/σ', Δ = σ − σ', A = 1 − Δ(k + k')/2 + Δ²kk'/2 and a = √(2βΔ)·((σ + σ')/2 − Δk'σ/2);
    the exact SDE leaves σ'² (A = σ'/σ at β = 0, ratio 1). On coarse steps (σ/σ' large) the corrector
    multiplies the predictor's noise by Δ/(2σ'), so the ratio grows fast with β.
    """
    delta = sigma - sigma_next
    k, k_next = (1 + beta * sigma) / sigma, (1 + beta * sigma_next) / sigma_next
    A = 1 - delta * (k + k_next) / 2 + delta**2 * k * k_next / 2
    a = math.sqrt(2 * beta * delta) * ((sigma + sigma_next) / 2 - delta * k_next * sigma / 2)
    return ((A * sigma) ** 2 + a**2) / sigma_next**2


def _stable_beta(sigma: float, sigma_next: float, cap: float, limit: float = AUTO_BETA_VARIANCE) -> float:
    """The largest β ≤ ``cap`` whose Heun step σ → σ' keeps ``heun_variance_ratio`` ≤ ``limit``."""
    if heun_variance_ratio(cap, sigma, sigma_next) <= limit:
        return cap
    lo, hi = 0.0, cap
    for _ in range(200):  # bisection down to float resolution (the ratio rises with β)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if heun_variance_ratio(mid, sigma, sigma_next) <= limit else (lo, mid)
    return lo


def auto_betas(sigmas: Tensor, ode_after: float | None = None, cap: float = 0.1) -> list[float]:
    """``beta="auto"``: for each Demon step σ → σ' of ``sigmas``, the largest β ≤ ``cap`` that keeps it stable.

    Two rules per step: β·|Δσ| ≤ 1, and the Heun β-SDE step on point-mass data leaves at most
    ``AUTO_BETA_VARIANCE``^(1/S)·σ'² of variance for S Demon steps (``heun_variance_ratio``), so the run's
    ratios multiply to at most ``AUTO_BETA_VARIANCE``. The first rule alone lets coarse grids blow up (on
    the shipped Fashion model, 3 or 5 Karras steps from σ = 80 gave pixel values of 300 to 4400). Fine
    steps keep β = min(cap, 1/|Δσ|); a coarse step (σ/σ' large) gets a small β, so Demon's candidates
    differ less there. ``sample_demon`` uses β_i on step i (a piecewise-constant β(σ)).
    """
    steps, betas = demon_steps(sigmas, ode_after), []
    limit = AUTO_BETA_VARIANCE ** (1 / max(steps, 1))  # the steps' ratios multiply: the run's within the budget
    for sigma, sigma_next in zip(sigmas[:steps].tolist(), sigmas[1:steps + 1].tolist()):
        beta = min(cap, math.nextafter(1 / (sigma - sigma_next), 0.0))  # rounded down: β·Δσ ≤ 1 to the ulp
        betas.append(_stable_beta(sigma, sigma_next, beta, limit))
    return betas


def auto_beta(sigmas: Tensor, ode_after: float | None = None, cap: float = 0.1) -> float:
    """The largest constant β ≤ ``cap`` stable on every Demon step: min of ``auto_betas`` (``cap`` without steps)."""
    return min(auto_betas(sigmas, ode_after, cap), default=cap)


def demon_cost(sigmas: Tensor, *, K: int = 16, batch: int = 1, r_of_c: str = "consistency", c_steps: int | None = None,
               ode_after: float | None = 0.11, consistency_model: bool = False) -> dict:
    """The network cost of ``sample_demon`` with the default samplers (the formula in its docstring), with the
    NFE rule's ``forward``/``backward``/``total`` and the reward's calls and rows (``utils.nfe_summary``)."""
    steps, m = demon_steps(sigmas, ode_after), len(sigmas) - 1 - demon_steps(sigmas, ode_after)
    cost = dict(network_rows=0, network_calls=0, consistency_rows=0, consistency_calls=0,
                reward_calls=steps, reward_rows=steps * batch * K)
    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    for i in range(steps):
        if r_of_c == "baseline":
            look = 2 * rollout_steps(float(sigmas[i + 1]), sigma_min, sigma_max,
                                         20 if c_steps is None else c_steps) - 1
        else:
            look = 0 if consistency_model else 1
        cost["network_rows"] += batch * (2 + K + K * look)
        cost["network_calls"] += 3 + look
        cost["consistency_rows"] += batch * K if consistency_model and r_of_c == "consistency" else 0
        cost["consistency_calls"] += 1 if consistency_model and r_of_c == "consistency" else 0
    cost["network_rows"] += batch * (2 * m - 1)
    cost["network_calls"] += 2 * m - 1
    return {**cost, **nfe_summary(cost["network_rows"] + cost["consistency_rows"], reward_calls=steps,
                                  reward_rows=steps * batch * K)}


def _check_args(model, x, sigmas, reward, K, beta, tau, demon_type, r_of_c, c_steps, ode_after, extra_args,
                max_batch) -> None:
    if not callable(model) or not callable(reward):
        raise TypeError("model and reward must be callables: D(x, sigma, **extra_args) and reward(x0) -> [B]")
    check_finite(x, "x")
    check_sigmas(sigmas, decreasing=True)
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int (candidates per step), got {K!r}")
    if isinstance(beta, str) and beta not in ("auto", "anderson"):
        raise ValueError(f"beta must be 'auto', 'anderson', a number > 0 or a callable of sigma, got {beta!r}")
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0 (Demon needs a stochastic step), got {beta}")
    if tau != "adaptive" and not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
        raise ValueError(f"tau must be 'adaptive' or a positive finite number, got {tau!r}")
    if demon_type not in DEMON_TYPES:
        raise ValueError(f"demon_type must be one of {', '.join(DEMON_TYPES)}, got {demon_type!r}")
    if r_of_c not in R_OF_C:
        raise ValueError(f"r_of_c must be one of {', '.join(R_OF_C)}, got {r_of_c!r}")
    if c_steps is not None and (not isinstance(c_steps, int) or c_steps < 0):
        raise ValueError(f"c_steps must be None or an int >= 0 (rollout steps near sigma_max), got {c_steps!r}")
    if ode_after is not None and not ode_after >= 0:
        raise ValueError(f"ode_after must be None or a sigma >= 0, got {ode_after!r}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be None or a positive int, got {max_batch!r}")


def _warn_coarse(sigmas: Tensor, ode_after: float | None, beta) -> None:
    """Warn when a numeric β exceeds ``auto_beta``: the Heun β-SDE step then over- or under-contracts (on the
    shipped Fashion-MNIST model at σ_max = 80, 8 steps, β = 0.1 sends pixels to ±2600)."""
    if isinstance(beta, (int, float)) and demon_steps(sigmas, ode_after) > 0:
        stable = auto_beta(sigmas, ode_after, cap=math.inf)
        if beta > stable:
            warnings.warn(f"beta={beta} is above {stable:.3g}, the largest beta that keeps every Demon step of this "
                          "grid stable (beta*|dsigma| <= 1 and a bounded Heun variance, auto_beta): the beta-SDE "
                          "step is inaccurate; use beta='auto', more steps or a smaller beta")


@torch.no_grad()
def sample_demon(model, x: Tensor, sigmas: Tensor, reward: Callable[[Tensor], Tensor], *, K: int = 16, beta="auto",
                 tau="adaptive", demon_type: str = "tanh", r_of_c: str = "consistency", c_steps: int | None = None,
                 ode_after: float | None = 0.11, extra_args: dict | None = None, callback: Callable | None = None,
                 disable: bool | None = None, generator=None, return_info: bool = False, consistency_model=None,
                 sampler: Callable | None = None, max_batch: int | None = None, method: str = "heun",
                 sigma_data: float = 1.0):
    """Sampling Demon (Yeh et al. 2025) on the Karras β-SDE: B independent runs of K candidates each.

    Demon steps are those from σ ≥ ``ode_after`` not landing on 0; the rest of ``sigmas`` is a plain
    Heun PF-ODE tail ending at σ = 0. One Demon step σ → σ' costs, in network rows (B items):
    B [D(x, σ), shared by the candidates and the final step] + B·K [Heun corrector of the candidates,
    one call] + B·K·L(σ') [look-ahead, one call per stage] + B [corrector of the step with z*], where
    L = 1 for ``consistency`` with the own denoiser (x̂₀ = D(x', σ')), 0 with ``consistency_model``
    (which costs B·K rows of that model instead), and 2·n(σ') − 1 for ``baseline`` with the default
    Heun rollout (n from ``rollout_steps``). Calls: 3 + L per step. The m-step tail costs 2m − 1 calls
    of B rows; the reward is called once per Demon step with B·K rows. ``demon_cost`` evaluates this.

    With a constant reward (or any reward without spread) z* = √N·z̄/‖z̄‖ is uniform on the √N sphere,
    independent across steps, with mean 0 and covariance I: Demon is then the base β-SDE with spherical
    instead of Gaussian noise, which has the same law in the small-step limit.

    Args:
        x: ``[B, ...]`` noise at ``sigmas[0]``. ``sigmas``: decreasing, ending in 0.
        reward: ``reward(x0 [B·K, ...]) -> Tensor[B·K]``, higher is better (``rewards.check_rewards``: −inf
            rejects a candidate; NaN, +inf, a list, a wrong shape or an exception stops the run with an
            error in terms of B images x K candidates, naming the step).
        beta: the β-SDE's β: ``"auto"`` (step i uses ``auto_betas(sigmas, ode_after)[i]``, the largest
            β ≤ 0.1 with β·|Δσ| ≤ 1 whose Heun step stays stable), a number > 0, ``"anderson"`` or a
            callable β(σ).
        tau: ``"adaptive"`` (std of each item's K rewards, recomputed every step) or a positive number.
        r_of_c: look-ahead, ``"consistency"`` (one step) or ``"baseline"`` (PF-ODE rollout); see ``lookahead``.
        c_steps: rollout steps near σ_max for ``baseline`` (default 20, the reference's).
        generator: a ``torch.Generator`` or one per item (then a batch equals separate runs).
        callback: called before each update with ``x, i, sigma, sigma_hat, denoised`` and, on Demon
            steps, ``reward`` ``[B, K]``, ``weights`` ``[B, K]``, ``tau`` ``[B]``, ``lookahead`` ``[B, K, ...]``.
        return_info: also return a dict of per-step ``sigma``, ``reward_mean``/``reward_std``/``tau``
            ``[S, B]``, ``seconds``, ``beta`` (the β of each Demon step, a list) and ``nfe``: counted
            network, consistency and reward calls and rows, and the NFE rule's ``forward`` (network +
            consistency rows), ``backward`` (0) and ``total`` (``utils.nfe_summary``), for the whole batch.
        max_batch: the most rows per network call (candidates are chunked, never looped one by one).
        method: the ``odeint`` method of the PF-ODE tail and of the default ``baseline`` rollout; the
            costs above are Heun's (a multistep method such as ``"dpmpp_2m"`` costs m calls for an
            m-step tail and n(σ') per rollout).
        sigma_data: the data's RMS scale for ``utils.check_state``: the candidates and the state after
            every step must keep their per-item RMS within ``DIVERGENCE_C``·√(σ² + σ_data²), and the
            result within ``DIVERGENCE_C``·σ_data, or the run stops with a ``DivergedError`` naming
            the step, σ and β.
    """
    sampling.check_method(method, tuned=True)
    _check_args(model, x, sigmas, reward, K, beta, tau, demon_type, r_of_c, c_steps, ode_after, extra_args, max_batch)
    check_generator(generator, x.shape[0])
    extra_args = extra_args or {}
    betas = auto_betas(sigmas, ode_after) if beta == "auto" else [beta] * demon_steps(sigmas, ode_after)
    reward = CountingReward(reward)
    counts = dict.fromkeys(("network_calls", "network_rows", "consistency_calls", "consistency_rows"), 0)
    net = _counted(model, counts, "network", max_batch)
    consistency = _counted(consistency_model, counts, "consistency", max_batch) if consistency_model else None
    batch, steps = x.shape[0], demon_steps(sigmas, ode_after)
    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    _warn_coarse(sigmas, ode_after, beta)
    setting = f"beta={beta!r} is unstable on this grid: use beta='auto', a smaller beta or more steps"
    log = {"sigma": [], "reward_mean": [], "reward_std": [], "tau": [], "seconds": []}
    for i in trange(steps, disable=disable):
        start = time.perf_counter()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = net(x, as_sigma(sigma, x), **extra_args)
        z, x_next = demon_candidates(net, x, sigma, sigma_next, denoised, K=K, beta=betas[i], extra_args=extra_args,
                                     generator=generator)
        check_state(x_next, sigma_next, step=i, setting=setting, sigma_data=sigma_data)
        x0 = lookahead(net, x_next, sigma_next, r_of_c, extra_args=_repeat_rows(extra_args, K, batch),
                       consistency_model=consistency, sampler=sampler, c_steps=20 if c_steps is None else c_steps,
                       sigma_min=sigma_min, sigma_max=sigma_max, method=method)
        r = _score(reward, x0, batch, i, float(sigma_next)).view(batch, K)
        b, tau_b = demon_weights(r, demon_type, tau)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, "reward": r,
                      "weights": b, "tau": tau_b, "lookahead": x0.view(batch, K, *x.shape[1:])})
        x, _ = sampling.sde_step(net, x, sigma, sigma_next, extra_args=extra_args, beta=betas[i],
                                 noise=combine_noise(z, b), denoised=denoised)
        check_state(x, sigma_next, step=i, setting=setting, sigma_data=sigma_data)
        mean, spread = finite_mean_std(r)  # over the candidates not rejected (reward −inf)
        for key, value in (("sigma", float(sigma_next)), ("reward_mean", mean), ("reward_std", spread),
                           ("tau", tau_b), ("seconds", time.perf_counter() - start)):
            log[key].append(value)
    tail = None if callback is None else (lambda info: callback({**info, "i": info["i"] + steps}))
    x = sampling.odeint(net, x, sigmas[steps:], extra_args=extra_args, callback=tail, disable=disable, method=method)
    check_state(x, sigmas[-1], step=len(sigmas) - 2, sigma_data=sigma_data,
                setting=f"the PF-ODE tail (method={method!r}) or {setting}")
    if not return_info:
        return x
    info = {key: torch.stack(v) if v and isinstance(v[0], Tensor) else torch.tensor(v, dtype=torch.float64)
            for key, v in log.items()}
    counts.update(nfe_summary(counts["network_rows"] + counts["consistency_rows"], reward_calls=reward.calls,
                              reward_rows=reward.rows))
    return x, {**info, "demon_steps": steps, "beta": betas, "nfe": counts}
