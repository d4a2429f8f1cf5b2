"""The seed's ``DemonGenerator``: Sampling Demon on one prompt of a ``Pipeline``, written to a run folder.

Subclass it with ``rewards(pils)`` (or use ``RewardDemon`` with a tensor reward) and call
``generate(prompt)``: each call makes a fresh folder with the plain PF-ODE image, the Demon image, the
reward per step (CSV and plot) and the run's settings, every file written atomically.
"""
from __future__ import annotations

import abc
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ... import sampling, schedules
from ...models import from_pretrained, toy
from ...rewards import check_rewards
from ...utils import atomic_write
from .sampler import demon_cost, sample_demon

REFERENCE_GRID = (14.6488, 2e-3)  # (σ_max, σ_min) of the Demon reference's Karras grid for Stable Diffusion
MODEL_ENV = "KDIFF_ALIGN_MODEL"  # DemonGenerator's default model: a local diffusers folder or toy:NAME


def _fresh_directory(root: Path, prompt: str) -> Path:
    """A new run folder ``<root>/<time>_<prompt>`` (``-2``, ``-3``, ... if taken); never reuses one."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:40] or "run"
    stem = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{slug}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {root}")


def plot_rewards(info: dict, path: Path, ylabel: str = "Reward", title: str = "") -> Path:
    """Expected reward (mean ± std of the K look-aheads) against σ, log-x, σ decreasing left to right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sigma, mean, std = info["sigma"].numpy(), info["reward_mean"].numpy(), info["reward_std"].numpy()
    for b in range(mean.shape[1] if mean.ndim == 2 else 0):
        ax.errorbar(sigma, mean[:, b], yerr=std[:, b], fmt="o-", ms=3, capsize=2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ after the step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def default_pipeline(device=None):
    """DemonGenerator's pipeline when none is given: ``$KDIFF_ALIGN_MODEL`` (a local diffusers folder, or
    ``toy:NAME``) if set, else the shipped toy Fashion-MNIST model (prompts are its class names)."""
    spec = os.environ.get(MODEL_ENV, "").strip()
    if not spec or spec == "toy" or spec.startswith("toy:"):
        return toy.load(spec.partition(":")[2] or "fashion", device=device or "cpu")
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{MODEL_ENV}={spec!r} is not a folder: set it to a local Stable Diffusion "
                                "diffusers folder or to toy:NAME, or pass pipeline=")
    return from_pretrained(spec, device=device)


def karras_grid(pipeline, T: int, grid="model") -> Tensor:
    """The T-point Karras grid (then 0) of a Demon run: the model's own σ range, the reference's, or (σ_max, σ_min)."""
    if grid == "model":
        return pipeline.sigmas(T)
    sigma_max, sigma_min = REFERENCE_GRID if grid == "reference" else grid
    return schedules.get_sigmas_karras(T, sigma_min, sigma_max, device=pipeline.device)


def _check_grid(grid) -> None:
    if grid in ("model", "reference"):
        return
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, (int, float)) for v in grid)
    if not ok or not grid[0] > grid[1] > 0:
        raise ValueError(f"grid must be 'model', 'reference' or (sigma_max, sigma_min) with sigma_max > sigma_min > 0, "
                         f"got {grid!r}")


def _json_beta(betas: list) -> list[float] | str:
    """The β of each Demon step for result.json (numbers), or the β's text when it is a name or a callable."""
    return [float(b) for b in betas] if all(isinstance(b, (int, float)) for b in betas) else str(betas[0])


