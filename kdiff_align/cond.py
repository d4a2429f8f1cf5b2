"""Multi-prompt classifier-free guidance as a denoiser wrapper: one network call for all branches.

A condition is the Sampling Demon seed's dict ``{"prompts": [...], "cfgs": [...]}`` (one weight per
prompt) or a list of such dicts, one per batch item. The guided denoiser is
D = D_u + Σ_i w_i·(D_i − D_u) (Ho & Salimans 2022; composed prompts as in Liu et al. 2022).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Sequence

import torch
from torch import Tensor

from .utils import append_dims

Condition = dict | Sequence[dict]


def parse_condition(condition: Condition, batch_size: int | None = None) -> list[tuple[list[str], list[float]]]:
    """Validate a condition and return one ``(prompts, cfgs)`` pair per item (one pair if shared)."""
    if isinstance(condition, str) or not isinstance(condition, (dict, Sequence)):
        raise ValueError(f"condition must be a dict {{'prompts': [...], 'cfgs': [...]}} or a list of them, got "
                         f"{type(condition).__name__} {condition!r:.60}; for one prompt write "
                         "{'prompts': [prompt], 'cfgs': [weight]}")
    items = [condition] if isinstance(condition, dict) else list(condition)
    if not items:
        raise ValueError("condition must be a dict {'prompts': [...], 'cfgs': [...]} or a non-empty list of them")
    if batch_size is not None and len(items) not in (1, batch_size):
        raise ValueError(f"condition is a list of {len(items)} dicts but the batch has {batch_size} items")
    parsed = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"prompts", "cfgs"}:
            raise ValueError(f"each condition must be a dict with exactly the keys 'prompts' and 'cfgs', got {item!r}")
        prompts, cfgs = item["prompts"], item["cfgs"]
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise ValueError(f"condition['prompts'] must be a non-empty list of strings, got {prompts!r}")
        if isinstance(cfgs, Real) or not all(isinstance(w, Real) for w in cfgs):
            raise ValueError(f"condition['cfgs'] must be a list of numbers, got {cfgs!r}")
        if not all(math.isfinite(w) for w in cfgs):
            raise ValueError(f"condition['cfgs'] must be finite guidance weights, got {cfgs!r}")
        if len(prompts) != len(cfgs):
            raise ValueError(f"condition has {len(prompts)} prompts but {len(cfgs)} cfgs; give one weight per prompt")
        parsed.append((list(prompts), [float(w) for w in cfgs]))
    return parsed


def cat_kwargs(branches: Sequence[dict], batch_size: int) -> dict:
    """Concatenate conditioning keyword arguments of several branches on the batch axis.

    Tensors of batch 1 are broadcast to ``batch_size``; nested dicts (SDXL's ``added_cond_kwargs``) are
    concatenated key by key; other values must agree across branches and are passed once.
    """
    out = {}
    for key in branches[0]:
        values = [branch[key] for branch in branches]
        if isinstance(values[0], Tensor):
            out[key] = torch.cat([_expand_batch(v, batch_size, key) for v in values])
        elif isinstance(values[0], dict):
            out[key] = cat_kwargs(values, batch_size)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"conditioning argument {key!r} is not a tensor and differs between branches")
    return out


def _expand_batch(t: Tensor, batch_size: int, name: str) -> Tensor:
    if t.shape[0] == batch_size:
        return t
    if t.shape[0] == 1:
        return t.expand(batch_size, *t.shape[1:])
    raise ValueError(f"conditioning tensor {name!r} has batch {t.shape[0]}, expected 1 or {batch_size} (the batch of x)")


def slice_kwargs(kwargs: dict, rows: slice) -> dict:
    """Rows ``rows`` of every tensor in a (nested) kwargs dict."""
    return {k: v[rows] if isinstance(v, Tensor) else slice_kwargs(v, rows) if isinstance(v, dict) else v
            for k, v in kwargs.items()}


def broadcast_kwargs(kwargs: dict, rows: int) -> dict:
    """Every batch-1 tensor of a (nested) kwargs dict expanded to ``rows`` rows, so it can be sliced by rows."""
    def expand(v):
        if isinstance(v, dict):
            return broadcast_kwargs(v, rows)
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == 1 and rows != 1:
            return v.expand(rows, *v.shape[1:])
        return v
    return {k: expand(v) for k, v in kwargs.items()}


def batched_call(model, x: Tensor, sigma: Tensor, kwargs: dict, max_batch: int | None = None) -> Tensor:
    """``model(x, sigma, **kwargs)`` in as few calls as ``max_batch`` rows allow (one if ``None``).

    Batch-1 conditioning tensors are broadcast to the rows of ``x`` before the rows are split.
    """
    if max_batch is None or x.shape[0] <= max_batch:
        return model(x, sigma, **kwargs)
    kwargs = broadcast_kwargs(kwargs, x.shape[0])
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    return torch.cat([model(x[i:i + max_batch], sigma[i:i + max_batch], **slice_kwargs(kwargs, slice(i, i + max_batch)))
                      for i in range(0, x.shape[0], max_batch)])


def cfg_denoiser(model, conds: Sequence[dict], uncond: dict, weights, *, max_batch: int | None = None) -> Callable:
    """Multi-prompt CFG denoiser D = D_u + Σ_i w_i (D_i − D_u), batching all P + 1 branches in one call.

    Args:
        conds: P dicts of conditioning keyword tensors, each of batch B (or 1, broadcast).
        uncond: the unconditional branch's dict, same keys.
        weights: P floats, or a ``[B, P]`` tensor of per-item weights.
        max_batch: split the ``(P + 1)·B`` rows into calls of at most this many rows.
    """
    conds = list(conds)
    if not conds:
        raise ValueError("conds must hold at least one condition dict")
    if any(set(c) != set(uncond) for c in conds):
        raise ValueError(f"every cond must have the same keys as uncond ({sorted(uncond)})")
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape[-1:] != (len(conds),) or weights.ndim not in (1, 2):
        raise ValueError(f"weights must be {len(conds)} floats or a [B, {len(conds)}] tensor, got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"weights must be finite guidance weights, got {weights.tolist()}")

    cache = {}  # batch size -> (concatenated kwargs, weights shaped for broadcasting), when no extra_args

    def prepare(x: Tensor, extra_args: dict):
        batch = x.shape[0]
        if weights.ndim == 2 and weights.shape[0] != batch:
            raise ValueError(f"weights has {weights.shape[0]} rows (one per condition, i.e. per batch item) but x has "
                             f"batch {batch}: give one condition per batch item, or one for the whole batch")
        kwargs = cat_kwargs([{**extra_args, **branch} for branch in [uncond, *conds]], batch)
        w = weights.to(x.device, x.dtype)
        return kwargs, append_dims(w.T if w.ndim == 2 else w[:, None].expand(-1, batch), x.ndim + 1)

    def denoiser(x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        batch, n_branch = x.shape[0], len(conds) + 1
        key = (batch, x.dtype, x.device)
        if extra_args:
            kwargs, w = prepare(x, extra_args)
        else:
            if key not in cache:
                cache[key] = prepare(x, {})
            kwargs, w = cache[key]
        x_cat = x.repeat(n_branch, *[1] * (x.ndim - 1))
        out = batched_call(model, x_cat, sigma.repeat(n_branch), kwargs, max_batch)
        d_u, d_c = out[:batch], out[batch:].view(len(conds), *x.shape)
        return d_u + (w * (d_c - d_u)).sum(0)

    return denoiser


def condition_denoiser(model, condition: Condition, encode: Callable[[list[str]], dict], *,
                       max_batch: int | None = None, batch_size: int | None = None) -> Callable:
    """Guided denoiser for a ``{"prompts", "cfgs"}`` condition (or one per item) in one call per step.

    Args:
        encode: maps a list of prompts to a dict of conditioning tensors with one row per prompt;
            the empty prompt ``""`` must give the unconditional embedding.
        batch_size: if given, a list of conditions must hold 1 or ``batch_size`` dicts (checked here).

    Items with fewer prompts than others are padded with the unconditional prompt at weight 0.
    """
    parsed = parse_condition(condition, batch_size)
    n_prompts = max(len(prompts) for prompts, _ in parsed)
    padded = [(prompts + [""] * (n_prompts - len(prompts)), cfgs + [0.0] * (n_prompts - len(cfgs)))
              for prompts, cfgs in parsed]
    unique = sorted({""} | {p for prompts, _ in padded for p in prompts})
    table = encode(unique)
    rows = lambda names: slice_kwargs(table, [unique.index(n) for n in names])  # noqa: E731
    conds = [rows([prompts[i] for prompts, _ in padded]) for i in range(n_prompts)]
    uncond = rows([""] * len(padded))
    weights = torch.tensor([cfgs for _, cfgs in padded])
    shared = len(padded) == 1
    return cfg_denoiser(model, conds, uncond, weights[0] if shared else weights, max_batch=max_batch)
