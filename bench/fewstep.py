"""Few-step frontier (issue 25): tuned samplers against the best peer solver *and* schedule at 5–10 NFE.

    python bench/fewstep.py closed                       # closed-form problems, VE and SD3-flow grids
    python bench/fewstep.py closed --laws heldout        # three problems not used while developing the tuner
    python bench/fewstep.py model --model fashion --cfg 0 # a shipped model (median distance, FD)
    python bench/fewstep.py flow                         # our default solvers vs k-diffusion's LMS, SD3 grids
    python bench/fewstep.py sdgrid                       # our defaults vs diffusers' log-σ algorithms, SD grids

``closed``: Gaussians (8-D, 64-D) and mixtures (2-D, 8-D), float64 (``--laws heldout``: a 16-D Gaussian and
mixtures in 3-D and 16-D, never used while the tuner was developed), on Karras-range VE grids
(σ ∈ [0.002, 80]) and, through ``FlowDenoiser``, on SD3-shift flow grids (σ from ``get_sigmas_flow(n,
shift=3)``'s range, ~0.003 to ~3000). ``tune_sampler`` is fitted on ``--calib`` noises and every
sampler is evaluated on ``--n`` other noises against a 2000-step Heun reference from the same noise
(its own error against a 4000-step solve is printed per problem); an item's error is ‖x − x_ref‖.
Peers: k-diffusion 0.1.1's ODE samplers (euler, heun, dpm_2, lms, dpmpp_2m, dpmpp_3m_sde and
dpmpp_2s_ancestral at η = 0) and diffusers' multistep scheduler objects themselves
(``DPMSolverMultistepScheduler`` 2M and 3M, ``UniPCMultistepScheduler`` orders 1–3,
``DEISMultistepScheduler`` orders 2–3, ``LMSDiscreteScheduler``), stepped on the same σ grids with our
D by ``_diffusers.py`` and labelled ``diffusers.<name>``, each on its finest grid whose counted NFE
fits the budget and on its best schedule among Karras ρ ∈ {5, 7, 9}, exponential, polyexponential
(ρ = 2) and, on flow problems, SD3's shift 3. "Best peer" is the minimum over all (solver, schedule)
pairs, separately for the median, the RMS and the mode-flip fraction (mixtures: items whose mode
differs from the reference's). Ratios (tuned / best peer) are printed last, with the reference's own
median error over the best peer's.

``model``: the shipped ``fashion`` / ``fashion_latent`` models at CFG weight ``--cfg`` (0: the
unconditional model), median distance to a 500-step DPM-Solver++(3M) reference from the same noise on
``--n`` held-out noises (calibration and evaluation noises and, for CFG, classes differ; the
reference's own error against a 1000-step solve is printed on 8 of them), then the
Fréchet distance (classifier features, ``kdiff_align.metrics``) of ``--fd`` samples of the tuned
sampler at ``--fd-nfe`` against the best peer at 10 NFE (with a paired-bootstrap interval of the
difference), the tuned samplers' FD at the other budgets, that peer's own FD and median distance at the
``--fd-context`` budgets (FD need not fall as a solver grows more accurate), and the tuning cost in NFE (and
the tuner's own teacher's) and seconds.

``flow``: the median error of each of our multistep solvers at its default settings over k-diffusion's
``sample_lms`` on SD3-shift grids at 15–40 steps (the closed-form problems above, 512 items).

``sdgrid``: on diffusers' Stable Diffusion grids (``DPMSolverMultistepScheduler``'s timesteps of the
scaled-linear β schedule), the median error of each exponential integrator at its defaults over the same
solver with ``sigma_steps=False`` (diffusers' algorithm, log σ on every step; its numbers are diffusers'),
with the steps taken in σ; closed-form problems, 512 items, 2000-step Heun reference.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _diffusers  # noqa: E402
import _kdiffusion  # noqa: E402

import kdiff_align as ka  # noqa: E402
from kdiff_align.external import FlowDenoiser  # noqa: E402
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser  # noqa: E402

VE_RANGE = (0.002, 80.0)
FLOW_SHIFT = 3.0
FLOW_RANGE = tuple(ka.schedules.get_sigmas_flow(2, shift=FLOW_SHIFT).double()[[1, 0]].tolist())


def laws() -> dict:
    """Closed-form data laws: two Gaussians and two mixtures (``bench/solvers.py``'s)."""
    gen = torch.Generator().manual_seed(0)
    means8 = torch.randn(4, 8, generator=gen) * 2
    return {
        "gauss8": GaussianDenoiser(torch.randn(8, generator=gen), torch.logspace(-1, 0.3, 8)).double(),
        "gauss64": GaussianDenoiser(torch.randn(64, generator=gen) * 0.5, torch.logspace(-1.3, 0.3, 64)).double(),
        "mix2d": MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.4, 0.6]),
                                 torch.tensor([0.7, 0.3])).double(),
        "mix8d": MixtureDenoiser(means8, torch.tensor([0.3, 0.5, 0.8, 0.2]),
                                 torch.tensor([0.4, 0.3, 0.2, 0.1])).double()}


