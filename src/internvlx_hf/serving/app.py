"""An OpenAI-compatible chat-completions server for InternVL-X checkpoints, built from `transformers serve`'s parts.

transformers' own server (`transformers.cli.serving`: its FastAPI app, model manager, chat-completions handler,
generation threads and streaming) does the serving; this module only teaches it our model, bounds the work a request
may cause, and puts a trust boundary in front of it. Out of the box `transformers serve DIR --trust-remote-code`
cannot serve a remote-code checkpoint (transformers 5.23):

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

- ``ChatCompletionHandler.handle_request``: composed of transformers' own steps (``_resolve_model``, the generation
  manager, ``get_processor_inputs_from_messages``, the processor's ``apply_chat_template``,
  ``_build_generation_config``, ``_streaming`` / ``_non_streaming``, in transformers' order, unchanged from 5.16 to
  5.23), with everything before generation moved off the event loop (`work.ServingWork`): the body is checked
  (`validation`), the request's images are read, fetched and opened under the server's `MediaPolicy` (`media`),
  decoded and tiled while the request holds a decode slot, and the chat template rendered and tokenized on a worker
  thread; the prompt and ``max_tokens`` must fit the model's context (a 400 as OpenAI answers it), and without
  ``max_tokens`` the answer is capped to what fits; a chat-template refusal is a 400;
- ``ChatCompletionHandler.get_processor_inputs_from_messages``: the decoded images reach the processor as images;
- generation gets the processor's tokenizer instead of the processor: transformers passes it to
  ``generate(tokenizer=...)``, whose stop strings (the request's "stop") call ``get_vocab``, which a processor lacks.

`build_app` assembles the app the way `transformers.cli.serve.Serve` does and wraps it in `gate.RequestGate` (the
routes served, the API key, the body's size and JSON); `run_app` adds `gate.HostGate` for where it listens. These are
internals of transformers' serving code, which change between releases: `TESTED_TRANSFORMERS` lists the releases the
hooks were tested on; `check_serving_available` refuses an older release and warns once on a newer one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .exposure import allowed_host_patterns, exposure_warning
from .gate import HostGate, RequestGate, parsed_body
from .limits import RequestLimits, ServerLimits
from .policy import MediaPolicy
from .validation import InvalidRequest, check_text_fits, error_body, validate_chat_request
from .work import ServingWork

# transformers releases whose serving internals (the hooks above) tests/test_serve.py passed on; docs/serving.md
# lists the runs. Older releases are refused; newer ones run with one warning line.
TESTED_TRANSFORMERS = ("5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.0", "5.21.1", "5.22.2", "5.23.0",
                       "5.24.0")
# The releases accepted without a warning: from the oldest tested one to the newest tested minor's patches.
SUPPORTED_TRANSFORMERS = ">=5.16.1,<5.25"
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


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def longest_token_chars(processor) -> int | None:
    """The characters of the longest token of ``processor``'s vocabulary, as spelled in it (None without one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return None
    return max((len(token) for token in vocab), default=None)


