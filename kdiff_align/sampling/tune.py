"""Few-step samplers tuned to the model: a σ grid (and solver) fitted to teacher solutions.

``tune_sampler`` solves the PF-ODE finely from calibration noises (the teacher), picks a K-step grid
by dynamic programming over one-step costs between candidate σ values (GITS, Chen et al. 2024), then
refines the grid's interior log σ end to end against the teacher's final samples with the multistep
solver that will run it (derivative-free; the ordering is kept by softmax increments in log σ), keeps
the best solver among a few, then fits per-step correction weights (S4S-style) and the σ given to the
network at each step (decoupled from the grid, as LD3) by backpropagation through the sampler. A
``TunedSampler`` binds the grid: ``tuned(model, x)`` makes exactly ``nfe`` network evaluations. Usage
and measurements: docs/solvers.md.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import trange

from ..schedules import get_sigmas_exponential, get_sigmas_karras
from ..testing import CountingDenoiser
from ..utils import as_sigma, atomic_write, check_finite, check_sigmas, nfe_summary
from .core import check_method, odeint
from .multistep import (
    CORRECTION_FEATURES,
    MULTISTEP_METHODS,
    MultistepSolver,
    correction,
    correction_features,
    dpmpp_step,
    multistep_odeint,
)

TUNE_METHODS = ("ipndm", "dpmpp_2m", "unipc", "deis")
FEW_STEP_METHOD, FEW_STEP_BELOW = "unipc", 10  # the default solver below 10 NFE when corrections are fitted
FORMAT = "kdiff_align.TunedSampler/1"
FITTED = ("corrections", "input_sigmas")  # solver options fitted to the whole grid


class TunedSampler:
    """A multistep sampler with its σ grid bound: ``tuned(model, x)`` integrates from ``sigmas[0]``.

    Attributes:
        sigmas: the grid (float64, ``nfe + 1`` entries, strictly decreasing, ending in 0).
        method: the multistep solver (one of ``sampling.MULTISTEP_METHODS``); ``solver_kw`` its options.
        nfe: network evaluations per sample (one per step).
        tuning_nfe: network evaluations (calls on the calibration batch) spent tuning.
        info: tuning record (calibration size, errors before/after refinement, seconds).
    """

    def __init__(self, sigmas, method: str, *, solver_kw: dict | None = None, tuning_nfe: int = 0,
                 info: dict | None = None):
        self.sigmas = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64), decreasing=True)
        self.method = check_method(method, MULTISTEP_METHODS)
        self.solver_kw = dict(solver_kw or {})
        self.tuning_nfe, self.info = int(tuning_nfe), dict(info or {})

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: one per step of the grid."""
        return len(self.sigmas) - 1

    def __call__(self, model, x: Tensor, *, extra_args: dict | None = None, callback=None,
                 disable: bool | None = None) -> Tensor:
        """Sample from x at σ = ``sigmas[0]`` with exactly ``nfe`` evaluations of ``model``."""
        return odeint(model, x, self.sigmas, extra_args=extra_args, callback=callback, disable=disable,
                      method=self.method, **self.solver_kw)

    def along(self, sigmas: Tensor) -> Tensor:
        """The tuned grid between ``sigmas[0]`` and ``sigmas[-1]``: what ``odeint(method=tuned)`` integrates.

        The full range gives ``self.sigmas``; a later start (Demon's look-ahead from σ_i, an ODE tail)
        keeps the tuned σ values below it (those within 1e-4 relative of the start are merged into it).
        """
        check_sigmas(sigmas, decreasing=True, end_zero=False)
        start, end = float(sigmas[0]), float(sigmas[-1])
        inner = [s for s in self.sigmas.tolist() if end < s < start * (1 - 1e-4)]
        if end > 0 and inner and inner[-1] <= end * (1 + 1e-4):
            inner = inner[:-1]
        return torch.tensor([start, *inner, end], dtype=torch.float64, device=sigmas.device)

    def options(self, sigmas: Tensor) -> dict:
        """The solver options for a grid from ``along``: the fitted ``corrections`` and ``input_sigmas`` belong
        to the whole tuned grid, so a part of it (a later start, an ODE tail) runs the plain solver."""
        whole = len(sigmas) == len(self.sigmas) and bool((sigmas.cpu().double() == self.sigmas).all())
        return {k: v for k, v in self.solver_kw.items() if k not in FITTED or whole}

    def __repr__(self) -> str:
        grid = ", ".join(f"{s:.4g}" for s in self.sigmas.tolist())
        return f"TunedSampler(method={self.method!r}, nfe={self.nfe}, sigmas=[{grid}])"

    def to_dict(self) -> dict:
        return {"format": FORMAT, "sigmas": self.sigmas.tolist(), "method": self.method,
                "solver_kw": self.solver_kw, "nfe": self.nfe, "tuning_nfe": self.tuning_nfe, "info": self.info}

    def save(self, path: str | os.PathLike) -> None:
        """Write the sampler as JSON (floats written exactly; no pickle)."""
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedSampler":
        """Read a sampler written by ``save``; fails with ValueError on another format."""
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a TunedSampler JSON file (format {FORMAT!r})")
        tuned = cls(data["sigmas"], data["method"], solver_kw=data.get("solver_kw"),
                    tuning_nfe=data.get("tuning_nfe", 0), info=data.get("info"))
        if tuned.nfe != data.get("nfe", tuned.nfe):
            raise ValueError(f"{path}: nfe {data['nfe']} does not match its {len(tuned.sigmas)} sigmas")
        return tuned


