"""Experiment directories: no secrets in config/logs, atomic images, resume after a crash or a SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from kdiff_align.apps.experiment import (Experiment, env_secrets, plot_steps, read_jsonl, redact, repair_jsonl,
                                         run_items, secret_name, shard)

SECRET = "sk-live-0123456789abcdef"
NAMES = [f"item{i:03d}" for i in range(12)]


def picture(name: str) -> Image.Image:
    """A deterministic image per name, so a recomputed image can be compared with the expected one."""
    g = torch.Generator().manual_seed(int(name[4:]))
    return Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy())


def check_complete(directory: Path):
    """Every name has exactly one image file, equal to its expected picture, and one manifest entry."""
    files = sorted(os.listdir(directory / "images"))
    assert files == [f"{n}.png" for n in NAMES]  # exactly once each, and no temporary file left
    for name in NAMES:
        assert np.array_equal(np.asarray(Image.open(directory / "images" / f"{name}.png")), np.asarray(picture(name)))
    names = [r["name"] for r in read_jsonl(directory / "manifest.jsonl")]
    assert sorted(names) == NAMES


def test_config_drops_secret_keys_and_secret_values(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    config = {"beta": 0.1, "K": 16, "api_key": "literal", "vlm": {"hfToken": "x", "url": f"http://h/?k={SECRET}",
              "model": "m"}, "prompts": ["a cat", SECRET], "password": 1, "tokenizer": "clip", "sigmas": torch.ones(2),
              "out": tmp_path / "o", "tau": float("nan")}
    exp = Experiment(tmp_path / "run", config)
    text = (tmp_path / "run" / "config.json").read_text()
    assert SECRET not in text and "literal" not in text and "hfToken" not in text and "password" not in text
    assert json.loads(text) == {"K": 16, "beta": 0.1, "vlm": {"model": "m"}, "prompts": ["a cat", "<redacted>"],
                                "tokenizer": "clip", "sigmas": [1.0, 1.0], "out": str(tmp_path / "o"), "tau": "nan"}
    exp.log({"step": 0, "rewards": torch.tensor([1.0, 2.0]), "note": SECRET, "token": "t"}, item="a")
    line = (tmp_path / "run" / "steps.jsonl").read_text()
    assert SECRET not in line and json.loads(line)["rewards"] == [1.0, 2.0] and "token" not in json.loads(line)


@given(st.recursive(st.text(max_size=30), lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["a", "api_key", "Token", "x_secret", "b", "passwd"]), children,
                                      max_size=4), max_leaves=20))
def test_redact_never_keeps_a_secret(obj):
    secret = "s3cr3t-value"
    obj = {"wrapped": obj, "tail": secret + "!"}
    clean = redact(obj, [secret])

    def keys(value):
        if isinstance(value, dict):
            return set(value) | set().union(*map(keys, value.values()))
        return set().union(*map(keys, value)) if isinstance(value, list) else set()

    assert secret not in json.dumps(clean) and not keys(clean) & {"api_key", "Token", "x_secret", "passwd"}


def test_secret_names():
    assert all(map(secret_name, ["api_key", "OPENAI_API_KEY", "hfToken", "x-auth", "PASSWORD", "client_secret"]))
    assert not any(map(secret_name, ["tokenizer", "monkey", "K", "keyframe_count", "beta", "c_steps"]))
    assert env_secrets({"HF_TOKEN": "abcdefgh12", "SHORT_KEY": "abc", "PATH": "/usr/bin:/bin"}) == {"abcdefgh12"}
    # the shell's working directory is no secret: a path under it (a --sampler file) stays in config.json
    assert env_secrets({"PWD": "/home/me/run", "OLDPWD": "/home/me", "DB_PASSWD": "hunter2-long"}) == {"hunter2-long"}


def test_resume_checks_config(tmp_path):
    Experiment(tmp_path, {"beta": 0.1, "K": 4})
    assert Experiment(tmp_path, {"K": 4, "beta": 0.1}).config == {"K": 4, "beta": 0.1}
    assert Experiment(tmp_path).config == {"K": 4, "beta": 0.1}  # no config: read the saved one
    with pytest.raises(ValueError, match=r"at keys \['K', 'tau'\]"):
        Experiment(tmp_path, {"beta": 0.1, "K": 8, "tau": 1})
    with pytest.raises(FileExistsError, match="resume=True"):
        Experiment(tmp_path, {"beta": 0.1, "K": 4}, resume=False)


def test_resume_after_an_exception_recomputes_only_unfinished_items(tmp_path):
    made = []

    def make(name, fail_at=None):
        if name == fail_at:
            raise RuntimeError("simulated crash")
        made.append(name)
        exp.log({"step": 0, "rewards": [1.0]}, item=name)
        return picture(name)

    exp = Experiment(tmp_path, {"seed": 0})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_items(exp, NAMES, lambda n: make(n, fail_at=NAMES[5]), disable=True)
    assert made == NAMES[:5]
    exp = Experiment(tmp_path, {"seed": 0})
    assert exp.pending(NAMES) == NAMES[5:]
    paths = run_items(exp, NAMES, make, disable=True)
    assert made == NAMES and list(paths) == NAMES
    check_complete(tmp_path)
    assert sorted(r["item"] for r in exp.steps()) == NAMES
    with pytest.raises(ValueError, match="already finished"):
        exp.save_image(NAMES[0], picture(NAMES[0]))


WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_experiment import NAMES, picture
    from kdiff_align.apps.experiment import Experiment, run_items

    exp = Experiment({directory!r}, {{"seed": 0}})

    def make(name):
        for step in range(3):
            exp.log({{"step": step, "rewards": [step, step + 1], "nfe": 2 * step}}, item=name)
            time.sleep(60 if (name, step) == (NAMES[5], 1) else 0.01)  # killed here, inside an item
        print("made", name, flush=True)
        return picture(name)

    run_items(exp, NAMES, make, disable=True)
""")


