"""A vision-language model as a (non-differentiable) reward, over any OpenAI-compatible chat endpoint.

``VLMReward(base_url, model)(pils) -> list[float]`` sends each image as a base64 PNG data URL with a
text prompt to ``{base_url}/chat/completions`` (a local vLLM server, a hosted API) and parses a score
from the answer. The API key is read from an environment variable at each call and is never stored,
logged or put in an exception. Faults (timeouts, connection errors, HTTP 408, 429 and 5xx, unparseable
answers) are retried with exponential backoff (honouring ``Retry-After``); past the retry budget a
``VLMError`` says what kept failing. Scores are cached by image hash and prompt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime
from typing import Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image
from tqdm.auto import tqdm

from .base import image_data_url, pil_reward

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = ("Rate the aesthetic quality of this image on a scale from 0 (worst) to 10 (best). "
                    'Answer only with JSON: {"score": <number>}.')
ALIGNMENT_TEMPLATE = ('Rate how well this image shows "{text}", on a scale from 0 (not at all) to 10 (perfectly). '
                      'Answer only with JSON: {"score": <number>}.')

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


class VLMError(RuntimeError):
    """The VLM gave no usable score within the retry budget (or refused the request)."""


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} is {value!r}, not a number")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return score


def parse_score(answer: str, field: str = "score") -> float:
    """A score from a VLM answer: the JSON object's ``field``, a bare number, ``N/M``, or the only number."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(answer) if c == "{"):
        try:
            obj, _ = decoder.raw_decode(answer, start)
        except ValueError:
            continue
        if isinstance(obj, dict) and field in obj:
            return _finite(obj[field], f"JSON field {field!r}")
    text = answer.strip().strip("*`'\" \n").rstrip(".")
    if re.fullmatch(_NUMBER, text):
        return _finite(text, "the answer")
    # "7/10" or "7 out of 10": the first number is the score
    ratios = re.findall(rf"({_NUMBER})\s*(?:/|out of)\s*{_NUMBER}", text)
    numbers = re.findall(_NUMBER, text)
    if len(ratios) == 1:
        return _finite(ratios[0], "the score")
    if len(numbers) == 1:
        return _finite(numbers[0], "the score")
    raise ValueError(f"no unambiguous score in the answer {answer[:200]!r}")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def image_hash(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def httpx_module():
    """The HTTP client library: ``httpx``, or its successor ``httpx2`` (same API) when only that is installed."""
    try:
        import httpx
    except ImportError:
        try:
            import httpx2 as httpx
        except ImportError:
            raise ImportError('the VLM reward needs the optional package \'httpx\': pip install "kdiff-align[vlm]"') from None
    return httpx


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


class VLMReward:
    """Scores PIL images with a vision-language model behind an OpenAI-compatible chat-completions API.

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``.
        model: model name sent in the request.
        template: prompt text; ``{text}`` in it is replaced by ``text`` (other braces are kept as written).
        score_field: JSON field holding the score; a bare number or ``N/10`` answer is accepted too.
        score_range: ``(low, high)``; a score outside it counts as unparseable and is retried.
        api_key_env: environment variable with the API key (read at each call, never stored or logged);
            unset or None sends no ``Authorization`` header (local servers).
        timeout: seconds for each request (connect, read, write).
        max_retries: retries per image after the first attempt, shared by all kinds of fault.
        backoff: the n-th retry waits ``min(backoff * 2**n, max_backoff)`` seconds, or what
            ``Retry-After`` asks.
        max_backoff: the longest wait; a ``Retry-After`` beyond it fails at once.
        concurrency: requests in flight at once (the K candidates of a step go in parallel).
        cache: keep scores by (image hash, model, prompt) across calls; a dict may be passed to share one.
    """

    def __init__(self, base_url: str, model: str, *, template: str = DEFAULT_TEMPLATE, text: str | None = None,
                 score_field: str = "score", score_range: tuple[float, float] | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 60.0, concurrency: int = 8, max_tokens: int = 64,
                 temperature: float = 0.0, extra_body: dict | None = None, cache: bool | dict = True,
                 disable: bool | None = True):
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
        if "@" in parts.netloc:
            raise ValueError("base_url must not hold credentials; put the API key in the variable named by api_key_env")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if "{text}" in template and text is None:
            raise ValueError("template contains {text} but text is None")
        if score_range is not None and not (len(score_range) == 2 and score_range[0] < score_range[1]):
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {max_retries!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
        _check_positive("timeout", timeout)
        _check_positive("backoff", backoff, allow_zero=True)
        _check_positive("max_backoff", max_backoff, allow_zero=True)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.score_field, self.score_range = model, score_field, score_range
        self.prompt = template.replace("{text}", text) if text is not None else template
        self.api_key_env, self.timeout, self.max_retries = api_key_env, float(timeout), max_retries
        self.backoff, self.max_backoff, self.concurrency = float(backoff), float(max_backoff), concurrency
        self.max_tokens, self.temperature, self.extra_body = max_tokens, temperature, dict(extra_body or {})
        self.cache = cache if isinstance(cache, dict) else ({} if cache else None)
        self.disable = disable

    def __repr__(self) -> str:
        return f"VLMReward(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def cache_key(self, image: Image.Image) -> str:
        """The cache key of an image: its hash, the model and the prompt."""
        return hashlib.sha256(f"{image_hash(image)}\0{self.model}\0{self.prompt}".encode()).hexdigest()

    def request_body(self, image: Image.Image) -> dict:
        """The chat-completions JSON body for one image."""
        content = [{"type": "text", "text": self.prompt},
                   {"type": "image_url", "image_url": {"url": image_data_url(image)}}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature, **self.extra_body}

    def parse_response(self, response) -> float:
        """The score in a chat-completions response; ValueError if there is none."""
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed chat-completions response ({type(e).__name__})") from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ValueError(f"message content is {type(content).__name__}, not text")
        score = parse_score(content, self.score_field)
        if self.score_range is not None and not self.score_range[0] <= score <= self.score_range[1]:
            raise ValueError(f"score {score} outside score_range {self.score_range}")
        return score

    def _fail(self, attempts: int, last: str) -> VLMError:
        return VLMError(self._redact(f"VLM reward gave up after {attempts} attempt(s) at {self.url} "
                                     f"(model {self.model!r}); last error: {last}"))

    def _score(self, client, image: Image.Image) -> float:
        """One image's score, retrying transient faults with exponential backoff."""
        httpx = httpx_module()
        body, wait, last = self.request_body(image), 0.0, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                logger.warning("VLM request failed (%s); retry %d/%d in %.3g s",
                               self._redact(last), attempt, self.max_retries, wait)
                time.sleep(wait)
            wait = min(self.backoff * 2 ** attempt, self.max_backoff)
            try:
                response = client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
                continue
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {e})"
                continue
            code = response.status_code
            if code in (408, 429) or code >= 500:
                last = f"HTTP {code}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
                if retry_after is not None and retry_after > self.max_backoff:
                    raise self._fail(attempt + 1, f"HTTP {code} asking to retry after {retry_after:g} s, "
                                                  f"more than max_backoff={self.max_backoff:g}")
                wait = wait if retry_after is None else retry_after
                continue
            if code >= 400:  # a client error does not heal by retrying
                hint = f" (is ${self.api_key_env} set?)" if code in (401, 403) and self.api_key_env else ""
                raise self._fail(attempt + 1, f"HTTP {code}{hint}: {response.text[:300]!r}")
            try:
                return self.parse_response(response)
            except ValueError as e:
                last = f"unparseable answer: {e}"
        raise self._fail(self.max_retries + 1, last)

    def _client(self):
        httpx = httpx_module()
        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return httpx.Client(timeout=self.timeout, headers=headers, limits=limits)

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        """Scores of ``images`` (identical images and cached ones are asked once)."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError(f"images must be PIL images, got {sorted({type(im).__name__ for im in images})}")
        keys = [self.cache_key(im) for im in images]
        cache = self.cache if self.cache is not None else {}
        todo = {k: im for k, im in zip(keys, images) if k not in cache}
        scores = {k: cache[k] for k in keys if k in cache}
        if todo:
            with self._client() as client, ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                futures = {pool.submit(self._score, client, im): k for k, im in todo.items()}
                try:
                    for future in tqdm(as_completed(futures), total=len(futures), desc="VLM", disable=self.disable):
                        scores[futures[future]] = cache[futures[future]] = future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        return [scores[k] for k in keys]

    def reward(self, decode: Callable | None = None) -> Callable:
        """This VLM as ``reward(x0) -> Tensor[B]`` (decoding latents with ``decode``)."""

        return pil_reward(self, decode)
