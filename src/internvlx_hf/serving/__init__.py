"""`internvlx serve`: an OpenAI-compatible chat-completions server for InternVL-X checkpoints, built from
`transformers serve`'s parts, with a trust boundary and a budget for every request.

The package's modules, each with one job (import from here, not from them):

- `app`: transformers' server assembled with the classes below, `build_app`, `run_app`, `serve`;
- `manager`: `InternVLXModelManager`, transformers' model manager taught to load and route InternVL-X checkpoints;
- `handler`: `InternVLXChatCompletionHandler`, transformers' chat handler behind the checks, the worker threads and
  the generation queue (`manager` and `handler` import transformers' serving stack: loaded when an app is built);
- `queue`: `GenerationQueue`, the bound on requests waiting for the model, their fair order, the deadline;
- `connections`: uvicorn's protocol with a request deadline and a cap on open connections (loaded by `run_app`);
- `limits`: every bound and the reason for its default (`RequestLimits`, `ServerLimits`);
- `policy`: `MediaPolicy`, what a request's images may make the server read and fetch;
- `media`: reading, fetching, opening and decoding a request's images under the policy;
- `validation`: a chat-completions body checked as OpenAI's API defines it;
- `middleware`: the ASGI middleware in front of the app (routes, API key, body size and JSON, ``Host``);
- `exposure`: who can reach the server (the warning without a key, the ``Host`` names answered);
- `workers`: the worker threads and decode slots that keep the event loop free.

    from internvlx_hf.serving import serve
    serve("./InternVL-X-2B", host="127.0.0.1", port=8000)  # blocks; POST /v1/chat/completions, GET /v1/models

Importing the package imports neither FastAPI nor Pillow nor torch (`internvlx serve --help` shows the defaults at
once); `load_request_image` and `MediaRefused` load Pillow on first use.
"""

from __future__ import annotations

import importlib

from .app import (INSTALL_HINT, SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS, ServingUnavailable, build_app,
                  check_serving_available, host_checked, run_app, serve, serving_classes)
from .exposure import LOOPBACK_HOSTS, allowed_host_patterns, check_host_pattern, exposure_warning
from .limits import (API_KEY_ENV, DEFAULT_FETCH_TIMEOUT, DEFAULT_GENERATION_SLICE, DEFAULT_GENERATION_TIMEOUT,
                     DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_ACTIVE_GENERATIONS,
                     DEFAULT_MAX_CONCURRENT_DECODES, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                     DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_IMAGE_BYTES,
                     DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MAX_WAITING_REQUESTS, DEFAULT_REQUEST_TIMEOUT,
                     MAX_JSON_VALUES, ConnectionLimits, RequestLimits, ServerLimits, default_max_connections)
from .policy import MediaPolicy
from .validation import InvalidRequest, error_body, validate_chat_request

# Public names whose module imports Pillow: loaded on first use.
_LAZY = {"ACCEPTED_FORMATS": "media", "MediaRefused": "media", "load_request_image": "media"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["ACCEPTED_FORMATS", "API_KEY_ENV", "ConnectionLimits", "DEFAULT_FETCH_TIMEOUT",
           "DEFAULT_GENERATION_SLICE", "DEFAULT_GENERATION_TIMEOUT", "DEFAULT_KEEP_ALIVE_TIMEOUT",
           "DEFAULT_MAX_ACTIVE_GENERATIONS", "DEFAULT_MAX_CONCURRENT_DECODES",
           "DEFAULT_MAX_IMAGES_PER_REQUEST", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
           "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_REQUEST_IMAGE_BYTES", "DEFAULT_MAX_REQUEST_PIXELS",
           "DEFAULT_MAX_WAITING_REQUESTS", "DEFAULT_REQUEST_TIMEOUT", "INSTALL_HINT", "InvalidRequest",
           "LOOPBACK_HOSTS", "MAX_JSON_VALUES", "MediaPolicy", "MediaRefused", "RequestLimits",
           "SUPPORTED_TRANSFORMERS", "ServerLimits", "ServingUnavailable", "TESTED_TRANSFORMERS",
           "allowed_host_patterns", "build_app", "check_host_pattern", "check_serving_available",
           "default_max_connections", "error_body", "exposure_warning", "host_checked", "load_request_image",
           "run_app", "serve", "serving_classes", "validate_chat_request"]