def test_a_run_killed_mid_way_resumes_with_every_image_exactly_once(tmp_path):
    directory = tmp_path / "run"
    script = WORKER.format(root=str(Path(__file__).parents[1]), tests=str(Path(__file__).parent),
                           directory=str(directory))
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest, log = directory / "manifest.jsonl", directory / "steps.jsonl"
    deadline = time.monotonic() + 120
    def stuck() -> bool:  # the worker has logged step 1 of item 5 and sleeps there
        return any((r["item"], r["step"]) == (NAMES[5], 1) for r in read_jsonl(log))

    while time.monotonic() < deadline and worker.poll() is None and not stuck():
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL, worker.stderr.read().decode()
    finished_before = [r["name"] for r in read_jsonl(manifest)]
    assert finished_before == NAMES[:5] and len(read_jsonl(log)) == 5 * 3 + 2  # two orphan steps of item 5

    made = []
    exp = Experiment(directory, {"seed": 0})

    def make(name):
        made.append(name)
        for step in range(3):
            exp.log({"step": step, "rewards": [step, step + 1], "nfe": 2 * step}, item=name)
        return picture(name)

    run_items(exp, NAMES, make, disable=True)
    assert made == [n for n in NAMES if n not in finished_before]  # nothing finished is recomputed
    check_complete(directory)
    steps = exp.steps()  # the killed attempt's partial steps are dropped: each (item, step) exactly once
    assert sorted((r["item"], r["step"]) for r in steps) == [(n, s) for n in NAMES for s in range(3)]
    assert all(r["nfe"] == 2 * r["step"] for r in steps)
    plot = plot_steps(exp)
    assert plot.stat().st_size > 1000 and Image.open(plot).format == "PNG"


def test_failed_write_leaves_no_partial_image(tmp_path, monkeypatch):
    exp = Experiment(tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        exp.save_image("a", picture("item000"))
    monkeypatch.undo()
    assert not exp.done("a") and not (tmp_path / "images" / "a.png").exists()
    # the temporary file of a dead process is cleaned when the directory is reopened
    dead = tmp_path / "images" / ".a.png.4194999.tmp"
    dead.write_bytes(b"partial")
    exp = Experiment(tmp_path)
    assert not dead.exists() and exp.pending(["a"]) == ["a"]


def test_torn_manifest_line_and_missing_file_are_recomputed(tmp_path):
    exp = Experiment(tmp_path)
    exp.save_image("x", picture("item001"))
    exp.save_image("y", picture("item002"))
    (tmp_path / "images" / "y.png").unlink()  # lost file: its manifest entry does not count
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"name": "z", "fi')  # a crash during the write
    assert Experiment(tmp_path).pending(["x", "y", "z"]) == ["y", "z"]


def test_names_and_shards():
    exp_names = ["ok-1.a", "../evil", "a/b", ".hidden", ""]
    exp = Experiment.__new__(Experiment)
    exp.images_dir = Path("/nonexistent")
    assert exp.image_path(exp_names[0]).name == "ok-1.a.png"
    for bad in exp_names[1:]:
        with pytest.raises(ValueError, match="image name"):
            exp.image_path(bad)
    parts = [shard(NAMES, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == NAMES and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="rank"):
        shard(NAMES, 3, 3)


def test_repair_cuts_a_torn_line_keeps_a_whole_one_and_damaged_images_are_pending(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"b": 2')  # torn: cut
    assert repair_jsonl(path) and path.read_text() == '{"a": 1}\n' and not repair_jsonl(path)
    path.write_text('{"a": 1}\n{"b": 2}')  # whole, only its newline lost: kept
    assert repair_jsonl(path) and read_jsonl(path) == [{"a": 1}, {"b": 2}] and path.read_text().endswith("\n")
    exp = Experiment(tmp_path / "run")
    for name, item in (("x", "item001"), ("y", "item002"), ("z", "item003")):
        exp.save_image(name, picture(item))
    (tmp_path / "run" / "images" / "y.png").write_bytes(b"\x89PNG not really")
    with open(tmp_path / "run" / "manifest.jsonl", "a") as f:
        f.write('{"name": "w"}\n{"name": "x", "fi')  # a record without its file, then a torn line
    again = Experiment(tmp_path / "run")
    assert again.repaired == ["manifest.jsonl"] and again.damaged == ["y"] and again.pending(["x", "y", "z"]) == ["y"]
    assert [r["name"] for r in read_jsonl(tmp_path / "run" / "manifest.jsonl")] == ["x", "z", "w"]
