# %% [markdown]
# # Flow-matching models (SD3-style rectified flow)
# A rectified-flow model predicts a velocity v = ε − x₀ at x_t = (1 − t)·x₀ + t·ε. `FlowDenoiser` turns it
# into an ordinary denoiser D(x, σ) with σ = t/(1 − t) and x = x_t/(1 − t), so every sampler and every
# alignment method of the package runs on it unchanged. We check this on a closed-form flow model
# (the exact velocity of a Gaussian mixture), then load a tiny random-weight SD3 folder.

# %%
import string
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import kdiff_align as ka
from kdiff_align.align import demon, smc
from kdiff_align.external import FlowDenoiser
from kdiff_align.image import save_figure
from kdiff_align.schedules import get_sigmas_flow
from kdiff_align.models.sd3 import FlowPipeline
from kdiff_align.testing import MixtureDenoiser

torch.set_num_threads(1)  # tiny models: threads only add overhead
mixture = MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2]))


class ExactVelocity(torch.nn.Module):
    """v(x_t, 1000·t) = E[ε − x₀ | x_t] of the mixture: what a perfectly trained flow model would output."""

    def forward(self, x_t, t_scaled):
        t = (t_scaled / 1000)[:, None]
        sigma = t / (1 - t)
        x = x_t / (1 - t)
        x0 = mixture(x, sigma[:, 0])
        return (x - x0) / sigma - x0


model = FlowDenoiser(ExactVelocity(), t_scale=1000.0)
x, sigma = torch.randn(5, 2) * 3, torch.tensor([0.01, 0.5, 1.0, 5.0, 50.0])
print("max |D_flow − D_mixture| =", (model(x, sigma) - mixture(x, sigma)).abs().max().item())

# %% [markdown]
# ## The schedule
# SD3 spaces t uniformly and shifts it, t ↦ s·t/(1 + (s − 1)·t) with s = 3, spending more steps at high
# noise. t = 1 is σ = ∞, so the grid starts at t_max < 1 (0.999 before the shift: σ ≈ 3000).

# %%
sigmas = get_sigmas_flow(8, shift=3.0)
for s in sigmas.tolist():
    print(f"σ = {s:9.3f}   t = {s / (1 + s):.4f}")

# %% [markdown]
# ## Sampling, Demon and SMC on the flow model
# A `FlowPipeline` is a `Pipeline` whose `sigmas(steps, start_t)` is this schedule. The Euler step in σ is
# exactly the flow's Euler step x_t' = x_t + (t' − t)·v (diffusers' `FlowMatchEulerDiscreteScheduler`).

# %%
pipe = FlowPipeline(model, lambda prompts: {}, (2,), shift=3.0)
x_T = pipe.get_init_latent(2000, generator=torch.Generator().manual_seed(0))  # x_t = ε at the first t
x0 = ka.odeint(model, x_T, pipe.sigmas(30), disable=True)
print("mode weights", (torch.bincount(mixture.classify(x0), minlength=2) / len(x0)).tolist(), "(exact 0.8, 0.2)")

# Demon steers towards the rare mode m = (2, 0), with no change to the method. We report the distance
# to m: samples of that mode (std 0.5 per coordinate) lie at 0.63 ± 0.33 from it (a Rayleigh law).
mode = torch.tensor([2.0, 0.0])


def distance_to_mode(x):
    d = (x - mode).norm(dim=1)
    return f"distance to (2, 0): {d.mean():.2f} ± {d.std():.2f}"


demon_sigmas = get_sigmas_flow(24, shift=3.0, t_max=0.9)
x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * demon_sigmas[0]
rare = x0[mixture.classify(x0) == 1]
print("plain, samples of the +2 mode:", distance_to_mode(rare))
# reward r = −‖x₀ − m‖²: bounded above, highest at the mode
steered = demon.sample_demon(model, x_T, demon_sigmas, lambda x0: -(x0 - mode).square().sum(1), K=6,
                             generator=torch.Generator().manual_seed(2), disable=True)
print("Demon, r = −‖x₀ − m‖²:", distance_to_mode(steered))
# reward r = x₀[0]: unbounded, so Demon keeps climbing past the mode, off the data
climbing = demon.sample_demon(model, x_T, demon_sigmas, lambda x0: x0[:, 0], K=6,
                              generator=torch.Generator().manual_seed(2), disable=True)
print(f"Demon, r = x₀[0]: {distance_to_mode(climbing)}; "
      f"x₀[0] = {climbing[:, 0].mean():.2f} ± {climbing[:, 0].std():.2f}")

