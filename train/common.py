"""Helpers shared by the training scripts: seeding, atomic safetensors writing, EMA, resumable state."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "kdiff_align" / "weights"


def save_weights(module: torch.nn.Module, path: Path, dtype=torch.float32, **metadata) -> None:
    """Write ``module``'s state dict and ``config`` (plus ``metadata``) to ``path`` atomically."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    meta = {"config": json.dumps(module.config), **{k: str(v) for k, v in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, step: int, max_decay: float = 0.999) -> None:
    """Exponential moving average of the weights with the usual (1 + t)/(10 + t) warm-up."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def save_state(path: Path, **state) -> None:
    """Atomically save a resumable training state (tensors, dicts and ints only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    """The saved training state at ``path``, or None when absent."""
    return torch.load(path, weights_only=True) if path is not None and Path(path).exists() else None