def _check_tune_inputs(model, x_T, nfe, extra_args, method, corrections, generator=None,
                       counts: dict | None = None) -> tuple[tuple[str, ...], dict]:
    for name, (value, low) in (counts or {}).items():  # the search's sizes: None (a default) or an integer >= low
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser D(x, sigma, **extra_args), got {type(model).__name__}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    check_finite(x_T, "x_T")
    if x_T.ndim < 2 or x_T.shape[0] < 2:
        raise ValueError(f"x_T must be a batch of calibration noises [n >= 2, ...], got shape {tuple(x_T.shape)}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of model keyword arguments, got {type(extra_args).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if method is None:
        method = (FEW_STEP_METHOD,) if corrections and nfe < FEW_STEP_BELOW else TUNE_METHODS
    methods = (method,) if isinstance(method, str) else tuple(method)
    for m in methods:
        check_method(m, MULTISTEP_METHODS)
    return methods, {} if extra_args is None else extra_args


def candidate_sigmas(sigma_max: float, sigma_min: float, n: int) -> list[float]:
    """``n`` log-uniform σ values from ``sigma_max`` down to ``sigma_min`` (both exactly, not through exp(log(·))):
    the teacher's nodes and GITS's candidates."""
    s = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)).tolist()
    s[0], s[-1] = sigma_max, sigma_min
    return s


def teacher_solve(model, x_T: Tensor, s: list[float], substeps: int, extra_args: dict, disable=None) -> tuple:
    """The teacher: DPM-Solver++(3M) with ``substeps`` log-uniform steps between neighbours of ``s``
    (decreasing, > 0), ending with x = D(x, s[-1]).

    Returns its fine grid, the states x and D(x) at each positive σ of it (``teacher_at`` steps from them to
    any σ in the range) and the final sample; candidate k of ``s`` is fine node k·``substeps``.
    """
    fine = []
    for a, b in zip(s[:-1], s[1:]):
        fine += [a] + [math.exp(math.log(a) + (math.log(b) - math.log(a)) * j / substeps) for j in range(1, substeps)]
    fine += [s[-1], 0.0]
    solver, x, states, Ds = MultistepSolver("dpmpp_3m", fine), x_T, [], []
    for i in trange(len(fine) - 1, disable=disable, desc="teacher"):
        denoised = model(x, as_sigma(fine[i], x), **extra_args)
        if not torch.isfinite(denoised).all():
            raise ValueError(f"model returned NaN or infinite values at sigma={fine[i]:.4g} (teacher solve)")
        states.append(x)
        Ds.append(denoised)
        x = solver.step(x, i, denoised)
    return fine, torch.stack(states), torch.stack(Ds), x


