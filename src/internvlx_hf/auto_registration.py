"""Registration of the InternVL-X classes with transformers' Auto classes, without importing transformers early.

`import internvlx_hf` promises that `AutoModel.from_pretrained(path)` (and AutoConfig, AutoProcessor,
AutoImageProcessor, AutoTokenizer) then work without ``trust_remote_code``. Registering needs the classes, and
they import torch and transformers (several seconds), which the command line must not pay to print `--help`. So
the package registers as soon as transformers is there:

- at `import internvlx_hf` when transformers is already imported (`register_auto_classes`);
- otherwise right after the import of transformers completes (`register_after_transformers_import`, a post-import
  hook on ``sys.meta_path``), or, when the import of one of this package's own modules pulled transformers in,
  right after that module has finished (its classes are then complete);
- and in any case when a class is first taken from the package (`internvlx_hf.InternVLXConfig`).

The hook removes itself once the classes are registered.
"""

from __future__ import annotations

import importlib.abc
import sys

_PACKAGE = __name__.rpartition(".")[0]
_registered = False


def register_auto_classes() -> None:
    """Register the config, model, processor, image processor and tokenizer classes (once; later calls return)."""
    global _registered
    if _registered:
        return
    _registered = True  # first, so that the imports below cannot re-enter through the hook
    try:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        # Not `from transformers import AutoImageProcessor`: transformers 5.15-5.17 hand out a placeholder that
        # demands torchvision for any name ending in "ImageProcessor" when torchvision is missing.
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        from .modeling import InternVLXConfig, InternVLXForConditionalGeneration
        from .processing import InternVLXImageProcessor, InternVLXLlamaTokenizerFast, InternVLXProcessor

        AutoConfig.register(InternVLXConfig.model_type, InternVLXConfig, exist_ok=True)
        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
            auto.register(InternVLXConfig, InternVLXForConditionalGeneration, exist_ok=True)
        AutoImageProcessor.register(InternVLXConfig, image_processor_classes={"pil": InternVLXImageProcessor},
                                    exist_ok=True)
        AutoProcessor.register(InternVLXConfig, InternVLXProcessor, exist_ok=True)
        # Converted Llama-tokenizer checkpoints (Phi-3) use this class; registered so they load without
        # trust_remote_code.
        AutoTokenizer.register(InternVLXConfig, fast_tokenizer_class=InternVLXLlamaTokenizerFast, exist_ok=True)
    except BaseException:
        _registered = False
        raise
    _HOOK.remove()


class _ExecThenNotify(importlib.abc.Loader):
    """Runs a module's own loader, then tells the hook that the module is complete."""

    def __init__(self, loader, hook: _AfterTransformersImport, name: str):
        self.loader, self.hook, self.name = loader, hook, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its real loader (importlib.resources, inspect and linecache ask it for files).
        module.__loader__ = module.__spec__.loader = self.loader
        own = self.name != "transformers"
        self.hook.open_imports += own
        try:
            self.loader.exec_module(module)
        finally:
            self.hook.open_imports -= own
        if not own:
            self.hook.transformers_imported = True
        if self.hook.transformers_imported and not self.hook.open_imports:
            register_auto_classes()

    def __getattr__(self, name):  # get_code, get_source, get_resource_reader, ... (runpy uses get_code)
        return getattr(self.loader, name)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """A post-import hook: registers once transformers is imported and no module of this package is half-run.

    Waiting for this package's own modules matters because importing, say, ``internvlx_hf.processing`` is what
    imports transformers; registering in the middle of it would import the half-run module."""

    def __init__(self):
        self.open_imports = 0
        self.transformers_imported = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith(_PACKAGE + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ExecThenNotify(spec.loader, self, fullname)
                return spec
        return None

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


_HOOK = _AfterTransformersImport()


def register_after_transformers_import() -> None:
    """Register now if transformers is imported already, else as soon as it is (see the module docstring)."""
    if "transformers" in sys.modules:
        register_auto_classes()
    else:
        _HOOK.install()


__all__ = ["register_after_transformers_import", "register_auto_classes"]
