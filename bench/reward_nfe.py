"""Reward per NFE on the shipped Fashion-MNIST model: plain, best-of-N, Demon (each type), SMC (guided/prior).

    python bench/reward_nfe.py            # 8 images per point, budgets 160-640 NFE; writes docs/
    python bench/reward_nfe.py --quick --no-write

Unconditional sampling (null class), reward = the shipped classifier's logit of "bag" on x̂₀. Every
method gets the same per-image budgets of network evaluations, counted by the NFE rule
(``utils.nfe_summary``): rows through the UNet, plus ``utils.BACKWARD_COST`` (= 1.0, measured by
``bench/newton.py --tune``) forward rows per backward row, used by guided SMC. At a budget B:

- plain: the Heun PF-ODE with more steps, S = (B + 1)/2 (the reward is ignored);
- best-of-N: N = B/39 plain 20-step samples, the highest reward kept;
- Demon (tanh, boltzmann, optimal; Tweedie look-ahead, ``beta="auto"``, ``ode_after=0.11``) on a 20-step grid with the K
  whose ``demon_cost`` is closest to B;
- SMC, ``select="resample"``, α = 1, 20 ancestral steps: prior proposal (FK steering) N = B/20
  particles, guided proposal (DAS) N = B/40 (each step adds a backward pass per particle).

Prints the mean reward (± s.e.m. over images) and its gain over plain sampling per method and budget,
with "gain / best-of-N gain" ratios; writes ``docs/img/reward_nfe.png`` and ``docs/reward_nfe.md``.
"""
import argparse
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kdiff_align as ka  # noqa: E402
from kdiff_align import toy  # noqa: E402
from kdiff_align.align.demon import DEMON_TYPES, demon_cost, sample_demon  # noqa: E402
from kdiff_align.align.smc import sample_smc  # noqa: E402
from kdiff_align.testing import CountingDenoiser  # noqa: E402

CLASS = "bag"
BASE_STEPS, DEMON_STEPS, SMC_STEPS = 20, 20, 20


def setup():
    """(counting unconditional denoiser, reward, pipe)."""
    pipe = toy.load("fashion")
    null = len(pipe.class_names)

    def uncond(x, sigma, **kwargs):
        return pipe.denoiser(x, sigma, class_labels=torch.full((x.shape[0],), null, dtype=torch.long), **kwargs)

    return CountingDenoiser(uncond), toy.classifier_reward(pipe, CLASS), pipe


def noise(pipe, n: int, seed: int) -> torch.Tensor:
    return pipe.get_init_latent(n, torch.Generator().manual_seed(seed))


