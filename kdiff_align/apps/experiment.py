"""Experiment directories for Demon, SMC and generation runs: resumable, append-only, no secrets.

Layout of ``Experiment(directory, config)``::

    config.json       the run's settings, with secret-looking keys and values dropped
    steps.jsonl       one JSON line per logged step (rewards, weights, NFE, ...), tagged with item and attempt
    images/NAME.png   finished images, each written to a temporary file and moved into place
    manifest.jsonl    one line per finished image, appended after its file is in place
    INCOMPLETE        present while a run that called ``mark_incomplete`` has not called ``mark_complete``

A run killed at any point resumes with ``Experiment(directory, config)``: finished images are in the
manifest and are not recomputed; an image being written when the run died is recomputed under the
same name, so none is lost or duplicated. ``steps()`` drops the step lines of attempts that died
before finishing their image. Lines are appended with one ``write`` on an ``O_APPEND`` descriptor,
so processes sharding one directory (``shard``) can log side by side. With ``reconfigure_empty=True``
a directory without finished images takes a new config (a run that failed before its first image
never blocks the corrected rerun).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils import atomic_write

SECRET_WORDS = {"key", "keys", "apikey", "token", "tokens", "secret", "secrets", "password", "passwd", "pwd",
                "passphrase", "credential", "credentials", "auth", "authorization", "cookie", "bearer"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def secret_name(name: str) -> bool:
    """Whether a key or variable name looks like it holds a secret (``api_key``, ``hfToken``, ``PASSWORD``)."""
    words = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(name))
    return any(w.lower() in SECRET_WORDS for w in words)


SHELL_DIRECTORIES = {"PWD", "OLDPWD"}  # the shell's working directories: "pwd" in their names is not a password


def env_secrets(environ=None, min_length: int = 8) -> set[str]:
    """Values of environment variables whose names look secret (values shorter than ``min_length`` ignored)."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if secret_name(k) and k not in SHELL_DIRECTORIES and len(v) >= min_length}


def _plain(value):
    """A JSON-ready version of a config or log value (tensors to lists, paths to strings)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.ndim == 0 else value.tolist() if value.numel() <= 65536 else \
            f"Tensor(shape={list(value.shape)}, dtype={value.dtype})"
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or inf
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return getattr(value, "__qualname__", None) or repr(value)


def redact(obj, secrets: Iterable[str] | None = None):
    """``obj`` made JSON-ready, without keys whose names look secret nor values holding a secret.

    Args:
        secrets: strings that must not appear; defaults to ``env_secrets()``. A dict entry whose value
            contains one is dropped; a list item is replaced by ``"<redacted>"``.
    """
    secrets = [s for s in (env_secrets() if secrets is None else secrets) if s]

    def leaks(value) -> bool:
        return isinstance(value, str) and any(s in value for s in secrets)

    def clean(value):
        if isinstance(value, dict):
            items = ((str(k), clean(v)) for k, v in value.items() if not secret_name(str(k)))
            return {k: v for k, v in items if not leaks(v)}
        if isinstance(value, (list, tuple, set)):
            return ["<redacted>" if leaks(v) else v for v in (clean(v) for v in value)]
        return _plain(value)

    return clean(obj)


def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of a file, skipping a torn last line left by a crash."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def repair_jsonl(path: Path) -> bool:
    """End a file of JSON lines cleanly after a crash mid-write: a torn last line is cut (a whole one kept).

    Returns True when the file was changed; later appends then start on a line of their own.
    """
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return False
    head, _, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
        keep = data + b"\n"  # a whole record whose newline was lost
    except ValueError:
        keep = head + b"\n" if head else b""
    atomic_write_bytes(path, keep)
    return True


def image_ok(path: Path) -> bool:
    """Whether ``path`` is an image file that decodes completely (not missing, truncated or corrupt)."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        return False
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and move it into place."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _remove_dead_temporaries(directory: Path) -> None:
    """Delete temporary files left by processes that no longer exist."""
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


def whole_record(record) -> bool:
    """Whether a manifest line is a whole record: a name, an image file name and the attempt that wrote it."""
    return isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k]
                                            for k in ("name", "file", "attempt"))


