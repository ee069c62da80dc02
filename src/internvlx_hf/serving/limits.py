"""Every bound of `internvlx serve`, with the reason for its default.

Plain Python (no FastAPI, no Pillow), so that `internvlx serve --help` shows the defaults without importing anything
heavy. Three kinds of bound, as vLLM and `transformers serve` bound work:

- per image (`MediaPolicy`): its encoded bytes and its pixels, read from its header before decoding;
- per request (`RequestLimits`, `MediaPolicy`): the body's bytes and JSON values, the images, their bytes and their
  pixels together, the text (at least one token per longest-token's characters must fit the model's context);
- per server (`ServerLimits`): how many requests decode and tile their images at once, and the worker threads that
  fetch, read, parse, decode and tokenize, all off the event loop so that ``/health`` answers while they work.
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
#: Environment variable read for the API key when ``--api-key`` is not given (as vLLM reads VLLM_API_KEY).
API_KEY_ENV = "INTERNVLX_API_KEY"


@dataclass(frozen=True)
class RequestLimits:
    """Limits of a request's body. ``max_context`` (the model's context length, for ``max_tokens`` and the prompt),
    ``vocab_size`` (for ``logit_bias``) and ``longest_token_chars`` (the characters of the vocabulary's longest
    token, to refuse a text too long for the context before tokenizing it) come from the served model; None: not
    checked."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_json_values: int = MAX_JSON_VALUES
    max_context: int | None = None
    vocab_size: int | None = None
    longest_token_chars: int | None = None

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

    def __post_init__(self):
        for name in ("max_concurrent_decodes", "small_decode_pixels", "prepare_threads", "fetch_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["API_KEY_ENV", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_MAX_CONCURRENT_DECODES", "DEFAULT_MAX_IMAGE_BYTES",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_IMAGES_PER_REQUEST", "DEFAULT_MAX_REQUEST_BYTES",
           "DEFAULT_MAX_REQUEST_IMAGE_BYTES", "DEFAULT_MAX_REQUEST_PIXELS", "FETCH_THREADS", "MAX_JSON_VALUES",
           "PREPARE_THREADS", "SMALL_DECODE_PIXELS", "RequestLimits", "ServerLimits"]
