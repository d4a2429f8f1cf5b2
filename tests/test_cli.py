"""The command line as a user meets it: one-line errors (exit 2) before anything is written, Ctrl-C,
one vocabulary with deprecated spellings, help with defaults, default settings without warnings.

Every failure case runs in-process through ``cli.main`` (which is what the console script calls), and
one case of each kind (a bad value, a bad combination, a failure at run time, Ctrl-C) also runs as
``python -m kdiff_align`` in a subprocess, to see the process's exit status and the absence of a
traceback as a user does; a subprocess costs the ~4 s import of torch, so those are kept few.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdiff_align as ka
from kdiff_align.apps import cliargs
from kdiff_align.apps.cli import main, parser

ROOT = Path(__file__).resolve().parents[1]
MIX = ["--model", "toy:mixture", "--prompt", "grey"]


def cli(*args, cwd=None, warnings_as_errors=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    flags = ["-W", "error"] if warnings_as_errors else []
    return subprocess.run([sys.executable, *flags, "-m", "kdiff_align", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``cli.main(args)`` with its exit status and output, shaped like a finished subprocess."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_one_line_error(result, command: str, *words: str, status: int = 2) -> str:
    """Exit ``status`` (2: usage, 1: runtime), no traceback, one stderr line ``kdiff-align COMMAND: error: ...``."""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith(f"kdiff-align {command}: error: ")]
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and all(line.startswith("kdiff-align: note:") for line in lines if line not in errors), \
        result.stderr
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


@pytest.fixture
def place(tmp_path):
    """A folder with a prompt file, a subfolder, a plain file, and an empty folder for outputs."""
    (tmp_path / "prompts.txt").write_text("grey\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


GENERATE_FAILURES = [  # (arguments after "generate", words the one line must hold)
    (["--prompts", "missing.txt", "--model", "toy:mixture"], ["--prompts", "missing.txt", "does not exist"]),
    (["--prompts", "a_dir", "--model", "toy:mixture"], ["--prompts", "is a directory"]),
    (["--prompts", "empty.txt", "--model", "toy:mixture"], ["--prompts", "no prompt"]),
    ([*MIX, "--seeds", "3-1"], ["--seeds", "backwards", "1-3"]),
    ([*MIX, "--seeds", "0-100000000"], ["--seeds", "at most 100000"]),
    ([*MIX, "--seeds", "1,x"], ["--seeds", "'1,x'"]),
    ([*MIX, "--seeds", "2,0-3"], ["--seeds", "repeat", "[2]"]),
    (["--model", "no/such/folder", "--prompt", "a cat"], ["--model", "no/such/folder", "toy:NAME"]),
    (["--model", "a_dir", "--prompt", "a cat"], ["--model", "model_index.json", "unet/"]),
    (["--model", "toy:cats", "--prompt", "a cat"], ["--model", "toy:cats", "toy:mixture"]),
    ([*MIX, "--K", "-3"], ["--K", "-3", ">= 1"]),
    ([*MIX, "--steps", "0"], ["--steps", ">= 1"]),
    ([*MIX, "--alpha", "0"], ["--alpha", "> 0"]),
    ([*MIX, "--alpha", "nan"], ["--alpha"]),
    ([*MIX, "--tau", "abc"], ["--tau", "abc", "adaptive"]),
    ([*MIX, "--beta", "-1"], ["--beta", "auto"]),
    ([*MIX, "--reward", "vlm"], ["--reward vlm", "--vlm-url", "--vlm-model"]),
    ([*MIX, "--reward", "loss"], ["--reward", "'loss'", "jpeg-small"]),
    ([*MIX, "--reward", "jpeg-small:9"], ["--reward", "no ':' argument"]),
    ([*MIX, "--reward", "aesthetic"], ["--reward", "CLIP_DIR"]),
    ([*MIX, "--reward", "classifier"], ["--reward classifier", "toy:fashion"]),
    (["--model", "toy:fashion", "--prompt", "bag", "--reward", "classifier:purse"], ["--reward classifier", "purse"]),
    (["--model", "toy:mixture", "--prompt", "purple"], ["--prompt", "purple", "grey"]),
    ([*MIX, "--method", "magic"], ["--method", "magic"]),
    ([*MIX, "--device", "abacus"], ["--device", "abacus"]),
]


@pytest.mark.parametrize("args, words", GENERATE_FAILURES, ids=[" ".join(a[-2:]) for a, _ in GENERATE_FAILURES])
def test_generate_failures_are_one_line_and_write_nothing(place, args, words, capsys, monkeypatch):
    monkeypatch.chdir(place)
    out = place / "run"
    result = run_in_process(capsys, "generate", *args, "--out", out)
    assert_one_line_error(result, "generate", *words)
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize("out, words", [("a_file", ["--out", "is a file"]), ("a_file/run", ["--out", "a_file"])])
def test_out_that_is_a_file_is_one_line(place, out, words, capsys, monkeypatch):
    monkeypatch.chdir(place)
    assert_one_line_error(run_in_process(capsys, "generate", *MIX, "--out", out), "generate", *words)


@pytest.mark.parametrize("command, args, words", [
    ("generate", [*MIX, "--K", "-3"], ["--K", "-3"]),                  # a bad value, while parsing
    ("generate", [*MIX, "--reward", "vlm"], ["--vlm-url"]),            # a bad combination, before loading
    ("demon", ["--model", "toy:fashion", "--prompt", "sneakers"], ["--prompt", "sneakers"]),
])
def test_failures_in_a_real_process(tmp_path, command, args, words):
    assert_one_line_error(cli(command, *args, "--out", tmp_path / "run"), command, *words)
    assert not (tmp_path / "run").exists()


DEMON_FAILURES = [
    (["--K", "0"], ["--K", ">= 1"]),
    (["--T", "1"], ["--steps", ">= 2"]),
    (["--steps", "x"], ["--steps", "'x'"]),
    (["--seed", "-1"], ["--seed"]),
    (["--reward", "jpeg-size:3"], ["--reward"]),
    (["--reward", "vlm"], ["--vlm-url"]),
    (["--prompt", "sneakers"], ["--prompt", "sneakers", "sneaker"]),
    (["--reward", "brightness", "--reward-class", "bag"], ["--reward-class", "--reward classifier"]),
    (["--c-steps", "-2"], ["--c-steps"]),
    (["--ode-after", "-0.5"], ["--ode-after"]),
]


@pytest.mark.parametrize("args, words", DEMON_FAILURES, ids=[" ".join(a) for a, _ in DEMON_FAILURES])
def test_demon_failures_are_one_line_and_make_no_folder(place, args, words, capsys):
    result = run_in_process(capsys, "demon", "--model", "toy:fashion", "--prompt", "sneaker", *args,
                            "--out", place / "runs")
    assert_one_line_error(result, "demon", *words)
    assert not (place / "runs").exists()


def test_a_runtime_failure_is_one_line_and_debug_shows_the_traceback(place, capsys):
    """A failure while loading (a diffusers folder without its parts) is still one line, exit status 1 (the
    flags were fine, the work failed), and nothing is written; --debug raises it."""
    (place / "a_dir" / "model_index.json").write_text("{}")
    args = ["generate", "--model", place / "a_dir", "--prompt", "a cat", "--out", place / "run", "--no-progress"]
    assert_one_line_error(run_in_process(capsys, *args), "generate", "unet", status=1)
    assert not (place / "run").exists()
    with pytest.raises(Exception, match="unet"):
        main(["--debug", *map(str, args)])


def test_deprecated_spellings_still_work_with_one_note_each(tmp_path, capsys):
    args = parser().parse_args(["demon", "--model", "toy", "--prompt", "bag", "--T", "7", "--reward", "jpeg-size"])
    assert (args.model, args.steps, args.reward) == ("toy:fashion", 7, "jpeg-large")
    for old, new in [("jpeg", "jpeg-small"), ("jpeg_incompressible", "jpeg-large")]:
        assert parser().parse_args(["generate", *MIX, "--out", "o", "--reward", old]).reward == new
    capsys.readouterr()
    result = run_in_process(capsys, "demon", "--model", "toy", "--prompt", "bag", "--T", "3", "--reward", "jpeg-size",
                            "--reward-class", "bag", "--out", tmp_path)  # fails on --reward-class after the notes
    notes = [line for line in result.stderr.splitlines() if line.startswith("kdiff-align: note:")]
    assert len(notes) == 4 and all(f"note: {old} is deprecated" in "\n".join(notes)
                                   for old in ("--model toy", "--T", "--reward jpeg-size", "--reward-class CLASS"))
    assert_one_line_error(result, "demon", "--reward-class")


def test_one_vocabulary_for_demon_and_generate():
    subcommands = parser()._subparsers._group_actions[0].choices
    demon, generate = ({a.option_strings[0]: a for a in subcommands[name]._actions if a.option_strings}
                       for name in ("demon", "generate"))
    shared = ["--model", "--reward", "--steps", "--T", "--cfg", "--K", "--beta", "--tau", "--demon-type", "--r-of-c",
              "--c-steps", "--ode-after", "--vlm-url", "--aesthetic-head", "--max-batch", "--device", "--fp16",
              "--no-progress", "--debug"]
    for flag in shared:  # same flag, same default, same kind of value in both subcommands

        def meaning(action):
            return action.dest, action.default, getattr(action.type, "__name__", action.type), action.choices

        assert meaning(demon[flag]) == meaning(generate[flag]), flag


@pytest.mark.parametrize("command", ["demo", "demon", "generate", "arena"])
def test_help_gives_every_flag_a_text_and_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and text.startswith("usage: kdiff-align " + command)
    assert "``" not in text  # no raw RST markup
    sub = parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.dest
        shown = sub.formatter_class("x")._get_help_string(action)
        assert action.required or "(default: " in shown, action.dest


def test_unknown_command_fails_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("kdiff-align: error:")


def test_seed_ranges():
    assert cliargs.seeds("0-3,7, 9") == [0, 1, 2, 3, 7, 9]
    assert cliargs.seeds("5") == [5]
    assert len(cliargs.seeds(f"0-{cliargs.MAX_SEEDS - 1}")) == cliargs.MAX_SEEDS
    for bad in ("", "a", "3,3", "-1", "2-", "3-1", f"0-{cliargs.MAX_SEEDS}", f"{2**63}"):
        with pytest.raises(argparse.ArgumentTypeError):
            cliargs.seeds(bad)


@pytest.mark.slow  # two real runs of the shipped 28×28 model in subprocesses: ~20 s on a busy core
def test_defaults_run_without_warnings_and_the_demon_folder_has_its_pictures(tmp_path):
    """Default Demon settings on the shipped 28×28 model (σ_max = 80, where β = 0.1 would warn), under -W error."""
    result = cli("generate", "--model", "toy:fashion", "--prompt", "bag", "--seeds", "0", "--method", "demon",
                 "--out", tmp_path / "gen", "--no-progress", warnings_as_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "gen" / "INCOMPLETE").exists() and (tmp_path / "gen" / "grid.png").is_file()
    result = cli("demon", "--model", "toy:fashion", "--prompt", "sneaker", "--reward", "classifier:sandal",
                 "--out", tmp_path / "demon", "--no-progress", warnings_as_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    folder, = (tmp_path / "demon").iterdir()
    for name in ("comparison.png", "rewards.png", "plain_ode.png", "demon.png", "result.json"):
        assert (folder / name).stat().st_size > 200, name
    assert not (folder / "INCOMPLETE").exists()
    assert "classifier logit of 'sandal'" in result.stdout  # the reward is named where the numbers are
    config = json.loads((folder / "config.json").read_text())
    # --beta auto: β per Demon step, β·|Δσ| = 1 on the 80 → 59.7 first step, at most the cap 0.1
    betas, sigmas = json.loads((folder / "result.json").read_text())["beta"], ka.get_sigmas_karras(20, 0.002, 80.0)
    assert config["T"] == 20 and config["beta"] == "auto" and max(betas) <= 0.1
    assert betas[0] == pytest.approx(1 / float(sigmas[0] - sigmas[1]), rel=1e-6)


def test_a_fixed_typo_reruns_in_the_same_folder(tmp_path, capsys):
    out = tmp_path / "run"
    typo = run_in_process(capsys, "generate", *MIX, "--out", out, "--reward", "vlm", "--no-progress")
    assert typo.returncode == 2 and not out.exists()
    # a run that dies after writing its config but before its first image does not block new settings
    (out).mkdir()
    (out / "config.json").write_text(json.dumps({"model": "toy:mixture", "K": 99}))
    fixed = run_in_process(capsys, "generate", *MIX, "--out", out, "--seeds", "0-1", "--no-progress")
    assert fixed.returncode == 0, fixed.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["p00000-s0.png", "p00000-s1.png"]
    other = run_in_process(capsys, "generate", *MIX, "--out", out, "--seeds", "0-1", "--steps", "7", "--no-progress")
    assert_one_line_error(other, "generate", "config differs", "steps")  # finished images: settings are fixed


def test_ctrl_c_is_one_line_saying_what_was_kept(tmp_path):
    out = tmp_path / "run"
    args = ["generate", *MIX, "--seeds", "0-199", "--method", "demon", "--steps", "12", "--K", "6",
            "--reward", "brightness", "--out", out, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # a job started in the background by a non-interactive shell inherits SIGINT ignored (POSIX), and
    # Python then installs no KeyboardInterrupt handler: restore the default so Ctrl-C reaches the child
    proc = subprocess.Popen([sys.executable, "-m", "kdiff_align", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "manifest.jsonl").exists() or not (out / "manifest.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    line, = [line for line in err.splitlines() if "interrupted" in line]
    assert line.startswith("kdiff-align generate: interrupted;") and "rerun the same command" in line
    kept = int(line.split("; ")[1].split()[0])
    assert kept >= 2 and (out / "INCOMPLETE").exists()  # the folder says it is not finished


def test_library_messages_name_the_mistake():
    from kdiff_align.align.demon import sample_demon
    from kdiff_align.cond import parse_condition
    from kdiff_align.testing import GaussianDenoiser
    with pytest.raises(ValueError, match=r"got str 'bag'.*'prompts': \[prompt\]"):
        parse_condition("bag")
    model = GaussianDenoiser(torch.zeros(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"generator must be .* got int \(for a seed use torch.Generator"):
        sample_demon(model, torch.zeros(1, 2), torch.tensor([1.0, 0.5, 0.0]), lambda x: x.sum(1), generator=0)


@pytest.mark.parametrize("command, args", [("demo", []), ("demon", ["--model", "toy:fashion", "--prompt", "bag"]),
                                           ("generate", MIX), ("arena", [])])
def test_an_unwritable_out_names_out_in_every_subcommand(command, args, capsys):
    result = run_in_process(capsys, command, *args, "--out", "/proc/kdiff")  # /proc takes no new files, even as root
    assert_one_line_error(result, command, "--out", "/proc/kdiff")


def test_an_unreachable_vlm_is_a_runtime_failure_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kdiff_align.rewards.vlm.time.sleep", lambda seconds: None)  # retries without waiting
    result = run_in_process(capsys, "generate", *MIX, "--method", "best_of_n", "--n", "2", "--steps", "3",
                            "--reward", "vlm", "--vlm-url", "http://127.0.0.1:9/v1", "--vlm-model", "judge",
                            "--out", tmp_path / "run", "--no-progress")
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdiff-align generate: error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # the flags were fine
    assert len(errors) == 1 and "VLM reward gave up" in errors[0] and "127.0.0.1:9" in errors[0]


def test_vlm_flags_need_the_vlm_reward_and_the_vlm_extra(tmp_path, capsys, monkeypatch):
    result = run_in_process(capsys, "generate", *MIX, "--vlm-model", "judge", "--out", tmp_path / "run")
    assert_one_line_error(result, "generate", "--vlm-model", "--reward vlm")
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if httpx were not installed
    monkeypatch.setitem(sys.modules, "httpx2", None)
    monkeypatch.setattr("kdiff_align.apps.generate.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = run_in_process(capsys, "generate", *MIX, "--reward", "vlm", "--vlm-url", "http://127.0.0.1:9/v1",
                            "--vlm-model", "judge", "--out", tmp_path / "run")
    assert_one_line_error(result, "generate", 'pip install "kdiff-align[vlm]"', status=1)
    assert not (tmp_path / "run").exists()


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    from kdiff_align import from_pretrained, toy
    (tmp_path / "model_index.json").write_text("{}")
    for module in ("diffusers", "sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'from_pretrained needs .*diffusers.*pip install "kdiff-align\[diffusers\]"'):
        from_pretrained(tmp_path)
    with pytest.raises(ImportError, match=r'pip install "kdiff-align\[digits\]"'):
        toy.load_data("digits")


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("bag\nsneaker\n".encode("utf-8-sig"))  # as Notepad saves UTF-8
    assert cliargs.read_prompts(path) == ["bag", "sneaker"]
    cliargs.check_prompts(cliargs.read_prompts(path), "toy:fashion", "--prompts")  # "\ufeffbag" would fail here


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """SIGINT during the imports (seconds of torch start-up) through the console script's entry point."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys, kdiff_align_cli; sys.exit(kdiff_align_cli.main(['demo', '--help']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    time.sleep(0.3)  # past the interpreter's own start (~50 ms), well before torch has loaded
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "kdiff-align: interrupted while starting; nothing was written\n", err
    assert not out and not list(tmp_path.iterdir())