def extends(saved: dict, config: dict, keys: Sequence[str]) -> bool:
    """Whether ``config`` differs from ``saved`` only by lists under ``keys`` that keep every saved item."""
    diff = _config_diff(saved, config)
    return bool(diff) and all(k in keys and isinstance(saved.get(k), list) and isinstance(config.get(k), list)
                              and all(v in config[k] for v in saved[k]) for k in diff)


def _config_diff(saved: dict, config: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(config) if saved.get(k, "<absent>") != config.get(k, "<absent>"))


class Experiment:
    """A resumable experiment directory (config, per-step JSON lines, atomic images, manifest).

    Args:
        directory: created if missing; an existing one is resumed.
        config: settings to save as ``config.json`` (secrets dropped); on resume it must equal the saved one
            unless ``reconfigure_empty`` and no image is finished yet (then the new one replaces it).
        resume: False refuses a directory that already holds a config.
        secrets: extra strings that must never be written (the environment's secrets are always dropped).
        extendable: config keys holding lists that a resumed run may extend (items added, none dropped),
            e.g. the seeds of a generation run.
        repair: cut torn last lines of the manifest and step log (``repaired`` names the files); leave it
            to one process where several open the folder at once.

    On opening, every finished image is checked: an image that is missing, does not decode, or whose
    manifest record is not whole is listed in ``damaged`` and is pending again.
    """

    def __init__(self, directory: str | os.PathLike, config: dict | None = None, *, resume: bool = True,
                 secrets: Iterable[str] = (), reconfigure_empty: bool = False, extendable: Sequence[str] = (),
                 repair: bool = True):
        self.directory = Path(directory)
        self.images_dir = self.directory / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.secrets = env_secrets() | {s for s in secrets if s}
        self.attempt = uuid.uuid4().hex[:12]
        for directory in (self.directory, self.images_dir):
            _remove_dead_temporaries(directory)
        self.repaired = [name for name in ("manifest.jsonl", "steps.jsonl")
                         if repair and repair_jsonl(self.directory / name)]
        self.config = self._open_config(config, resume, reconfigure_empty, extendable)
        records = {r["name"]: r for r in read_jsonl(self.directory / "manifest.jsonl") if whole_record(r)}
        self.damaged = sorted(n for n, r in records.items() if not image_ok(self.images_dir / r["file"]))
        self.finished = {n: r for n, r in records.items() if n not in self.damaged}
        if repair and self.damaged:
            self._drop_from_manifest(self.damaged)

    def _open_config(self, config: dict | None, resume: bool, reconfigure_empty: bool, extendable=()) -> dict:
        path = self.directory / "config.json"
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        clean = json.loads(json.dumps(redact(config or {}, self.secrets), sort_keys=True))
        if path.exists():
            if not resume:
                raise FileExistsError(f"{self.directory} already holds an experiment; pass resume=True to continue it")
            saved = json.loads(path.read_text())
            if config is not None and saved != clean and (
                    (reconfigure_empty and not read_jsonl(self.directory / "manifest.jsonl"))
                    or extends(saved, clean, extendable)):
                saved = clean  # nothing finished can be mixed with other settings
                atomic_write_bytes(path, (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode())
            if config is not None and saved != clean:
                raise ValueError(f"config differs from the one saved in {path} at keys {_config_diff(saved, clean)}; "
                                 "use a new directory for new settings")
            return saved
        atomic_write_bytes(path, (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode())
        return clean

    def __repr__(self) -> str:
        return f"Experiment({str(self.directory)!r}, finished={len(self.finished)})"

    def mark_incomplete(self, note: str = "this run has not finished") -> None:
        """Write the ``INCOMPLETE`` marker (with ``note``: how to finish the run)."""
        atomic_write_bytes(self.directory / "INCOMPLETE", (note + "\n").encode())

    def mark_complete(self) -> None:
        """Remove the ``INCOMPLETE`` marker."""
        (self.directory / "INCOMPLETE").unlink(missing_ok=True)

    def image_path(self, name: str) -> Path:
        """Where image ``name`` lives (``images/NAME.png``)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"image name must match {_NAME.pattern} (no path separators), got {name!r}")
        return self.images_dir / f"{name}.png"

    def redo(self, names: Iterable[str]) -> None:
        """Count finished images as damaged (e.g. their step record is lost): dropped from the manifest, pending.

        Call it from one process while no other writes to the folder (rank 0 before the others open it).
        """
        names = [n for n in names if self.finished.pop(n, None) is not None]
        if names:
            self.damaged = sorted({*self.damaged, *names})
            self._drop_from_manifest(names)

    def _drop_from_manifest(self, names) -> None:
        """Rewrite the manifest without ``names`` (each image is listed once: a redone one's line replaces it)."""
        drop = set(names)
        lines = [r for r in read_jsonl(self.directory / "manifest.jsonl") if r.get("name") not in drop]
        atomic_write_bytes(self.directory / "manifest.jsonl",
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines).encode())

    def done(self, name: str) -> bool:
        """Whether image ``name`` was finished by this or an earlier run."""
        self.image_path(name)  # validates the name
        return name in self.finished

    def pending(self, names: Sequence[str]) -> list[str]:
        """The names in ``names`` that still have to be computed, in order."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError("names must be unique")
        return [n for n in names if not self.done(n)]

    def log(self, record: dict, item: str | None = None) -> None:
        """Append one step record (rewards, weights, NFE, ...) to ``steps.jsonl``, flushed to disk."""
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        _append_line(self.directory / "steps.jsonl", {**redact(record, self.secrets), "item": item,
                                                      "attempt": self.attempt})

    def save_image(self, name: str, image: Image.Image) -> Path:
        """Save a finished image atomically, then record it in the manifest."""
        path = self.image_path(name)
        if name in self.finished:
            raise ValueError(f"image {name!r} is already finished in {self.directory}")
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        record = {"name": name, "file": path.name, "attempt": self.attempt}
        _append_line(self.directory / "manifest.jsonl", record)
        self.finished[name] = record
        return path

    def steps(self) -> list[dict]:
        """Step records of finished images (from the attempt that finished each), this attempt's, and untagged ones."""
        finished = {r["name"]: r["attempt"] for r in read_jsonl(self.directory / "manifest.jsonl") if "name" in r}
        return [r for r in read_jsonl(self.directory / "steps.jsonl")
                if r.get("item") is None or r.get("attempt") in (finished.get(r.get("item")), self.attempt)]

    def images(self) -> dict[str, Path]:
        """Finished images by name."""
        return {name: self.images_dir / r["file"] for name, r in sorted(self.finished.items())}


def shard(names: Sequence[str], rank: int | None = None, world_size: int | None = None) -> list[str]:
    """This process's share of ``names`` (``RANK``/``WORLD_SIZE`` from torchrun's environment by default)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return list(names)[rank::world_size]


def run_items(experiment: Experiment, names: Sequence[str], make: Callable[[str], Image.Image], *,
              disable: bool | None = None) -> dict[str, Path]:
    """Compute ``make(name)`` for every name not finished yet and save it; returns all finished paths."""
    for name in tqdm(experiment.pending(names), desc="images", disable=disable):
        experiment.save_image(name, make(name))
    return {name: experiment.image_path(name) for name in names}


def plot_steps(experiment: Experiment, path: str | os.PathLike | None = None, key: str = "rewards") -> Path:
    """Plot the mean ± std of ``key`` per step over all finished items (PNG, matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, list[float]] = {}
    for r in experiment.steps():
        if key in r and "step" in r:
            values = r[key] if isinstance(r[key], list) else [r[key]]
            by_step.setdefault(int(r["step"]), []).extend(float(v) for v in values)
    if not by_step:
        raise ValueError(f"no step records with 'step' and {key!r} in {experiment.directory}")
    steps = sorted(by_step)
    values = [torch.tensor(by_step[s], dtype=torch.float64) for s in steps]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(steps, [v.mean().item() for v in values],
                yerr=[v.std().item() if len(v) > 1 else 0.0 for v in values], marker="o", capsize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    fig.tight_layout()
    path = Path(path) if path is not None else experiment.directory / f"{key}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
