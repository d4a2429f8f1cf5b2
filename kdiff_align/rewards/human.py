"""A person as the reward: choose the best candidate (or rank them) in a browser page or in the terminal.

``HumanChoice()(pils) -> list[float]`` shows the K candidates of a step on a page served at
``http://127.0.0.1:<port>/`` (loopback only) and blocks until the person clicks one: the chosen image
gets reward 1 and the others 0. With ``mode="rank"`` the person clicks all K in order, best first, and
the rewards are ``1 - position / (K - 1)``. ``terminal_choice`` does the same from a saved grid image
and an index typed on standard input.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw

from ..utils import atomic_write
from .base import image_data_url, pil_reward

MODES = ("best", "rank")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_order(order, k: int, mode: str) -> list[int]:
    """Validate a choice: ``[i]`` (best) or a permutation of ``range(k)`` best first (rank)."""
    if not isinstance(order, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in order):
        raise ValueError(f"order must be a list of ints, got {order!r}")
    if mode == "best" and not (len(order) == 1 and 0 <= order[0] < k):
        raise ValueError(f"choose exactly one index in 0..{k - 1}, got {list(order)}")
    if mode == "rank" and sorted(order) != list(range(k)):
        raise ValueError(f"a ranking must list each index 0..{k - 1} once, got {list(order)}")
    return list(order)


def choice_rewards(order: Sequence[int], k: int, mode: str = "best") -> list[float]:
    """Rewards from a choice: 1 for the chosen image and 0 otherwise, or ``1 - position/(K-1)`` for a ranking."""
    order = check_order(list(order), k, _check_mode(mode))
    if mode == "best":
        return [1.0 if i == order[0] else 0.0 for i in range(k)]
    position = {index: p for p, index in enumerate(order)}
    return [1.0 - position[i] / (k - 1) if k > 1 else 1.0 for i in range(k)]


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>kdiff_align: choose</title><style>
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
#grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; position: relative; }
img.candidate { width: __SIZE__px; image-rendering: pixelated; cursor: pointer; border: 4px solid transparent; }
img.candidate:hover { border-color: #4a90d9; }
.badge { position: absolute; top: 6px; left: 6px; background: #222; color: #fff; padding: 2px 7px; border-radius: 9px; }
</style></head><body>
<h2 id="title"></h2><p id="status">Waiting for candidates…</p>
<div id="grid"></div><p><button id="reset" hidden>Reset ranking</button></p>
<script>
const TOKEN = "__TOKEN__";
let round = 0, mode = "best", order = [];
function render(state) {
  round = state.round; mode = state.mode; order = [];
  document.getElementById("title").textContent = state.title + " (step " + state.round + ")";
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  state.images.forEach((src, i) => {
    const fig = document.createElement("figure"), img = document.createElement("img");
    img.src = src; img.className = "candidate"; img.dataset.index = i; img.alt = "candidate " + i;
    img.addEventListener("click", () => pick(i, fig));
    fig.appendChild(img); grid.appendChild(fig);
  });
  document.getElementById("reset").hidden = mode !== "rank";
  document.getElementById("status").textContent = mode === "rank"
    ? "Click every image, best first." : "Click the best image.";
}
function pick(i, fig) {
  if (order.includes(i)) return;
  order.push(i);
  const badge = document.createElement("span"); badge.className = "badge"; badge.textContent = order.length;
  fig.appendChild(badge);
  if (mode === "best" || order.length === document.querySelectorAll("img.candidate").length) submit();
}
async function submit() {
  const r = await fetch("/choice", {method: "POST", headers: {"Content-Type": "application/json"},
                                    body: JSON.stringify({token: TOKEN, round: round, order: order})});
  document.getElementById("grid").replaceChildren();
  document.getElementById("status").textContent = r.ok ? "Thanks. Waiting for the next step…"
                                                        : "Not accepted (" + r.status + "); waiting…";
}
document.getElementById("reset").addEventListener("click", () => poll(true));
async function poll(force) {
  try {
    const state = await (await fetch("/state")).json();
    if (state.images.length && (force === true || state.round !== round)) render(state);
  } catch (e) {}
}
setInterval(poll, 250); poll();
</script></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    """Serves the page, the current candidates (``/state``) and takes the choice (``POST /choice``)."""

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _host_ok(self) -> bool:  # refuse DNS-rebinding requests that name another host
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"127.0.0.1:{port}", f"localhost:{port}")

    def do_GET(self):
        if not self._host_ok():
            return self._reply(403, b'{"error": "bad Host"}')
        if self.path in ("/", "/index.html"):
            return self._reply(200, self.server.owner.page.encode(), "text/html; charset=utf-8")
        if self.path == "/state":
            return self._reply(200, json.dumps(self.server.owner.state()).encode())
        self._reply(404, b'{"error": "not found"}')

    def do_POST(self):
        if not self._host_ok() or self.path != "/choice":
            return self._reply(403 if self.path == "/choice" else 404, b'{"error": "refused"}')
        try:
            payload = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 1 << 16)))
            code, message = self.server.owner.submit(payload)
        except (ValueError, TypeError, AttributeError) as e:
            code, message = 400, str(e)
        self._reply(code, json.dumps({"ok": code == 200, "message": message}).encode())


class HumanChoice:
    """Rewards from a person who clicks the best candidate (or ranks them) on a local web page.

    Args:
        mode: ``"best"`` (one click, reward 1 for it and 0 for the rest) or ``"rank"`` (click all, best first).
        port: loopback port to serve on; 0 picks a free one. The server binds 127.0.0.1 only.
        timeout: seconds to wait for each choice (None waits for ever); TimeoutError past it.
        open_browser: open the page in the default browser at the first step.
        size: display width of each candidate in pixels (small images are upscaled, pixelated).
    """

    def __init__(self, mode: str = "best", *, port: int = 0, timeout: float | None = None,
                 open_browser: bool = False, title: str = "Choose the best image", size: int = 256):
        self.mode, self.timeout, self.open_browser, self.title = _check_mode(mode), timeout, open_browser, title
        self._token = secrets.token_urlsafe(16)
        self.page = PAGE.replace("__TOKEN__", self._token).replace("__SIZE__", str(int(size)))
        self._lock, self._chosen = threading.Lock(), threading.Event()
        self._round, self._images, self._order, self._announced = 0, [], None, False
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads, self._server.owner = True, self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kdiff-align-human", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __repr__(self) -> str:
        return f"HumanChoice(mode={self.mode!r}, url={self.url!r})"

    def state(self) -> dict:
        """What the page shows: the step number and the candidates as data URLs (empty while waiting)."""
        with self._lock:
            return {"round": self._round, "mode": self.mode, "title": self.title, "images": list(self._images)}

    def submit(self, payload: dict) -> tuple[int, str]:
        """Take a choice posted by the page; returns (HTTP status, message)."""
        with self._lock:
            if not secrets.compare_digest(str(payload.get("token", "")), self._token):
                return 403, "bad token"
            if payload.get("round") != self._round or not self._images or self._order is not None:
                return 409, f"step {payload.get('round')} is not waiting for a choice"
            self._order = check_order(payload.get("order"), len(self._images), self.mode)
            self._chosen.set()
            return 200, "ok"

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        """Show ``images`` and block until the person chooses; returns one reward per image."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("images must be a non-empty list of PIL images")
        with self._lock:
            self._round, self._images, self._order = self._round + 1, [image_data_url(im) for im in images], None
            self._chosen.clear()
        if not self._announced:
            self._announced = True
            print(f"kdiff_align: choose images at {self.url}", file=sys.stderr, flush=True)
            if self.open_browser:
                webbrowser.open(self.url)
        chosen = self._chosen.wait(self.timeout)
        with self._lock:
            order, self._images = self._order, []
        if not chosen:
            raise TimeoutError(f"no choice for step {self._round} within {self.timeout} s at {self.url}")
        return choice_rewards(order, len(images), self.mode)

    def reward(self, decode: Callable | None = None) -> Callable:
        """This chooser as ``reward(x0) -> Tensor[B]`` (decoding latents with ``decode``)."""

        return pil_reward(self, decode)

    def close(self) -> None:
        """Stop the server."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HumanChoice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_grid(images: Sequence[Image.Image], path: str | os.PathLike, cell: int = 128) -> Path:
    """Save the candidates side by side, upscaled to ``cell`` pixels and labelled with their index (atomic)."""
    path = Path(path)
    grid = Image.new("RGB", (cell * len(images), cell + 18), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (i * cell, 18))
        draw.text((i * cell + cell // 2 - 4, 3), str(i), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def terminal_choice(images: Sequence[Image.Image], *, mode: str = "best", grid_path: str | os.PathLike | None = None,
                    input: Callable[[str], str] = input, max_tries: int = 5) -> list[float]:
    """Terminal fallback: save a grid of the candidates, read the best index (or a ranking) from stdin."""
    _check_mode(mode)
    images = list(images)
    path = save_grid(images, grid_path or Path(tempfile.gettempdir()) / "kdiff_align_choice.png")
    what = "the index of the best image" if mode == "best" else "all indices, best first, separated by spaces"
    print(f"Candidates 0..{len(images) - 1} are in {path}", file=sys.stderr, flush=True)
    for _ in range(max_tries):
        try:
            line = input(f"Type {what}: ")
        except EOFError:
            raise RuntimeError("no choice: standard input is closed") from None
        try:
            order = [int(t) for t in line.replace(",", " ").split()]
            return choice_rewards(order, len(images), mode)
        except ValueError as e:
            print(f"Not understood ({e}); try again.", file=sys.stderr, flush=True)
    raise ValueError(f"no valid choice in {max_tries} tries")
