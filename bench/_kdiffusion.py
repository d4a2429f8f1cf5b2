"""Load k-diffusion 0.1.1's ``sampling.py`` (the peer) without its package ``__init__``, which imports
torchvision: the file is loaded by path with a stub ``k_diffusion.utils`` providing ``append_dims``.

The wheel is looked for in ``$KDIFFUSION_DIR``, then in a cache folder, and fetched there with
``pip download`` when missing. ``load()`` returns None when none of that works (no network).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

VERSION = "0.1.1.post1"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdiff_align" / f"k-diffusion-{VERSION}"


def _sampling_file() -> Path | None:
    """Path of k_diffusion/sampling.py, unpacking (and if needed downloading) the wheel into ``CACHE``."""
    for root in filter(None, [os.environ.get("KDIFFUSION_DIR"), CACHE]):
        if (Path(root) / "k_diffusion" / "sampling.py").is_file():
            return Path(root) / "k_diffusion" / "sampling.py"
    wheels = list(CACHE.glob("*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"k-diffusion=={VERSION}", "-d", str(CACHE)]
        if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
            return None
        wheels = list(CACHE.glob("*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract("k_diffusion/sampling.py", CACHE)
    return CACHE / "k_diffusion" / "sampling.py"


def load():
    """k-diffusion's sampling module, or None when the wheel cannot be had."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    try:
        path = _sampling_file()
    except (OSError, subprocess.SubprocessError, KeyError, zipfile.BadZipFile):
        return None
    if path is None:
        return None
    package = types.ModuleType("k_diffusion")
    package.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["k_diffusion.sampling"] = module
    spec.loader.exec_module(module)
    return module
