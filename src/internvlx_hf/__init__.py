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
    AutoTokenizer,
)

from .modeling import (
    InternVLXConfig,
    InternVLXForConditionalGeneration,
    InternVLXLVTCCache,
    InternVLXModel,
    LVTCConfig,
    PVTCProjector,
)
from .processing import (
    InternVLXImageProcessor,
    InternVLXLlamaTokenizerFast,
    InternVLXProcessor,
    TilingMode,
    get_tile_grid,
)

__version__ = "0.1.0"

AutoConfig.register(InternVLXConfig.model_type, InternVLXConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(InternVLXConfig, InternVLXForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(InternVLXConfig, image_processor_classes={"pil": InternVLXImageProcessor}, exist_ok=True)
AutoProcessor.register(InternVLXConfig, InternVLXProcessor, exist_ok=True)
# Converted Llama-tokenizer checkpoints (Phi-3) use this class; registered so they load without trust_remote_code.
AutoTokenizer.register(InternVLXConfig, fast_tokenizer_class=InternVLXLlamaTokenizerFast, exist_ok=True)

__all__ = [
    "InternVLXConfig",
    "LVTCConfig",
    "InternVLXForConditionalGeneration",
    "InternVLXLVTCCache",
    "InternVLXModel",
    "PVTCProjector",
    "InternVLXImageProcessor",
    "InternVLXLlamaTokenizerFast",
    "InternVLXProcessor",
    "TilingMode",
    "get_tile_grid",
]
