import pytest
import torch

from kdiff_align import rewards


def test_jpeg_rewards_prefer_flat_or_busy_images():
    flat = torch.zeros(1, 1, 28, 28)
    busy = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.cat([flat, busy])
    comp = rewards.jpeg_compressibility()(x)
    incomp = rewards.jpeg_incompressibility()(x)
    assert comp.shape == (2,) and comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)


def test_pil_reward_checks_length_and_nan():
    x = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="returned 2 values of shape \\(2,\\) for 3 images"):
        rewards.pil_reward(lambda pils: [0.0, 1.0])(x)
    with pytest.raises(ValueError, match=r"NaN or \+inf for 3 images at rows \[1\]"):
        rewards.pil_reward(lambda pils: [0.0, float("nan"), 1.0])(x)


def test_pil_reward_decodes_first():
    seen = []
    reward = rewards.pil_reward(lambda pils: seen.extend(p.size for p in pils) or [1.0] * len(pils),
                                decode=lambda z: z.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert reward(torch.zeros(2, 3, 4, 4)).tolist() == [1.0, 1.0] and seen == [(8, 8), (8, 8)]


def test_brightness_and_contrast():
    x = torch.stack([torch.full((1, 2, 2), 0.5), torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]])])
    torch.testing.assert_close(rewards.brightness(x), torch.tensor([0.5, 0.0]))
    assert rewards.contrast(x)[0] == 0 and rewards.contrast(x)[1] > 1
