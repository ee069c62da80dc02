"""The model card (`README.md`) of an internvlx-hf checkpoint, built with `huggingface_hub.ModelCard`.

Everything in the card is read from the folder: config.json (projector, LVTC), the processor config (tiling, tokens
per tile), `internvlx_provenance.json` (base model, conversion, training runs), or from the user's options
(`--license`, `--base-model`, `--results FILE`). There are no placeholder numbers: without a results file the card has
no results section.

The `base_model_relation` rules: `lineage.py`; the card's sections: `card_sections.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..checkpoints import CHECKPOINT_HINT, CONFIG_NAME
from ..provenance import PROVENANCE_FILE, read_provenance
from ..token_budget import TilingSettings
from .card_sections import (
    compression_section,
    evaluation_section,
    intro,
    made_section,
    results_section,
    router_section,
    usage_section,
)
from .lineage import RELATIONS, Lineage, lineage
from .resolve import looks_like_repo_id, read_internvlx_config
from .results import ResultRow, load_results

PIPELINE_TAG = "image-text-to-text"
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# The usage snippet names the model in this line; `internvlx push` checks it against the repository id.
_MODEL_ID_LINE = re.compile(r'^(model_id|adapter_id) = "([^"]*)"$', re.MULTILINE)


# ------------------------------------------------------------------------------------------------ folder contents


@dataclass
class _Checkpoint:
    """What the card needs from a checkpoint folder."""

    config: Any  # InternVLXConfig
    settings: TilingSettings
    config_folder: Path


def _read_checkpoint(folder: Path, record: dict[str, Any], adapter: bool) -> _Checkpoint:
    from ..modeling import InternVLXConfig

    candidate, hint = folder, CHECKPOINT_HINT
    if adapter and not (folder / CONFIG_NAME).exists():
        # an adapter folder may hold only adapter files; its settings are those of the model it loads onto
        runs = record.get("training") or []
        started = runs[-1].get("started_from") if runs else None
        if started and Path(started).is_dir():
            candidate, hint = Path(started), f"the adapter's folder {folder} has none either; {CHECKPOINT_HINT}"
    read_internvlx_config(candidate, "the card's checkpoint", hint=hint)
    config = InternVLXConfig.from_pretrained(candidate)
    return _Checkpoint(config, _processor_settings(candidate, config), candidate)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def _processor_settings(folder: Path, config) -> TilingSettings:
    processor_file = folder / "processor_config.json"
    if processor_file.is_file():
        data = _read_json(processor_file)
        image = data.get("image_processor") or {}
        seq_length = data.get("image_seq_length", config.image_seq_length)
    elif (folder / "preprocessor_config.json").is_file():
        image, seq_length = _read_json(folder / "preprocessor_config.json"), config.image_seq_length
    else:
        raise FileNotFoundError(f"no processor_config.json in {folder}: the card states the tiling from it; save the "
                                "processor with the model (`internvlx convert` does).")
    defaults = TilingSettings()
    return TilingSettings(
        image_size=int(image.get("image_size", defaults.image_size)),
        min_tiles=int(image.get("min_tiles", defaults.min_tiles)),
        max_tiles=int(image.get("max_tiles", defaults.max_tiles)),
        use_thumbnail=bool(image.get("use_thumbnail", defaults.use_thumbnail)),
        tokens_per_tile=int(seq_length),
        tiling=str(image.get("tiling", defaults.tiling)),
    )


# ------------------------------------------------------------------------------------------------------ the card


def compression_tags(config, settings: TilingSettings) -> list[str]:
    """`pvtc`, `lvtc`, `rvtc`: the paper's compressions this checkpoint uses."""
    from ..modeling.configuration_internvlx import LVTCConfig

    tags = []
    lvtc = LVTCConfig.of(config)
    if config.projector_type == "pvtc" or (lvtc is not None and lvtc.hr_projector_type == "pvtc"):
        tags.append("pvtc")
    if lvtc is not None:
        tags.append("lvtc")
    if settings.tiling in ("area", "edge"):
        tags.append("rvtc")
    return tags


