"""`internvlx serve`: an OpenAI-compatible chat-completions server for a checkpoint (transformers' own server)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..hub.resolve import check_model_argument
from ..serving import (API_KEY_ENV, DEFAULT_FETCH_TIMEOUT, DEFAULT_GENERATION_SLICE, DEFAULT_GENERATION_TIMEOUT,
                       DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_ACTIVE_GENERATIONS, DEFAULT_MAX_CONCURRENT_DECODES,
                       DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                       DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_IMAGE_BYTES,
                       DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MAX_WAITING_REQUESTS, DEFAULT_REQUEST_TIMEOUT,
                       LOOPBACK_HOSTS, ConnectionLimits, MediaPolicy, RequestLimits, ServerLimits, check_host_pattern,
                       default_max_connections)
from .command import CLIError, Command
from .quantization import add_quantization_arguments, check_quantization_available, quantization_flag

_SERVE_DESCRIPTION = """\
Serve MODEL (a checkpoint folder or Hub id) over HTTP with the OpenAI chat-completions API, through transformers'
own server (`transformers serve`: FastAPI + uvicorn, its request handling, generation thread and streaming), taught
to load an InternVL-X checkpoint (AutoModelForImageTextToText, trust_remote_code) and to route it as an
image-text-to-text model. The model is loaded once, before the server starts listening.

Endpoints (transformers'): POST /v1/chat/completions (streaming with "stream": true), GET /v1/models (the served
model; its id is MODEL as given here) and GET /health.
Images in a message: {"type": "image_url", "image_url": {"url": URL}} where URL is a data:image/...;base64 URI;
a file path or file:// URL only inside --allowed-local-media-path; an http(s) URL only from a host in
--allowed-media-domains. Every image is refused above --max-image-bytes and --max-image-pixels. A client mistake
(a bad field, an image the server may not read) gets a 4xx with OpenAI's error object. Decoding follows the request
(temperature, top_p, max_tokens, stop) on top of the checkpoint's generation_config.json.

Safe by default: this machine only (127.0.0.1, and only requests naming it: localhost, 127.0.0.1, ::1, against DNS
rebinding; --allowed-hosts adds names), no local file, no URL fetch. Before listening beyond it (--host 0.0.0.0), set
--api-key (or INTERNVLX_API_KEY): without one the server warns, and any client that reaches it can use the model.
Only POST /v1/chat/completions, GET /v1/models and GET /health are answered.

