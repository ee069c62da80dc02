"""Looking at every row of an `InternVLXDataset` in parallel: the full check, and per-row lengths with their cache.

`check_rows` is what `InternVLXDataset(check=True)` and `internvlx data check` run: every row parsed, its images'
sizes read from the file headers (each image file once per process), its conversation rendered and tokenized to its
exact length after truncation. `row_lengths` gives the tokens per row that ``group_by_length`` needs: a row's own
``length`` field (InternVL's precomputed lengths) when it has one, else

- ``"exact"``: the full check's length (what the collator will build), or
- ``"approximate"``: InternVL-style estimates from the text alone: characters / 4, plus per image the tile budget
  (``max_tiles // images``, and the thumbnail) x ``image_seq_length``, capped at ``max_length``. No image header
  and no tokenizer is touched, but images smaller than the budget count as full ones, so length-grouped batches
  mix lengths more than with exact lengths (docs/fine-tuning.md gives the measured padding cost).

Rows are shared out in chunks to ``num_proc`` forked processes (all cores by default; where fork is not available,
one process). Lengths of a JSONL file (or a `datasets.Dataset`, by its fingerprint) are cached as ``.npy`` in
``cache_dir``, under a key made of the file's path, size and modification time and of everything the lengths depend
on: tokenizer, chat template, image tokens per tile, the image processor's settings, ``max_length``, the dataset's
``max_dynamic_patch`` and ``root``, and the mode. A second run, a resumed run and every other DDP rank read them
back (`internvlx train` lets the main process build them first, as `TrainingArguments.main_process_first` does).
Image files are not part of the key: replacing an image by one of another size keeps stale lengths until the cache
is cleared (lengths only steer batching; every row is still checked when it loads).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .formats import SampleError
from .images import image_size
from .sources import parse_row
from .videos import expand_video, planned_frames
from .status import TRUNCATED, USABLE, reason_code

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_CHUNK_ROWS = 1000
_WORKER: Any = None  # the dataset, inherited by forked pool processes


def default_cache_dir() -> Path:
    """``$INTERNVLX_CACHE/lengths``, else ``internvlx-lengths`` in the `datasets` cache (``HF_DATASETS_CACHE``)."""
    if os.environ.get("INTERNVLX_CACHE"):
        return Path(os.environ["INTERNVLX_CACHE"]) / "lengths"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "internvlx-lengths"


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1 << 16)
def _file_image_size(path: str) -> tuple[int, int]:
    return image_size(path)


def _image_size(image: Any) -> tuple[int, int]:
    return _file_image_size(image) if isinstance(image, str) else image_size(image)


@dataclass
class Measured:
    """Per global row: status code (see `status.REASONS`), tokens, images kept and their tiles."""

    status: np.ndarray
    lengths: np.ndarray
    images: np.ndarray
    tiles: np.ndarray
    skipped: list[Counter] = field(default_factory=list)  # per source, reasons in the order first met
    examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)


def _check_chunk(bounds: tuple[int, int]):
    dataset = _WORKER
    start, stop = bounds
    count = stop - start
    status = np.zeros(count, dtype=np.uint8)
    lengths = np.zeros(count, dtype=np.int32)
    images = np.zeros(count, dtype=np.int32)
    tiles = np.zeros(count, dtype=np.int32)
    skipped, truncated = [], []
    for offset in range(count):
        source, where, raw = dataset.row(start + offset)
        try:
            sample = parse_row(source, where, raw, keep_leading_reply=dataset.encoder.keep_leading_reply)[1]
            encoded, kept = dataset.measure(sample, [_image_size(image) for image in sample.images])
        except SampleError as error:
            status[offset] = reason_code(error.reason)
            message = str(error) if str(error).startswith(where) else f"{where}: {error}"
            skipped.append((offset, error.reason, message))
            continue
        status[offset] = TRUNCATED if encoded.truncated else USABLE
        lengths[offset], images[offset], tiles[offset] = encoded.length, len(kept), sum(kept)
        if encoded.truncated and len(truncated) < 3:
            truncated.append(f"{where}: {encoded.num_labels} reply token(s) kept")
    return start, status, lengths, images, tiles, skipped, truncated


def _approximate(dataset, sample) -> int:
    text = 0
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, str):
            text += len(content)
        else:
            text += sum(len(str(item.get("text", ""))) for item in content if isinstance(item, dict))
    length = math.ceil(text / 4) + 8 * len(sample.messages)
    if sample.images:
        per_image = dataset.budget.options(sample.max_tiles, len(sample.images))["max_tiles"]
        if per_image > 1 and getattr(dataset.processor.image_processor, "use_thumbnail", False):
            per_image += 1
        length += len(sample.images) * (per_image * dataset.encoder.image_seq_length + 2)
    return min(length, dataset.max_length) if dataset.max_length else length


def _length_chunk(task: tuple[int, int, str]):
    start, stop, mode = task
    dataset = _WORKER
    lengths = np.zeros(stop - start, dtype=np.int32)
    given = 0
    pending = []  # (offset, sample, tiles) whose exact length comes from one batched tokenization
    for offset in range(stop - start):
        source, where, raw = dataset.row(start + offset)
        try:
            row, sample = parse_row(source, where, raw, keep_leading_reply=dataset.encoder.keep_leading_reply)
            own = row.get("length")
            if isinstance(own, int) and not isinstance(own, bool) and own > 0:  # InternVL's precomputed length
                lengths[offset] = own
                given += 1
            elif sample.video is not None:  # measured with the dataset's largest frame count, one tile per frame
                planned = expand_video(sample, [None] * planned_frames(sample))
                if mode == "approximate":
                    lengths[offset] = _approximate(dataset, planned)
                else:
                    count = len(planned.images)
                    pending.append((offset, sample, dataset.budget.tiles([(1, 1)] * count, count), planned))
            elif mode == "approximate":
                lengths[offset] = _approximate(dataset, sample)
            else:
                sizes = [_image_size(image) for image in sample.images]
                pending.append((offset, sample, dataset.budget.tiles(sizes, sample.max_tiles), sample))
        except SampleError:
            lengths[offset] = 0  # skipped when it loads; its length only places it in a batch
    counts = _exact_lengths(dataset, [(offset, measured, tiles) for offset, _, tiles, measured in pending])
    for (offset, sample, tiles, _), count in zip(pending, counts):
        if dataset.max_length is not None and count > dataset.max_length:  # what truncation keeps, exactly
            try:
                count = dataset.measure(sample, None)[0].length
            except SampleError:
                count = 0
        lengths[offset] = count
    return start, lengths, given


def _exact_lengths(dataset, pending: list) -> list[int]:
    try:
        return dataset.encoder.lengths([(sample.messages, tiles) for _, sample, tiles in pending])
    except SampleError:  # one conversation cannot be counted: count them one by one
        counts = []
        for _, sample, tiles in pending:
            try:
                counts.extend(dataset.encoder.lengths([(sample.messages, tiles)]))
            except SampleError:
                counts.append(0)
        return counts


def _chunks(start: int, stop: int) -> list[tuple[int, int]]:
    return [(low, min(low + _CHUNK_ROWS, stop)) for low in range(start, stop, _CHUNK_ROWS)]


def _map(dataset, function: Callable, tasks: list, num_proc: int | None):
    """``function`` over ``tasks`` in order, in forked processes that inherit ``dataset``."""
    global _WORKER
    num_proc = min(num_proc or default_num_proc(), len(tasks))
    _WORKER = dataset
    _file_image_size.cache_clear()  # sizes are remembered for one pass over the rows only
    try:
        if num_proc <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            yield from map(function, tasks)
            return
        # Fast tokenizers disable their own threads in a forked child anyway; saying so up front avoids their warning.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            yield from pool.imap(function, tasks)
    finally:
        _WORKER = None


def check_rows(dataset, *, progress: bool = True, num_proc: int | None = None) -> Measured:
    """Every row of ``dataset`` measured (see the module docstring); skipped rows are logged with ``file:line``."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    total = int(dataset._row_offsets[-1])
    measured = Measured(status=np.zeros(total, dtype=np.uint8), lengths=np.zeros(total, dtype=np.int32),
                        images=np.zeros(total, dtype=np.int32), tiles=np.zeros(total, dtype=np.int32))
    measured.skipped = [Counter() for _ in dataset.sources]
    bar = tqdm(total=total, desc="checking rows", unit=" rows", disable=not progress, leave=False)
    # Skip warnings go through tqdm.write, on lines of their own above the bar instead of glued to its end.
    with logging_redirect_tqdm(), bar:
        for start, status, lengths, images, tiles, skipped, truncated in _map(
                dataset, _check_chunk, _chunks(0, total), num_proc or dataset.num_proc):
            stop = start + len(status)
            measured.status[start:stop], measured.lengths[start:stop] = status, lengths
            measured.images[start:stop], measured.tiles[start:stop] = images, tiles
            for offset, reason, message in skipped:
                source_index, _ = dataset._locate(start + offset)
                counts = measured.skipped[source_index]
                counts[reason] += 1
                if len(measured.examples) < 5:
                    measured.examples.append(message)
                logger.warning("skipping %s (%s; %d skipped in %s so far)", message, reason,
                               sum(counts.values()), dataset.sources[source_index].name)
            measured.truncated_examples.extend(truncated[: 3 - len(measured.truncated_examples)])
            bar.update(len(status))
    return measured


