"""CLIP rewards (aesthetic predictor, PickScore-style, CLIP-score) on tiny random CLIP folders saved with
``save_pretrained``: agreement with transformers' own processor + CLIPModel, weight loading, gradients
through a VAE decoder, PIL adapter and failure modes."""

import diffusers
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from kdiff_align import rewards
from kdiff_align.image import from_pil, to_pil, vae_decode
from tiny import tiny_tokenizer

IMAGE_SIZE = 32




@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP with ViT-L/14's 768-d projection, so the aesthetic head fits it."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=768)
    CLIPModel(config).eval().save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return rewards.CLIPScorer(clip_folder)


@pytest.fixture(scope="module")
def head_state():
    """A state dict with the LAION checkpoint's key names (layers.0/2/4/6/7), random values."""
    torch.manual_seed(1)
    return {k: v.clone() for k, v in rewards.AestheticHead().state_dict().items()}


def random_pils(n, size, seed=0):
    return to_pil(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


def reference_logits(clip_folder, pils, prompts):
    """transformers' own path: CLIPImageProcessor on PIL + CLIPModel.forward."""
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    ids = tiny_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=processor(images=pils, return_tensors="pt").pixel_values)
    return model, out


def test_pick_and_clip_score_match_transformers(clip_folder, scorer):
    pils, prompts = random_pils(3, IMAGE_SIZE), ["a cat", "a red dog", "the moon"]
    model, out = reference_logits(clip_folder, pils, prompts)
    with torch.no_grad():
        ours = rewards.pick_score(scorer, from_pil(pils), prompts)
        clip = rewards.clip_score(scorer, from_pil(pils), prompts)
    expected = out.logits_per_image.diagonal()
    # images already at the crop size: only the uint8 → [0, 1] rescale differs (u8/255 vs (u8/127.5 − 1 + 1)/2),
    # float32 rounding ~1e-7 relative through a 2-layer ViT
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    cos = expected / model.logit_scale.exp()
    torch.testing.assert_close(clip, 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert (clip >= 0).all()


def test_resizing_preprocessing_close_to_processor(clip_folder, scorer):
    """Larger images are resized in torch (bicubic, antialiased) instead of PIL: embeddings nearly agree."""
    pils = random_pils(2, 48, seed=3)
    model, out = reference_logits(clip_folder, pils, ["a cat", "a cat"])
    with torch.no_grad():
        ours = scorer.image_embeds(from_pil(pils))
    ref = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    # PIL resizes uint8 with its own bicubic kernel and rounds; the two crops differ by a few grey levels,
    # which moves unit embeddings of a random 2-layer ViT by far less than 0.05 in cosine
    assert ((ours * ref).sum(-1) > 0.95).all(), (ours * ref).sum(-1)


@pytest.mark.parametrize("fmt", ("safetensors", "pth"))
def test_aesthetic_head_loads_and_scores(clip_folder, head_state, tmp_path, fmt):
    path = tmp_path / f"head.{fmt}"
    save_file(head_state, path) if fmt == "safetensors" else torch.save(head_state, path)
    scorer = rewards.AestheticScorer(clip_folder, path)
    pils = random_pils(4, IMAGE_SIZE, seed=5)
    model, out = reference_logits(clip_folder, pils, ["x"] * 4)
    embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    head = rewards.AestheticHead()
    head.load_state_dict(head_state)
    with torch.no_grad():
        expected = head.eval()(embeds).squeeze(-1)
        ours = scorer(from_pil(pils))
        pil_scores = rewards.on_pils(scorer)(pils)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)  # float32 rounding only
    torch.testing.assert_close(torch.tensor(pil_scores, dtype=torch.float32), ours, rtol=1e-4, atol=1e-5)


def test_torch_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(1), "payload": diffusers.DDPMScheduler()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        rewards.load_state_dict(path)


def test_rewards_are_differentiable_functions_of_latents(clip_folder, head_state, tmp_path, scorer):
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=16,
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    decode = lambda z: vae_decode(vae, z)  # noqa: E731
    save_file(head_state, tmp_path / "head.safetensors")
    aesthetic = rewards.AestheticScorer(clip_folder, tmp_path / "head.safetensors")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # CLIP-score is w·max(cos, 0); this random CLIP gives these images negative cosines (flat reward, zero
    # gradient), so a copy with the text projection negated (cos → −cos) is used to test the ascent
    flat = rewards.clip_score_reward(scorer, ["a cat", "a dog"], decode)
    flipped = rewards.CLIPScorer(clip_folder)
    with torch.no_grad():
        flipped.model.text_projection.weight.neg_()
    clip = rewards.clip_score_reward(flipped, ["a cat", "a dog"], decode)
    for reward in (rewards.aesthetic_reward(aesthetic, decode), rewards.pickscore_reward(scorer, "a cat", decode),
                   clip, flat):
        z_ = z.clone().requires_grad_()
        r = reward(z_)
        assert r.shape == (2,)
        (grad,) = torch.autograd.grad(r.sum(), z_)
        norms = grad.flatten(1).norm(dim=1)
        assert torch.isfinite(grad).all()
        if reward is flat:
            assert (r == 0).all() and (norms == 0).all()
            continue
        assert (norms > 0).all()
        # a small step along the gradient raises every item's reward (first-order ascent)
        step = 1e-2 * grad / norms[:, None, None, None]
        with torch.no_grad():
            assert (reward(z + step) > r.detach()).all()


def test_failures_are_loud(clip_folder, scorer, tmp_path):
    images = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        rewards.latent_reward(lambda x: torch.tensor([1.0, float("nan")]))(images)
    with pytest.raises(ValueError, match="shape"):
        rewards.latent_reward(lambda x: torch.ones(3))(images)
    with pytest.raises(ValueError, match="prompts"):
        rewards.pick_score(scorer, images, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.image_embeds(torch.zeros(2, 4, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rewards.CLIPScorer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="head.pth"):
        rewards.AestheticScorer(clip_folder, tmp_path / "head.pth")


def test_bf16_scorer_close_to_float32(clip_folder, scorer):
    low = rewards.CLIPScorer(clip_folder, dtype=torch.bfloat16)
    images = from_pil(random_pils(3, IMAGE_SIZE, seed=7))
    with torch.no_grad():
        ref, ours = scorer.image_embeds(images), low.image_embeds(images)
    assert ours.dtype == torch.float32 and low.model.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2⁻⁹ ≈ 0.2% per op); through a 2-layer ViT the unit
    # embeddings stay within a few percent: cosine to the float32 ones above 0.99
    assert ((ours * ref).sum(-1) > 0.99).all(), (ours * ref).sum(-1)
