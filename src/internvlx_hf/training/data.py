"""Training data: InternVL meta JSON / JSONL files, TRL-style rows or a `datasets.Dataset`, read lazily.

`InternVLXDataset` scans its sources once when it is built: every row is parsed, its images' sizes are read from
the file headers (no pixels are decoded), and the conversation is tokenized to its exact length with the tile
counts those sizes give under the checkpoint's RVTC settings. Unusable rows (bad JSON, missing or unreadable image,
`<image>` count != images, a system turn that is not the only first turn, no reply, no reply left within
``max_length``) are skipped with a warning that names the file and line, and counted per reason in `summary`;
samples cut to ``max_length`` (see `encoding.truncate`) are counted there too. Pixels are decoded only in
`__getitem__` (DataLoader workers); an image that fails there is skipped the same way and the next usable sample
takes its place, so an epoch never stops on a broken file and never trains on one.

A meta JSON is InternVL's format::

    {"my_vqa": {"root": "images/", "annotation": "my_vqa.jsonl", "data_augment": false, "repeat_time": 1,
                "max_dynamic_patch": 6, "length": 1200}}

``repeat_time`` < 1 keeps the first ``int(n * repeat_time)`` samples, > 1 repeats them (a fractional rest takes the
first part once more); ``max_dynamic_patch`` overrides the checkpoint's ``max_tiles`` for that dataset; ``length``
is informational; ``metric`` is the answer metric `internvlx eval` scores the dataset with (see
`internvlx_hf.evaluation.metrics`; training ignores it). Relative paths are taken from the current directory, as
InternVL's scripts do, or else from the meta file's folder. A JSONL file alone is one dataset whose ``root`` is its
folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..processing.image_processing_internvlx import _load_rgb_image
from .encoding import ConversationEncoder, EncodedConversation, truncate
from .formats import Sample, SampleError, sample_from_row

logger = logging.getLogger(__name__)

# Builder names of `datasets` that are file formats, not Hub dataset ids.
_GENERIC_BUILDERS = {"json", "csv", "parquet", "arrow", "text", "imagefolder", "generator", "pandas", "webdataset"}


@dataclass
class DataSource:
    """One dataset of a meta JSON (or one JSONL file / `datasets.Dataset` / list of rows)."""

    name: str
    annotation: Path | None = None  # JSONL file
    root: Path | None = None  # folder that relative image paths are relative to
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    rows: Any = None  # a datasets.Dataset or a list of dicts instead of a file
    hub_id: str | None = None  # where rows came from, when known
    metric: str | None = None  # the answer metric of `internvlx eval` (meta key "metric")


@dataclass
class DatasetStats:
    name: str
    files: list[str] = field(default_factory=list)
    rows: int = 0  # rows read (before repeat_time)
    samples: int = 0  # usable samples after repeat_time
    images: int = 0
    tiles: int = 0
    tokens: int = 0
    truncated: int = 0  # usable samples cut to max_length
    skipped: Counter = field(default_factory=Counter)


@dataclass
class DataSummary:
    """What the scan found: per dataset, and the first few skipped samples with their reason."""

    datasets: list[DatasetStats] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)
    max_length: int | None = None

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.datasets)

    @property
    def skipped(self) -> Counter:
        total = Counter()
        for stats in self.datasets:
            total.update(stats.skipped)
        return total

    @property
    def truncated(self) -> int:
        return sum(d.truncated for d in self.datasets)

    def __str__(self) -> str:
        header = (f"{'dataset':<24} {'samples':>8} {'images':>8} {'tiles':>8} {'tokens':>10} {'truncated':>9} "
                  f"{'skipped':>8}")
        lines = ["Training data", "  " + header]
        for d in self.datasets:
            lines.append(f"  {d.name[:24]:<24} {d.samples:>8,} {d.images:>8,} {d.tiles:>8,} {d.tokens:>10,} "
                         f"{d.truncated:>9,} {sum(d.skipped.values()):>8,}")
        if len(self.datasets) > 1:
            total = [sum(getattr(d, key) for d in self.datasets) for key in ("samples", "images", "tiles", "tokens")]
            lines.append(f"  {'total':<24} {total[0]:>8,} {total[1]:>8,} {total[2]:>8,} {total[3]:>10,} "
                         f"{self.truncated:>9,} {sum(self.skipped.values()):>8,}")
        if self.truncated:
            lines.append(f"  truncated: {self.truncated} sample(s) cut to max_length {self.max_length} (the head is "
                         "kept, with the replies that fit), e.g.")
            lines.extend(f"    {example}" for example in self.truncated_examples)
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common())
            lines.append(f"  skipped ({reasons}), e.g.")
            lines.extend(f"    {example}" for example in self.examples)
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"name": d.name, "files": d.files, "rows": d.rows, "samples": d.samples, "images": d.images,
                 "tiles": d.tiles, "tokens": d.tokens, "truncated": d.truncated, "skipped": dict(d.skipped)}
                for d in self.datasets]


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base / candidate


def read_meta(path: str | os.PathLike) -> list[DataSource]:
    """The datasets of an InternVL meta JSON, or the single dataset of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(path)!r} not found; give an InternVL meta JSON or a JSONL file.")
    if path.suffix == ".jsonl":
        return [DataSource(name=path.stem, annotation=path, root=path.parent)]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); a meta file maps dataset names to "
                         '{"root", "annotation", "repeat_time", ...}.') from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: a meta file is a JSON object mapping dataset names to "
                         '{"root", "annotation", "repeat_time", ...}.')
    sources = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise ValueError(f"{where} needs an 'annotation' (JSONL path); got {entry!r:.100}")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or repeat <= 0:
            raise ValueError(f"{where}: repeat_time must be a number > 0, got {repeat!r}")
        patches = entry.get("max_dynamic_patch")
        if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
            raise ValueError(f"{where}: max_dynamic_patch must be an integer >= 1, got {patches!r}")
        metric = entry.get("metric")
        if metric is not None:
            from ..evaluation.metrics import get_metric

            get_metric(metric, f"{where}: metric")
        annotation = _resolve(str(entry["annotation"]), path.parent)
        if not annotation.is_file():
            raise FileNotFoundError(f"{where}: annotation file {str(annotation)!r} not found")
        root = _resolve(str(entry.get("root", "")), path.parent) if entry.get("root") else annotation.parent
        if entry.get("data_augment"):
            logger.warning("%s: data_augment is ignored (InternVL's random JPEG degradation is not applied).", where)
        sources.append(DataSource(name=str(name), annotation=annotation, root=root, repeat_time=float(repeat),
                                  max_dynamic_patch=patches, metric=metric))
    return sources


