"""Tuned few-step samplers (issue 25): grid validity, exact NFE, JSON round trip, closed-form optima."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdiff_align as ka
from kdiff_align.sampling import TunedSampler, tune_sampler
from kdiff_align.strategies import gaussian_problems
from kdiff_align.testing import CountingDenoiser, GaussianDenoiser, MixtureDenoiser

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def noises(n, dim, seed):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * SIGMA_MAX


def gaussian(dim=8):
    return GaussianDenoiser(torch.zeros(dim), torch.linspace(0.2, 2.0, dim)).double()


def mixture(dim=4):
    means = torch.stack([torch.full((dim,), -2.0), torch.full((dim,), 2.0)])
    return MixtureDenoiser(means, torch.tensor([0.3, 0.5]), torch.tensor([0.5, 0.5])).double()


def median_error(x, ref):
    return (x - ref).flatten(1).norm(dim=1).median().item()


def test_grid_is_valid_and_sampling_costs_exactly_nfe():
    model = gaussian(4)
    tuned = tune_sampler(model, noises(16, 4, 0), 5, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=24)
    s = tuned.sigmas
    assert tuned.nfe == 5 and len(s) == 6 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert s[0].item() == pytest.approx(SIGMA_MAX, rel=1e-12) and s[-2] >= SIGMA_MIN
    counted = CountingDenoiser(model)
    tuned(counted, noises(3, 4, 1), disable=True)
    assert counted.calls == 5 and counted.rows == 15
    # tuning cost is counted: the teacher's (24 − 1)·4 + 1 evaluations and at least one run per start
    assert tuned.tuning_nfe >= tuned.info["teacher_nfe"] + 5 * 3 == 93 + 15


def test_save_load_round_trip_gives_bit_identical_samples(tmp_path):
    model = mixture(2)
    tuned = tune_sampler(model, noises(16, 2, 0), 4, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=16,
                         max_evals=20)
    tuned.save(tmp_path / "tuned.json")
    loaded = TunedSampler.load(tmp_path / "tuned.json")
    assert loaded.method == tuned.method and loaded.nfe == 4 and loaded.tuning_nfe == tuned.tuning_nfe
    assert torch.equal(loaded.sigmas, tuned.sigmas)
    x = noises(8, 2, 5)
    assert torch.equal(loaded(model, x, disable=True), tuned(model, x, disable=True))
    assert "pickle" not in (tmp_path / "tuned.json").read_text()
    (tmp_path / "bad.json").write_text('{"sigmas": [1.0, 0.0]}')
    with pytest.raises(ValueError, match="not a TunedSampler"):
        TunedSampler.load(tmp_path / "bad.json")


def two_step_error(model, x_T, sigma_1):
    """Mean log final error of the 2-evaluation DDIM grid [σ_max, σ_1, 0], in closed form for a Gaussian."""
    x_1 = (sigma_1 / SIGMA_MAX) * x_T + (1 - sigma_1 / SIGMA_MAX) * model(x_T, torch.full((len(x_T),), SIGMA_MAX))
    out = model(x_1, torch.full((len(x_T),), sigma_1))
    return (out - model.flow(x_T, SIGMA_MAX, 0.0)).norm(dim=1).log().mean().item()  # tune_sampler's objective


def test_two_step_grid_recovers_the_brute_force_optimum():
    model, x_T = gaussian(8), noises(32, 8, 0)
    grid = np.exp(np.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), 4001))[1:-1]
    errors = [two_step_error(model, x_T, s) for s in grid]
    best = grid[int(np.argmin(errors))]
    tuned = tune_sampler(model, x_T, 2, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, method="dpmpp_2m", max_evals=40,
                         corrections=False)  # the grid alone, refined to convergence
    sigma_1 = tuned.sigmas[1].item()
    # the brute-force grid steps 0.0027 in log σ; the teacher's own error (DPM-Solver++ 3M, 157 steps) is
    # ~1e-5 relative, so the tuned σ_1 lands within a few grid steps and its mean log error within 1e-3
    assert abs(math.log(sigma_1 / best)) < 0.02, (sigma_1, best)
    assert two_step_error(model, x_T, sigma_1) <= min(errors) + 1e-3


def test_tuned_beats_karras_on_a_gaussian_and_default_on_held_out_mixture_noises():
    for model, nfe, bound in ((gaussian(8), 6, 0.5), (mixture(4), 6, 0.5)):
        tuned = tune_sampler(model, noises(64, tuned_dim(model), 0), nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
        x = noises(256, tuned_dim(model), 1)  # held-out noises
        ref = ka.odeint(model, x, ka.get_sigmas_exponential(1000, SIGMA_MIN, SIGMA_MAX).double(), method="dpmpp_3m",
                        disable=True)
        karras = ka.get_sigmas_karras(nfe, SIGMA_MIN, SIGMA_MAX).double()
        untuned = min(median_error(ka.odeint(model, x, karras, method=m, disable=True), ref)
                      for m in ("dpmpp_2m", "unipc", "deis", "ipndm"))
        heun = median_error(ka.odeint(model, x, ka.get_sigmas_karras(nfe // 2, SIGMA_MIN, SIGMA_MAX).double(),
                                      disable=True), ref)
        # measured 0.015 (Gaussian) and 0.054 (mixture) of the best solver on Karras ρ = 7 (with three correction
        # weights until 2026-12-08, 0.016 and 0.058; with the Adam fit until 2026-12-07, 0.07 and 0.05): the issue's
        # 0.5× target leaves room for the noise of 256 held-out items
        assert median_error(tuned(model, x, disable=True), ref) < bound * min(untuned, heun)


def tuned_dim(model):
    return model.means.shape[1] if hasattr(model, "means") else model.mean.shape[0]


@settings(max_examples=8)
@given(nfe=st.integers(1, 7), problem=gaussian_problems(max_dim=3))
def test_tuned_grid_properties(nfe, problem):
    mean, std, _, seed = problem
    model = GaussianDenoiser(mean, std).double()
    x_T = noises(8, len(mean), seed)
    tuned = tune_sampler(model, x_T, nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=12, max_evals=12)
    s = tuned.sigmas
    assert len(s) == nfe + 1 and s[-1] == 0 and (s[1:] < s[:-1]).all() and s[-2] >= SIGMA_MIN * (1 - 1e-9)
    counted = CountingDenoiser(model)
    out = tuned(counted, x_T, disable=True)
    assert counted.calls == nfe
    # never worse on the calibration noises (mean log error, the tuner's objective) than the best solver it
    # searched on the Karras grid it starts from (against the exact flow: the teacher's own error, ~1e-6
    # relative, is the slack)
    exact = model.flow(x_T, SIGMA_MAX, 0.0)
    karras = ka.get_sigmas_karras(nfe, SIGMA_MIN, SIGMA_MAX).double()
    log_err = lambda x: (x - exact).norm(dim=1).clamp_min(1e-300).log().mean().item()  # noqa: E731
    base = min(log_err(ka.odeint(model, x_T, karras, method=m, disable=True, lower_order_final=True))
               for m in searched(tuned))
    assert log_err(out) <= base + 1e-3


def searched(tuned):
    """The solvers a tuning ran its grid search with."""
    return {key.split("/")[0] for key in tuned.info["errors"]}


def test_default_solver_is_unipc_below_10_nfe_when_corrections_are_fitted():
    model, x_T = gaussian(3), noises(16, 3, 0)
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=12, max_evals=8, end_to_end=2)
    assert searched(tune_sampler(model, x_T, 4, **kw)) == {"unipc"}
    assert searched(tune_sampler(model, x_T, 9, **kw)) == {"unipc"}
    assert searched(tune_sampler(model, x_T, 4, corrections=False, **kw)) == set(ka.sampling.TUNE_METHODS)
    assert searched(tune_sampler(model, x_T, 10, **kw)) == set(ka.sampling.TUNE_METHODS)
    assert searched(tune_sampler(model, x_T, 4, method=("deis", "ipndm"), **kw)) == {"deis", "ipndm"}


@pytest.mark.parametrize("kw,match", [
    (dict(nfe=0), "nfe"),
    (dict(nfe=2.5), "nfe"),
    (dict(x_T=torch.randn(4)), "x_T"),
    (dict(x_T=torch.randn(1, 3)), "x_T"),
    (dict(x_T=torch.full((4, 3), float("nan"))), "x_T"),
    (dict(method="heun"), "method"),
    (dict(sigma_min=100.0), "sigma_min"),
    (dict(refine=-1), "refine"),
    (dict(refine=1.5), "refine"),
    (dict(max_evals=-1), "max_evals"),
    (dict(end_to_end=True), "end_to_end"),
    (dict(candidates=1), "candidates"),
    (dict(substeps=0), "substeps"),
])
def test_bad_input_fails_naming_the_argument(kw, match):
    args = dict(model=gaussian(3).float(), x_T=torch.randn(4, 3) * 10, nfe=3) | kw
    with pytest.raises(ValueError, match=match):
        tune_sampler(args.pop("model"), args.pop("x_T"), args.pop("nfe"), **args)


def test_a_model_returning_nan_fails_naming_the_model():
    with pytest.raises(ValueError, match="model returned NaN"):
        tune_sampler(lambda x, sigma: x * float("nan"), torch.randn(4, 3) * 10, 3, sigma_max=10.0)


def test_pipeline_odeint_takes_a_tuned_sampler_for_a_guided_model():
    from kdiff_align.models.mixture import mixture_pipeline
    pipe = mixture_pipeline()
    pipe.denoiser = CountingDenoiser(pipe.denoiser)
    cond = {"prompts": ["dark", "light"], "cfgs": [2.0, 1.0]}  # multi-prompt CFG: one call per evaluation
    x_T = pipe.get_init_latent(32, generator=torch.Generator().manual_seed(0))
    tuned = tune_sampler(pipe.guided(cond), x_T, 4, sigma_min=pipe.sigma_min, sigma_max=pipe.sigma_max,
                         candidates=20)
    x = pipe.get_init_latent(64, generator=torch.Generator().manual_seed(1))
    pipe.denoiser.calls = 0
    out = pipe.odeint(x, cond, sampler=tuned, disable=True)
    assert pipe.denoiser.calls == 4
    assert torch.equal(out, tuned(pipe.guided(cond), x, disable=True))
    ref = pipe.odeint(x, cond, 400, method="dpmpp_3m", disable=True)
    karras = pipe.odeint(x, cond, 4, method="dpmpp_2m", disable=True)
    assert median_error(out, ref) < 0.5 * median_error(karras, ref)
    with pytest.raises(ValueError, match="sampler="):
        pipe.odeint(x, cond, 4, sampler=tuned)


def test_extra_args_reach_the_model():
    base = GaussianDenoiser(torch.zeros(3), 0.5).double()

    def model(x, sigma, offset):
        return base(x - offset, sigma) + offset

    offset = torch.full((16, 3), 2.0, dtype=torch.float64)
    tuned = tune_sampler(model, noises(16, 3, 0), 3, extra_args={"offset": offset}, sigma_min=SIGMA_MIN,
                         sigma_max=SIGMA_MAX, candidates=12, max_evals=10)
    out = tuned(model, noises(16, 3, 1), extra_args={"offset": offset}, disable=True)
    assert out.mean().item() == pytest.approx(2.0, abs=0.3)


def test_odeint_with_a_tuned_method_runs_its_grid_and_its_tail():
    model = gaussian(4)
    tuned = tune_sampler(model, noises(16, 4, 0), 5, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=16,
                         max_evals=8)
    x, full = noises(8, 4, 1), ka.get_sigmas_karras(30, SIGMA_MIN, SIGMA_MAX).double()
    assert torch.equal(tuned.along(full), tuned.sigmas)
    assert torch.equal(ka.odeint(model, x, full, method=tuned, disable=True), tuned(model, x, disable=True))
    # a look-ahead from σ = 3 runs the tuned σ values below 3, then the step to 0
    tail = tuned.along(torch.tensor([3.0, 0.0], dtype=torch.float64))
    assert tail[0] == 3.0 and tail[-1] == 0 and torch.equal(tail[1:], tuned.sigmas[tuned.sigmas < 3.0 * (1 - 1e-4)])
    counted = CountingDenoiser(model)
    ka.odeint(counted, x, torch.tensor([3.0, 0.0]), method=tuned, disable=True)
    assert counted.calls == len(tail) - 1


def test_entry_points_that_cannot_run_a_tuned_sampler_reject_it_naming_method():
    model, tuned = gaussian(2), TunedSampler(torch.tensor([80.0, 1.0, 0.1, 0.0]), "dpmpp_2m")
    x, up = noises(3, 2, 0) / SIGMA_MAX, torch.tensor([0.1, 1.0, 80.0], dtype=torch.float64)
    calls = {"oderevert": lambda: ka.oderevert(CountingDenoiser(model), x, up, method=tuned, disable=True),
             "sdeint": lambda: ka.sdeint(model, x, tuned.sigmas, method=tuned, disable=True),
             "ode_step": lambda: ka.ode_step(model, x, 1.0, 0.5, method=tuned)}
    for where, call in calls.items():
        with pytest.raises(ValueError, match=rf"^method: a TunedSampler integrates .*forward.*{where}"):
            call()
    counted = CountingDenoiser(model)
    with pytest.raises(ValueError, match="σ decreasing"):
        ka.oderevert(counted, x, up, method=tuned, disable=True)
    assert counted.calls == 0  # rejected before the first step


def test_demon_and_search_take_a_tuned_sampler():
    from kdiff_align.align.demon import sample_demon
    from kdiff_align.align.search import random_search
    model = mixture(2)
    tuned = tune_sampler(model, noises(16, 2, 0), 4, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, candidates=16,
                         max_evals=8)
    reward = lambda x0: -(x0 - 2.0).pow(2).sum(1)  # noqa: E731  (prefer the mode at +2)
    n = torch.randn(4, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    counted = CountingDenoiser(model)
    x0, _, best = random_search(lambda z: tuned(counted, z * SIGMA_MAX, disable=True), reward, n)
    assert counted.calls == tuned.nfe and counted.rows == 24 * tuned.nfe  # N·B candidates, one batch
    assert torch.equal(best, reward(tuned(model, n.flatten(0, 1) * SIGMA_MAX, disable=True)).view(4, 6).max(0).values)
    sigmas = ka.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    x = noises(3, 2, 4)
    demon = lambda ode_after: sample_demon(model, x, sigmas, reward, K=4, beta="auto", ode_after=ode_after,  # noqa
                                           method=tuned, r_of_c="baseline", generator=torch.Generator().manual_seed(0),
                                           disable=True)
    assert torch.equal(demon(100.0), tuned(model, x, disable=True))  # no Demon step: the tuned ODE tail alone
    out = demon(1.0)  # Demon steps above σ = 1 (baseline look-aheads on the tuned grid), then the tuned tail
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_cli_tune_writes_a_sampler_that_generate_and_demon_run(tmp_path, capsys):
    import json

    from kdiff_align.apps import cli
    out = tmp_path / "tuned.json"
    assert cli.main(["tune", "--model", "toy:mixture", "--nfe", "3", "--out", str(out), "--prompt", "dark",
                     "--cfg", "1.5", "--calib", "8", "--max-evals", "6", "--end-to-end", "5", "--no-progress"]) == 0
    tuned = TunedSampler.load(out)
    assert tuned.nfe == 3 and tuned.info["cfg"] == 1.5 and tuned.tuning_nfe > 0
    # the end-to-end runs reached the model's gradients (one backward pass per run it kept but the last, 3 calls
    # each)
    backward = tuned.info["backward_calls"]
    assert 0 < backward <= 4 * 3 and backward % 3 == 0 and tuned.info["end_to_end_steps"] == 5
    ten = tmp_path / "ten.json"  # from 10 NFE four solvers are searched: --refine 2 corrects two of them
    assert cli.main(["tune", "--model", "toy:mixture", "--nfe", "10", "--out", str(ten), "--calib", "8",
                     "--max-evals", "4", "--end-to-end", "2", "--refine", "2", "--no-progress"]) == 0
    assert len(TunedSampler.load(ten).info["check_errors"]) == 2
    gen = tmp_path / "gen"
    assert cli.main(["generate", "--model", "toy:mixture", "--prompt", "dark", "--seeds", "0-1", "--cfg", "1.5",
                     "--method", "best_of_n", "--n", "3", "--reward", "brightness", "--sampler", str(out),
                     "--out", str(gen), "--no-progress"]) == 0
    images = [json.loads(line) for line in (gen / "steps.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "image"]
    assert [r["nfe_forward"] for r in images] == [3 * 3, 3 * 3]  # n candidates × the tuned sampler's NFE
    assert cli.main(["demon", "--model", "toy:mixture", "--prompt", "dark", "--reward", "brightness", "--cfg", "1.5",
                     "--sampler", str(out), "--steps", "6", "--K", "2", "--out", str(tmp_path / "demon"),
                     "--no-progress"]) == 0
    config = json.loads(next((tmp_path / "demon").glob("*/config.json")).read_text())
    assert config["method"]["sigmas"] == tuned.sigmas.tolist()
    assert "warning" not in capsys.readouterr().err  # run on the model and CFG it was tuned on
    # another guidance scale or model than the tuned one's: one warning line, and the run goes on
    assert cli.main(["generate", "--model", "toy:mixture", "--prompt", "dark", "--seeds", "0", "--cfg", "3",
                     "--sampler", str(out), "--out", str(tmp_path / "gen3"), "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "cfg 1.5 (this run: 3.0)" in warnings[0] and str(out) in warnings[0]
    from kdiff_align.apps.cliargs import sampler_mismatch
    assert "model 'toy:mixture' (this run: 'toy:fashion')" in sampler_mismatch(tuned, "toy:fashion", 1.5)
    assert sampler_mismatch(tuned, "toy:mixture", 1.5) is None and sampler_mismatch("heun", "toy:fashion", 7.0) is None
    for argv, words in ((["tune", "--model", "toy:mixture", "--nfe", "3", "--out", str(tmp_path / "t.txt")], "--out"),
                        (["tune", "--model", "toy:mixture", "--nfe", "0", "--out", str(out)], "--nfe"),
                        (["tune", "--model", "toy:mixture", "--nfe", "3", "--end-to-end", "-1", "--out", str(out)],
                         "--end-to-end"),
                        (["tune", "--model", "toy:mixture", "--nfe", "3", "--refine", "0", "--out", str(out)],
                         "--refine"),
                        (["generate", "--model", "toy:mixture", "--prompt", "dark", "--out", str(tmp_path / "g2"),
                          "--sampler", str(tmp_path / "missing.json")], "--sampler")):
        try:
            status = cli.main(argv)
        except SystemExit as exit_info:
            status = exit_info.code
        err = capsys.readouterr().err
        assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t.txt").exists() and not (tmp_path / "g2").exists()


def test_cli_tune_on_a_prompts_file_cycles_the_calibration_noises_over_them(tmp_path, monkeypatch, capsys):
    import json

    from kdiff_align.apps import cli
    from kdiff_align.apps import tune as tune_app
    from kdiff_align.models.mixture import mixture_pipeline
    pipes = []
    monkeypatch.setattr(tune_app, "load_model", lambda model, device: pipes.append(mixture_pipeline(device))
                        or pipes[-1])
    prompts, out = tmp_path / "prompts.txt", tmp_path / "tuned.json"
    prompts.write_text("dark\n\nlight\n")
    assert cli.main(["tune", "--model", "toy:mixture", "--nfe", "3", "--out", str(out), "--prompts", str(prompts),
                     "--calib", "6", "--max-evals", "2", "--end-to-end", "0", "--no-progress"]) == 0
    info = json.loads(out.read_text())["info"]
    assert info["prompts"] == ["dark", "light"] and "prompt" not in info
    assert set(pipes[0]._prompt_cache) == {"dark", "light", ""}  # both prompts (and CFG's null) reached the model
    # noise i is conditioned on prompt i mod k: the samples' brightness alternates (class means −0.6 and +0.6)
    pipe = mixture_pipeline()
    x = pipe.get_init_latent(4, torch.Generator().manual_seed(0))
    condition = tune_app.calibration_condition(["dark", "light"], 1.0, 4)
    x0 = ka.odeint(pipe.guided(condition, 4), x, pipe.sigmas(20), method="dpmpp_3m", disable=True)
    assert x0.mean((1, 2, 3)).tolist() == pytest.approx([-0.6, 0.6, -0.6, 0.6], abs=0.15)
    assert tune_app.calibration_condition(["dark"], 2.0, 4) == {"prompts": ["dark"], "cfgs": [2.0]}
    capsys.readouterr()
    unknown, three = tmp_path / "unknown.txt", tmp_path / "three.txt"
    unknown.write_text("dark\nmauve\n")
    three.write_text("dark\ngrey\nlight\n")
    for argv, words in ((["--prompts", str(three), "--calib", "2"], "--calib: at least one"),
                        (["--prompts", str(unknown)], "--prompts"),
                        (["--prompts", str(prompts), "--prompt", "dark"], "--prompt")):
        try:
            status = cli.main(["tune", "--model", "toy:mixture", "--nfe", "3", "--out", str(tmp_path / "t.json"),
                               *argv])
        except SystemExit as exit_info:
            status = exit_info.code
        err = capsys.readouterr().err
        assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t.json").exists() and len(pipes) == 1  # failed before loading the model


def test_newton_outer_sampler_runs_a_tuned_grid():
    from kdiff_align.align.newton import sample_constrained
    model = gaussian(4)
    tuned = tune_sampler(model, noises(16, 4, 0), 5, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, method="deis",
                         candidates=16, max_evals=8)
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x, residual = noises(4, 4, 1), lambda x0: (x0 - 1.0) * mask  # constrain the first coordinate to 1
    run = lambda n_iter: sample_constrained(model, x, tuned.sigmas, residual, sampler=tuned,  # noqa: E731
                                            window=(0.1, 5.0), n_iter=n_iter, disable=True, return_info=True)
    plain, info = run(0)  # no constraint step: the tuned grid and solver (never its corrections), same calls
    uncorrected = ka.odeint(model, x, tuned.sigmas, method=tuned.method, lower_order_final=True, disable=True)
    assert torch.equal(plain, uncorrected) and info["nfe"]["total"] == tuned.nfe
    _, newton = run(5)  # Newton steps run at the tuned σ values inside the window only, their rows counted
    inside = (tuned.sigmas[:-1] > 0.1) & (tuned.sigmas[:-1] < 5.0)
    assert inside.any() and newton["residual"][:, ~inside].isnan().all()
    assert newton["residual"][:, inside].isfinite().all()
    assert newton["nfe"]["forward"] > tuned.nfe


def test_fitted_corrections_lower_the_held_out_error_and_survive_a_json_round_trip(tmp_path):
    model = gaussian(4)
    tuned = tune_sampler(model, noises(32, 4, 0), 3, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    assert len(tuned.solver_kw["corrections"]) == tuned.nfe  # one row of weights per step
    x = noises(256, 4, 1)  # held-out noises; the exact flow of a Gaussian is the reference
    ref = model.flow(x, SIGMA_MAX, 0.0)
    plain = ka.odeint(model, x, tuned.sigmas, method=tuned.method, lower_order_final=True, disable=True)
    # measured 0.011 vs 0.28 (3 NFE; 0.014 with three weights, 0.056 with the Adam fit until 2026-12-07): D and x
    # are linear in x_T here, so per-step weights can undo most of the solver's error; half leaves room for the
    # 256-item median's noise
    assert median_error(tuned(model, x, disable=True), ref) < 0.5 * median_error(plain, ref)
    tuned.save(tmp_path / "t.json")
    loaded = TunedSampler.load(tmp_path / "t.json")
    assert loaded.solver_kw == tuned.solver_kw
    assert torch.equal(loaded(model, x, disable=True), tuned(model, x, disable=True))
    # a part of the grid (a look-ahead from σ = 3) runs the plain solver: the weights belong to the whole grid
    tail = torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert "corrections" not in tuned.options(tuned.along(tail))
    plain_tail = ka.odeint(model, x, tuned.along(tail), method=tuned.method, lower_order_final=True, disable=True)
    assert torch.equal(ka.odeint(model, x, tail, method=tuned, disable=True), plain_tail)


def test_the_d_i_minus_2_weight_acts_once_the_solver_keeps_it_and_three_weight_rows_still_load():
    """The fourth feature is D_{i−2}: its weight does nothing on the first two steps (not yet in the history) nor
    with ``dpmpp_2m`` (which keeps two D below 15 steps), and moves the sample from the third step on; rows of
    three weights, as saved before it, give the samples of rows ending in 0."""
    model, x = gaussian(4), noises(16, 4, 0)
    sigmas = ka.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).double()
    run = lambda method, rows: ka.odeint(model, x, sigmas, method=method, corrections=rows, disable=True)  # noqa: E731
    zero, three = [[0.0] * 4] * 5, [[0.01, -0.02, 0.0]] * 5
    fourth = lambda i: [[0.0, 0.0, 0.0, 0.05 if j == i else 0.0] for j in range(5)]  # noqa: E731
    for method in ("unipc", "dpmpp_2m"):
        assert torch.equal(run(method, fourth(0)), run(method, zero))
        assert torch.equal(run(method, fourth(1)), run(method, zero))
    assert torch.equal(run("dpmpp_2m", fourth(2)), run("dpmpp_2m", zero))
    assert (run("unipc", fourth(2)) - run("unipc", zero)).abs().max() > 1e-3
    assert torch.equal(run("unipc", three), run("unipc", [row + [0.0] for row in three]))


@pytest.mark.parametrize("corrections", [[[0.1]], [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3, [[float("nan")]] * 3, "abc"])
def test_bad_corrections_fail_naming_the_argument(corrections):
    sigmas = ka.get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX).double()
    with pytest.raises(ValueError, match="corrections must be 3 rows"):
        ka.odeint(gaussian(2), noises(2, 2, 0), sigmas, method="dpmpp_2m", corrections=corrections, disable=True)


def test_end_to_end_fit_lowers_the_held_out_error_counts_its_backward_calls_and_applies_on_the_whole_grid(tmp_path):
    model, x_T, nfe, iters = mixture(4), noises(64, 4, 0), 5, 40
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    fitted = tune_sampler(model, x_T, nfe, end_to_end=iters, **kw)
    least = tune_sampler(model, x_T, nfe, end_to_end=0, **kw)
    assert torch.equal(fitted.sigmas, least.sigmas) and "input_sigmas" not in least.solver_kw
    inputs = fitted.solver_kw["input_sigmas"]
    assert len(inputs) == nfe and inputs != fitted.sigmas[:-1].tolist()
    # the refinement's cost: iters runs of nfe forward calls (L-BFGS's line-search trials included) and nfe
    # backward calls for each but the last (its gradient would never be used); the feature scales come from the
    # plain run, the keep-or-drop check from the kept run's own samples
    runs, backward = fitted.info["end_to_end_steps"], fitted.info["backward_calls"]
    assert runs == iters and backward == (runs - 1) * nfe
    assert fitted.tuning_nfe - least.tuning_nfe == runs * nfe + backward
    errors = fitted.info["errors"]  # mean log errors on the last quarter of the calibration noises
    assert errors[f"{fitted.method}/end_to_end"] < errors[f"{fitted.method}/least_squares"]
    x = noises(256, 4, 1)
    ref = ka.odeint(model, x, ka.get_sigmas_exponential(1000, SIGMA_MIN, SIGMA_MAX).double(), method="dpmpp_3m",
                    disable=True)
    counted = CountingDenoiser(model)
    out = fitted(counted, x, disable=True)
    assert counted.calls == nfe  # the same evaluations, at other σ
    # measured 0.022 vs 0.029 (0.77×) on the same 256 held-out items (paired); over calibration seeds 0, 2–5 the
    # ratio was 0.76–1.24 (mean 0.89): on this mixture the held-out gain depends on the calibration draw. At 4 NFE,
    # where this test ran until the fourth weight (D_{i−2}), the least squares alone now reach 0.027 (0.057 with
    # three weights) and the fit adds little (0.90–1.26)
    assert median_error(out, ref) < 0.9 * median_error(least(model, x, disable=True), ref)
    fitted.save(tmp_path / "t.json")
    assert torch.equal(TunedSampler.load(tmp_path / "t.json")(model, x, disable=True), out)
    tail = torch.tensor([3.0, 0.0], dtype=torch.float64)  # a part of the grid evaluates at the grid's σ
    assert "input_sigmas" not in fitted.options(fitted.along(tail))


@pytest.mark.parametrize("inputs", [[1.0], [1.0, -2.0, 3.0], [1.0, float("inf"), 2.0], "abc"])
def test_bad_input_sigmas_fail_naming_the_argument(inputs):
    sigmas = ka.get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX).double()
    with pytest.raises(ValueError, match="input_sigmas must be 3 positive finite floats"):
        ka.odeint(gaussian(2), noises(2, 2, 0), sigmas, method="deis", input_sigmas=inputs, disable=True)


def test_end_to_end_runs_whose_error_is_not_finite_are_rejected_and_counted(monkeypatch):
    """Two runs of the fit return NaN samples: the line search is shown a huge loss with no gradient, so it
    shortens the step; they are counted as runs without a backward pass, never kept, and the fit still lowers the
    held-out mean log error well below its least-squares start (measured −4.16 against −3.34)."""
    from kdiff_align.sampling import tune
    run, fitting = tune.corrected_run, []

    def sometimes_nan(model, x_T, grid, method, extra_args, u, v, scales):
        out, found = run(model, x_T, grid, method, extra_args, u, v, scales)
        if u.requires_grad:
            fitting.append(1)
            if len(fitting) in (3, 4):
                out = out * float("nan")
        return out, found

    monkeypatch.setattr(tune, "corrected_run", sometimes_nan)
    model, x_T, nfe, iters = mixture(4), noises(64, 4, 0), 4, 40
    fitted = tune_sampler(model, x_T, nfe, end_to_end=iters, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    runs, backward, errors = fitted.info["end_to_end_steps"], fitted.info["backward_calls"], fitted.info["errors"]
    assert runs == len(fitting) == iters and backward == (iters - 1 - 2) * nfe
    assert errors[f"{fitted.method}/end_to_end"] < errors[f"{fitted.method}/least_squares"] - 0.2, errors
    assert torch.isfinite(fitted(model, noises(8, 4, 1), disable=True)).all()


def test_end_to_end_fit_reaches_far_below_the_least_squares_on_an_ill_conditioned_gaussian():
    """A 16-D Gaussian whose variances span 0.01–3 at 8 NFE: the last steps' weights move the sample far more
    than the first's, so a fixed-step optimiser crawls. L-BFGS in 30 runs took the held-out median error to
    0.36× the least-squares sampler's (0.45× and 0.40× from two other calibration draws; with three correction
    weights, until 2026-12-08, 0.45× and 0.33× on the first two); Adam with a step of 0.01 (the fit until
    2026-12-07, whose default budget was 30 runs at 8 NFE) reached 0.80× and 0.80×."""
    dim, nfe = 16, 8
    model = GaussianDenoiser(torch.zeros(dim), torch.logspace(-2, 0.5, dim)).double()
    x_T, x = noises(64, dim, 0), noises(256, dim, 1)
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    fitted = tune_sampler(model, x_T, nfe, end_to_end=30, **kw)
    least = tune_sampler(model, x_T, nfe, end_to_end=0, **kw)
    assert fitted.info["end_to_end_steps"] == 30
    ref = model.flow(x, SIGMA_MAX, 0.0)  # the exact PF-ODE solution of a Gaussian
    assert median_error(fitted(model, x, disable=True), ref) < 0.6 * median_error(least(model, x, disable=True), ref)


def test_teacher_states_between_its_nodes_match_a_fine_solve():
    """``teacher_at`` (the teacher's dense output, no evaluation) gives its own nodes exactly and, between
    them, the state of a 2000-step solve to within 2e-3 (measured ≤ 7e-4 on states of size 4–42) and within
    0.3× the distance of the nearest node above (measured ≤ 0.09×), so a step that went nowhere would fail."""
    from kdiff_align.sampling.tune import candidate_sigmas, teacher_at, teacher_solve
    model, x = mixture(4), noises(64, 4, 0)
    s = candidate_sigmas(SIGMA_MAX, SIGMA_MIN, 24)
    counted = CountingDenoiser(model)
    fine, states, Ds, x0 = teacher_solve(counted, x, s, 4, {}, disable=True)
    assert counted.calls == len(fine) - 1 == 93 and len(states) == len(Ds) == 93
    assert all(torch.equal(a, b) for a, b in zip(teacher_at(fine, states, Ds, fine[1:-1]), states[1:]))
    grid = ka.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX, 7).double().tolist()[1:-2]  # between nodes (not σ_min)
    for sigma, state in zip(grid, teacher_at(fine, states, Ds, grid)):
        fine_solve = torch.tensor(np.exp(np.linspace(math.log(SIGMA_MAX), math.log(sigma), 2000)))
        ref = ka.odeint(model, x, fine_solve, method="dpmpp_3m", disable=True)
        above = states[max(k for k, v in enumerate(fine[:-1]) if v >= sigma)]
        assert median_error(state, ref) < min(2e-3, 0.3 * median_error(above, ref)), sigma


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 300), seed=st.integers(0, 2**31 - 1))
def test_calibration_split_is_a_partition_holding_out_a_quarter(n, seed):
    from kdiff_align.sampling.tune import calibration_split
    fit, check = calibration_split(n, torch.Generator().manual_seed(seed))
    assert len(check) == max(1, n // 4) and sorted(fit.tolist() + check.tolist()) == list(range(n))
    assert torch.equal(check, check.sort().values) and torch.equal(fit, fit.sort().values)
    again = calibration_split(n, torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], fit) and torch.equal(again[1], check)
    assert calibration_split(n) == (slice(0, n - max(1, n // 4)), slice(n - max(1, n // 4), n))


def test_generator_draws_the_held_out_quarter_that_checks_the_corrections():
    """The errors the keep-or-drop check reads are those of the drawn items: the plain run's mean log error
    over ``info["check_items"]`` (recomputed here from the teacher) is ``errors[method/plain_check]``, and
    without a generator the last quarter's; a seeded generator reproduces the sampler bit for bit."""
    from kdiff_align.sampling.tune import candidate_sigmas, item_errors, run_grid, teacher_solve
    model, x_T, nfe = mixture(4), noises(32, 4, 0), 4
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, end_to_end=4)
    drawn = tune_sampler(model, x_T, nfe, generator=torch.Generator().manual_seed(3), **kw)
    again = tune_sampler(model, x_T, nfe, generator=torch.Generator().manual_seed(3), **kw)
    last = tune_sampler(model, x_T, nfe, **kw)
    assert drawn.solver_kw == again.solver_kw and torch.equal(drawn.sigmas, again.sigmas)
    assert "check_items" not in last.info
    check = drawn.info["check_items"]
    assert len(check) == 8 and check != list(range(24, 32))
    s = candidate_sigmas(SIGMA_MAX, SIGMA_MIN, 24)
    x0 = teacher_solve(model, x_T, s, 4, {}, disable=True)[3]
    for tuned, items in ((drawn, check), (last, list(range(24, 32)))):
        log = item_errors(run_grid(model, x_T, tuned.sigmas.tolist(), tuned.method, {}), x0).log()
        assert tuned.info["errors"][f"{tuned.method}/plain_check"] == pytest.approx(log[items].mean().item(), abs=1e-9)
    with pytest.raises(TypeError, match="generator"):
        tune_sampler(model, x_T, nfe, generator=3, **kw)


