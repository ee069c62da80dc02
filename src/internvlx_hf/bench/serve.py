"""Requests/s and latency of a running OpenAI-compatible server (`internvlx serve`, vLLM, ...).

Each request is one chat completion with a generated PNG (a seeded drawing, sent as a data URL) and a short
question; ``max_tokens`` bounds the answer. At each concurrency level, that many client threads send requests back
to back until ``requests`` have finished; the row gives requests/s (finished requests over the level's wall time)
and the p50 / p95 latency of a request. Any failed request stops the run with the server's answer: a benchmark of
errors would be a wrong figure.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .harness import BenchError, Progress


def check_url(url: str) -> str:
    """``url`` without a trailing slash or ``/v1``, if it is an http(s) address; else a `ValueError` saying why."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"URL {url!r}: give the server's base address, e.g. http://127.0.0.1:8000")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def _image_data_url(size: int, seed: int) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220)]
    for i in range(3):
        x, y = (seed * 37 + i * 53) % (size // 2), (seed * 91 + i * 29) % (size // 2)
        draw.ellipse([x, y, x + size // 3, y + size // 3], fill=colours[(seed + i) % 3])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _call(base: str, path: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")[:500]
        raise BenchError(f"{base}{path} answered HTTP {error.code}: {text}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot reach {base}{path}: {reason}. Is the server running at that address?") from None


def post_chat(base: str, body: dict, api_key: str | None = None, timeout: float = 300) -> tuple[float, dict]:
    """One chat completion: its latency in seconds and the answer."""
    begin = time.perf_counter()
    answer = _call(base, "/v1/chat/completions", body, api_key, timeout)
    elapsed = time.perf_counter() - begin
    if not answer.get("choices"):
        raise BenchError(f"{base}/v1/chat/completions answered without choices: {str(answer)[:300]}")
    return elapsed, answer


def load_level(send, items, concurrency: int) -> tuple[float, list]:
    """``send(item)`` for every item from ``concurrency`` threads: the wall seconds and the results in order."""
    begin = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, items))
    return time.perf_counter() - begin, results


def percentile(values, q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``: the sorted value at index round(q * (n - 1))."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def served_model(base: str, api_key: str | None = None, timeout: float = 30) -> str:
    """The first model id of ``GET /v1/models``."""
    models = _call(base, "/v1/models", None, api_key, timeout).get("data") or []
    if not models:
        raise BenchError(f"{base}/v1/models lists no model; pass --model NAME.")
    return models[0]["id"]


def bench_serve(url: str, concurrency=(1, 4), requests: int = 16, model: str | None = None, image_size: int = 448,
                max_tokens: int = 16, api_key: str | None = None, timeout: float = 300,
                progress: bool = True) -> list[dict]:
    """One row per concurrency level: requests, seconds, requests/s, p50 / p95 latency, completion tokens."""
    if requests < 1 or any(c < 1 for c in concurrency):
        raise ValueError(f"--requests and --concurrency must be >= 1, got {requests} and {list(concurrency)}.")
    if image_size < 28:
        raise ValueError(f"--image-size must be >= 28 pixels, got {image_size}.")
    base = check_url(url)
    model = model or served_model(base, api_key)
    images = [_image_data_url(image_size, seed) for seed in range(8)]

    def one(i: int) -> tuple[float, int]:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
            {"type": "text", "text": "What colours are the circles?"}]}]}
        elapsed, answer = post_chat(base, body, api_key, timeout)
        return elapsed, int((answer.get("usage") or {}).get("completion_tokens") or 0)

    one(0)  # warm-up: the first request pays for lazy loading and compilation
    bar = Progress(len(concurrency), "serve", enabled=progress)
    rows = []
    for level in concurrency:
        wall, done = load_level(one, range(requests), level)
        latencies = [t for t, _ in done]
        rows.append({"concurrency": level, "requests": requests, "seconds": wall, "requests_per_s": requests / wall,
                     "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
                     "completion_tokens": sum(n for _, n in done)})
        bar.step(f"concurrency {level}: {requests / wall:.3g} req/s")
    return rows
