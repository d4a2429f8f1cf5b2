"""The inference-time scaling arena (``kdiff_align.apps.arena``), its metrics, guidance and search pieces."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdiff_align import metrics, rewards, toy
from kdiff_align.align import demon as demon_mod
from kdiff_align.align import guidance, search
from kdiff_align.apps import arena
from kdiff_align.apps.arena import costs, methods, scores
from kdiff_align.apps.cli import main, parser
from kdiff_align.sampling import TunedSampler
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(budgets=(40, 80), images=3, methods=["plain", "best_of_n"], seed=3)


@pytest.fixture(scope="module")
def pipe():
    return toy.load("fashion")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small arena run (plain and best-of-N, both rewards) written to a folder: (rows, folder)."""
    out = tmp_path_factory.mktemp("arena")
    return arena.run_arena(out, **SMALL), out


def _task(pipe, reward_name="logit", images=2, sampler="heun"):
    heldout = toy.load_heldout_classifier()
    spec, = scores.resolve_rewards(pipe, (reward_name,), "bag", heldout).values()
    reward, alpha, scale = spec.reward, spec.alpha, spec.scale
    noise = torch.randn(images, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    model = CountingDenoiser(pipe.null_denoiser())
    return arena.Task(pipe, model, reward, scores.is_differentiable(reward, pipe), noise, sampler, alpha, scale, 0)


def test_counted_nfe_of_every_method_matches_its_formula(pipe):
    task = _task(pipe, images=1)  # the accounting is per image
    for name in arena.METHODS:
        budget = 160 if name.endswith("-rollout") else 80  # the rollout look-ahead needs more to fit at all
        cell = arena.run_cell(task, name, budget)
        x0, nfe = cell["x0"], cell["nfe"]
        assert x0.shape == (1, *pipe.latent_shape)
        # reward use is counted beside the NFE: plain sampling never reads the reward, the others do
        assert (cell["reward_calls"] == 0) == name.startswith("plain-") == (cell["reward_rows"] == 0), name
        if name == "best_of_n-ode":  # two 20-step Heun samples (39 rows each) fit 80: one call scores both
            assert (cell["reward_calls"], cell["reward_rows"]) == (1, 2)
        assert nfe == arena.formula_nfe(name, pipe, budget) and nfe <= budget, name
    euler = _task(pipe, images=1, sampler="euler")  # the solver is passed through: Euler pays one row per step
    assert arena.run_cell(euler, "plain-ode", 40)["nfe"] == 40 == arena.formula_nfe("plain-ode", pipe, 40, "euler")
    assert arena.run_cell(euler, "best_of_n-ode", 45)["nfe"] == 40  # two 20-step Euler samples
    # the arena's Demon formula is the library's demon_cost for the Heun rollout
    for look, r_of_c in (("tweedie", "consistency"), ("rollout", "baseline")):
        sigmas, K = costs.demon_config(pipe, 200, look, "heun")
        assert costs.demon_rows(sigmas, K, look, "heun") == demon_mod.demon_cost(
            sigmas, K=K, r_of_c=r_of_c, c_steps=costs.ROLLOUT_C_STEPS, ode_after=costs.ODE_AFTER)["network_rows"]
    assert arena.run_cell(task, "demon-tanh-rollout", 40) is None  # no Demon setting fits 40 NFE
    assert arena.run_cell(_task(pipe, "jpeg-small"), "guidance-dps", 80) is None  # no gradient of a JPEG size


def _demon_config_by_search(pipe, budget, lookahead, sampler):
    """``costs.demon_config`` as it was: K counted up one by one while the next K still fits."""
    for steps in costs.DEMON_GRIDS:
        sigmas = pipe.sigmas(steps)
        if costs.demon_rows(sigmas, 2, lookahead, sampler) <= budget:
            K = 2
            while K < 256 and costs.demon_rows(sigmas, K + 1, lookahead, sampler) <= budget:
                K += 1
            return sigmas, K
    return None


def test_demon_config_matches_the_one_by_one_search(pipe):
    budgets = (0, 40, 55, 60, 79.5, 80, 120, 160, 161, 333.3, 1000, 5000, 40000, 1e6, float("inf"))
    for sampler in ("heun", "euler", "rk4", _tiny_tuned(pipe)):
        for lookahead in ("tweedie", "rollout"):
            for budget in budgets:
                got, want = (f(pipe, budget, lookahead, sampler) for f in (costs.demon_config, _demon_config_by_search))
                assert (got is None) == (want is None), (sampler, lookahead, budget)
                if got is not None:
                    assert torch.equal(got[0], want[0]) and got[1] == want[1], (sampler, lookahead, budget)


def _tiny_tuned(pipe, nfe=5):
    """A tuned sampler without tuning: a 5-step Karras grid of the pipeline for DPM-Solver++(2M), with a
    recorded tuning cost (the arena only reads these fields)."""
    return TunedSampler(pipe.sigmas(nfe), "dpmpp_2m", tuning_nfe=123, info={"calibration": 4, "seconds": 1.5})


def test_counted_nfe_with_a_tuned_sampler_matches_its_formula(pipe):
    """Every method whose PF-ODE runs take the tuned grid pays its counted NFE per sample, as its formula says."""
    tuned = _tiny_tuned(pipe)
    task = _task(pipe, images=1, sampler=tuned)
    for name in ("plain-ode", "best_of_n-ode", "search-random", "search-zero-order", "demon-tanh-rollout",
                 "guidance-dps", "noise-opt-dno"):
        budget = 160 if name.endswith("-rollout") else 80
        cell = arena.run_cell(task, name, budget)
        assert cell["nfe"] == arena.formula_nfe(name, pipe, budget, tuned) and cell["nfe"] <= budget, name
    assert arena.run_cell(task, "plain-ode", 80)["nfe"] == 5  # the tuned grid's NFE, not 80's steps
    best = arena.run_cell(task, "best_of_n-ode", 80)
    assert best["nfe"] == 80 and best["reward_rows"] == 16  # 16 five-NFE samples instead of two 39-row Heun ones
    assert arena.run_cell(task, "guidance-dps", 80)["nfe"] == 10  # each of the 5 evaluations adds a backward pass
    # a Demon rollout from σ runs the tuned grid below σ: the formula counts those σ values, not Heun steps
    sigmas, K = costs.demon_config(pipe, 160, "rollout", tuned)
    assert costs.demon_rows(sigmas, K, "rollout", tuned) < costs.demon_rows(sigmas, K, "rollout", "heun")
    assert arena.run_cell(_task(pipe, images=1, sampler=_tiny_tuned(pipe, 81)), "plain-ode", 80) is None  # no fit


def test_arena_with_a_tuned_sampler_reports_the_tuning_cost_apart(pipe, tmp_path, capsys):
    tuned = _tiny_tuned(pipe)
    rows = arena.run_arena(tmp_path / "py", rewards=("classifier",), budgets=(40,), images=2,
                           methods=["plain-ode"], sampler=tuned)
    assert [r["nfe"] for r in rows] == [5]  # the tuning's 123 calls are in no row
    tuning = json.loads((tmp_path / "py" / "tuning.json").read_text())
    assert (tuning["tuning_nfe"], tuning["nfe"], tuning["seconds"], tuning["calibration"]) == (123, 5, 1.5, 4)
    assert "tuning cost (once, not in any NFE below): 123 network calls on 4 calibration noises, 1.5 s" in \
        (tmp_path / "py" / "arena.md").read_text()
    tuned.save(tmp_path / "tuned.json")  # the command line loads the same sampler from its file
    code, _ = run_cli(capsys, "--out", tmp_path / "cli", "--rewards", "classifier", "--budgets", 40, "--images", 2,
                      "--methods", "plain-ode", "--sampler", tmp_path / "tuned.json", "--no-progress")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert code == 0 and strip(json.loads((tmp_path / "cli" / "arena.json").read_text())) == strip(rows)
    (tmp_path / "bad.json").write_text("{}")
    code, err = run_cli(capsys, "--out", tmp_path / "bad", "--sampler", tmp_path / "bad.json")
    assert code == 2 and "--sampler" in err and "\n" not in err and not (tmp_path / "bad").exists(), err
    other = TunedSampler(torch.tensor([14.6, 1.0, 0.1, 0.0]), "dpmpp_2m")  # tuned for another model's σ_max
    with pytest.raises(ValueError, match="sampler: a tuned grid from sigma_max=80"):
        arena.run_arena(tmp_path / "other", budgets=(40,), images=2, methods=["plain-ode"], sampler=other)
    assert not (tmp_path / "other").exists()


def test_best_of_n_is_at_least_plain_on_the_same_noises(pipe, small_run):
    rows, _ = small_run
    task = _task(pipe, images=3)
    for budget in (40, 80, 160):
        cell = arena.run_cell(task, "best_of_n-ode", budget)
        x0, hyper = cell["x0"], cell["hyper"]
        steps = int(hyper.split(", ")[1].split()[0])
        plain = methods.ode_sampler(task, steps)(task.noise)  # candidate 0 of the pool: the plain sample
        # the pool contains plain's sample, so each item's best is at least its reward; 1e-4 covers the
        # float differences of evaluating that sample inside a larger batch
        assert (task.reward(x0) >= task.reward(plain) - 1e-4).all(), budget
    by = {(r["method"], r["reward_name"], r["budget_nfe"]): r for r in rows}
    for reward_name in ("classifier:bag", "jpeg-small"):
        for budget in SMALL["budgets"]:
            # plain-ode spends the budget on steps (20 → 40); the same noises then give nearly the same
            # images, so best-of-N's pool (which holds the 20-step one) wins at the mean; the 1e-2 slack
            # is the 20- vs 40-step discretisation change of the reward (measured < 3e-3)
            assert by["best_of_n-ode", reward_name, budget]["reward"] >= \
                by["plain-ode", reward_name, budget]["reward"] - 1e-2


def test_heldout_classifier_agrees_with_the_shipped_one(pipe):
    heldout = toy.load_heldout_classifier()
    assert isinstance(heldout, toy.MLPClassifier)  # another architecture than the shipped CNN
    x, y = toy.load_fashion_mnist("eval")
    with torch.no_grad():
        ours, theirs = heldout(x).argmax(1), pipe.classifier(x).argmax(1)
    # measured: 88.9% accurate (the shipped CNN: 88.8%) and 93.0% agreement on the 3,000-image slice
    assert (ours == y).float().mean() > 0.86
    assert (ours == theirs).float().mean() > 0.90
    assert metrics.features(heldout, x[:5]).shape == (5, 128)


def test_frechet_distance_of_real_splits_is_near_zero_and_grows_with_noise():
    heldout = toy.load_heldout_classifier()
    x, y = toy.load_fashion_mnist("eval")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    f_a, b = metrics.features(heldout, x[perm[:1500]]), x[perm[1500:]]
    between_classes = metrics.frechet_distance(metrics.features(heldout, x[y == 8]), metrics.features(heldout, x))
    noisy = [metrics.frechet_distance(f_a, metrics.features(heldout, b + s * torch.randn(b.shape, generator=g)))
             for s in (0.0, 0.25, 0.5, 1.0)]
    # 1,500 vs 1,500 real images: only the finite-sample bias remains (measured 2.5 against 275 between
    # the bag class and the whole slice); added pixel noise moves the features steadily away
    assert noisy[0] < 0.02 * between_classes
    assert noisy[0] < noisy[1] < noisy[2] < noisy[3] and noisy[3] > 4 * noisy[0]  # measured 5.6×


def test_arena_is_reproducible_under_a_seed(small_run, tmp_path):
    rows, _ = small_run
    again = arena.run_arena(None, **{**SMALL, "rewards": ("classifier",), "budgets": (40,)})
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    first = [r for r in rows if r["reward_name"] == "classifier:bag" and r["budget_nfe"] == 40]
    assert strip(again) == strip(first) and len(first) == 3
    other = arena.run_arena(None, **{**SMALL, "rewards": ("classifier",), "budgets": (40,), "seed": 4})
    assert all(a["reward"] != b["reward"] for a, b in zip(other, first))


def test_arena_outputs_and_schema(small_run):
    rows, out = small_run
    on_disk = json.loads((out / "arena.json").read_text())
    assert on_disk == rows and len(rows) == 3 * 2 * 2  # methods (plain-ode, plain-sde, best_of_n) × rewards × budgets
    for r in on_disk:
        assert tuple(r) == arena.KEYS
        family, variant = r["method"].split("-", 1)
        assert family in arena.FAMILIES and variant
        assert r["nfe"] <= r["budget_nfe"] and r["seconds"] > 0 and r["diversity"] > 0
    assert {r["reward_name"] for r in rows} == {"classifier:bag", "jpeg-small"}
    assert (out / "pareto.png").stat().st_size > 5000 and "| plain-ode | 80 |" in (out / "arena.md").read_text()
    for name in ("plain-ode", "best_of_n-ode"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert arena.METHODS.keys() >= {"guidance-dps", "search-random", "search-zero-order", "smc-das-argmax",
                                     "smc-fk-resample", "demon-optimal-rollout", "plain-sde"}


def test_user_reward_runs_through_the_python_function():
    rows = arena.run_arena(None, rewards={"brightness": rewards.brightness}, budgets=(40,), images=2,
                           methods=["best_of_n", "guidance", "smc-fk-argmax"])
    assert [r["method"] for r in rows] == ["best_of_n-ode", "smc-fk-argmax", "guidance-dps"]  # METHODS order
    assert all(r["reward_name"] == "brightness" for r in rows)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``kdiff-align arena ARGV`` in this process: (exit status, stderr)."""
    try:
        code = main(["arena", *map(str, argv)])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, needle", [(["--budgets", "x"], "--budgets"), (["--images", "1"], "--images"),
                                          (["--sampler", "nope"], "--sampler"), (["--methods", "fancy"], "--methods"),
                                          (["--rewards", "aesthetic:/nope"], "--rewards"),
                                          (["--rewards", "vlm"], "--rewards"), (["--rewards", "logit:hat"], "--rewards"),
                                          (["--rewards", "classifier:hat"], "--rewards"), (["--class", "hat"], "--class"),
                                          (["--seed", "-1"], "--seed"), (["--threads", "0"], "--threads")])
def test_cli_errors_are_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    code, err = run_cli(capsys, "--out", tmp_path / "run", *argv)
    assert code == 2 and needle in err and "\n" not in err and not list(tmp_path.iterdir()), err


def test_an_out_that_cannot_be_written_fails_before_any_work(capsys, tmp_path):
    (tmp_path / "f").touch()
    for out in (tmp_path / "f", tmp_path / "f" / "run", "/proc/kdiff"):
        code, err = run_cli(capsys, "--out", out, "--quick")
        assert code == 2 and "--out" in err and "\n" not in err, err
    proc = subprocess.run([sys.executable, "-m", "kdiff_align", "arena", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=120)  # the command a person types
    assert proc.returncode == 2 and proc.stderr.startswith("kdiff-align arena: error: argument --out:"), proc.stderr
    assert proc.stderr.count("\n") == 1 and not proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").stat().st_size == 0
    with pytest.raises(ValueError, match="out"):  # the Python function checks before loading anything
        arena.run_arena(tmp_path / "f", budgets=(40,), images=2, methods=["plain-ode"])


def test_help_and_shared_flags_after_the_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["arena", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "--no-progress" in text and "--debug" in text and "classifier[:CLASS]" in text
    args = parser().parse_args(["arena", "--debug", "--no-progress", "--rewards", "logit", "jpeg"])
    assert args.debug and args.no_progress and args.rewards == ["classifier", "jpeg-small"]  # old names: aliases


def test_an_interrupted_run_keeps_its_cells_and_resumes(small_run, tmp_path):
    """Ctrl-C after the first cell: the cell is on disk; the same call finishes the run with the same rows."""
    out, seen = tmp_path / "run", []

    def stop_after_first(line):
        seen.append(line)
        raise KeyboardInterrupt

    settings = {**SMALL, "rewards": ("classifier",), "budgets": (40,)}
    with pytest.raises(KeyboardInterrupt):
        arena.run_arena(out, **settings, log=stop_after_first)
    first_cell = out / "images" / "classifier-bag_plain-ode_b40.png"
    assert (out / "INCOMPLETE").exists() and first_cell.is_file() and len(seen) == 1
    stamp = first_cell.stat().st_mtime_ns
    rows = arena.run_arena(out, **settings)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    fresh = [r for r in small_run[0] if r["reward_name"] == "classifier:bag" and r["budget_nfe"] == 40]
    assert strip(rows) == strip(fresh) and len(rows) == 3  # the resumed run is the uninterrupted one
    assert first_cell.stat().st_mtime_ns == stamp and not (out / "INCOMPLETE").exists()  # kept, not redone
    attempts = [json.loads(line)["attempt"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(attempts) == 3 and attempts[0] != attempts[1] == attempts[2]
    assert json.loads((out / "arena.json").read_text()) == rows
    with pytest.raises(ValueError, match="config differs"):  # other settings need another folder
        arena.run_arena(out, **{**settings, "seed": 5})


def test_reward_guided_denoiser_is_exact_on_a_gaussian():
    # data N(μ, s²I): D(x, σ) = μ + k(x − μ), k = s²/(s² + σ²), and r(x₀) = ⟨a, x₀⟩ has ∇_x r(D) = k·a,
    # so the guided denoiser is D + scale·σ²·k·a exactly
    model = GaussianDenoiser(torch.zeros(3), 0.5)
    a = torch.tensor([1.0, -2.0, 0.5])
    guided = guidance.reward_guided_denoiser(model, lambda x0: x0 @ a, 0.3)
    x, sigma = torch.randn(4, 3), torch.tensor([0.1, 1.0, 2.0, 5.0])
    k = (0.25 / (0.25 + sigma**2))[:, None]
    torch.testing.assert_close(guided(x, sigma), model(x, sigma) + 0.3 * sigma[:, None] ** 2 * k * a)
    assert guided.backward_rows == 4
    with pytest.raises(TypeError, match="differentiable"):
        guidance.reward_guided_denoiser(model, lambda x0: x0.detach().sum(1), 1.0)(x, sigma)
    with pytest.raises(ValueError, match="scale"):
        guidance.reward_guided_denoiser(model, lambda x0: x0.sum(1), -1.0)


def test_searches_keep_the_best_and_never_get_worse():
    reward = lambda x0: -(x0 - 1).pow(2).flatten(1).sum(1)  # noqa: E731  (best noise: all ones)
    noises = torch.randn(6, 4, 1, 3, generator=torch.Generator().manual_seed(0))
    x0, noise, r = search.random_search(lambda n: n, reward, noises)
    torch.testing.assert_close(r, reward(noises.flatten(0, 1)).view(6, 4).max(0).values.double())
    torch.testing.assert_close(x0, noise)
    pivot = noises[0]
    _, _, r_zero = search.zero_order_search(lambda n: n, reward, pivot, iterations=0, count=2)
    _, _, r_many = search.zero_order_search(lambda n: n, reward, pivot, iterations=30, count=4, step=0.3,
                                            generator=torch.Generator().manual_seed(1))
    assert (r_many >= r_zero).all() and (r_many > r_zero).any()


def test_strengths_are_checked_and_reach_the_methods(pipe):
    for bad in ({"beta": 1.0}, {"alpha": 0}, {"tau": "hot"}, {"step": -1}):
        with pytest.raises(ValueError, match="strengths"):
            arena.run_arena(None, budgets=(40,), images=2, methods=["plain-ode"], strengths=bad)
    spec, = scores.resolve_rewards(pipe, ("classifier",), "bag", toy.load_heldout_classifier()).values()
    assert spec.scale == 1 / spec.alpha == 1.0  # guidance aims at the tilt p·exp(r/α) that SMC targets
    rows = arena.run_arena(None, rewards=("classifier",), budgets=(80,), images=2, methods=["search-zero-order"],
                           strengths={"step": 0.25})
    default = arena.run_arena(None, rewards=("classifier",), budgets=(80,), images=2, methods=["search-zero-order"])
    assert rows[0]["reward"] != default[0]["reward"]  # λ moved the neighbours


def test_the_docs_main_table_reproduces_with_its_command():
    """One cell of docs/arena.md's main table, rerun with the command the page shows, to the printed digits."""
    text = (ROOT / "docs" / "arena.md").read_text()
    command = next(line for line in text.splitlines() if line.startswith("kdiff-align arena --rewards"))
    args = parser().parse_args(command.split()[1:])
    row = next(line for line in text.splitlines() if line.startswith("| best_of_n-ode | 80 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    again, = arena.run_arena(None, rewards=tuple(args.rewards), budgets=(80,), images=args.images, seed=args.seed,
                             methods=["best_of_n-ode"], class_name=args.class_name, sampler=args.sampler)
    assert cells[2] == f"{again['nfe']:.1f}" and cells[3] == str(again["reward_calls"])
    assert cells[5] == f"{again['reward']:+.3f} ± {again['reward_sem']:.3f}"
    assert cells[6] == f"{again['heldout_reward']:+.3f}" and cells[7] == f"{again['diversity']:.2f}"
