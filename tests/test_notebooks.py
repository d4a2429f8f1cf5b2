"""Every notebook under notebooks/ (jupytext percent .py) executes without error, shows its figures inline and
saves them to the figure folder, writing nothing else."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "figures"
    monkeypatch.setenv("KDIFF_NOTEBOOK_OUT", str(out))  # the kernel inherits the environment
    root_before = sorted(p.name for p in ROOT.iterdir())
    (tmp_path / "cwd").mkdir()
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path / "cwd")}})
    client.execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)  # the message, not 120 lines
    saved = sorted(out.glob("*.png")) if out.exists() else []
    shown = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(shown) == len(saved)  # every saved figure is displayed once, and no figure is left unsaved
    if "save_figure(" in path.read_text():
        assert saved and all(p.name.startswith(path.stem[:2]) for p in saved)
    # nothing written to the working folder but Hypothesis's own cache (06; .hypothesis/ is git-ignored)
    assert [p.name for p in (tmp_path / "cwd").iterdir() if p.name != ".hypothesis"] == []
    assert sorted(p.name for p in ROOT.iterdir()) == root_before  # nor to the repository root


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 3


def test_notebooks_use_no_headless_show():
    """plt.show() under a non-interactive backend shows nothing; figures go through image.save_figure."""
    for path in NOTEBOOKS:
        text = path.read_text()
        assert not re.search(r"plt\.show\(|matplotlib\.use\(|savefig\(", text), path.name


def test_save_figure_writes_and_reports(tmp_path, capsys):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from kdiff_align.image import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = save_figure(fig, "a.png", tmp_path / "figs")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(path) in capsys.readouterr().out
    assert not plt.get_fignums()  # closed: Jupyter would otherwise show it twice