def heldout_laws() -> dict:
    """Three laws never used while the tuner was developed (``--laws heldout``): an anisotropic 16-D Gaussian
    and mixtures of three modes in 3-D and six in 16-D."""
    gen = torch.Generator().manual_seed(123)
    return {
        "gauss16": GaussianDenoiser(torch.randn(16, generator=gen),
                                    torch.logspace(-1.5, 0.5, 16)[torch.randperm(16, generator=gen)]).double(),
        "mix3d": MixtureDenoiser(torch.randn(3, 3, generator=gen) * 1.5, torch.tensor([0.5, 0.2, 0.35]),
                                 torch.tensor([0.5, 0.25, 0.25])).double(),
        "mix16d": MixtureDenoiser(torch.randn(6, 16, generator=gen) * 1.2,
                                  torch.tensor([0.3, 0.6, 0.4, 0.25, 0.5, 0.35]),
                                  torch.tensor([0.25, 0.2, 0.2, 0.15, 0.1, 0.1])).double()}


def as_flow(model):
    """The same law through a rectified-flow velocity model and ``FlowDenoiser`` (SD3 convention)."""
    def velocity(x_t, t):
        sigma = t / (1 - t)
        return (x_t - model(x_t / (1 - t).view(-1, *[1] * (x_t.ndim - 1)), sigma)) / t.view(-1, *[1] * (x_t.ndim - 1))
    return FlowDenoiser(velocity)


def schedules(flow: bool, sigma_min: float, sigma_max: float) -> dict:
    """The peers' fixed schedules ``n -> sigmas`` (float64)."""
    S = ka.schedules
    out = {f"karras{rho}": (lambda rho: lambda n: S.get_sigmas_karras(n, sigma_min, sigma_max, rho).double())(rho)
           for rho in (5, 7, 9)}
    out["exponential"] = lambda n: S.get_sigmas_exponential(n, sigma_min, sigma_max).double()
    out["polyexp2"] = lambda n: S.get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=2.0).double()
    if flow:
        out["sd3_shift3"] = lambda n: S.get_sigmas_flow(n, shift=FLOW_SHIFT).double()
    return out


def peer_solvers(K) -> dict:
    """k-diffusion's ODE samplers and diffusers' multistep scheduler objects as ``f(model, x, sigmas)``."""
    out = {}
    if K is not None:
        for n in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m"):
            out[f"K.{n}"] = (lambda f: lambda m, x, s: f(m, x, s, disable=True))(getattr(K, "sample_" + n))
        out["K.dpmpp_3m_sde(eta=0)"] = lambda m, x, s: K.sample_dpmpp_3m_sde(m, x, s, disable=True, eta=0.0)
        out["K.dpmpp_2s_anc(eta=0)"] = lambda m, x, s: K.sample_dpmpp_2s_ancestral(m, x, s, disable=True, eta=0.0)
    out.update({f"diffusers.{name}": _diffusers.solver(name) for name in _diffusers.SCHEDULERS})
    return out


PEERS_NOTE = (f"peers: K.* = k-diffusion {_kdiffusion.VERSION}'s sample_* functions; diffusers.* = diffusers "
              f"{_diffusers.diffusers.__version__}'s scheduler objects stepped on each grid (bench/_diffusers.py; "
              f"DEIS's final sigma 0 is {_diffusers.DEIS_ZERO:g}*sigma_min: it takes log 0); "
              "no peer is our copy")


