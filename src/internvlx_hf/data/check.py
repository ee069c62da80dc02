"""`internvlx data check` / `data stats`: every row of a mix looked at before any GPU time is paid for.

`check_data` reads the data with the checkpoint's processor as `internvlx train` would (same tile precedence, same
``max_length``), runs the full check in parallel (`lengths.check_rows`) and returns the summary table that
`internvlx train --check_data` prints, plus the distribution of tokens per sample and tiles per image.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .dataset import TRUNCATED, InternVLXDataset
from .images import apply_tile_precedence
from .sources import as_sources


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {}
    points = {"min": 0, "p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {name: int(np.percentile(values, q, method="nearest")) for name, q in points.items()}


def check_data(data: Any, processor, *, max_length: int | None = None, max_tiles: int | None = None,
               num_proc: int | None = None, progress: bool = True,
               cache_dir: str | os.PathLike | bool | None = None) -> tuple[InternVLXDataset, dict[str, Any]]:
    """The checked dataset and a JSON-ready report: ``tiles`` (the precedence line), ``datasets`` (the summary
    table's rows), ``samples``, ``skipped`` per reason, ``truncated``, ``examples``, ``truncated_examples``,
    ``lengths_cache`` (the lengths cache files written, see `InternVLXDataset`'s ``cache_dir``), and ``stats``
    (percentiles of tokens per sample and tiles per image, over the usable rows, before ``repeat_time``)."""
    sources = as_sources(data)
    tiles_line = apply_tile_precedence(sources, processor.image_processor, max_tiles, saves=False)
    dataset = InternVLXDataset(sources, processor, max_length=max_length, progress=progress, check=True,
                               num_proc=num_proc, cache_dir=cache_dir)
    measured = dataset.measured
    usable = measured.status <= TRUNCATED
    with_images = usable & (measured.images > 0)
    per_image = measured.tiles[with_images] / measured.images[with_images]
    summary = dataset.summary
    report = {
        "tiles": tiles_line,
        "max_length": max_length,
        "datasets": summary.to_dict(),
        "rows": sum(d.rows for d in summary.datasets),
        "samples": summary.samples,
        "skipped": dict(summary.skipped.most_common()),
        "truncated": summary.truncated,
        "examples": summary.examples,
        "truncated_examples": summary.truncated_examples,
        "lengths_cache": dataset.lengths_written,
        "stats": {"tokens_per_sample": _percentiles(measured.lengths[usable]),
                  "tiles_per_image": _percentiles(np.round(per_image).astype(np.int64)),
                  "images_per_sample": _percentiles(measured.images[usable])},
    }
    return dataset, report


def format_stats(stats: dict[str, dict[str, int]]) -> str:
    lines = ["Distribution (usable rows)", f"  {'':<20} {'min':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}"]
    for name, values in stats.items():
        if values:
            cells = " ".join(f"{values[key]:>8,}" for key in ("min", "p50", "p90", "p99", "max"))
            lines.append(f"  {name.replace('_', ' '):<20} {cells}")
    return "\n".join(lines)


__all__ = ["check_data", "format_stats"]
