from .configuration_internvlx import InternVLXConfig, LVTCConfig
from .modeling_internvlx import (
    InternVLXForConditionalGeneration,
    InternVLXLVTCCache,
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
    "InternVLXMLPProjector",
    "InternVLXModel",
    "InternVLXPreTrainedModel",
    "PVTCProjector",
]
