"""Solver accuracy per network evaluation on closed-form Gaussian mixtures, ours against k-diffusion's.

    python bench/solvers.py                 # table + bench/out/solvers_error_vs_nfe.png
    python bench/solvers.py --out DIR --n 512 --budgets 10 20 40

For each mixture (float64, σ in [0.002, 80], x_T = 80·z) the reference is 2000 Heun steps on the
Karras grid from the same x_T. Every solver runs on the finest Karras grid (ρ = 7) whose counted NFE
fits the budget; the error of item i is ‖x_i − x_ref,i‖ and the table gives RMS and median over items.
k-diffusion's rows appear when its wheel can be loaded (see ``_kdiffusion.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _kdiffusion  # noqa: E402

import kdiff_align as ka  # noqa: E402
from kdiff_align.testing import CountingDenoiser, MixtureDenoiser  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def mixtures() -> dict[str, MixtureDenoiser]:
    """Two test laws: a 2-D two-mode mixture and an 8-D four-mode one with unequal widths."""
    gen = torch.Generator().manual_seed(0)
    means8 = torch.randn(4, 8, generator=gen) * 2
    return {"mix2d": MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                                     torch.tensor([0.7, 0.3])).double(),
            "mix8d": MixtureDenoiser(means8, torch.tensor([0.3, 0.5, 0.8, 0.2]),
                                     torch.tensor([0.4, 0.3, 0.2, 0.1])).double()}


def our_solvers() -> dict:
    """Our fixed-grid and multistep solvers as ``f(model, x, sigmas)``."""
    out = {m: (lambda m: lambda model, x, s: ka.odeint(model, x, s, method=m, disable=True))(m)
           for m in ka.sampling.FIXED_METHODS + ka.sampling.MULTISTEP_METHODS}
    out["unipc_bh1"] = lambda model, x, s: ka.odeint(model, x, s, method="unipc", variant="bh1", disable=True)
    out["unipc_2"] = lambda model, x, s: ka.odeint(model, x, s, method="unipc", order=2, disable=True)
    out["deis_2"] = lambda model, x, s: ka.odeint(model, x, s, method="deis", order=2, disable=True)
    return out


def peer_solvers(K) -> dict:
    """k-diffusion's deterministic samplers (η = 0 for the SDE ones, which makes them ODE solvers)."""
    if K is None:
        return {}
    plain = {n: getattr(K, "sample_" + n) for n in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")}
    out = {f"K.{n}": (lambda f: lambda model, x, s: f(model, x, s, disable=True))(f) for n, f in plain.items()}
    out["K.dpmpp_3m_sde(eta=0)"] = lambda model, x, s: K.sample_dpmpp_3m_sde(model, x, s, disable=True, eta=0.0)
    out["K.dpmpp_2s_anc(eta=0)"] = lambda model, x, s: K.sample_dpmpp_2s_ancestral(model, x, s, disable=True, eta=0.0)
    return out


def nfe_of(solver, model, n: int) -> int:
    """Counted network evaluations of ``solver`` on an n-step Karras grid (one item)."""
    counting = CountingDenoiser(model)
    solver(counting, torch.zeros(1, model.means.shape[1], dtype=torch.float64),
           ka.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double())
    return counting.calls


def finest_grid(solver, model, budget: int) -> int | None:
    """The most steps whose counted NFE is within ``budget``."""
    for n in range(budget, 0, -1):
        if nfe_of(solver, model, n) <= budget:
            return n
    return None


def errors(solver, model, x_T, ref, n: int) -> tuple[float, float]:
    """(RMS, median) over items of ‖x − x_ref‖ on the n-step Karras grid."""
    x = solver(model, x_T, ka.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double())
    err = (x - ref).flatten(1).norm(dim=1)
    return err.pow(2).mean().sqrt().item(), err.median().item()


def run(n_items: int, budgets: list[int], out: Path | None) -> dict:
    K = _kdiffusion.load()
    solvers = {**{("ours", k): v for k, v in our_solvers().items()},
               **{("peer", k): v for k, v in peer_solvers(K).items()}}
    if K is None:
        print("k-diffusion could not be loaded: peer rows left out")
    results = {}
    for name, model in mixtures().items():
        x_T = torch.randn(n_items, model.means.shape[1], generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64) * SIGMA_MAX
        ref = ka.odeint(model, x_T, ka.get_sigmas_karras(2000, SIGMA_MIN, SIGMA_MAX).double(), method="heun",
                        disable=True)
        print(f"== {name}: RMS / median of ‖x − x_ref‖ ({n_items} items; reference 2000 Heun steps)")
        print(f"{'solver':24s}" + "".join(f"{f'NFE {b}':>22s}" for b in budgets))
        for (side, label), solver in solvers.items():
            row = []
            for b in budgets:
                n = finest_grid(solver, model, b)
                row.append(errors(solver, model, x_T, ref, n) if n else (float("nan"),) * 2)
            results[name, side, label] = row
            print(f"{label:24s}" + "".join(f"{r:>11.2e}/{m:<10.2e}" for r, m in row))
        for i, b in enumerate(budgets):
            rows = {side: [v[i] for (nm, sd, _), v in results.items() if nm == name and sd == side]
                    for side in ("ours", "peer")}
            if rows["peer"]:
                target = 0.8 if b == min(budgets) else 1.0
                for j, kind in enumerate(("RMS", "median")):
                    ratio = min(r[j] for r in rows["ours"]) / min(r[j] for r in rows["peer"])
                    print(f"  NFE {b}: {kind} ratio best ours / best peer: {ratio:.3f} (target <= {target})")
    if out is not None:
        plot(results, budgets, out)
    return results


def plot(results: dict, budgets: list[int], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({k[0] for k in results})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5))
    for ax, name in zip(axes, names):
        for (nm, side, label), row in results.items():
            if nm == name:
                ax.loglog(budgets, [r for r, _ in row], "-o" if side == "ours" else "--x", label=label,
                          lw=1.2, ms=4)
        ax.set(title=name, xlabel="NFE", ylabel="RMS error vs reference")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "solvers_error_vs_nfe.png", dpi=110)
    print(f"saved {out / 'solvers_error_vs_nfe.png'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="items per mixture")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(args.n, args.budgets, None if args.no_plot else args.out)


if __name__ == "__main__":
    main()
