# %% [markdown]
# # SMC tempering on an exactly solvable problem
# `sample_smc` targets p_θ(x₀)·exp(r(x₀)/α) with tempered, twisted sequential Monte Carlo: DAS
# (Kim et al. 2025; reward-gradient *guided* proposal) or Feynman–Kac steering (Singhal et al. 2025;
# gradient-free *prior* proposal). To see whether it hits the target we need a case where the target
# is known in closed form:
#
# * data N(m, I) in 2-D with its exact denoiser (`GaussianDenoiser`), so the S-step ancestral (DDPM)
#   chain from N(0, σ₀²I) is linear-Gaussian and its output law N(μ_S, V_S·I) can be computed exactly
#   (with 20 steps V_S ≈ 0.6, not 1: the *discretised* chain is p_θ here, and SMC must tilt that);
# * a quadratic reward r(x) = −‖x − c‖²/2, so the tilted law ∝ N(μ_S, V_S)·exp(r/α) is Gaussian again,
#   with a closed-form normalising constant Z.

# %%
import math

import matplotlib.pyplot as plt
import torch

import kdiff_align as ka
from kdiff_align.align import smc
from kdiff_align.image import save_figure
from kdiff_align.testing import GaussianDenoiser

torch.set_num_threads(1)  # one thread: small nets stall with two on 2-vCPU machines
m, c, alpha = torch.tensor([1.0, -0.5]), torch.tensor([2.0, 1.0]), 0.3
model = GaussianDenoiser(m, 1.0)
sigmas = ka.get_sigmas_karras(20, 0.002, 80.0)


def reward(x):
    return -((x - c.to(x)) ** 2).sum(1) / 2


def chain_law(sigmas, m, s2=1.0):
    """Mean and per-dim variance of the η = 1 ancestral chain from N(0, σ₀²I) with the exact denoiser."""
    mu, var, m = torch.zeros_like(m, dtype=torch.float64), float(sigmas[0]) ** 2, m.double()
    for sigma, nxt in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        k = s2 / (s2 + sigma**2)  # D(x, σ) = m + k (x − m)
        if nxt == 0:
            return m + k * (mu - m), k * k * var
        up2 = nxt**2 * (sigma**2 - nxt**2) / sigma**2
        a = k + (nxt**2 - up2) ** 0.5 / sigma * (1 - k)
        mu, var = m + a * (mu - m), a * a * var + up2


mu, var = chain_law(sigmas, m)
v_tilt = 1 / (1 / var + 1 / alpha)
mean_tilt = v_tilt * (mu / var + c.double() / alpha)
log_z = len(m) / 2 * math.log(alpha / (var + alpha)) - float(((mu - c.double()) ** 2).sum()) / (2 * (var + alpha))
print(f"untilted chain N({mu.tolist()}, {var:.4f}); tilted N({mean_tilt.tolist()}, {v_tilt:.4f}); log Z = {log_z:.4f}")

# %% [markdown]
# ## FK (prior proposal) vs DAS (guided proposal)
# 100 independent SMC runs ("groups") of 64 particles each, all in one call, with the DAS exponential
# tempering schedule for both proposals, so that only the proposal differs.

# %%
groups, n = 100, 64
x_T = torch.randn(groups, n, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
runs = {}
for label, proposal in (("FK (prior)", "prior"), ("DAS (guided)", "guided")):
    runs[label] = smc.sample_smc(model, x_T, sigmas, reward, num_particles=n, alpha=alpha, proposal=proposal,
                                 disable=True, generator=torch.Generator().manual_seed(1))


def weighted_mean(res):
    return (res.log_weights.exp()[..., None] * res.x0.double()).sum(1)


print(f"{'':14}{'RMSE of mean':>14}{'final ESS':>11}{'resamplings':>13}{'logẐ−logZ':>11}{'± sd':>7}{'mean Ẑ/Z':>10}")
for label, res in runs.items():
    err = (weighted_mean(res) - mean_tilt).norm(dim=1)
    dz = res.log_Z - log_z
    print(f"{label:14}{err.pow(2).mean().sqrt():>14.4f}{res.ess[-1].mean():>11.1f}"
          f"{res.resampled.sum(0).float().mean():>13.2f}{dz.mean():>11.4f}{dz.std():>7.3f}{dz.exp().mean():>10.3f}")

# %% [markdown]
# ## Weighted particles vs the analytic tilted density
# Pooling the weighted particles of all runs (each run's weights sum to 1) gives a histogram of each
# coordinate that should follow the tilted marginal N(mean_tilt_j, v_tilt); the untilted chain law is
# shown for scale.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for j, ax in enumerate(axes):
    grid = torch.linspace(float(mu[j]) - 4 * var**0.5, float(mu[j]) + 4 * var**0.5, 300, dtype=torch.float64)
    for label, res in runs.items():
        w = (res.log_weights.exp() / groups).flatten()
        ax.hist(res.x0[..., j].flatten().numpy(), bins=60, weights=w.numpy(), density=True, histtype="step",
                lw=1.5, label=label)
    for mean_j, v, style, name in ((mean_tilt[j], v_tilt, "k-", "exact tilted"), (mu[j], var, "k:", "untilted")):
        ax.plot(grid, torch.exp(-(grid - mean_j) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v), style, label=name)
    ax.set(xlabel=f"x[{j}]", ylabel="density", title=f"coordinate {j}, α = {alpha}")
    ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "04_smc_tilted_marginals.png")

