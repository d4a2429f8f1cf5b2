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

import abc
import json
import math
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from .. import sampling, schedules
from ..cond import batched_call
from ..rewards import check_rewards
from ..utils import as_sigma, check_finite, check_generator, check_sigmas, randn_like

DEMON_TYPES = ("tanh", "boltzmann", "optimal")
R_OF_C = ("consistency", "baseline")
SPREAD_MIN = 1e-8  # rewards whose std is below this have no spread: uniform weights, and the floor of τ
REFERENCE_GRID = (14.6488, 2e-3)  # (σ_max, σ_min) of the Demon reference's Karras grid for Stable Diffusion
MODEL_ENV = "KDIFF_ALIGN_MODEL"  # DemonGenerator's default model: a local diffusers folder or toy:NAME


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


def demon_cost(sigmas: Tensor, *, K: int = 16, batch: int = 1, r_of_c: str = "consistency", c_steps: int | None = None,
               ode_after: float | None = 0.11, consistency_model: bool = False) -> dict:
    """The network cost of ``sample_demon`` with the default samplers (the formula in its docstring)."""
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
    return cost


def _check_args(model, x, sigmas, reward, K, beta, tau, demon_type, r_of_c, c_steps, ode_after, extra_args,
                max_batch) -> None:
    if not callable(model) or not callable(reward):
        raise TypeError("model and reward must be callables: D(x, sigma, **extra_args) and reward(x0) -> [B]")
    check_finite(x, "x")
    check_sigmas(sigmas, decreasing=True)
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int (candidates per step), got {K!r}")
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


def _warn_coarse(sigmas: Tensor, beta) -> None:
    """Warn when β·|Δσ| > 1 on a Demon step: the Heun β-SDE then over- or under-contracts (on the shipped
    Fashion-MNIST model at σ_max = 80, 8 steps, β = 0.1 sends pixels to ±2600; β·|Δσ| ≤ 1 stays in range)."""
    if isinstance(beta, (int, float)) and len(sigmas) > 1:
        step = float((sigmas[:-1] - sigmas[1:]).max())
        if beta * step > 1:
            warnings.warn(f"beta={beta} with Demon steps of up to {step:.3g} in sigma gives beta*|dsigma| = "
                          f"{beta * step:.2g} > 1: the beta-SDE step is inaccurate; use more steps or a smaller beta")


