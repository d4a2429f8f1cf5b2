"""Gradients through the integrators: unrolled, checkpointed or discrete-adjoint, over all steps or the last K.

Every integrator loop is written as a pure step ``step(i, x, *state) -> (x_next, info, state_next)``
around the shared step functions (``ode_step``, ``sde_step``, the multistep and SDE-family updates):
``state`` holds the solver's history (earlier D values), ``info`` the callback's keys. :func:`run_steps`
drives such a step with no graph (``grad=None``), with autograd through the unrolled loop (``"full"``),
with per-step activation checkpointing (``"checkpoint"``: the history is a checkpoint input), or with
the discrete adjoint (``"adjoint"``: a state-only forward, then one vector–Jacobian product per step
walking back). Noise an SDE step uses is drawn once per path (:func:`fixed_noise`), so recomputation
reuses it and the gradient is the pathwise one. See ``docs/gradients.md``.
"""
from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

GRAD_MODES = ("full", "checkpoint", "adjoint")


def check_grad(grad, grad_last, adaptive: bool = False) -> None:
    """Fail early on a ``grad`` mode or ``grad_last`` the integrators do not know."""
    if grad is not None and grad not in GRAD_MODES:
        raise ValueError(f"grad must be None or one of {', '.join(map(repr, GRAD_MODES))}; got {grad!r}")
    if grad_last is not None:
        if isinstance(grad_last, bool) or not isinstance(grad_last, int) or grad_last < 1:
            raise ValueError(f"grad_last must be a positive int (backpropagate through the last K steps), "
                             f"got {grad_last!r}")
        if grad is None:
            raise ValueError("grad_last needs a grad mode: grad='full', 'checkpoint' or 'adjoint'")
    if adaptive and (grad == "checkpoint" or grad_last is not None):
        raise ValueError("the adaptive methods take grad='full' or 'adjoint' (torchdiffeq's odeint_adjoint), "
                         "without grad_last; use a fixed-grid or multistep method for 'checkpoint' or grad_last")


def grad_context(grad):
    """``torch.no_grad()`` for ``grad=None`` (today's samplers), ``torch.enable_grad()`` otherwise."""
    return torch.no_grad() if grad is None else torch.enable_grad()


def grad_inputs(model, extra_args: dict) -> list[Tensor]:
    """The tensors an adjoint differentiates besides x: the model's parameters and ``extra_args`` tensors
    that require grad (nested lists and dicts included)."""
    while not isinstance(model, torch.nn.Module) and hasattr(model, "__wrapped__"):
        model = model.__wrapped__
    found = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    stack = list(extra_args.values())
    while stack:
        v = stack.pop()
        if isinstance(v, Tensor) and v.requires_grad:
            found.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return list({id(t): t for t in found}.values())


def fixed_noise(noise_sampler: Callable) -> Callable:
    """``noise_sampler(sigma, sigma_next)`` that draws once per (σ, σ_next) and replays the draw afterwards,
    so a recomputed step (checkpoint, adjoint) sees the noise of the forward pass."""
    drawn: dict[tuple[float, float], Tensor] = {}

    def noise(sigma, sigma_next) -> Tensor:
        key = (float(sigma), float(sigma_next))
        if key not in drawn:
            drawn[key] = noise_sampler(sigma, sigma_next)
        return drawn[key]

    return noise


def _unrolled(step, x, state, steps, emit):
    for i in steps:
        x, info, state = step(i, x, *state)
        emit(info)
    return x, state


