"""Sampling Demon: weights, projection, reward gain, constant-reward law, batching, NFE, errors, generator."""
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

import kdiff_align as ka
from kdiff_align.align import demon
from kdiff_align.align.demon import (DemonGenerator, combine_noise, demon_cost, demon_weights, rollout_steps,
                                     sample_demon)
from kdiff_align.models.pipeline import Pipeline
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser
from kdiff_align.utils import generators

RARE = 0.2  # weight of the mode at x = +2, which the reward prefers


def two_modes():
    return MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]),
                           torch.tensor([1 - RARE, RARE]))


def prefer_rare(x0):
    return x0[:, 0]


SIGMAS = ka.get_sigmas_karras(16, 0.01, 20.0)


def noise(n, seed=0, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


# ---- pure functions -------------------------------------------------------------------------------

rewards_st = st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1),
                       st.sampled_from([0.0, 1e-12, 1e-3, 1.0, 1e3]))


@given(rewards_st, st.sampled_from(demon.DEMON_TYPES), st.sampled_from(["adaptive", 1e-4, 0.5, 10.0]))
@example((2, 1, 0, 1.0), "tanh", "adaptive")
@example((1, 4, 0, 0.0), "boltzmann", 1e-4)
def test_weights_are_finite_and_uniform_without_spread(problem, demon_type, tau):
    batch, K, seed, scale = problem
    r = torch.randn(batch, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + 5.0
    b, tau_b = demon_weights(r, demon_type, tau)
    assert b.shape == (batch, K) and tau_b.shape == (batch,)
    assert torch.isfinite(b).all() and (tau_b > 0).all()
    spread = r.std(1) if K > 1 else torch.zeros(batch, dtype=torch.float64)
    flat = spread < demon.SPREAD_MIN
    assert (b[flat] == 1).all()  # no spread (or K = 1): uniform weights, z* = normalised mean noise
    if tau == "adaptive":
        torch.testing.assert_close(tau_b[~flat], spread[~flat])  # recomputed from these rewards (ref. bug B1)
    live = ~flat
    if demon_type == "boltzmann":
        torch.testing.assert_close(b[live].sum(1), torch.ones(int(live.sum()), dtype=torch.float64))
    if demon_type == "optimal":  # centred (ref. bug B3): a constant shift of the rewards changes nothing
        tol = 1e-9 * (1 + scale)  # float64 rounding of rewards of size ~scale
        torch.testing.assert_close(b[live].sum(1), torch.zeros(int(live.sum()), dtype=torch.float64), atol=tol, rtol=0)
        torch.testing.assert_close(demon_weights(r + 100.0, demon_type, tau)[0][live], b[live], atol=tol, rtol=0)
    if demon_type == "tanh":
        assert (b[live].abs() <= 1).all()
    # every type is monotone in the reward: a higher reward never gets a smaller weight
    order = r.argsort(1)
    assert (b.gather(1, order).diff(dim=1) >= -1e-12).all()


@given(st.integers(1, 4), st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=3),
       st.integers(0, 2**31 - 1))
def test_combined_noise_has_norm_sqrt_n_per_item(batch, K, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, K, *shape, generator=gen)
    b = torch.randn(batch, K, generator=gen, dtype=torch.float64)
    z_star = combine_noise(z, b)
    n = math.prod(shape)
    # float32 sum and norm: relative error ~1e-6
    torch.testing.assert_close(z_star.flatten(1).norm(dim=1), torch.full((batch,), math.sqrt(n)), rtol=1e-5, atol=0)
    direction = torch.einsum("bk,bk...->b...", b.float(), z)
    cos = torch.nn.functional.cosine_similarity(z_star.flatten(1), direction.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(batch), atol=1e-5, rtol=0)  # same direction as Σ b_k z_k


def test_combined_noise_of_zero_weights_is_the_mean_direction():
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    z_star = combine_noise(z, torch.zeros(2, 3))
    torch.testing.assert_close(z_star, combine_noise(z, torch.ones(2, 3)))