def teacher_at(fine: list[float], states: Tensor, Ds: Tensor, sigmas: list[float]) -> list[Tensor]:
    """The teacher's states at ``sigmas`` (within its range, > 0) without evaluating the model: from the fine
    node at or above each σ, the teacher's own DPM-Solver++(3M) step with its history, shortened to end there
    (a multistep method's dense output; it ends on the next node exactly where σ is one)."""
    out = []
    for sigma in sigmas:
        j = max(k for k, v in enumerate(fine[:-1]) if v >= sigma)
        order = min(3, j + 1)
        out.append(states[j] if sigma == fine[j] else
                   dpmpp_step(states[j], fine[:j + 1] + [sigma], j, [Ds[j - k] for k in range(order)], order))
    return out


def _per_item(err: Tensor) -> Tensor:
    """Per-sample L2 norm over all but the leading (candidate, batch) axes."""
    return err.flatten(2).norm(dim=2) if err.ndim > 2 else err.abs()


def item_errors(out: Tensor, x0: Tensor) -> Tensor:
    """Per-sample L2 errors ``[n]`` of the samples ``out`` against the teacher's final samples ``x0``."""
    return _per_item((out - x0).unsqueeze(0))[0]


def gits_grid(s: list[float], states: Tensor, Ds: Tensor, x0: Tensor, nfe: int) -> list[float]:
    """GITS dynamic programming: the ``nfe``-evaluation path over candidates ``s`` of least summed cost.

    c(i, j) = mean ‖DDIM step from the teacher's x_i to σ_j − teacher x_j‖ (no extra evaluations: D_i
    is the teacher's), plus the final jump c(i, 0) = mean ‖D_i − x0‖. The path starts at s[0].
    """
    n, sig = len(s), torch.tensor(s, dtype=states.dtype)
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    for i in range(n - 1):
        ratio = (sig[i + 1:] / sig[i]).view(-1, *[1] * (states.ndim - 1))
        jump = ratio * states[i] + (1 - ratio) * Ds[i] - states[i + 1:]
        cost[i, i + 1:] = _per_item(jump).mean(1).double()
    final = _per_item(Ds - x0).mean(1).double()
    best, prev = torch.full((nfe, n), math.inf, dtype=torch.float64), torch.zeros((nfe, n), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, nfe):
        total = best[k - 1].unsqueeze(1) + cost  # [from, to]
        best[k], prev[k] = total.min(0)
    path = [int((best[nfe - 1] + final).argmin())]
    for k in range(nfe - 1, 0, -1):
        path.append(int(prev[k, path[-1]]))
    return [s[i] for i in reversed(path)] + [0.0]


def _grid_of(theta: np.ndarray, sigma_max: float, log_min: float) -> list[float]:
    """Grid from softmax increments of log σ over [log σ_min, log σ_max] (the last one is slack)."""
    log_max = math.log(sigma_max)
    w = np.exp(theta - theta.max())
    steps = np.cumsum(w / w.sum())[:-1]
    return [sigma_max] + [math.exp(log_max - (log_max - log_min) * c) for c in steps] + [0.0]


def _theta_of(grid: list[float], log_min: float) -> np.ndarray:
    """Inverse of ``_grid_of`` (slack floored at 1e-3 of the range so the log stays finite)."""
    logs = [math.log(v) for v in grid[:-1]] + [log_min]
    inc = np.maximum(-np.diff(logs), 1e-3 * (logs[0] - log_min))
    return np.log(inc)


def sample_errors(out: Tensor, x0: Tensor) -> tuple[float, float]:
    """Mean log and RMS of the per-sample L2 errors against the teacher's final samples (inf if not finite).

    The log (a geometric mean) weighs the typical item, as the median does: at 5–10 NFE per-item errors
    span decades, and on multimodal data a few items near a mode boundary would dominate a plain mean;
    the RMS is the outliers' measure.
    """
    err = item_errors(out, x0).double()
    stats = float(err.clamp_min(1e-300).log().mean()), float(err.pow(2).mean().sqrt())
    return tuple(v if math.isfinite(v) else math.inf for v in stats)


