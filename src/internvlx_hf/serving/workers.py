"""`ServingWork`: the server's worker threads and what it does at once, shared by every request.

Everything a request costs before generation runs here, off the event loop, so that the loop keeps answering
(``/health`` included) however busy the server is:

- ``prepare``: CPU work (parsing a body's JSON, decoding base64, reading image headers, decoding and tiling images,
  rendering the chat template and tokenizing), on `ServerLimits.prepare_threads` threads;
- ``fetch``: waiting work (downloading URLs, reading local files), on `ServerLimits.fetch_threads` threads of its own,
  so that slow hosts, each held at most --media-fetch-timeout, cannot starve the CPU work;
- ``decode_slot(pixels)``: held by a request while its images are decoded and tiled, if they have more than
  `ServerLimits.small_decode_pixels` pixels together; at most `ServerLimits.max_concurrent_decodes` requests hold one,
  which bounds the decoded pixels in memory (each request's are bounded by --max-request-pixels) and keeps prepare
  threads free for everything else: small images never queue behind large ones.

Generation itself runs on threads of its own, one per generation the queue admits, which take turns on the model
(`slicing.SlicedGeneration`, `slicing.RoundRobinLock`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from .limits import ServerLimits


class ServingWork:
    """The thread pools and the decode slots of one server (``limits``: how many of each)."""

    def __init__(self, limits: ServerLimits | None = None):
        self.limits = limits or ServerLimits()
        self._prepare = ThreadPoolExecutor(self.limits.prepare_threads, thread_name_prefix="internvlx-prepare")
        self._fetch = ThreadPoolExecutor(self.limits.fetch_threads, thread_name_prefix="internvlx-fetch")
        self._decodes = asyncio.Semaphore(self.limits.max_concurrent_decodes)  # bound to a loop on first use
        self.decoding = 0  # requests holding a decode slot now

    async def prepare(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on a prepare thread (CPU work), awaited."""
        return await _run(self._prepare, function, *args, **kwargs)

    async def fetch(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on a fetch thread (waiting work), awaited."""
        return await _run(self._fetch, function, *args, **kwargs)

    @asynccontextmanager
    async def decode_slot(self, pixels: int):
        """Held while a request's images (``pixels`` together) are decoded and tiled: beyond `small_decode_pixels`,
        requests beyond `max_concurrent_decodes` wait. Yields whether a slot was held (the images were large)."""
        if pixels <= self.limits.small_decode_pixels:
            yield False
            return
        async with self._decodes:
            self.decoding += 1
            try:
                yield True
            finally:
                self.decoding -= 1

    def shutdown(self) -> None:
        self._prepare.shutdown(wait=False, cancel_futures=True)
        self._fetch.shutdown(wait=False, cancel_futures=True)


async def _run(executor: ThreadPoolExecutor, function, *args, **kwargs):
    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


__all__ = ["ServingWork"]
