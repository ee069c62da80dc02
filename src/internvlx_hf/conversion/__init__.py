"""Conversion of OpenGVLab InternVL2 / InternVL-X checkpoints into internvlx-hf checkpoints.

    from internvlx_hf.conversion import convert
    report = convert("InternVL2-2B", "InternVL2-2B-hf")            # projector and LLM as in the source
    report = convert("InternVL2-2B", "InternVL2-2B-X", projector="pvtc", lvtc="k=18,T=2")  # upgrade
    print(report)

Modules: `convert` (orchestration, atomic output), `plan` (source key -> target tensors, checked up front),
`key_mapping` (the name tables), `vision` / `llm` (configs and packed qkv layouts), `tokenizer`, `shards`
(streaming safetensors I/O), `new_modules` (initialisation of modules an upgrade adds), `options` (CLI/API option
parsing).
"""

from .convert import convert
from .report import ConversionReport
from .errors import ConversionError
from .options import parse_lvtc_spec, parse_size

__all__ = ["ConversionError", "ConversionReport", "convert", "parse_lvtc_spec", "parse_size"]
