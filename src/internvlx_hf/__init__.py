"""internvlx-hf: InternVL-X (PVTC, LVTC, RVTC) for Hugging Face Transformers.

Importing this package registers the model with the Auto classes, so `AutoModel.from_pretrained(path)` works
without `trust_remote_code` where the package is installed.

The import itself is instant: the classes below load (with torch and transformers) when first used, and the Auto
registration happens as soon as transformers is imported (`auto_registration`), so `internvlx --help` does not pay
for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .auto_registration import register_after_transformers_import, register_auto_classes
from .quantization import hide_optional_kernel_note

__version__ = "0.1.0"

# Each public name and the subpackage that defines it.
_LAZY_ATTRIBUTES = {
    "InternVLXConfig": "modeling",
    "LVTCConfig": "modeling",
    "InternVLXForConditionalGeneration": "modeling",
    "InternVLXLVTCCache": "modeling",
    "InternVLXLVTCStaticCache": "modeling",
    "InternVLXModel": "modeling",
    "PVTCProjector": "modeling",
    "InternVLXImageProcessor": "processing",
    "InternVLXLlamaTokenizerFast": "processing",
    "InternVLXProcessor": "processing",
    "TilingMode": "processing",
    "get_tile_grid": "processing",
}

if TYPE_CHECKING:
    from .modeling import (
        InternVLXConfig,
        InternVLXForConditionalGeneration,
        InternVLXLVTCCache,
        InternVLXLVTCStaticCache,
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


def __getattr__(name: str):
    """`internvlx_hf.InternVLXConfig` and `from internvlx_hf import ...`: import the subpackage on first use."""
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    register_auto_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


register_after_transformers_import()
# bitsandbytes says on import that an optional CPU kernel cannot be fetched (peft imports it, and through peft the
# training package): a note that reads like a failure, on whatever a user runs (the README's first line included)
hide_optional_kernel_note()

__all__ = [
    "InternVLXConfig",
    "LVTCConfig",
    "InternVLXForConditionalGeneration",
    "InternVLXLVTCCache",
    "InternVLXLVTCStaticCache",
    "InternVLXModel",
    "PVTCProjector",
    "InternVLXImageProcessor",
    "InternVLXLlamaTokenizerFast",
    "InternVLXProcessor",
    "TilingMode",
    "get_tile_grid",
]
assert set(__all__) == set(_LAZY_ATTRIBUTES), "keep __all__ and the lazy attributes in sync"
