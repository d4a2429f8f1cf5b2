"""SD3-style rectified-flow folders (transformer + flow-matching scheduler, two CLIPs, optional T5) loaded
from tiny random-weight local copies: the seed's notebook API, the shifted flow schedule, one transformer
call per guided step, agreement with diffusers' StableDiffusion3Pipeline and loader errors."""
import json
import shutil
import string

import diffusers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast,
                          T5Config, T5EncoderModel)

import kdiff_align as ka
from kdiff_align.schedules import flow_shift
from kdiff_align.models.sd3 import FlowPipeline
from kdiff_align.testing import GaussianDenoiser

KINDS = ("no_t5", "t5")
CHARS = string.ascii_lowercase + string.digits + ".,!?'-"
COND3 = {"prompts": ["on moon", "astronaut", "riding a donkey"], "cfgs": [3, 2, 4]}



def clip_tokenizer() -> CLIPTokenizer:
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(CHARS) + [c + "</w>" for c in CHARS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level word-piece tokenizer standing in for T5's SentencePiece one (no download)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=256)


def clip_encoder(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=96, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval()


def build_folder(root, with_t5: bool):
    """Save a tiny SD3 folder: 8×8×4 latents in 2×2 patches, 16×16 images, joint width 48 (CLIPs: 2 × 16,
    so the CLIP states are really zero-padded), VAE with scaling AND shift factors, flow shift 3."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=16,
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5, shift_factor=0.1)
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=48, d_model=48, d_kv=8, num_heads=2, num_layers=1, d_ff=37)).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_encoder(1), tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(2),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5 if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd3")
    return {kind: build_folder(base / kind, kind == "t5") for kind in KINDS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: ka.from_pretrained(folders[kind], device="cpu") for kind in KINDS}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_components_and_flow_constants(pipes):
    pipe, with_t5 = pipes["no_t5"], pipes["t5"]
    assert isinstance(pipe, FlowPipeline) and isinstance(pipe.transformer, diffusers.SD3Transformer2DModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert isinstance(with_t5.text_encoder_3, T5EncoderModel) and with_t5.tokenizer_3 is not None
    assert pipe.shift == 3.0 and pipe.denoiser.t_scale == 1000
    # σ_max is t = shift(0.999) = 0.99967, σ = t/(1 − t) = 2997; σ_min is t = shift(1/1000)
    assert pipe.sigma_max == pytest.approx(2997.0, rel=1e-9)
    assert pipe.sigma_min == pytest.approx(0.003 / 0.999, rel=1e-9)
    assert pipe.init_sigma == pytest.approx(1 + pipe.sigma_max)  # x_t = ε at the first time, as diffusers starts
    x = pipe.get_init_latent(2, generator=seeded(0))
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_encoding_layout(pipes, kind):
    """CLIP-L ‖ CLIP-G penultimate states zero-padded to the joint width, then 256 T5 rows (zeros without T5)."""
    pipe = pipes[kind]
    table = pipe.encode_cached(["a cat", ""])
    hidden, pooled = table["encoder_hidden_states"], table["pooled_projections"]
    assert hidden.shape == (2, 77 + 256, 48) and pooled.shape == (2, 32)
    assert (hidden[:, :77, 32:] == 0).all() and (hidden[:, :77, :32] != 0).any()
    assert (hidden[:, 77:] == 0).all() == (kind == "no_t5")
    assert not torch.equal(hidden[0], hidden[1])  # the empty prompt is encoded, not zeroed (SD3 convention)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_readme_snippets(pipes, kind):
    """The seed README's three low-level snippets through an SD3 pipeline (fewer steps: tiny model)."""
    pipe, steps = pipes[kind], 6
    x = pipe.odeint(pipe.get_init_latent(generator=seeded(0)), COND3, steps, disable=True)
    pil = pipe.from_latent_to_pil(x)
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    condition = {"prompts": ["an astronaut riding a horse on mars."], "cfgs": [5]}
    x = pipe.from_pil_to_latent(pil)
    assert x.shape == (1, 4, 8, 8)
    x = pipe.oderevert(x, condition, steps=steps, disable=True)
    x = pipe.odeint(x, condition, steps, disable=True)
    pil = pipe.from_latent_to_pil(x)
    sigma, beta = 14, 0.125  # SDEdit from σ = 14 (t = 0.93)
    x = pipe.oderevert(pipe.from_pil_to_latent(pil), condition, start_t=sigma, steps=steps, disable=True)
    x = pipe.sdeint(x, COND3, beta, steps, start_t=sigma, disable=True, generator=seeded(1))
    assert len(pipe.from_latent_to_pil(x)) == 1 and torch.isfinite(x).all()


def test_oderevert_then_odeint_reconstructs(pipes):
    """Inverting a latent along the flow ODE and sampling it back converges as the grid is refined."""
    pipe, cond = pipes["no_t5"], {"prompts": ["a cat"], "cfgs": [2]}
    z = pipe.odeint(pipe.get_init_latent(1, generator=seeded(2)), cond, 6, method="euler", disable=True)

    def round_trip(steps):
        back = pipe.odeint(pipe.oderevert(z, cond, steps=steps, disable=True), cond, steps, disable=True)
        return ((back - z).norm() / z.norm()).item()

    coarse, fine = round_trip(12), round_trip(24)
    # Heun's O(h²) error: 4× smaller at twice the steps (measured 0.064 → 0.0126, ratio 5.1; 48 steps: 0.0037),
    # plus a small grid-independent part (the clean latent is taken as the state at σ_min = 0.003).
    assert fine < coarse / 2.5, (coarse, fine)
    assert fine < 0.025, fine


def test_one_transformer_call_per_step_with_multi_prompt_cfg(pipes):
    pipe, calls = pipes["t5"], []

    def record(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].shape[0],
                      kwargs["encoder_hidden_states"].shape[0], kwargs["pooled_projections"].shape[0]))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe.odeint(pipe.get_init_latent(2, generator=seeded(5)), COND3, 5, method="euler", disable=True)
    finally:
        handle.remove()
    rows = 2 * (len(COND3["prompts"]) + 1)  # batch 2 × (3 prompts + unconditional)
    assert calls == [(rows,) * 4] * 5


