"""The source checkpoint: an OpenGVLab InternVL2 / InternVL-X folder (config.json with llm_config/vision_config)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError
from .key_mapping import SOURCE_PREFIXES
from .shards import SourceShard, TensorInfo, find_weight_files


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict[str, Any]
    shards: list[SourceShard]
    infos: list[dict[str, TensorInfo]]  # per shard: key -> shape/dtype, in file order

    @property
    def projector_type(self) -> str:
        """"mlp" for InternVL2 (`mlp1`), "pvtc" for the InternVL-X reference release (`projector`)."""
        keys = [key for infos in self.infos for key in infos]
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

    def dominant_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the bytes (the model's dtype for `--dtype auto`)."""
        counts: Counter = Counter()
        for infos in self.infos:
            for info in infos.values():
                if info.dtype.is_floating_point:
                    counts[info.dtype] += torch.Size(info.shape).numel() * info.dtype.itemsize
        return counts.most_common(1)[0][0] if counts else torch.float32


def read_source(path: str | Path, allow_pickle: bool) -> SourceCheckpoint:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(
            f"SRC {path} is not a folder; pass the local folder of an OpenGVLab InternVL2 model (download it first, "
            "e.g. `huggingface-cli download OpenGVLab/InternVL2-2B --local-dir InternVL2-2B`)."
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{path} has no config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("model_type") == "internvlx":
        raise ConversionError(f"{path} is already an internvlx-hf checkpoint; load it with from_pretrained.")
    if "llm_config" not in config or "vision_config" not in config:
        raise ConversionError(
            f"{config_path} has no llm_config/vision_config (model_type={config.get('model_type')!r}): it is not in "
            "the OpenGVLab InternVLChatModel layout this converter reads (InternVL2, InternVL-X). transformers-native "
            "InternVL checkpoints (model_type 'internvl') load with transformers directly."
        )
    shards = find_weight_files(path, allow_pickle)
    return SourceCheckpoint(path=path, config=config, shards=shards, infos=[s.tensor_infos() for s in shards])
