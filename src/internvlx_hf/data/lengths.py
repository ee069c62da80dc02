"""Looking at every row of an `InternVLXDataset` in parallel: the full check, and per-row lengths with their cache.

`check_rows` is what `InternVLXDataset(check=True)` and `internvlx data check` run: every row parsed, its images'
sizes read from the file headers (each image file once per process), its conversation rendered and tokenized to its
exact length after truncation. `row_lengths` gives the tokens per row that ``group_by_length`` needs: a row's own
``length`` field (InternVL's precomputed lengths) when it has one, else

- ``"exact"``: the full check's length (what the collator will build), or
- ``"approximate"``: InternVL-style estimates from the text alone: characters / 4, plus per image the tile budget
  (``max_tiles // images``, and the thumbnail) x ``image_seq_length``, capped at ``max_length``. No image header
  and no tokenizer is touched, but images smaller than the budget count as full ones, so length-grouped batches
  mix lengths more than with exact lengths (docs/fine-tuning-data.md gives the measured padding cost).

Rows are shared out in chunks to ``num_proc`` forked processes (all cores by default; where fork is not available,
one process). Lengths of a JSONL file (or a `datasets.Dataset`, by its fingerprint) are cached in ``cache_dir``
(``.npz``), under a key made of the file's path, size and modification time and of everything else the lengths
depend on (`cache_settings`): tokenizer (its ``tokenizer.json`` and the special tokens the template is rendered
with), chat template, image tokens per tile, the image processor's settings, ``max_length``, the dataset's
``root``, ``max_dynamic_patch`` and video frame sampling (``min_num_frame``, ``max_num_frame``,
``sampling_method``), the mode, and the tokenizers / transformers releases. Exact lengths also depend on the image
files: the cache file lists every image file it measured with its size and modification time, and a file that
changed, appeared or went away since then makes the lengths be computed again. A second run, a resumed run and every
other DDP rank read them back (`internvlx train` lets the main process build them first, as
`TrainingArguments.main_process_first` does); the full check (`check_rows`, `internvlx data check`) writes the exact
lengths it measured, so a later ``group_by_length`` run with the same settings reads them instead of computing them.
A cache file that cannot be read (cut short by a crash, emptied, overwritten) is computed again, with one warning.
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

CACHE_VERSION = 2  # 2: .npz with the measured image files' signatures; a key over every input (1: .npy)
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


def _image_file(image: Any) -> str | None:
    """The file an image is read from (a path, or an undecoded `datasets.Image` without bytes); None for images
    held in memory (a dataset's fingerprint covers those)."""
    if isinstance(image, dict) and not image.get("bytes"):
        image = image.get("path")
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def _file_signature(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file, (-1, -1) when it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _sizes(images: list, files: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """The images' sizes from their headers, recording each file's signature in ``files`` first (so that a file
    replaced after its header was read shows as changed, never the other way round)."""
    for image in images:
        path = _image_file(image)
        if path is not None and path not in files:
            files[path] = _file_signature(path)
    return [_image_size(image) for image in images]


@dataclass
class Measured:
    """Per global row: status code (see `status.REASONS`), tokens, images kept and their tiles; and what
    `row_lengths` gives for the row in ``"exact"`` mode (``row_lengths``, with the image files measured per source in
    ``files``), which is what the check writes into the lengths cache."""

    status: np.ndarray
    lengths: np.ndarray
    images: np.ndarray
    tiles: np.ndarray
    row_lengths: np.ndarray | None = None
    files: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    skipped: list[Counter] = field(default_factory=list)  # per source, reasons in the order first met
    examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)


def _own_length(row: Any) -> int | None:
    """A row's own ``length`` field (InternVL's precomputed token count), when it is a positive integer."""
    own = row.get("length") if isinstance(row, dict) else None
    return own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else None


def _check_chunk(bounds: tuple[int, int]):
    dataset = _WORKER
    start, stop = bounds
    count = stop - start
    status = np.zeros(count, dtype=np.uint8)
    lengths = np.zeros(count, dtype=np.int32)
    row_lengths = np.zeros(count, dtype=np.int32)
    images = np.zeros(count, dtype=np.int32)
    tiles = np.zeros(count, dtype=np.int32)
    files: dict[str, tuple[int, int]] = {}
    skipped, truncated = [], []
    for offset in range(count):
        source, where, raw = dataset.row(start + offset)
        try:
            row, sample = parse_row(source, where, raw, keep_leading_reply=dataset.encoder.keep_leading_reply)
        except SampleError as error:
            status[offset] = reason_code(error.reason)
            message = str(error) if str(error).startswith(where) else f"{where}: {error}"
            skipped.append((offset, error.reason, message))
            continue
        try:
            encoded, kept = dataset.measure(sample, _sizes(sample.images, files))  # a video row: its planned frames
        except SampleError as error:
            status[offset] = reason_code(error.reason)
            message = str(error) if str(error).startswith(where) else f"{where}: {error}"
            skipped.append((offset, error.reason, message))
            # What the lengths build gives such a row (it only places the row in a batch: it is skipped when it
            # loads), so that the cache written from the check equals the one the build writes.
            _, own, _, more = _length_chunk((start + offset, start + offset + 1, "exact"))
            row_lengths[offset] = own[0]
            files.update(more)
            continue
        status[offset] = TRUNCATED if encoded.truncated else USABLE
        lengths[offset], images[offset], tiles[offset] = encoded.length, len(kept), sum(kept)
        own = _own_length(row)
        row_lengths[offset] = own if own is not None else encoded.length
        if encoded.truncated and len(truncated) < 3:
            truncated.append(f"{where}: {encoded.num_labels} reply token(s) kept")
    return start, status, lengths, images, tiles, skipped, truncated, row_lengths, files


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
    files: dict[str, tuple[int, int]] = {}  # image files measured (exact mode): their signatures
    given = 0
    pending = []  # (offset, sample, tiles) whose exact length comes from one batched tokenization
    for offset in range(stop - start):
        source, where, raw = dataset.row(start + offset)
        try:
            row, sample = parse_row(source, where, raw, keep_leading_reply=dataset.encoder.keep_leading_reply)
            own = _own_length(row)
            if own is not None:  # InternVL's precomputed length
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
                sizes = _sizes(sample.images, files)
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
    return start, lengths, given, files


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


def _source_chunks(dataset) -> list[tuple[int, int]]:
    """Chunks of every source's rows, none spanning two sources (the cache and its file list are per source)."""
    offsets = dataset._row_offsets
    return [chunk for index in range(len(dataset.sources))
            for chunk in _chunks(int(offsets[index]), int(offsets[index + 1]))]


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
                        images=np.zeros(total, dtype=np.int32), tiles=np.zeros(total, dtype=np.int32),
                        row_lengths=np.zeros(total, dtype=np.int32))
    measured.skipped = [Counter() for _ in dataset.sources]
    measured.files = [{} for _ in dataset.sources]
    bar = tqdm(total=total, desc="checking rows", unit=" rows", disable=not progress, leave=False)
    # Skip warnings go through tqdm.write, on lines of their own above the bar instead of glued to its end.
    with logging_redirect_tqdm(), bar:
        for start, status, lengths, images, tiles, skipped, truncated, row_lengths, files in _map(
                dataset, _check_chunk, _source_chunks(dataset), num_proc or dataset.num_proc):
            stop = start + len(status)
            measured.status[start:stop], measured.lengths[start:stop] = status, lengths
            measured.images[start:stop], measured.tiles[start:stop] = images, tiles
            measured.row_lengths[start:stop] = row_lengths
            measured.files[dataset._locate(start)[0]].update(files)
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


def cache_settings(dataset, source_index: int, mode: str) -> dict[str, Any]:
    """Everything besides the rows themselves that the lengths of one source depend on: the key's ``settings``.

    (The image files are checked apart, from the list the cache file keeps: see `_read_cache`.)"""
    import tokenizers
    import transformers

    source = dataset.sources[source_index]
    encoder = dataset.encoder
    sampling = source.video_sampling
    return {
        "version": CACHE_VERSION, "mode": mode, "max_length": dataset.max_length,
        "template": encoder.template,
        # the tokenizer.json (vocabulary with the image tokens' ids, added tokens, normalizer, post-processor) and
        # the special tokens (bos_token, ...) the chat template is rendered with
        "tokenizer": hashlib.sha256(encoder.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "template_kwargs": encoder._template_kwargs,
        "image_seq_length": encoder.image_seq_length, "image_processor": dataset.processor.image_processor.to_dict(),
        "root": str(source.root), "max_dynamic_patch": source.max_dynamic_patch,
        "video_sampling": None if sampling is None else [sampling.min_frames, sampling.max_frames, sampling.method],
        "libraries": [tokenizers.__version__, transformers.__version__],  # how templates render and text tokenizes
    }


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
    settings = cache_settings(dataset, source_index, mode)
    text = json.dumps({"identity": identity, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(dataset, source_index: int, mode: str) -> Path | None:
    """The lengths cache file of one source (None when the cache is off or the source cannot be identified)."""
    cache_dir = dataset.cache_dir
    if cache_dir is False:
        return None
    key = cache_key(dataset, source_index, mode)
    if key is None:
        return None
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.sources[source_index].name)[:40]  # a Hub id's "/" makes no folder
    return folder / f"{stem}-{key}.npz"


def _write_cache(path: Path, lengths: np.ndarray, files: dict[str, tuple[int, int]]) -> None:
    from ..atomic import atomic_file

    names = sorted(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            # Paths joined by NUL (which no path holds) as bytes: no pickled object arrays in the cache.
            np.savez(handle, lengths=np.ascontiguousarray(lengths, dtype=np.int32),
                     image_files=np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), dtype=np.uint8),
                     image_stats=np.array([files[name] for name in names], dtype=np.int64).reshape(-1, 2))


class _Damaged(ValueError):
    pass


def _read_cache(path: Path, rows: int) -> tuple[np.ndarray | None, str]:
    """The cached lengths of ``path`` and "", or None and why they cannot be used: the file is damaged (a
    warning) or an image file it measured changed since (an info line)."""
    try:
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise _Damaged("not an .npz archive")
        with stored:
            lengths, names, stats = stored["lengths"], stored["image_files"], stored["image_stats"]
    except Exception as error:  # noqa: BLE001 - cut short, emptied, overwritten: whatever numpy/zipfile raise
        reason = str(error) if isinstance(error, _Damaged) else f"{type(error).__name__}: {error}"
        if path.is_file() and path.stat().st_size == 0:
            reason = "an empty file"
        logger.warning("lengths cache %s is damaged (%s); computing the lengths again", path,
                       " ".join(reason.split())[:200])
        return None, "damaged"
    files = bytes(names).decode("utf-8", "surrogateescape").split("\0") if len(names) else []
    problem = None
    if lengths.dtype != np.int32 or lengths.shape != (rows,):
        problem = f"{lengths.dtype} array of shape {lengths.shape}, not {rows} int32 lengths"
    elif len(lengths) and int(lengths.min()) < 0:
        problem = "negative lengths"
    elif names.dtype != np.uint8 or stats.dtype != np.int64 or stats.shape != (len(files), 2):
        problem = "its list of image files does not match their sizes and times"
    if problem is not None:
        logger.warning("lengths cache %s is damaged (%s); computing the lengths again", path, problem)
        return None, "damaged"
    for name, (size, mtime) in zip(files, stats.tolist()):
        if _file_signature(name) != (size, mtime):
            logger.info("lengths cache %s: image %s changed since the lengths were computed; computing them again",
                        path, name)
            return None, "images changed"
    return lengths, ""


def write_checked_lengths(dataset, measured: Measured) -> list[Path]:
    """Write the exact lengths the full check measured into the lengths cache (one file per source that has a
    key), where `row_lengths` with the same settings reads them. Returns the files written."""
    written = []
    for index in range(len(dataset.sources)):
        path = cache_path(dataset, index, "exact")
        if path is None:
            continue
        start, stop = int(dataset._row_offsets[index]), int(dataset._row_offsets[index + 1])
        try:
            _write_cache(path, measured.row_lengths[start:stop], measured.files[index])
        except OSError as error:  # a read-only cache folder costs the next run the lengths, not this check
            logger.warning("could not write the lengths cache %s (%s)", path, error)
            continue
        written.append(path)
    return written


def row_lengths(dataset, *, mode: str = "exact", progress: bool = True, num_proc: int | None = None) -> np.ndarray:
    """Tokens per global row of ``dataset`` (0 for a row found unusable), from the cache where it has them.

    Records what each source's lengths came from in ``dataset.lengths_origin`` (``"cache"``, ``"built"``,
    ``"built (not cached)"``) and the cache files in ``dataset.lengths_files``."""
    from tqdm.auto import tqdm

    total = int(dataset._row_offsets[-1])
    lengths = np.zeros(total, dtype=np.int32)
    dataset.lengths_origin, dataset.lengths_files = [], []
    for index, source in enumerate(dataset.sources):
        start, stop = int(dataset._row_offsets[index]), int(dataset._row_offsets[index + 1])
        path = cache_path(dataset, index, mode)
        if path is not None and path.is_file():
            cached, _ = _read_cache(path, stop - start)
            if cached is not None:
                lengths[start:stop] = cached
                dataset.lengths_origin.append("cache")
                dataset.lengths_files.append(str(path))
                logger.info("lengths of %s: read from %s", source.name, path)
                continue
        began = time.perf_counter()
        given = 0
        files: dict[str, tuple[int, int]] = {}
        with tqdm(total=stop - start, desc=f"lengths of {source.name}", unit=" rows", disable=not progress,
                  leave=False) as bar:
            tasks = [(low, high, mode) for low, high in _chunks(start, stop)]
            for low, part, count, measured in _map(dataset, _length_chunk, tasks, num_proc or dataset.num_proc):
                lengths[low:low + len(part)] = part
                given += count
                files.update(measured)
                bar.update(len(part))
        if path is not None:
            try:
                _write_cache(path, lengths[start:stop], files)
            except OSError as error:  # a read-only cache folder: this run has its lengths all the same
                logger.warning("could not write the lengths cache %s (%s); the next run computes them again", path,
                               error)
                path = None
        dataset.lengths_origin.append("built" if path is not None else "built (not cached)")
        dataset.lengths_files.append(str(path) if path is not None else None)
        logger.info("lengths of %s: %d rows (%d with their own length) in %.1f s%s", source.name, stop - start,
                    given, time.perf_counter() - began, f", cached in {path}" if path else "")
    return lengths


__all__ = ["CACHE_VERSION", "Measured", "cache_key", "cache_path", "cache_settings", "check_rows", "default_cache_dir",
           "row_lengths", "write_checked_lengths"]
