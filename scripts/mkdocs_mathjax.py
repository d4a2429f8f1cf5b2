"""mkdocs hook: copy MathJax 2 from the ``jupyter-server-mathjax`` wheel into ``site/js/mathjax`` (no CDN).

The docs extra installs that wheel; ``mkdocs.yml`` loads ``js/mathjax-config.js`` and then
``js/mathjax/MathJax.js`` so the math that ``pymdownx.arithmatex`` marks renders offline.
"""
import importlib.util
import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError


def on_post_build(config, **kwargs) -> None:
    """Copy the MathJax files after the pages are built; fail with the install command when missing."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("MathJax is missing: install the docs extra (pip install -e '.[docs]'), "
                          "whose jupyter-server-mathjax wheel ships it")
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    shutil.copytree(static, Path(config["site_dir"]) / "js" / "mathjax", dirs_exist_ok=True)