def steps_for(solver, model, x, budget: int) -> int | None:
    """The most steps whose counted NFE (one item) fits ``budget`` (counted on a stand-in D = 0: these
    fixed-grid solvers' call counts do not depend on the values)."""
    for n in range(budget, 0, -1):
        counting = CountingDenoiser(lambda x, sigma, **kw: torch.zeros_like(x))
        solver(counting, x[:1], ka.get_sigmas_karras(n, 0.01, 10.0).double().to(x.dtype))
        if counting.calls <= budget:
            return n
    return None


def flipped(x, ref, model) -> torch.Tensor | None:
    """Which items of ``x`` land in another mode of the mixture ``model`` than the reference's (None: no modes)."""
    return model.classify(x) != model.classify(ref) if isinstance(model, MixtureDenoiser) else None


def scores_and_flips(x, ref, model=None) -> tuple[dict, torch.Tensor | None]:
    """Median and RMS of ‖x − x_ref‖ over items and, for mixtures, the mode-flip fraction, with the
    flipped items (``flipped``; None without modes)."""
    err = (x - ref).flatten(1).norm(dim=1)
    out, mask = {"median": err.median().item(), "rms": err.pow(2).mean().sqrt().item()}, flipped(x, ref, model)
    if mask is not None:
        out["flips"] = mask.double().mean().item()
    return out, mask


def scores(x, ref, model=None) -> dict:
    """Median and RMS of ‖x − x_ref‖ over items, and the mode-flip fraction for mixtures."""
    return scores_and_flips(x, ref, model)[0]


def more_flips_p(ours: torch.Tensor, peer: torch.Tensor) -> float:
    """One-sided exact McNemar test on the same items: P(Binomial(b + c, 1/2) >= b), b the items only ``ours``
    flips and c those only the ``peer`` flips (1 where neither differs). Against the fewest over ~80 pairs the
    peer is picked for its luck on these items, so a small value overstates the gap; a large one does not."""
    b, c = int((ours & ~peer).sum()), int((peer & ~ours).sum())
    return float(scipy.stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0


TEACHER_STEPS = 2000


def heun_reference(model, x, sigma_min: float, sigma_max: float, steps: int = TEACHER_STEPS):
    """Heun on the ``steps``-step Karras grid (ρ = 7) from ``x``: the closed problems' reference."""
    return ka.odeint(model, x, ka.get_sigmas_karras(steps, sigma_min, sigma_max).double(), disable=True)


def best_peer(peers: dict, grids: dict, model, x, ref, law, budget: int) -> tuple[dict, dict]:
    """The best score per figure over (peer, schedule) pairs at ``budget`` NFE, and the pair; under the key
    ``"median_pair"`` every score of the pair with the best median."""
    best, which = {}, {}
    for label, solver in peers.items():
        steps = steps_for(solver, model, x, budget)
        for sched, grid in grids.items():
            sc, mask = scores_and_flips(solver(model, x, grid(steps).to(x.dtype)), ref, law) if steps else ({}, None)
            if sc.get("median", math.inf) < best.get("median", math.inf):
                which["median_pair"], which["median_pair_flipped"] = sc, mask
            for k, v in sc.items():
                if not math.isnan(v) and v < best.get(k, math.inf):
                    best[k], which[k] = v, f"{label}/{sched}"
                    if k == "flips":
                        which["flips_flipped"] = mask
    return best, which


def closed_problem(name: str, law, flow: bool, budgets, n: int, calib: int, peers: dict) -> tuple[dict, dict]:
    """Tuned vs best peer on one closed-form problem; returns (the reference's own scores against a
    twice finer solve, {budget: (tuned scores, best peer scores)})."""
    model = as_flow(law) if flow else law
    sigma_min, sigma_max = FLOW_RANGE if flow else VE_RANGE
    dim = law.mean.shape[0] if isinstance(law, GaussianDenoiser) else law.means.shape[1]
    noise = lambda k, seed: torch.randn(k, dim, dtype=torch.float64,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed)) * sigma_max
    x_cal, x_eval = noise(calib, 1), noise(n, 2)
    ref, grids, out = heun_reference(model, x_eval, sigma_min, sigma_max), schedules(flow, sigma_min, sigma_max), {}
    teacher = scores(ref, heun_reference(model, x_eval, sigma_min, sigma_max, 2 * TEACHER_STEPS), law)
    print(f"== {name} ({'SD3-shift flow' if flow else 'VE'} grid range {sigma_min:.3g}–{sigma_max:.4g}, "
          f"{n} items, tuned on {calib} others)")
    print(f"  reference: {TEACHER_STEPS} Heun steps; its own error against {2 * TEACHER_STEPS}: "
          + " ".join(f"{k} {v:.3g}" for k, v in teacher.items()))
    for b in budgets:
        clock = time.perf_counter()
        tuned = ka.tune_sampler(model, x_cal, b, sigma_min=sigma_min, sigma_max=sigma_max, candidates=40,
                                max_evals=40 * (b - 1), refine=len(ka.sampling.TUNE_METHODS))  # cheap models
        seconds = time.perf_counter() - clock
        mine, mask = scores_and_flips(tuned(model, x_eval, disable=True), ref, law)
        best, which = best_peer(peers, grids, model, x_eval, ref, law, b)
        if mask is not None:  # the flips' paired test against both peer pairs
            mine["p_fewest"] = more_flips_p(mask, which["flips_flipped"])
            mine["p_median_pair"] = more_flips_p(mask, which["median_pair_flipped"])
        out[b] = (mine, best, which["median_pair"])
        print(f"  NFE {b:2d} tuned {tuned.method:8s} " + " ".join(f"{k} {mine[k]:.3g}" for k in best)
              + " | best peer " + " ".join(f"{k} {best[k]:.3g} ({which[k]})" for k in best)
              + (f" (the best-median pair's flips {which['median_pair']['flips']:.3g})" if "flips" in mine else "")
              + f" | tuning {tuned.tuning_nfe} NFE (its teacher {tuned.info.get('teacher_nfe')}) x {calib} rows, "
              f"{seconds:.1f} s")
    return teacher, out


