"""The documentation site builds with `mkdocs build --strict` (API pages from docstrings), renders math with a
local MathJax, and cites nothing that is not in the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "api" / "sampling" / "index.html").exists()
    assert (site / "newton" / "table" / "index.html").exists()  # in the navigation
    flow = (site / "flow" / "index.html").read_text()
    assert flow.count('class="arithmatex"') >= 5  # math is marked for MathJax, not left as $…$
    scripts = re.findall(r'<script src="\.\./(js/[^"?]+)', flow)
    assert "js/mathjax/MathJax.js" in scripts and "js/mathjax-config.js" in scripts
    assert all((site / s).is_file() for s in scripts)  # served from the site itself: no CDN
    config = re.search(r"config=([\w-]+)", flow).group(1)
    assert (site / "js" / "mathjax" / "config" / f"{config}.js").is_file()


def _texts():
    """Every page, README and docstring source that ends up in the documentation."""
    paths = [*ROOT.glob("docs/**/*.md"), ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "mkdocs.yml",
             *ROOT.glob("kdiff_align/**/*.py")]
    return {p.relative_to(ROOT): p.read_text() for p in paths}


def test_no_dangling_references_or_placeholders():
    """Codes of notes outside the repository (B1…B12, P1, §5), their file names, and placeholder links."""
    bad = re.compile(r"\((?:[BP]\d{1,2}(?:, )?)+\)|\breference/\w+\.md|§\s?\d|example\.invalid|\bTODO\b|\bXXX\b")
    found = {str(p): m for p, text in _texts().items() for m in bad.findall(text)}
    assert not found