def test_rollout_steps_match_the_reference_best_stepnum():
    # reference (demon.md §3.2): 21 Heun steps near σ_max for c_steps = 20, 8 near σ = 0.11 on SD's grid;
    # ours runs best_stepnum Heun steps to σ_min, then the Euler step to 0.
    assert rollout_steps(14.6488, 2e-3, 14.6488, 20) == 21
    assert rollout_steps(0.11, 2e-3, 14.6488, 20) - 1 == 7
    assert rollout_steps(2e-3, 2e-3, 14.6488, 20) == 1  # at σ_min the rollout is Tweedie's x̂₀ = D(x, σ)


# ---- the sampler on a two-mode mixture ------------------------------------------------------------

@pytest.mark.parametrize("demon_type", demon.DEMON_TYPES)
@pytest.mark.parametrize("r_of_c", ["consistency", "baseline"])
def test_every_demon_type_raises_the_reward_over_plain_ode(demon_type, r_of_c):
    model, x = two_modes(), noise(128)
    plain = ka.odeint(model, x, SIGMAS, disable=True)
    out = sample_demon(model, x, SIGMAS, prefer_rare, K=6, demon_type=demon_type, r_of_c=r_of_c, c_steps=4,
                       generator=torch.Generator().manual_seed(1), disable=True)
    # plain sampling puts ~20% in the +2 mode (mean reward ≈ −1.2, 128 draws: ±0.35 at 2σ); Demon moves
    # almost every sample there (measured ≥ 0.95 for all types), so a gain of 2 and 80% are far inside
    assert prefer_rare(plain).mean() < -0.4
    assert prefer_rare(out).mean() > prefer_rare(plain).mean() + 2.0
    assert (two_modes().classify(out) == 1).float().mean() > 0.8


def test_constant_reward_keeps_the_mode_weights():
    model, n = two_modes(), 3000
    x = noise(n, seed=3)
    out = sample_demon(model, x, SIGMAS, lambda x0: torch.full((x0.shape[0],), 3.0), K=3,
                       generator=torch.Generator().manual_seed(4), disable=True)
    base = ka.sdeint(model, x, SIGMAS, beta=0.1, generator=torch.Generator().manual_seed(5), disable=True)
    rare_demon = (model.classify(out) == 1).float().mean().item()
    rare_base = (model.classify(base) == 1).float().mean().item()
    # A flat reward makes Demon the β-SDE with spherical noise (same law as the step → 0). The binomial std
    # of a 0.2 proportion over 3000 draws is 0.0073 (4σ = 0.03); the 16-step discretisation biases both
    # samplers by about −0.007 (measured over 4 seeds: Demon 0.187–0.204, Gaussian-noise β-SDE 0.181–0.193).
    assert abs(rare_demon - RARE) < 0.04
    assert abs(rare_demon - rare_base) < 0.04  # difference of two such estimates: 4σ ≈ 0.04
    # within-mode spread along y (true 0.5; both ≈ 0.47): std error of a std ≈ 0.006 each, 4σ of the gap ≈ 0.035
    assert abs(out[:, 1].std() - base[:, 1].std()) < 0.04
    assert torch.isfinite(out).all()


