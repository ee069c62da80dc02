"""Every bound of `internvlx serve`, with the reason for its default.

Plain Python (no FastAPI, no Pillow), so that `internvlx serve --help` shows the defaults without importing anything
heavy. Three kinds of bound, as vLLM and `transformers serve` bound work:

- per image (`MediaPolicy`): its encoded bytes and its pixels, read from its header before decoding;
- per request (`RequestLimits`, `MediaPolicy`): the body's bytes and JSON values, the images, their bytes and their
  pixels together, the text (at least one token per longest-token's characters must fit the model's context);
- per server (`ServerLimits`): how many requests decode and tile their images at once, and the worker threads that
  fetch, read, parse, decode and tokenize, all off the event loop so that ``/health`` answers while they work; how
  many generations run at once and how many tokens each makes in a turn, how many requests may wait for them and
  how long one generation may run;
- per connection (`ConnectionLimits`): how long a request's headers and body may take to arrive, how long an idle
  connection is kept, and how many connections are open at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: A request body: OpenAI's limit of a request's total payload, 50 MiB.
DEFAULT_MAX_REQUEST_BYTES = 50 * 2**20
#: JSON values in a body (strings, numbers, objects, arrays, ...). Parsing costs about 60 bytes of memory and a
#: microsecond per value: a 50 MiB body of ``[0,0,0,...]`` is 26 million values, 0.8 s and 1.5 GB; a chat request
#: needs a few per message (a 10,000-message conversation is about 50,000).
MAX_JSON_VALUES = 100_000
#: The images of one request (vLLM's ``--limit-mm-per-prompt``): each image is up to max_tiles tiles of 256 tokens,
#: so more would not fit an InternVL context anyway.
DEFAULT_MAX_IMAGES_PER_REQUEST = 16
#: An image's encoded size (the bytes of the PNG / JPEG file): OpenAI's per-image limit, 20 MiB.
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
#: An image's pixels (width x height): 40 megapixels, an 8K frame (7680 x 4320 = 33 M) passes.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: The encoded bytes of a request's images together, whatever their source (data: URIs, files, downloads): what a
#: request body may carry (`DEFAULT_MAX_REQUEST_BYTES`), so that a file path or a URL cannot make the server read
#: more than the client could send.
DEFAULT_MAX_REQUEST_IMAGE_BYTES = 50 * 2**20
#: The pixels of a request's images together, read from their headers before any is decoded: 100 megapixels, eight
#: 12-megapixel phone photos or eleven A4 pages scanned at 300 dpi. The model sees at most max_tiles x 448 x 448
#: pixels of each image (2.4 MP at 12 tiles), so more pixels only cost memory and time.
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 4


#: Requests that decode and tile large images at once, server-wide: a quarter of the cores this process may use, 1 to
#: 4. Decoding and tiling a large image is CPU work (about a second for 36 megapixels) that more threads than cores
#: do not speed up, and each such request holds up to --max-request-pixels decoded (Pillow keeps RGB in 4 bytes a
#: pixel, and the processor's RGB copy as many: 800 MB at 100 MP); a quarter of the machine leaves the rest to the
#: requests that keep coming, and bounds the memory large images take. Generation, which follows, runs one request
#: at a time anyway (transformers' inference thread).
DEFAULT_MAX_CONCURRENT_DECODES = max(1, min(4, _cores() // 4))
#: A request whose images have at most this many pixels together (a 2000 x 2000 image; 28 MB decoded) decodes without
#: waiting for a decode slot, on a prepare thread (which bound such requests), so that everyday images never queue
#: behind a request of 100 megapixels.
SMALL_DECODE_PIXELS = 4_000_000
#: Seconds a URL fetch may take in all (name resolution, connection, status line, headers, redirects, body).
DEFAULT_FETCH_TIMEOUT = 10.0
#: Threads that parse bodies, decode base64, decode and tile images and tokenize (CPU work off the event loop).
PREPARE_THREADS = 4
#: Threads that fetch URLs and read local files (waiting work: a slow host holds one until --media-fetch-timeout),
#: as vLLM's VLLM_MEDIA_LOADING_THREAD_COUNT (8).
FETCH_THREADS = 8
#: Generations running at once, taking turns on the model (`slicing`): each holds its KV cache while the others take
#: their turns (InternVL2-2B's LLM, 24 layers of 8 KV heads of 128, holds 96 KiB a token in bfloat16: 0.3 GB for
#: 3,000 tokens), and each one more makes every running one slower. 4 lets a short request run beside three long
#: ones instead of waiting for one to end.
DEFAULT_MAX_ACTIVE_GENERATIONS = 4
#: New tokens a running generation makes in one turn before the next running generation has the model. Each turn
#: change costs a thread switch (tens of microseconds, against milliseconds per token); 16 tokens keep a short
#: request's wait behind three long ones at about 48 of their tokens per token slice of its own.
DEFAULT_GENERATION_SLICE = 16
#: Requests that may wait for a running slot (beyond ``--max-active-generations``): beyond it a request is answered
#: 503 with ``Retry-After`` at once. 16 waiting requests of a few hundred tokens are a minute or two of work on a
#: GPU; a client that is told to come back loses less than one held for minutes without an answer.
DEFAULT_MAX_WAITING_REQUESTS = 16
#: Seconds one generation may run before it stops and answers what it has (``finish_reason: "length"``): bounds how
#: long one request holds the model, and so how long the requests behind it wait. 300 s is thousands of tokens of a
#: 2B model on a GPU (and a few hundred on a CPU).
DEFAULT_GENERATION_TIMEOUT = 300.0
#: The ``Retry-After`` of a 503 when the queue is full (seconds): about one short generation.
RETRY_AFTER_SECONDS = 5
#: Seconds a request's headers and body may take to arrive, from its first byte (the connection's opening, for the
#: first request): a 50 MiB body (--max-request-bytes) at 10 Mbit/s takes 42 s, and a client that sends nothing or
#: trickles its headers (slowloris) holds a descriptor at most this long. nginx's client_header_timeout and
#: client_body_timeout are 60 s too.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Seconds a connection idle between requests is kept (uvicorn's default, 5 s): enough for a client's next request,
#: short enough that idle clients do not hold descriptors.
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
#: Descriptors kept for the rest of the process when the connection cap is derived from the open-file limit: the
#: model's files while it loads, image files and URL fetches (--allowed-local-media-path, 8 fetch threads), the log,
#: the event loop's own.
RESERVED_DESCRIPTORS = 128
#: Connections the kernel holds for the server before it accepts them (the listen backlog; uvicorn's is 2048). Python's
#: event loop accepts up to this many at once before the server sees any of them, so each burst takes this many
#: descriptors before the cap can close the oldest idle connections: it stays well within `RESERVED_DESCRIPTORS`.
#: Beyond it the kernel holds back new connections, which clients retry (a TCP connect waits, it does not fail).
ACCEPT_BACKLOG = RESERVED_DESCRIPTORS // 4
#: The most connections open at once, whatever the open-file limit: each costs memory and a share of the event loop;
#: a server of one model answers one generation at a time, so thousands of clients are already a queue.
MAX_CONNECTIONS_CEILING = 4096


def default_max_connections() -> int:
    """The open connections the server keeps at most: the open-file limit (its soft limit) less
    `RESERVED_DESCRIPTORS`, at most `MAX_CONNECTIONS_CEILING`, at least 1 (896 at the common limit of 1024)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return MAX_CONNECTIONS_CEILING
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CEILING
    return max(1, min(MAX_CONNECTIONS_CEILING, soft - RESERVED_DESCRIPTORS))


