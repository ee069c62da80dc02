"""An OpenAI-compatible chat-completions server for InternVL-X checkpoints, built from `transformers serve`'s parts.

transformers' own server (`transformers.cli.serving`: its FastAPI app, model manager, chat-completions handler,
generation threads and streaming) does the serving; this module only teaches it our model and puts a trust boundary
in front of it. Out of the box `transformers serve DIR --trust-remote-code` cannot serve a remote-code checkpoint
(transformers 5.23):

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

and in `InternVLXChatCompletionHandler`:

- ``ChatCompletionHandler.handle_request``: the body is checked first (`serving_requests.validate_chat_request`:
  every client mistake is a 4xx with OpenAI's error object), then the request's images are read, fetched and
  decoded off the event loop under the server's `MediaPolicy` (`serving_media`: no local file and no URL unless
  allowed, size and pixel limits read before decoding), and a chat-template refusal is a 400;
- ``ChatCompletionHandler.get_processor_inputs_from_messages``: the decoded images reach the processor as images;
- ``ChatCompletionHandler._streaming`` / ``_non_streaming``: the prompt and ``max_tokens`` must fit the model's
  context (a 400 as OpenAI answers it), and without ``max_tokens`` the answer is capped to what fits.

`build_app` assembles the app the way `transformers.cli.serve.Serve` does and wraps it in
`serving_requests.RequestGate` (the routes served, the API key, the body size). These are internals of transformers'
serving code, which change between releases: `TESTED_TRANSFORMERS` lists the releases the hooks were tested on;
`check_serving_available` refuses an older release and warns once on a newer one.

    from internvlx_hf.serving import serve
    serve("./InternVL-X-2B", host="127.0.0.1", port=8000)  # blocks; POST /v1/chat/completions, GET /v1/models
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import os
import sys
import time
from typing import Any

from .serving_media import MediaPolicy, MediaRefused, load_request_image
from .serving_requests import API_KEY_ENV, InvalidRequest, RequestGate, RequestLimits, error_body, \
    validate_chat_request

# transformers releases whose serving internals (the hooks above) tests/test_serve.py passed on; docs/serving.md
# lists the runs. Older releases are refused; newer ones run with one warning line.
TESTED_TRANSFORMERS = ("5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.0", "5.21.1", "5.22.2", "5.23.0")
# The releases accepted without a warning: from the oldest tested one to the newest tested minor's patches.
SUPPORTED_TRANSFORMERS = ">=5.16.1,<5.24"
# What `transformers serve` imports (transformers' own check, `is_serve_available`), as pip names them.
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")
INSTALL_HINT = 'pip install "internvlx-hf[serve]"'

logger = logging.getLogger(__name__)


class ServingUnavailable(ImportError):
    """The server cannot run here: a package of the ``serve`` extra is missing, or transformers is too old."""


@functools.lru_cache(maxsize=None)  # one line per process and release
def _warn_untested(transformers_version: str) -> None:
    print(f"warning: transformers {transformers_version} is newer than the releases internvlx serve was tested with "
          f"({TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[-1]}); it builds on internals of transformers' server "
          "that may have changed: if requests fail, install a tested release: "
          f"pip install \"transformers{SUPPORTED_TRANSFORMERS}\"", file=sys.stderr, flush=True)


def check_serving_available(transformers_version: str | None = None) -> None:
    """Raise `ServingUnavailable` (one line: what is missing and the command that fixes it) unless transformers'
    serving code can run here on a release at least as new as the oldest tested one; print one warning line (once
    per process) on a release newer than every tested one."""
    import importlib.util

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServingUnavailable(f"serving needs {', '.join(missing)} (transformers' server): {INSTALL_HINT}")
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    version = Version(transformers_version)
    if version in SpecifierSet(SUPPORTED_TRANSFORMERS):
        return
    if version > Version(TESTED_TRANSFORMERS[-1]):
        _warn_untested(transformers_version)
        return
    raise ServingUnavailable(
        f"serving builds on internals of transformers' server (ModelManager._load_model, get_model_modality, "
        f"ChatCompletionHandler), tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[-1]}; this "
        f"is transformers {transformers_version}. Install a tested release: "
        f"pip install \"transformers{SUPPORTED_TRANSFORMERS}\""
    )


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening on ``host`` without an API key where clients beyond this machine can connect
    (None on a loopback address, or with a key)."""
    if api_key:
        return None
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(name).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface
    return (f"listening on {host}, beyond this machine, without an API key: any client that reaches it can use the "
            f"model and the media it may read or fetch; set --api-key KEY (or {API_KEY_ENV})")


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


