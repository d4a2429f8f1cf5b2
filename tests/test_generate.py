"""``kdiff-align generate``: sharding over 2 gloo ranks under torchrun, resume after killed ranks and jobs.

The runs use ``toy:mixture`` (a closed-form 1×8×8 Gaussian-mixture Pipeline defined in
``kdiff_align.apps.generate``) so they need no weights and take seconds; Demon draws fresh noise at every
step, so equal images across runs show that each item's randomness depends only on its seed.
"""
import base64
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

from kdiff_align.apps import generate, reward_specs
from kdiff_align.apps.experiment import read_jsonl, shard

PROMPTS = ["dark", "light", "grey"]
SEEDS = "0-3"
ARGS = ["--model", "toy:mixture", "--seeds", SEEDS, "--method", "demon", "--K", "6", "--steps", "12",
        "--reward", "brightness", "--cfg", "1.5", "--no-progress"]
NAMES = [name for name, _, _ in generate.items(PROMPTS, generate.parse_seeds(SEEDS))]


def torchrun(prompts: Path, out: Path) -> subprocess.Popen:
    """Start the job on 2 gloo ranks (CPU); each worker is a child of the returned torchrun process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdiff_align", "generate", "--prompts", str(prompts), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    output = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    return output


def manifest_names(out: Path) -> list[str]:
    return [r["name"] for r in read_jsonl(out / "manifest.jsonl")]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    """rank → pid of the torchrun workers (children of the launcher), read from /proc."""
    ranks = {}
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(pid)
    return ranks


def wait_for_images(out: Path, proc: subprocess.Popen, count: int, timeout: float = 120) -> None:
    """Poll the manifest until it lists ``count`` images (the job must still be running then)."""
    deadline = time.monotonic() + timeout
    while len(manifest_names(out)) < count:
        assert proc.poll() is None, "the job ended before it could be killed mid-way"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is skipped
    return path


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory) -> Path:
    """The same job run as one plain process (no torchrun: rank 0 of 1)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert generate.main(["--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    return out


def check_complete(out: Path, reference: Path) -> None:
    """Every image exactly once (files and manifest), equal to the single-process image; report present."""
    assert sorted(os.listdir(out / "images")) == sorted(f"{n}.png" for n in NAMES)  # no temporaries either
    names = manifest_names(out)
    assert sorted(names) == sorted(NAMES) and len(set(names)) == len(names)
    for name in NAMES:  # bit-equal: an item's noise comes only from its seed, whatever the rank or attempt
        assert np.array_equal(pixels(out / "images" / f"{name}.png"), pixels(reference / "images" / f"{name}.png"))
    with open(out / "report.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("name,prompt_index,prompt,seed,reward") and sorted(r.split(",")[0] for r in rows[1:]) == \
        sorted(NAMES)
    assert (out / "report.md").read_text() == (reference / "report.md").read_text()
    assert not (out / "INCOMPLETE").exists()  # rank 0 removes the marker once the report is written
    assert pixels(out / "grid.png").shape[:2] == pixels(reference / "grid.png").shape[:2]


def test_single_process_report(reference):
    report = (reference / "report.md").read_text()
    assert "12 images (3 prompts × 4 seeds)" in report
    for prompt in PROMPTS:
        assert f"| {prompt} | 4 |" in report
    config = json.loads((reference / "config.json").read_text())
    assert config["prompts"] == PROMPTS and config["seeds"] == [0, 1, 2, 3]
    assert not any("key" in k for k in config)  # --vlm-key-env names a secret's variable: never saved
    rewards = {r["prompt"]: [] for r in read_jsonl(reference / "steps.jsonl") if r.get("kind") == "image"}
    for r in read_jsonl(reference / "steps.jsonl"):
        if r.get("kind") == "image":
            rewards[r["prompt"]].append(r["reward"])
    # brightness of the 'light' class (mean level +0.6) exceeds that of 'dark' (-0.6) by far more than
    # the within-class spread (std 0.25 per pixel, ~0.03 for a 64-pixel mean)
    assert min(rewards["light"]) > max(rewards["dark"]) + 0.5


def test_killed_rank_then_killed_job_resume_without_loss(prompts_file, reference, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(prompts_file, out)
    wait_for_images(out, proc, 2)
    while 1 not in worker_pids(proc):
        time.sleep(0.01)
    os.kill(worker_pids(proc)[1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    first = {n: (out / "images" / f"{n}.png").stat() for n in manifest_names(out)}
    assert 2 <= len(first) < len(NAMES)

    proc = torchrun(prompts_file, out)  # resume, then SIGKILL the whole job: workers and launcher
    wait_for_images(out, proc, len(first) + 1)
    for pid in [*worker_pids(proc).values(), proc.pid]:  # torchrun starts each worker in its own session
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(0.2)  # let the killed workers' exits settle before counting
    second = set(manifest_names(out))
    assert len(first) < len(second) < len(NAMES), "the job must be killed mid-way"

    output = finish(torchrun(prompts_file, out))  # resume to the end
    for rank in range(2):
        done = sum(n in second for n in shard(NAMES, rank, 2))
        assert f"[rank {rank}/2] 6 items, {done} already done" in output
    for name, stat in first.items():  # finished images were not redone (same file, same write time)
        now = (out / "images" / f"{name}.png").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    check_complete(out, reference)
    attempts = {}  # every attempt (one rank of one launch) saved items of a single shard only
    for r in read_jsonl(out / "manifest.jsonl"):
        attempts.setdefault(r["attempt"], set()).add(r["name"])
    assert len(attempts) >= 4
    assert all(any(names <= set(shard(NAMES, k, 2)) for k in range(2)) for names in attempts.values())


def test_resume_refuses_other_settings(prompts_file, reference, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--prompts", str(prompts_file), "--out", str(reference), *ARGS[:-1], "--beta", "0.2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "config differs" in err and "beta" in err and err.count("\n") == 1
    assert not (reference / "INCOMPLETE").exists()  # the finished run stays marked complete


@given(st.integers(1, 30), st.integers(1, 6), st.integers(1, 5))
def test_items_are_split_into_disjoint_complete_shards(n_prompts, n_seeds, world):
    names = [n for n, _, _ in generate.items([f"p{i}" for i in range(n_prompts)], list(range(n_seeds)))]
    shards = [shard(names, rank, world) for rank in range(world)]
    assert sorted(sum(shards, [])) == sorted(names) and len(set(names)) == len(names)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced to within one item


def test_bad_arguments_fail_early(tmp_path, capsys):
    assert generate.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("", "a", "3,3", "-1", "2-", "3-1"):
        with pytest.raises(ValueError, match="seeds"):
            generate.parse_seeds(bad)
    assert reward_specs.parse_reward("classifier:bag") == ("classifier", "bag")
    assert reward_specs.parse_reward("jpeg") == ("jpeg-small", None)  # the old name, with a note on stderr
    for bad in ("loss", "aesthetic", "jpeg-small:9"):
        with pytest.raises(ValueError, match="reward"):
            reward_specs.parse_reward(bad)
    with pytest.raises(ValueError, match="--prompts.*does not exist"):
        generate.read_prompts(tmp_path / "missing.txt")
    for args, words in ([["--K", "0"], "argument --K"], [["--prompt", "purple"], "purple"]):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--prompt", "dark", "--out", str(tmp_path / "o"), *ARGS, *args])
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class BrightnessJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint that scores the mean pixel value of the sent image."""

    keys = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        BrightnessJudge.keys.append(self.headers.get("Authorization"))
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            score = float(np.asarray(im, dtype=np.float64).mean() / 255)
        answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps({"score": score})}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(answer.encode())


def test_vlm_reward_drives_best_of_n_and_key_stays_secret(tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdefXYZ"
    monkeypatch.setenv("JUDGE_TOKEN", secret)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BrightnessJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "vlm"
    try:
        generate.main(["--model", "toy:mixture", "--prompt", "grey", "--seeds", "0-1", "--method", "best_of_n",
                       "--n", "4", "--steps", "6", "--reward", "vlm", "--vlm-url",
                       f"http://127.0.0.1:{server.server_address[1]}/v1", "--vlm-model", "judge",
                       "--vlm-key-env", "JUDGE_TOKEN", "--out", str(out), "--no-progress"])
    finally:
        server.shutdown()
    assert BrightnessJudge.keys and set(BrightnessJudge.keys) == {f"Bearer {secret}"}
    records = read_jsonl(out / "steps.jsonl")
    for name in ("p00000-s0", "p00000-s1"):
        candidates = next(r["rewards"] for r in records if r["item"] == name and "rewards" in r)
        final = next(r["reward"] for r in records if r["item"] == name and r.get("kind") == "image")
        assert len(candidates) == 4 and final == pytest.approx(max(candidates), abs=1e-12)  # the judge's best kept
        mean = np.asarray(Image.open(out / "images" / f"{name}.png"), dtype=np.float64).mean() / 255
        assert final == pytest.approx(mean, abs=1e-12)  # the saved image is the one the judge scored
    for path in out.rglob("*"):  # the key is sent in the header only, never written
        assert not path.is_file() or secret.encode() not in path.read_bytes()


def test_smc_report_counts_backward_passes_by_the_nfe_rule(tmp_path):
    """Guided SMC, N = 4 particles, 6 steps: 6·4 forward rows and 5·4 backward rows (the last step, σ → 0,
    has no drift); ``nfe`` is their total in forward equivalents, counted exactly."""
    from kdiff_align.utils import BACKWARD_COST
    prompts = tmp_path / "p.txt"
    prompts.write_text("light\n")
    out = tmp_path / "run"
    assert generate.main(["--prompts", str(prompts), "--out", str(out), "--model", "toy:mixture", "--seeds", "0",
                          "--method", "smc", "--particles", "4", "--steps", "6", "--proposal", "guided",
                          "--reward", "brightness", "--no-progress"]) == 0
    (record,) = [r for r in read_jsonl(out / "steps.jsonl") if r.get("kind") == "image"]
    assert (record["nfe_forward"], record["nfe_backward"]) == (24, 20)
    assert record["nfe"] == 24 + 20 * BACKWARD_COST


def test_a_damaged_folder_is_repaired_by_the_first_rerun_and_more_seeds_extend_it(prompts_file, reference, tmp_path,
                                                                                   capsys):
    """A corrupt PNG, a truncated PNG, a lost step record and a torn manifest line: the first rerun redoes
    exactly those images (bit-equal to the originals), says which, and completes; more seeds extend the run."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "images" / "p00000-s1.png").write_bytes(os.urandom(100))  # head -c100 /dev/urandom > ...
    half = (out / "images" / "p00001-s2.png").read_bytes()
    (out / "images" / "p00001-s2.png").write_bytes(half[:len(half) // 2])
    steps = (out / "steps.jsonl").read_text().splitlines(keepends=True)
    (out / "steps.jsonl").write_text("".join(s for s in steps if not ('"kind": "image"' in s and "p00002-s0" in s)))
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"attempt": "dead", "file": "p0')  # a crash during the write
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert generate.main(["--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    err = capsys.readouterr().err
    assert "cut a torn last line of manifest.jsonl" in err
    assert "regenerating 3 damaged images" in err and all(n in err for n in ("p00000-s1", "p00001-s2", "p00002-s0"))
    check_complete(out, reference)  # each image once, bit-equal to the undamaged run, report written
    redone = {p.name for p in (out / "images").iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert redone == {"p00000-s1.png", "p00001-s2.png", "p00002-s0.png"}
    more = [*ARGS[:ARGS.index("--seeds")], "--seeds", "0-5", *ARGS[ARGS.index("--seeds") + 2:]]
    assert generate.main(["--prompts", str(prompts_file), "--out", str(out), *more]) == 0
    assert "18 items, 12 already done" in capsys.readouterr().err  # 3 prompts × 2 new seeds to make
    assert len(manifest_names(out)) == 18 and not (out / "INCOMPLETE").exists()
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1, 2, 3, 4, 5]