def test_zero_spread_reward_gives_finite_samples_and_k1_works():
    model, x = two_modes(), noise(8)
    seen = []
    out = sample_demon(model, x, SIGMAS, lambda x0: torch.zeros(x0.shape[0]), K=4, ode_after=0.0,
                       callback=lambda info: "tau" in info and seen.append(info), disable=True,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and len(seen) == len(SIGMAS) - 2
    assert all(torch.isfinite(s["tau"]).all() and (s["weights"] == 1).all() for s in seen)
    one = sample_demon(model, x, SIGMAS, prefer_rare, K=1, generator=torch.Generator().manual_seed(0), disable=True)
    assert torch.isfinite(one).all()


def test_binary_reward_with_spread_after_a_flat_first_step_has_no_nan():
    # reference bugs B1/B2: τ = 0 frozen at step 1, then tanh(0/0) = NaN once rewards spread out
    model, x = two_modes(), noise(4)
    out = sample_demon(model, x, SIGMAS, lambda x0: (x0[:, 0] > 1.5).double(), K=8, tau="adaptive",
                       generator=torch.Generator().manual_seed(2), disable=True)
    assert torch.isfinite(out).all()


def test_batch_equals_separate_runs_and_seeded_runs_are_bit_reproducible():
    model, x, seeds = two_modes(), noise(3, seed=7), [11, 12, 13]
    kw = dict(K=5, demon_type="tanh", disable=True)
    batched = sample_demon(model, x, SIGMAS, prefer_rare, generator=generators(seeds), **kw)
    alone = torch.cat([sample_demon(model, x[i:i + 1], SIGMAS, prefer_rare, generator=generators([s]), **kw)
                       for i, s in enumerate(seeds)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)  # row-wise closed form: only float reassociation
    again = sample_demon(model, x, SIGMAS, prefer_rare, generator=generators(seeds), **kw)
    assert torch.equal(batched, again)


def test_max_batch_chunks_calls_without_changing_the_result():
    model, x = CountingDenoiser(two_modes()), noise(3)
    kw = dict(K=4, disable=True, return_info=True)
    full, info = sample_demon(model, x, SIGMAS, prefer_rare, generator=generators([1, 2, 3]), **kw)
    chunked, info_c = sample_demon(model, x, SIGMAS, prefer_rare, generator=generators([1, 2, 3]), max_batch=5, **kw)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert info_c["nfe"]["network_rows"] == info["nfe"]["network_rows"]
    assert info_c["nfe"]["network_calls"] > info["nfe"]["network_calls"]
    assert model.rows == 2 * info["nfe"]["network_rows"]


@pytest.mark.parametrize("r_of_c,c_steps", [("consistency", None), ("baseline", 3), ("baseline", 0)])
def test_nfe_counts_match_the_documented_formula(r_of_c, c_steps):
    model = CountingDenoiser(two_modes())
    sigmas = ka.get_sigmas_karras(6, 0.05, 10.0)  # 10, 4.56, 1.88, 0.68, 0.21, 0.05, 0: 4 Demon steps, 2-step tail
    batch, K = 2, 3
    out, info = sample_demon(model, noise(batch), sigmas, prefer_rare, K=K, r_of_c=r_of_c, c_steps=c_steps,
                             ode_after=0.3, generator=torch.Generator().manual_seed(0), disable=True,
                             return_info=True)
    steps = int((sigmas[:-2] >= 0.3).sum())
    assert info["demon_steps"] == steps == 4
    tail = len(sigmas) - 1 - steps
    if r_of_c == "consistency":
        look = [1] * steps
    else:  # 2·n(σ') − 1 Heun-rollout evaluations per candidate
        look = [2 * rollout_steps(float(sigmas[i + 1]), 0.05, 10.0, c_steps) - 1 for i in range(steps)]
    rows = sum(batch * (2 + K + K * L) for L in look) + batch * (2 * tail - 1)
    calls = sum(3 + L for L in look) + 2 * tail - 1
    assert (model.calls, model.rows) == (calls, rows)
    expected = dict(network_calls=calls, network_rows=rows, consistency_calls=0, consistency_rows=0,
                    reward_calls=steps, reward_rows=steps * batch * K, forward=rows, backward=0, total=float(rows))
    assert info["nfe"] == expected
    assert demon_cost(sigmas, K=K, batch=batch, r_of_c=r_of_c, c_steps=c_steps, ode_after=0.3) == expected


def test_supplied_consistency_model_and_rollout_sampler_are_used():
    model, x = CountingDenoiser(two_modes()), noise(2)
    lcm = CountingDenoiser(two_modes())
    out, info = sample_demon(model, x, SIGMAS, prefer_rare, K=4, consistency_model=lcm, disable=True,
                             generator=torch.Generator().manual_seed(0), return_info=True)
    steps = info["demon_steps"]
    assert lcm.calls == steps and lcm.rows == steps * 2 * 4
    assert info["nfe"]["consistency_rows"] == lcm.rows
    assert info["nfe"] == demon_cost(SIGMAS, K=4, batch=2, consistency_model=True)
    euler = functools.partial(ka.odeint, method="euler")  # any k-diffusion-convention sampler
    model.calls = 0
    out, info = sample_demon(model, x, SIGMAS, prefer_rare, K=4, r_of_c="baseline", sampler=euler, c_steps=2,
                             disable=True, generator=torch.Generator().manual_seed(0), return_info=True)
    assert torch.isfinite(out).all() and info["nfe"]["network_calls"] < demon_cost(SIGMAS, K=4, r_of_c="baseline",
                                                                                  c_steps=2)["network_calls"]


def test_callback_sees_rewards_weights_and_per_step_tau():
    seen = []
    sample_demon(two_modes(), noise(2), SIGMAS, prefer_rare, K=5, callback=seen.append,
                 generator=torch.Generator().manual_seed(0), disable=True)
    assert [s["i"] for s in seen] == list(range(len(SIGMAS) - 1))
    steered = [s for s in seen if "reward" in s]
    for s in steered:
        assert s["reward"].shape == s["weights"].shape == (2, 5) and s["lookahead"].shape == (2, 5, 2)
        torch.testing.assert_close(s["tau"], s["reward"].std(1).clamp_min(demon.SPREAD_MIN))
    assert len({round(float(s["tau"][0]), 9) for s in steered}) > 1  # τ changes from step to step


@pytest.mark.parametrize("bad,error,match", [
    (lambda x0: torch.full((x0.shape[0],), float("nan")), ValueError, r"NaN or \+inf for 2 images x 3 candidates"),
    (lambda x0: torch.zeros(x0.shape[0] - 1), ValueError, "returned 5 values of shape \\(5,\\) for 2 images x 3"),
    (lambda x0: 1 / 0, ZeroDivisionError, "division"),
])
def test_bad_rewards_fail_clearly_and_leave_the_input_alone(bad, error, match):
    x = noise(2)
    before = x.clone()
    with pytest.raises(error, match=match) as caught:
        sample_demon(two_modes(), x, SIGMAS, bad, K=3, generator=torch.Generator().manual_seed(0), disable=True)
    assert torch.equal(x, before)
    if hasattr(caught.value, "__notes__"):
        assert "Demon candidates at step 0" in caught.value.__notes__[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(K=0), "K must be"), (dict(tau=0.0), "tau must be"), (dict(tau="auto"), "tau must be"),
    (dict(demon_type="spin"), "demon_type"), (dict(r_of_c="lcm"), "r_of_c"), (dict(beta=0.0), "beta"),
    (dict(c_steps=-1), "c_steps"), (dict(ode_after=-1.0), "ode_after"), (dict(max_batch=0), "max_batch"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_demon(two_modes(), noise(1), SIGMAS, prefer_rare, **kwargs)


# ---- DemonGenerator ---------------------------------------------------------------------------------

def offset_pipeline():
    """Condition = a mean offset (as tests/test_pipeline_api.py); an 8×8 grey image per item."""
    base = GaussianDenoiser(torch.zeros(1, 8, 8), 0.5)

    def net(x, sigma, offset):
        return base(x - offset[:, :, None, None], sigma) + offset[:, :, None, None]

    def encode(prompts):
        return {"offset": torch.tensor([[0.0 if p == "" else -0.5 + len(p) / 10] for p in prompts])}

    return Pipeline(CountingDenoiser(net), encode, (1, 8, 8), sigma_min=0.01, sigma_max=10.0)


class Brightest(DemonGenerator):
    def rewards(self, pils):
        return [float(np.asarray(p).mean()) / 255 for p in pils]


def test_generator_writes_a_complete_fresh_run(tmp_path):
    gen = Brightest(cfg=1, K=4, T=8, r_of_c="consistency", ode_after=0.05, seed=3, save_pils=True,
                    experiment_directory=tmp_path, pipeline=offset_pipeline(), disable=True)
    first = gen.generate("abc")
    second = gen.generate("abc")
    assert first["directory"] != second["directory"]  # never clobbered, even within the same second
    folder = first["directory"]
    config = json.loads((folder / "config.json").read_text())
    assert config["K"] == 4 and config["seed"] == 3 and config["prompt"] == "abc"
    for name in ("plain_ode.png", "demon.png", "rewards.png", "result.json", "rewards.csv"):
        assert (folder / name).stat().st_size > 0
    lines = (folder / "rewards.csv").read_text().splitlines()
    assert lines[0] == "step,sigma,mean,std,tau,seconds" and len(lines) == 1 + first["demon_steps"]
    assert len(list((folder / "trajectory").glob("*.png"))) == 4 * first["demon_steps"]
    assert not list(folder.glob(".*.tmp"))
    assert first["demon_reward"] > first["plain_reward"]  # brightness is easy to steer on a Gaussian
    result = json.loads((folder / "result.json").read_text())
    assert result["nfe"]["reward_calls"] == first["demon_steps"]


def test_generator_with_k1_and_baseline_rollout(tmp_path):
    gen = Brightest(K=1, T=6, c_steps=2, seed=0, save_pils=True, experiment_directory=tmp_path,
                    pipeline=offset_pipeline(), disable=True)
    out = gen.generate({"prompts": ["ab", "abcd"], "cfgs": [1.0, 0.5]})
    assert len(list((out["directory"] / "trajectory").glob("*.png"))) == out["demon_steps"]
    assert out["demon"].size == (8, 8)


def test_generator_rejects_a_reward_of_the_wrong_length(tmp_path):
    class Broken(DemonGenerator):
        def rewards(self, pils):
            return [1.0]

    with pytest.raises(ValueError, match="Broken.rewards returned 1 values"):
        Broken(K=3, T=5, experiment_directory=tmp_path, pipeline=offset_pipeline(), disable=True).generate("a")
    with pytest.raises(TypeError, match="abstract"):
        DemonGenerator(pipeline=offset_pipeline())


# ---- Stable Diffusion folder (tiny random weights), command line, animal evaluation script ------------

def tiny_sd_folder(root):
    """A tiny random SD-1.5-like diffusers folder: 8×8×4 latents, 16×16 images, char-level tokenizer."""
    import string

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=16,
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                            skip_prk_steps=True).save_pretrained(root / "scheduler")
    chars = string.ascii_lowercase + " "
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77).save_pretrained(
        root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))