def run_grid(model, x_T: Tensor, grid: list[float], method: str, extra_args: dict, **fitted) -> Tensor:
    """The calibration samples of ``method`` on ``grid`` (the final order lowered, as a TunedSampler runs),
    with ``fitted`` options (``corrections``, ``input_sigmas``)."""
    return multistep_odeint(model, x_T, torch.tensor(grid, dtype=torch.float64), method, extra_args=extra_args,
                            disable=True, lower_order_final=True, **fitted)


def final_error(model, x_T: Tensor, x0: Tensor, grid: list[float], method: str, extra_args: dict) -> float:
    """The grid search's objective: the mean of the per-sample L2 errors' mean log and median log, for
    ``method`` on ``grid`` against the teacher's final samples (inf if not finite).

    Both weigh the typical item; the mean log alone could buy a wider spread with a worse median (the 2-D
    mixture at 10 NFE: a grid with mean log −6.46 against Karras's −5.23 had the median 0.0027 against
    0.0017 on held-out noises, better at both quartiles), and the median alone is a rough objective.
    """
    err = item_errors(run_grid(model, x_T, grid, method, extra_args), x0).double()
    if not torch.isfinite(err).all():
        return math.inf
    log = err.clamp_min(1e-300).log()
    return float(0.5 * log.mean() + 0.5 * log.median())


def fit_corrections(model, x_T: Tensor, grid: list[float], method: str, extra_args: dict, targets: list[Tensor],
                    items: slice = slice(None), ridge: float = 1e-3) -> tuple[list[list[float]], Tensor]:
    """Per-step correction weights fitted to teacher states on ``grid`` (S4S-style, by least squares).

    Step by step along the solver's own trajectory, the weights w_i of (D_i, D_{i−1}, x_i, D_{i−2}) minimise
    ‖base step + Σ w·f − x*_{i+1}‖² + ridge·Σ w_k²·‖f_k‖² over the calibration batch, x* the teacher's
    state at σ_{i+1} (``targets``: those at ``grid[1:-1]``, then the final samples): each step pulls the
    trajectory back onto the teacher's, the last one onto its final sample. Only the calibration ``items``
    enter the fit (the model still sees the whole batch). Returns the weights and the corrected samples
    (those of ``run_grid`` with these weights).
    """
    solver, x, weights = MultistepSolver(method, grid, lower_order_final=True), x_T, []
    for i in range(len(grid) - 1):
        denoised = model(x, as_sigma(grid[i], x), **extra_args)
        x = solver.correct(x, i, denoised)
        base = solver.step(x, i, denoised)
        present = [f for f in correction_features(x, solver.Ds) if f is not None]  # a D not yet in the history is None
        features = torch.stack([f[items].flatten().double() for f in present], 1)
        gram = features.T @ features
        gram += ridge * torch.diag(gram.diag().clamp_min(1e-300))
        w = iter(torch.linalg.solve(gram, features.T @ (targets[i] - base)[items].flatten().double()).tolist())
        weights.append([0.0 if f is None else next(w) for f in correction_features(x, solver.Ds)])
        x = base + correction(weights[-1], x, solver.Ds)
    return weights, x


def corrected_run(model, x_T: Tensor, grid: list[float], method: str, extra_args: dict, u: Tensor, v: Tensor,
                  scales: list[list[float]] | None) -> tuple[Tensor, list[list[float]]]:
    """The calibration samples with correction weights u·scale, the network evaluated at σ_i·e^{v_i} (``u``
    and ``v`` may require grad); ``scales`` None takes 1 / each feature's RMS along this run, so that u is
    the RMS of the term it adds. Returns the samples and the scales."""
    solver = MultistepSolver(method, grid, lower_order_final=True)
    x, found = x_T, []
    for i in range(len(grid) - 1):
        denoised = model(x, as_sigma(grid[i] * v[i].exp(), x), **extra_args)
        x = solver.correct(x, i, denoised)
        base, features = solver.step(x, i, denoised), correction_features(x, solver.Ds)
        found.append([1.0 if f is None else 1 / float(f.detach().pow(2).mean().sqrt().clamp_min(1e-30))
                      for f in features])
        row = found[-1] if scales is None else scales[i]
        x = base + sum(u[i, k] * row[k] * f for k, f in enumerate(features) if f is not None)
    return x, found if scales is None else scales