@functools.lru_cache(maxsize=None)  # one set of classes per process
def serving_classes():
    """``(InternVLXModelManager, InternVLXChatCompletionHandler, InvalidRequest)``: the subclasses of transformers'
    serving classes and the client error they raise. Defined on first use, as transformers' serving modules import
    fastapi / openai (the ``serve`` extra) and are only usable once `check_serving_available` passed."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import Modality

    from ..generation import end_of_turn_token_ids
    from ..modeling.configuration_internvlx import InternVLXConfig
    from ..processing.image_processing_internvlx import describe_image_input
    from .media import MediaRefused, decode_images, read_request_images

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

            # `id@revision`; a local folder has no revision (transformers 5.24 names it by its path alone, and an
            # `@` in a path is part of the path), as transformers' own `split_revision` reads it
            if os.path.exists(model_id_and_revision):
                model_id, revision = model_id_and_revision, None
            else:
                model_id, _, revision = model_id_and_revision.partition("@")
                revision = revision or None
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

    class InternVLXChatCompletionHandler(ChatCompletionHandler):
        """transformers' chat-completions handler behind the checks of `validation` and `media`, with the work
        before generation on the server's worker threads.

        ``media_policy``: what the request's images may be read or fetched from, and their limits; ``limits``: the
        request's (images per request; ``max_context``, ``vocab_size`` and ``longest_token_chars`` are the served
        model's); ``work``: the server's worker threads and decode slots.
        """

        def __init__(self, *args, media_policy: MediaPolicy | None = None, limits: RequestLimits | None = None,
                     work: ServingWork | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.media_policy = media_policy or MediaPolicy()
            self.limits = limits or RequestLimits()
            self.work = work or ServingWork()

        # Hook 4: transformers' steps, with the request checked first and the CPU work off the event loop.
        async def handle_request(self, body, request_id):
            work = self.work
            body, images = await work.prepare(self._check_body, parsed_body(body))
            self._validate_request(body)  # transformers' own (it logs the ignored fields)
            model_id, model, processor = self._resolve_model(body)
            modality = self.model_manager.get_model_modality(model, processor=processor)
            use_cb = self.generation_state.use_continuous_batching(model, modality)
            gen_manager = self.generation_state.get_manager(model_id, use_cb=use_cb)
            wheres = [f"messages[{index}]: {describe_image_input(count, url)}"
                      for count, (url, _, index) in enumerate(images)]
            if images:
                try:
                    opened = await read_request_images(
                        [(url, where, param) for (url, param, _), where in zip(images, wheres)], self.media_policy,
                        work)
                except MediaRefused as error:
                    raise InvalidRequest(str(error), error.param) from None
                async with work.decode_slot(sum(image.size[0] * image.size[1] for image in opened)):
                    inputs, prompt = await work.prepare(self._processor_inputs, body, opened, wheres, images,
                                                        processor, model, modality, use_cb)
                    del opened  # the decoded pixels go before the slot does
            else:
                inputs, prompt = await work.prepare(self._processor_inputs, body, [], [], [], processor, model,
                                                    modality, use_cb)
            gen_config = self._build_generation_config(body, model.generation_config, use_cb=use_cb)
            context = self.limits.max_context
            if body.get("max_tokens") is None and context is not None:  # transformers' default, within the context
                gen_config.max_new_tokens = min(gen_config.max_new_tokens or context, context - prompt)
            if use_cb:
                gen_manager.init_cb(model, gen_config)
            tokenizer = getattr(processor, "tokenizer", processor)
            if body.get("stream"):
                return self._streaming(request_id, model, tokenizer, model_id, inputs, gen_config,
                                       gen_manager=gen_manager)
            return await self._non_streaming(request_id, model, tokenizer, model_id, inputs, gen_config,
                                             gen_manager=gen_manager)

        def _check_body(self, body) -> tuple[dict, list[tuple[str, str, int]]]:
            """The checked body and its images as ``(url, param, message index)``."""
            body, images = validate_chat_request(body, self.limits)
            check_text_fits(body["messages"], self.limits)
            indexed = []
            for url, param in images:
                indexed.append((url, param, int(param[len("messages["):param.index("]")])))
            return body, indexed

        def _processor_inputs(self, body, opened, wheres, images, processor, model, modality, use_cb):
            """On a worker thread: the images decoded, the messages rendered and tokenized by the processor, the
            prompt checked against the context; ``(inputs on the model's device, prompt tokens)``."""
            from jinja2.exceptions import TemplateError

            for image, where, (_, param, _) in zip(opened, wheres, images):
                try:
                    decode_images([image], [where])
                except MediaRefused as error:
                    raise InvalidRequest(str(error), param) from None
            messages = _with_images(body["messages"], opened)
            processor_inputs = self.get_processor_inputs_from_messages(messages, modality)
            del messages
            try:
                inputs = processor.apply_chat_template(processor_inputs, add_generation_prompt=True,
                                                       tools=body.get("tools") or None,
                                                       return_tensors=None if use_cb else "pt", return_dict=True,
                                                       tokenize=True, **self.chat_template_kwargs)
            except TemplateError as error:  # the chat template's raise_exception: the conversation's shape
                raise InvalidRequest(f"The chat template refused the messages: {error}", "messages") from None
            prompt = inputs["input_ids"]
            prompt = len(prompt) if isinstance(prompt, list) else int(prompt.shape[-1])
            self._fit_context(prompt, body.get("max_tokens"))
            if not use_cb:
                inputs = inputs.to(model.device)
            return inputs, prompt

        def _fit_context(self, prompt: int, requested: int | None) -> None:
            """The prompt (known once the processor ran) and max_tokens must fit the model's context."""
            context = self.limits.max_context
            if context is None:
                return
            completion = requested if requested is not None else 1  # without max_tokens: at least one token
            if prompt + completion > context:
                asked = f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion)" if \
                    requested is not None else f"{prompt} tokens in the messages, and at least one to answer"
                raise InvalidRequest(
                    f"This model's maximum context length is {context} tokens. However, you requested {asked}. "
                    "Please reduce the length of the messages (fewer or smaller images, shorter text) or the "
                    "completion (max_tokens).", "messages", code="context_length_exceeded")

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

    def _with_images(messages: list[dict], images: list) -> list[dict]:
        """``messages`` with each image part's URL replaced by its decoded image (transformers passes a non-string
        ``url`` through to `get_processor_inputs_from_messages`)."""
        decoded = iter(images)
        converted = []
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list):
                converted.append(message)
                continue
            parts = [{"type": "image_url", "image_url": {"url": next(decoded)}} if part.get("type") == "image_url"
                     else part for part in content]
            converted.append({**message, "content": parts})
        return converted

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