def test_generator_end_to_end_on_a_tiny_sd_folder(sd_folder, tmp_path):
    pipe = ka.from_pretrained(sd_folder, device="cpu")
    gen = Brightest(cfg=2, beta=0.05, K=3, T=5, r_of_c="consistency", ode_after=0.5, seed=42, save_pils=True,
                    experiment_directory=tmp_path, pipeline=pipe, disable=True)
    out = gen.generate("a cat")
    assert out["demon"].size == (16, 16) and out["demon_steps"] >= 1
    assert len(list((out["directory"] / "trajectory").glob("*.png"))) == 3 * out["demon_steps"]
    assert json.loads((out["directory"] / "config.json").read_text())["prompt"] == "a cat"
    # each guided evaluation is one UNet call with CFG rows; the counts follow demon_cost on SD's own grid
    assert out["nfe"] == demon_cost(pipe.sigmas(5), K=3, ode_after=0.5)


def test_cli_demon_on_a_tiny_sd_folder(sd_folder, tmp_path, capsys):
    from kdiff_align.apps.cli import main
    assert main(["demon", "--model", str(sd_folder), "--prompt", "a dog", "--reward", "jpeg", "--K", "2", "--T", "4",
                 "--beta", "0.05", "--ode-after", "1.0", "--out", str(tmp_path), "--no-progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "-JPEG kB (small files): plain ODE" in printed  # --reward jpeg is the old name of jpeg-small
    (run,) = tmp_path.iterdir()
    assert (run / "demon.png").exists() and (run / "rewards.png").exists()


def test_animal_evaluation_script_on_tiny_models(sd_folder, tmp_path, capsys):
    import importlib.util

    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from kdiff_align.image import from_pil
    from kdiff_align.rewards import AestheticHead, AestheticScorer
    path = Path(__file__).parents[1] / "scripts" / "demon_animals.py"
    spec = importlib.util.spec_from_file_location("demon_animals", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert len(script.ANIMALS) == 45 == len(set(script.ANIMALS))
    torch.manual_seed(0)
    clip = tmp_path / "clip"  # tiny random CLIP that projects to 768, as ViT-L/14 does for the aesthetic head
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                          num_attention_heads=4, max_position_embeddings=77),
                         vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=16, patch_size=8),
                         projection_dim=768)).save_pretrained(clip)
    head = AestheticHead(768)
    with torch.no_grad():
        for layer in head.layers:  # default init shrinks ~3× per layer: undo it so images score apart
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3.0)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    out = tmp_path / "animals"
    assert script.main(["--model", str(sd_folder), "--clip", str(clip), "--mlp", str(tmp_path / "head.safetensors"),
                        "--out", str(out), "--limit", "2", "--K", "2", "--T", "4", "--beta", "0.05",
                        "--r-of-c", "consistency", "--ode-after", "1.0", "--device", "cpu", "--no-progress"]) == 0
    lines = (out / "animals.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["prompt", "cat", "dog"]
    assert "| Demon |" in (out / "animals.md").read_text()
    from PIL import Image
    row = lines[1].split(",")
    scorer = AestheticScorer(clip, tmp_path / "head.safetensors")
    with torch.no_grad():
        again = scorer(from_pil(Image.open(Path(row[5]) / "plain_ode.png").convert("RGB"))).item()
    # the table's plain score is the scorer's value of that image: the PNG is uint8-rounded (±1/255 per
    # pixel) while the table scored the float decode; measured gap 1.2e-3, against 0.03 between the two
    # prompts' plain images, so 5e-3 tells this image's score from another's
    assert again == pytest.approx(float(row[1]), abs=5e-3)


@pytest.mark.slow
def test_demon_on_the_shipped_fashion_model(tmp_path, capsys):
    from kdiff_align import toy
    from kdiff_align.apps.cli import main
    pipe = toy.load("fashion")
    reward = toy.classifier_reward(pipe, "sandal")
    guided = pipe.guided({"prompts": ["sneaker"], "cfgs": [1.0]})
    # start at σ = 20 (pure noise for data of std 0.5) so that β·|Δσ| ≤ 1 on 8 steps with β = 0.05
    sigmas = pipe.sigmas(8, start_t=20.0)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 20.0
    plain = ka.odeint(guided, x, sigmas, disable=True)
    out = sample_demon(guided, x, sigmas, reward, K=4, beta=0.05, generator=torch.Generator().manual_seed(1),
                       disable=True)
    with torch.no_grad():
        gain = (reward(out) - reward(plain)).mean()
    # measured mean gains of the "sandal" logit 1.34 and 1.40 (two seeds; plain 1.15); the per-image gains
    # spread by ~1, so the mean of 6 has a std ~0.4: 0.4 is two such stds below the measured gain
    assert gain > 0.4 and out.abs().max() < 3
    assert main(["demon", "--model", "toy", "--prompt", "sneaker", "--reward", "classifier", "--reward-class", "sandal",
                 "--K", "2", "--T", "5", "--out", str(tmp_path), "--no-progress", "--save-pils"]) == 0  # β auto
    # (--beta 0.01 diverged here, RMS 86 at σ = 2.5, and check_state now stops it)
    (run,) = tmp_path.iterdir()
    steps = json.loads((run / "result.json").read_text())["demon_steps"]
    assert len(list((run / "trajectory").glob("*.png"))) == 2 * steps
    assert "classifier logit of 'sandal': plain ODE" in capsys.readouterr().out


def _shifted(x, sigma, shift):
    """The exact denoiser of data N(shift, 0.25 I), with conditioning ``shift`` of batch 1 or of x's batch."""
    return GaussianDenoiser(torch.zeros(2), 0.5)(x - shift, sigma) + shift


@pytest.mark.parametrize("max_batch", [3, 8, 50])
@pytest.mark.parametrize("cond_rows", [1, 4])
def test_max_batch_with_batch_one_or_batch_b_conditioning_equals_one_call(max_batch, cond_rows):
    """B = 4 items × K = 2 candidates (8 rows per candidate call), ``max_batch`` below, at and above: the
    chunked run equals the unchunked one (same row arithmetic; 1e-6 covers float32 reassociation)."""
    x = noise(4)
    shift = torch.tensor([[1.0, -1.0]]) if cond_rows == 1 else torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    kw = dict(K=2, disable=True, extra_args={"shift": shift})
    full = sample_demon(_shifted, x, SIGMAS, prefer_rare, generator=generators([1, 2, 3, 4]), **kw)
    chunked = sample_demon(_shifted, x, SIGMAS, prefer_rare, generator=generators([1, 2, 3, 4]), max_batch=max_batch, **kw)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)