E2E_HISTORY = 10  # the end-to-end fit's L-BFGS memory (pairs of past steps)
E2E_EVALS = 200  # the end-to-end fit's default budget: runs × nfe (33 runs at 6 NFE, 20 at 10)
E2E_REJECT = 1e10  # the loss a run with a non-finite error shows the line search (it then shortens the step)
E2E_UNIT = 0.1  # the fit moves u / E2E_UNIT and v / E2E_UNIT, as L-BFGS's first step may move each by up to 1


class _Spent(Exception):
    """The end-to-end fit's runs are spent (raised inside the L-BFGS closure, whose optimiser cannot stop itself)."""


def refine_corrections(model, x_T: Tensor, x0: Tensor, grid: list[float], method: str, extra_args: dict,
                       weights: list[list[float]], scales: list[list[float]], iters: int, fit: slice,
                       check: slice) -> tuple[dict, Tensor, int, int]:
    """End-to-end fit of the correction weights and of the σ at which each step evaluates the network
    (decoupled time steps, as LD3, Tong et al. 2024; S4S fits its coefficients end to end too): L-BFGS with a
    strong-Wolfe line search on the mean log error of the final sample against the teacher's over the ``fit``
    items, by backpropagation through the solver and the network, from ``weights`` (in units of the features'
    ``scales``, from ``corrected_run``) and the grid's σ.

    The objective is deterministic and smooth but ill-conditioned (the last step's weights move the sample
    far more than the first's): in the same 30 runs on a 16-D Gaussian at 8 NFE, Adam at a fixed step lowered
    the held-out mean log error by 0.08, L-BFGS by 0.63. Every run counts toward ``iters``, line-search trials
    included; each but the last is followed by a backward pass, and a run whose error is not finite is shown
    to the line search as ``E2E_REJECT`` (with no gradient), so it shortens the step. L-BFGS's first trial moves
    each parameter by up to 1, which in the weights' own units overshot (``fashion`` with CFG 3 at 10 NFE: mean log
    error −0.69, then 2.80, and two more runs to back off), so it works in units of ``E2E_UNIT``; the quasi-Newton
    steps after it do not depend on the units. An L-BFGS run that stops
    early (no descent direction) is restarted from where it stopped. Of the runs, returns the options
    (``corrections``, ``input_sigmas``) of the one with the least mean log error over the ``check`` items (the
    start included), its samples, the backward calls made and the runs (each ``len(grid) − 1`` forward calls)."""
    like = dict(dtype=x_T.dtype, device=x_T.device)
    u = torch.tensor([[w / c / E2E_UNIT for w, c in zip(row, sc)] for row, sc in zip(weights, scales)], **like,
                     requires_grad=True)
    v = torch.zeros(len(weights), **like, requires_grad=True)
    best, runs, backward = (math.inf, u.detach() * E2E_UNIT, v.detach() * E2E_UNIT, None), 0, 0

    def closure():
        nonlocal best, runs, backward
        opt.zero_grad()
        out, _ = corrected_run(model, x_T, grid, method, extra_args, u * E2E_UNIT, v * E2E_UNIT, scales)
        log_error = item_errors(out, x0).clamp_min(1e-30).log()
        loss, held = log_error[fit].mean(), log_error[check].mean().item()
        runs += 1
        finite = bool(torch.isfinite(loss)) and math.isfinite(held)
        if finite and held < best[0]:
            best = (held, u.detach() * E2E_UNIT, v.detach() * E2E_UNIT, out.detach())
        if runs == iters:
            raise _Spent  # the last run's gradient would never be used
        if not finite:
            return loss.new_tensor(E2E_REJECT)
        loss.backward()
        backward += len(grid) - 1
        return loss

    with torch.enable_grad():
        while runs < iters:
            opt = torch.optim.LBFGS([u, v], max_iter=iters, history_size=E2E_HISTORY, tolerance_grad=0.0,
                                    tolerance_change=0.0, line_search_fn="strong_wolfe")
            try:
                opt.step(closure)
            except _Spent:
                break
    rows = [[w * c for w, c in zip(row, sc)] for row, sc in zip(best[1].tolist(), scales)]
    inputs = [s * math.exp(c) for s, c in zip(grid[:-1], best[2].tolist())]
    return {"corrections": rows, "input_sigmas": inputs}, best[3], backward, runs