@torch.no_grad()
def plain(model, reward, pipe, images, budget):
    steps = max(2, (budget + 1) // 2)
    x0 = ka.odeint(model, noise(pipe, images, 0), pipe.sigmas(steps), disable=True)
    return reward(x0)


@torch.no_grad()
def best_of_n(model, reward, pipe, images, budget):
    n = max(1, round(budget / (2 * BASE_STEPS - 1)))
    x = torch.cat([noise(pipe, images, 0), noise(pipe, images * (n - 1), 1)]) if n > 1 else noise(pipe, images, 0)
    r = reward(ka.odeint(model, x, pipe.sigmas(BASE_STEPS), disable=True)).view(n, images)
    return r.max(0).values


def demon_k(sigmas, budget) -> int:
    """The K ≥ 2 whose Demon cost per image is closest to ``budget``."""
    return min(range(2, 257), key=lambda k: abs(demon_cost(sigmas, K=k, ode_after=0.11)["network_rows"] - budget))


def demon(demon_type):
    @torch.no_grad()
    def run(model, reward, pipe, images, budget):
        sigmas = pipe.sigmas(DEMON_STEPS)
        x0 = sample_demon(model, noise(pipe, images, 0), sigmas, reward, K=demon_k(sigmas, budget),
                          demon_type=demon_type, ode_after=0.11, disable=True,
                          generator=torch.Generator().manual_seed(2))
        return reward(x0)
    return run


def smc(proposal):
    def run(model, reward, pipe, images, budget):
        n = max(2, round(budget / (SMC_STEPS * ((1 + ka.utils.BACKWARD_COST) if proposal == "guided" else 1))))
        x = noise(pipe, images * n, 3).view(images, n, *pipe.latent_shape)
        res = sample_smc(model, x, pipe.sigmas(SMC_STEPS), reward, num_particles=n, alpha=1.0, proposal=proposal,
                         select="resample", disable=True, generator=torch.Generator().manual_seed(4))
        model.rows += res.nfe["total"] - res.nfe["forward"]  # backward rows, in forward equivalents (the NFE rule)
        with torch.no_grad():  # mean over the N resampled particles: the expected reward of one draw
            return reward(res.x0.flatten(0, 1)).view(images, n).mean(1)
    return run


def methods() -> dict:
    table = {"plain (more steps)": plain, "best-of-N": best_of_n}
    table.update({f"Demon {t}": demon(t) for t in DEMON_TYPES})
    table.update({"SMC prior (FK)": smc("prior"), "SMC guided (DAS)": smc("guided")})
    return table


def measure(images: int, budgets) -> list[dict]:
    model, reward, pipe = setup()
    rows = []
    for name, fn in methods().items():
        for budget in budgets:
            model.rows = 0
            start = time.perf_counter()
            r = fn(model, reward, pipe, images, budget).double().cpu()
            seconds = time.perf_counter() - start
            rows.append(dict(method=name, budget=budget, nfe=model.rows / images, mean=r.mean().item(),
                             sem=(r.std() / math.sqrt(images)).item(), seconds=seconds / images))
            print(f"  {name:<20} budget {budget:>4}: NFE/image {rows[-1]['nfe']:7.1f}  reward {rows[-1]['mean']:+.3f}"
                  f" ± {rows[-1]['sem']:.3f}  ({rows[-1]['seconds']:.2f} s/image)", flush=True)
    return rows


def gains(rows) -> dict:
    """(method, budget) → reward gain over plain sampling at the same budget."""
    base = {r["budget"]: r["mean"] for r in rows if r["method"].startswith("plain")}
    return {(r["method"], r["budget"]): r["mean"] - base[r["budget"]] for r in rows}


def plot(rows, path: Path, images: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == name]
        style = "k--o" if name.startswith("plain") else "k-s" if name.startswith("best") else \
            "-o" if name.startswith("Demon") else "-^"
        ax.errorbar([p["nfe"] for p in pts], [p["mean"] for p in pts], yerr=[p["sem"] for p in pts], fmt=style,
                    capsize=2, ms=4, label=name)
    ax.set_xscale("log")
    ax.set(xlabel="network evaluations per image", ylabel=f"classifier logit of '{CLASS}'",
           title=f"Fashion-MNIST (unconditional), {images} images per point")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    plt.close(fig)


def markdown(rows, images: int, budgets, seconds: float) -> str:
    g = gains(rows)
    import hashlib
    weights = hashlib.sha256((toy.WEIGHTS_DIR / "fashion.safetensors").read_bytes()).hexdigest()[:12]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, " \
        f"`fashion.safetensors` sha256 {weights}…"
    lines = [
        "# Reward per NFE on the shipped Fashion-MNIST model", "",
        f"Generated by `python bench/reward_nfe.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({machine}; "
        f"{seconds / 60:.1f} min).", "",
        f"Unconditional sampling (null class) of the shipped 28×28 model; reward = the shipped classifier's logit "
        f"of **{CLASS}** on the final image; {images} images per point (same initial noises for every method), "
        "mean ± standard error. NFE = rows through the UNet per image (a backward pass, used by guided SMC, "
        "counts as one). Methods at each budget B: plain = Heun PF-ODE with (B + 1)/2 steps; best-of-N = "
        f"B/{2 * BASE_STEPS - 1} plain {BASE_STEPS}-step samples, best kept; Demon = {DEMON_STEPS}-step grid, "
        "Tweedie look-ahead, β = \"auto\" (0.049 at σ = 80 to 0.1), `ode_after=0.11`, K chosen so "
        "`demon_cost` ≈ B (K = "
        f"{', '.join(str(demon_k(ka.get_sigmas_karras(DEMON_STEPS, 0.002, 80.0), b)) for b in budgets)} here); "
        "SMC = α = 1, "
        f"{SMC_STEPS} ancestral steps, one resampled draw (prior: N = B/{SMC_STEPS}; guided: "
        f"N = B/{2 * SMC_STEPS}).", "",
        "![reward vs NFE](img/reward_nfe.png)", "",
        "| method | " + " | ".join(f"B = {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets)]
    for name in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in budgets:
            r = next(r for r in rows if r["method"] == name and r["budget"] == b)
            cells.append(f"{r['mean']:+.2f} ± {r['sem']:.2f} ({r['nfe']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean reward ± s.e.m. (actual NFE per image).", "",
              "Gain over plain sampling at equal NFE, divided by best-of-N's gain:", "",
              "| method | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in dict.fromkeys(r["method"] for r in rows):
        if name.startswith(("plain", "best")):
            continue
        cells = [f"{g[(name, b)] / g[('best-of-N', b)]:.2f}" if abs(g[("best-of-N", b)]) > 1e-9 else "n/a"
                 for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 images, budget 160 only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args(argv)
    images = args.images or (2 if args.quick else 8)
    budgets = (160,) if args.quick else (160, 320, 640)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"Reward per NFE, Fashion-MNIST, classifier logit of '{CLASS}', {images} images per point")
    rows = measure(images, budgets)
    g = gains(rows)
    print("[ratios] reward gain over plain sampling at equal NFE, divided by best-of-N's gain")
    for name in dict.fromkeys(r["method"] for r in rows):
        for b in (b for b in budgets if not name.startswith(("plain", "best")) and abs(g[("best-of-N", b)]) > 1e-9):
            print(f"  {name:<18} B={b:<4} gain / best-of-N gain: {g[(name, b)] / g[('best-of-N', b)]:.2f}")
    if not args.no_write:
        plot(rows, ROOT / "docs" / "img" / "reward_nfe.png", images)
        text = markdown(rows, images, budgets, time.perf_counter() - start)
        tmp = ROOT / "docs" / ".reward_nfe.md.tmp"
        tmp.write_text(text)
        tmp.replace(ROOT / "docs" / "reward_nfe.md")
        print("wrote docs/reward_nfe.md and docs/img/reward_nfe.png")
    return rows


if __name__ == "__main__":
    main()
