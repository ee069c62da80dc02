"""The ASGI middleware in front of transformers' app: what is checked before a request reaches it.

- `HostGate`: the ``Host`` header, against DNS rebinding (a web page whose name an attacker points at 127.0.0.1
  reaches a server on this machine with its own name in ``Host``; Ollama, Jupyter and Vite refuse such names). Which
  names are allowed follows from where the server listens (`exposure.allowed_host_patterns`).
- `RequestGate`: only the routes this server answers (``POST /v1/chat/completions``, ``GET /v1/models``,
  ``GET /health``; transformers' others would load any model a client names, unload the served one, or read media
  unchecked), the API key (``Authorization: Bearer KEY``, as OpenAI and vLLM take it; ``/health`` is open), a limit
  on the body's bytes, and the body's JSON parsed on a worker thread, at most `RequestLimits.max_json_values` values
  (FastAPI would parse it on the event loop: a 50 MiB body of ``[0,0,...]`` holds it 0.8 s).

The parsed body reaches the chat handler through `parsed_body` (FastAPI is handed ``{}`` in its place, so that it
parses nothing). Plain Python and the standard library: no FastAPI import.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import re
from typing import Any

from .exposure import host_allowed
from .limits import DEFAULT_MAX_REQUEST_BYTES, MAX_JSON_VALUES
from .validation import error_body

#: Routes this server answers, with their methods; transformers' app has more, which the gate answers with 404.
ROUTES = {"/v1/chat/completions": ("POST",), "/v1/models": ("GET",), "/health": ("GET",)}
#: Routes answered without the API key (a load balancer's health check has none).
OPEN_ROUTES = ("/health",)

# The JSON body the gate parsed, for the request being handled (read by the chat handler, `parsed_body`).
_PARSED_BODY: contextvars.ContextVar[Any] = contextvars.ContextVar("internvlx_parsed_body", default=None)
_PLACEHOLDER = b"{}"
# A JSON token that can start a value's slot: a string (skipped whole), an opening bracket or a comma.
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{,]')
_JSON_TYPES = re.compile(r"^application/(?:[\w.+-]*\+)?json\s*(?:;|$)", re.IGNORECASE)


def api_key_matches(header: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <api_key>``: the whole key, compared in constant time (a
    prefix of it, an empty token or another scheme does not)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def parsed_body(body: Any) -> Any:
    """The body of the request being handled: the one `RequestGate` parsed off the event loop, else ``body``."""
    parsed = _PARSED_BODY.get()
    return parsed if parsed is not None else body


def json_values_over(raw: bytes, limit: int) -> bool:
    """Whether the JSON text ``raw`` holds more than ``limit`` values (every value but a container's first follows a
    comma: values <= commas + brackets + 1, outside strings). Counted with bytes.count first, which also counts
    what strings hold; only a body over the limit that way is scanned token by token, and only up to the limit."""
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1 <= limit:
        return False
    count = 1
    for match in _STRUCTURE.finditer(raw):
        if match.end() - match.start() == 1:
            count += 1
            if count > limit:
                return True
    return False


def parse_json_body(raw: bytes, max_values: int) -> tuple[Any, tuple[int, dict] | None]:
    """``(body, None)``, or ``(None, (status, error object))`` for a body that is no JSON object, or one of more than
    ``max_values`` values."""
    if not raw.strip():
        return None, (400, error_body("The request has no body; send a JSON object."))
    if json_values_over(raw, max_values):
        return None, (413, error_body(f"The request body holds more than {max_values} JSON values; this server "
                                      f"parses at most {max_values} per request. Send fewer messages or content "
                                      "parts.", code="request_too_large"))
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as error:
        return None, (400, error_body(f"We could not parse the JSON body of your request ({error.msg}); send a JSON "
                                      "object."))
    except UnicodeDecodeError:
        return None, (400, error_body("There was an error parsing the body: it is not UTF-8 text; send a JSON "
                                      "object."))
    except RecursionError:
        return None, (400, error_body("The request body is nested too deeply to parse; send a JSON object of "
                                      "messages."))
    except ValueError as error:  # e.g. an integer of more than 4,300 digits (Python's limit)
        return None, (400, error_body(f"We could not parse the JSON body of your request ({error}); send a JSON "
                                      "object."))
    if not isinstance(body, dict):
        return None, (400, error_body("The request body must be a JSON object."))
    return body, None


class RequestGate:
    """ASGI middleware: the routes this server answers, the API key, the body's size, and its JSON parsed off the
    event loop, all checked before the request reaches the app (an unauthenticated client cannot make the server
    read a large body). ``work``: the server's `workers.ServingWork` (without it, JSON is parsed on the event loop)."""

    def __init__(self, app, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_json_values: int = MAX_JSON_VALUES, work=None):
        self.app, self.api_key, self.max_request_bytes = app, api_key or None, max_request_bytes
        self.max_json_values, self.work = max_json_values, work

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            answered = ", ".join(f"{methods[0]} {route}" for route, methods in ROUTES.items())
            return await respond(send, 404, error_body(f"Invalid URL ({method} {path[:200]}): this server answers "
                                                       f"{answered}.", code="unknown_url"))
        if method not in ROUTES[path]:
            return await respond(send, 405, error_body(f"Invalid method for {path}: {method}; use "
                                                       f"{ROUTES[path][0]}."), {"allow": ", ".join(ROUTES[path])})
        if self.api_key is not None and path not in OPEN_ROUTES:
            header = _header(scope, b"authorization")
            if not api_key_matches(header, self.api_key):
                message = ("Incorrect API key provided." if header else "You didn't provide an API key.") + (
                    " This server takes its API key in an Authorization header: 'Authorization: Bearer YOUR_KEY' "
                    "(the openai client's api_key).")
                return await respond(send, 401, error_body(message, code="invalid_api_key"),
                                     {"www-authenticate": "Bearer"})
        if method != "POST":
            return await self.app(scope, receive, send)
        body = await self._read_body(scope, receive, send)
        if body is None:  # answered (413), or the client left
            return None
        content_type = _header(scope, b"content-type")
        if content_type is None or not _JSON_TYPES.match(content_type):
            return await self.app(scope, _replay(body, receive), send)  # not JSON: FastAPI decides, as before
        if self.work is not None:
            parsed, problem = await self.work.prepare(parse_json_body, body, self.max_json_values)
        else:
            parsed, problem = parse_json_body(body, self.max_json_values)
        del body
        if problem is not None:
            return await respond(send, *problem)
        token = _PARSED_BODY.set(parsed)
        try:
            return await self.app(scope, _replay(_PLACEHOLDER, receive), send)
        finally:
            _PARSED_BODY.reset(token)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        limit = self.max_request_bytes
        length = (_header(scope, b"content-length") or "").strip()
        too_big = (f"The request body is {{}} bytes; this server accepts at most {limit} (--max-request-bytes). Send "
                   "smaller or fewer images.")
        if length.isdigit() and int(length) > limit:
            await respond(send, 413, error_body(too_big.format(int(length)), code="request_too_large"))
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await respond(send, 413, error_body(too_big.format(f"more than {limit}"), code="request_too_large"))
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