class DemonGenerator(abc.ABC):
    """The seed's ``DemonGenerater`` (also importable under that name): subclass it, override
    ``rewards(pils)``, call ``generate(prompt)``.

    Each ``generate`` writes a fresh folder under ``experiment_directory`` with ``config.json``,
    ``plain_ode.png`` (PF-ODE from the same initial noise), ``demon.png``, ``rewards.csv`` (per step:
    σ, mean, std, τ, seconds), its plot ``rewards.png``, ``result.json`` (final rewards, NFE, the β of each
    step, the grid and its ``demon_cost``) and, with ``save_pils``, ``trajectory/step<i>_k<k>.png`` (the
    look-ahead of every candidate). The seed's names are written too: ``init.png``, ``out.png``, ``expected_reward.txt``
    (lines ``mean std sigma seconds``) and ``expected_reward.png``.

    Args:
        T: points of the Karras grid from σ_max to σ_min (T − 1 steps between them, then the step to 0).
        grid: that grid's σ range: ``"model"`` (the pipeline's own, SD: 14.6146 → 0.0292), ``"reference"``
            (the Demon reference's 14.6488 → 0.002, ``REFERENCE_GRID``) or ``(sigma_max, sigma_min)``.
        seed: run n of this object uses seed + n; ``None`` draws a seed, recorded in config.json.
        pipeline: a ``kdiff_align.pipeline.Pipeline`` (a Stable Diffusion folder or a shipped toy model);
            ``None`` loads ``default_pipeline()``: ``$KDIFF_ALIGN_MODEL`` or the shipped toy Fashion model.
        consistency_model: passed to ``sample_demon``.
        max_batch: passed to ``sample_demon``.
        disable: passed to ``sample_demon``.
        sigma_data: passed to ``sample_demon`` (its divergence check); ``None`` uses the larger of 1 and the
            RMS of the plain PF-ODE sample of the same noise, which every run computes first.
    """

    def __init__(self, cfg: float = 2, beta="auto", tau="adaptive", K: int = 16, T: int = 64,
                 demon_type: str = "tanh", r_of_c: str = "baseline", c_steps: int = 20, ode_after: float = 0.11,
                 seed: int | None = None, save_pils: bool = False, ylabel: str = "Reward",
                 experiment_directory: str | os.PathLike = "experiments/generate", *, pipeline=None,
                 grid="model", consistency_model=None, max_batch: int | None = None, disable: bool | None = None,
                 method: str = "heun", sigma_data: float | None = None):
        sampling.check_method(method, tuned=True)
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"T must be an int >= 2 (grid points), got {T!r}")
        _check_grid(grid)
        self.default_model = pipeline is None
        pipeline = default_pipeline() if pipeline is None else pipeline
        for name in ("guided", "sigmas", "get_init_latent", "from_latent_to_pil"):
            if not hasattr(pipeline, name):
                raise TypeError(f"pipeline must be a kdiff_align Pipeline (missing .{name}), "
                                f"got {type(pipeline).__name__}")
        self.cfg, self.beta, self.tau, self.K, self.T, self.grid = cfg, beta, tau, K, T, grid
        self.sigma_data = sigma_data
        self.demon_type, self.r_of_c, self.c_steps, self.ode_after = demon_type, r_of_c, c_steps, ode_after
        self.seed = secrets.randbelow(2**31) if seed is None else int(seed)
        self.save_pils, self.ylabel = save_pils, ylabel
        self.experiment_directory = Path(experiment_directory)
        self.pipeline, self.consistency_model = pipeline, consistency_model
        self.max_batch, self.disable, self.runs, self.method = max_batch, disable, 0, method

    @abc.abstractmethod
    def rewards(self, pils: list) -> list[float]:
        """Rewards of a list of PIL images, higher is better (one float per image)."""

    def rewards_latent(self, latents: Tensor):
        """Rewards of latents: decodes them to PIL images and calls ``rewards`` (override to skip PIL)."""
        self._pils = self.pipeline.from_latent_to_pil(latents)
        return self.rewards(self._pils)

    def config(self, prompt) -> dict:
        """The settings of a run, as written to config.json (no model weights, no secrets)."""
        return {"prompt": prompt, "cfg": self.cfg, "beta": self.beta, "tau": self.tau, "K": self.K, "T": self.T,
                "demon_type": self.demon_type, "r_of_c": self.r_of_c, "c_steps": self.c_steps,
                "ode_after": self.ode_after, "grid": self.grid, "seed": self.seed, "run": self.runs,
                "run_seed": self.seed + self.runs, "save_pils": self.save_pils,
                "pipeline": type(self.pipeline).__name__,
                "method": self.method if isinstance(self.method, str) else self.method.to_dict(),
                "latent_shape": list(self.pipeline.latent_shape),
                "consistency_model": None if self.consistency_model is None else type(self.consistency_model).__name__}

    def _save_trajectory(self, folder: Path, info: dict) -> None:
        pils = getattr(self, "_pils", None) or self.pipeline.from_latent_to_pil(info["lookahead"].flatten(0, 1))
        folder.mkdir(exist_ok=True)
        for k, pil in enumerate(pils):
            atomic_write(folder / f"step{info['i']:03d}_k{k:02d}.png", lambda tmp, p=pil: p.save(tmp, format="PNG"))

    def sigmas(self) -> Tensor:
        """The grid this generator runs on (``T`` Karras points over ``grid``'s σ range, then 0)."""
        return karras_grid(self.pipeline, self.T, self.grid)

    def cost(self) -> dict | None:
        """``demon_cost`` of one Demon image on the grid actually used (the plain PF-ODE image adds 2T − 1 rows);
        ``None`` for a ``method`` other than Heun, whose cost ``demon_cost`` does not model (see ``result["nfe"]``)."""
        if self.method != "heun":
            return None
        return demon_cost(self.sigmas(), K=self.K, r_of_c=self.r_of_c, c_steps=self.c_steps, ode_after=self.ode_after,
                          consistency_model=self.consistency_model is not None)

    def _check_prompt(self, condition: dict) -> None:
        names = getattr(self.pipeline, "class_names", None)
        unknown = [p for p in condition["prompts"] if names is not None and p and p not in names]
        if self.default_model and unknown:
            raise ValueError(f"prompt(s) {unknown} are not classes of the default pipeline (the shipped toy model, "
                             f"classes {names}); set {MODEL_ENV} to a local Stable Diffusion folder or pass pipeline=")

    def generate(self, prompt, ode: bool = False) -> dict:
        """Plain PF-ODE and Demon images of ``prompt`` (a string or a ``{"prompts", "cfgs"}`` dict) from one noise.

        ``ode=True`` (the seed's flag) writes only the plain PF-ODE image and skips Demon.
        """
        condition = prompt if isinstance(prompt, dict) else {"prompts": [prompt], "cfgs": [self.cfg]}
        self._check_prompt(condition)
        name = prompt if isinstance(prompt, str) else " ".join(condition["prompts"])
        folder = _fresh_directory(self.experiment_directory, name)
        config = self.config(prompt)
        self.runs += 1
        atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        atomic_write(folder / "INCOMPLETE", lambda tmp: tmp.write_text("this run stopped before it finished\n"))
        pipe, guided = self.pipeline, self.pipeline.guided(condition)
        sigmas = self.sigmas()
        generator = torch.Generator(pipe.device).manual_seed(config["run_seed"])
        x = pipe.get_init_latent(1, generator=generator)
        plain = sampling.odeint(guided, x, sigmas, disable=self.disable, method=self.method)
        if ode:
            return self._write_plain(folder, plain)

        def reward(x0: Tensor) -> Tensor:
            self._pils = None
            values = torch.as_tensor(self.rewards_latent(x0), dtype=torch.float64)  # rewards(pils) gives a list
            return check_rewards(values, x0.shape[0], f"{type(self).__name__}.rewards",
                                 terms=f"1 image x {x0.shape[0]} candidates")

        callback = (lambda info: "reward" in info and self._save_trajectory(folder / "trajectory", info)) \
            if self.save_pils else None
        demon, info = sample_demon(guided, x, sigmas, reward, K=self.K, beta=self.beta, tau=self.tau,
                                   demon_type=self.demon_type, r_of_c=self.r_of_c, c_steps=self.c_steps,
                                   ode_after=self.ode_after, callback=callback, disable=self.disable,
                                   generator=generator, return_info=True, consistency_model=self.consistency_model,
                                   max_batch=self.max_batch, method=self.method,
                                   sigma_data=self.sigma_data or max(1.0, float(plain.pow(2).mean().sqrt())))
        return self._write_results(folder, plain, demon, info)

    def _save_pngs(self, folder: Path, latents: Tensor, names) -> list:
        """Decode ``latents`` and write image i under every name of ``names[i]`` (ours and the seed's)."""
        pils = self.pipeline.from_latent_to_pil(latents)
        pils = pils if isinstance(pils, list) else [pils]
        for pil, aliases in zip(pils, names):
            for name in aliases:
                atomic_write(folder / name, lambda tmp, p=pil: p.save(tmp, format="PNG"))
        return pils

    def _final_rewards(self, latents: Tensor, terms: str | None = None) -> list[float]:
        """``rewards_latent`` of finished images, checked (a list from ``rewards(pils)`` is fine)."""
        values = torch.as_tensor(self.rewards_latent(latents), dtype=torch.float64)
        return check_rewards(values, latents.shape[0], f"{type(self).__name__}.rewards", terms=terms).tolist()

    def _grid_range(self) -> list[float]:
        sigmas = self.sigmas()
        return [float(sigmas[0]), float(sigmas[-2])]

    def _write_plain(self, folder: Path, plain: Tensor) -> dict:
        """``ode=True``: the plain PF-ODE image and its reward only."""
        final = self._final_rewards(plain)
        (pil,) = self._save_pngs(folder, plain, [("plain_ode.png", "init.png")])
        result = {"plain_reward": final[0], "grid": self._grid_range()}
        atomic_write(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        return {**result, "directory": folder, "plain": pil}

    def _write_results(self, folder: Path, plain: Tensor, demon: Tensor, info: dict) -> dict:
        final = self._final_rewards(torch.cat([plain, demon]), terms="the plain and the Demon image")
        names = [("plain_ode.png", "init.png"), ("demon.png", "out.png")]  # ours and the seed's
        pils = self._save_pngs(folder, torch.cat([plain, demon]), names)
        steps = range(info["demon_steps"])
        rows = ["step,sigma,mean,std,tau,seconds"] + [
            f"{i},{info['sigma'][i]:.6g},{info['reward_mean'][i, 0]:.6g},{info['reward_std'][i, 0]:.6g},"
            f"{info['tau'][i, 0]:.6g},{info['seconds'][i]:.4f}" for i in steps]
        atomic_write(folder / "rewards.csv", lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
        # the seed's expected_reward.txt: mean std sigma seconds
        seed_rows = [f"{info['reward_mean'][i, 0]:.6g} {info['reward_std'][i, 0]:.6g} {info['sigma'][i]:.6g} "
                     f"{info['seconds'][i]:.4f}" for i in steps]
        atomic_write(folder / "expected_reward.txt", lambda tmp: tmp.write_text("".join(r + "\n" for r in seed_rows)))
        plot = plot_rewards(info, folder / "rewards.png", self.ylabel, f"Demon ({self.demon_type}, K={self.K})")
        atomic_write(folder / "expected_reward.png", lambda tmp: shutil.copyfile(plot, tmp))  # the seed's name
        result = {"plain_reward": final[0], "demon_reward": final[1], "demon_steps": info["demon_steps"],
                  "nfe": info["nfe"], "grid": self._grid_range(), "cost": self.cost(),
                  "seconds": float(info["seconds"].sum()), "beta": _json_beta(info["beta"])}
        atomic_write(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        (folder / "INCOMPLETE").unlink(missing_ok=True)
        return {**result, "directory": folder, "plain": pils[0], "demon": pils[1], "info": info}


DemonGenerater = DemonGenerator  # the seed's spelling


class RewardDemon(DemonGenerator):
    """A ``DemonGenerator`` around ``reward(x0) -> [B]`` on latents (``kdiff_align.rewards`` style)."""

    def __init__(self, reward: Callable[[Tensor], Tensor], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward = reward

    def rewards_latent(self, latents: Tensor):
        return self.reward(latents)

    def rewards(self, pils: list) -> list[float]:
        return self.reward(self.pipeline.from_pil_to_latent(pils)).tolist()


def save_comparison(out: dict, path: Path, label: str, title: str) -> Path:
    """The plain PF-ODE image and the Demon image side by side, each titled with its reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.6))
    for ax, name, key in zip(axes, ("plain PF-ODE", "Demon"), ("plain", "demon")):
        image = out[key]
        ax.imshow(image, cmap="gray" if image.mode == "L" else None, interpolation="nearest")
        ax.set_title(f"{name}\n{label} = {out[key + '_reward']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}; same initial noise", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
