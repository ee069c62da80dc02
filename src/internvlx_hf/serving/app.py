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

Both fixes live on subclasses (nothing in transformers is patched or mutated), each in its own module, imported
only when an app is built (they import transformers' serving stack, FastAPI and openai):

- `manager.InternVLXModelManager` (transformers' ``ModelManager``): loads an InternVL-X checkpoint with
  ``AutoModelForImageTextToText`` and ``trust_remote_code``, stops at the chat template's end-of-turn token, routes
  the model as ``Modality.VLM`` and lists the served model on ``GET /v1/models``;
- `handler.InternVLXChatCompletionHandler` (transformers' ``ChatCompletionHandler``): transformers' steps behind the
  request's checks, with the work before generation off the event loop and generation in a bounded, fair queue
  with a deadline (`queue.GenerationQueue`).

`build_app` assembles the app the way `transformers.cli.serve.Serve` does and wraps it in `middleware.RequestGate` (the
routes served, the API key, the body's size and JSON); `run_app` adds `middleware.HostGate` for where it listens and
serves it with uvicorn under the connection bounds of `connections`. These are
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
from collections.abc import Sequence
from typing import Any

from .exposure import allowed_host_patterns, exposure_warning
from .middleware import HostGate, RequestGate
from .limits import ACCEPT_BACKLOG, RETRY_AFTER_SECONDS, ConnectionLimits, RequestLimits, ServerLimits
from .policy import MediaPolicy
from .queue import GenerationQueue
from .validation import InvalidRequest, error_body
from .workers import ServingWork

# transformers releases whose serving internals (the hooks above) tests/test_serve.py passed on;
# experiments/serve-transformers-releases/README.md lists the runs. Older releases are refused; newer ones run with
# one warning line.
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


def serving_classes():
    """``(InternVLXModelManager, InternVLXChatCompletionHandler, InvalidRequest)``: the subclasses of transformers'
    serving classes (`manager`, `handler`) and the client error they raise. Their modules import transformers'
    serving stack (fastapi, openai: the ``serve`` extra), usable once `check_serving_available` passed."""
    from .handler import InternVLXChatCompletionHandler
    from .manager import InternVLXModelManager

    return InternVLXModelManager, InternVLXChatCompletionHandler, InvalidRequest


def reserved_tags(processor) -> tuple[str, ...]:
    """The strings an InternVL-X processor and chat template read as image input, refused in a message's text:
    ``<image>`` and ``<video>`` (the chat template's placeholders) and the processor's ``<img>``, ``</img>`` and
    ``<IMG_CONTEXT>``; () for a processor without them."""
    tags = [getattr(processor, "image_placeholder", None), "<video>", getattr(processor, "start_image_token", None),
            getattr(processor, "end_image_token", None), getattr(processor, "image_token", None)]
    if tags[0] is None and tags[-1] is None:
        return ()
    return tuple(tag for tag in tags if tag)


def _add_error_handlers(app) -> None:
    """Every error answered with OpenAI's error object: ours, FastAPI's (a body that is not JSON, or not an
    object), transformers' `HTTPException`s, and anything unexpected (a 500 whose traceback stays in the log)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def invalid_request(request, error: InvalidRequest):
        retry_after = getattr(error, "retry_after", None)  # queue.ServerBusy
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                            headers=headers)

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

    from .manager import MODEL_TYPE
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
                                 longest_token_chars=longest_token_chars(processor),
                                 reserved_tags=reserved_tags(processor) if _model_type(loaded) == MODEL_TYPE else ())
    server_limits = server_limits or ServerLimits()
    work = ServingWork(server_limits)
    queue = GenerationQueue(server_limits.max_waiting_requests, RETRY_AFTER_SECONDS,
                            max_running=server_limits.max_active_generations)
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
                                      media_policy=media_policy or MediaPolicy(), limits=limits, work=work,
                                      queue=queue, generation_timeout=server_limits.generation_timeout,
                                      generation_slice=server_limits.generation_slice)
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
            allowed_hosts: Sequence[str] | None = None, connection_limits: ConnectionLimits | None = None) -> None:
    """Serve an app of `build_app` with uvicorn until interrupted, answering the ``Host`` names `host_checked`
    allows, under ``connection_limits`` (`connections`: a request deadline, the keep-alive timeout, a cap on open
    connections from the open-file limit)."""
    import uvicorn

    from .connections import bounded_protocol

    bounds = connection_limits or ConnectionLimits()
    uvicorn.run(host_checked(app, host, allowed_hosts), host=host, port=port, log_level=log_level,
                http=bounded_protocol(bounds), timeout_keep_alive=bounds.keep_alive_timeout, backlog=ACCEPT_BACKLOG)


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