class HostGate:
    """ASGI middleware: a request whose ``Host`` header names none of ``patterns`` (`exposure.host_allowed`) is a
    403, before anything else is looked at. A request without a ``Host`` header (HTTP/1.0) passes: a browser, which
    DNS rebinding needs, always sends one."""

    def __init__(self, app, patterns: tuple[str, ...]):
        self.app, self.patterns = app, tuple(patterns)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = _header(scope, b"host")
            if host is not None and not host_allowed(host, self.patterns):
                shown = host[:100].encode("ascii", "replace").decode()
                message = (f"Host {shown!r} is not allowed: this server answers requests for "
                           f"{', '.join(self.patterns)} (a name other than this machine's, pointed at it, is how a web "
                           "page reaches a local server: DNS rebinding). The server's operator can allow more names "
                           "with --allowed-hosts.")
                if scope["type"] == "http":
                    return await respond(send, 403, error_body(message, code="host_not_allowed"))
                return await send({"type": "websocket.close", "code": 1008})
        return await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


def _replay(body: bytes, receive):
    replayed = False

    async def replay():  # the body once, then the client's own messages (a disconnect stops a stream)
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def respond(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


__all__ = ["OPEN_ROUTES", "ROUTES", "HostGate", "RequestGate", "api_key_matches", "json_values_over",
           "parse_json_body", "parsed_body"]