def cache_key(dataset, source_index: int, mode: str) -> str | None:
    """The lengths cache key of one source, or None when it cannot be identified (rows given as a list)."""
    source = dataset.sources[source_index]
    if source.annotation is not None:
        stat = os.stat(source.annotation)
        identity = {"file": str(Path(source.annotation).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        fingerprint = getattr(source.rows, "_fingerprint", None)
        if fingerprint is None:
            return None
        identity = {"datasets_fingerprint": fingerprint}
    encoder = dataset.encoder
    settings = {
        "version": CACHE_VERSION, "mode": mode, "max_length": dataset.max_length, "template": encoder.template,
        "tokenizer": hashlib.sha256(encoder.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "image_seq_length": encoder.image_seq_length, "image_processor": dataset.processor.image_processor.to_dict(),
        "max_dynamic_patch": source.max_dynamic_patch, "root": str(source.root), "keep": encoder.keep_leading_reply,
    }
    text = json.dumps({"identity": identity, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def row_lengths(dataset, *, mode: str = "exact", progress: bool = True, num_proc: int | None = None) -> np.ndarray:
    """Tokens per global row of ``dataset`` (0 for a row found unusable), from the cache where it has them.

    Records what each source's lengths came from in ``dataset.lengths_origin`` (``"cache"``, ``"built"``,
    ``"built (not cached)"``) and the cache files in ``dataset.lengths_files``."""
    from tqdm.auto import tqdm

    cache_dir = dataset.cache_dir
    folder = None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
    total = int(dataset._row_offsets[-1])
    lengths = np.zeros(total, dtype=np.int32)
    dataset.lengths_origin, dataset.lengths_files = [], []
    for index, source in enumerate(dataset.sources):
        start, stop = int(dataset._row_offsets[index]), int(dataset._row_offsets[index + 1])
        key = cache_key(dataset, index, mode) if folder is not None else None
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:40]  # a Hub id's "/" must not make a folder
        path = folder / f"{stem}-{key}.npy" if key else None
        if path is not None and path.is_file():
            cached = np.load(path)
            if len(cached) == stop - start:
                lengths[start:stop] = cached
                dataset.lengths_origin.append("cache")
                dataset.lengths_files.append(str(path))
                logger.info("lengths of %s: read from %s", source.name, path)
                continue
        began = time.perf_counter()
        given = 0
        with tqdm(total=stop - start, desc=f"lengths of {source.name}", unit=" rows", disable=not progress,
                  leave=False) as bar:
            tasks = [(low, high, mode) for low, high in _chunks(start, stop)]
            for low, part, count in _map(dataset, _length_chunk, tasks, num_proc or dataset.num_proc):
                lengths[low:low + len(part)] = part
                given += count
                bar.update(len(part))
        if path is not None:
            from ..atomic import atomic_file

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, lengths[start:stop])
        dataset.lengths_origin.append("built" if path is not None else "built (not cached)")
        dataset.lengths_files.append(str(path) if path is not None else None)
        logger.info("lengths of %s: %d rows (%d with their own length) in %.1f s%s", source.name, stop - start,
                    given, time.perf_counter() - began, f", cached in {path}" if path else "")
    return lengths


__all__ = ["CACHE_VERSION", "Measured", "cache_key", "check_rows", "default_cache_dir", "row_lengths"]
