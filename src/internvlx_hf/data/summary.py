"""What a look at the data found: per dataset, rows, samples, images, tiles, tokens, truncated and skipped rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
    """Per dataset: rows and samples, and, after a full check (``checked``), images, tiles, tokens, truncated and
    skipped rows, with the first few skipped and truncated rows as examples."""

    datasets: list[DatasetStats] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)
    max_length: int | None = None
    checked: bool = True  # False: read lazily, rows are checked as they load (only rows and samples are known)

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
        if not self.checked:
            lines = ["Training data (read lazily: each row is checked when it loads; `internvlx data check` checks "
                     "them all now)", f"  {'dataset':<24} {'rows':>10} {'samples':>10}"]
            lines.extend(f"  {d.name[:24]:<24} {d.rows:>10,} {d.samples:>10,}" for d in self.datasets)
            if len(self.datasets) > 1:
                lines.append(f"  {'total':<24} {sum(d.rows for d in self.datasets):>10,} {self.samples:>10,}")
            return "\n".join(lines)
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
        if not self.checked:
            return [{"name": d.name, "files": d.files, "rows": d.rows, "samples": d.samples} for d in self.datasets]
        return [{"name": d.name, "files": d.files, "rows": d.rows, "samples": d.samples, "images": d.images,
                 "tiles": d.tiles, "tokens": d.tokens, "truncated": d.truncated, "skipped": dict(d.skipped)}
                for d in self.datasets]


__all__ = ["DataSummary", "DatasetStats"]