class _LoadingLine(logging.Filter):
    """transformers' manager logs ``Loading MODEL@main`` (its Hub revision) even for a local folder: that record is
    left out while `build_app` loads the model, which says what it loads itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Loading ")


@contextlib.contextmanager
def _loading_said_once(model: str):
    import transformers.cli.serving.model_manager as model_manager

    where = f"the checkpoint folder {model}" if os.path.isdir(model) else f"{model} (Hub, revision main)"
    print(f"internvlx serve: loading {where}", file=sys.stderr, flush=True)
    log = model_manager.logger
    line = _LoadingLine()
    log.addFilter(line)
    try:
        yield
    finally:
        log.removeFilter(line)


def build_app(model: str, *, device: str | int = "cpu", dtype: str = "auto", trust_remote_code: bool = True,
              attn_implementation: str | None = None, model_kwargs: dict[str, Any] | None = None,
              api_key: str | None = None, media_policy: MediaPolicy | None = None,
              limits: RequestLimits | None = None, server_limits: ServerLimits | None = None):
    """transformers' FastAPI app serving ``model`` (a checkpoint folder or Hub id), loaded now, behind the gate.

    Assembled like `transformers.cli.serve.Serve` (same handlers) with `InternVLXModelManager` and
    `InternVLXChatCompletionHandler` in place of transformers' manager and chat handler, and wrapped in
    `RequestGate`: only ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health`` are answered;
    ``api_key`` (``Authorization: Bearer``) guards the first two; ``limits`` bound a request's body,
    ``media_policy`` what its images may be read or fetched from and how big they may be (default: data: URIs only;
    the limits of `limits`), ``server_limits`` what the server does at once. ``model_kwargs`` go to
    ``from_pretrained`` (e.g. a ``quantization_config``). The ``Host`` check depends on where the app listens:
    `run_app` adds it (`host_checked` for another ASGI server).
    """
    import inspect

    check_serving_available()
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    from .media import release_freed_images

    release_freed_images()
    manager_class, chat_handler_class, _ = serving_classes()
    with _loading_said_once(model):
        manager = manager_class(device=str(device), dtype=dtype, trust_remote_code=trust_remote_code,
                                attn_implementation=attn_implementation, force_model=model,
                                model_kwargs=model_kwargs)
    loaded, processor = manager.load_model_and_processor(manager.process_model_name(model))  # loaded: cached
    text_config = loaded.config.get_text_config()
    limits = dataclasses.replace(limits or RequestLimits(),
                                 max_context=getattr(text_config, "max_position_embeddings", None),
                                 vocab_size=getattr(text_config, "vocab_size", None),
                                 longest_token_chars=longest_token_chars(processor))
    work = ServingWork(server_limits)
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
                                      media_policy=media_policy or MediaPolicy(), limits=limits, work=work)
    app = build_server(manager, chat_handler, generation_state=state, **handlers)
    _add_error_handlers(app)
    app.add_middleware(RequestGate, api_key=api_key, max_request_bytes=limits.max_request_bytes,
                       max_json_values=limits.max_json_values, work=work)
    return app


def host_checked(app, host: str, allowed_hosts: Sequence[str] | None = None):
    """``app`` behind `HostGate` when a server listening on ``host`` should check ``Host`` headers
    (`exposure.allowed_host_patterns`: on a loopback address, loopback names only unless ``allowed_hosts`` adds
    some), else ``app`` itself."""
    patterns = allowed_host_patterns(host, allowed_hosts)
    return app if patterns is None else HostGate(app, patterns)


def run_app(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
            allowed_hosts: Sequence[str] | None = None) -> None:
    """Serve an app of `build_app` with uvicorn until interrupted, answering the ``Host`` names `host_checked`
    allows."""
    import uvicorn

    uvicorn.run(host_checked(app, host, allowed_hosts), host=host, port=port, log_level=log_level)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          allowed_hosts: Sequence[str] | None = None, **app_kwargs) -> None:
    """Serve ``model`` on ``host:port`` with uvicorn until interrupted (`build_app` takes ``app_kwargs``); warns
    (one line) when ``host`` reaches beyond this machine without an ``api_key``."""
    warning = exposure_warning(host, app_kwargs.get("api_key"))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    run_app(build_app(model, **app_kwargs), host=host, port=port, log_level=log_level, allowed_hosts=allowed_hosts)


__all__ = ["INSTALL_HINT", "SUPPORTED_TRANSFORMERS", "TESTED_TRANSFORMERS", "ServingUnavailable", "build_app",
           "check_serving_available", "host_checked", "run_app", "serve", "serving_classes"]