def _hub_id(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) if info is not None else None
    if name and name not in _GENERIC_BUILDERS:
        return str(name)
    return None


def as_sources(data: Any) -> list[DataSource]:
    """Normalise what `InternVLXDataset` accepts into `DataSource`s (see its docstring)."""
    if isinstance(data, DataSource):
        return [data]
    if isinstance(data, (str, os.PathLike)):
        parts = [p.strip() for p in str(data).split(",") if p.strip()]
        return [source for part in parts for source in read_meta(part)]
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            hub_id = _hub_id(data)
            return [DataSource(name=hub_id or "dataset", rows=data, hub_id=hub_id)]
    except ImportError:  # datasets is a dependency; this only keeps the module importable without it
        pass
    if isinstance(data, Sequence) and data and all(isinstance(row, dict) for row in data):
        return [DataSource(name="rows", rows=list(data))]
    if isinstance(data, Sequence) and data:
        return [source for item in data for source in as_sources(item)]
    raise TypeError(
        "training data must be a meta JSON / JSONL path (or a comma-separated list), a datasets.Dataset, a list of "
        f"rows, or a list of those; got {type(data).__name__}"
    )


def _undecoded(dataset: Any) -> Any:
    """The dataset with image columns left as bytes/paths, so the scan reads headers instead of decoding."""
    import datasets

    for column in ("images", "image"):
        feature = dataset.features.get(column)
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):
            dataset = dataset.cast_column(column, type(feature)(datasets.Image(decode=False)))
    return dataset


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image from its header; raises `SampleError` if it is missing or unreadable."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):  # an undecoded datasets.Image
        if image.get("bytes"):
            image = io.BytesIO(image["bytes"])
        elif image.get("path"):
            image = image["path"]
    if isinstance(image, (str, os.PathLike)) and os.path.isdir(image):
        raise SampleError("image is a folder", f"image {os.fspath(image)!r} is a folder, not an image file; give "
                                               "the path of the image file")
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise SampleError("image not found", f"image {os.fspath(image)!r} not found")
    if isinstance(image, (str, os.PathLike, io.BytesIO)):
        try:
            with Image.open(image) as opened:
                return opened.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            name = os.fspath(image) if not isinstance(image, io.BytesIO) else "<bytes>"
            raise SampleError("unreadable image", f"image {name!r} is not a readable image ({error})") from None
    if hasattr(image, "shape"):  # uint8 array / tensor: the processor takes HWC or CHW
        shape = tuple(image.shape)
        height, width = (shape[1], shape[2]) if len(shape) == 3 and shape[0] in (1, 3, 4) else shape[:2]
        return int(width), int(height)
    raise SampleError("unreadable image", f"unsupported image of type {type(image).__name__}")