def run_closed(args) -> None:
    K = _kdiffusion.load()
    if K is None:
        print("k-diffusion could not be loaded: its peers are left out")
    peers, results = peer_solvers(K), {}
    print(PEERS_NOTE)
    for name, law in (heldout_laws() if args.laws == "heldout" else laws()).items():
        for flow in (False, True):
            label = f"{name}/{'flow' if flow else 've'}"
            results[label] = closed_problem(label, law, flow, args.budgets, args.n, args.calib, peers)
    print("\n== ratios tuned / best peer (targets: median <= 0.5 at 5, 6, 8 NFE, <= 0.7 at 10; "
          "Gaussians RMS too; mixtures: flips <= peer's: ours/the fewest of any peer pair, in brackets the "
          "best-median pair's; where ours are more, p: the one-sided exact McNemar test on the same items that ours "
          "flip more, against the fewest pair / the best-median pair); last: the reference's own median error / "
          "the smallest best-peer median")
    for label, (teacher, rows) in results.items():
        cells = []
        for b, (mine, best, pair) in rows.items():
            cell = f"{b}: med {mine['median'] / best['median']:.2f} rms {mine['rms'] / best['rms']:.2f}"
            if "flips" in mine:
                cell += f" flips {mine['flips']:.3f}/{best['flips']:.3f} ({pair['flips']:.3f})"
                if mine["flips"] > min(best["flips"], pair["flips"]):
                    cell += f" p {mine['p_fewest']:.2g}/{mine['p_median_pair']:.2g}"
            cells.append(cell)
        floor = teacher["median"] / min(best["median"] for _, best, _ in rows.values())
        print(f"{label:12s} " + " | ".join(cells) + f" | reference {floor:.1e}")


MODEL_PEERS = ("K.heun", "K.lms", "K.dpmpp_2m", "K.dpmpp_3m_sde(eta=0)", "diffusers.dpmpp_3m", "diffusers.unipc2",
               "diffusers.unipc3", "diffusers.deis3")
MODEL_TEACHER_STEPS = 500
FD_EXACT_STEPS = 50  # the model's own samples for FD: DPM-Solver++(3M), its error printed against the reference


def guided(pipe, cfg: float, classes: list[int]):
    """The unconditional denoiser (cfg 0) or per-item CFG on ``classes`` (one call per evaluation)."""
    if cfg == 0:
        return pipe.null_denoiser()
    return pipe.guided([{"prompts": [pipe.class_names[c]], "cfgs": [cfg]} for c in classes])