@pytest.mark.parametrize("kind", KINDS)
def test_euler_matches_diffusers_sd3_pipeline(pipes, kind):
    """diffusers' StableDiffusion3Pipeline (FlowMatchEuler, shift 3) and our Euler odeint, from the same
    noise on the same shifted grid, land on the same latent."""
    pipe, steps, guidance = pipes[kind], 8, 4.0
    ref_pipe = diffusers.StableDiffusion3Pipeline(
        transformer=pipe.transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config), vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
        tokenizer_3=pipe.tokenizer_3)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=seeded(4))
    unshifted = torch.linspace(0.999, 0.001, steps, dtype=torch.float64)  # our default grid, before the shift
    ref = ref_pipe("an astronaut riding a horse", height=16, width=16, num_inference_steps=steps,
                   sigmas=unshifted.tolist(), guidance_scale=guidance, latents=latents, output_type="latent",
                   return_dict=False)[0]
    # the same time grid: diffusers shifts the t we pass exactly as our FlowPipeline.sigmas does
    t_ours = pipe.sigmas(steps)[:-1] / (1 + pipe.sigmas(steps)[:-1])
    torch.testing.assert_close(t_ours, ref_pipe.scheduler.sigmas[:-1], rtol=1e-6, atol=0)
    ours = pipe.odeint(latents * pipe.init_sigma, {"prompts": ["an astronaut riding a horse"], "cfgs": [guidance]},
                       steps, method="euler", disable=True)
    # Same float32 arithmetic up to coordinates: our state is x = x_t/(1 − t) (σ up to 2997, so x_t is
    # recovered from x with ~1e-7 relative rounding), t is recomputed from σ (1e-7 relative, i.e. 1e-4 on the
    # transformer's 0–1000 timestep) and CFG is applied to D rather than to v (equal in exact arithmetic, D
    # being affine in v). Measured max difference 3.8e-5 (no T5) / 2.8e-5 (T5) on latents up to 3.7 that
    # moved by up to 2.2 from the noise; 1e-4 + 1e-4·|x| leaves ≥ 2.6× headroom.
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_vae_scaling_and_shift_factor(pipes):
    """Latents are (z − shift)·scale as in SD3; decoding inverts it exactly as diffusers' SD3 pipeline does."""
    pipe = pipes["no_t5"]
    z = torch.randn(2, 4, 8, 8, generator=seeded(6))
    with torch.no_grad():
        ours = pipe.decode(z)
        ref = pipe.vae.decode(z / 1.5 + 0.1).sample
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        images = torch.rand(2, 3, 16, 16, generator=seeded(7)) * 2 - 1
        mean = pipe.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(pipe.encode(images), (mean - 0.1) * 1.5, rtol=1e-6, atol=1e-6)


