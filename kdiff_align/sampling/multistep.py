"""Multistep ODE solvers: one network evaluation per step, the last few D values kept as state.

In t = −log σ the PF-ODE is dx/dt = D − x, whose linear part the exponential integrators
(DPM-Solver++, UniPC, DEIS) solve exactly; LMS and iPNDM are Adams–Bashforth methods on
d = (x − D)/σ in σ. Every solver warms up with orders 1, 2, … and lowers its order on the last steps
(``order_i = min(order, i + 1, steps_left)``) on grids ending in 0, where the last step is ``x = D``
(the exponential integrators only below 15 steps, diffusers' rule; LMS and iPNDM never, as k-diffusion's
LMS). The exponential integrators extrapolate in log σ, except on a step whose nodes are more even in σ
than in log σ (the tail of an SD3-shift flow grid or, from 15 steps, of an SD grid): there they take the
Adams–Bashforth step in σ, from 15 steps of order up to 4 (``sigma_step``, ``sigma_order``). Grids may end
above 0 (split grids): the state at the last σ is returned.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from torch import Tensor

from ..utils import as_sigma
from .grad import run_steps

MULTISTEP_METHODS = ("lms", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis")
MAX_ORDER = {"lms": 4, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3, "ipndm": 4, "deis": 3}
DEFAULT_ORDER = {"lms": 4, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3, "ipndm": 4, "deis": 3}
UNIPC_VARIANTS = ("bh1", "bh2")
_GAUSS = np.polynomial.legendre.leggauss(8)  # exact for polynomials of degree ≤ 15


def lagrange_integral(nodes, j: int, a: float, b: float, weight: Callable | None = None) -> float:
    """∫_a^b ℓ_j(u)·w(u) du for the Lagrange basis polynomial ℓ_j over ``nodes`` (Gauss–Legendre, float64).

    With w ≡ 1 the rule is exact; with w = exp (DEIS's log-σ integral) its error is far below float64
    rounding for the step sizes of any sampling grid.
    """
    u = (b - a) / 2 * _GAUSS[0] + (a + b) / 2
    basis = np.ones_like(u)
    for k, node in enumerate(nodes):
        if k != j:
            basis *= (u - node) / (nodes[j] - node)
    w = np.ones_like(u) if weight is None else weight(u)
    return float((b - a) / 2 * np.sum(_GAUSS[1] * basis * w))


def lms_coeffs(s: list[float], i: int, order: int) -> list[float]:
    """Adams–Bashforth weights of d_i, d_{i−1}, … for the step σ_i → σ_{i+1}: ∫ ℓ_j(σ) dσ (LMS)."""
    nodes = [s[i - k] for k in range(order)]
    return [lagrange_integral(nodes, j, s[i], s[i + 1]) for j in range(order)]


IPNDM_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _h_phi(h: float, order: int) -> list[float]:
    """φ-type integrals I_k = ∫_0^h e^{−(h−u)} u^k/k! du for k < order (I_0 = 1 − e^{−h})."""
    out = [-math.expm1(-h)]
    for k in range(1, order):
        out.append(h**k / math.factorial(k) - out[-1])
    return out


def spread(nodes: list[float]) -> float:
    """The longest gap between consecutive nodes over the shortest (1 for evenly spaced nodes)."""
    gaps = [abs(a - b) for a, b in zip(nodes, nodes[1:])]
    return max(gaps) / min(gaps)


SPREAD_LIMIT = 2.0  # below 15 steps, log-σ nodes spaced more evenly than this (longest gap / shortest) stay
SIGMA_ORDER = 4  # from 15 steps, a step in σ is LMS's step of up to this order (history permitting)


def sigma_step(s: list[float], i: int, order: int) -> bool:
    """Whether step i of an exponential integrator extrapolates in σ rather than in log σ.

    A polynomial extrapolates best over evenly spaced nodes: where the step's nodes σ_{i−order+1}, …,
    σ_i, σ_{i+1} are more evenly spaced in σ than in log σ (``spread``), the step is taken in σ. Near
    σ = 0, ε = (x − D)/σ is close to linear in σ (to O(σ³) for Gaussian data) while D approaches x₀
    exponentially in log σ; the tail of an SD3-shift flow grid is even in σ while its log-σ steps grow to
    ~4. On grids of fewer than 15 steps (``DIFFUSERS_LOWER_BELOW``) a step switches only where its log-σ
    spread also exceeds ``SPREAD_LIMIT``: there every switch past the last two flow steps cost accuracy
    (DPM-Solver++(2M) 3× on diffusers' 10-step SD grid), and diffusers' SD grids and all tuned few-step
    grids keep the published algorithms. Karras and exponential grids never switch. First-order steps are
    the same either way (DDIM is Euler in σ).
    """
    if order < 2 or s[i + 1] == 0:
        return False
    nodes = s[i - order + 1:i + 2]
    uneven = spread([math.log(v) for v in nodes])
    limit = 1.0 if fine_grid(s) else SPREAD_LIMIT
    return uneven > limit and spread(nodes) < uneven


def fine_grid(s: list[float]) -> bool:
    """A grid of 15 steps or more (``DIFFUSERS_LOWER_BELOW``), where steps in σ follow the fine-grid rule."""
    return len(s) - 1 >= DIFFUSERS_LOWER_BELOW


def sigma_order(s: list[float], order: int, history: int) -> int:
    """The order of a step in σ: the method's own below 15 steps, else up to ``SIGMA_ORDER`` (LMS's), as the
    ``history`` of d values allows (a higher order on fine grids is what brings the exponential integrators
    to LMS's accuracy on SD3-shift flow grids)."""
    return max(order, min(SIGMA_ORDER, history)) if fine_grid(s) else order


def sigma_weights(v: list[float], r: float) -> list[float]:
    """w_j = r·∫_r^1 ℓ_j(u)/u² du for the Lagrange basis ℓ_j in u = σ/σ_i over the nodes ``v`` (exact).

    D interpolated by the polynomial in σ through the nodes gives x_{i+1} = r·x_i + Σ_j w_j·D_j, from
    d(x/σ)/dσ = −D/σ² with r = σ_{i+1}/σ_i; one node gives DDIM's 1 − r.
    """
    k = len(v)
    moments = [1 - r, -r * math.log(r)] + [r * (1 - r ** (m - 1)) / (m - 1) for m in range(2, k)]
    vander = np.array([[u ** m for u in v] for m in range(k)])  # row m: the m-th powers of the nodes
    return np.linalg.solve(vander, np.array(moments[:k])).tolist()


def dpmpp_step(x: Tensor, s: list[float], i: int, Ds: list[Tensor], order: int) -> Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2 for order 2; k-diffusion's 3M with η = 0 for order 3)."""
    t = [-math.log(v) for v in s[max(i - 2, 0):i + 2]][::-1]  # t_{i+1}, t_i, t_{i−1}, …
    h = t[0] - t[1]
    x = (s[i + 1] / s[i]) * x - math.expm1(-h) * Ds[0]
    if order == 1:
        return x
    phi_2 = math.expm1(-h) / h + 1
    r0 = (t[1] - t[2]) / h
    d1_0 = (Ds[0] - Ds[1]) / r0
    if order == 2:  # the "midpoint" form: D̃ = (1 + 1/2r)·D_i − (1/2r)·D_{i−1}
        return x - 0.5 * math.expm1(-h) * d1_0
    r1 = (t[2] - t[3]) / h
    d1_1 = (Ds[1] - Ds[2]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h - 0.5
    return x + phi_2 * d1 - 2 * phi_3 * d2  # 2·I_2/h²; k-diffusion and diffusers use half (see docs)


def unipc_coeffs(h: float, rks: list[float], order: int, variant: str, corrector: bool) -> list[float]:
    """UniPC weights (Zhao et al. 2023, Alg. 1/2, data prediction) for the differences D1_k.

    ``rks`` are (λ_k − λ_0)/h of the earlier nodes followed by 1; the predictor solves the first
    ``order − 1`` moment conditions, the corrector all ``order`` of them (its last weight multiplies
    D_new − D_0). B(h) = h ("bh1") or e^h − 1 ("bh2"), with hh = −h for data prediction.
    """
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)])
    if corrector:
        return [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
    if order == 1:
        return []
    return [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()


def unipc_update(x: Tensor, s: list[float], i: int, Ds: list[Tensor], order: int, variant: str,
                 D_new: Tensor | None = None, sigma_steps: bool = True) -> Tensor:
    """UniP-p (``D_new`` None) or UniC-p step σ_i → σ_{i+1} from x_i with Ds = [D_i, D_{i−1}, …].

    The corrector recomputes the same step, adding D_new = D(x̃_{i+1}, σ_{i+1}), which the next
    predictor needs anyway: no extra network evaluation. On a step in σ (``sigma_step``; the predictor
    is then Adams–Bashforth in σ) the corrector interpolates D by the polynomial in σ through D_new and
    the predictor's nodes, integrated exactly (``sigma_weights``).
    """
    if D_new is not None and sigma_steps and sigma_step(s, i, order):
        v = [s[i - k] / s[i] for k in range(order)] + [s[i + 1] / s[i]]
        w = sigma_weights(v, s[i + 1] / s[i])
        return s[i + 1] / s[i] * x + sum(c * D for c, D in zip(w, [*Ds[:order], D_new]))
    lam = [-math.log(s[i - k]) for k in range(order)]
    h = -math.log(s[i + 1]) - lam[0]
    rks = [(lam[k] - lam[0]) / h for k in range(1, order)] + [1.0]
    rhos = unipc_coeffs(h, rks, order, variant, corrector=D_new is not None)
    b_h = -h if variant == "bh1" else math.expm1(-h)
    x = (s[i + 1] / s[i]) * x - math.expm1(-h) * Ds[0]
    res = sum(rho * (Ds[k + 1] - Ds[0]) / rks[k] for k, rho in enumerate(rhos[:order - 1]))
    if D_new is not None:
        res = res + rhos[-1] * (D_new - Ds[0])
    return x - b_h * res


def deis_coeffs(s: list[float], i: int, order: int) -> list[float]:
    """Log-ρ DEIS weights (Zhang & Chen 2022; diffusers' ``DEISMultistepScheduler``): ε_{i−j} is
    interpolated by a Lagrange polynomial in log σ and integrated exactly over dσ = e^u du."""
    nodes = [math.log(s[i - k]) for k in range(order)]
    return [lagrange_integral(nodes, j, nodes[0], math.log(s[i + 1]), np.exp) for j in range(order)]


def step_order(order: int, i: int, n: int, lower_order_final: bool) -> int:
    """Order used at step i of n: warm-up from 1, and lowered near the end when ``lower_order_final``."""
    p = min(order, i + 1)
    return min(p, n - i) if lower_order_final else p


DIFFUSERS_LOWER_BELOW = 15  # diffusers' DPM-Solver++ and DEIS lower the final order only below 15 steps


def default_lower_order_final(method: str, n: int, ends_in_zero: bool) -> bool:
    """Whether to lower the order on the last steps by default (on grids ending in 0 only).

    The exponential integrators (2M, 3M, UniPC, DEIS) follow diffusers' documented rule: only on grids of
    fewer than 15 steps. (``UniPCMultistepScheduler``'s code lowers it on every grid; pass
    ``lower_order_final=True`` for its numbers on 15 steps or more. On SD3-shift flow grids, whose last
    interior step spans ~4 in log σ, lowering there made UniPC 1.2–17× less accurate.) LMS and iPNDM keep
    the full order, as k-diffusion's LMS does: on those flow grids lowering made them 1.4–5× less
    accurate (median, ``bench/fewstep.py flow``), on Karras grids it changed little.
    """
    if method in ("lms", "ipndm"):
        return False
    return ends_in_zero and n < DIFFUSERS_LOWER_BELOW


CORRECTION_FEATURES = ("D_i", "D_i-1", "x_i", "D_i-2")  # D_{i−2} where the solver keeps it (``correction_features``)


def check_corrections(corrections, steps: int) -> list[list[float]] | None:
    """Per-step correction weights: ``steps`` rows of at most ``len(CORRECTION_FEATURES)`` finite floats."""
    if corrections is None:
        return None
    rows = [list(map(float, row)) for row in corrections] if isinstance(corrections, (list, tuple)) else None
    if rows is None or len(rows) != steps or any(len(r) > len(CORRECTION_FEATURES) for r in rows) \
            or not all(math.isfinite(v) for r in rows for v in r):
        raise ValueError(f"corrections must be {steps} rows (one per step) of at most {len(CORRECTION_FEATURES)} "
                         f"finite weights {CORRECTION_FEATURES}; got {corrections!r:.200}")
    return rows


def check_input_sigmas(input_sigmas, s: list[float]) -> list[float] | None:
    """The σ given to the network at each step: one positive finite float per step of the grid ``s``."""
    if input_sigmas is None:
        return None
    values = [float(v) for v in input_sigmas] if isinstance(input_sigmas, (list, tuple)) else None
    if values is None or len(values) != len(s) - 1 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"input_sigmas must be {len(s) - 1} positive finite floats (one per step); "
                         f"got {input_sigmas!r:.200}")
    return values


def correction_features(x: Tensor, Ds: list[Tensor]) -> tuple:
    """The features f = (D_i, D_{i−1}, x_i, D_{i−2}) of the fitted per-step term; a D not in the history is None
    (on the first steps, and D_{i−2} with ``dpmpp_2m``, which keeps two D below 15 steps)."""
    return Ds[0], Ds[1] if len(Ds) > 1 else None, x, Ds[2] if len(Ds) > 2 else None


def correction(weights: list[float], x: Tensor, Ds: list[Tensor]) -> Tensor | float:
    """The fitted per-step term Σ w_k·f_k over ``correction_features`` (S4S-style learned coefficients)."""
    return sum(w * f for w, f in zip(weights, correction_features(x, Ds)) if w != 0.0 and f is not None)


def check_order(method: str, order: int | None) -> int:
    """The order to use: ``DEFAULT_ORDER`` when None, else 1 … ``MAX_ORDER[method]``."""
    order = DEFAULT_ORDER[method] if order is None else order
    if int(order) != order or not 1 <= order <= MAX_ORDER[method]:
        raise ValueError(f"order must be an integer in 1..{MAX_ORDER[method]} for {method}, got {order}")
    return int(order)


def multistep_update(method: str, x: Tensor, s: list[float], i: int, Ds: list[Tensor], ds: list[Tensor],
                     order: int, variant: str, in_sigma: bool = False) -> Tensor:
    """The predictor step σ_i → σ_{i+1} of ``method`` at the given order (newest history first).

    ``ds`` holds d = (x − D)/σ, which in these units is also the ε prediction DEIS interpolates. On a
    step in σ (``in_sigma``, decided by ``sigma_step``) an exponential integrator takes the Adams–Bashforth
    step in σ (LMS's weights: ε interpolated by a polynomial in σ) of order ``sigma_order`` over the d
    values given.
    """
    if method == "lms" or in_sigma:
        p = order if method == "lms" else sigma_order(s, order, len(ds))
        return x + sum(c * d for c, d in zip(lms_coeffs(s, i, p), ds))
    if method in ("dpmpp_2m", "dpmpp_3m"):
        return dpmpp_step(x, s, i, Ds, order)
    if method == "unipc":
        return unipc_update(x, s, i, Ds, order, variant)
    if method == "deis":
        return x + sum(c * e for c, e in zip(deis_coeffs(s, i, order), ds))
    step = s[i + 1] - s[i]  # ipndm: equal-step Adams–Bashforth weights
    return x + step * sum(c * d for c, d in zip(IPNDM_COEFFS[order], ds))


class MultistepSolver:
    """The state of a multistep ``method`` along one grid ``s`` (floats): the last D and d values.

    ``step(x, i, denoised)`` advances x_i → x_{i+1} given D(x_i, σ_i); for UniPC, ``correct(i, denoised)``
    first returns the corrected x_i (UniC, reusing that evaluation). Alignment loops that change x or D
    between steps (Newton's constraint steps) call ``step`` with their own x and D.
    """

    def __init__(self, method: str, s: list[float], order: int | None = None, variant: str = "bh2",
                 lower_order_final: bool | None = None, sigma_steps: bool = True,
                 corrections: list[list[float]] | None = None, input_sigmas: list[float] | None = None):
        if method not in MULTISTEP_METHODS:
            raise ValueError(f"method must be one of {', '.join(MULTISTEP_METHODS)}; got {method!r}")
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(UNIPC_VARIANTS)}; got {variant!r}")
        self.method, self.s, self.order, self.variant = method, s, check_order(method, order), variant
        self.lower_order_final = (default_lower_order_final(method, len(s) - 1, s[-1] == 0)
                                  if lower_order_final is None else lower_order_final)
        self.Ds, self.ds, self.x_last, self.p_last = [], [], None, 0
        self.sigma_steps = sigma_steps
        self.corrections = check_corrections(corrections, len(s) - 1)
        self.input_sigmas = check_input_sigmas(input_sigmas, s)

    def model_sigma(self, i: int) -> float:
        """The σ at which step i evaluates the network: ``input_sigmas[i]`` if given, else σ_i."""
        return self.s[i] if self.input_sigmas is None else self.input_sigmas[i]

    def state(self) -> tuple:
        """The history as a flat tuple ``(x_last, p_last, *Ds, *ds)``: the inputs of a pure step (``sampling.grad``)."""
        return (self.x_last, self.p_last, *self.Ds, *self.ds)

    def set_state(self, x_last, p_last, *history) -> None:
        """Restore a history saved by :meth:`state` (before recomputing a step under checkpointing)."""
        k = len(history) // 2
        self.x_last, self.p_last, self.Ds, self.ds = x_last, p_last, list(history[:k]), list(history[k:])

    def correct(self, x: Tensor, i: int, denoised: Tensor) -> Tensor:
        """UniC: x_i corrected with D(x_i, σ_i) (other methods return x unchanged)."""
        if self.method != "unipc" or self.x_last is None:
            return x
        return unipc_update(self.x_last, self.s, i - 1, self.Ds, self.p_last, self.variant, D_new=denoised,
                            sigma_steps=self.sigma_steps)

    def step(self, x: Tensor, i: int, denoised: Tensor) -> Tensor:
        """x_{i+1} from x_i and D(x_i, σ_i); a step to σ = 0 is x = D (full-order LMS/iPNDM steps when
        ``lower_order_final`` is False), plus the fitted ``corrections[i]`` term when there are any."""
        s = self.s
        keep = (SIGMA_ORDER if self.sigma_steps and fine_grid(s) else MAX_ORDER[self.method]) - 1
        self.Ds, self.ds = [denoised] + self.Ds[:keep], [(x - denoised) / s[i]] + self.ds[:keep]
        if s[i + 1] == 0 and (self.lower_order_final or self.method not in ("lms", "ipndm")):
            x_next = denoised
        else:
            p = step_order(self.order, i, len(s) - 1, self.lower_order_final)
            ds = self.ds[:len(s) - 1 - i] if self.lower_order_final else self.ds  # σ steps lower their order too
            in_sigma = self.sigma_steps and self.method not in ("lms", "ipndm") and sigma_step(s, i, p)
            x_next = multistep_update(self.method, x, s, i, self.Ds, ds, p, self.variant, in_sigma)
            fine_sigma_step = in_sigma and fine_grid(s)
            self.x_last, self.p_last = (None, 0) if fine_sigma_step else (x, p)  # UniC leaves LMS's step alone
        return x_next if self.corrections is None else x_next + correction(self.corrections[i], x, self.Ds)


