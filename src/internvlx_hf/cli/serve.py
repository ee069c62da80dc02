"""`internvlx serve`: an OpenAI-compatible chat-completions server for a checkpoint (transformers' own server)."""

from __future__ import annotations

import argparse
from typing import Any

from .command import CLIError, Command
from .quantization import add_quantization_arguments, check_quantization_available, quantization_flag

_SERVE_DESCRIPTION = """\
Serve MODEL (a checkpoint folder or Hub id) over HTTP with the OpenAI chat-completions API, through transformers'
own server (`transformers serve`: FastAPI + uvicorn, its request handling, generation thread and streaming), taught
to load an InternVL-X checkpoint (AutoModelForImageTextToText, trust_remote_code) and to route it as an
image-text-to-text model. The model is loaded once, before the server starts listening.

Endpoints (transformers'): POST /v1/chat/completions (streaming with "stream": true), GET /v1/models (the served
model; its id is MODEL as given here), GET /health, and transformers' others (/v1/completions, /v1/responses).
Images in a message: {"type": "image_url", "image_url": {"url": URL}} where URL is a data:image/...;base64 URI, an
http(s) URL (downloaded by the server, 10 s timeout) or a path on the server's machine. An image that cannot be
loaded gets a 400 whose message names it. Decoding follows the request (temperature, top_p, max_tokens, stop) on top
of the checkpoint's generation_config.json.

Needs the serve extra: pip install "internvlx-hf[serve]" (fastapi, uvicorn, openai); tested with transformers 5.23.
The server reads any image path a request names: keep it on 127.0.0.1 unless you trust every client."""

_SERVE_EPILOG = """\
examples:
  # the packaged demo model on http://127.0.0.1:8000
  internvlx serve "$(python -c 'from internvlx_hf.demo import demo_model_dir; print(demo_model_dir())')"

  # a converted checkpoint, bfloat16 on the GPU, on another port
  internvlx serve ./InternVL-X-2B-hf --dtype bfloat16 --device cuda --port 8080

  # then, from any OpenAI client (the model id is MODEL as given to `serve`):
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{
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


def model_loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for MODEL: the one place where loading options of `serve` become model
    arguments. ``--load-in-4bit`` / ``--load-in-8bit``: those `internvlx chat` loads with
    (`internvlx_hf.quantization.quantized_loading_kwargs`)."""
    if args.load_in_bits is None:
        return {}
    from ..hub.resolve import resolve_model
    from ..quantization import quantized_loading_kwargs

    return quantized_loading_kwargs(resolve_model(args.model), args.load_in_bits, args.dtype,
                                    what=quantization_flag(args.load_in_bits))


def _run_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}.")
    check_quantization_available(args.load_in_bits)
    from ..serving import ServingUnavailable, check_serving_available

    try:
        check_serving_available()
    except ServingUnavailable as error:
        raise CLIError(str(error)) from None
    from ..hub.resolve import read_internvlx_config, resolve_model
    from ..serving import serve
    from .chat import device_map_for

    device = device_map_for(args.device)
    read_internvlx_config(resolve_model(args.model), f"MODEL {str(args.model)!r}")  # a clear error before loading
    serve(args.model, host=args.host, port=args.port, log_level=args.log_level, device=device, dtype=args.dtype,
          model_kwargs=model_loading_kwargs(args))
    return 0


SERVE = Command(
    name="serve",
    help="serve a checkpoint with the OpenAI chat-completions API (transformers' server; streaming, images)",
    description=_SERVE_DESCRIPTION,
    epilog=_SERVE_EPILOG,
    add_arguments=_add_serve_arguments,
    run=_run_serve,
)