def sample_in_chunks(sampler, pipe, cfg: float, n: int, seed: int, chunk: int = 250) -> torch.Tensor:
    """``n`` decoded images from ``sampler(model, x)``, classes cycling over all of them."""
    out = []
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        x = pipe.get_init_latent(k, torch.Generator().manual_seed(seed + i))
        model = guided(pipe, cfg, [(i + j) % len(pipe.class_names) for j in range(k)])
        out.append(pipe.decode(sampler(model, x)).clamp(-1, 1))
    return torch.cat(out)


def model_teacher_error(pipe, cfg: float, classes: list[int], x, ref, items: int = 8) -> dict:
    """The model reference's own error: ``ref`` (its DPM-Solver++(3M) solve) against a twice finer one, first
    ``items``."""
    finer = ka.odeint(guided(pipe, cfg, classes[:items]), x[:items], pipe.sigmas(2 * MODEL_TEACHER_STEPS),
                      method="dpmpp_3m", disable=True)
    return scores(ref[:items], finer)


@torch.no_grad()
def run_model(args) -> None:
    from kdiff_align.models import toy
    torch.manual_seed(0)
    pipe, K = toy.load(args.model), _kdiffusion.load()
    peers = {k: v for k, v in peer_solvers(K).items() if k in MODEL_PEERS}
    half = len(pipe.class_names) // 2  # calibration on the first half of the classes, evaluation on the rest
    x_cal, x_eval = pipe.get_init_latent(args.calib, torch.Generator().manual_seed(1)), \
        pipe.get_init_latent(args.n, torch.Generator().manual_seed(2))
    D_cal = guided(pipe, args.cfg, [c % half for c in range(args.calib)])
    classes = [half + c % half for c in range(args.n)]
    D_eval = guided(pipe, args.cfg, classes)
    clock = time.perf_counter()
    ref = ka.odeint(D_eval, x_eval, pipe.sigmas(MODEL_TEACHER_STEPS), method="dpmpp_3m", disable=True)
    print(PEERS_NOTE)
    print(f"== {args.model} cfg {args.cfg}: {args.n} items, {MODEL_TEACHER_STEPS}-step reference "
          f"({time.perf_counter() - clock:.0f} s)")
    teacher = model_teacher_error(pipe, args.cfg, classes, x_eval, ref)
    print(f"  reference's own error against {2 * MODEL_TEACHER_STEPS} steps ({min(8, args.n)} items): "
          f"median {teacher['median']:.3g} rms {teacher['rms']:.3g}")
    grids, tuned_at, best_at = schedules(False, pipe.sigma_min, pipe.sigma_max), {}, {}
    for b in args.budgets:
        clock = time.perf_counter()
        tuned = ka.tune_sampler(D_cal, x_cal, b, sigma_min=pipe.sigma_min, sigma_max=pipe.sigma_max,
                                max_evals=args.max_evals)  # the defaults: what `kdiff-align tune` runs
        seconds = time.perf_counter() - clock
        mine = scores(tuned(D_eval, x_eval, disable=True), ref)["median"]
        best, which = best_peer(peers, grids, D_eval, x_eval, ref, None, b)
        tuned_at[b], best_at[b] = tuned, which["median"]
        print(f"  NFE {b:2d}: tuned {tuned.method} median {mine:.4g} | best peer {best['median']:.4g} "
              f"({which['median']}) | ratio {mine / best['median']:.3f} | tuning {tuned.tuning_nfe} NFE (its teacher "
              f"{tuned.info.get('teacher_nfe')}) x {args.calib} rows, {seconds:.0f} s")
    if args.fd:
        label, sched = best_at[10].rsplit("/", 1)

        def peer_at(b: int):
            """The best 10-NFE peer on its schedule at budget ``b`` (the grid found once)."""
            sigmas = grids[sched](steps_for(peers[label], D_eval, x_eval, b))
            return lambda m, x: peers[label](m, x, sigmas.to(x.dtype))
        exact = lambda m, x: ka.odeint(m, x, pipe.sigmas(FD_EXACT_STEPS), method="dpmpp_3m", disable=True)  # noqa: E731
        print_fd(args, pipe, tuned_at, peer_at, best_at[10],
                 lambda b: scores((exact if b is None else peer_at(b))(D_eval, x_eval), ref)["median"], exact)


