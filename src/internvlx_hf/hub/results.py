"""Evaluation results for the model card, read from a user's file (`internvlx card --results FILE`).

The card shows a results table only from such a file, so every number in it was measured by whoever publishes the
model. Three formats, chosen by the file's suffix and content:

- JSON (``.json``): a list of rows, or ``{"results": [rows]}``; each row an object.
- CSV (``.csv``): a header line with the column names, then one row per line.
- What ``internvlx eval CHECKPOINT DATA --json FILE`` writes (``.json`` with ``"format": "internvlx-eval"``): one
  row per dataset (per tiling mode when it compared several) of its one checkpoint, the metric's name as the metric.

Columns: ``benchmark`` (name, e.g. ``"MME"``), ``metric`` (e.g. ``"accuracy"``), ``value`` (a number) are required;
``dataset_id`` (the benchmark's Hub dataset id, e.g. ``"lmms-lab/MME"``), ``split`` and ``notes`` (how it was
measured, e.g. ``"VLMEvalKit, greedy"``) are optional. Rows with a ``dataset_id`` also go into the card's
``model-index`` metadata, which the Hub shows as evaluation results.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = ("benchmark", "metric", "value")
OPTIONAL = ("dataset_id", "split", "notes")


@dataclass(frozen=True)
class ResultRow:
    benchmark: str
    metric: str
    value: float | int
    dataset_id: str | None = None
    split: str | None = None
    notes: str | None = None


def load_results(path: str | os.PathLike) -> list[ResultRow]:
    """Read and validate a results file; errors name the file, the row (1-based) and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path}: no such file.")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".json":
        rows = _json_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise ValueError(f"results file {path}: unknown format {suffix or '(no suffix)'!r}; use a .json or .csv file "
                         f"with the columns {', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)}).")
    if not rows:
        raise ValueError(f"results file {path} holds no results; add at least one row ({', '.join(REQUIRED)}).")
    return [_row(path, index, row, from_csv=suffix == ".csv") for index, row in enumerate(rows, start=1)]


def _json_rows(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {path} is not valid JSON ({error}).") from None
    if isinstance(data, dict) and data.get("format") == "internvlx-eval":
        return _eval_rows(path, data)
    if isinstance(data, dict):
        if set(data) != {"results"}:
            raise ValueError(f"results file {path}: a JSON object must have exactly one key, \"results\" (a list of "
                             f"rows); found {sorted(data)}.")
        data = data["results"]
    if not isinstance(data, list):
        raise ValueError(f"results file {path}: expected a list of rows (objects), got {type(data).__name__}.")
    return data


def _eval_rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from what `internvlx eval --json` wrote: one per dataset (and tiling mode) of its one checkpoint."""
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(run, dict) for run in runs):
        raise ValueError(f"results file {path}: an `internvlx eval --json` file needs a non-empty \"runs\" list; "
                         "write it again with `internvlx eval ... --json FILE`.")
    checkpoints = sorted({str(run.get("checkpoint")) for run in runs})
    if len(checkpoints) > 1:
        raise ValueError(f"results file {path} holds the scores of {len(checkpoints)} checkpoints "
                         f"({', '.join(checkpoints)}); a card shows one model's: write its own file with "
                         "`internvlx eval CHECKPOINT DATA --json FILE`.")
    rows = []
    for run in runs:
        options = run.get("options") or {}
        tiled = len(runs) > 1
        for result in run.get("datasets") or []:
            if not isinstance(result, dict):
                continue
            decoding = "greedy" if options.get("num_beams", 1) == 1 else f"{options.get('num_beams')} beams"
            notes = f"internvlx eval, {result.get('samples')} samples, {decoding}, tiling {options.get('tiling')}"
            name = f"{result.get('name')} ({options.get('tiling')})" if tiled else result.get("name")
            rows.append({"benchmark": name, "metric": result.get("metric"), "value": result.get("accuracy"),
                         "notes": notes})
    return rows


def _csv_rows(path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise ValueError(f"results file {path} is empty; its first line must name the columns "
                         f"({', '.join(REQUIRED)}, ...).")
    rows = []
    for row in reader:
        if None in row:
            raise ValueError(f"results file {path}, line {reader.line_num}: more values than the "
                             f"{len(reader.fieldnames)} columns of the header.")
        rows.append(row)
    return rows


def _row(path: Path, index: int, row: Any, from_csv: bool) -> ResultRow:
    where = f"results file {path}, row {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(REQUIRED)}, got {type(row).__name__}.")
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}; the columns are {', '.join(REQUIRED + OPTIONAL)}.")
    missing = [key for key in REQUIRED if row.get(key) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}.")
    fields: dict[str, Any] = {}
    for key in ("benchmark", "metric", *OPTIONAL):
        value = row.get(key)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be text, got {value!r}.")
        if "|" in value or "\n" in value:
            raise ValueError(f"{where}: {key} {value!r} contains '|' or a line break, which would break the table.")
        fields[key] = value.strip()
    fields["value"] = _number(where, row["value"], from_csv)
    return ResultRow(**fields)


def _number(where: str, value: Any, from_csv: bool) -> float | int:
    if from_csv and isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{where}: value {text!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: value must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{where}: value must be finite, got {value!r}.")
    return value


__all__ = ["ResultRow", "load_results"]
