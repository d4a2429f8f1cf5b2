"""VLMReward against a real local HTTP server imitating an OpenAI-compatible chat-completions endpoint."""
import base64
import io
import json
import logging
import math
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from kdiff_align.rewards import vlm
from kdiff_align.rewards.vlm import VLMError, VLMReward, parse_score, retry_after_seconds

KEY = "sk-test-5f3a9c1e7b2d4a6f8e0c"
ENV = "KDIFF_TEST_VLM_KEY"


def true_score(image: Image.Image) -> float:
    """What the fake VLM answers: 10 × mean brightness, so a decoding error would show."""
    return round(10 * float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255, 4)


class FakeVLM(BaseHTTPRequestHandler):
    """Answers with the image's true score, after the faults queued in ``server.faults`` (FIFO)."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None):
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, content: str):
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def do_POST(self):
        server = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": request})
            fault = server.faults.pop(0) if server.faults else server.default
        url = request["messages"][0]["content"][1]["image_url"]["url"]
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        if fault == "500":
            self._send(500, b"internal error")
        elif fault == "503":
            self._send(503, b"overloaded", {"Retry-After": "0"})
        elif fault.startswith("429"):
            self._send(429, b"slow down", {"Retry-After": fault.split(":")[1]})
        elif fault == "garbage":
            self._answer("I would rather not rate this picture.")
        elif fault == "not-json":
            self._send(200, b"<html>proxy error</html>")
        elif fault == "slow":
            time.sleep(server.slow_s)
            self._answer(json.dumps({"score": true_score(image)}))
        elif fault == "401-echo":  # a server echoing the credentials it got must not leak them through us
            self._send(401, f"invalid key {self.headers.get('Authorization')}".encode())
        elif fault == "text":
            self._answer(f"Score: {true_score(image)}/10")
        else:
            self._answer("```json\n" + json.dumps({"reason": "ok", "score": true_score(image)}) + "\n```")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that time out close their sockets
        pass


@pytest.fixture
def server():
    httpd = QuietServer(("127.0.0.1", 0), FakeVLM)
    httpd.lock, httpd.requests, httpd.faults, httpd.default, httpd.slow_s = threading.Lock(), [], [], "ok", 0.6
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return KEY


def images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def make(server, **kw) -> VLMReward:
    # tiny backoff and timeout keep the fault tests fast; the 0.25 s timeout is far above a local answer
    # (~ms) and below the 0.6 s "slow" fault
    defaults = dict(api_key_env=ENV, backoff=0.001, max_backoff=5.0, timeout=0.25, max_retries=4, concurrency=4)
    return VLMReward(server.base_url, "fake-vlm", **{**defaults, **kw})


def test_scores_match_the_images_and_the_request_is_openai_shaped(server, key):
    pils = images(4)
    scores = make(server)(pils)
    assert scores == [true_score(im) for im in pils]  # exact: the server rounds, JSON carries it verbatim
    assert len(server.requests) == 4
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "fake-vlm" and body["messages"][0]["role"] == "user"
        assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_cache_by_image_hash_and_prompt(server, key):
    pils = images(3)
    reward = make(server)
    first = reward(pils + [pils[0].copy()])  # an identical candidate is asked once
    assert len(server.requests) == 3 and first[3] == first[0]
    assert reward(pils[::-1]) == first[:3][::-1] and len(server.requests) == 3
    other_prompt = make(server, template="Rate {text}", text="a cat", cache=reward.cache)
    other_prompt(pils[:1])
    assert len(server.requests) == 4 and server.requests[-1]["body"]["messages"][0]["content"][0]["text"] == "Rate a cat"


def test_survives_faults_within_the_retry_budget(server, key, caplog):
    server.faults = ["500", "garbage", "503", "not-json", "slow", "429:0", "text"]
    pils = images(4, seed=1)
    with caplog.at_level(logging.WARNING, logger="kdiff_align.rewards.vlm"):
        scores = make(server, max_retries=7)(pils)  # 7 faults; even if one image drew all of them it has 8 tries
    assert scores == pytest.approx([true_score(im) for im in pils], abs=1e-9)
    assert len(server.requests) >= 4 + 6  # every fault but the parseable "text" answer cost one retry
    assert "retry" in caplog.text


def test_honours_retry_after(server, key):
    server.faults = ["429:1"]
    start = time.perf_counter()
    assert make(server, concurrency=1)(images(1)) == [true_score(images(1)[0])]
    # the exponential backoff alone would wait 1 ms; Retry-After asks for 1 s
    assert time.perf_counter() - start >= 1.0


def test_retry_after_beyond_max_backoff_fails_at_once(server, key):
    server.faults = ["429:120"]
    with pytest.raises(VLMError, match=r"retry after 120 s, more than max_backoff=5"):
        make(server)(images(1))
    assert len(server.requests) == 1


@pytest.mark.parametrize("fault, message", [("500", "HTTP 500"), ("garbage", "unparseable answer: no unambiguous score"),
                                            ("not-json", "malformed chat-completions response"),
                                            ("slow", "timed out after 0.25 s")])
def test_fails_clearly_beyond_the_retry_budget(server, key, fault, message):
    server.default = fault
    with pytest.raises(VLMError, match=r"gave up after 3 attempt\(s\)") as info:
        make(server, max_retries=2)(images(1))
    assert message in str(info.value) and "fake-vlm" in str(info.value)
    assert len(server.requests) == 3


def test_connection_refused_is_retried_then_reported(key):
    probe = QuietServer(("127.0.0.1", 0), FakeVLM)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port any more
    reward = VLMReward(f"http://127.0.0.1:{port}/v1", "m", api_key_env=ENV, backoff=0.001, max_retries=2)
    with pytest.raises(VLMError, match=r"after 3 attempt\(s\).*connection error \(ConnectError"):
        reward(images(1))


def test_key_never_leaks(server, key, caplog):
    server.faults = ["500", "slow", "garbage"]
    with caplog.at_level(logging.DEBUG):  # every logger, httpx and httpcore included, at DEBUG
        reward = make(server)
        reward(images(2))
        server.faults = ["401-echo"]
        with pytest.raises(VLMError) as info:
            reward(images(1, seed=5))
    assert server.requests[-1]["auth"] == f"Bearer {KEY}"  # it was sent, and echoed back by the server
    text = "".join(traceback.format_exception(info.value)) + repr(info.value) + str(info.value)
    assert "HTTP 401" in text and "***" in text and f"${ENV} set?" in text
    assert caplog.records and "retry" in caplog.text
    for blob in (text, caplog.text, repr(reward), json.dumps(vars(reward), default=str)):
        assert KEY not in blob


def test_no_key_variable_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    make(server)(images(1))
    assert server.requests[0]["auth"] is None


def test_pil_reward_adapter(server, key):
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    r = make(server).reward()(x0)
    from kdiff_align.image import to_pil
    assert r.dtype == torch.float64 and r.tolist() == [true_score(im) for im in to_pil(x0)]


@pytest.mark.parametrize("answer, score", [('{"score": 7.5}', 7.5), ('Sure! ```json\n{"score": 3}\n```', 3.0),
                                           ("8", 8.0), (" **9.25** ", 9.25), ("Score: 6/10", 6.0),
                                           ("I give it 7 out of 10.", 7.0), ("Rating: 4", 4.0),
                                           ('{"other": 1} then {"score": "2.5"}', 2.5), ("-1e-3", -0.001)])
def test_parse_score_accepts(answer, score):
    assert parse_score(answer) == score


@pytest.mark.parametrize("answer", ["", "no idea", "between 6 and 8", '{"score": "high"}', '{"score": NaN}',
                                    '{"score": true}', "inf", '{"score": null}'])
def test_parse_score_rejects(answer):
    with pytest.raises(ValueError):
        parse_score(answer)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_parse_score_round_trips_any_finite_float(value):
    assert parse_score(json.dumps({"score": value})) == value
    assert parse_score(repr(value)) == value


def test_retry_after_header_forms():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None and retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= retry_after_seconds(in_a_minute) <= 61  # whole-second date resolution plus test latency


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="base_url"):
        VLMReward("localhost:8000", "m")
    with pytest.raises(ValueError, match="credentials"):
        VLMReward("http://user:pw@host/v1", "m")
    with pytest.raises(ValueError, match="text is None"):
        VLMReward("http://h/v1", "m", template=vlm.ALIGNMENT_TEMPLATE)
    with pytest.raises(ValueError, match="max_retries"):
        VLMReward("http://h/v1", "m", max_retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        VLMReward("http://h/v1", "m", timeout=0)
    with pytest.raises(TypeError, match="PIL images"):
        VLMReward("http://h/v1", "m")([torch.zeros(3)])
    assert math.isclose(VLMReward("http://h/v1/", "m").backoff, 1.0) and VLMReward("http://h/v1/", "m").url == \
        "http://h/v1/chat/completions"
