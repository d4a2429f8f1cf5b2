"""Human choice: the local page driven by a real headless Chromium, its HTTP protocol, the terminal fallback."""
import io
import os
import threading

import pytest
import torch
from PIL import Image

from kdiff_align.rewards.human import HumanChoice, choice_rewards, save_grid, terminal_choice
from kdiff_align.rewards.vlm import httpx_module, image_data_url

httpx = httpx_module()

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


class Call:
    """Runs ``chooser(pils)`` in a thread, as a sampler would block on it."""

    def __init__(self, chooser, pils):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(chooser, pils), daemon=True)
        self.thread.start()

    def _run(self, chooser, pils):
        try:
            self.result = chooser(pils)
        except BaseException as e:  # handed to the test
            self.error = e

    def join(self, timeout: float = 10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the reward call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_round(chooser, n: int):
    for _ in range(400):
        if chooser.state()["round"] == n and chooser.state()["images"]:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"step {n} never shown")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (apt-get install chromium)")
def test_clicking_in_a_real_browser_returns_the_reward():
    from playwright.sync_api import sync_playwright

    pils, ranked = images(4), images(3, seed=1)
    with HumanChoice() as best, HumanChoice(mode="rank") as rank, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            call = Call(best, pils)
            page.goto(best.url)
            # the page shows the candidates in order: image i is candidate i, pixel for pixel
            page.wait_for_selector("img.candidate >> nth=3")
            assert page.eval_on_selector_all("img.candidate", "els => els.map(e => e.src)") == \
                [image_data_url(im) for im in pils]
            page.click("img[data-index='2']")
            assert call.join() == [0.0, 0.0, 1.0, 0.0]
            page.wait_for_selector("text=Waiting for the next step")
            # the next Demon step appears on the same page without reloading
            call = Call(best, pils[:3])
            page.wait_for_selector("text=(step 2)")
            page.click("img[data-index='0']")
            assert call.join() == [1.0, 0.0, 0.0]
            # ranking: click all, best first
            call = Call(rank, ranked)
            page.goto(rank.url)
            for index in (2, 0, 1):
                page.click(f"img[data-index='{index}']")
            assert call.join() == [0.5, 0.0, 1.0]
        finally:
            browser.close()


def test_server_is_loopback_only_and_checks_token_host_and_step():
    with HumanChoice(timeout=5) as chooser:
        assert chooser._server.server_address[0] == "127.0.0.1"
        call = Call(chooser, images(3))
        wait_for_round(chooser, 1)
        page = httpx.get(chooser.url)
        assert page.status_code == 200 and chooser._token in page.text
        post = lambda **body: httpx.post(chooser.url + "choice", json={"token": chooser._token, "round": 1, **body})
        assert httpx.get(chooser.url, headers={"Host": "evil.example:80"}).status_code == 403
        assert httpx.post(chooser.url + "choice", json={"token": "guess", "round": 1, "order": [0]}).status_code == 403
        assert post(order=[3]).status_code == 400 and post(order=[0, 1]).status_code == 400
        assert post(order=["1"]).status_code == 400
        assert post(order=[1], round=0).status_code == 409
        assert post(order=[1]).status_code == 200
        assert call.join() == [0.0, 1.0, 0.0]
        assert post(order=[2]).status_code == 409  # one choice per step
        assert httpx.get(chooser.url + "state").json()["images"] == []


def test_timeout_is_reported_and_the_next_step_still_works():
    with HumanChoice(timeout=0.2) as chooser:
        with pytest.raises(TimeoutError, match=r"no choice for step 1 within 0.2 s at http://127.0.0.1:"):
            chooser(images(2))
        chooser.timeout = 5
        call = Call(chooser, images(2))
        wait_for_round(chooser, 2)
        assert httpx.post(chooser.url + "choice", json={"token": chooser._token, "round": 2, "order": [0]}).is_success
        assert call.join() == [1.0, 0.0]


def test_reward_adapter_blocks_until_a_choice():
    with HumanChoice(mode="rank", timeout=5) as chooser:
        x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        call = Call(chooser.reward(), x0)
        wait_for_round(chooser, 1)
        httpx.post(chooser.url + "choice", json={"token": chooser._token, "round": 1, "order": [1, 2, 0]})
        assert call.join().tolist() == [0.0, 1.0, 0.5]


def test_choice_rewards():
    assert choice_rewards([1], 3) == [0.0, 1.0, 0.0]
    assert choice_rewards([0], 1, "rank") == [1.0]
    assert choice_rewards([3, 1, 0, 2], 4, "rank") == pytest.approx([1 / 3, 2 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match="mode"):
        choice_rewards([0], 2, "worst")
    with pytest.raises(ValueError, match="each index 0..2 once"):
        choice_rewards([0, 0, 1], 3, "rank")
    with pytest.raises(ValueError, match="exactly one index in 0..1"):
        choice_rewards([2], 2)


def test_terminal_fallback_saves_a_grid_and_reads_stdin(tmp_path, capsys):
    pils = images(4)
    answers = iter(["x", "7", "", "2"])
    rewards = terminal_choice(pils, grid_path=tmp_path / "grid.png", input=lambda prompt: next(answers))
    assert rewards == [0.0, 0.0, 1.0, 0.0]
    assert capsys.readouterr().err.count("try again") == 3
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * 128, 128 + 18)
    # cell 2 holds candidate 2, upscaled by nearest neighbour (a 16x16 block per source pixel)
    assert grid.crop((256, 18, 384, 146)).resize((8, 8), Image.Resampling.NEAREST).tobytes() == pils[2].tobytes()
    ranking = iter(["2, 0 1 3"])
    assert terminal_choice(pils, mode="rank", grid_path=tmp_path / "g.png", input=lambda p: next(ranking)) == \
        pytest.approx([2 / 3, 1 / 3, 1.0, 0.0])


def test_terminal_fallback_fails_clearly(tmp_path):
    def closed(prompt):
        raise EOFError

    with pytest.raises(RuntimeError, match="standard input is closed"):
        terminal_choice(images(2), grid_path=tmp_path / "g.png", input=closed)
    with pytest.raises(ValueError, match="no valid choice in 2 tries"):
        terminal_choice(images(2), grid_path=tmp_path / "g.png", input=lambda p: "9", max_tries=2)
    assert sorted(os.listdir(tmp_path)) == ["g.png"]  # atomic write left no temporary file


def test_save_grid_is_atomic_over_an_existing_file(tmp_path):
    path = save_grid(images(2), tmp_path / "grid.png", cell=32)
    first = path.read_bytes()
    save_grid(images(2, seed=3), path, cell=32)
    assert path.read_bytes() != first and Image.open(io.BytesIO(path.read_bytes())).size == (64, 50)
