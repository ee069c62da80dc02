"""Requests/s and latency of a running OpenAI-compatible server (`internvlx serve`, vLLM, ...).

Each request is one chat completion with a generated PNG (a seeded drawing, sent as a data URL) and a short
question; ``max_tokens`` bounds the answer. At each concurrency level, that many client threads send requests back
to back until ``requests`` have finished; the row gives requests/s (finished requests over the level's wall time)
and the p50 / p95 latency of a request. Any failed request stops the run with the server's answer: a benchmark of
errors would be a wrong figure.

Conversation mode (`bench_chat`, ``--turns N``): each request is a chat of N turns about one image, the client
resending the whole conversation (the image, every question and the server's own answers) each turn, as chat
applications do; its row splits the latency of the first turn from the later ones (what a server's prefix cache
shortens) and gives the prompt tokens the server says it served from its cache, where it says so (vLLM:
``--enable-prompt-tokens-details``). ``same_image``: every request about one image (many users, one picture).
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
from pathlib import Path

from .harness import BenchError, Progress


def check_url(url: str) -> str:
    """``url`` without a trailing slash or ``/v1``, if it is an http(s) address; else a `ValueError` saying why."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"URL {url!r}: give the server's base address, e.g. http://127.0.0.1:8000")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


#: The generated image's side: 4 tiles of 448 px and a thumbnail, so that what a model decides per tile (InternVL3.5-
#: Flash's router compresses some tiles of an image, never a lone one) has tiles to decide among.
DEFAULT_IMAGE_SIZE = 896


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


def _check_sizes(requests: int, concurrency, image_size: int, turns: int = 1) -> None:
    if requests < 1 or any(c < 1 for c in concurrency):
        raise ValueError(f"--requests and --concurrency must be >= 1, got {requests} and {list(concurrency)}.")
    if image_size < 28:
        raise ValueError(f"--image-size must be >= 28 pixels, got {image_size}.")
    if turns < 1:
        raise ValueError(f"--turns must be >= 1, got {turns}.")


def bench_serve(url: str, concurrency=(1, 4), requests: int = 16, model: str | None = None,
                image_size: int = DEFAULT_IMAGE_SIZE, max_tokens: int = 16, api_key: str | None = None,
                timeout: float = 300, progress: bool = True, same_image: bool = False) -> list[dict]:
    """One row per concurrency level: requests, seconds, requests/s, p50 / p95 latency, completion tokens."""
    _check_sizes(requests, concurrency, image_size)
    base = check_url(url)
    model = model or served_model(base, api_key)
    images = [_image_data_url(image_size, seed) for seed in range(1 if same_image else 8)]

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


#: The questions of a conversation, in turn (a chat of more turns asks them again).
QUESTIONS = ("What colours are the circles?", "Which circle is the largest?", "Is any circle near the left edge?",
             "Do any circles overlap?", "What is the background colour?", "Describe the picture in one sentence.")


def _cached_tokens(usage: dict) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return None if cached is None else int(cached)


def bench_chat(url: str, concurrency=(1, 4), requests: int = 8, turns: int = 4, model: str | None = None,
               image_size: int = DEFAULT_IMAGE_SIZE, max_tokens: int = 16, api_key: str | None = None,
               timeout: float = 300, progress: bool = True, same_image: bool = False) -> list[dict]:
    """Conversation mode: each request a chat of ``turns`` turns about one image, resent whole each turn with the
    server's answers. One row per concurrency level: chats, seconds, turns/s, p50 latency of the first turns and
    p50 / p95 of the later ones, their ratio, prompt tokens of the later turns and how many the server served from its
    prefix cache (None where it does not say)."""
    _check_sizes(requests, concurrency, image_size, turns)
    base = check_url(url)
    model = model or served_model(base, api_key)
    offset = [0]  # each level's chats get images of their own (a cache that saw one level's serves none of the next)

    def chat(i: int) -> list[tuple[float, int, int | None]]:
        picture = _image_data_url(image_size, 1000 * offset[0] + (0 if same_image else i))
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                                 {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
        done = []
        for turn in range(turns):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "messages": messages}
            elapsed, answer = post_chat(base, body, api_key, timeout)
            usage = answer.get("usage") or {}
            done.append((elapsed, int(usage.get("prompt_tokens") or 0), _cached_tokens(usage)))
            text = (answer["choices"][0].get("message") or {}).get("content") or ""
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": QUESTIONS[(i + turn + 1) % len(QUESTIONS)]}]
        return done

    chat(0)  # warm-up (its image is not one of the timed chats')
    bar = Progress(len(concurrency), "serve --turns", enabled=progress)
    rows = []
    for level_index, level in enumerate(concurrency):
        offset[0] = level_index + 1
        wall, chats = load_level(chat, range(requests), level)
        first = [turns_[0][0] for turns_ in chats]
        later = [t for turns_ in chats for t, _, _ in turns_[1:]]
        cached = [c for turns_ in chats for _, _, c in turns_[1:]]
        row = {"concurrency": level, "chats": requests, "turns": turns, "seconds": wall,
               "turns_per_s": requests * turns / wall, "first_p50_s": statistics.median(first),
               "later_p50_s": statistics.median(later) if later else None,
               "later_p95_s": percentile(later, 0.95) if later else None,
               "later_vs_first": statistics.median(later) / statistics.median(first) if later else None,
               "later_prompt_tokens": sum(p for turns_ in chats for _, p, _ in turns_[1:]),
               "later_cached_tokens": None if not later or None in cached else sum(cached)}
        rows.append(row)
        bar.step(f"concurrency {level}: {row['turns_per_s']:.3g} turns/s")
    return rows


def chat_notes(rows: list[dict]) -> list[str]:
    """A line per level: later turns against the first, and what the server's prefix cache served."""
    notes = []
    for row in rows:
        if row["later_vs_first"] is None:
            continue
        line = f"concurrency {row['concurrency']}: a later turn took {row['later_vs_first']:.2f}x a first turn's time"
        if row["later_cached_tokens"] is None:
            line += ("; the server did not say which prompt tokens came from its cache (vLLM says so with "
                     "--enable-prompt-tokens-details)")
        else:
            share = row["later_cached_tokens"] / max(row["later_prompt_tokens"], 1)
            line += (f"; its prefix cache served {row['later_cached_tokens']} of the later turns' "
                     f"{row['later_prompt_tokens']} prompt tokens as sent ({share:.0%}; a server that shortens "
                     "prompts, as InternVL3.5-Flash's router does on vLLM, counts its cache on the shortened prompt, "
                     "of which it served more)")
        notes.append(line)
    return notes


def plot_chat(path, rows: list[dict], title: str):
    """p50 latency of first and later turns per concurrency level, side by side."""
    from .harness import figure

    with figure(path, figsize=(max(4.5, 1.6 * len(rows) + 2), 3.5), dpi=100) as (_, axes):
        levels = range(len(rows))
        axes.bar([x - 0.2 for x in levels], [row["first_p50_s"] for row in rows], 0.4, label="first turn",
                 color="#999999")
        axes.bar([x + 0.2 for x in levels], [row["later_p50_s"] or 0 for row in rows], 0.4, label="later turns",
                 color="#4c72b0")
        axes.set_xticks(list(levels), [f"concurrency {row['concurrency']}" for row in rows])
        axes.set_ylabel("p50 latency (s)")
        axes.set_title(title)
        axes.legend(fontsize=8)
    return Path(path)
