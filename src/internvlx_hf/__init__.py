"""internvlx-hf: InternVL-X (PVTC, LVTC, RVTC) for Hugging Face Transformers.

Importing this package registers the model with the Auto classes, so `AutoModel.from_pretrained(path)` works
without `trust_remote_code` where the package is installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import (
    InternVLXConfig,
    InternVLXForConditionalGeneration,
    InternVLXModel,
    LVTCConfig,
    PVTCProjector,
)
from .processing import InternVLXImageProcessor, InternVLXProcessor, TilingMode, get_tile_grid

__version__ = "0.1.0"

AutoConfig.register(InternVLXConfig.model_type, InternVLXConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(InternVLXConfig, InternVLXForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(InternVLXConfig, image_processor_classes={"pil": InternVLXImageProcessor}, exist_ok=True)
AutoProcessor.register(InternVLXConfig, InternVLXProcessor, exist_ok=True)

__all__ = [
    "InternVLXConfig",
    "LVTCConfig",
    "InternVLXForConditionalGeneration",
    "InternVLXModel",
    "PVTCProjector",
    "InternVLXImageProcessor",
    "InternVLXProcessor",
    "TilingMode",
    "get_tile_grid",
]
