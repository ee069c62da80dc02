"""Reading InternVL data, for training and evaluation alike: meta JSON, JSONL rows (InternVL `conversations`), TRL
`messages` rows and `datasets.Dataset`s, turned into chat samples, encoded and measured.

Modules: `formats` (InternVL / TRL rows -> `Sample`), `sources` (meta JSON, JSONL files and rows in memory ->
`DataSource`s and their rows), `index` (byte offsets of JSONL lines), `images` (image sizes from headers, decoding,
InternVL's tile budget), `encoding` (template rendering, tokenization, label masks, truncation), `summary` (the data
table), `lengths` (the parallel full check and per-row lengths with their cache), `dataset` (`InternVLXDataset`,
lazy), `check` (`internvlx data check`).
"""

from .dataset import InternVLXDataset
from .encoding import IGNORE_INDEX, ConversationEncoder, EncodedConversation, truncate
from .formats import IMAGE_TAG, ChatRow, Sample, SampleError, sample_from_row
from .images import TileBudget, apply_tile_precedence, image_size, load_image
from .sources import DataSource, as_sources, parse_row, read_meta, source_rows
from .summary import DatasetStats, DataSummary

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "ChatRow",
    "ConversationEncoder",
    "DataSource",
    "DataSummary",
    "DatasetStats",
    "EncodedConversation",
    "InternVLXDataset",
    "Sample",
    "SampleError",
    "TileBudget",
    "apply_tile_precedence",
    "as_sources",
    "image_size",
    "load_image",
    "parse_row",
    "read_meta",
    "sample_from_row",
    "source_rows",
    "truncate",
]