# %% [markdown]
# ## ESS and λ traces
# Left: the effective sample size after each reweighting (mean over runs; a drop below N/2 triggers
# resampling). Right: the tempering λ_i, the fixed exponential DAS schedule, and the adaptive schedule
# (bisection on the conditional ESS). Here the adaptive schedule jumps to λ = 1 at once: at high σ the
# look-ahead rewards of the particles barely differ, so full tempering costs no ESS there, and the
# weight degeneracy (and resampling) is met later, when the particles' rewards separate.

# %%
adaptive = smc.sample_smc(model, x_T, sigmas, reward, num_particles=n, alpha=alpha, proposal="prior",
                          tempering="adaptive", disable=True, generator=torch.Generator().manual_seed(1))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for label, res in {**runs, "FK, adaptive λ": adaptive}.items():
    axes[0].plot(res.ess.mean(1), "o-", ms=3, label=label)
axes[0].axhline(n / 2, color="gray", ls="--", label="resampling threshold")
axes[0].set(xlabel="step", ylabel="ESS (mean over runs)", ylim=(0, n * 1.05), title="effective sample size")
axes[0].legend(fontsize=8)
axes[1].plot(runs["FK (prior)"].lambdas[:, 0], "k-o", ms=3, label="exp (DAS) schedule")
axes[1].plot(adaptive.lambdas[:, :10], color="C2", alpha=0.5)
axes[1].plot([], [], color="C2", label="adaptive (10 runs)")
axes[1].set(xlabel="step", ylabel="λ", title="tempering")
axes[1].legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "04_smc_ess_lambda.png")
dz = adaptive.log_Z - log_z
print(f"adaptive FK: final ESS {adaptive.ess[-1].mean():.1f}, "
      f"resamplings {adaptive.resampled.sum(0).float().mean():.2f}, logẐ − logZ {dz.mean():.4f} ± {dz.std():.3f}")

# %% [markdown]
# ## log Ẑ against the exact log Z
# Ẑ (the product of the mean incremental weights) is an unbiased estimate of Z, so log Ẑ is biased
# low by about half its variance; the histogram shows the spread of log Ẑ over the 100 runs.

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for label, res in {**runs, "FK, adaptive λ": adaptive}.items():
    ax.hist(res.log_Z.numpy(), bins=25, histtype="step", lw=1.5, label=label)
ax.axvline(log_z, color="k", label="exact log Z")
ax.set(xlabel="log Ẑ", ylabel="runs")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "04_smc_log_z.png")

# %% [markdown]
# ## What we see
# * Both proposals put the weighted particles on the analytic tilted density, far from the untilted
#   chain law: the target p_θ·exp(r/α) is reached whatever the proposal, because the weights correct it.
# * The guided (DAS) proposal already moves particles towards high reward, so its weights stay even:
#   its ESS hardly ever falls below N/2, so it almost never resamples (the prior proposal resamples
#   about twice per run, and the adaptive schedule, which spends weight degeneracy on purpose, about
#   five times), and it estimates the tilted mean and especially log Z (3× smaller spread) more
#   precisely than the prior (FK) proposal, at the price of one reward gradient per particle and step.
#   The final ESS alone does not show this: FK has just resampled, which resets its ESS to N.
# * log Ẑ scatters around the exact log Z for every variant (Ẑ/Z averages to about 1): the
#   normalising constant, i.e. E_p[exp(r/α)], comes for free from an SMC run.
