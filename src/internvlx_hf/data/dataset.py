"""`InternVLXDataset`: InternVL meta JSON / JSONL files, TRL-style rows or a `datasets.Dataset`, read lazily.

Building the dataset reads no row: a JSONL file is indexed by the byte offsets of its lines (`index.JsonlIndex`),
rows in memory by their position, and ``repeat_time`` maps sample indices onto rows. A row is parsed, its images
decoded and its conversation encoded when ``__getitem__`` loads it (in a DataLoader worker): an unusable row (bad
JSON, missing or unreadable image, `<image>` count != images, a misplaced system turn, no reply, no reply left within
``max_length``) is skipped with a warning that names its ``file:line``, the next sample takes its place, and the
row is counted per reason in a per-row status array in shared memory, which every worker writes and `load_report`
reads (`internvlx train` adds the counts of all processes to its summary and provenance).

``check=True`` looks at every row first instead, as `internvlx data check` does: rows are parsed, image sizes read
from file headers (no pixels decoded) and conversations tokenized to their exact lengths, in parallel; unusable rows
are left out before training and `summary` has the full table (samples, images, tiles, tokens, truncated and
skipped rows per reason).

Lengths (``lengths``, for ``group_by_length``) are computed on first use: a row's own ``length`` (InternVL's field)
when it has one, else the exact length (``lengths="exact"``, parallel, cached on disk keyed by the file's identity
and the processor's settings, see `lengths`) or InternVL-style estimates (``lengths="approximate"``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import torch

from .encoding import ConversationEncoder, EncodedConversation, truncate
from .formats import ChatRow, Sample, SampleError
from .images import TileBudget, image_size, load_image
from .videos import expand_video, planned_frames, read_sample_frames
from .index import JsonlIndex
from .sources import DataSource, undecoded, as_sources, parse_row
from .status import REASONS, TRUNCATED, UNSEEN, USABLE, reason_code, status_counts
from .summary import DatasetStats, DataSummary

logger = logging.getLogger(__name__)


class InternVLXDataset(torch.utils.data.Dataset):
    """Training samples for `InternVLXDataCollator`; ``lengths`` feed ``group_by_length``.

    Args:
        data: an InternVL meta JSON or JSONL path (or a comma-separated list of them), a `datasets.Dataset` or a
            list of row dicts (InternVL ``conversations`` or TRL ``messages`` + ``images``), a list mixing these, or
            `DataSource`s.
        processor: the checkpoint's `InternVLXProcessor` (tokenizer, chat template, image processor settings).
        max_length: the collator's ``max_length``; longer samples keep their head (see `encoding.truncate`), or are
            skipped when no reply token is left in it.
        progress: show progress bars (the full check, the lengths build).
        check: look at every row now (parallel), leave the unusable ones out and fill `summary`'s full table;
            default False: rows are checked as they load.
        lengths: ``"exact"`` (a row's ``length`` field, else computed exactly once and cached) or
            ``"approximate"`` (a row's ``length`` field, else text characters / 4 + the images' tile budget).
        num_proc: processes for the full check and the lengths build (default: all cores).
        cache_dir: folder of the lengths cache (default: ``$INTERNVLX_CACHE`` or the `datasets` cache, see
            `lengths.default_cache_dir`); ``False`` turns the cache off. ``check=True`` writes the exact lengths it
            measured there (``lengths_written``), for a later ``group_by_length`` run with the same settings.

    Images are tiled with the processor's RVTC settings (``processor.image_processor.tiling`` / ``max_tiles``; a
    dataset's ``max_dynamic_patch`` wins for its samples).

    Items are rows ``{"messages", "images" (decoded RGB PIL images), "max_tiles", "source"}``, as a read-only
    mapping (`formats.ChatRow`, not a `dict`: a plain `transformers.Trainer` with ``remove_unused_columns=True``
    then hands them to the collator whole).
    """

    def __init__(self, data: Any, processor, *, max_length: int | None = None, progress: bool = True,
                 check: bool = False, lengths: str = "exact", num_proc: int | None = None,
                 cache_dir: str | os.PathLike | bool | None = None):
        if lengths not in ("exact", "approximate"):
            raise ValueError(f"lengths must be 'exact' or 'approximate', got {lengths!r}")
        self.processor = processor
        self.max_length = max_length
        self.encoder = ConversationEncoder(processor)
        self.budget = TileBudget(processor.image_processor)
        self.sources = as_sources(data)
        self.length_mode = lengths
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.progress = progress
        self.checked = check
        self.summary = DataSummary(max_length=max_length, checked=check)
        self._readers = [self._reader(source) for source in self.sources]
        sizes = [len(reader) for reader in self._readers]
        self._row_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._status = torch.zeros(int(self._row_offsets[-1]), dtype=torch.uint8)
        if len(self._status):
            self._status.share_memory_()  # written by every DataLoader worker, read by `load_report`
        self._row_lengths: np.ndarray | None = None
        self._lengths: list[int] | None = None
        # Per source, where its lengths came from ("built", "cache", ...) and the cache file (see `lengths`).
        self.lengths_origin: list[str] | None = None
        self.lengths_files: list[str | None] | None = None
        # The lengths cache files the full check wrote (exact lengths, read by a later `lengths` with these settings).
        self.lengths_written: list[str] = []
        if check:
            from .lengths import check_rows, write_checked_lengths

            measured = check_rows(self, progress=progress)
            self.measured = measured  # per-row results of the full check
            self._row_lengths = measured.row_lengths  # as `lengths` would give them (a row's own length first)
            if cache_dir is not False:
                self.lengths_written = [str(path) for path in write_checked_lengths(self, measured)]
            samples = self._build_samples(measured)
        else:
            samples = self._build_samples(None)
        self._samples = samples
        if not len(self._samples):
            raise ValueError(self._nothing_usable())

    # --- rows ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _reader(source: DataSource):
        if source.annotation is not None:
            return JsonlIndex(source.annotation)
        return undecoded(source.rows) if not isinstance(source.rows, list) else source.rows

    def _locate(self, row: int) -> tuple[int, int]:
        source_index = int(np.searchsorted(self._row_offsets, row, side="right")) - 1
        return source_index, row - int(self._row_offsets[source_index])

    def row(self, row: int) -> tuple[DataSource, str, Any]:
        """``(source, where, raw)`` of global row ``row`` (rows of all sources numbered one after the other), as
        `sources.source_rows` gives them: ``("file.jsonl:12", line)`` or ``("name[3]", (3, row))``."""
        source_index, local = self._locate(row)
        source, reader = self.sources[source_index], self._readers[source_index]
        if isinstance(reader, JsonlIndex):
            return source, reader.where(local), reader.read(local)
        return source, f"{source.name}[{local}]", (local, reader[local])

    def parse(self, row: int) -> Sample:
        source, where, raw = self.row(row)
        return parse_row(source, where, raw, keep_leading_reply=self.encoder.keep_leading_reply)[1]

    def measure(self, sample: Sample, sizes: list[tuple[int, int]] | None = None) \
            -> tuple[EncodedConversation, list[int]]:
        """The sample's encoding after truncation (no ids), and the tiles of the images it keeps. A video sample is
        measured with its dataset's largest frame count (`videos.planned_frames`), one tile per frame."""
        if sample.video is not None:
            count = planned_frames(sample)
            sample, sizes = expand_video(sample, [None] * count), [(1, 1)] * count
        if sizes is None:
            sizes = [image_size(image) for image in sample.images]
        tiles = self.budget.tiles(sizes, sample.max_tiles)
        encoded = self.encoder.encode(sample.messages, tiles, expand=False, source=sample.source)
        encoded = truncate(encoded, self.max_length, sample.source)
        return encoded, tiles[: encoded.num_images]

    def _build_samples(self, measured) -> np.ndarray:
        """Global row ids of the samples, ``repeat_time`` applied (only usable rows when ``measured``), and the
        summary's per-dataset counts."""
        parts = []
        for index, source in enumerate(self.sources):
            first, last = int(self._row_offsets[index]), int(self._row_offsets[index + 1])
            stats = DatasetStats(name=source.name, files=[str(source.annotation)] if source.annotation else [],
                                 rows=last - first)
            self.summary.datasets.append(stats)
            if measured is None:
                kept = np.arange(first, last, dtype=np.int64)
            else:
                kept = first + np.flatnonzero(measured.status[first:last] <= TRUNCATED).astype(np.int64)
            count = int(len(kept) * source.repeat_time)
            rows = kept[np.arange(count) % len(kept)] if len(kept) else kept[:0]
            stats.samples = len(rows)
            if measured is not None:
                stats.skipped = measured.skipped[index]
                stats.images = int(measured.images[rows].sum())
                stats.tiles = int(measured.tiles[rows].sum())
                stats.tokens = int(measured.lengths[rows].sum())
                stats.truncated = int((measured.status[rows] == TRUNCATED).sum())
            parts.append(rows)
        if measured is not None:
            self.summary.examples = measured.examples
            self.summary.truncated_examples = measured.truncated_examples
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _describe(self) -> str:
        return ", ".join(str(s.annotation) if s.annotation else s.name for s in self.sources)

    def _nothing_usable(self) -> str:
        rows = int(self._row_offsets[-1])
        if not rows:
            return f"no usable training samples in {self._describe()}: it has no rows"
        skipped = self.summary.skipped
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in skipped.most_common())
        return (f"no usable training samples in {self._describe()}: all {rows:,} row(s) were skipped ({reasons}); "
                "the warnings above name each row's file:line and the fix")

    # --- lengths ------------------------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample (image tokens included), computed on first use (see the module docstring)."""
        if self._lengths is None:
            if self._row_lengths is None:
                from .lengths import row_lengths

                self._row_lengths = row_lengths(self, mode=self.length_mode, progress=self.progress)
            self._lengths = self._row_lengths[self._samples].tolist()
        return self._lengths

    # --- items --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._samples)

    def _skip(self, row: int, where: str, error: Exception, reason: str) -> None:
        self._status[row] = reason_code(reason)
        message = str(error) if str(error).startswith(where) else f"{where}: {error}"
        skipped = int((self._status >= 3).sum())
        logger.warning("skipping %s (%s; %d skipped while loading so far)", message, reason, skipped)

    def _load(self, row: int) -> ChatRow | None:
        status = int(self._status[row])
        if status >= 3:
            return None
        source, where, raw = self.row(row)
        try:
            sample = parse_row(source, where, raw, keep_leading_reply=self.encoder.keep_leading_reply)[1]
        except SampleError as error:
            self._skip(row, where, error, error.reason)
            return None
        try:
            if sample.video is not None:  # frames drawn anew at every load (`rand`), as InternVL's training does
                sample = expand_video(sample, read_sample_frames(sample))
            if status == UNSEEN and not self.checked:  # the reasons the full check gives (missing, folder, ...)
                for image in sample.images:
                    image_size(image)
            sample.images = [load_image(image, i) for i, image in enumerate(sample.images)]
        except SampleError as error:
            self._skip(row, where, error, error.reason)
            return None
        except (ValueError, OSError, TypeError) as error:
            self._skip(row, where, error, "undecodable image")
            return None
        if status == UNSEEN:
            if self.checked:
                self._status[row] = USABLE
            else:
                try:
                    encoded, _ = self.measure(sample, [image.size for image in sample.images])
                except SampleError as error:
                    self._skip(row, where, error, error.reason)
                    return None
                self._status[row] = TRUNCATED if encoded.truncated else USABLE
        return sample.as_row()

    def __getitem__(self, index: int) -> ChatRow:
        for attempt in range(len(self._samples)):
            item = self._load(int(self._samples[(index + attempt) % len(self._samples)]))
            if item is not None:
                return item
        raise ValueError(self._nothing_usable_at_load())

    def _nothing_usable_at_load(self) -> str:
        _, _, skipped = status_counts(self._status.numpy())
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in skipped.most_common())
        return (f"no usable training samples in {self._describe()}: every one of the {len(self._samples):,} "
                f"sample(s) was skipped while loading ({reasons}); the warnings name each row's file:line and the "
                "fix (`internvlx data check` lists them all)")

    # --- what loading found -------------------------------------------------------------------------------------

    @property
    def skipped_at_load(self) -> Counter:
        """Rows skipped while loading, per reason (this process and its DataLoader workers)."""
        return status_counts(self._status.numpy())[2]

    def load_report(self, status: np.ndarray | None = None) -> dict[str, Any]:
        """What loading found so far: rows loaded, truncated, skipped per reason (of ``status``, e.g. the status
        arrays of all DDP ranks combined by an elementwise max; default: this process's)."""
        loaded, truncated, skipped = status_counts(self._status.numpy() if status is None else status)
        return {"rows": int(self._row_offsets[-1]), "rows_read": loaded, "truncated": truncated,
                "skipped": dict(skipped.most_common())}


__all__ = ["REASONS", "InternVLXDataset", "reason_code", "status_counts"]
