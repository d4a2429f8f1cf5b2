"""Reward specs of the command line (``classifier:bag``, ``jpeg-small``, ``vlm``, ...) as reward functions.

``generate`` and ``demon`` share this vocabulary: ``parse_reward`` checks a spec, ``reward_label`` names
what it measures for plots, and ``RewardFactory`` builds one ``reward(x0) -> Tensor[B]`` per prompt.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import torch
from torch import Tensor

from .. import rewards
from ..models import toy
from ..models.pipeline import Pipeline
from . import cliargs

DIFFERENTIABLE = ("brightness", "contrast", "classifier", "aesthetic")


def parse_reward(spec: str) -> tuple[str, str | None]:
    """``"classifier:bag"`` → ``("classifier", "bag")`` (names of ``cliargs.REWARDS``); fails early on others."""
    try:
        return cliargs.reward_kind(cliargs.reward_spec(str(spec)))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"reward: {error}") from None


def reward_label(spec: str, prompt: str = "") -> str:
    """What a reward spec measures, for plot labels: ``classifier:bag`` → ``classifier logit of 'bag'``."""
    kind, arg = parse_reward(spec)
    if kind == "classifier":
        return f"classifier logit of {arg or prompt!r}"
    return {"jpeg-small": "-JPEG kB (small files)", "jpeg-large": "JPEG kB (large files)"}.get(kind, kind)


class RewardFactory:
    """Builds ``reward(x0) -> Tensor[B]`` on latents for each prompt, sharing expensive parts across prompts."""

    def __init__(self, spec: str, pipe: Pipeline, args):
        self.kind, self.arg = parse_reward(spec)
        self.pipe, self.args, self._shared, self._cache = pipe, args, None, {}
        if self.kind == "classifier" and not hasattr(pipe, "classifier"):
            raise ValueError("--reward classifier needs a shipped toy model with a classifier (--model toy:fashion)")
        if self.kind == "vlm" and not (args.vlm_url and args.vlm_model):
            raise ValueError("--reward vlm needs --vlm-url and --vlm-model")

    @property
    def differentiable(self) -> bool:
        return self.kind in DIFFERENTIABLE

    def _shared_part(self):
        """The aesthetic scorer, the human chooser or the VLM score cache, made once."""
        if self._shared is None:
            if self.kind == "aesthetic":
                if not self.args.aesthetic_head:
                    raise ValueError("reward 'aesthetic:PATH' needs --aesthetic-head FILE (the MLP weights)")
                self._shared = rewards.AestheticScorer(self.arg, self.args.aesthetic_head, device=self.pipe.device)
            elif self.kind == "human":
                port = self.args.human_port + int(os.environ.get("RANK", 0)) if self.args.human_port else 0
                self._shared = rewards.HumanChoice(mode=self.args.human_mode, port=port)
            else:
                self._shared = {}
        return self._shared

    def __call__(self, prompt: str) -> Callable[[Tensor], Tensor]:
        key = prompt if self.kind in ("classifier", "vlm") else None
        if key not in self._cache:
            self._cache[key] = self._build(prompt)
        return self._cache[key]

    def _build(self, prompt: str) -> Callable[[Tensor], Tensor]:
        decode, kind = self.pipe.decode, self.kind
        if kind == "jpeg-small":
            return rewards.jpeg_compressibility(decode)
        if kind == "jpeg-large":
            return rewards.jpeg_incompressibility(decode)
        if kind == "brightness":
            return lambda x0: rewards.brightness(decode(x0).clamp(-1, 1))
        if kind == "contrast":
            return lambda x0: rewards.contrast(decode(x0).clamp(-1, 1))
        if kind == "classifier":
            return toy.classifier_reward(self.pipe, self.arg or prompt)
        if kind == "aesthetic":
            return rewards.aesthetic_reward(self._shared_part(), decode)
        if kind == "human":
            return self._shared_part().reward(decode)
        vlm = rewards.VLMReward(self.args.vlm_url, self.args.vlm_model, text=prompt, api_key_env=self.args.vlm_key_env,
                                concurrency=self.args.vlm_concurrency, cache=self._shared_part())
        return vlm.reward(decode)

    def final_score(self, reward: Callable, x0: Tensor) -> float | None:
        """The reward of a finished image (None for human choice: a person is not asked twice)."""
        if self.kind == "human":
            return None
        with torch.no_grad():
            return float(rewards.check_rewards(reward(x0), x0.shape[0], self.kind)[0])