def load_image(image: Any, index: int = 0) -> Image.Image:
    """Decode an image for training (file path, PIL image, array, or undecoded datasets.Image dict) as RGB."""
    if isinstance(image, dict):
        if image.get("bytes"):
            image = Image.open(io.BytesIO(image["bytes"]))
        else:
            image = image.get("path")
    return _load_rgb_image(image, index)


def source_rows(source: DataSource):
    """``(where, raw)`` for every row of ``source``: ``("file.jsonl:12", line)`` for a JSONL file (blank lines
    skipped), ``("name[3]", (3, row))`` for rows in memory."""
    if source.annotation is not None:
        with open(source.annotation, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{source.annotation}:{number}", line
    else:
        rows = source.rows
        view = _undecoded(rows) if not isinstance(rows, list) else rows
        for number in range(len(view)):
            yield f"{source.name}[{number}]", (number, view[number])


def parse_row(source: DataSource, where: str, raw: Any, *,
              keep_leading_reply: bool = False) -> tuple[dict[str, Any], Sample]:
    """The row and its `Sample` from what `source_rows` gave; raises `SampleError` (invalid JSON, bad format).

    `keep_leading_reply`: see `sample_from_row` (the encoder's template decides it).
    """
    if isinstance(raw, str):
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise SampleError("invalid JSON", f"{where}: invalid JSON ({error})") from None
    else:
        row = raw[1]
    return row, sample_from_row(row, root=source.root, source=where, max_tiles=source.max_dynamic_patch,
                                keep_leading_reply=keep_leading_reply)


class TileBudget:
    """Tiles per image under the processor's RVTC settings (``tiling``, ``max_tiles``), with InternVL's rules.

    A sample's budget is its dataset's ``max_dynamic_patch`` or else the processor's ``max_tiles``; a sample with N
    images gives each image ``max(1, budget // N)`` tiles, as InternVL's training does. The processor's settings are
    the single source: the dataset's length estimates and the collator's tiling always agree, and the saved
    processor tiles at inference as training did.
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def options(self, sample_max_tiles: int | None, num_images: int) -> dict[str, Any]:
        budget = sample_max_tiles or self.image_processor.max_tiles
        max_tiles = max(1, budget // max(1, num_images))
        return {"max_tiles": max_tiles, "min_tiles": min(self.image_processor.min_tiles, max_tiles)}

    def tiles(self, sizes: list[tuple[int, int]], sample_max_tiles: int | None) -> list[int]:
        options = self.options(sample_max_tiles, len(sizes))
        return [self.image_processor.get_number_of_image_patches(h, w, options) for w, h in sizes]


class InternVLXDataset(torch.utils.data.Dataset):
    """Training samples for `InternVLXDataCollator`, read lazily; ``lengths`` feed ``group_by_length``.

    Args:
        data: an InternVL meta JSON or JSONL path (or a comma-separated list of them), a `datasets.Dataset` or a
            list of row dicts (InternVL ``conversations`` or TRL ``messages`` + ``images``), or a list mixing these.
        processor: the checkpoint's `InternVLXProcessor` (tokenizer, chat template, image processor settings).
        max_length: the collator's ``max_length``; longer samples keep their head (see `encoding.truncate`), or are
            skipped when no reply token is left in it.
        progress: show a progress bar while scanning.

    Images are tiled with the processor's RVTC settings (``processor.image_processor.tiling`` / ``max_tiles``; a
    dataset's ``max_dynamic_patch`` wins for its samples).

    Items are rows ``{"messages", "images" (decoded RGB PIL images), "max_tiles", "source"}``.
    """

    def __init__(self, data: Any, processor, *, max_length: int | None = None, progress: bool = True):
        self.processor = processor
        self.max_length = max_length
        self.encoder = ConversationEncoder(processor)
        self.budget = TileBudget(processor.image_processor)
        self.sources = as_sources(data)
        self.summary = DataSummary(max_length=max_length)
        self._entries: list[tuple[int, Any, str]] = []  # (source index, JSONL line or row index, where)
        self.lengths: list[int] = []
        self._bad: set[int] = set()
        self.skipped_at_load = Counter()
        for index, source in enumerate(self.sources):
            self._scan(index, source, progress)
        if not self._entries:
            raise ValueError(f"no usable training samples in {self._describe()}:\n{self.summary}")

    # --- scanning -----------------------------------------------------------------------------------------------

    def _describe(self) -> str:
        return ", ".join(str(s.annotation) if s.annotation else s.name for s in self.sources)

    def _skip(self, stats: DatasetStats, where: str, error: SampleError) -> None:
        stats.skipped[error.reason] += 1
        message = str(error) if str(error).startswith(where) else f"{where}: {error}"
        if len(self.summary.examples) < 5:
            self.summary.examples.append(message)
        logger.warning("skipping %s (%s; %d skipped in %s so far)", message, error.reason,
                       sum(stats.skipped.values()), stats.name)

    def _rows(self, source: DataSource):
        return source_rows(source)

    def _parse(self, source: DataSource, where: str, raw: Any) -> Sample:
        return parse_row(source, where, raw, keep_leading_reply=self.encoder.keep_leading_reply)[1]

    def _measure(self, sample: Sample) -> tuple[EncodedConversation, list[int]]:
        """The sample's encoding after truncation (no ids), and the tiles of the images it keeps."""
        sizes = [image_size(image) for image in sample.images]
        tiles = self.budget.tiles(sizes, sample.max_tiles)
        encoded = self.encoder.encode(sample.messages, tiles, expand=False, source=sample.source)
        encoded = truncate(encoded, self.max_length, sample.source)
        return encoded, tiles[: encoded.num_images]

    def _scan(self, source_index: int, source: DataSource, progress: bool) -> None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Skip warnings go through tqdm.write, on lines of their own above the bar instead of glued to its end.
        with logging_redirect_tqdm():
            self._scan_rows(source_index, source, progress)

    def _scan_rows(self, source_index: int, source: DataSource, progress: bool) -> None:
        from tqdm.auto import tqdm

        stats = DatasetStats(name=source.name, files=[str(source.annotation)] if source.annotation else [])
        self.summary.datasets.append(stats)
        kept = []
        rows = self._rows(source)
        if source.rows is not None:
            total = len(source.rows)
        elif not progress:
            total = None
        else:  # a quick pass over the file so that the bar shows progress
            with open(source.annotation, "rb") as handle:
                total = sum(1 for line in handle if line.strip())
        for where, raw in tqdm(rows, desc=f"scanning {source.name}", total=total, disable=not progress,
                               unit=" rows", leave=False):
            stats.rows += 1
            try:
                sample = self._parse(source, where, raw)
                encoded, tiles = self._measure(sample)
            except SampleError as error:
                self._skip(stats, where, error)
                continue
            if encoded.truncated and len(self.summary.truncated_examples) < 3:
                self.summary.truncated_examples.append(f"{where}: {encoded.num_labels} reply token(s) kept")
            kept.append(((source_index, raw if isinstance(raw, str) else raw[0], where), encoded.length, len(tiles),
                         sum(tiles), encoded.truncated))
        count = int(len(kept) * source.repeat_time)
        repeated = [kept[i % len(kept)] for i in range(count)] if kept else []
        for entry, length, images, tiles, truncated in repeated:
            self._entries.append(entry)
            self.lengths.append(length)
            stats.images += images
            stats.tiles += tiles
            stats.tokens += length
            stats.truncated += truncated
        stats.samples = len(repeated)

    # --- items --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def _sample(self, index: int) -> Sample:
        source_index, key, where = self._entries[index]
        source = self.sources[source_index]
        row = json.loads(key) if isinstance(key, str) else source.rows[key]
        return sample_from_row(row, root=source.root, source=where, max_tiles=source.max_dynamic_patch,
                               keep_leading_reply=self.encoder.keep_leading_reply)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self._entries)):
            current = (index + attempt) % len(self._entries)
            if current in self._bad:
                continue
            sample = self._sample(current)
            try:
                sample.images = [load_image(image, i) for i, image in enumerate(sample.images)]
            except (ValueError, OSError, TypeError) as error:
                self._bad.add(current)
                self.skipped_at_load["undecodable image"] += 1
                logger.warning("skipping %s: %s (undecodable image; %d skipped while loading so far)",
                               sample.source, error, sum(self.skipped_at_load.values()))
                continue
            return sample.as_row()
        raise ValueError(f"none of the {len(self._entries)} training samples could be loaded; see the warnings")


__all__ = ["DataSource", "DataSummary", "DatasetStats", "InternVLXDataset", "TileBudget", "as_sources",
           "image_size", "load_image", "parse_row", "read_meta", "source_rows"]
