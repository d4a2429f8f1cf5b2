"""Tiny offline components shared by the tests: a CLIP tokenizer, a conditional Gaussian pipeline."""
import string

import torch

from kdiff_align.models.pipeline import Pipeline
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser


def tiny_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges) built without any download."""
    from transformers import CLIPTokenizer
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def toy_pipeline():
    """Condition = a mean offset; D is the exact Gaussian denoiser around that mean."""
    base = GaussianDenoiser(torch.zeros(1, 4, 4), 0.5)

    def net(x, sigma, offset):
        return base(x - offset[:, :, None, None], sigma) + offset[:, :, None, None]

    def encode(prompts):
        return {"offset": torch.tensor([[0.0 if p == "" else float(len(p)) / 4] for p in prompts])}

    return Pipeline(CountingDenoiser(net), encode, (1, 4, 4), sigma_min=0.002, sigma_max=10.0)