def run_steps(step: Callable, x: Tensor, n: int, *, state: tuple = (), callback: Callable | None = None,
              disable: bool | None = None, grad: str | None = None, grad_last: int | None = None,
              model=None, extra_args: dict | None = None) -> Tensor:
    """Run ``n`` pure steps ``step(i, x, *state) -> (x_next, info, state_next)`` in a ``grad`` mode.

    Args:
        grad: None (no graph), "full", "checkpoint" or "adjoint" (see the module docstring).
        grad_last: differentiate only the last K steps (DRaFT-K); earlier steps run without a graph,
            so nothing flows to x before them.
        model: the denoiser, whose parameters the adjoint differentiates (with ``extra_args`` tensors).
    """
    start = n if grad is None else max(n - (grad_last or n), 0)
    with tqdm(total=n, disable=disable) as pbar:
        def emit(info):
            if callback is not None:
                callback({k: v.detach() if isinstance(v, Tensor) else v for k, v in info.items()})
            pbar.update(1)

        with torch.no_grad():
            x, state = _unrolled(step, x, state, range(start), emit)
        if start == n:
            return x
        if grad == "adjoint":
            params = grad_inputs(model, extra_args or {})
            return _DiscreteAdjoint.apply((step, state, range(start, n), emit, params), x, *params)
        # no RNG snapshot per step (5 KB each on CPU): steps draw no noise (fixed_noise), and the denoiser
        # must be deterministic (eval mode) for checkpoint and adjoint alike
        pure = step if grad == "full" else partial(checkpoint, step, use_reentrant=False, preserve_rng_state=False)
        with torch.enable_grad():
            return _unrolled(pure, x, state, range(start, n), emit)[0]


def _leaf(v):
    return v.detach().requires_grad_() if isinstance(v, Tensor) and v.is_floating_point() else v


def _check_reached(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """Raise if a step's graph reaches a tensor requiring grad that the adjoint was not given."""
    known = {id(t) for t in inputs}
    stops = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
    stack, seen = [o.grad_fn for o in outputs], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known:
            raise ValueError(f"grad='adjoint' found a tensor of shape {tuple(variable.shape)} requiring grad that "
                             "it cannot see: pass the model as a torch.nn.Module and conditioning tensors in "
                             "extra_args, or use grad='checkpoint'")
        stack.extend(next_node for next_node, _ in node.next_functions)


class _DiscreteAdjoint(torch.autograd.Function):
    """The discrete adjoint of a fixed-grid loop: states only in forward, one VJP per step in backward."""

    @staticmethod
    def forward(ctx, run, x, *params):
        step, state, steps, emit, _ = run
        ctx.run, ctx.states = run, []
        for i in steps:
            ctx.states.append((x, state))
            x, info, state = step(i, x, *state)
            emit(info)
        return x

    @staticmethod
    def backward(ctx, g_x):
        step, _, steps, _, params = ctx.run
        g_params, g_state, checked = [None] * len(params), (), False
        for i, (x, state) in zip(reversed(steps), reversed(ctx.states)):
            with torch.enable_grad():
                x, state = _leaf(x), tuple(_leaf(v) for v in state)
                x_next, _, state_next = step(i, x, *state)
            pairs = [(o, g) for o, g in itertools.zip_longest((x_next, *state_next), (g_x, *g_state))
                     if isinstance(o, Tensor) and o.requires_grad and g is not None]
            inputs = [x] + [v for v in state if isinstance(v, Tensor) and v.requires_grad] + list(params)
            if not checked:
                _check_reached([o for o, _ in pairs], inputs)
                checked = True
            grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                        allow_unused=True) if pairs else [None] * len(inputs)
            g_x, rest = grads[0], iter(grads[1:])
            g_state = tuple(next(rest) if isinstance(v, Tensor) and v.requires_grad else None for v in state)
            g_params = [a if b is None else b if a is None else a + b for a, b in zip(g_params, rest)]
            if g_x is None:
                g_x = torch.zeros_like(x)
        return (None, g_x, *g_params)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of live tensors allocated while ``fn()`` runs, from ``torch.profiler`` allocation events
    (deterministic on CPU, unlike RSS; it also sees what ``torch.utils.checkpoint`` recomputes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    return max(itertools.accumulate(size for _, size in sorted(sizes, key=lambda e: e[0])), default=0)
