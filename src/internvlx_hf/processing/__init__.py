"""Preprocessing for InternVL2 / InternVL-X: RVTC image tiling, prompt building and chat templates."""

from .chat_templates import CHAT_TEMPLATES, get_chat_template
from .image_processing_internvlx import InternVLXImageProcessor, TilingMode, get_tile_grid
from .processing_internvlx import InternVLXProcessor
from .tokenization_internvlx import InternVLXLlamaTokenizerFast

__all__ = [
    "CHAT_TEMPLATES",
    "InternVLXImageProcessor",
    "InternVLXLlamaTokenizerFast",
    "InternVLXProcessor",
    "TilingMode",
    "get_chat_template",
    "get_tile_grid",
]
