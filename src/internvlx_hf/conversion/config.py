"""The converted configuration: what an OpenGVLab config.json says about the converted model (`read_source_config`:
the LLM, its text config, the chat template and the other values) and the `InternVLXConfig` built from it
(`build_config`), each problem a `ConversionError` before any weight is read. `convert` and `sizes` use both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..modeling.configuration_internvlx import InternVLXConfig
from .errors import ConversionError
from .llm import LLMSpec, convert_text_config, llm_architecture, text_config_notes
from .source import SourceCheckpoint
from .vision import convert_vision_config


def _load_chat_template(name: str | None) -> str:
    from ..processing.chat_templates import CHAT_TEMPLATES, get_chat_template

    if name not in CHAT_TEMPLATES:
        raise ConversionError(
            f"config.template={name!r} is not a known InternVL chat template ({sorted(CHAT_TEMPLATES)}); add it to "
            "internvlx_hf.processing.chat_templates.CHAT_TEMPLATES."
        )
    return get_chat_template(name)


def _system_message_notes(config: dict, template: str) -> list[str]:
    """OpenGVLab's InternVLChatModel takes chat()'s system message from config.json's `system_message` when the key
    exists (before the template's default); the converted chat template keeps the template's default, so a
    `system_message` that differs from it is reported."""
    from ..processing.chat_templates import default_system_message

    if "system_message" not in config:
        return []
    value, default = config["system_message"], default_system_message(template)
    if value is None:
        return ["config.system_message is null: OpenGVLab's chat() would write the text 'None' as the system "
                f"message; the chat template writes the {template} default system message instead"]
    if value != default:
        return [f"config.system_message {value!r} is not the {template} default: the chat template keeps the "
                "default; pass it as the first (system) message, or set model.system_message for chat()"]
    return []


def _opengvlab_config_kwargs(source: SourceCheckpoint, text_config, notes: list[str]) -> dict[str, Any]:
    """InternVLXConfig values of an OpenGVLab config.json (besides the LLM, projector and token ids)."""
    c = source.config
    if c.get("use_backbone_lora") or c.get("use_llm_lora"):
        raise ConversionError(
            f"{source.path}/config.json has use_backbone_lora/use_llm_lora set: merge the LoRA weights into the base "
            "weights (InternVL's merge_lora script) and convert the merged checkpoint."
        )
    if "ps_version" not in c:
        # InternVLChatConfig's default is 'v1', so that is what OpenGVLab's code runs for such a folder
        raise ConversionError(
            f"{source.path}/config.json has no ps_version, which OpenGVLab's InternVLChatConfig reads as 'v1' (InternVL "
            "1.x's pixel shuffle, which orders the merged channels differently); only 'v2' is implemented. If the "
            'checkpoint was trained with v2 (every InternVL2 and later release), add "ps_version": "v2".')
    if c["ps_version"] != "v2":
        raise ConversionError(
            f"config.ps_version={c.get('ps_version')!r}: only InternVL2's pixel shuffle 'v2' is implemented "
            "(InternVL 1.x 'v1' orders the merged channels differently)."
        )
    if c.get("pad2square"):
        notes.append("pad2square=True is a training-data option of the reference and is not carried over")
    vision, vision_notes = convert_vision_config(c["vision_config"], c.get("force_image_size"))
    notes += vision_notes
    kwargs = {
        "vision_config": vision,
        "downsample_ratio": float(c.get("downsample_ratio", 0.5)),
        "select_layer": int(c.get("select_layer", -1)),
        "template": c.get("template"),
        "tie_word_embeddings": bool(text_config.tie_word_embeddings),
    }
    vir = _flash_router(source, notes)
    if vir is not None:
        kwargs["vir"] = vir
    return kwargs


_FLASH_KEYS = ("flash_mode", "flash_relative_threshold", "flash_absolute_threshold")
#: The thresholds of every published Flash config (docs/flash.md), written where a config with the router off has none.
_PUBLISHED_THRESHOLDS = {"flash_relative_threshold": 0.1, "flash_absolute_threshold": 0.5}


def _flash_router(source: SourceCheckpoint, notes: list[str]) -> dict[str, Any] | None:
    """The `ViRConfig` of an InternVL3.5-Flash folder (None for any other), read key by key as OpenGVLab's Flash code
    reads it: ``flash_mode = getattr(config, "flash_mode", False)``, and the thresholds only when it is on."""
    c = source.config
    if not any(key in c for key in _FLASH_KEYS) and not source.has_router_weights:
        return None
    enabled = bool(c.get("flash_mode", False))
    if "flash_mode" not in c:
        notes.append("config.json has no flash_mode, which OpenGVLab's Flash code reads as false: the router is "
                     "converted off (config.vir.enabled = false, every tile 256 tokens); set it to true in the "
                     "converted config.json to run the router")
    missing = [key for key in _FLASH_KEYS[1:] if not isinstance(c.get(key), (int, float))]
    if missing and enabled:
        raise ConversionError(
            f"{source.path}/config.json is an InternVL3.5-Flash config with flash_mode true but lacks a numeric "
            f"{' and '.join(missing)}: the router cannot decide without both; use the config.json of the published "
            "Flash checkpoint (it has both).")
    if missing:
        notes.append(f"config.json has no {' / '.join(missing)} (the router is off, so OpenGVLab's code never reads "
                     "them): the published Flash thresholds " + ", ".join(f"{key} {_PUBLISHED_THRESHOLDS[key]}" for key
                                                                          in missing)
                     + " are written for when it is turned on")
    if int(c.get("select_layer", -1)) != -1:
        raise ConversionError(
            f"{source.path}/config.json has select_layer={c['select_layer']}, but InternVL3.5-Flash's router path "
            "reads the ViT's last layer whatever select_layer says; set select_layer to -1 (every published Flash "
            "model has it).")
    value = {key: float(c[key]) if key not in missing else _PUBLISHED_THRESHOLDS[key] for key in _FLASH_KEYS[1:]}
    return {"enabled": enabled, "relative_threshold": value["flash_relative_threshold"],
            "absolute_threshold": value["flash_absolute_threshold"]}


def _build_config(config_kwargs: dict[str, Any], text_config, projector_type: str, lvtc: dict | None,
                  image_token_ids: dict[str, int | None]) -> InternVLXConfig:
    try:
        config = InternVLXConfig(
            text_config=text_config,
            **config_kwargs,
            **image_token_ids,
            projector_type=projector_type,
            lvtc=lvtc,
        )
    except (ValueError, TypeError) as error:
        raise ConversionError(f"the converted configuration is invalid: {error}") from None
    config.architectures = ["InternVLXForConditionalGeneration"]
    return config


@dataclass
class SourceConfig:
    """What an OpenGVLab config.json alone says about the converted model: the LLM, its converted text config, the
    chat template and the other InternVLXConfig values (no weights, no tokenizer)."""

    llm: LLMSpec
    text_config: Any
    template: str | None
    chat_template: str
    config_kwargs: dict[str, Any]


def read_source_config(source: SourceCheckpoint, notes: list[str]) -> SourceConfig:
    """The config-only half of a conversion of an OpenGVLab checkpoint (`convert` and `sizes.size_from_config`);
    raises `ConversionError` where config.json alone makes the checkpoint unconvertible, and adds what it changes
    to ``notes``."""
    llm = llm_architecture(source.config["llm_config"])
    text_config = convert_text_config(source.config["llm_config"])
    notes += text_config_notes(source.config["llm_config"])
    template = source.config.get("template")
    chat_template = _load_chat_template(template)
    notes += _system_message_notes(source.config, template)
    return SourceConfig(llm=llm, text_config=text_config, template=template, chat_template=chat_template,
                        config_kwargs=_opengvlab_config_kwargs(source, text_config, notes))


def build_config(config_kwargs: dict[str, Any], text_config, projector_type: str, lvtc_options: dict | None,
                 image_token_ids: dict[str, int | None]) -> InternVLXConfig:
    """The converted InternVLXConfig (after LVTC's k is checked against the LLM's depth), as `convert` writes it;
    the token ids come from the tokenizer ({} leaves the config's defaults, which change no parameter shape)."""
    _check_expand_layer(lvtc_options, text_config.num_hidden_layers)
    return _build_config(config_kwargs, text_config, projector_type, lvtc_options, image_token_ids)


def _check_expand_layer(lvtc_options: dict | None, depth: int) -> None:
    """LVTC's k must leave at least one layer on the expanded tokens: a k of the LLM's depth or more is accepted by
    the model (it only injects the LR projectors), but a conversion asked for LVTC asks for the expansion."""
    k = (lvtc_options or {}).get("expand_layer")
    if k is None:
        return
    if depth < 2:
        raise ConversionError(f"--lvtc k={k}: the LLM has {depth} layer, so no layer is left to expand into; "
                              "convert without --lvtc.")
    if not 1 <= k < depth:
        raise ConversionError(f"--lvtc k={k}: the LLM has {depth} layers, so k (expand_layer, the first layer on "
                              f"the expanded tokens) must lie in 1..{depth - 1}; e.g. k={max(1, 3 * depth // 4)} "
                              "(3/4 of the depth, the paper's choice).")
