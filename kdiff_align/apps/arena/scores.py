"""The arena's rewards and scores: built-in rewards with held-out twins, diversity and fidelity."""
from __future__ import annotations

import io
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ... import metrics, rewards
from ...models import toy
from ..reward_specs import RewardFactory, parse_reward

ARENA_REWARDS = ("classifier", "jpeg-small", "jpeg-large", "brightness", "contrast")  # local, cheap to score
DEFAULT_ALPHA = {"classifier": 1.0, "jpeg-small": 0.02, "jpeg-large": 0.02}  # SMC temperature α (the reward's scale)


class ArenaReward(NamedTuple):
    """One reward of a run: the target, its held-out twin on images, SMC's α, guidance's s, the FD class."""
    reward: Callable[[Tensor], Tensor]
    heldout: Callable[[Tensor], Tensor]
    alpha: float
    scale: float
    ref_class: str | None


def png_size_kb(images: list) -> list[float]:
    """Size in kB of each image saved as PNG (lossless: another coder than the JPEG reward's)."""
    sizes = []
    for im in images:
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        sizes.append(buffer.tell() / 1000)
    return sizes


def reward_name(spec: str, class_name: str) -> str:
    """A reward spec of the shared vocabulary (``classifier:bag``, ``jpeg-small``; ``logit``, ``jpeg`` are old names)."""
    kind, arg = parse_reward(spec)
    if kind not in ARENA_REWARDS:
        raise ValueError(f"rewards: the arena runs {', '.join(ARENA_REWARDS)} (classifier:CLASS), got {spec!r}")
    if kind != "classifier":
        return kind
    if (arg or class_name) not in toy.FASHION_CLASSES:
        raise ValueError(f"rewards: classifier:CLASS needs a class of {', '.join(toy.FASHION_CLASSES)}, got {spec!r}")
    return f"classifier:{arg or class_name}"


def builtin_reward(pipe, name: str, heldout) -> ArenaReward:
    """The reward ``name`` (from ``reward_name``) with its held-out twin, SMC's α and guidance's s = 1/α.

    The classifier logit's twin is the held-out classifier's logit of the same class; the JPEG size's
    is the PNG size (same sign), which judges simplicity without JPEG's quantisation blocks; brightness
    and contrast keep the user rewards' twin (the held-out classifier's top log-probability).
    """
    kind, arg = parse_reward(name)
    twin = top_log_probability(heldout)
    if kind == "classifier":
        index = pipe.class_names.index(arg)
        twin = lambda x: heldout(x)[:, index]  # noqa: E731
    elif kind.startswith("jpeg"):
        sign = -1.0 if kind == "jpeg-small" else 1.0
        twin = rewards.pil_reward(lambda pils: [sign * s for s in png_size_kb(pils)])
    reward, alpha = RewardFactory(name, pipe, None)(arg or ""), DEFAULT_ALPHA.get(kind, 1.0)
    return ArenaReward(reward, twin, alpha, 1.0 / alpha, arg)  # s = 1/α: guidance aims at SMC's tilt p·exp(r/α)


def top_log_probability(heldout) -> Callable[[Tensor], Tensor]:
    """The held-out classifier's top log-probability: the sample still looks like some garment."""
    return lambda x: heldout(x).log_softmax(1).max(1).values


def is_differentiable(reward: Callable, pipe) -> bool:
    """Whether ``reward`` returns a tensor with a gradient on a probe input (one reward call, no network)."""
    probe = torch.zeros(1, *pipe.latent_shape, device=pipe.device, requires_grad=True)
    with torch.enable_grad():
        try:
            r = reward(probe)
        except Exception:
            return False
    return isinstance(r, Tensor) and r.requires_grad


def reference_features(pipe, heldout, class_name: str | None) -> np.ndarray:
    """Held-out classifier features of the shipped eval slice: the images of ``class_name``, or all."""
    x, y = toy.load_fashion_mnist("eval")
    if class_name is not None:
        x = x[y == pipe.class_names.index(class_name)]
    return metrics.features(heldout, x.to(pipe.device))


def score(x0: Tensor, pipe, reward, heldout_reward, heldout, ref: np.ndarray) -> dict:
    """Target and held-out rewards ``[B]``, diversity, distinct-class fraction and FD of samples ``x0``."""
    with torch.no_grad():
        r = rewards.check_rewards(reward(x0), len(x0), "reward")
        images = pipe.decode(x0).clamp(-1, 1)
        h = rewards.check_rewards(heldout_reward(images), len(x0), "held-out reward")
        labels = heldout(images).argmax(1)
    f = metrics.features(heldout, images)
    return dict(reward=r, heldout=h, diversity=metrics.mean_pairwise_distance(f),
                distinct=metrics.distinct_fraction(labels, len(pipe.class_names)),
                fd=metrics.frechet_distance(f, ref) if len(f) >= 2 else math.nan)


def resolve_rewards(pipe, spec, class_name: str, heldout_classifier) -> dict[str, ArenaReward]:
    """Reward spec → name → ``ArenaReward``: names of ``ARENA_REWARDS`` or user ``reward(x0)`` callables.

    A user reward's held-out twin is ``top_log_probability`` unless given as a ``(reward, heldout_reward)``
    pair; its α and s are 1.
    """
    items = {s: s for s in spec} if isinstance(spec, (list, tuple)) else dict(spec)
    out = {}
    for name, value in items.items():
        if isinstance(value, str):
            name = reward_name(value, class_name)
            out[name] = builtin_reward(pipe, name, heldout_classifier)
            continue
        reward, held = value if isinstance(value, tuple) else (value, None)
        if not callable(reward):
            raise TypeError(f"rewards[{name!r}] must be a callable reward(x0) -> Tensor[B], got {type(reward).__name__}")
        out[name] = ArenaReward(reward, held or top_log_probability(heldout_classifier), 1.0, 1.0, None)
    return out
