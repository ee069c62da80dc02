"""The source checkpoint: an OpenGVLab InternVL2 / InternVL-X folder (config.json with llm_config/vision_config), or a
transformers-native InternVL folder (model_type "internvl", `InternVLForConditionalGeneration`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CONFIG_NAME, read_source_config
from .errors import ConversionError, read_json_file
from .key_mapping import SOURCE_PREFIXES
from .shards import SourceShard, TensorInfo, find_weight_files


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict[str, Any]
    shards: list[SourceShard]
    infos: list[dict[str, TensorInfo]]  # per shard: key -> shape/dtype, in file order
    layout: str = "opengvlab"  # or "native"

    @property
    def projector_type(self) -> str:
        """"mlp" for InternVL2 (`mlp1`), "pvtc" for the InternVL-X reference release (`projector`)."""
        keys = [key for infos in self.infos for key in infos]
        if self.layout == "native":
            if not any(key.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for key in keys):
                raise ConversionError(f"{self.path} has no model.multi_modal_projector.* tensors; it is not a complete "
                                      "InternVLForConditionalGeneration checkpoint.")
            return "mlp"
        has_mlp = any(key.startswith(SOURCE_PREFIXES["mlp"]) for key in keys)
        has_pvtc = any(key.startswith(SOURCE_PREFIXES["pvtc"]) for key in keys)
        if has_mlp and has_pvtc:
            raise ConversionError(f"{self.path} has both mlp1.* and projector.* tensors; which one is the model's?")
        if not (has_mlp or has_pvtc):
            raise ConversionError(
                f"{self.path} has no projector (mlp1.* for InternVL2, projector.* for InternVL-X); it is not a "
                "complete InternVLChatModel checkpoint."
            )
        return "mlp" if has_mlp else "pvtc"

    @property
    def has_router_weights(self) -> bool:
        """Whether the weights hold InternVL3.5-Flash's router (its pooling, gate and 64-token projector ``mlp2``)."""
        return self.layout != "native" and any(key.startswith(SOURCE_PREFIXES["vir"]) for infos in self.infos
                                               for key in infos)

    def dominant_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the bytes (the model's dtype for `--dtype auto`)."""
        counts: Counter = Counter()
        for infos in self.infos:
            for info in infos.values():
                if info.dtype.is_floating_point:
                    counts[info.dtype] += torch.Size(info.shape).numel() * info.dtype.itemsize
        return counts.most_common(1)[0][0] if counts else torch.float32


NATIVE_MODEL_TYPE = "internvl"
# The tokenizer files an InternVL2 checkpoint may carry (sentencepiece- or BPE-based).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# Keys every OpenGVLab config.json has (save_pretrained writes them); without them the model cannot be rebuilt.
_REQUIRED_KEYS = {
    "llm_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"),
    "vision_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"),
}
# JSON files of the source that conversion reads (the tokenizer's among them): each must parse.
_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
               "vocab.json", "generation_config.json")


def check_source_config(config: Any, config_path: Path) -> None:
    """Raise `ConversionError` when an OpenGVLab ``config.json`` (parsed, read from ``config_path``) is not a JSON
    object, or when its llm_config / vision_config section is not one or lacks a key that conversion needs. A
    missing section is left to the caller, which explains the layouts it reads."""
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} holds a JSON {type(config).__name__}, not an object; restore the "
                              "checkpoint's config.json.")
    for section, keys in _REQUIRED_KEYS.items():
        if section not in config:
            continue  # reported below with the layout explanation
        if not isinstance(config[section], dict):
            raise ConversionError(f"{config_path}: {section} is a {type(config[section]).__name__}, not an object; "
                                  "restore the checkpoint's config.json.")
        missing = [key for key in keys if key not in config[section]]
        if missing:
            raise ConversionError(
                f"{config_path}: {section} lacks {', '.join(missing)}; the file is incomplete, restore config.json "
                "from the original checkpoint."
            )


def read_source(path: str | Path, allow_pickle: bool) -> SourceCheckpoint:
    path = Path(path)
    try:
        return _read_source(path, allow_pickle)
    except OSError as error:  # e.g. a folder the user may not list: Path.exists() raises instead of answering
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        raise ConversionError(f"cannot read SRC {path}{where}: {error.strerror or error}; check that the folder and "
                              "its files are readable.") from None


def _read_source(path: Path, allow_pickle: bool) -> SourceCheckpoint:
    config = read_source_config(path, error=ConversionError)
    config_path = path / CONFIG_NAME
    if config.get("model_type") == NATIVE_MODEL_TYPE:
        return _read_native_source(path, config, allow_pickle)
    check_source_config(config, config_path)
    if config.get("model_type") == "internvlx":
        raise ConversionError(f"{path} is already an internvlx-hf checkpoint; load it with from_pretrained.")
    if "llm_config" not in config or "vision_config" not in config:
        raise ConversionError(
            f"{config_path} has no llm_config/vision_config (model_type={config.get('model_type')!r}): it is not in "
            "the OpenGVLab InternVLChatModel layout (InternVL2, InternVL-X) nor a transformers-native InternVL "
            "checkpoint "
            "(model_type 'internvl'), the two layouts this converter reads."
        )
    for name in _JSON_FILES:
        if (path / name).exists():
            read_json_file(path / name, "tokenizer file" if name != "generation_config.json" else "file")
    shards = find_weight_files(path, allow_pickle)
    return SourceCheckpoint(path=path, config=config, shards=shards, infos=[s.tensor_infos() for s in shards])


def _read_native_source(path: Path, config: dict[str, Any], allow_pickle: bool) -> SourceCheckpoint:
    """A transformers-native InternVL folder: config.json with text_config/vision_config, weights, tokenizer."""
    config_path = path / "config.json"
    for section in ("text_config", "vision_config"):
        if not isinstance(config.get(section), dict):
            raise ConversionError(f"{config_path} (model_type 'internvl') has no {section} object; restore the "
                                  "checkpoint's config.json.")
    for name in (*_JSON_FILES, "preprocessor_config.json", "processor_config.json", "chat_template.json"):
        if (path / name).exists():
            read_json_file(path / name, "file")
    shards = find_weight_files(path, allow_pickle)
    return SourceCheckpoint(path=path, config=config, shards=shards, infos=[s.tensor_infos() for s in shards],
                            layout="native")
