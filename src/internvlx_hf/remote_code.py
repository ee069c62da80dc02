"""The remote code of a checkpoint: the package's own model and processor files, written next to the weights so that
``AutoModel`` / ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` load it where internvlx-hf is not
installed (lmms-eval, transformers' ``pipeline``, a bare venv).

The files are copied by transformers' ``custom_object_save``, the function ``save_pretrained`` itself calls for classes
registered with ``register_for_auto_class``: each class's module file plus, recursively, the files it imports
relatively (``modeling_internvlx.py`` brings ``projectors.py``, ``lvtc.py``, ``outputs.py``, ``compat.py`` and the rest;
``processing_internvlx.py`` brings ``chat_templates.py``). There is one copy of the code, the package's;
a folder gets its files when it is written (conversion, training, `internvlx demo --save`), never a file kept by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from .modeling import InternVLXConfig, InternVLXForConditionalGeneration
from .processing import InternVLXImageProcessor, InternVLXProcessor

# What the ``auto_map`` entries of config.json and the processor configs name (the tokenizer's own class,
# tokenization_internvlx.py, is written by the tokenizer's save_pretrained where a checkpoint uses it: Phi-3).
REMOTE_CODE_CLASSES = (InternVLXConfig, InternVLXForConditionalGeneration, InternVLXProcessor,
                       InternVLXImageProcessor)


def remote_code_sources() -> list[Path]:
    """The package files `save_remote_code` copies, sorted by name (what a checkpoint's remote code is made of)."""
    import sys

    from transformers.dynamic_module_utils import get_relative_import_files

    sources = set()
    for cls in REMOTE_CODE_CLASSES:
        module_file = Path(sys.modules[cls.__module__].__file__)
        sources |= {module_file, *(Path(p) for p in get_relative_import_files(str(module_file)))}
    return sorted(sources, key=lambda path: path.name)


def save_remote_code(directory: str | os.PathLike) -> list[str]:
    """Write the model's and the processor's remote-code files into ``directory``; returns their names, sorted."""
    from transformers.dynamic_module_utils import custom_object_save

    written: set[str] = set()
    for cls in REMOTE_CODE_CLASSES:
        written.update(Path(path).name for path in custom_object_save(cls, directory))
    return sorted(written)


__all__ = ["REMOTE_CODE_CLASSES", "remote_code_sources", "save_remote_code"]