def test_digits_model_with_one_class_label_and_max_batch_runs_like_one_call():
    """The review's crash: the digits denoiser, class_labels = tensor([3]), B = 4, K = 2, max_batch = 3 raised a
    size mismatch (8 vs 6). Chunked equals unchunked up to float32 reassociation in the UNet's convolutions."""
    from kdiff_align import toy
    pipe = toy.load("digits")
    sigmas = pipe.sigmas(4)
    x = pipe.get_init_latent(4, generator=torch.Generator().manual_seed(0))
    # beta="auto": β = 0.01 here diverged (RMS 393 at σ = 9.7), which check_state now stops
    kw = dict(K=2, beta="auto", disable=True, extra_args={"class_labels": torch.tensor([3])}, ode_after=0.0)
    reward = lambda x0: x0.flatten(1).mean(1)  # noqa: E731
    full = sample_demon(pipe.denoiser, x, sigmas, reward, generator=generators([1, 2, 3, 4]), **kw)
    chunked = sample_demon(pipe.denoiser, x, sigmas, reward, generator=generators([1, 2, 3, 4]), max_batch=3, **kw)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)


def test_combine_noise_keeps_float64_precision():
    """float64 noises are combined in float64: z* equals the definition √N·s/‖s‖ evaluated in float64 to
    1e-12 (a float32 pass, as before, is off by ~1e-7)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 5, generator=g, dtype=torch.float64)
    s = (b[:, :, None, None] * z).sum(1)
    expected = s * math.sqrt(16) / s.flatten(1).norm(dim=1)[:, None, None]
    out = combine_noise(z, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---- the seed's generator snippet, default pipeline, grid -----------------------------------------

def test_seed_snippet_runs_with_the_default_toy_pipeline_and_writes_the_seed_files(tmp_path, monkeypatch):
    """The seed README's call, spelled ``DemonGenerater`` and without ``pipeline=`` (T and K shrunk from
    64/16 to keep the test quick, and beta="auto" because β = 0.1 diverges on 8 steps from σ = 80, which
    ``check_state`` stops; the as-written call is ``test_seed_snippet_exactly_as_written``). Default: the toy
    Fashion model."""
    from kdiff_align.align.demon import MODEL_ENV, DemonGenerater
    monkeypatch.delenv(MODEL_ENV, raising=False)

    class YourRewardGenerator(DemonGenerater):
        def rewards(self, pils):
            return [float(np.asarray(p).mean()) for p in pils]

    generator = YourRewardGenerator(beta="auto", tau="adaptive", K=4, T=8, demon_type="tanh", r_of_c="consistency",
                                    ode_after=0.11, cfg=2, save_pils=True, experiment_directory=tmp_path)
    out = generator.generate(prompt="sneaker")
    folder = out["directory"]
    for name in ("init.png", "out.png", "expected_reward.txt", "expected_reward.png", "plain_ode.png", "demon.png"):
        assert (folder / name).stat().st_size > 0
    lines = (folder / "expected_reward.txt").read_text().splitlines()
    assert len(lines) == out["demon_steps"] and all(len(line.split()) == 4 for line in lines)  # mean std sigma seconds
    mean, std, sigma, _ = map(float, lines[0].split())
    info = out["info"]
    assert sigma == pytest.approx(float(info["sigma"][0]), rel=1e-5)
    assert mean == pytest.approx(float(info["reward_mean"][0, 0]), rel=1e-5)
    assert (folder / "init.png").read_bytes() == (folder / "plain_ode.png").read_bytes()
    only_ode = generator.generate(prompt="sneaker", ode=True)
    assert (only_ode["directory"] / "init.png").exists() and not (only_ode["directory"] / "out.png").exists()


def test_default_pipeline_errors_name_what_is_missing(tmp_path, monkeypatch):
    from kdiff_align.align.demon import MODEL_ENV
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match=MODEL_ENV):
        Brightest(experiment_directory=tmp_path)
    monkeypatch.delenv(MODEL_ENV)
    with pytest.raises(ValueError, match=f"not classes of the default pipeline.*{MODEL_ENV}"):
        Brightest(K=2, T=4, experiment_directory=tmp_path, disable=True).generate("an astronaut riding a horse")
    with pytest.raises(ValueError, match="grid"):
        Brightest(grid=(0.002, 14.0), pipeline=offset_pipeline())


def sd_range_pipeline():
    """A pipeline with Stable Diffusion's σ range (scaled-linear betas: 14.6146 → 0.029167)."""
    pipe = offset_pipeline()
    pipe.sigma_max, pipe.sigma_min = 14.614641, 0.029167
    return pipe