def fd_interval(f_a, f_b, f_ref, resamples: int = 200, seed: int = 0, paired_ref: bool = False) -> tuple[float, float]:
    """95% paired-bootstrap interval of FD(a) − FD(b) against ``f_ref``: the same resampled items (same noises)
    for both sample sets, and for ``f_ref`` too where it comes from the same noises (``paired_ref``)."""
    from kdiff_align.metrics import frechet_distance
    rng, diffs = np.random.default_rng(seed), []
    for _ in range(resamples):
        i = rng.integers(0, len(f_a), len(f_a))
        ref = f_ref[i] if paired_ref else f_ref
        diffs.append(frechet_distance(f_a[i], ref) - frechet_distance(f_b[i], ref))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def print_fd(args, pipe, tuned_at: dict, peer_at, peer: str, median_at, exact) -> None:
    """FD of ``--fd`` samples of the tuned samplers and of the best 10-NFE peer against the test images, with the
    paired-bootstrap interval of the target's difference, then the peer's FD at the ``--fd-context`` budgets
    (``median_at(b)``: its median distance to the reference there; ``median_at(None)``: ``exact``'s). Last, the
    FD of each against the model's own samples from the same noises (``exact``, a fine solve): how far each
    sampler moves the model's distribution, which the FD against the data mixes with the model's own error."""
    from quality import reference_sets

    from kdiff_align.metrics import features, frechet_distance
    f_test = features(pipe.classifier, reference_sets("fashion", "auto")[0])
    feats = lambda sampler: features(  # noqa: E731
        pipe.classifier, sample_in_chunks(sampler, pipe, args.cfg, args.fd, 10))
    f_tuned = {b: feats(lambda m, x, t=t: t(m, x, disable=True)) for b, t in tuned_at.items()}
    f_peer = feats(peer_at(10))
    fd_tuned, fd_peer = frechet_distance(f_tuned[args.fd_nfe], f_test), frechet_distance(f_peer, f_test)
    low, high = fd_interval(f_tuned[args.fd_nfe], f_peer, f_test)
    print(f"  FD of {args.fd} samples: tuned at {args.fd_nfe} NFE {fd_tuned:.3f} | best peer at 10 NFE ({peer}) "
          f"{fd_peer:.3f} | ratio {fd_tuned / fd_peer:.3f} (target <= 1) | difference {fd_tuned - fd_peer:+.2f}, "
          f"95% paired bootstrap {low:+.2f} to {high:+.2f}")
    others = [f"{b} NFE {frechet_distance(f, f_test):.3f}" for b, f in f_tuned.items() if b != args.fd_nfe]
    f_context = {b: feats(peer_at(b)) for b in args.fd_context}
    context = [f"{b} NFE {frechet_distance(f, f_test):.3f} (median {median_at(b):.3g})" for b, f in f_context.items()]
    if others:
        print(f"  FD of the tuned samplers at the other budgets: {', '.join(others)}")
    if context:  # FD need not fall as the same solver grows more accurate
        print(f"  the same peer's FD at other budgets (median distance as above): {', '.join(context)}")
    f_exact = feats(exact)
    tuned_fd = {b: frechet_distance(f, f_exact) for b, f in f_tuned.items()}
    peer_fd = {b: frechet_distance(f, f_exact) for b, f in {10: f_peer, **f_context}.items()}
    low, high = fd_interval(f_tuned[args.fd_nfe], f_peer, f_exact, paired_ref=True)
    print(f"  the model's own samples ({FD_EXACT_STEPS}-step DPM-Solver++(3M), median {median_at(None):.3g} from the "
          f"reference): FD {frechet_distance(f_exact, f_test):.3f} against the data. FD against them, from the same "
          f"noises: tuned at {args.fd_nfe} NFE {tuned_fd[args.fd_nfe]:.3f} | best peer at 10 NFE {peer_fd[10]:.3f} | "
          f"ratio {tuned_fd[args.fd_nfe] / peer_fd[10]:.3f} | 95% paired bootstrap of the difference {low:+.3f} to "
          f"{high:+.3f}")
    print("    tuned at " + ", ".join(f"{b} NFE {v:.3f}" for b, v in tuned_fd.items())
          + "; the peer at " + ", ".join(f"{b} NFE {v:.3f}" for b, v in peer_fd.items()))