@given(shift=st.floats(0.3, 6.0), steps=st.integers(1, 30), start=st.floats(0.05, 500.0))
def test_flow_pipeline_grid(shift, steps, start):
    """FlowPipeline.sigmas: starts at start_t, ends at σ_min then 0, strictly decreasing, uniform before the shift."""
    pipe = FlowPipeline(GaussianDenoiser(torch.zeros(2), 1.0), lambda prompts: {}, (2,), shift=shift)
    if start <= pipe.sigma_min * 1.01:
        start = pipe.sigma_max
    sigmas = pipe.sigmas(steps, start).double()
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    # the grid is stored in float32: 1e-6 relative
    assert sigmas[0].item() == pytest.approx(start, rel=1e-6)
    u = flow_shift(sigmas[:-1] / (1 + sigmas[:-1]), 1 / shift)
    if steps > 1:  # one step is [start_t, 0]
        assert sigmas[-2].item() == pytest.approx(pipe.sigma_min, rel=1e-6)
        gaps = u[:-1] - u[1:]
        torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-4, atol=1e-6)


def test_flow_pipeline_validates():
    den = GaussianDenoiser(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="shift"):
        FlowPipeline(den, lambda prompts: {}, (2,), shift=0.0)
    with pytest.raises(ValueError, match="t_max"):
        FlowPipeline(den, lambda prompts: {}, (2,), t_max=1.0)
    pipe = FlowPipeline(den, lambda prompts: {}, (2,))
    for start in (-1.0, 0.0, pipe.sigma_min / 2, float("inf")):
        with pytest.raises(ValueError, match="start_t"):
            pipe.sigmas(4, start)


def test_missing_components_and_unsupported_scheduler(folders, tmp_path):
    for kind, component in (("no_t5", "transformer"), ("no_t5", "vae"), ("no_t5", "text_encoder_2"),
                            ("no_t5", "tokenizer"), ("t5", "tokenizer_3")):
        broken = tmp_path / f"{kind}-{component}"
        shutil.copytree(folders[kind], broken)
        shutil.rmtree(broken / component)
        with pytest.raises(FileNotFoundError, match=f"'{component}'"):
            ka.from_pretrained(broken, device="cpu")
    # a T5 folder without text_encoder_3 is a valid T5-less folder
    no_t5 = tmp_path / "dropped-t5"
    shutil.copytree(folders["t5"], no_t5)
    shutil.rmtree(no_t5 / "text_encoder_3")
    shutil.rmtree(no_t5 / "tokenizer_3")
    assert ka.from_pretrained(no_t5, device="cpu").text_encoder_3 is None
    config_path = no_t5 / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        ka.from_pretrained(no_t5, device="cpu")


def test_low_precision_state_stays_float32(folders, pipes):
    pipe = ka.from_pretrained(folders["no_t5"], torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    x = pipe.get_init_latent(1, generator=seeded(8))
    low = pipe.odeint(x, {"prompts": ["a cat"], "cfgs": [3]}, 4, method="euler", disable=True)
    ref = pipes["no_t5"].odeint(x, {"prompts": ["a cat"], "cfgs": [3]}, 4, method="euler", disable=True)
    assert low.dtype == torch.float32
    # 4 steps through a transformer in bfloat16 (8 mantissa bits): a few percent of the norm
    assert ((low - ref).norm() / ref.norm()).item() < 0.1
