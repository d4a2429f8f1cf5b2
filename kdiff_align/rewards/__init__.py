"""Reward sources: ``reward(x0: Tensor[B, ...]) -> Tensor[B]``, higher is better.

``base`` holds the contract (``check_rewards``) and the adapters; each source imports only it:
``image`` (JPEG size, brightness, contrast), ``clip`` (PickScore, CLIP score, aesthetic from local
weights), ``vlm`` (a vision-language judge over an OpenAI-compatible API) and ``human`` (a person
choosing in a local web page or the terminal). Non-differentiable rewards are fine for Demon and FK
steering.
"""
from . import base, clip, human, image, vlm
from .base import check_reward_tensor, check_rewards, image_data_url, latent_reward, on_pils, pil_reward
from .clip import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AestheticHead, AestheticScorer, CLIPScorer, aesthetic_reward,
                   clip_score, clip_score_reward, load_state_dict, pick_score, pickscore_reward)
from .human import HumanChoice, terminal_choice
from .image import brightness, contrast, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from .vlm import VLMError, VLMReward