#: Environment variable read for the API key when ``--api-key`` is not given (as vLLM reads VLLM_API_KEY).
API_KEY_ENV = "INTERNVLX_API_KEY"


@dataclass(frozen=True)
class RequestLimits:
    """Limits of a request's body. ``max_context`` (the model's context length, for ``max_tokens`` and the prompt),
    ``vocab_size`` (for ``logit_bias``) and ``longest_token_chars`` (the characters of the vocabulary's longest
    token, to refuse a text too long for the context before tokenizing it) and ``reserved_tags`` (the strings the
    model reserves for image input, refused in a message's text) come from the served model; None or (): not
    checked."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_json_values: int = MAX_JSON_VALUES
    max_context: int | None = None
    vocab_size: int | None = None
    longest_token_chars: int | None = None
    reserved_tags: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("max_request_bytes", "max_images_per_request", "max_json_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServerLimits:
    """What the server does at once, for all requests together (see the defaults' reasons above)."""

    max_concurrent_decodes: int = DEFAULT_MAX_CONCURRENT_DECODES
    small_decode_pixels: int = SMALL_DECODE_PIXELS
    prepare_threads: int = PREPARE_THREADS
    fetch_threads: int = FETCH_THREADS
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    generation_timeout: float = DEFAULT_GENERATION_TIMEOUT
    max_active_generations: int = DEFAULT_MAX_ACTIVE_GENERATIONS
    generation_slice: int = DEFAULT_GENERATION_SLICE

    def __post_init__(self):
        for name in ("max_concurrent_decodes", "small_decode_pixels", "prepare_threads", "fetch_threads",
                     "max_waiting_requests", "max_active_generations", "generation_slice"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.generation_timeout > 0:
            raise ValueError(f"generation_timeout must be more than 0 seconds, got {self.generation_timeout!r}")


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may hold (see the defaults' reasons above); ``max_connections``: None, from the open-file
    limit (`default_max_connections`)."""

    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_connections: int | None = None

    def __post_init__(self):
        if self.max_connections is None:
            object.__setattr__(self, "max_connections", default_max_connections())
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) or \
                self.max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer, got {self.max_connections!r}")
        for name in ("request_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)!r}")


__all__ = ["ACCEPT_BACKLOG", "API_KEY_ENV", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_GENERATION_SLICE",
           "DEFAULT_GENERATION_TIMEOUT", "DEFAULT_KEEP_ALIVE_TIMEOUT", "DEFAULT_MAX_ACTIVE_GENERATIONS",
           "DEFAULT_MAX_CONCURRENT_DECODES", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
           "DEFAULT_MAX_IMAGES_PER_REQUEST", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_REQUEST_IMAGE_BYTES",
           "DEFAULT_MAX_REQUEST_PIXELS", "DEFAULT_MAX_WAITING_REQUESTS", "DEFAULT_REQUEST_TIMEOUT", "FETCH_THREADS",
           "MAX_CONNECTIONS_CEILING", "MAX_JSON_VALUES", "PREPARE_THREADS", "RESERVED_DESCRIPTORS",
           "RETRY_AFTER_SECONDS", "SMALL_DECODE_PIXELS", "ConnectionLimits", "RequestLimits", "ServerLimits",
           "default_max_connections"]