# Whether the request being handled set max_tokens (read by the context check of `_streaming` / `_non_streaming`,
# which transformers calls without the body).
_REQUESTED_MAX_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar("internvlx_max_tokens",
                                                                                   default=None)


@functools.lru_cache(maxsize=None)  # one set of classes per process
def serving_classes():
    """``(InternVLXModelManager, InternVLXChatCompletionHandler, InvalidRequest)``: the subclasses of transformers'
    serving classes and the client error they raise. Defined on first use, as transformers' serving modules import
    fastapi / openai (the ``serve`` extra) and are only usable once `check_serving_available` passed."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import Modality

    from .generation import end_of_turn_token_ids
    from .modeling.configuration_internvlx import InternVLXConfig
    from .processing.image_processing_internvlx import describe_image_input

    model_type = InternVLXConfig.model_type

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

            model_id, revision = model_id_and_revision.split("@", 1)
            if kwargs.get("gguf_file") is None:
                config = AutoConfig.from_pretrained(model_id, revision=revision,
                                                    trust_remote_code=self.trust_remote_code)
                if config.model_type == model_type:
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
        """transformers' chat-completions handler behind the checks of `serving_requests` and `serving_media`.

        ``media_policy``: what the request's images may be read or fetched from, and their limits; ``limits``:
        the request's (images per request; ``max_context`` and ``vocab_size`` are the served model's).
        """

        def __init__(self, *args, media_policy: MediaPolicy | None = None, limits: RequestLimits | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.media_policy = media_policy or MediaPolicy()
            self.limits = limits or RequestLimits()

        # Hook 4: the request is checked, and its images loaded, before transformers reads it.
        async def handle_request(self, body, request_id):
            from jinja2.exceptions import TemplateError

            body, images = validate_chat_request(body, self.limits)
            if images:
                # Reading, fetching and decoding run on a worker thread: the event loop keeps serving (a request
                # whose image URL points back at this server would otherwise wait for itself).
                loaded = await asyncio.to_thread(self._load_images, body["messages"], images)
                body["messages"] = loaded
            token = _REQUESTED_MAX_TOKENS.set(body.get("max_tokens"))
            try:
                return await super().handle_request(body, request_id)
            except TemplateError as error:  # the chat template's raise_exception: the conversation's shape
                raise InvalidRequest(f"The chat template refused the messages: {error}", "messages") from None
            finally:
                _REQUESTED_MAX_TOKENS.reset(token)

        def _load_images(self, messages: list[dict], images: list[tuple[str, str]]) -> list[dict]:
            """``messages`` with each image part's URL replaced by the decoded image (transformers passes a
            non-string ``url`` through to `get_processor_inputs_from_messages`)."""
            decoded = iter(images)
            converted, count = [], 0
            for index, message in enumerate(messages):
                content = message.get("content")
                if not isinstance(content, list):
                    converted.append(message)
                    continue
                parts = []
                for part in content:
                    if part.get("type") == "image_url":
                        url, param = next(decoded)
                        where = f"messages[{index}]: {describe_image_input(count, url)}"
                        try:
                            image = load_request_image(url, where, self.media_policy)
                        except MediaRefused as error:
                            raise InvalidRequest(str(error), param) from None
                        part = {"type": "image_url", "image_url": {"url": image}}
                        count += 1
                    parts.append(part)
                converted.append({**message, "content": parts})
            return converted

        # Hook 5 (a static method in transformers too): OpenAI messages -> the processor's chat messages.
        @staticmethod
        def get_processor_inputs_from_messages(messages, modality):
            try:
                converted = ChatCompletionHandler.get_processor_inputs_from_messages(messages, modality)
            except (KeyError, TypeError, AttributeError) as error:
                raise InvalidRequest(f"malformed messages ({type(error).__name__}: {error}); each message needs a "
                                     "role and a content: a string, or a list of {'type': 'text', 'text': ...} and "
                                     "{'type': 'image_url', 'image_url': {'url': ...}} parts", "messages") from None
            return [_with_decoded_images(message) for message in converted]

        # Hook 6: the prompt (known once the processor ran) and max_tokens must fit the model's context.
        def _fit_context(self, inputs, gen_config) -> None:
            context = self.limits.max_context
            if context is None:
                return
            prompt = inputs["input_ids"]
            prompt = len(prompt) if isinstance(prompt, list) else int(prompt.shape[-1])
            requested = _REQUESTED_MAX_TOKENS.get()
            completion = requested if requested is not None else 1  # without max_tokens: at least one token
            if prompt + completion > context:
                asked = f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion)" if \
                    requested is not None else f"{prompt} tokens in the messages, and at least one to answer"
                raise InvalidRequest(
                    f"This model's maximum context length is {context} tokens. However, you requested {asked}. "
                    "Please reduce the length of the messages (fewer or smaller images, shorter text) or the "
                    "completion (max_tokens).", "messages", code="context_length_exceeded")
            if requested is None:  # transformers' default (at least 1024 new tokens), within the context
                gen_config.max_new_tokens = min(gen_config.max_new_tokens or context, context - prompt)

        # Both also hand generation the processor's tokenizer instead of the processor: transformers passes it to
        # `generate(tokenizer=...)`, whose stop strings (the request's "stop") call `get_vocab`, which a processor
        # lacks (an AttributeError, a 500); decoding a processor's output is its tokenizer's decoding.
        def _streaming(self, request_id, model, processor, model_id, inputs, gen_config, *args, **kwargs):
            self._fit_context(inputs, gen_config)
            tokenizer = getattr(processor, "tokenizer", processor)
            return super()._streaming(request_id, model, tokenizer, model_id, inputs, gen_config, *args, **kwargs)

        async def _non_streaming(self, request_id, model, processor, model_id, inputs, gen_config, *args, **kwargs):
            self._fit_context(inputs, gen_config)
            tokenizer = getattr(processor, "tokenizer", processor)
            return await super()._non_streaming(request_id, model, tokenizer, model_id, inputs, gen_config, *args,
                                                **kwargs)

    def _with_decoded_images(message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        parts = []
        for part in content:
            if part.get("type") == "image" and "url" in part:
                if isinstance(part["url"], str):  # not loaded by handle_request: never passed on to be read
                    raise InvalidRequest("an image part was not checked by the server", "messages")
                part = {"type": "image", "image": part["url"]}
            parts.append(part)
        return {**message, "content": parts}

    return InternVLXModelManager, InternVLXChatCompletionHandler, InvalidRequest


def _add_error_handlers(app) -> None:
    """Every error answered with OpenAI's error object: ours, FastAPI's (a body that is not JSON, or not an
    object), transformers' `HTTPException`s, and anything unexpected (a 500 whose traceback stays in the log)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def invalid_request(request, error: InvalidRequest):
        return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status)

    async def invalid_body(request, error: RequestValidationError):
        problems = error.errors()
        kind = problems[0].get("type") if problems else None
        if kind == "json_invalid":
            reason = (problems[0].get("ctx") or {}).get("error", "")
            message = f"We could not parse the JSON body of your request ({reason}); send a JSON object."
        elif kind == "missing":
            message = "The request has no body; send a JSON object."
        else:
            message = "The request body must be a JSON object."
        return JSONResponse(error_body(message), status_code=400)

    async def http_error(request, error: HTTPException):
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind), status_code=error.status_code, headers=error.headers)

    async def server_error(request, error: Exception):
        logger.error("internvlx serve: the request failed", exc_info=error)
        return JSONResponse(error_body("The server had an error while processing your request; its log has the "
                                       "details.", "server_error"), status_code=500)

    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def build_app(model: str, *, device: str | int = "cpu", dtype: str = "auto", trust_remote_code: bool = True,
              attn_implementation: str | None = None, model_kwargs: dict[str, Any] | None = None,
              api_key: str | None = None, media_policy: MediaPolicy | None = None,
              limits: RequestLimits | None = None):
    """transformers' FastAPI app serving ``model`` (a checkpoint folder or Hub id), loaded now, behind the gate.

    Assembled like `transformers.cli.serve.Serve` (same handlers) with `InternVLXModelManager` and
    `InternVLXChatCompletionHandler` in place of transformers' manager and chat handler, and wrapped in
    `RequestGate`: only ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health`` are answered;
    ``api_key`` (``Authorization: Bearer``) guards the first two; ``limits.max_request_bytes`` bounds a body.
    ``media_policy`` says what a request's images may be read or fetched from (default: data: URIs only, 20 MiB,
    40 megapixels). ``model_kwargs`` go to ``from_pretrained`` (e.g. a ``quantization_config``).
    """
    import dataclasses
    import inspect

    check_serving_available()
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    manager_class, chat_handler_class, _ = serving_classes()
    manager = manager_class(device=str(device), dtype=dtype, trust_remote_code=trust_remote_code,
                            attn_implementation=attn_implementation, force_model=model, model_kwargs=model_kwargs)
    loaded, _ = manager.load_model_and_processor(manager.process_model_name(model))  # loaded already: cached
    text_config = loaded.config.get_text_config()
    limits = dataclasses.replace(limits or RequestLimits(),
                                 max_context=getattr(text_config, "max_position_embeddings", None),
                                 vocab_size=getattr(text_config, "vocab_size", None))
    state = GenerationState()
    handlers = {
        "completion_handler": CompletionHandler(model_manager=manager, generation_state=state),
        "response_handler": ResponseHandler(model_manager=manager, generation_state=state),
        "transcription_handler": TranscriptionHandler(manager, state),
    }
    if "systemone_handler" in inspect.signature(build_server).parameters:  # transformers >= 5.20
        from transformers.cli.serving.systemone import SystemOneHandler

        handlers["systemone_handler"] = SystemOneHandler(model_manager=manager, generation_state=state)
    chat_handler = chat_handler_class(model_manager=manager, generation_state=state,
                                      media_policy=media_policy or MediaPolicy(), limits=limits)
    app = build_server(manager, chat_handler, generation_state=state, **handlers)
    _add_error_handlers(app)
    app.add_middleware(RequestGate, api_key=api_key, max_request_bytes=limits.max_request_bytes)
    return app


def run_app(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve an app of `build_app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_kwargs) -> None:
    """Serve ``model`` on ``host:port`` with uvicorn until interrupted (`build_app` takes ``app_kwargs``); warns
    (one line) when ``host`` reaches beyond this machine without an ``api_key``."""
    warning = exposure_warning(host, app_kwargs.get("api_key"))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    run_app(build_app(model, **app_kwargs), host=host, port=port, log_level=log_level)


__all__ = ["API_KEY_ENV", "INSTALL_HINT", "SUPPORTED_TRANSFORMERS", "TESTED_TRANSFORMERS", "MediaPolicy",
           "RequestLimits", "ServingUnavailable", "build_app", "check_serving_available", "exposure_warning",
           "run_app", "serve", "serving_classes"]