def multistep_odeint(model, x: Tensor, sigmas: Tensor, method: str, *, extra_args: dict, callback=None,
                     disable=None, order: int | None = None, variant: str = "bh2",
                     lower_order_final: bool | None = None, sigma_steps: bool = True,
                     corrections: list[list[float]] | None = None, input_sigmas: list[float] | None = None,
                     grad: str | None = None, grad_last: int | None = None) -> Tensor:
    """Integrate the PF-ODE along ``sigmas`` with a multistep ``method`` (one evaluation per step).

    Args:
        order: the solver's order (default ``DEFAULT_ORDER[method]``; at most ``MAX_ORDER``).
        variant: UniPC's B(h): ``"bh1"`` or ``"bh2"``.
        lower_order_final: lower the order on the last steps (UniPC's rule, min(order, steps left));
            False keeps the full order to the end (k-diffusion's LMS, diffusers' schedulers on long grids).
            None (default) lowers it on grids ending in 0 only, so that a split grid's first part keeps
            full order up to the hand-off, and for the exponential integrators only below 15 steps, as
            diffusers does (``default_lower_order_final``).
        sigma_steps: let the exponential integrators take uneven log-σ steps in σ (``sigma_step``);
            False extrapolates in log σ on every step, as diffusers' schedulers do.
        corrections: per-step weights of D_i, D_{i−1}, x_i, D_{i−2} added to each step (fitted by ``tune_sampler``
            to one grid; ``CORRECTION_FEATURES``).
        input_sigmas: the σ passed to the network at each step instead of σ_i (decoupled time steps, LD3,
            Tong et al. 2024; fitted by ``tune_sampler`` to one grid); the solver still steps along ``sigmas``.
        grad: a ``sampling.grad`` mode; the D history is a checkpoint input (and adjoint state).
    """
    solver = MultistepSolver(method, sigmas.tolist(), order, variant, lower_order_final, sigma_steps, corrections,
                             input_sigmas)

    def step(i, x, *state):
        solver.set_state(*state)
        denoised = model(x, as_sigma(solver.model_sigma(i), x), **extra_args)
        x = solver.correct(x, i, denoised)
        x_next = solver.step(x, i, denoised)
        return x_next, {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}, \
            solver.state()

    return run_steps(step, x, len(sigmas) - 1, state=solver.state(), callback=callback, disable=disable,
                     grad=grad, grad_last=grad_last, model=model, extra_args=extra_args)