# SMC targets p(x₀)·exp(r(x₀)/α): with r = x₀[0] and α = 1 the rare mode's weight rises
smc_sigmas = get_sigmas_flow(20, shift=3.0, t_max=0.99)
res = smc.sample_smc(model, torch.randn(1, 512, 2, generator=torch.Generator().manual_seed(3)) * smc_sigmas[0],
                     smc_sigmas, lambda x0: x0[:, 0], num_particles=512, alpha=1.0, disable=True,
                     generator=torch.Generator().manual_seed(4))
w, in_rare = res.log_weights.exp()[0], mixture.classify(res.x0[0]) == 1
# the tilted law's weight of the +2 mode is 0.2·e^(2 + 1/8) / (0.2·e^(2 + 1/8) + 0.8·e^(−2 + 1/8)) = 0.93, and
# within it x₀[0] ~ N(2 + 0.25, 0.25): the tilt e^x shifts a N(2, 0.5²) coordinate by 0.5² = 0.25
mean_rare = (w * in_rare * res.x0[0, :, 0]).sum() / (w * in_rare).sum()
print(f"SMC: weighted fraction in the +2 mode {(w * in_rare).sum():.3f} (tilt: 0.93); "
      f"its weighted mean x₀[0] {mean_rare:.3f} (tilt: 2.25)")

fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharex=True, sharey=True)
axes[0].scatter(*x0[:500].T, s=3)
axes[0].set_title("Euler on the flow schedule")
axes[1].scatter(*climbing.T, s=3, color="C3", label="r = x₀[0]")
axes[1].scatter(*steered.T, s=3, color="C1", label="r = −‖x₀ − m‖²")
axes[1].set_title("Demon")
axes[1].legend(fontsize=8, markerscale=3)
save_figure(fig, "07_flow_samples.png")

# %% [markdown]
# Demon is a reward maximiser, not a sampler of a tilted law: with the bounded reward its samples gather
# at the mode, far tighter than the mode's own spread; with the unbounded x₀[0] they leave the data
# altogether (several mode standard deviations beyond +2). The same happens on the plain mixture denoiser
# with the same grid, so this is the method, not the flow wrapper. SMC instead approximates the tilted
# law p(x₀)·e^(x₀[0]), whose +2 component stays a Gaussian of std 0.5 centred at 2.25 (one run of 512
# particles: expect a few hundredths of Monte Carlo error in both printed figures).

# %% [markdown]
# ## An SD3 folder
# `ka.from_pretrained` recognises SD3 folders (model_index.json's `StableDiffusion3Pipeline`, or a
# `transformer/` folder) and returns a `FlowPipeline`: two CLIP encoders with projections, T5 optional,
# the VAE's scaling and shift factors, the scheduler's shift. Here a tiny random-weight folder, written with
# diffusers' `save_pretrained` (no T5), stands in for `stabilityai/stable-diffusion-3-medium-diffusers`.

# %%
import diffusers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

chars = string.ascii_lowercase + "."
vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}


def clip(seed):
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))


torch.manual_seed(0)
folder = Path(tempfile.mkdtemp()) / "tiny-sd3"
diffusers.StableDiffusion3Pipeline(
    transformer=diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8),
    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    vae=diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                scaling_factor=1.5, shift_factor=0.1),
    text_encoder=clip(1), tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), text_encoder_2=clip(2),
    tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), text_encoder_3=None, tokenizer_3=None,
).save_pretrained(folder)

sd3 = ka.from_pretrained(folder, device="cpu")
print(type(sd3).__name__, "shift", sd3.shift, "σ_max", round(sd3.sigma_max, 1), "T5:", sd3.text_encoder_3)

# %% [markdown]
# The seed's notebook API, unchanged: three-prompt CFG in one transformer call per evaluation, inversion,
# SDEdit from σ = 14 (t = 0.93).

# %%
condition = {"prompts": ["on moon", "astronaut", "riding a donkey"], "cfgs": [3, 2, 4]}
x = sd3.odeint(sd3.get_init_latent(generator=torch.Generator().manual_seed(0)), condition, 10, disable=True)
pil = sd3.from_latent_to_pil(x)[0]

old = {"prompts": ["an astronaut riding a horse on mars."], "cfgs": [5]}
x = sd3.oderevert(sd3.from_pil_to_latent(pil), old, start_t=14, steps=10, disable=True)
x = sd3.sdeint(x, condition, 0.125, 10, start_t=14, generator=torch.Generator().manual_seed(1), disable=True)
print("SDEdit latent", tuple(x.shape), "image", sd3.from_latent_to_pil(x)[0].size)