@pytest.mark.parametrize("wrapper", ["epsilon", "v_prediction", "flow"])
def test_tunes_discrete_time_and_flow_models_through_their_wrappers(wrapper):
    """An SD-like discrete-time ε or v network (``DiscreteDenoiser`` over a scaled-linear ᾱ table, σ ≤ 14.6) and
    a rectified-flow velocity (``FlowDenoiser``, the SD3-shift σ range): the tuner runs through each wrapper,
    its end-to-end fit included (gradients through the σ → t interpolation), and on held-out noises its 6-NFE
    median error against the exact flow is below that of the best of our six multistep solvers on the grid
    such a model ships with (Karras; SD3 shift 3). Measured 0.33× (ε), 0.15× (v), 0.46× (flow); with three
    correction weights (until 2026-12-08) 0.21×, 0.20× and 0.57×, with the Adam fit (until 2026-12-07) 0.17×, 0.16×
    and 0.52×."""
    from kdiff_align.external import DiscreteDenoiser, FlowDenoiser
    from kdiff_align.schedules import get_sigmas_flow, sigmas_from_alphas_cumprod
    from tiny import ExactNet, GaussianVelocity, alphas_cumprod
    gaussian = GaussianDenoiser(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.2, 0.5, 1.0, 2.0])).double()
    if wrapper == "flow":
        model, grid = FlowDenoiser(GaussianVelocity(gaussian)), get_sigmas_flow(6, shift=3.0).double()
        sigma_min, sigma_max, margin = grid[-2].item(), grid[0].item(), 0.75
    else:
        model = DiscreteDenoiser(ExactNet(gaussian, sigmas_from_alphas_cumprod(alphas_cumprod()), wrapper),
                                 alphas_cumprod(), wrapper)
        sigma_min, sigma_max, margin = model.sigma_min, model.sigma_max, 0.35
        grid = ka.get_sigmas_karras(6, sigma_min, sigma_max).double()
    x_T = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    tuned = tune_sampler(model, x_T, 6, sigma_min=sigma_min, sigma_max=sigma_max)
    assert tuned.info["backward_calls"] > 0 and "input_sigmas" in tuned.solver_kw
    x = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigma_max
    ref = gaussian.flow(x, sigma_max, 0.0)
    counted = CountingDenoiser(model)
    out = tuned(counted, x, disable=True)
    assert counted.calls == 6
    plain = min(median_error(ka.odeint(model, x, grid, method=m, disable=True), ref)
                for m in ("lms", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"))
    assert median_error(out, ref) < margin * plain


def test_refine_fits_each_finalists_corrections_and_keeps_the_least_check_error():
    """With ``refine=k`` the k solvers of least objective each get their corrections fitted, and the kept one
    has the least check error after them (recomputed here from the teacher: the tuned sampler's own mean log
    error over the last quarter of the calibration noises): here ``unipc``, second to ``deis`` before them
    (objective −1.69 against −1.84, check −3.54 against −2.33). ``refine=1`` fits the best solver's alone."""
    from kdiff_align.sampling.tune import candidate_sigmas, item_errors, teacher_solve
    model, x_T, nfe = mixture(4), noises(32, 4, 1), 6
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, method=("dpmpp_2m", "unipc", "deis"), max_evals=8,
              end_to_end=4)
    grids = ("gits", "karras5", "karras7", "karras9", "exponential", "refined")

    def finalists(tuned, k):
        errors = tuned.info["errors"]
        objective = {m: min(e for key, e in errors.items() if key.split("/")[0] == m and key.split("/")[1] in grids)
                     for m in kw["method"]}
        assert {key.split("/")[0] for key in errors if key.endswith("/plain_check")} == set(tuned.info["check_errors"])
        return sorted(objective, key=objective.get)[:k]

    tuned = tune_sampler(model, x_T, nfe, refine=2, **kw)
    assert sorted(tuned.info["check_errors"]) == sorted(finalists(tuned, 2))
    assert tuned.method == finalists(tuned, 2)[1]  # here the runner-up before corrections (unipc) wins after them
    assert tuned.method == min(tuned.info["check_errors"], key=tuned.info["check_errors"].get)
    x0 = teacher_solve(model, x_T, candidate_sigmas(SIGMA_MAX, SIGMA_MIN, 24), 4, {}, disable=True)[3]
    log = item_errors(tuned(model, x_T, disable=True), x0).log()
    assert tuned.info["check_errors"][tuned.method] == pytest.approx(log[24:].mean().item(), abs=1e-6)
    single = tune_sampler(model, x_T, nfe, **kw)
    assert list(single.info["check_errors"]) == finalists(single, 1)
