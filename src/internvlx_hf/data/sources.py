"""Where InternVL data comes from: meta JSON files, JSONL annotation files, rows in memory, `datasets.Dataset`s.

A meta JSON is InternVL's format::

    {"my_vqa": {"root": "images/", "annotation": "my_vqa.jsonl", "data_augment": false, "repeat_time": 1,
                "max_dynamic_patch": 6, "length": 1200}}

``repeat_time`` < 1 keeps the first ``int(n * repeat_time)`` samples, > 1 repeats them (a fractional rest takes the
first part once more); ``max_dynamic_patch`` is that dataset's tile budget (`images.apply_tile_precedence`); the
meta's ``length`` is informational (a row's own ``length`` is its token count, see `lengths`); ``metric`` is the
answer metric `internvlx eval` scores the dataset with (see `internvlx_hf.metrics`; training ignores it).
Relative paths are taken from the current directory, as InternVL's scripts do, or else from the meta file's folder.
A JSONL file alone is one dataset whose ``root`` is its folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metrics import get_metric
from .formats import Sample, SampleError, sample_from_row
from .videos import VideoSampling

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
    video_sampling: Any = None  # `videos.VideoSampling` of video rows (meta keys min/max_num_frame, sampling_method)


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
        try:
            sampling = VideoSampling(min_frames=entry.get("min_num_frame", 8),
                                     max_frames=entry.get("max_num_frame", 32),
                                     method=entry.get("sampling_method", "rand"))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        metric = entry.get("metric")
        if metric is not None:
            get_metric(metric, f"{where}: metric")
        annotation = _resolve(str(entry["annotation"]), path.parent)
        if not annotation.is_file():
            raise FileNotFoundError(f"{where}: annotation file {str(annotation)!r} not found")
        root = _resolve(str(entry.get("root", "")), path.parent) if entry.get("root") else annotation.parent
        if entry.get("data_augment"):
            logger.warning("%s: data_augment is ignored (InternVL's random JPEG degradation is not applied).", where)
        sources.append(DataSource(name=str(name), annotation=annotation, root=root, repeat_time=float(repeat),
                                  max_dynamic_patch=patches, metric=metric, video_sampling=sampling))
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


def undecoded(dataset: Any) -> Any:
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
        view = undecoded(rows) if not isinstance(rows, list) else rows
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
    sample = sample_from_row(row, root=source.root, source=where, max_tiles=source.max_dynamic_patch,
                             keep_leading_reply=keep_leading_reply)
    if sample.video is not None:
        sample.video_sampling = source.video_sampling
    return row, sample


__all__ = ["DataSource", "as_sources", "parse_row", "read_meta", "source_rows"]
