"""Small helpers shared by the samplers: shapes, derivatives, input checks, per-item noise, atomic files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"x has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Convert a denoiser output to a Karras ODE derivative dx/dσ = (x − D)/σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step into a deterministic part to ``sigma_down`` and fresh noise of std ``sigma_up``.

    With ``eta=1`` the Euler step to ``sigma_down`` plus noise ``sigma_up`` is the DDPM posterior
    q(x_{σ_to} | x_{σ_from}, x̂₀); with ``eta=0`` it is the deterministic DDIM / Euler step.
    """
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(torch.as_tensor(sigma_to),
                             eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def as_sigma(sigma, x: Tensor) -> Tensor:
    """Turn a float or a scalar/[B] tensor into the [B] σ tensor a denoiser receives."""
    if isinstance(sigma, (int, float)):
        return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0]).clone()
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a [B]={x.shape[0]} tensor, got shape {tuple(sigma.shape)}")
    return sigma


def check_generator(generator, batch: int) -> None:
    """Fail early unless ``generator`` is None, a ``torch.Generator`` or ``batch`` of them (one per item)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        hint = f" (for a seed use torch.Generator().manual_seed({generator}))" if isinstance(generator, int) else ""
        raise TypeError(f"generator must be None, a torch.Generator or a list of them (one per batch item), "
                        f"got {type(generator).__name__}{hint}")
    if len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators, expected one per batch item "
                         f"({batch})")


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x``.

    Args:
        generator: ``None`` (global RNG), one ``torch.Generator`` for the batch, or a sequence of
            ``x.shape[0]`` generators, one per item, so that an item's noise does not depend on the
            batch it is in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    check_generator(generator, x.shape[0])
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                        for g in generator])


def generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per seed: the per-item form of ``generator=``."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def default_noise_sampler(x: Tensor, generator: Generator = None) -> Callable[[Tensor, Tensor], Tensor]:
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` drawing from ``generator``."""
    return lambda sigma, sigma_next: randn_like(x, generator)


BACKWARD_COST = 1.0  # one backward row through the denoiser, in forward rows (measured: docs/benchmarks.md, NFE rule)


def nfe_summary(forward: int, backward: int = 0, backward_cost: float = BACKWARD_COST, *,
                reward_calls: int = 0, reward_rows: int = 0) -> dict:
    """The one NFE rule: forward rows, backward rows (through the denoiser), and their total in forward rows.

    ``total = forward + backward_cost·backward``; ``BACKWARD_COST`` was measured once on the shipped
    Fashion-MNIST UNet (``bench/newton.py`` prints it again). Reward evaluations are reported beside
    the network's: ``reward_calls`` (calls of the reward function) and ``reward_rows`` (images scored);
    for a VLM or a human they are the cost, so they are never folded into ``total``.
    """
    return {"forward": forward, "backward": backward, "total": float(forward + backward_cost * backward),
            "reward_calls": int(reward_calls), "reward_rows": int(reward_rows)}


class CountingReward:
    """Wraps a reward ``r(x0) -> [B]``, counting its calls and the rows (images) it scored."""

    def __init__(self, reward: Callable):
        self.reward, self.calls, self.rows = reward, 0, 0

    def __call__(self, x0: Tensor, *args, **kwargs):
        self.calls += 1
        self.rows += int(x0.shape[0]) if hasattr(x0, "shape") else len(x0)
        return self.reward(x0, *args, **kwargs)


def check_sigmas(sigmas: Tensor, *, decreasing: bool, name: str = "sigmas", end_zero: bool = True) -> Tensor:
    """Validate a σ grid: 1-D, at least 2 entries, finite, strictly monotone, ending as required.

    Args:
        end_zero: a sampling grid must end in 0; with False it may also end above 0 (a split grid).
    """
    if not isinstance(sigmas, Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"{name} must be finite, got {sigmas.tolist()}")
    diffs = sigmas[1:] - sigmas[:-1]
    if decreasing:
        if not (diffs < 0).all():
            raise ValueError(f"{name} must be strictly decreasing for sampling, got {sigmas.tolist()}")
        if end_zero and (sigmas[-1] != 0 or (sigmas[:-1] <= 0).any()):
            raise ValueError(f"{name} must be positive and end in exactly one 0 (use append_zero), "
                             f"got last value {sigmas[-1].item()}")
        if not end_zero and sigmas[-1] < 0:
            raise ValueError(f"{name} must be positive, with an optional final 0, got last value {sigmas[-1].item()}")
    else:
        if not (diffs > 0).all():
            raise ValueError(f"{name} must be strictly increasing for oderevert, got {sigmas.tolist()}")
        if sigmas[0] <= 0:
            raise ValueError(f"{name} must be > 0 for oderevert (revert_sigmas drops the 0), "
                             f"got first value {sigmas[0].item()}")
    return sigmas


def check_input(x: Tensor, name: str = "x") -> Tensor:
    """Fail early unless ``x`` is a finite floating-point ``[B, ...]`` tensor (1-D: a batch of B scalars)."""
    if isinstance(x, Tensor) and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it first, "
                        f"e.g. {name}.float()")
    check_finite(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    return x


def check_finite(x: Tensor, name: str = "x") -> Tensor:
    """Fail early on NaN or infinite input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN or infinite values")
    return x


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` by ``write(tmp)`` on a temporary file beside it, then an atomic rename.

    Readers see the old file or the new one, never a partial one; the temporary file
    (``.<name>.<pid>.tmp``) is removed if ``write`` or the rename fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def require(module: str, extra: str, needed_by: str):
    """Import the optional ``module``, or fail naming the extra that installs it (not a bare "No module named")."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{needed_by} needs the optional package {module!r}: "
                          f'pip install "kdiff-align[{extra}]"') from None