Every request is bounded: its body (--max-request-bytes), its images one by one (--max-image-bytes,
--max-image-pixels) and together (--max-images-per-request, --max-request-image-bytes, --max-request-pixels, the
pixels read from the headers before anything is decoded), its text (no more than fits the model's context), a URL's
fetch (--media-fetch-timeout, headers included); the server decodes images for --max-concurrent-decodes requests at
once, and parses, fetches, decodes and tokenizes on worker threads, so /health answers while it is busy.
Generation runs one request at a time: at most --max-waiting-requests wait for it (beyond, a 503 with Retry-After),
shorter requests first (fair queueing by max_tokens: a request of a few tokens waits for the running one only), each
stopped at --generation-timeout (answering what it has, finish_reason "length"). Connections are bounded: a
request's headers and body must arrive within --request-timeout, an idle connection is closed after
--keep-alive-timeout, and beyond --max-connections (from the open-file limit) the oldest connection that is not
being answered is closed, so silent or slow clients cannot exhaust the server's descriptors.

Needs the serve extra: pip install "internvlx-hf[serve]" (fastapi, uvicorn, openai); tested with transformers
5.16.1 to 5.23.0 (a newer release runs with a warning)."""

_SERVE_EPILOG = """\
examples:
  # the packaged demo model on http://127.0.0.1:8000
  internvlx serve "$(python -c 'from internvlx_hf.demo import demo_model_dir; print(demo_model_dir())')"

  # a converted checkpoint, bfloat16 on the GPU, on another port
  internvlx serve ./InternVL-X-2B-hf --dtype bfloat16 --device cuda --port 8080

  # exposed to the network: an API key, images from one folder and one web host
  export INTERNVLX_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
  internvlx serve ./InternVL-X-2B-hf --host 0.0.0.0 --allowed-local-media-path /srv/images \\
      --allowed-media-domains images.example.com

  # then, from any OpenAI client (the model id is MODEL as given to `serve`):
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer $INTERNVLX_API_KEY" -d '{
    "model": "./InternVL-X-2B-hf",
    "messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KG..."}},
      {"type": "text", "text": "What is in this picture?"}]}]}'"""

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder (from `internvlx convert`) or Hub id")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype (default auto: as saved)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default: every GPU when there is one, else cpu)")
    parser.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="uvicorn's log level (default info)")
    add_quantization_arguments(parser)
    security = parser.add_argument_group("who may ask, and what a request may make the server read")
    security.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
                          help=f"require 'Authorization: Bearer KEY' on /v1/* (the openai client's api_key); default: "
                               f"${API_KEY_ENV} if set, else none (open to every client that reaches the server)")
    security.add_argument("--allowed-local-media-path", metavar="DIR",
                          help="the folder whose image files requests may name by path or file:// URL (symbolic links "
                               "and '..' resolved; relative paths are taken from DIR); default: none, no local file "
                               "is read")
    security.add_argument("--allowed-media-domains", metavar="HOST", nargs="+", default=[],
                          help="hosts image URLs may be fetched from (exact names, e.g. images.example.com); a "
                               "loopback, private or link-local address is reached only when named here as an "
                               "address or network (127.0.0.1, 10.0.0.0/8); default: none, no URL is fetched")
    security.add_argument("--max-image-bytes", metavar="SIZE", type=_byte_size, default=DEFAULT_MAX_IMAGE_BYTES,
                          help="largest encoded image (its file's bytes; a data: URI, a download or a file) "
                               "(default 20MiB; units: KB, MB, KiB, MiB, GiB, ...)")
    security.add_argument("--max-image-pixels", metavar="N", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                          help="largest image in pixels (width x height), read from the image's header before it is "
                               f"decoded (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    security.add_argument("--max-images-per-request", metavar="N", type=int, default=DEFAULT_MAX_IMAGES_PER_REQUEST,
                          help=f"most images in one request (default {DEFAULT_MAX_IMAGES_PER_REQUEST})")
    security.add_argument("--max-request-image-bytes", metavar="SIZE", type=_byte_size,
                          default=DEFAULT_MAX_REQUEST_IMAGE_BYTES,
                          help="the encoded bytes of a request's images together, whatever their source (default "
                               "50MiB: what a request body may carry)")
    security.add_argument("--max-request-pixels", metavar="N", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                          help="the pixels of a request's images together, read from their headers before any is "
                               f"decoded (default {DEFAULT_MAX_REQUEST_PIXELS:,}: eight 12-megapixel photos)")
    security.add_argument("--max-concurrent-decodes", metavar="N", type=int, default=DEFAULT_MAX_CONCURRENT_DECODES,
                          help="requests whose large images (over 4 megapixels together) are decoded and tiled at "
                               "once, server-wide; others wait (default: a quarter of the cores, 1 to 4; "
                               f"{DEFAULT_MAX_CONCURRENT_DECODES} here)")
    security.add_argument("--max-request-bytes", metavar="SIZE", type=_byte_size, default=DEFAULT_MAX_REQUEST_BYTES,
                          help="largest request body (default 50MiB)")
    security.add_argument("--media-fetch-timeout", metavar="SECONDS", type=float, default=DEFAULT_FETCH_TIMEOUT,
                          help=f"seconds an image URL may take in all: name resolution, connection, status line "
                               f"and headers, redirects, body (default {DEFAULT_FETCH_TIMEOUT:g})")
    load = parser.add_argument_group("how much the server holds at once")
    load.add_argument("--max-active-generations", metavar="N", type=int, default=DEFAULT_MAX_ACTIVE_GENERATIONS,
                      help="generations that run at once, taking turns on the model; each holds its KV cache "
                           f"meanwhile (default {DEFAULT_MAX_ACTIVE_GENERATIONS}; 1: one at a time, to its end)")
    load.add_argument("--generation-slice", metavar="TOKENS", type=int, default=DEFAULT_GENERATION_SLICE,
                      help="new tokens a running generation makes in one turn before the next one runs, so that a "
                           f"short request is not held behind a long one's whole answer (default "
                           f"{DEFAULT_GENERATION_SLICE})")
    load.add_argument("--max-waiting-requests", metavar="N", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                      help="requests that may wait while --max-active-generations run; beyond, a 503 with "
                           f"Retry-After (default {DEFAULT_MAX_WAITING_REQUESTS})")
    load.add_argument("--generation-timeout", metavar="SECONDS", type=float, default=DEFAULT_GENERATION_TIMEOUT,
                      help="seconds one generation may run; then it answers what it has, with finish_reason "
                           f"'length' (default {DEFAULT_GENERATION_TIMEOUT:g}: it bounds the wait of the requests "
                           "behind it)")
    load.add_argument("--request-timeout", metavar="SECONDS", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                      help="seconds a request's headers and body may take to arrive; a connection still sending then "
                           f"is closed (default {DEFAULT_REQUEST_TIMEOUT:g}: a 50MiB body at 10 Mbit/s; against "
                           "clients that send nothing or trickle)")
    load.add_argument("--keep-alive-timeout", metavar="SECONDS", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT,
                      help=f"seconds a connection idle between requests is kept (default "
                           f"{DEFAULT_KEEP_ALIVE_TIMEOUT:g}, uvicorn's)")
    load.add_argument("--max-connections", metavar="N", type=int, default=None,
                      help="connections open at once; beyond, the oldest one not being answered is closed (default: "
                           "the open-file limit less 128 descriptors kept for files and fetches, at most 4096; "
                           f"{default_max_connections()} here)")
    security.add_argument("--allowed-hosts", metavar="HOST", nargs="+", default=None,
                          help="Host names requests may be addressed to, besides this machine's "
                               f"({', '.join(LOOPBACK_HOSTS)}): names, *.name for its subdomains, addresses, or * "
                               "for any; default: this machine's names only when listening on a loopback address "
                               "(against DNS rebinding), any name otherwise")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _byte_size(text: str) -> int:
    """``1048576``, ``20MiB``, ``5MB``, ``512KiB`` -> bytes (a positive integer)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or not float(match.group(1)) * _UNITS[unit] >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with KB, MB, GB, KiB, "
                                         "MiB or GiB (e.g. 20MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _check_serve(args: argparse.Namespace) -> None:
    """The arguments' checks that need no heavy import (before torch and the model load)."""
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}.")
    for flag, value in (("--max-image-pixels", args.max_image_pixels),
                        ("--max-images-per-request", args.max_images_per_request),
                        ("--max-request-pixels", args.max_request_pixels),
                        ("--max-concurrent-decodes", args.max_concurrent_decodes),
                        ("--max-waiting-requests", args.max_waiting_requests),
                        ("--max-active-generations", args.max_active_generations),
                        ("--generation-slice", args.generation_slice),
                        ("--max-connections", 1 if args.max_connections is None else args.max_connections)):
        if value < 1:
            raise CLIError(f"{flag} must be at least 1, got {value}.")
    for flag, value in (("--media-fetch-timeout", args.media_fetch_timeout),
                        ("--generation-timeout", args.generation_timeout),
                        ("--request-timeout", args.request_timeout),
                        ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not value > 0:  # NaN too
            raise CLIError(f"{flag} must be more than 0 seconds, got {value:g}.")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise CLIError(f"--allowed-local-media-path {args.allowed_local_media_path!r}: no such folder; name the "
                       "folder whose images clients may ask about.")
    check_api_key(args.api_key)
    for pattern in args.allowed_hosts or ():
        try:
            check_host_pattern(pattern)
        except ValueError as error:
            raise CLIError(f"--allowed-hosts: {error}") from None
    media_policy(args)
    check_model_argument(args.model)


def check_api_key(key: str | None) -> None:
    """An API key is printable ASCII without spaces (a header carries it: ``Authorization: Bearer KEY``; a key
    outside that would be accepted here and then match no request)."""
    if key is None:
        return
    if not key.strip():
        raise CLIError(f"--api-key (or {API_KEY_ENV}) is empty; give a key, or leave it out.")
    bad = next((char for char in key if not "!" <= char <= "~"), None)
    if bad is not None:
        raise CLIError(f"--api-key (or {API_KEY_ENV}) contains {bad!r}: a key is sent in an HTTP header "
                       "('Authorization: Bearer KEY'), so it may hold printable ASCII characters only, without "
                       "spaces (letters, digits and punctuation such as - _ . ~ + /); e.g. python -c 'import secrets; "
                       "print(secrets.token_urlsafe(24))'")


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The `MediaPolicy` of the command line (a bad --allowed-media-domains entry is a CLIError)."""
    try:
        return MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                           allowed_media_domains=tuple(args.allowed_media_domains),
                           max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                           max_request_image_bytes=args.max_request_image_bytes,
                           max_request_pixels=args.max_request_pixels, fetch_timeout=args.media_fetch_timeout)
    except ValueError as error:
        raise CLIError(f"--allowed-media-domains: {error}") from None


def model_loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for MODEL: the one place where loading options of `serve` become model
    arguments. ``--load-in-4bit`` / ``--load-in-8bit``: those `internvlx chat` loads with
    (`internvlx_hf.quantization.quantized_loading_kwargs`)."""
    if args.load_in_bits is None:
        return {}
    from ..hub.resolve import resolve_model
    from ..quantization import quantized_loading_kwargs

    # --device matters to 4-bit: on CPU, bitsandbytes' kernels cannot take some layer widths (kept unquantized)
    return quantized_loading_kwargs(resolve_model(args.model), args.load_in_bits, args.dtype,
                                    what=quantization_flag(args.load_in_bits),
                                    device=None if args.device == "auto" else args.device)


def _run_serve(args: argparse.Namespace) -> int:  # after _check_serve (SERVE.check)
    from ..serving import ServingUnavailable, check_serving_available, exposure_warning

    policy = media_policy(args)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(f"internvlx serve: warning: {warning}", file=sys.stderr, flush=True)
    check_quantization_available(args.load_in_bits)
    try:
        check_serving_available()
    except ServingUnavailable as error:
        raise CLIError(str(error)) from None
    from ..hub.resolve import read_internvlx_config, resolve_model
    from ..loading import device_map_for
    from ..serving import build_app, run_app

    device = device_map_for(args.device)
    read_internvlx_config(resolve_model(args.model), f"MODEL {str(args.model)!r}")  # a clear error before loading
    limits = RequestLimits(max_request_bytes=args.max_request_bytes,
                           max_images_per_request=args.max_images_per_request)
    app = build_app(args.model, device=device, dtype=args.dtype, model_kwargs=model_loading_kwargs(args),
                    api_key=args.api_key, media_policy=policy, limits=limits,
                    server_limits=ServerLimits(max_concurrent_decodes=args.max_concurrent_decodes,
                                               max_waiting_requests=args.max_waiting_requests,
                                               generation_timeout=args.generation_timeout,
                                               max_active_generations=args.max_active_generations,
                                               generation_slice=args.generation_slice))
    connections = ConnectionLimits(request_timeout=args.request_timeout, keep_alive_timeout=args.keep_alive_timeout,
                                   max_connections=args.max_connections)
    run_app(app, host=args.host, port=args.port, log_level=args.log_level, allowed_hosts=args.allowed_hosts,
            connection_limits=connections)
    return 0


SERVE = Command(
    name="serve",
    help="serve a checkpoint with the OpenAI chat-completions API (transformers' server; streaming, images)",
    description=_SERVE_DESCRIPTION,
    epilog=_SERVE_EPILOG,
    add_arguments=_add_serve_arguments,
    run=_run_serve,
    check=_check_serve,
)
