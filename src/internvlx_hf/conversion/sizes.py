"""What `internvlx convert` would build from a source config.json alone: no weights, no tokenizer.

    from internvlx_hf.conversion.sizes import size_from_config
    size = size_from_config(json.load(open("InternVL2-1B/config.json")), projector="pvtc", lvtc="default")
    size.num_parameters, size.new_parameters

The configuration goes through the config-only half of a real conversion (`convert.read_source_config`, then
`convert.build_config` with its LVTC check, both of which `convert` runs too) and the model is built on the meta
device (`convert.expected_parameters`), so the counts are those of the model `convert` would write. Token
ids (``<IMG_CONTEXT>``, ``<img>``, ``</img>``) come from the tokenizer during a real conversion; here they are left
at the config defaults, which do not change any parameter shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..modeling.configuration_internvlx import InternVLXConfig
from .config import build_config, read_source_config
from .convert import expected_parameters
from .errors import ConversionError
from .options import check_projector, parse_lvtc_spec
from .plan import PlanInputs, is_new_by_design
from .source import SourceCheckpoint, check_source_config


@dataclass(frozen=True)
class ConfigSize:
    """The converted configuration and the parameter counts of the model built from it."""

    config: InternVLXConfig
    llm: str  # the source LLM class, e.g. "Qwen2ForCausalLM"
    num_parameters: int  # all parameters of the converted model (tied ones once), as `convert` reports
    new_parameters: int  # of those, the ones an upgrade adds (new projector, LVTC projectors)
    notes: list[str]


def size_from_config(source_config: dict[str, Any], *, projector: str = "keep",
                     lvtc: str | dict | None = None, source_projector: str = "mlp",
                     name: str = "config.json") -> ConfigSize:
    """Convert an OpenGVLab ``config.json`` (as a dict) and count the parameters of the resulting model.

    ``source_projector`` is what the source weights hold ("mlp" = InternVL2 ``mlp1``, "pvtc" = the InternVL-X
    release); a real conversion reads it from the tensor names. ``name`` labels the config in error messages.
    Raises `ConversionError` where `convert` refuses a checkpoint for what its config.json says (LLM, template,
    vision settings, LVTC options); refusals that need the weights or the tokenizer cannot happen here.
    """
    projector = check_projector(projector)
    if source_projector not in ("mlp", "pvtc"):
        raise ConversionError(f"source_projector must be 'mlp' or 'pvtc', got {source_projector!r}")
    lvtc_options, _ = parse_lvtc_spec(lvtc)
    check_source_config(source_config, Path(name))
    if "llm_config" not in source_config or "vision_config" not in source_config:
        raise ConversionError(f"{name} has no llm_config/vision_config: it is not an OpenGVLab InternVLChatModel "
                              "config.json.")
    notes: list[str] = []
    parts = read_source_config(SourceCheckpoint(path=Path(name), config=source_config, shards=[], infos=[]), notes)
    projector_type = source_projector if projector == "keep" else projector
    config = build_config(parts.config_kwargs, parts.text_config, projector_type, lvtc_options, {})
    meta_model, _ = expected_parameters(config)
    # Only the fields is_new_by_design reads matter here; the key tables are those of a real conversion.
    inputs = PlanInputs(llm_key_mapping=parts.llm.key_mapping, vision_qkv_rows={}, llm_qkv_rows=None,
                        source_projector=source_projector, target_projector=projector_type,
                        num_extra_lr_projectors=0, init_lr_from_mlp1=False,
                        tie_word_embeddings=bool(config.tie_word_embeddings))
    counts = {key: p.numel() for key, p in meta_model.named_parameters()}  # tied parameters are listed once
    new = sum(n for key, n in counts.items() if is_new_by_design(key, inputs))
    return ConfigSize(config=config, llm=parts.llm.architecture, num_parameters=sum(counts.values()),
                      new_parameters=new, notes=notes)
