"""An OpenAI-compatible chat-completions server for InternVL-X checkpoints, built from `transformers serve`'s parts.

transformers' own server (`transformers.cli.serving`: its FastAPI app, model manager, chat-completions handler,
generation threads and streaming) does the serving; this module only teaches it our model. Out of the box
`transformers serve DIR --trust-remote-code` cannot serve a remote-code checkpoint (transformers 5.23):

1. `ModelManager._load_model` loads ``getattr(transformers, config.architectures[0])``, which does not exist for a
   remote-code class (it ignores ``auto_map``);
2. `ModelManager.get_model_modality` knows only the classes of transformers' own Auto mappings and answers every
   request with "Unknown modality for: InternVLXForConditionalGeneration";
3. `GET /v1/models` lists the models of the Hugging Face cache whose architecture transformers knows, so a served
   local folder is not listed.

The hooks used, all on subclasses (nothing in transformers is patched or mutated), in `InternVLXModelManager`:

- ``ModelManager._load_model``: an InternVL-X checkpoint loads with ``AutoModelForImageTextToText`` and
  ``trust_remote_code``; every other model as transformers loads it;
- ``ModelManager.load_model_and_processor``: the chat template's end-of-turn token (e.g. ``<|im_end|>``) joins the
  generation config's eos ids, as `internvlx chat` stops there;
- ``ModelManager.get_model_modality``: an InternVL-X model is routed as ``Modality.VLM`` (image-text-to-text);
- ``ModelManager.get_gen_models``: ``GET /v1/models`` lists the served model;

and in `InternVLXChatCompletionHandler`, ``ChatCompletionHandler.get_processor_inputs_from_messages``: the request's
images (file paths, ``data:`` URIs, http(s) URLs) are loaded there, so an image that cannot be loaded is a 400 naming
it instead of a 500. `build_app` assembles the app the way `transformers.cli.serve.Serve` does. These are internals of
transformers' serving code, which changes between releases, so the releases it was tested with are pinned:
`TESTED_TRANSFORMERS`, checked by `check_serving_available`.

    from internvlx_hf.serving import serve
    serve("./InternVL-X-2B", host="127.0.0.1", port=8000)  # blocks; POST /v1/chat/completions, GET /v1/models
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

# transformers releases whose serving internals (the hooks above) this module was tested against.
TESTED_TRANSFORMERS = ">=5.23,<5.24"
# What `transformers serve` imports (transformers' own check, `is_serve_available`), as pip names them.
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")
INSTALL_HINT = 'pip install "internvlx-hf[serve]"'


class ServingUnavailable(ImportError):
    """The server cannot run here: a package of the ``serve`` extra is missing, or transformers is untested."""


def check_serving_available(transformers_version: str | None = None) -> None:
    """Raise `ServingUnavailable` (one line: what is missing and the command that fixes it) unless transformers'
    serving code can run here and is a release this module was tested with."""
    import importlib.util

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServingUnavailable(f"serving needs {', '.join(missing)} (transformers' server): {INSTALL_HINT}")
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if Version(transformers_version) not in SpecifierSet(TESTED_TRANSFORMERS):
        raise ServingUnavailable(
            f"serving builds on internals of transformers' server (ModelManager._load_model, get_model_modality, "
            f"ChatCompletionHandler), tested with transformers {TESTED_TRANSFORMERS}; this is transformers "
            f"{transformers_version}. Install a tested release: pip install \"transformers{TESTED_TRANSFORMERS}\""
        )


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@functools.lru_cache(maxsize=None)  # one set of classes per process
def serving_classes():
    """``(InternVLXModelManager, InternVLXChatCompletionHandler, InvalidMessages)``: the subclasses of transformers'
    serving classes and the 400 they raise. Defined on first use, as transformers' serving modules import fastapi /
    openai (the ``serve`` extra) and are only usable once `check_serving_available` passed."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import Modality

    from .generation import end_of_turn_token_ids
    from .modeling.configuration_internvlx import InternVLXConfig
    from .processing.image_processing_internvlx import describe_image_input, load_image_input

    model_type = InternVLXConfig.model_type

    class InvalidMessages(HTTPException):
        """A 400 about the request's messages (an image that cannot be loaded, a malformed part)."""

        def __init__(self, detail: str):
            super().__init__(status_code=400, detail=detail)

        @staticmethod
        async def respond(request, error: "InvalidMessages") -> JSONResponse:
            """The error as OpenAI shapes it (``error.message``, which OpenAI clients show in their exception) and
            as FastAPI does (``detail``)."""
            body = {"message": error.detail, "type": "invalid_request_error", "param": "messages", "code": None}
            return JSONResponse({"error": body, "detail": error.detail}, status_code=error.status_code)

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
        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            from transformers import AutoConfig, AutoModelForImageTextToText

            model_id, revision = model_id_and_revision.split("@", 1)
            if gguf_file is None:
                config = AutoConfig.from_pretrained(model_id, revision=revision,
                                                    trust_remote_code=self.trust_remote_code)
                if config.model_type == model_type:
                    if progress_callback is not None:
                        progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "model"})
                    kwargs = self.model_loading_kwargs(revision, tqdm_class)
                    return AutoModelForImageTextToText.from_pretrained(model_id, **kwargs).eval()
            return super()._load_model(model_id_and_revision, tqdm_class=tqdm_class,
                                       progress_callback=progress_callback, gguf_file=gguf_file)

        # Hook 1b: transformers' generation stops at generation_config's eos only; `internvlx chat` also stops at the
        # chat template's end-of-turn token (e.g. <|im_end|>), which a checkpoint's generation_config may lack.
        def load_model_and_processor(self, model_id_and_revision, *args, **kwargs):
            model, processor = super().load_model_and_processor(model_id_and_revision, *args, **kwargs)
            if _model_type(model) == model_type and not getattr(model, "_internvlx_turn_end_set", False):
                model.generation_config.eos_token_id = end_of_turn_token_ids(processor, model.generation_config)
                model._internvlx_turn_end_set = True
            return model, processor

        # Hook 2: transformers' modality table holds only its own classes ("Unknown modality" otherwise).
        @staticmethod
        def get_model_modality(model, processor=None):
            if _model_type(model) == model_type:
                return Modality.VLM
            return ModelManager.get_model_modality(model, processor=processor)

        # Hook 3: `GET /v1/models` scans the Hugging Face cache for architectures transformers knows; a server pinned
        # to one model lists that one (the id a request's "model" must name, or leave out).
        def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
            if self.force_model is None:
                return ModelManager.get_gen_models(cache_dir)
            owner = "local" if os.path.isdir(self.force_model) else self.force_model.partition("/")[0]
            return [{"id": self.force_model, "object": "model", "created": self.created, "owned_by": owner}]

    class InternVLXChatCompletionHandler(ChatCompletionHandler):
        """transformers' chat-completions handler, with the request's images loaded before the processor sees them:
        an image that cannot be loaded (a missing file, bad base64, an unreachable URL) is a 400 that names it."""

        # Hook 4 (a static method in transformers too): OpenAI messages -> the processor's chat messages.
        @staticmethod
        def get_processor_inputs_from_messages(messages, modality):
            try:
                converted = ChatCompletionHandler.get_processor_inputs_from_messages(messages, modality)
            except (KeyError, TypeError, AttributeError) as error:
                raise InvalidMessages(f"malformed messages ({type(error).__name__}: {error}); each message needs a "
                                      "role and a content: a string, or a list of {'type': 'text', 'text': ...} and "
                                      "{'type': 'image_url', 'image_url': {'url': ...}} parts") from None
            return [_with_loaded_images(index, message) for index, message in enumerate(converted)]

    def _with_loaded_images(index: int, message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        loaded, count = [], 0
        for part in content:
            if part.get("type") == "image" and isinstance(part.get("url"), str):
                where = f"messages[{index}]: {describe_image_input(count, part['url'])}"
                try:
                    image = load_image_input(part["url"], where)
                except FileNotFoundError:  # the processor's message lists Python inputs (PIL, arrays); not here
                    raise InvalidMessages(f"{where}: no such file on the server; send the image as a "
                                          "data:image/png;base64,... URI or an http(s) URL, or name a file on the "
                                          "server's machine") from None
                except (ValueError, TypeError, OSError) as error:  # bad base64, not an image, unreachable URL, ...
                    raise InvalidMessages(str(error)) from None
                part = {"type": "image", "image": image}
                count += 1
            loaded.append(part)
        return {**message, "content": loaded}

    return InternVLXModelManager, InternVLXChatCompletionHandler, InvalidMessages


def build_app(model: str, *, device: str | int = "cpu", dtype: str = "auto", trust_remote_code: bool = True,
              attn_implementation: str | None = None, model_kwargs: dict[str, Any] | None = None):
    """transformers' FastAPI app serving ``model`` (a checkpoint folder or Hub id), loaded now.

    Assembled like `transformers.cli.serve.Serve` (same handlers, same routes: ``/v1/chat/completions``,
    ``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``, ...) with `InternVLXModelManager` and
    `InternVLXChatCompletionHandler` in place of transformers' manager and chat handler. ``model_kwargs`` go to
    ``from_pretrained`` (e.g. a ``quantization_config``).
    """
    check_serving_available()
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    manager_class, chat_handler_class, invalid_messages = serving_classes()
    manager = manager_class(device=str(device), dtype=dtype, trust_remote_code=trust_remote_code,
                            attn_implementation=attn_implementation, force_model=model, model_kwargs=model_kwargs)
    state = GenerationState()
    app = build_server(
        manager,
        chat_handler_class(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
    )
    app.add_exception_handler(invalid_messages, invalid_messages.respond)
    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_kwargs) -> None:
    """Serve ``model`` on ``host:port`` with uvicorn until interrupted (`build_app` takes ``app_kwargs``)."""
    import uvicorn

    app = build_app(model, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["INSTALL_HINT", "TESTED_TRANSFORMERS", "ServingUnavailable", "build_app", "check_serving_available",
           "serve", "serving_classes"]
