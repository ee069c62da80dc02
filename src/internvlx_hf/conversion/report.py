"""What a conversion did: `ConversionReport` (the summary `internvlx convert` prints) and the record it leaves in
`internvlx_provenance.json` (`provenance_details`, with the base model when the source names a Hub id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"


@dataclass
class ConversionReport:
    """What `convert` did; ``str(report)`` is the summary the CLI prints."""

    src: Path
    dst: Path
    llm: str
    text_model_type: str
    num_parameters: int
    dtype: str
    projector_type: str
    projector_source: str
    lvtc: dict | None
    tokens_per_tile: int
    hr_tokens_per_tile: int | None
    tokenizer: str
    template: str
    eos_token: str
    eos_token_id: int
    image_token_id: int
    files: list[str]
    total_bytes: int
    dropped: dict[str, str] = field(default_factory=dict)
    new: dict[str, tuple[int, str]] = field(default_factory=dict)  # module -> (params, how initialised)
    copied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vllm_cpu: str | None = None  # why the folder will not run on vLLM's CPU backend (its LLM's head size), if so
    vir: dict | None = None  # InternVL3.5-Flash's router (config.vir), if the folder has one

    def __str__(self) -> str:
        gb = self.total_bytes / 1e9
        lines = [
            f"Converted {self.src} -> {self.dst}",
            f"  parameters      {self.num_parameters:,} ({self.dtype}), {len(self.files)} file(s), {gb:.3f} GB",
            f"  LLM             {self.llm} -> {self.text_model_type}",
            f"  projector       {self.projector_type} ({self.projector_source})",
            f"  tokens per tile {self.tokens_per_tile}"
            + (f" (LR; {self.hr_tokens_per_tile} HR from the expand layer)" if self.hr_tokens_per_tile else ""),
            "  LVTC            " + (", ".join(f"{k}={v}" for k, v in self.lvtc.items()) if self.lvtc else "off"),
            "  ViR router      " + (
                "added, untrained and off: `internvlx train --preset vico` trains it (docs/flash.md)"
                if self.vir and "model.vir" in self.new else
                f"{'on' if self.vir['enabled'] else 'off (flash_mode false)'}: a tile is compressed to "
                f"{self.vir['compressed_tokens']} tokens when its score is above the "
                f"{self.vir['relative_threshold']} quantile of its sample's tiles and >= "
                f"{self.vir['absolute_threshold']} (docs/flash.md)" if self.vir else "none"),
            f"  tokenizer       {self.tokenizer}",
            f"  chat template   {self.template}; generation stops at {self.eos_token} ({self.eos_token_id}); "
            f"{IMAGE_CONTEXT_TOKEN} = {self.image_token_id}",
        ]
        if self.dropped:
            lines.append(f"  dropped source tensors ({len(self.dropped)}):")
            by_reason: dict[str, list[str]] = {}
            for key, reason in sorted(self.dropped.items()):
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
                lines.append(f"    {reason}: {shown}")
        else:
            lines.append("  dropped source tensors: none")
        if self.copied:
            lines.append(f"  initialised from source tensors ({len(self.copied)}), e.g. "
                         f"{next(iter(self.copied))} <- {next(iter(self.copied.values()))} (init_lr_from_mlp1)")
        if self.new:
            lines.append(f"  newly initialised ({sum(n for n, _ in self.new.values()):,} parameters):")
            lines += [f"    {module}: {count:,} params, {how}" for module, (count, how) in self.new.items()]
        else:
            lines.append("  newly initialised parameters: none")
        lines += [f"  note: {note}" for note in self.notes]
        if self.vllm_cpu:
            lines.append(f"  vLLM on CPU     {self.vllm_cpu}")
        return "\n".join(lines)


def hub_id_or_none(name_or_path: Any) -> str | None:
    """``_name_or_path`` when it is a Hub repo id (``owner/name``, valid for huggingface_hub), else None.

    OpenGVLab configs often record the path the model was saved from on the authors' machines; such a path says
    nothing about where the model lives, so it is not reported as a base model.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name_or_path, str) or name_or_path.count("/") != 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def provenance_details(report: "ConversionReport", image_processor) -> dict[str, Any]:
    """The JSON-serialisable summary of a conversion for `internvlx_provenance.json` (see `provenance.py`)."""
    by_reason: dict[str, int] = {}
    for reason in report.dropped.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {
        "llm": report.llm,
        "text_model_type": report.text_model_type,
        "projector": {"type": report.projector_type, "source": report.projector_source},
        "lvtc": report.lvtc,
        "tokens_per_tile": {"lr": report.tokens_per_tile, "hr": report.hr_tokens_per_tile},
        "image_processor": {"tiling": str(getattr(image_processor.tiling, "value", image_processor.tiling)),
                            "min_tiles": image_processor.min_tiles, "max_tiles": image_processor.max_tiles,
                            "image_size": image_processor.image_size},
        "template": report.template,
        "eos_token": report.eos_token,
        "dtype": report.dtype,
        "num_parameters": report.num_parameters,
        "new_modules": {module: {"parameters": count, "init": how} for module, (count, how) in report.new.items()},
        "initialised_from_source": dict(report.copied),
        "dropped_tensors": {"count": len(report.dropped), "reasons": by_reason},
        "notes": list(report.notes),
    }


__all__ = ["ConversionReport", "IMAGE_CONTEXT_TOKEN", "hub_id_or_none", "provenance_details"]