@pytest.mark.parametrize("grid, steps, rollout, tweedie", [("reference", 45, 20_575, 1_567), ("model", 54, 22_207, 1_855)])
def test_quoted_sd_costs_hold_on_the_grid_they_name(grid, steps, rollout, tweedie):
    """The costs quoted in README/docs/bench (reference grid) and the review's (SD's own range) at K = 16, T = 64."""
    for r_of_c, rows in (("baseline", rollout), ("consistency", tweedie)):
        gen = Brightest(K=16, T=64, r_of_c=r_of_c, grid=grid, pipeline=sd_range_pipeline())
        sigmas = gen.sigmas()
        assert demon.demon_steps(sigmas, 0.11) == steps and gen.cost()["network_rows"] == rows
    assert float(sigmas[0]) == pytest.approx(14.6488 if grid == "reference" else 14.614641, rel=1e-6)


def test_reference_grid_run_spends_what_demon_cost_says(tmp_path):
    """A run on grid="reference" uses the 14.6488 → 0.002 Karras grid; its counted NFE equal ``cost()``."""
    gen = Brightest(K=3, T=6, r_of_c="consistency", grid="reference", seed=0, experiment_directory=tmp_path,
                    pipeline=sd_range_pipeline(), disable=True)
    out = gen.generate("abc")
    assert out["grid"] == pytest.approx([14.6488, 0.002])
    assert out["nfe"] == out["cost"] == demon_cost(ka.get_sigmas_karras(6, 2e-3, 14.6488), K=3, ode_after=0.11)
    assert json.loads((out["directory"] / "config.json").read_text())["grid"] == "reference"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:beta=0.1 with Demon steps")  # σ_max = 80 on the toy model: coarse first steps
