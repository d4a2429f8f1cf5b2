"""Inexact-Newton constraint steps: constrained sampling by forward passes only.

Graikos, Jojic & Samaras, "Fast constrained sampling in pre-trained diffusion models" (NeurIPS 2025,
arXiv 2410.18804). To push the denoised estimate x̂₀ = D(x, σ) towards a constraint, move the noisy x
along J·e, where J = ∂D/∂x and e is the error direction in x̂₀ space (e = Aᵀ(y − A x̂₀) for a linear
measurement, −∇L for a loss). J·e is one finite-difference JVP, i.e. one extra forward pass; the step is
normalised to a per-sample ∞-norm λ with λ decaying over the inner iterations (0.5 → 0.1 in the
reference). DPS (Chung et al. 2023; ``align.dps``) uses Jᵀe instead, a backward pass through the network.

A ``residual`` is any callable ``residual(x0_hat) -> e`` of the same shape; ``linear_residual``,
``loss_residual`` and ``vae_residual`` build them from operators (``Mask``, ``Downsample``) and losses
(``masked_mse``, ``gram_style_loss``).
"""
from __future__ import annotations

from numbers import Real
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import trange

from ..cond import cat_kwargs
from ..sampling import is_tuned, ode_step, sde_step
from ..sampling.multistep import MultistepSolver
from ..utils import Generator, append_dims, as_sigma, check_finite, check_sigmas, check_state, nfe_summary

JVP_METHODS = ("fd", "central", "forward_ad")
DIRECTIONS = ("J", "JT", "Jinv")
NORMALIZE = ("inf", "l2", "none")
STEP_SPACES = ("vp", "ve")
# multistep solvers take their history from the post-constraint x̂₀; UniPC is left out (its corrector
# would overwrite the constrained state)
MULTISTEP_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "deis", "lms", "ipndm")
SAMPLERS = ("ddim", "euler", "heun") + MULTISTEP_SAMPLERS