def build_model_card(folder: str | os.PathLike, *, license: str, base_model: str | None = None,
                     relation: str | None = None, results: str | os.PathLike | list[ResultRow] | None = None,
                     repo_id: str | None = None, model_name: str | None = None):
    """The `huggingface_hub.ModelCard` of a checkpoint folder.

    Args:
        folder: the checkpoint folder (its `internvlx_provenance.json` is read when present).
        license: the Hub license id (e.g. ``"mit"``, ``"apache-2.0"``); use the base model's license.
        base_model: Hub id that overrides the recorded base model.
        relation: overrides the `base_model_relation` rule.
        results: a results file (see `internvlx_hf.hub.results`) or its parsed rows; no results section without it.
        repo_id: the Hub id the usage snippet loads (default: the folder path as given, which runs locally).
        model_name: the card's title (default: the repository or folder name).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; pass the checkpoint folder.")
    if not isinstance(license, str) or not _LICENSE_ID.match(license):
        raise ValueError(f"--license {license!r} is not a Hub license id such as mit, apache-2.0 or other "
                         "(lower case; see https://huggingface.co/docs/hub/repositories-licenses).")
    if repo_id is not None and not looks_like_repo_id(repo_id):
        raise ValueError(f"--repo-id {repo_id!r} is not a Hub model id (owner/name).")
    record = read_provenance(folder)
    line = lineage(folder, record, base_model, relation)
    checkpoint = _read_checkpoint(folder, record, adapter=line.kind == "adapter")
    rows = load_results(results) if isinstance(results, (str, os.PathLike)) else list(results or [])
    name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    load_id = repo_id or str(folder)

    compressions = compression_tags(checkpoint.config, checkpoint.settings)
    flash = getattr(checkpoint.config, "vir", None) is not None
    family = ["internvl3.5", "internvl3.5-flash", "vir"] if flash else ["internvl2"]
    tags = ["internvl-x", *family, "custom_code", *compressions]
    if any(isinstance(run, dict) and run.get("lora") for run in record.get("training") or []):
        tags.append("lora")
    datasets = _datasets(record)
    eval_results = [
        EvalResult(task_type=PIPELINE_TAG, dataset_type=row.dataset_id, dataset_name=row.benchmark,
                   dataset_split=row.split, metric_type=row.metric, metric_value=row.value)
        for row in rows if row.dataset_id
    ]
    extra = {"base_model_relation": line.relation} if line.relation else {}
    data = ModelCardData(
        library_name="peft" if line.kind == "adapter" else "transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        base_model=line.base_model,
        tags=tags,
        datasets=datasets or None,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )
    body = "\n\n".join(part for part in (
        intro(name, line, compressions, (checkpoint.config.image_seq_length,
                                          checkpoint.config.compressed_tokens_per_tile) if flash else None),
        compression_section(checkpoint.config, checkpoint.settings),
        router_section(checkpoint.config, checkpoint.settings),
        usage_section(load_id, line, checkpoint.settings, flash),
        made_section(record, line),
        results_section(rows),
        evaluation_section(record),
        f"*Card written by `internvlx card` (internvlx-hf {_version()}) from this folder's config, processor config"
        f" and `{PROVENANCE_FILE}`.*",
    ) if part)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(card, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``card`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (or --output another file).")
    with atomic_file(path) as tmp:
        card.save(tmp)
    return path


def snippet_model_ids(card_text: str) -> list[str]:
    """The model ids the card's usage snippet loads (``model_id = "..."`` / ``adapter_id = "..."`` lines)."""
    return [match.group(2) for match in _MODEL_ID_LINE.finditer(card_text)]


def usage_snippet(card_text: str) -> str:
    """The Python code of the card's usage section (what a reader copies)."""
    section = card_text.split("## Usage", 1)[-1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    if match is None:
        raise ValueError("the card has no ```python block under '## Usage'.")
    return match.group(1)


def _version() -> str:
    from .. import __version__

    return __version__


def _datasets(record: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for run in record.get("training") or []:
        values = run.get("datasets") if isinstance(run, dict) else None
        values = [values] if isinstance(values, str) else values or []
        found += [v for v in values if isinstance(v, str) and looks_like_repo_id(v) and v not in found]
    return found

__all__ = [
    "Lineage",
    "RELATIONS",
    "build_model_card",
    "compression_tags",
    "lineage",
    "snippet_model_ids",
    "usage_snippet",
    "write_model_card",
]
