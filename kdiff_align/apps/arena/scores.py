"""The arena's rewards and scores: built-in rewards with held-out twins, diversity and fidelity."""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ... import metrics, rewards
from ...models import toy

DEFAULT_ALPHA = {"logit": 1.0, "jpeg": 0.02}  # SMC temperature α per built-in reward (its scale)
DEFAULT_SCALE = {"logit": 2.0}  # guidance strength s per built-in differentiable reward

def png_size_kb(images: list) -> list[float]:
    """Size in kB of each image saved as PNG (lossless: another coder than the JPEG reward's)."""
    sizes = []
    for im in images:
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        sizes.append(buffer.tell() / 1000)
    return sizes


def builtin_rewards(pipe, class_name: str, heldout) -> dict[str, tuple[Callable, Callable, str]]:
    """name → (target reward, held-out reward, key of the α/scale defaults) for the built-in rewards.

    The logit's held-out twin is the held-out classifier's logit of the same class; the JPEG size's
    is the PNG size (−kB both), which rewards simple images without JPEG's quantisation blocks.
    """
    index = pipe.class_names.index(class_name)
    return {f"logit-{class_name}": (toy.classifier_reward(pipe, class_name), lambda x: heldout(x)[:, index], "logit"),
            "jpeg": (rewards.jpeg_compressibility(pipe.decode),
                     rewards.pil_reward(lambda pils: [-s for s in png_size_kb(pils)]), "jpeg")}


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


def resolve_rewards(pipe, spec, class_name: str, heldout_classifier) -> dict:
    """Reward spec → name → (reward, held-out reward, α, s): "logit"/"jpeg" or user ``reward(x0)`` callables.

    A user reward's held-out twin is the held-out classifier's top log-probability (the sample still
    looks like some garment) unless given as a ``(reward, heldout_reward)`` pair.
    """
    builtin = builtin_rewards(pipe, class_name, heldout_classifier)
    short = {"logit": f"logit-{class_name}", "jpeg": "jpeg"}
    items = {s: s for s in spec} if isinstance(spec, (list, tuple)) else dict(spec)
    out = {}
    for name, value in items.items():
        if isinstance(value, str):
            if value not in short:
                raise ValueError(f"rewards must be 'logit', 'jpeg' or reward(x0) callables, got {value!r}")
            reward, held, key = builtin[short[value]]
            out[short[value]] = (reward, held, DEFAULT_ALPHA[key], DEFAULT_SCALE.get(key, 0.0))
            continue
        reward, held = value if isinstance(value, tuple) else (value, None)
        if not callable(reward):
            raise TypeError(f"rewards[{name!r}] must be a callable reward(x0) -> Tensor[B], got {type(reward).__name__}")
        held = held or (lambda x: heldout_classifier(x).log_softmax(1).max(1).values)
        out[name] = (reward, held, 1.0, 1.0)
    return out