def test_seed_snippet_exactly_as_written(tmp_path, monkeypatch):
    """The seed README's constructor call verbatim (K = 16, T = 64, save_pils=True; 16–41 s on one core): it runs
    on the default toy model, and its counted NFE equal ``demon_cost`` on the grid it used."""
    from kdiff_align.align.demon import MODEL_ENV, DemonGenerater
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)

    class YourRewardGenerator(DemonGenerater):
        def rewards(self, pils):
            return [float(np.asarray(p).mean()) for p in pils]

    generator = YourRewardGenerator(
        beta=0.1,
        tau="adaptive",
        K=16,
        T=64,
        demon_type="tanh",  # or "boltzmann", "optimal"
        r_of_c="consistency",  # or "baseline"
        # c_steps=20, # Meaningful only when r_of_c="baseline"
        ode_after=0.11,  # Recommended value for Stable Diffusion
        cfg=2,  # Recommended value in (0, 5]
        save_pils=True,
        experiment_directory="experiments/your_experiment",
    )
    out = generator.generate(prompt="sneaker")
    assert (tmp_path / out["directory"]).parent == tmp_path / "experiments" / "your_experiment"
    assert out["nfe"] == generator.cost() and (out["directory"] / "out.png").exists()
    assert len(list((out["directory"] / "trajectory").glob("*.png"))) == 16 * out["demon_steps"]
