"""The InternVL-X model: its configuration and modeling (InternViT, PVTC / MLP projector, LVTC over the LLM),
the files `save_pretrained` also writes next to a checkpoint as remote code."""

from .configuration_internvlx import InternVLXConfig, LVTCConfig
from .modeling_internvlx import (
    InternVLXForConditionalGeneration,
    InternVLXLVTCCache,
    InternVLXLVTCStaticCache,
    InternVLXMLPProjector,
    InternVLXModel,
    InternVLXPreTrainedModel,
    PVTCProjector,
)

__all__ = [
    "InternVLXConfig",
    "LVTCConfig",
    "InternVLXForConditionalGeneration",
    "InternVLXLVTCCache",
    "InternVLXLVTCStaticCache",
    "InternVLXMLPProjector",
    "InternVLXModel",
    "InternVLXPreTrainedModel",
    "PVTCProjector",
]
