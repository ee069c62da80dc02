"""`InternVLXModelManager`: transformers' serving model manager taught to load and route InternVL-X checkpoints.

Out of the box `transformers serve DIR --trust-remote-code` cannot serve a remote-code checkpoint (transformers
5.23): ``ModelManager._load_model`` loads ``getattr(transformers, config.architectures[0])``, which does not exist for
a remote-code class (it ignores ``auto_map``); ``get_model_modality`` knows only the classes of transformers' own Auto
mappings ("Unknown modality for: InternVLXForConditionalGeneration"); ``GET /v1/models`` lists the models of the
Hugging Face cache whose architecture transformers knows, so a served local folder is not listed. The hooks below
fix each, on a subclass (nothing in transformers is patched).

This module imports transformers' serving stack (FastAPI, openai: the ``serve`` extra): `app.build_app` imports it
once `app.check_serving_available` passed; importing `internvlx_hf.serving` does not.
"""

from __future__ import annotations

import os
import time
from typing import Any

from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import Modality

from ..generation import end_of_turn_token_ids
from ..modeling.configuration_internvlx import InternVLXConfig

MODEL_TYPE = InternVLXConfig.model_type


def model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


class InternVLXModelManager(ModelManager):
    """transformers' `ModelManager` that loads InternVL-X checkpoints and routes them as image-text-to-text.

    ``model_kwargs`` are added to ``from_pretrained``'s arguments for InternVL-X checkpoints (e.g. a
    ``quantization_config``); they override the manager's own (dtype, device_map, attention).
    """

    def __init__(self, *args, model_kwargs: dict[str, Any] | None = None, **kwargs):
        self.model_kwargs = dict(model_kwargs or {})
        self.created = int(time.time())
        super().__init__(*args, **kwargs)  # loads `force_model`, so the attributes above come first

    def model_loading_kwargs(self, revision: str, tqdm_class: type | None = None) -> dict[str, Any]:
        """``from_pretrained`` arguments of an InternVL-X checkpoint: the server's options, then model_kwargs."""
        kwargs: dict[str, Any] = {
            "revision": revision,
            "dtype": self.dtype,
            "device_map": self.device,
            "trust_remote_code": self.trust_remote_code,
            "attn_implementation": self.attn_implementation,
            "quantization_config": self.get_quantization_config(),
            "tqdm_class": tqdm_class,
        }
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kwargs.update(self.model_kwargs)
        return kwargs

    # Hook 1: transformers resolves `config.architectures[0]` on the transformers module, which a remote-code
    # class is not on; an InternVL-X checkpoint loads through the Auto class its auto_map names instead.
    # (`gguf_file` exists from transformers 5.17 on: passed on only when given.)
    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, **kwargs):
        from transformers import AutoConfig, AutoModelForImageTextToText

        # `id@revision`; a local folder has no revision (transformers 5.24 names it by its path alone, and an
        # `@` in a path is part of the path), as transformers' own `split_revision` reads it
        if os.path.exists(model_id_and_revision):
            model_id, revision = model_id_and_revision, None
        else:
            model_id, _, revision = model_id_and_revision.partition("@")
            revision = revision or None
        if kwargs.get("gguf_file") is None:
            config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=self.trust_remote_code)
            if config.model_type == MODEL_TYPE:
                if progress_callback is not None:
                    progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "model"})
                loading = self.model_loading_kwargs(revision, tqdm_class)
                return AutoModelForImageTextToText.from_pretrained(model_id, **loading).eval()
        return super()._load_model(model_id_and_revision, tqdm_class=tqdm_class,
                                   progress_callback=progress_callback, **kwargs)

    # Hook 1b: transformers' generation stops at generation_config's eos only; `internvlx chat` also stops at the
    # chat template's end-of-turn token (e.g. <|im_end|>), which a checkpoint's generation_config may lack.
    def load_model_and_processor(self, model_id_and_revision, *args, **kwargs):
        model, processor = super().load_model_and_processor(model_id_and_revision, *args, **kwargs)
        if model_type(model) == MODEL_TYPE and not getattr(model, "_internvlx_turn_end_set", False):
            model.generation_config.eos_token_id = end_of_turn_token_ids(processor, model.generation_config)
            model._internvlx_turn_end_set = True
        return model, processor

    # Hook 2: transformers' modality table holds only its own classes ("Unknown modality" otherwise).
    @staticmethod
    def get_model_modality(model, processor=None):
        if model_type(model) == MODEL_TYPE:
            return Modality.VLM
        return ModelManager.get_model_modality(model, processor=processor)

    # Hook 3: `GET /v1/models` scans the Hugging Face cache for architectures transformers knows; a server pinned
    # to one model lists that one (the id a request's "model" must name, or leave out).
    # (`get_gen_models` up to transformers 5.23, `list_models` from 5.24 on)
    def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
        if self.force_model is None:
            return ModelManager.get_gen_models(cache_dir)
        return self._pinned_model()

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        if self.force_model is None:
            return super().list_models(cache_dir)
        return self._pinned_model()

    def _pinned_model(self) -> list[dict]:
        owner = "local" if os.path.isdir(self.force_model) else self.force_model.partition("/")[0]
        return [{"id": self.force_model, "object": "model", "created": self.created, "owned_by": owner}]


__all__ = ["MODEL_TYPE", "InternVLXModelManager", "model_type"]