def check_choice(value: str, allowed: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError naming the argument ``name``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product, ``[B]``."""
    return (a * b).flatten(1).sum(1)


def inf_norm(v: Tensor) -> Tensor:
    """Per-sample ∞-norm max |v| over all non-batch dimensions, ``[B]``."""
    return v.flatten(1).abs().amax(1)


def rms(v: Tensor) -> Tensor:
    """Per-sample root-mean-square ‖v‖₂/√n, ``[B]``."""
    return v.flatten(1).pow(2).mean(1).sqrt()


def normalize_step(g: Tensor, normalize: str = "inf") -> Tensor:
    """Scale each sample of g to unit ∞-norm (``"inf"``) or unit RMS (``"l2"``); a zero sample stays zero."""
    check_choice(normalize, NORMALIZE, "normalize")
    if normalize == "none":
        return g
    norm = inf_norm(g) if normalize == "inf" else rms(g)
    scale = torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(norm))
    return g * append_dims(scale, g.ndim)


def _call_stacked(model, points: list[Tensor], sigma: Tensor, extra_args: dict) -> list[Tensor]:
    """D at several points of batch B in one network call (σ and conditioning repeated)."""
    batch = points[0].shape[0]
    if len(points) == 1:
        return [model(points[0], sigma, **extra_args)]
    kwargs = cat_kwargs([extra_args] * len(points), batch) if extra_args else {}
    out = model(torch.cat(points), sigma.repeat(len(points)), **kwargs)
    return list(out.split(batch))


def jvp(model, x: Tensor, sigma, v: Tensor, *, method: str = "fd", h=5e-3, h_mode: str = "inf",
        extra_args: dict | None = None, denoised: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """J·v with J = ∂D(x, σ)/∂x, by finite differences (forward passes only) or forward-mode AD.

    Args:
        method: ``"fd"`` [D(x + δv) − D(x)]/δ (1 call, 2 rows if ``denoised`` is not given), ``"central"``
            [D(x + δv) − D(x − δv)]/2δ (O(δ²) error), ``"forward_ad"`` exact ``torch.func.jvp``.
        h: the finite-difference size, a float or a ``[B]`` tensor.
        h_mode: ``"inf"`` uses δ = h/‖v‖_∞ per sample so the perturbation δv has ∞-norm h (the
            reference's rule); ``"abs"`` uses δ = h.
        denoised: D(x, σ) if already known; it is reused and returned.

    Returns:
        ``(Jv, denoised)``. A sample with v = 0 gets Jv = 0.
    """
    check_choice(method, JVP_METHODS, "method")
    check_choice(h_mode, ("inf", "abs"), "h_mode")
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    extra_args = {} if extra_args is None else extra_args
    sigma = as_sigma(sigma, x)
    if method == "forward_ad":
        denoised, Jv = torch.func.jvp(lambda x_: model(x_, sigma, **extra_args), (x,), (v,))
        return Jv, denoised
    v_norm = inf_norm(v)
    h = torch.as_tensor(h, dtype=x.dtype, device=x.device).expand(x.shape[0])
    delta = h / v_norm.clamp_min(torch.finfo(x.dtype).tiny) if h_mode == "inf" else h
    delta = torch.where(v_norm > 0, delta, h)
    step = append_dims(delta, x.ndim) * v
    points = [x + step] if method == "fd" else [x + step, x - step]
    if denoised is None:
        points.insert(0, x)
    out = _call_stacked(model, points, sigma, extra_args)
    if denoised is None:
        denoised = out.pop(0)
    diff = out[0] - denoised if method == "fd" else (out[0] - out[1]) / 2
    Jv = diff / append_dims(delta, x.ndim)
    return torch.where(append_dims(v_norm > 0, x.ndim), Jv, torch.zeros_like(Jv)), denoised


def vjp(model, x: Tensor, sigma, v: Tensor, *, extra_args: dict | None = None) -> tuple[Tensor, Tensor]:
    """Jᵀ·v by one forward with autograd and one backward pass through the network; returns (Jᵀv, denoised)."""
    extra_args = {} if extra_args is None else extra_args
    with torch.enable_grad():
        x_ = x.detach().requires_grad_()
        denoised = model(x_, as_sigma(sigma, x), **extra_args)
        (JTv,) = torch.autograd.grad(denoised, x_, grad_outputs=v.to(denoised.dtype))
    return JTv, denoised.detach()


def asymmetry(model, x: Tensor, sigma, v: Tensor, *, method: str = "central", h=5e-3,
              extra_args: dict | None = None) -> Tensor:
    """Per-sample ‖Jv − Jᵀv‖/‖Jv‖: 0 for an exact MMSE denoiser (Tweedie: J = Cov[x₀|x]/σ²)."""
    Jv, _ = jvp(model, x, sigma, v, method=method, h=h, extra_args=extra_args)
    JTv, _ = vjp(model, x, sigma, v, extra_args=extra_args)
    return (Jv - JTv).flatten(1).norm(dim=1) / Jv.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)


def jacobian(model, x: Tensor, sigma, *, extra_args: dict | None = None) -> Tensor:
    """The full Jacobian ∂D/∂x of each sample, ``[B, n, n]`` with n = x[0].numel() (small problems only).

    Uses n vectorised backward passes of Σ_b D(x)_b, which holds J_b in its diagonal blocks because batch
    rows are independent (true of any denoiser without batch statistics).
    """
    extra_args = {} if extra_args is None else extra_args
    sigma = as_sigma(sigma, x)
    f = lambda x_: model(x_, sigma, **extra_args).sum(0).flatten()
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True)  # [n_out, B, *shape]
    return jac.reshape(jac.shape[0], x.shape[0], -1).transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# Measurement operators and losses


def broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except RuntimeError:
        return False


class Mask:
    """A x = m ⊙ x for a mask with values in [0, 1] (1 on known entries) broadcastable to x; self-adjoint."""

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if not ((mask >= 0) & (mask <= 1)).all():
            raise ValueError(f"mask values must lie in [0, 1] (1 on known entries), got values from "
                             f"{mask.min().item()} to {mask.max().item()}")
        self.mask = mask

    def __call__(self, x: Tensor) -> Tensor:
        if not broadcasts_to(self.mask.shape, x.shape):
            raise ValueError(f"mask of shape {tuple(self.mask.shape)} does not broadcast to x of shape "
                             f"{tuple(x.shape)}; give a mask of x's shape, or with 1 on axes to share")
        return self.mask.to(x) * x

    def T(self, y: Tensor) -> Tensor:
        return self(y)


class Downsample:
    """Downsampling of ``[B, C, H, W]`` images by an integer factor, with its exact adjoint ``T``.

    Args:
        kernel: ``"avg"`` (f×f average pooling; Aᵀ spreads each value over its block divided by f²) or
            ``"bicubic"`` (``F.interpolate`` with ``antialias``; Aᵀ is the VJP of this linear map).
    """

    def __init__(self, factor: int, kernel: str = "avg", antialias: bool = True):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        self.factor, self.kernel = int(factor), check_choice(kernel, ("avg", "bicubic"), "kernel")
        self.antialias = antialias

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"x must be [B, C, H, W] with H, W divisible by {self.factor}, got {tuple(x.shape)}")
        if self.kernel == "avg":
            return F.avg_pool2d(x, self.factor)
        size = (x.shape[-2] // self.factor, x.shape[-1] // self.factor)
        return F.interpolate(x, size=size, mode="bicubic", antialias=self.antialias, align_corners=False)

    def T(self, y: Tensor) -> Tensor:
        f = self.factor
        if self.kernel == "avg":
            return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / f**2
        shape = (*y.shape[:-2], y.shape[-2] * f, y.shape[-1] * f)
        _, pullback = torch.func.vjp(self, torch.zeros(shape, dtype=y.dtype, device=y.device))
        return pullback(y)[0]


def masked_mse(mask: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """loss(x) = Σ m ⊙ (x − y)² per sample, ``[B]``."""
    return lambda x: (mask.to(x) * (x - y.to(x)) ** 2).flatten(1).sum(1)


def gram(features: Tensor) -> Tensor:
    """Gram matrix FᵀF/N of ``[B, N, C]`` tokens or ``[B, C, H, W]`` maps (N = tokens or pixels), ``[B, C, C]``."""
    if features.ndim == 4:
        features = features.flatten(2).transpose(1, 2)
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, C] or [B, C, H, W], got {tuple(features.shape)}")
    return features.transpose(1, 2) @ features / features.shape[1]


def gram_style_loss(features: Callable[[Tensor], Tensor], reference: Tensor) -> Callable[[Tensor], Tensor]:
    """loss(x) = ‖G(features(x)) − G(features(reference))‖_F per sample (the paper's style constraint).

    ``features`` is any differentiable extractor, e.g. a CLIP vision tower's early hidden state
    (``lambda x: clip(pixel_values=prep(x), output_hidden_states=True).hidden_states[3][:, 1:]``).
    """
    with torch.no_grad():
        g_ref = gram(features(reference))
    return lambda x: (gram(features(x)) - g_ref.to(x)).flatten(1).norm(dim=1)


# --------------------------------------------------------------------------------------------------
# Residuals e(x̂₀)


class LinearResidual:
    """e = Aᵀ(y − A x̂₀), with ``measurement(x̂₀) = y − A x̂₀`` (DPS normalises its step by ‖y − A x̂₀‖)."""

    def __init__(self, op, y: Tensor):
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor (the measurement), got {type(y).__name__}")
        self.op, self.y = op, y

    def measurement(self, x0: Tensor) -> Tensor:
        a_x0 = self.op(x0)
        if not broadcasts_to(self.y.shape, a_x0.shape):
            raise ValueError(f"y of shape {tuple(self.y.shape)} does not match A x̂₀ of shape {tuple(a_x0.shape)}: "
                             f"y's batch must be 1 or the batch of x ({x0.shape[0]}), its other axes A x̂₀'s")
        return self.y.to(x0) - a_x0

    def __call__(self, x0: Tensor) -> Tensor:
        return self.op.T(self.measurement(x0))


def linear_residual(op, y: Tensor) -> LinearResidual:
    """e = Aᵀ(y − A x̂₀) for a linear operator with adjoint ``op.T`` (e.g. ``Mask``, ``Downsample``)."""
    return LinearResidual(op, y)


def loss_residual(loss: Callable[[Tensor], Tensor], *, decode: Callable | None = None) -> Callable[[Tensor], Tensor]:
    """e = −∇_{x̂₀} Σ loss(decode(x̂₀)), by autograd through ``loss`` (and ``decode``) only, never the denoiser."""
    def residual(x0: Tensor) -> Tensor:
        with torch.enable_grad():
            x0_ = x0.detach().requires_grad_()
            value = loss(decode(x0_) if decode is not None else x0_)
            (grad,) = torch.autograd.grad(value.sum(), x0_)
        return -grad
    return residual


def vae_residual(op, y: Tensor, decode: Callable, encode: Callable, *, mode: str = "encoder_fd",
                 h: float = 5e-3) -> Callable[[Tensor], Tensor]:
    """Latent error direction for a pixel-space linear constraint A(Dec(z)) = y.

    Args:
        mode: ``"encoder_fd"`` (the ZoomLDM trick; no backward pass anywhere):
            e_pix = Aᵀ(y − A Dec(ẑ₀)) normalised to ∞-norm 1, then e = [Enc(x̃ + h·e_pix) − Enc(x̃)]/h with
            x̃ = Dec(ẑ₀), both encodings in one batched call, using J_Enc ≈ J_Dec⁻¹. ``"backprop"``:
            e = J_Decᵀ Aᵀ(y − A Dec(ẑ₀)) by autograd through the decoder.
        encode: a deterministic encoder (the posterior mean, not a sample).
    """
    check_choice(mode, ("encoder_fd", "backprop"), "mode")
    if mode == "backprop":
        return loss_residual(lambda x: 0.5 * (y.to(x) - op(x)).pow(2).flatten(1).sum(1), decode=decode)

    def residual(z0: Tensor) -> Tensor:
        x_pix = decode(z0)
        e_pix = normalize_step(op.T(y.to(x_pix) - op(x_pix)), "inf")
        z_base, z_moved = encode(torch.cat([x_pix, x_pix + h * e_pix])).chunk(2)
        return (z_moved - z_base) / h
    return residual


# --------------------------------------------------------------------------------------------------
# The Newton step and the constrained sampler


def check_lr(lr) -> None:
    """Fail early unless ``lr`` is a number, a ``(start, end)`` tuple, a list of numbers or a callable."""
    number = lambda v: isinstance(v, Real) and not isinstance(v, bool)  # noqa: E731
    if callable(lr) or number(lr) or (isinstance(lr, (tuple, list)) and all(number(v) for v in lr)):
        return
    raise TypeError(f"lr must be a number, a (start, end) tuple, a list of n_iter numbers or a callable "
                    f"lr(k, sigma), got {type(lr).__name__} {lr!r}")


def lr_schedule(lr, n_iter: int, sigma: float | None = None) -> list[float]:
    """Per-iteration λ_k: a number (constant), a tuple ``(start, end)`` (linspace over ``n_iter``: the
    reference's ``np.linspace(0.5, 0.1, 5)`` is ``(0.5, 0.1)``), a list of ``n_iter`` values, or
    ``lr(k, sigma)``."""
    check_lr(lr)
    if callable(lr):
        return [float(lr(k, sigma)) for k in range(n_iter)]
    if isinstance(lr, tuple):
        if len(lr) != 2:
            raise ValueError(f"a tuple lr is (start, end), got {lr}")
        return torch.linspace(float(lr[0]), float(lr[1]), n_iter, dtype=torch.float64).tolist() if n_iter > 1 \
            else [float(lr[0])]
    if isinstance(lr, list):
        if len(lr) != n_iter:
            raise ValueError(f"a list lr needs n_iter={n_iter} values, got {len(lr)}")
        return [float(v) for v in lr]
    return [float(lr)] * n_iter


def _cg(matvec: Callable[[Tensor], Tensor], e: Tensor, iters: int) -> Tensor:
    """Per-sample conjugate gradients for J g = e (J symmetric PSD; a sample stops where pᵀJp ≤ 0)."""
    tiny = torch.finfo(e.dtype).tiny
    g, r = torch.zeros_like(e), e.clone()
    p, rr = r.clone(), _dot(r, r)
    active = rr > 0
    for _ in range(iters):
        Jp = matvec(p)
        pJp = _dot(p, Jp)
        active = active & (pJp > 0)
        alpha = torch.where(active, rr / pJp.clamp_min(tiny), torch.zeros_like(rr))
        g, r = g + append_dims(alpha, e.ndim) * p, r - append_dims(alpha, e.ndim) * Jp
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p, rr = r + append_dims(beta, e.ndim) * p, rr_new
    return g


def check_residual(e, x0: Tensor) -> Tensor:
    """What ``residual(x0_hat)`` returned, checked: a finite tensor of x̂₀'s shape."""
    if not isinstance(e, Tensor) or e.shape != x0.shape:
        raise ValueError(f"residual(x0_hat) must return a tensor of shape {tuple(x0.shape)}, "
                         f"got {getattr(e, 'shape', type(e).__name__)}")
    return check_finite(e.to(x0.dtype), "residual(x0_hat)")


def counting(model, counts: dict) -> Callable:
    """``model``, adding the rows it evaluates to ``counts["forward"]`` (the NFE rule counts rows, not calls)."""
    def call(x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        counts["forward"] += x.shape[0]
        return model(x, sigma, **kwargs)
    return call


@torch.no_grad()
def newton_step(model, x: Tensor, sigma, residual: Callable[[Tensor], Tensor], *, n_iter: int = 5, lr=(0.5, 0.1),
                h: float = 5e-3, normalize: str = "inf", direction: str = "J", step_space: str = "vp",
                tol: float | None = None, jvp_method: str = "fd", cg_iters: int = 10,
                extra_args: dict | None = None, denoised: Tensor | None = None, return_info: bool = False,
                sigma_data: float = 1.0):
    """K inexact-Newton iterations x ← x + λ_k·normalize(J·e) at fixed σ, e = residual(D(x, σ)).

    Each iteration costs 2 evaluations per sample with ``direction="J"`` and ``jvp_method="fd"`` (the JVP
    and D at the moved x, which the next iteration and the caller reuse), so n_iter = K costs exactly 2K
    (+1 if ``denoised`` is None); ``"central"`` costs 3 per iteration (two JVP points), ``"JT"`` 2 forward
    and 1 backward, ``"Jinv"`` ``cg_iters`` JVPs + 1. ``info["nfe"]`` counts them (``utils.nfe_summary``).

    Args:
        lr: λ schedule, see ``lr_schedule``; ``(0.5, 0.1)`` with K = 5 is the reference's 0.5, 0.4, …, 0.1.
        normalize: ``"inf"`` (per-sample ∞-norm, the reference), ``"l2"`` (unit RMS) or ``"none"``
            (x ← x + λ·J e: λ is a plain step size).
        direction: ``"J"`` (inexact Newton, FD JVP), ``"JT"`` (gradient descent: Jᵀe by a backward pass,
            1 call + 1 backward) or ``"Jinv"`` (Newton, J⁻¹e by ``cg_iters`` CG iterations of FD matvecs,
            1 + ``cg_iters`` calls; for small problems).
        step_space: ``"vp"`` measures λ and h in x_t = x/√(1 + σ²) units as the reference does (an ∞-norm
            step λ here is λ·√(1 + σ²) in x); ``"ve"`` applies them to x directly.
        tol: samples whose residual RMS is ≤ tol stop moving; iterations stop when all have.
        denoised: D(x, σ) if known (saves one call).

        sigma_data: the data's RMS scale for ``utils.check_state``: x after every iteration must keep its
            per-item RMS within ``DIVERGENCE_C``·√(σ² + σ_data²), or a ``DivergedError`` names the iteration.

    Returns:
        ``(x, denoised)`` with denoised = D(x, σ) at the returned x, or ``(x, denoised, info)`` where info
        has ``residual`` ``[B, K + 1]`` (RMS of e before each iteration and at the end), ``lr`` and ``nfe``:
        forward and backward evaluations per sample (rows counted ÷ B) and their total, by the NFE rule.
    """
    check_choice(direction, DIRECTIONS, "direction")
    check_choice(step_space, STEP_SPACES, "step_space")
    check_choice(normalize, NORMALIZE, "normalize")
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter}")
    if not callable(residual):
        raise TypeError(f"residual must be a callable x0_hat -> e, got {type(residual).__name__}")
    extra_args = {} if extra_args is None else extra_args
    sigma = as_sigma(sigma, x)
    counts = {"forward": 0, "backward": 0}
    model = counting(model, counts)
    if denoised is None:
        denoised = model(x, sigma, **extra_args)
    scale = (1 + sigma**2).sqrt() if step_space == "vp" else torch.ones_like(sigma)
    lrs, history = lr_schedule(lr, n_iter, float(sigma.max())), []
    for k in range(n_iter):
        e = check_residual(residual(denoised), denoised)
        history.append(rms(e))
        active = history[-1] > tol if tol is not None else torch.ones_like(sigma, dtype=torch.bool)
        if not active.any():
            break
        if direction == "J":
            g, _ = jvp(model, x, sigma, e, method=jvp_method, h=h * scale, extra_args=extra_args, denoised=denoised)
        elif direction == "JT":
            g, _ = vjp(model, x, sigma, e, extra_args=extra_args)
            counts["backward"] += x.shape[0]
        else:
            matvec = lambda p: jvp(model, x, sigma, p, method=jvp_method, h=h * scale, extra_args=extra_args,
                                   denoised=denoised)[0]
            g = _cg(matvec, e, cg_iters)
        if normalize == "none":  # J_t = ∂x̂₀/∂x_t = J·√(1+σ²); Newton's J_t⁻¹e is J⁻¹e/√(1+σ²)
            step = g * append_dims(scale ** (2 if direction != "Jinv" else 0), x.ndim)
        else:
            step = normalize_step(g, normalize) * append_dims(scale, x.ndim)
        x = x + lrs[k] * append_dims(active.to(x.dtype), x.ndim) * step
        check_state(x, sigma, step=f"{k} of the Newton iterations", sigma_data=sigma_data,
                    setting="the constraint step is too large: use a smaller lr, normalize='inf' or fewer iterations")
        denoised = model(x, sigma, **extra_args)
    if not return_info:
        return x, denoised
    history.append(rms(check_residual(residual(denoised), denoised)))
    nfe = nfe_summary(counts["forward"] // x.shape[0], counts["backward"] // x.shape[0])
    return x, denoised, {"residual": torch.stack(history, 1), "nfe": nfe, "lr": lrs[:len(history) - 1]}


def in_window(window, sigma: float) -> bool:
    """Whether the constraint acts at ``sigma``: ``window`` is None (always), (lo, hi) or a predicate."""
    if window is None:
        return True
    if callable(window):
        return bool(window(sigma))
    lo, hi = window
    return lo <= sigma <= hi


def check_window(window, sigmas: Tensor) -> None:
    """Fail early unless ``window`` is None, a predicate or ``(sigma_lo, sigma_hi)`` with lo ≤ hi, and
    selects at least one step σ_i (i < n) of ``sigmas``."""
    if window is None:
        return
    if not callable(window):
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(v, Real) and not isinstance(v, bool) for v in window)):
            raise TypeError(f"window must be None, (sigma_lo, sigma_hi) or a callable sigma -> bool, got {window!r}")
        if not window[0] <= window[1]:
            raise ValueError(f"window=(sigma_lo, sigma_hi) needs sigma_lo <= sigma_hi, got {tuple(window)}")
    steps = sigmas[:-1].tolist()
    if not any(in_window(window, sigma) for sigma in steps):
        raise ValueError(f"window={window!r} selects no step of sigmas (steps at σ = {steps[0]:.4g} down to "
                         f"{steps[-1]:.4g}): the constraint would never act")


def solver_step(model, x, sigma, sigma_next, denoised, sampler, eta, extra_args, generator, i=0):
    """One update from the (post-constraint) denoised, reusing the core step functions (``sampler`` is
    a name or a ``MultistepSolver`` over the grid)."""
    if isinstance(sampler, MultistepSolver):
        return sampler.step(x, i, denoised)
    if sampler == "ddim":
        return sde_step(model, x, sigma, sigma_next, extra_args=extra_args, eta=eta, generator=generator,
                        denoised=denoised)[0]
    return ode_step(model, x, sigma, sigma_next, extra_args=extra_args, method=sampler, denoised=denoised)[0]


def check_sampler_inputs(model, x, sigmas, residual, sampler, eta, extra_args) -> dict:
    """The shared argument checks of ``sample_constrained`` and ``dps.sample_dps``; returns ``extra_args`` or {}."""
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser D(x, sigma, **extra_args), got {type(model).__name__}")
    if not callable(residual):
        raise TypeError(f"residual must be a callable x0_hat -> e, got {type(residual).__name__}")
    check_finite(x, "x")
    check_sigmas(sigmas, decreasing=True)
    check_choice(sampler, SAMPLERS, "sampler")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return {} if extra_args is None else extra_args


@torch.no_grad()
def sample_constrained(model, x: Tensor, sigmas: Tensor, residual: Callable[[Tensor], Tensor], *,
                       sampler: str = "ddim", eta: float = 0.16, window=None, n_iter: int = 5, lr=(0.5, 0.1),
                       h: float = 5e-3, normalize: str = "inf", direction: str = "J", step_space: str = "vp",
                       tol: float | None = None, jvp_method: str = "fd", cg_iters: int = 10,
                       extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None,
                       generator: Generator = None, return_info: bool = False, sigma_data: float = 1.0):
    """Sample with inexact-Newton constraint steps inside a σ-window (Graikos et al. 2024, Alg. 1).

    At each σ_i in the window, ``newton_step`` moves x towards the constraint and the solver update is
    built from the post-constraint x̂₀ (no extra call). The final output is x̂₀ at the last σ > 0.
    ``n_iter, lr, h, normalize, direction, step_space, tol, jvp_method, cg_iters`` are passed to
    ``newton_step``.

    Args:
        sampler: ``"ddim"`` (ancestral kernel with ``eta``; the reference's single-step-β noise is
            η ≈ 0.16), ``"euler"``, ``"heun"`` or a multistep PF-ODE solver (``"dpmpp_2m"``,
            ``"dpmpp_3m"``, ``"deis"``, ``"lms"``, ``"ipndm"``; one evaluation per step, with the
            post-constraint x̂₀ as their history), or a ``TunedSampler``: its solver on its grid, without its
            fitted corrections and input σ values (they pull towards the unconstrained teacher, against the
            constraint).
        window: ``None`` (every step, as the reference), ``(sigma_lo, sigma_hi)`` or ``callable(sigma) -> bool``;
            one that selects no step σ_i of the grid is rejected (``check_window``).
        sigma_data: the data's RMS scale for ``utils.check_state`` after every Newton iteration and solver
            step (a ``DivergedError`` names the step, σ and the setting to change).

    Returns:
        x, or ``(x, info)`` with ``info["residual"]`` ``[B, steps]`` (RMS of e after each step's
        constraint, NaN outside the window) and ``info["nfe"]``: forward and backward evaluations per
        sample, counted, and their total by the NFE rule (``utils.nfe_summary``).
    """
    if is_tuned(sampler):  # a TunedSampler: its solver on its grid
        sigmas, sampler = sampler.along(sigmas), sampler.method
    extra_args = check_sampler_inputs(model, x, sigmas, residual, sampler, eta, extra_args)
    check_window(window, sigmas)
    check_lr(lr)
    # lowered final orders: the last step is x = x̂₀ (post-constraint) for every multistep solver
    stepper = (MultistepSolver(sampler, sigmas.tolist(), lower_order_final=True) if sampler in MULTISTEP_SAMPLERS
               else sampler)
    counts, history = {"forward": 0, "backward": 0}, []
    net = counting(model, counts)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = as_sigma(sigmas[i], x)
        denoised = net(x, sigma, **extra_args)
        res = torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
        if in_window(window, float(sigmas[i])):
            x, denoised, info = newton_step(
                net, x, sigma, residual, n_iter=n_iter, lr=lr, h=h, normalize=normalize, direction=direction,
                step_space=step_space, tol=tol, jvp_method=jvp_method, cg_iters=cg_iters, extra_args=extra_args,
                denoised=denoised, return_info=True, sigma_data=sigma_data)
            counts["backward"] += info["nfe"]["backward"] * x.shape[0]
            res = info["residual"][:, -1]
        history.append(res)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = solver_step(net, x, sigma, sigmas[i + 1], denoised, stepper, eta, extra_args, generator, i)
        check_state(x, sigmas[i + 1], step=i, sigma_data=sigma_data,
                    setting="the constrained steps diverged: use a smaller lr, fewer n_iter or more steps")
    if not return_info:
        return x
    nfe = nfe_summary(counts["forward"] // x.shape[0], counts["backward"] // x.shape[0])
    return x, {"residual": torch.stack(history, 1), "nfe": nfe}