def refine_grid(objective, grid: list[float], log_min: float, max_evals: int) -> tuple[list[float], float]:
    """End-to-end refinement of the interior log σ (Nelder–Mead on softmax increments)."""
    fun = lambda theta: objective(_grid_of(theta, grid[0], log_min))  # noqa: E731
    theta0 = _theta_of(grid, log_min)
    res = minimize(fun, theta0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 0.0, "initial_simplex":
                            np.vstack([theta0] + [theta0 + 0.5 * e for e in np.eye(len(theta0))])})
    return _grid_of(res.x, grid[0], log_min), float(res.fun)


def search_grids(objective, starts: dict, methods, nfe: int, log_min: float, max_evals: int, refine: int) -> tuple:
    """Errors of every (solver, start grid), then Nelder–Mead refinement of the ``refine`` solvers whose best
    start is best, each from that start; returns the errors and the refined grids by solver."""
    errors = {(m, k): objective(m)(g) for m in methods for k, g in starts.items()}
    best_start = {m: min(starts, key=lambda k: errors[m, k]) for m in methods}
    ranked = sorted(methods, key=lambda m: errors[m, best_start[m]])
    refined = {}
    for m in ranked[:refine] if nfe > 1 and max_evals > 0 else ():
        grid = starts[best_start[m]]
        for _ in range(2):  # a restart helps Nelder–Mead out of a collapsed simplex
            grid, error = refine_grid(objective(m), grid, log_min, max_evals // 2)
        refined[m], errors[m, "refined"] = grid, error
    return errors, refined


@torch.no_grad()
def tune_sampler(model, x_T: Tensor, nfe: int, *, extra_args: dict | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, method=None, generator: torch.Generator | None = None,
                 disable: bool | None = None, candidates: int = 24,
                 substeps: int = 4, max_evals: int | None = None, refine: int = 1,
                 corrections: bool = True, end_to_end: int | None = None) -> TunedSampler:
    """Fit an ``nfe``-step grid, solver, per-step corrections and input σ to ``model`` on calibration noises.

    GITS dynamic programming over a teacher solve, end-to-end Nelder–Mead refinement of the grid, then
    per-step correction weights fitted to the teacher by least squares and, from them, end to end by
    backpropagation together with the σ at which each step evaluates the network, both on three quarters
    of the calibration noises; the last quarter decides whether to keep them (``choose_corrections``) and,
    where ``refine`` solvers get corrections, which solver is kept.

    Args:
        x_T: calibration noises ``[n, ...]`` already scaled to σ_max (n ≥ 2; 32–256 typical).
        sigma_min: the grid's smallest positive σ; default the model's ``sigma_min`` attribute, else 0.002.
        sigma_max: the grid's first σ (the noise level of ``x_T``); default the model's ``sigma_max``
            attribute, else the RMS of ``x_T``.
        method: a multistep solver name or a tuple of names to choose from. Default: ``unipc`` below 10 NFE
            when ``corrections`` are fitted (the corrections gain more on it than on the solver that is best
            without them: 0.74–0.98× that one's median error on the shipped models at 6 NFE, mode flips no
            higher than the best peer's at 11 closed-form budgets instead of 6), otherwise ``TUNE_METHODS``
            (at 10 NFE ``unipc`` alone did 1.13–1.60× worse than the search over them).
        generator: draws which quarter of the calibration noises is held out to check the corrections
            (``calibration_split``); default the last quarter. Pass one when the noises' order carries
            meaning, e.g. ``extra_args`` conditions grouped by prompt.
        candidates: number of log-uniform candidate σ values of the DP; ``substeps`` teacher steps
            between neighbours (teacher: DPM-Solver++(3M), ``(candidates − 1)·substeps + 1`` evaluations).
        max_evals: end-to-end sampler runs of each refined solver (default 32); 0 keeps the
            best start (GITS, Karras ρ = 5, 7, 9 or exponential grid).
        refine: how many solvers to refine, those whose best start is best first; with ``corrections``, the
            ``refine`` solvers with the least objective each get their corrections fitted on their grid, and the
            one with the least check error after them is kept (``info["check_errors"]``). The solver that is
            best without corrections need not be best with them: on two of three SD3-shift flow mixtures at
            10 NFE (``refine=4``) ``unipc`` was kept, with 0.2 % mode flips against 1.6 and 2.0 % for the solver
            that led before them. Default 1: on the shipped models each finalist costs about half the tuning;
            0 refines none and fits the corrections of the best solver on its best start.
        corrections: fit per-step correction weights (S4S-style) on the chosen grid.
        end_to_end: sampler runs refining those weights by backpropagation through the sampler (L-BFGS; its
            line-search trials count as runs). Each costs ``nfe`` forward calls and, but the last, ``nfe``
            backward calls, counted in ``tuning_nfe``; default ``E2E_EVALS // nfe`` (a fixed budget of calls: 33
            runs at 6 NFE, 20 at 10); 0 keeps the least squares.
    """
    methods, extra_args = _check_tune_inputs(model, x_T, nfe, extra_args, method, corrections, generator, counts={
        "candidates": (candidates, 2), "substeps": (substeps, 1), "max_evals": (max_evals, 0), "refine": (refine, 0),
        "end_to_end": (end_to_end, 0)})
    sigma_min, sigma_max = _sigma_range(model, x_T, sigma_min, sigma_max)
    counted, clock = CountingDenoiser(model), time.perf_counter()
    s = candidate_sigmas(sigma_max, sigma_min, max(candidates, nfe))
    fine, states, Ds, x0 = teacher_solve(counted, x_T, s, substeps, extra_args, disable)
    teacher_nfe = counted.calls
    starts = {"gits": gits_grid(s, states[::substeps], Ds[::substeps], x0, nfe),
              **{f"karras{rho}": get_sigmas_karras(nfe, sigma_min, sigma_max, rho).double().tolist()
                 for rho in (5, 7, 9)},
              "exponential": get_sigmas_exponential(nfe, sigma_min, sigma_max).double().tolist()}
    objective = lambda m: lambda g: final_error(counted, x_T, x0, g, m, extra_args)  # noqa: E731
    errors, refined = search_grids(objective, starts, methods, nfe, math.log(sigma_min),
                                   32 if max_evals is None else max_evals, refine)
    found = {m: min(((k, e) for (n, k), e in errors.items() if n == m), key=lambda ke: ke[1]) for m in methods}
    finalists = sorted(methods, key=lambda m: found[m][1])[:max(1, refine) if corrections else 1]
    grids = {m: refined[m] if found[m][0] == "refined" else starts[found[m][0]] for m in finalists}
    best, solver_kw, backward, steps = finalists[0], {"lower_order_final": True}, 0, 0
    error = found[best][1]
    if corrections:  # each finalist's corrections; the solver with the least check error after them is kept
        targets = {m: [*teacher_at(fine, states, Ds, grids[m][1:-1]), x0] for m in finalists}
        del states, Ds
        runs = E2E_EVALS // nfe if end_to_end is None else end_to_end
        fit, check = calibration_split(x_T.shape[0], generator)
        fitted = {m: choose_corrections(counted, x_T, x0, grids[m], m, extra_args, targets[m], runs, errors, fit,
                                        check) for m in finalists}
        best = min(finalists, key=lambda m: fitted[m].check_error)
        solver_kw.update(fitted[best].options)
        error = fitted[best].error
        backward, steps = sum(f.backward for f in fitted.values()), sum(f.runs for f in fitted.values())
    start, grid = found[best][0], grids[best]
    info = {"calibration": int(x_T.shape[0]), "teacher_nfe": teacher_nfe, "grid_from": start, "error": error,
            "errors": {f"{m}/{k}": e for (m, k), e in errors.items()}, "sigma_min": sigma_min,
            "sigma_max": sigma_max, "tuning_rows": counted.rows, "backward_calls": backward, "end_to_end_steps": steps,
            "seconds": round(time.perf_counter() - clock, 3)}
    if corrections:
        info["check_errors"] = {m: fitted[m].check_error for m in finalists}
        if generator is not None:
            info["check_items"] = check.tolist()
    tuning_nfe = nfe_summary(counted.calls, backward)["total"]
    return TunedSampler(grid, best, solver_kw=solver_kw, tuning_nfe=round(tuning_nfe), info=info)


def calibration_split(n: int, generator: torch.Generator | None = None) -> tuple:
    """Indices of the ``n`` calibration noises that fit the corrections and of the quarter (at least one)
    that checks them: the last quarter, or with ``generator`` a random one (both sorted)."""
    held = max(1, n // 4)
    if generator is None:
        return slice(0, n - held), slice(n - held, n)
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    return order[held:].sort().values, order[:held].sort().values


class Corrected(NamedTuple):
    """``choose_corrections``'s result: the solver options kept (``{}``: none), their mean log error over all the
    calibration noises and over the check items, the backward calls spent and the end-to-end runs made."""
    options: dict
    error: float
    check_error: float
    backward: int
    runs: int


def choose_corrections(model, x_T: Tensor, x0: Tensor, grid: list[float], method: str, extra_args: dict,
                       targets: list[Tensor], end_to_end: int, errors: dict, fit, check) -> Corrected:
    """Least-squares correction weights (``fit_corrections``, on the teacher's ``targets``), then weights and the
    network's input σ fitted end to end (``refine_corrections``, ``end_to_end`` L-BFGS runs, from the least-squares
    weights or none, whichever does better on the fit items), both on the ``fit`` items of the calibration noises
    (``calibration_split``). The ``check`` items (the rest) decide: the options with the lower mean log error there
    among those that lower it below the plain run's, without raising the RMS over all the noises (on mixtures
    weights can buy a better median with more items in the wrong mode), or none (then the errors are the plain
    run's); ``errors`` gets each fit's mean log error over the check items."""
    scores = lambda out: (sample_errors(out[check], x0[check])[0], *sample_errors(out, x0))  # noqa: E731
    zero = torch.zeros(len(grid) - 1, len(CORRECTION_FEATURES), dtype=x_T.dtype, device=x_T.device)
    plain_run, scales = corrected_run(model, x_T, grid, method, extra_args, zero, zero[:, 0], None)
    plain = scores(plain_run)
    errors[method, "plain_check"] = plain[0]
    weights, corrected = fit_corrections(model, x_T, grid, method, extra_args, targets, fit)
    found, backward, steps = {"least_squares": ({"corrections": weights}, scores(corrected))}, 0, 0
    if end_to_end > 0:
        fit_error = lambda out: sample_errors(out[fit], x0[fit])[0]  # noqa: E731
        start = weights if fit_error(corrected) < fit_error(plain_run) else [[0.0] * len(w) for w in weights]
        options, out, backward, steps = refine_corrections(model, x_T, x0, grid, method, extra_args, start, scales,
                                                           end_to_end, fit, check)
        if out is not None:
            found["end_to_end"] = options, scores(out)
    kept = []
    for name, (options, (held, log_error, rms)) in found.items():
        errors[method, name] = held
        if held < plain[0] and rms <= plain[2]:
            kept.append((held, log_error, options))
    held, error, options = min(kept, key=lambda kv: kv[0], default=(plain[0], plain[1], {}))
    return Corrected(options, error, held, backward, steps)


def _sigma_range(model, x_T: Tensor, sigma_min, sigma_max) -> tuple[float, float]:
    """The grid's σ range: the arguments, else the model's attributes, else 0.002 and the RMS of x_T."""
    if sigma_max is None:
        sigma_max = getattr(model, "sigma_max", None) or x_T.pow(2).mean().sqrt()
    if sigma_min is None:
        sigma_min = getattr(model, "sigma_min", 0.002)
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max