@torch.no_grad()
def sample_demon(model, x: Tensor, sigmas: Tensor, reward: Callable[[Tensor], Tensor], *, K: int = 16, beta=0.1,
                 tau="adaptive", demon_type: str = "tanh", r_of_c: str = "consistency", c_steps: int | None = None,
                 ode_after: float | None = 0.11, extra_args: dict | None = None, callback: Callable | None = None,
                 disable: bool | None = None, generator=None, return_info: bool = False, consistency_model=None,
                 sampler: Callable | None = None, max_batch: int | None = None, method: str = "heun"):
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
        tau: ``"adaptive"`` (std of each item's K rewards, recomputed every step) or a positive number.
        r_of_c: look-ahead, ``"consistency"`` (one step) or ``"baseline"`` (PF-ODE rollout); see ``lookahead``.
        c_steps: rollout steps near σ_max for ``baseline`` (default 20, the reference's).
        generator: a ``torch.Generator`` or one per item (then a batch equals separate runs).
        callback: called before each update with ``x, i, sigma, sigma_hat, denoised`` and, on Demon
            steps, ``reward`` ``[B, K]``, ``weights`` ``[B, K]``, ``tau`` ``[B]``, ``lookahead`` ``[B, K, ...]``.
        return_info: also return a dict of per-step ``sigma``, ``reward_mean``/``reward_std``/``tau``
            ``[S, B]``, ``seconds`` and ``nfe`` counts (network, consistency and reward calls and rows).
        max_batch: the most rows per network call (candidates are chunked, never looped one by one).
        method: the ``odeint`` method of the PF-ODE tail and of the default ``baseline`` rollout; the
            costs above are Heun's (a multistep method such as ``"dpmpp_2m"`` costs m calls for an
            m-step tail and n(σ') per rollout).
    """
    sampling.check_method(method)
    _check_args(model, x, sigmas, reward, K, beta, tau, demon_type, r_of_c, c_steps, ode_after, extra_args, max_batch)
    check_generator(generator, x.shape[0])
    extra_args = extra_args or {}
    counts = dict.fromkeys(("network_calls", "network_rows", "consistency_calls", "consistency_rows"), 0)
    net = _counted(model, counts, "network", max_batch)
    consistency = _counted(consistency_model, counts, "consistency", max_batch) if consistency_model else None
    batch, steps = x.shape[0], demon_steps(sigmas, ode_after)
    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    _warn_coarse(sigmas[:steps + 1], beta)
    log = {"sigma": [], "reward_mean": [], "reward_std": [], "tau": [], "seconds": []}
    for i in trange(steps, disable=disable):
        start = time.perf_counter()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = net(x, as_sigma(sigma, x), **extra_args)
        z, x_next = demon_candidates(net, x, sigma, sigma_next, denoised, K=K, beta=beta, extra_args=extra_args,
                                     generator=generator)
        x0 = lookahead(net, x_next, sigma_next, r_of_c, extra_args=_repeat_rows(extra_args, K, batch),
                       consistency_model=consistency, sampler=sampler, c_steps=20 if c_steps is None else c_steps,
                       sigma_min=sigma_min, sigma_max=sigma_max, method=method)
        r = _score(reward, x0, batch, i, float(sigma_next)).view(batch, K)
        b, tau_b = demon_weights(r, demon_type, tau)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, "reward": r,
                      "weights": b, "tau": tau_b, "lookahead": x0.view(batch, K, *x.shape[1:])})
        x, _ = sampling.sde_step(net, x, sigma, sigma_next, extra_args=extra_args, beta=beta,
                                 noise=combine_noise(z, b), denoised=denoised)
        mean, spread = finite_mean_std(r)  # over the candidates not rejected (reward −inf)
        for key, value in (("sigma", float(sigma_next)), ("reward_mean", mean), ("reward_std", spread),
                           ("tau", tau_b), ("seconds", time.perf_counter() - start)):
            log[key].append(value)
    tail = None if callback is None else (lambda info: callback({**info, "i": info["i"] + steps}))
    x = sampling.odeint(net, x, sigmas[steps:], extra_args=extra_args, callback=tail, disable=disable, method=method)
    if not return_info:
        return x
    info = {key: torch.stack(v) if v and isinstance(v[0], Tensor) else torch.tensor(v, dtype=torch.float64)
            for key, v in log.items()}
    counts.update(reward_calls=steps, reward_rows=steps * batch * K)
    return x, {**info, "demon_steps": steps, "nfe": counts}


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fresh_directory(root: Path, prompt: str) -> Path:
    """A new run folder ``<root>/<time>_<prompt>`` (``-2``, ``-3``, ... if taken); never reuses one."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:40] or "run"
    stem = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{slug}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {root}")


def plot_rewards(info: dict, path: Path, ylabel: str = "Reward", title: str = "") -> Path:
    """Expected reward (mean ± std of the K look-aheads) against σ, log-x, σ decreasing left to right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sigma, mean, std = info["sigma"].numpy(), info["reward_mean"].numpy(), info["reward_std"].numpy()
    for b in range(mean.shape[1] if mean.ndim == 2 else 0):
        ax.errorbar(sigma, mean[:, b], yerr=std[:, b], fmt="o-", ms=3, capsize=2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ after the step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def default_pipeline(device=None):
    """DemonGenerator's pipeline when none is given: ``$KDIFF_ALIGN_MODEL`` (a local diffusers folder, or
    ``toy:NAME``) if set, else the shipped toy Fashion-MNIST model (prompts are its class names)."""
    from .. import toy
    spec = os.environ.get(MODEL_ENV, "").strip()
    if not spec or spec == "toy" or spec.startswith("toy:"):
        return toy.load(spec.partition(":")[2] or "fashion", device=device or "cpu")
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{MODEL_ENV}={spec!r} is not a folder: set it to a local Stable Diffusion "
                                "diffusers folder or to toy:NAME, or pass pipeline=")
    from ..pipeline import from_pretrained
    return from_pretrained(spec, device=device)


def karras_grid(pipeline, T: int, grid="model") -> Tensor:
    """The T-point Karras grid (then 0) of a Demon run: the model's own σ range, the reference's, or (σ_max, σ_min)."""
    if grid == "model":
        return pipeline.sigmas(T)
    sigma_max, sigma_min = REFERENCE_GRID if grid == "reference" else grid
    return schedules.get_sigmas_karras(T, sigma_min, sigma_max, device=pipeline.device)


def _check_grid(grid) -> None:
    if grid in ("model", "reference"):
        return
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, (int, float)) for v in grid)
    if not ok or not grid[0] > grid[1] > 0:
        raise ValueError(f"grid must be 'model', 'reference' or (sigma_max, sigma_min) with sigma_max > sigma_min > 0, "
                         f"got {grid!r}")


class DemonGenerator(abc.ABC):
    """The seed's ``DemonGenerater`` (also importable under that name): subclass it, override
    ``rewards(pils)``, call ``generate(prompt)``.

    Each ``generate`` writes a fresh folder under ``experiment_directory`` with ``config.json``,
    ``plain_ode.png`` (PF-ODE from the same initial noise), ``demon.png``, ``rewards.csv`` (per step:
    σ, mean, std, τ, seconds), its plot ``rewards.png``, ``result.json`` (final rewards, NFE, the grid and
    its ``demon_cost``) and, with ``save_pils``, ``trajectory/step<i>_k<k>.png`` (the look-ahead of every
    candidate). The seed's names are written too: ``init.png``, ``out.png``, ``expected_reward.txt``
    (lines ``mean std sigma seconds``) and ``expected_reward.png``.

    Args:
        T: points of the Karras grid from σ_max to σ_min (T − 1 steps between them, then the step to 0).
        grid: that grid's σ range: ``"model"`` (the pipeline's own, SD: 14.6146 → 0.0292), ``"reference"``
            (the Demon reference's 14.6488 → 0.002, ``REFERENCE_GRID``) or ``(sigma_max, sigma_min)``.
        seed: run n of this object uses seed + n; ``None`` draws a seed, recorded in config.json.
        pipeline: a ``kdiff_align.pipeline.Pipeline`` (a Stable Diffusion folder or a shipped toy model);
            ``None`` loads ``default_pipeline()``: ``$KDIFF_ALIGN_MODEL`` or the shipped toy Fashion model.
        consistency_model: passed to ``sample_demon``.
        max_batch: passed to ``sample_demon``.
        disable: passed to ``sample_demon``.
    """

    def __init__(self, cfg: float = 2, beta: float = 0.1, tau="adaptive", K: int = 16, T: int = 64,
                 demon_type: str = "tanh", r_of_c: str = "baseline", c_steps: int = 20, ode_after: float = 0.11,
                 seed: int | None = None, save_pils: bool = False, ylabel: str = "Reward",
                 experiment_directory: str | os.PathLike = "experiments/generate", *, pipeline=None,
                 grid="model", consistency_model=None, max_batch: int | None = None, disable: bool | None = None,
                 method: str = "heun"):
        sampling.check_method(method)
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"T must be an int >= 2 (grid points), got {T!r}")
        _check_grid(grid)
        self.default_model = pipeline is None
        pipeline = default_pipeline() if pipeline is None else pipeline
        for name in ("guided", "sigmas", "get_init_latent", "from_latent_to_pil"):
            if not hasattr(pipeline, name):
                raise TypeError(f"pipeline must be a kdiff_align Pipeline (missing .{name}), "
                                f"got {type(pipeline).__name__}")
        self.cfg, self.beta, self.tau, self.K, self.T, self.grid = cfg, beta, tau, K, T, grid
        self.demon_type, self.r_of_c, self.c_steps, self.ode_after = demon_type, r_of_c, c_steps, ode_after
        self.seed = secrets.randbelow(2**31) if seed is None else int(seed)
        self.save_pils, self.ylabel = save_pils, ylabel
        self.experiment_directory = Path(experiment_directory)
        self.pipeline, self.consistency_model = pipeline, consistency_model
        self.max_batch, self.disable, self.runs, self.method = max_batch, disable, 0, method

    @abc.abstractmethod
    def rewards(self, pils: list) -> list[float]:
        """Rewards of a list of PIL images, higher is better (one float per image)."""

    def rewards_latent(self, latents: Tensor):
        """Rewards of latents: decodes them to PIL images and calls ``rewards`` (override to skip PIL)."""
        self._pils = self.pipeline.from_latent_to_pil(latents)
        return self.rewards(self._pils)

    def config(self, prompt) -> dict:
        """The settings of a run, as written to config.json (no model weights, no secrets)."""
        return {"prompt": prompt, "cfg": self.cfg, "beta": self.beta, "tau": self.tau, "K": self.K, "T": self.T,
                "demon_type": self.demon_type, "r_of_c": self.r_of_c, "c_steps": self.c_steps,
                "ode_after": self.ode_after, "grid": self.grid, "seed": self.seed, "run": self.runs,
                "run_seed": self.seed + self.runs, "save_pils": self.save_pils,
                "pipeline": type(self.pipeline).__name__, "method": self.method,
                "latent_shape": list(self.pipeline.latent_shape),
                "consistency_model": None if self.consistency_model is None else type(self.consistency_model).__name__}

    def _save_trajectory(self, folder: Path, info: dict) -> None:
        pils = getattr(self, "_pils", None) or self.pipeline.from_latent_to_pil(info["lookahead"].flatten(0, 1))
        folder.mkdir(exist_ok=True)
        for k, pil in enumerate(pils):
            _atomic(folder / f"step{info['i']:03d}_k{k:02d}.png", lambda tmp, p=pil: p.save(tmp, format="PNG"))

    def sigmas(self) -> Tensor:
        """The grid this generator runs on (``T`` Karras points over ``grid``'s σ range, then 0)."""
        return karras_grid(self.pipeline, self.T, self.grid)

    def cost(self) -> dict | None:
        """``demon_cost`` of one Demon image on the grid actually used (the plain PF-ODE image adds 2T − 1 rows);
        ``None`` for a ``method`` other than Heun, whose cost ``demon_cost`` does not model (see ``result["nfe"]``)."""
        if self.method != "heun":
            return None
        return demon_cost(self.sigmas(), K=self.K, r_of_c=self.r_of_c, c_steps=self.c_steps, ode_after=self.ode_after,
                          consistency_model=self.consistency_model is not None)

    def _check_prompt(self, condition: dict) -> None:
        names = getattr(self.pipeline, "class_names", None)
        unknown = [p for p in condition["prompts"] if names is not None and p and p not in names]
        if self.default_model and unknown:
            raise ValueError(f"prompt(s) {unknown} are not classes of the default pipeline (the shipped toy model, "
                             f"classes {names}); set {MODEL_ENV} to a local Stable Diffusion folder or pass pipeline=")

    def generate(self, prompt, ode: bool = False) -> dict:
        """Plain PF-ODE and Demon images of ``prompt`` (a string or a ``{"prompts", "cfgs"}`` dict) from one noise.

        ``ode=True`` (the seed's flag) writes only the plain PF-ODE image and skips Demon.
        """
        condition = prompt if isinstance(prompt, dict) else {"prompts": [prompt], "cfgs": [self.cfg]}
        self._check_prompt(condition)
        name = prompt if isinstance(prompt, str) else " ".join(condition["prompts"])
        folder = _fresh_directory(self.experiment_directory, name)
        config = self.config(prompt)
        self.runs += 1
        _atomic(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        _atomic(folder / "INCOMPLETE", lambda tmp: tmp.write_text("this run stopped before it finished\n"))
        pipe, guided = self.pipeline, self.pipeline.guided(condition)
        sigmas = self.sigmas()
        generator = torch.Generator(pipe.device).manual_seed(config["run_seed"])
        x = pipe.get_init_latent(1, generator=generator)
        plain = sampling.odeint(guided, x, sigmas, disable=self.disable, method=self.method)
        if ode:
            return self._write_plain(folder, plain)

        def reward(x0: Tensor) -> Tensor:
            self._pils = None
            values = torch.as_tensor(self.rewards_latent(x0), dtype=torch.float64)  # rewards(pils) gives a list
            return check_rewards(values, x0.shape[0], f"{type(self).__name__}.rewards",
                                 terms=f"1 image x {x0.shape[0]} candidates")

        callback = (lambda info: "reward" in info and self._save_trajectory(folder / "trajectory", info)) \
            if self.save_pils else None
        demon, info = sample_demon(guided, x, sigmas, reward, K=self.K, beta=self.beta, tau=self.tau,
                                   demon_type=self.demon_type, r_of_c=self.r_of_c, c_steps=self.c_steps,
                                   ode_after=self.ode_after, callback=callback, disable=self.disable,
                                   generator=generator, return_info=True, consistency_model=self.consistency_model,
                                   max_batch=self.max_batch, method=self.method)
        return self._write_results(folder, plain, demon, info)

    def _save_pngs(self, folder: Path, latents: Tensor, names) -> list:
        """Decode ``latents`` and write image i under every name of ``names[i]`` (ours and the seed's)."""
        pils = self.pipeline.from_latent_to_pil(latents)
        pils = pils if isinstance(pils, list) else [pils]
        for pil, aliases in zip(pils, names):
            for name in aliases:
                _atomic(folder / name, lambda tmp, p=pil: p.save(tmp, format="PNG"))
        return pils

    def _write_plain(self, folder: Path, plain: Tensor) -> dict:
        """``ode=True``: the plain PF-ODE image and its reward only."""
        final = check_rewards(torch.as_tensor(self.rewards_latent(plain), dtype=torch.float64), 1,
                              f"{type(self).__name__}.rewards").tolist()
        (pil,) = self._save_pngs(folder, plain, [("plain_ode.png", "init.png")])
        result = {"plain_reward": final[0], "grid": [float(self.sigmas()[0]), float(self.sigmas()[-2])]}
        _atomic(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        return {**result, "directory": folder, "plain": pil}

    def _write_results(self, folder: Path, plain: Tensor, demon: Tensor, info: dict) -> dict:
        values = torch.as_tensor(self.rewards_latent(torch.cat([plain, demon])), dtype=torch.float64)
        final = check_rewards(values, 2, f"{type(self).__name__}.rewards", terms="the plain and the Demon image")
        final = final.tolist()
        names = [("plain_ode.png", "init.png"), ("demon.png", "out.png")]  # ours and the seed's
        pils = self._save_pngs(folder, torch.cat([plain, demon]), names)
        steps = range(info["demon_steps"])
        rows = ["step,sigma,mean,std,tau,seconds"] + [
            f"{i},{info['sigma'][i]:.6g},{info['reward_mean'][i, 0]:.6g},{info['reward_std'][i, 0]:.6g},"
            f"{info['tau'][i, 0]:.6g},{info['seconds'][i]:.4f}" for i in steps]
        _atomic(folder / "rewards.csv", lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
        seed_rows = [f"{info['reward_mean'][i, 0]:.6g} {info['reward_std'][i, 0]:.6g} {info['sigma'][i]:.6g} "
                     f"{info['seconds'][i]:.4f}" for i in steps]  # the seed's expected_reward.txt: mean std sigma seconds
        _atomic(folder / "expected_reward.txt", lambda tmp: tmp.write_text("".join(r + "\n" for r in seed_rows)))
        for name in ("rewards.png", "expected_reward.png"):
            plot_rewards(info, folder / name, self.ylabel, f"Demon ({self.demon_type}, K={self.K})")
        sigmas = self.sigmas()
        result = {"plain_reward": final[0], "demon_reward": final[1], "demon_steps": info["demon_steps"],
                  "nfe": info["nfe"], "grid": [float(sigmas[0]), float(sigmas[-2])], "cost": self.cost(),
                  "seconds": float(info["seconds"].sum())}
        _atomic(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        (folder / "INCOMPLETE").unlink(missing_ok=True)
        return {**result, "directory": folder, "plain": pils[0], "demon": pils[1], "info": info}


DemonGenerater = DemonGenerator  # the seed's spelling


class RewardDemon(DemonGenerator):
    """A ``DemonGenerator`` around ``reward(x0) -> [B]`` on latents (``kdiff_align.rewards`` style)."""

    def __init__(self, reward: Callable[[Tensor], Tensor], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward = reward

    def rewards_latent(self, latents: Tensor):
        return self.reward(latents)

    def rewards(self, pils: list) -> list[float]:
        return self.reward(self.pipeline.from_pil_to_latent(pils)).tolist()


def cli_beta(beta, sigmas: Tensor, ode_after: float | None) -> float:
    """The command line's β: a number as given, or ``"auto"`` = min(0.1, 1/largest Δσ of the Demon steps).

    ``auto`` keeps β·|Δσ| ≤ 1 on every Demon step, where the Heun β-SDE step is accurate (``_warn_coarse``).
    """
    if beta != "auto":
        return float(beta)
    steps = demon_steps(sigmas, ode_after)
    if steps == 0:
        return 0.1
    largest = float((sigmas[:steps] - sigmas[1:steps + 1]).max())
    return min(0.1, math.nextafter(1 / largest, 0.0))  # rounded down: β·Δσ never exceeds 1 by an ulp


def add_cli(sub) -> None:
    """``kdiff-align demon``: a plain and a Demon image of one prompt, side by side, with the reward per step."""
    from .. import cliargs
    p = cliargs.subparser(sub, "demon", help="Sampling Demon on a shipped toy model or a local diffusers folder",
                          description=CLI_DESCRIPTION)
    cliargs.add_model_argument(p)
    p.add_argument("--prompt", required=True, help="the prompt (a class name for the toy models)")
    cliargs.add_reward_arguments(p)
    p.add_argument("--reward-class", default=None, help="deprecated: use --reward classifier:CLASS")
    cliargs.add_steps_argument(p)
    cliargs.add_demon_arguments(p)
    p.add_argument("--sampler", default="heun", choices=sampling.METHODS,
                   help="PF-ODE method of the plain image, the tail after --ode-after and the baseline rollouts")
    p.add_argument("--cfg", type=cliargs.float_in(), default=3.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=cliargs.seed, default=0, help="seed of the initial noise and of the candidates")
    p.add_argument("--out", type=cliargs.out_dir, default="experiments/demon",
                   help="experiment directory (each run makes a fresh folder inside)")
    p.add_argument("--save-pils", action="store_true", help="save every candidate's look-ahead image")
    p.add_argument("--max-batch", type=cliargs.positive_int, default=None, help="the most rows per network call")
    p.add_argument("--device", type=cliargs.device, default=None, help="cuda when available, else cpu")
    p.add_argument("--fp16", action="store_true", help="run diffusers networks in float16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cli_main, interrupted=cli_interrupted)


CLI_DESCRIPTION = """Sampling Demon on one prompt: a plain PF-ODE image and a Demon image from the same noise.

Writes a fresh folder under --out with comparison.png (plain vs Demon, side by side, with their
rewards), rewards.png (the K candidates' reward, mean and std, at every Demon step, named by reward
and class), plain_ode.png, demon.png, rewards.csv, result.json and config.json. A run that stops
early leaves its folder marked by an INCOMPLETE file.

    kdiff-align demon --model toy:fashion --prompt sneaker --reward classifier:sandal --K 8
"""


def cli_reward(args) -> str:
    """``--reward`` with the deprecated ``--reward-class CLASS`` folded in (``classifier:CLASS``)."""
    from .. import cliargs
    if args.reward_class is None:
        return args.reward
    cliargs.deprecated("--reward-class CLASS", "--reward classifier:CLASS")
    if args.reward != "classifier":
        raise ValueError(f"--reward-class needs --reward classifier, got --reward {args.reward}")
    return f"classifier:{args.reward_class}"


def cli_interrupted(args) -> str:
    return (f"the unfinished run folder under {args.out} is marked by an INCOMPLETE file; rerun the command "
            "for a fresh run")


def cli_main(args) -> int:
    """Run ``kdiff-align demon``: check, load the model, generate, write the comparison and the reward plot."""
    from .. import cliargs
    from ..generate import RewardFactory, load_model, reward_label  # the shared model and reward vocabulary
    spec = cli_reward(args)
    if args.steps < 2:
        raise ValueError(f"--steps: demon needs >= 2 steps (Demon steps, then the step to 0), got {args.steps}")
    cliargs.check_reward_options(spec, args.model, args)
    cliargs.check_prompts([args.prompt], args.model)
    kind, arg = cliargs.reward_kind(spec)
    if kind == "classifier":
        cliargs.check_prompts([arg or args.prompt], args.model, "--reward classifier")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_model(args.model, device, torch.float16 if args.fp16 else None)
    reward, label = RewardFactory(spec, pipe, args)(args.prompt), reward_label(spec, args.prompt)
    beta = cli_beta(args.beta, pipe.sigmas(args.steps), args.ode_after)
    gen = RewardDemon(reward, cfg=args.cfg, beta=beta, tau=args.tau, K=args.K, T=args.steps,
                      demon_type=args.demon_type, r_of_c=args.r_of_c, c_steps=args.c_steps, ode_after=args.ode_after,
                      seed=args.seed, save_pils=args.save_pils, ylabel=label, experiment_directory=args.out,
                      pipeline=pipe, max_batch=args.max_batch, disable=args.no_progress or None,
                      method=args.sampler)
    out = gen.generate(args.prompt)
    title = f"{args.prompt!r}: Demon ({args.demon_type}, K={args.K}, {args.steps} steps, beta={beta:.3g})"
    plot_rewards(out["info"], out["directory"] / "rewards.png", label, f"{title}\nreward: {label}")
    save_comparison(out, out["directory"] / "comparison.png", label, title)
    print(f"{label}: plain ODE {out['plain_reward']:.4f}, Demon {out['demon_reward']:.4f} "
          f"({out['demon_steps']} Demon steps, {out['nfe']['network_rows']} network rows, {out['seconds']:.1f} s)")
    print(f"wrote {out['directory']} (comparison.png, rewards.png, ...)")
    return 0


def save_comparison(out: dict, path: Path, label: str, title: str) -> Path:
    """The plain PF-ODE image and the Demon image side by side, each titled with its reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.6))
    for ax, name, key in zip(axes, ("plain PF-ODE", "Demon"), ("plain", "demon")):
        image = out[key]
        ax.imshow(image, cmap="gray" if image.mode == "L" else None, interpolation="nearest")
        ax.set_title(f"{name}\n{label} = {out[key + '_reward']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}; same initial noise", fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