def run_flow(args) -> None:
    """Our multistep solvers at their default settings against k-diffusion's LMS on SD3-shift grids."""
    K = _kdiffusion.load()
    if K is None:
        raise SystemExit("k-diffusion could not be loaded: this comparison needs its sample_lms")
    sigma_min, sigma_max = FLOW_RANGE
    print(f"== median error / k-diffusion LMS's, SD3-shift flow grids (shift {FLOW_SHIFT}), {args.n} items")
    for name, law in laws().items():
        model = as_flow(law)
        dim = law.mean.shape[0] if isinstance(law, GaussianDenoiser) else law.means.shape[1]
        x = torch.randn(args.n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigma_max
        ref = ka.odeint(model, x, ka.get_sigmas_karras(2000, sigma_min, sigma_max).double(), disable=True)
        for n in args.budgets:
            s = ka.schedules.get_sigmas_flow(n, shift=FLOW_SHIFT).double()
            lms = scores(K.sample_lms(model, x, s, disable=True), ref)["median"]
            ratios = {m: scores(ka.odeint(model, x, s, method=m, disable=True), ref)["median"] / lms
                      for m in ka.sampling.MULTISTEP_METHODS}
            print(f"{name:8s} NFE {n:2d} " + " ".join(f"{m} {r:.2f}" for m, r in ratios.items()))


def sd_sigmas(steps: int) -> torch.Tensor:
    """diffusers' SD 1.x grid: ``DPMSolverMultistepScheduler``'s timesteps as VE σ (float64), then 0."""
    sched = _diffusers.diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear")
    sched.set_timesteps(steps)
    sigmas = ka.schedules.sigmas_from_alphas_cumprod(sched.alphas_cumprod)[sched.timesteps.long()]
    return ka.schedules.append_zero(sigmas)


def run_sdgrid(args) -> None:
    """Our exponential integrators' defaults (steps in σ) over diffusers' log-σ algorithm on SD grids."""
    methods = ("dpmpp_2m", "dpmpp_3m", "unipc", "deis")
    print(f"== median error at the defaults / with sigma_steps=False (diffusers' algorithm), diffusers' SD grids, "
          f"{args.n} items")
    for name, law in laws().items():
        dim = law.mean.shape[0] if isinstance(law, GaussianDenoiser) else law.means.shape[1]
        for n in args.budgets:
            s = sd_sigmas(n)
            x = torch.randn(args.n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * s[0]
            ref = heun_reference(law, x, float(s[-2]), float(s[0]))
            ratios = {m: scores(ka.odeint(law, x, s, method=m, disable=True), ref)["median"]
                      / scores(ka.odeint(law, x, s, method=m, disable=True, sigma_steps=False), ref)["median"]
                      for m in methods}
            switched = [i for i in range(2, n) if ka.sampling.multistep.sigma_step(s.tolist(), i, 3)]
            print(f"{name:8s} steps {n:2d} " + " ".join(f"{m} {r:.2f}" for m, r in ratios.items())
                  + f" | steps in sigma (order 3): {switched}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("closed", "model", "flow", "sdgrid"))
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="NFE budgets (closed: 5 6 8 10)")
    parser.add_argument("--n", type=int, default=None, help="evaluation items (closed: 512, model: 32)")
    parser.add_argument("--calib", type=int, default=None, help="calibration noises (closed: 128, model: 32)")
    parser.add_argument("--laws", default="dev", choices=("dev", "heldout"),
                        help="closed: the problems the tuner was developed on, or three never used then")
    parser.add_argument("--model", default="fashion", choices=("fashion", "fashion_latent"))
    parser.add_argument("--cfg", type=float, default=0.0, help="CFG weight (0: unconditional)")
    parser.add_argument("--max-evals", type=int, default=None, help="model: refinement runs (tune_sampler's default)")
    parser.add_argument("--fd", type=int, default=1000, help="model: samples for the Fréchet distance (0: skip)")
    parser.add_argument("--fd-nfe", type=int, default=6)
    parser.add_argument("--fd-context", type=int, nargs="*", default=[8, 14, 20],
                        help="model: budgets at which the best 10-NFE peer's FD is printed too (none: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = args.part == "model"
    args.budgets = args.budgets or {"model": [6, 10], "flow": [15, 20, 30, 40], "sdgrid": [10, 20, 30, 50]}.get(
        args.part, [5, 6, 8, 10])
    args.n, args.calib = args.n or (32 if model else 512), args.calib or (32 if model else 128)
    {"closed": run_closed, "model": run_model, "flow": run_flow, "sdgrid": run_sdgrid}[args.part](args)


if __name__ == "__main__":
    main()
