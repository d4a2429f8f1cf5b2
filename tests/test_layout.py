"""The package's architecture, read off its imports with ``ast``: no circles, arrows pointing down only.

Layers, bottom to top: the core (top-level modules and ``sampling``), then the model loaders
(``models``) and reward sources (``rewards``), then the methods (``align``), then the applications
(``apps``). Every import counts, including those inside functions. The package face
(``kdiff_align/__init__.py``), ``__main__`` and the ``kdiff_align.toy`` name are outside the layers:
nothing inside imports them.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kdiff_align

PACKAGE = Path(kdiff_align.__file__).parent
LAYERS = {"models": 1, "rewards": 1, "align": 2, "apps": 3}  # every other top-level module is the core (0)
FACES = {"kdiff_align", "kdiff_align.__main__", "kdiff_align.toy"}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name → file of every module under ``root`` (a package's ``__init__`` is the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, modules: dict) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of the package in one file."""
    tree, found = ast.parse(path.read_text()), []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = next(iter(modules)).split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            if target.split(".")[0] != top:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.append((child, None, node.lineno) if child in modules else (target, alias.name, node.lineno))
    return found


def graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict]:
    """The import graph ``module → modules it imports`` and the raw imports of each module."""
    modules = module_names(root, package)
    raw = {name: imports(name, path, modules) for name, path in modules.items()}
    return {name: {target for target, _, _ in found if target != name} for name, found in raw.items()}, raw


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import circle as ``[a, b, ..., a]``, or ``[]`` when the graph has none (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 99


def wrong_arrows(edges: dict[str, set[str]], faces=FACES) -> list[str]:
    """Imports of a face, upward arrows, and sideways arrows between models and rewards."""
    bad = []
    for src, targets in edges.items():
        for dst in sorted(targets):
            if src in faces:
                continue
            if dst in faces:
                bad.append(f"{src} imports the face {dst}")
            elif layer(dst) > layer(src):
                bad.append(f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})")
            elif layer(dst) == layer(src) > 0 and src.split(".")[1] != dst.split(".")[1]:
                bad.append(f"{src} imports {dst}, a sibling package of the same layer")
    return bad


EDGES, RAW = graph(PACKAGE, "kdiff_align")


def test_the_graph_is_read():
    """The walk sees the package (a broken walk would pass every other test vacuously)."""
    assert {"kdiff_align.sampling.core", "kdiff_align.models.toy", "kdiff_align.align.demon.sampler",
            "kdiff_align.apps.cli", "kdiff_align.rewards.base"} <= set(EDGES)
    assert "kdiff_align.sampling.multistep" in EDGES["kdiff_align.sampling.core"]
    assert "kdiff_align.rewards.base" in EDGES["kdiff_align.rewards.vlm"]  # a relative import, resolved
    assert "kdiff_align.models.toy" in EDGES["kdiff_align.apps.demo"]  # ``from ..models import toy``


def test_no_import_circles():
    assert find_cycle(EDGES) == []


def test_every_arrow_points_down():
    assert wrong_arrows(EDGES) == []


def test_reward_sources_import_only_the_base():
    for name, targets in EDGES.items():
        if name.startswith("kdiff_align.rewards.") and name != "kdiff_align.rewards.base":
            assert {t for t in targets if t.startswith("kdiff_align.rewards")} <= {"kdiff_align.rewards.base"}, name


def test_no_private_names_across_modules():
    bad = [f"{name}:{line} imports {target}.{imported}" for name, found in RAW.items()
           for target, imported, line in found
           if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    aliases = {}  # ``from .. import sampling`` then ``sampling._x``
    for name, path in module_names(PACKAGE, "kdiff_align").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                aliases.setdefault(name, set()).add((node.value.id, node.attr, node.lineno))
    for name, uses in aliases.items():
        modules_here = {target.rpartition(".")[2] for target in EDGES[name]}
        bad += [f"{name}:{line} uses {mod}.{attr}" for mod, attr, line in uses if mod in modules_here]
    assert bad == []


def test_no_reexport_tricks():
    for path in PACKAGE.rglob("*.py"):
        assert "noqa: E402" not in path.read_text(), path


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checks_catch_a_circle_an_upward_arrow_and_a_face_import(tmp_path):
    """The same checks on a small made-up package with each fault: they fail there."""
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "from . import utils\n",
        "utils.py": "def f():\n    from .apps import cli\n",  # core → app, lazily: upward
        "schedules.py": "from .utils import f\n",
        "models/__init__.py": "", "models/toy.py": "from ..rewards import base\n",  # sideways
        "rewards/__init__.py": "", "rewards/base.py": "import pkg\n",  # the face
        "align/__init__.py": "", "align/a.py": "from . import b\n", "align/b.py": "from .a import g\n",  # circle
        "apps/__init__.py": "", "apps/cli.py": "from ..align import a\n",
    })
    edges, _ = graph(root, "pkg")
    assert set(find_cycle(edges)) == {"pkg.align.a", "pkg.align.b"}
    assert sorted(wrong_arrows(edges, faces={"pkg"})) == [
        "pkg.models.toy imports pkg.rewards.base, a sibling package of the same layer",
        "pkg.rewards.base imports the face pkg",
        "pkg.utils (layer 0) imports pkg.apps.cli (layer 3)"]
    del edges["pkg.align.b"]
    assert find_cycle(edges) == []


@pytest.mark.parametrize("statement", [
    "import kdiff_align as ka; ka.odeint, ka.sdeint, ka.oderevert, ka.from_pretrained, ka.Pipeline, ka.cfg_denoiser",
    "from kdiff_align.align.demon import sample_demon, DemonGenerator, DemonGenerater, MODEL_ENV",
    "from kdiff_align.rewards import VLMReward, HumanChoice, check_rewards, jpeg_compressibility, CLIPScorer",
    "import kdiff_align.toy, kdiff_align.models.toy; assert kdiff_align.toy is kdiff_align.models.toy; "
    "kdiff_align.toy.load",
    "from kdiff_align import toy; toy.load, toy.classifier_reward, toy.FASHION_EVAL_SLICE",
    "from kdiff_align.testing import GaussianDenoiser, MixtureDenoiser, CountingDenoiser",
    "from kdiff_align.strategies import sigma_schedules, gaussian_problems",
    "from kdiff_align.align.smc import sample_smc, resample, ess, RESAMPLING",
])
def test_public_names_users_call_keep_working(statement):
    exec(statement, {})


def test_the_core_loads_without_methods_or_apps():
    """``import kdiff_align`` brings the core and the loaders, not the methods, the apps or heavy optional deps."""
    code = ("import sys, kdiff_align; bad = sorted(m for m in sys.modules if m.startswith(('kdiff_align.align', "
            "'kdiff_align.apps', 'diffusers', 'transformers'))); print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
