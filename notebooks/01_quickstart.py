# %% [markdown]
# # Quick start
# Schedules, the three integrators, inversion, multi-prompt classifier-free guidance and the PIL
# converters, checked on closed-form models where the exact answer is known.

# %%
import torch

import kdiff_align as ka
from kdiff_align.testing import GaussianDenoiser, MixtureDenoiser

torch.set_num_threads(1)  # one thread: small nets stall with two on 2-vCPU machines

# %% [markdown]
# ## Schedules
# A sampling grid is decreasing and ends in exactly one 0; `revert_sigmas` gives the inversion grid.

# %%
sigmas = ka.get_sigmas_karras(30, 0.002, 20.0)
print("karras", sigmas[:4].tolist(), "...", sigmas[-3:].tolist())
print("exponential", ka.get_sigmas_exponential(5, 0.01, 10.0).tolist())
print("inversion grid", ka.revert_sigmas(ka.get_sigmas_karras(4, 0.1, 10.0)).tolist())

# %% [markdown]
# ## `odeint`, `sdeint` on a Gaussian mixture
# The mixture's exact mode weights are 0.7 / 0.3; every integrator should find them.

# %%
model = MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.3, 0.5]), torch.tensor([0.7, 0.3]))
x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
runs = {
    "odeint euler": lambda: ka.odeint(model, x_T, sigmas, method="euler", disable=True),
    "odeint heun": lambda: ka.odeint(model, x_T, sigmas, method="heun", disable=True),
    "odeint dopri5": lambda: ka.odeint(model, x_T, sigmas, method="dopri5", disable=True),
    "sdeint DDPM (eta=1)": lambda: ka.sdeint(model, x_T, sigmas, generator=torch.Generator().manual_seed(1),
                                             disable=True),
    "sdeint beta=0.1": lambda: ka.sdeint(model, x_T, sigmas, beta=0.1, generator=torch.Generator().manual_seed(1),
                                         disable=True),
}
for name, run in runs.items():
    x0 = run()
    print(f"{name:<22}", [round(w, 3) for w in (torch.bincount(model.classify(x0), minlength=2) / len(x0)).tolist()])

# %% [markdown]
# ## Exactness on a Gaussian, and inversion
# For N(μ, s²) data the probability-flow ODE has a closed form, `GaussianDenoiser.flow`.

# %%
gauss = GaussianDenoiser(torch.tensor([1.0, -1.0]), 0.5).double()
grid = ka.get_sigmas_karras(40, 0.002, 20.0).double()
x_T64 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 20
exact = gauss(gauss.flow(x_T64, grid[0], grid[-2]), grid[-2].expand(8))
for method in ("euler", "heun", "rk4"):
    print(method, "max error", (ka.odeint(gauss, x_T64, grid, method=method, disable=True) - exact).abs().max().item())

x0 = ka.odeint(model, x_T, sigmas, disable=True)
x_back = ka.oderevert(model, x0, ka.revert_sigmas(sigmas), disable=True)
print("relative inversion error", ((x_back - x_T).norm() / x_T.norm()).item())

# %% [markdown]
# ## Multi-prompt classifier-free guidance
# A condition is `{"prompts": [...], "cfgs": [...]}`; all prompts and the unconditional branch go
# through the network in one call. Here the "network" pulls samples towards a prompt-dependent mean.

# %%
base = GaussianDenoiser(torch.zeros(2), 0.5)
calls = []


def net(x, sigma, mean):
    calls.append(x.shape[0])
    return base(x - mean, sigma) + mean


def encode(prompts):
    table = {"": [0.0, 0.0], "left": [-2.0, 0.0], "up": [0.0, 2.0]}
    return {"mean": torch.tensor([table[p] for p in prompts])}


guided = ka.condition_denoiser(net, {"prompts": ["left", "up"], "cfgs": [1.0, 0.5]}, encode)
x0 = ka.odeint(guided, torch.randn(500, 2, generator=torch.Generator().manual_seed(3)) * 20, sigmas, disable=True)
print("guided mean", x0.mean(0).tolist(), "(expected 1·(-2, 0) + 0.5·(0, 2) = (-2, 1))")
print("rows per network call:", set(calls), "= (2 prompts + uncond) x 500")

# %% [markdown]
# ## PIL converters
# `to_pil` returns a list (no batch-1 assumption) and `from_pil` inverts it exactly on uint8 values.

# %%
images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
pils = ka.to_pil(images)
back = ka.from_pil(pils)
print(len(pils), pils[0].size, pils[0].mode, "max round-trip error", (back - images).abs().max().item(), "<= 1/255")
