"""`internvlx serve`: transformers' OpenAI-compatible server on the demo model, and its trust boundary.

Two servers for the module, each `python -m internvlx_hf serve DEMO` in a subprocess on 127.0.0.1 (a free port),
offline:

- ``server``: opened up as an operator would: an API key, a media folder (``--allowed-local-media-path``), URLs from
  127.0.0.1 and localhost (``--allowed-media-domains``), one more host name (``--allowed-hosts``), and small limits so
  that the limit tests send small data;
- ``default_server``: no option at all, to check what is refused by default, and to saturate.

The answers are checked against `demo_model.json`'s tasks (the questions `internvlx demo` asks), a multi-turn
conversation against `internvlx chat`'s own multi-turn session on the same model; every client mistake against the
status and OpenAI's error object; and a seeded fuzz of malformed requests against "no 5xx".
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.request
import zlib

import pytest

from internvlx_hf.cli import main
from internvlx_hf.demo import demo_model_dir, demo_samples
from internvlx_hf.serving import (SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS, MediaPolicy, MediaRefused,
                                  RequestLimits, ServingUnavailable, allowed_host_patterns, check_serving_available,
                                  exposure_warning, load_request_image, validate_chat_request)

DEMO = str(demo_model_dir())
QUESTIONS = demo_samples(seed=0)  # one per task: colour, shape, position, count, fine
KEY = "test-key-0123"
# The open server's limits (the demo's images are 112 x 112 PNGs of under 1 KB).
MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_REQUEST_BYTES, FETCH_TIMEOUT = 65536, 100_000, 4, 2**18, 2
MAX_REQUEST_IMAGE_BYTES, MAX_REQUEST_PIXELS = 100_000, 150_000
CONTEXT = 4096  # the demo model's max_position_embeddings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` followed by a few bytes of pixel data: opening it reads the size;
    decoding it would fail (truncated), so an error about its pixels shows the size was checked first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def ask(image_url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def request(base: str, method: str, path: str, body=None, key: str | None = KEY, headers=None,
            chunked: bool = False) -> tuple[int, dict | str]:
    """One HTTP request (``body``: an object sent as JSON, or raw bytes): its status and its JSON (or text)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    try:
        if chunked:
            connection.request(method, path, body=iter([payload]), headers=sent, encode_chunked=True)
        else:
            connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def chat(base: str, body, **kwargs) -> tuple[int, dict | str]:
    return request(base, "POST", "/v1/chat/completions", body, **kwargs)


def assert_openai_error(status: int, body, expected_status: int | None = None) -> dict:
    """``body`` is OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``); returns it."""
    assert 400 <= status < 500 and (expected_status is None or status == expected_status), (status, body)
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    assert error["param"] is None or isinstance(error["param"], str), body
    return error


def start_server(arguments: list[str], log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("INTERNVLX_API_KEY", None)
    with open(log_path, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "internvlx_hf", "serve", DEMO, "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", *arguments], stdout=output, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}"


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until_healthy(process: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}) before answering:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer /health within 300 s:\n{log_path.read_text()}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(media, outside)``: the folder the open server may read, and one beside it that it may not."""
    media, outside = tmp_path_factory.mktemp("media"), tmp_path_factory.mktemp("outside")
    sibling = media.parent / f"{media.name}_sibling"  # a name that starts with the allowed folder's
    sibling.mkdir()
    QUESTIONS[0].image.save(sibling / "colour.png")
    QUESTIONS[0].image.save(media / "colour.png")
    (media / "sub").mkdir()
    QUESTIONS[1].image.save(media / "sub" / "shape.png")
    (media / "notes.png").write_text("not an image")
    (media / "big.png").write_bytes(png_bytes(QUESTIONS[0].image) + b"\0" * MAX_IMAGE_BYTES)
    QUESTIONS[0].image.save(outside / "secret.png")
    (media / "escape.png").symlink_to(outside / "secret.png")
    (media / "passwd.png").symlink_to("/etc/passwd")
    os.mkfifo(media / "fifo.png")
    return media, outside


@pytest.fixture(scope="module")
def servers(folders, tmp_path_factory):
    """``{"open": ..., "default": ...}``, each with its ``url``, ``pid`` and ``log``: both servers, started together
    and stopped after the module."""
    try:
        check_serving_available()  # the serve extra, and a transformers release the server was tested with
    except ServingUnavailable as error:
        pytest.skip(str(error))
    logs = tmp_path_factory.mktemp("serve")
    media, _ = folders
    started = {
        "open": start_server(["--api-key", KEY, "--allowed-local-media-path", str(media),
                              "--allowed-media-domains", "127.0.0.1", "localhost",
                              "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS),
                              "--max-images-per-request", str(MAX_IMAGES), "--max-request-bytes", "256KiB",
                              "--max-request-image-bytes", str(MAX_REQUEST_IMAGE_BYTES),
                              "--max-request-pixels", str(MAX_REQUEST_PIXELS),
                              "--media-fetch-timeout", str(FETCH_TIMEOUT), "--allowed-hosts", "*.internal.example"],
                             logs / "open.log"),
        "default": start_server([], logs / "default.log"),
    }
    try:
        for name, (process, url) in started.items():
            wait_until_healthy(process, url, logs / f"{name}.log")
        yield {name: types.SimpleNamespace(url=url, pid=process.pid, log=logs / f"{name}.log")
               for name, (process, url) in started.items()}
    finally:
        for process, _ in started.values():
            stop(process)


@pytest.fixture(scope="module")
def server(servers):
    return servers["open"].url


@pytest.fixture(scope="module")
def default_server(servers):
    return servers["default"].url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


class MediaHost(http.server.BaseHTTPRequestHandler):
    """A web server for the fetch tests: an image, a large body without Content-Length, a slow body, redirects."""

    port = 0
    image = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            self._answer()
        except OSError:  # the server under test stopped reading (a limit, a timeout): expected
            pass

    def _answer(self):
        path, _, query = self.path.partition("?")
        if path == "/shape.png":
            self._send(200, self.image, {"Content-Type": "image/png", "Content-Length": str(len(self.image))})
        elif path == "/big-unannounced.png":  # no Content-Length: the limit is counted while reading
            self._send(200, None, {"Content-Type": "image/png", "Connection": "close"})
            for _ in range(MAX_IMAGE_BYTES // 8192 + 2):
                self.wfile.write(b"\0" * 8192)
        elif path == "/big-announced.png":
            self._send(200, None, {"Content-Length": str(MAX_IMAGE_BYTES + 1)})
        elif path == "/slow.png":  # a byte a second: the fetch's overall timeout ends it
            self._send(200, None, {"Connection": "close"})
            for _ in range(4 * FETCH_TIMEOUT):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(1)
        elif path == "/trickle-headers.png":  # the status line and headers a byte at a time: never done
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 100_000
            stop = time.monotonic() + 4 * FETCH_TIMEOUT
            for index in range(len(head)):
                if time.monotonic() > stop:
                    break
                self.wfile.write(head[index:index + 1])
                self.wfile.flush()
                time.sleep(0.05)
            self.close_connection = True
        elif path == "/redirect":
            self._send(302, b"", {"Location": urllib.request.unquote(query), "Content-Length": "0"})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop", "Content-Length": "0"})
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, status, body, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def media_host():
    """The base URL (``http://127.0.0.1:PORT``) of a `MediaHost`."""
    MediaHost.image = png_bytes(QUESTIONS[1].image)
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHost)
    host.daemon_threads = True
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


@pytest.fixture(scope="module")
def chat_session():
    """A fresh `internvlx chat` session on the demo model (loaded once), to compare the server's answers with."""
    from internvlx_hf.cli.chat import ChatSession
    from internvlx_hf.demo import load_demo_model

    model, processor = load_demo_model()
    return lambda images: ChatSession(model, processor, images, max_new_tokens=32, stream=False)


# --- answers ---------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [model.id for model in models] == [DEMO]
    assert models[0].object == "model" and models[0].owned_by == "local"


def test_the_demo_questions_are_answered_right_with_data_uri_images(client):
    from transformers.cli.serving.model_manager import ModelManager

    for sample in QUESTIONS:
        response = client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question),
                                                  temperature=0)
        choice = response.choices[0]
        assert (sample.task, choice.message.content) == (sample.task, sample.expected)
        # the name transformers' manager keeps the model under: `DEMO@main` up to 5.23, the folder's path from 5.24
        assert choice.finish_reason == "stop" and response.model == ModelManager.process_model_name(DEMO)
        assert response.usage.completion_tokens >= 1 and response.usage.prompt_tokens > 16  # 16 image tokens


def test_images_from_the_allowed_folder_and_allowed_hosts(client, folders, media_host):
    colour, shape = QUESTIONS[0], QUESTIONS[1]
    media, _ = folders
    for url, sample in [(str(media / "colour.png"), colour), ("colour.png", colour),  # relative: from the folder
                        ((media / "colour.png").as_uri(), colour), (str(media / "sub" / ".." / "colour.png"), colour),
                        ("sub/shape.png", shape), (f"{media_host}/shape.png", shape),
                        (f"{media_host.replace('127.0.0.1', 'localhost')}/shape.png", shape),  # -> 127.0.0.1, named
                        (f"{media_host}/redirect?{media_host}/shape.png", shape)]:
        answer = client.chat.completions.create(model=DEMO, messages=ask(url, sample.question))
        assert (url, answer.choices[0].message.content) == (url, sample.expected)


def test_streaming_sends_the_answer_in_chunks(client):
    sample = QUESTIONS[2]  # position: "bottom-right", several tokens
    chunks = list(client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question),
                                                 stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == sample.expected == "bottom-right"
    assert sum(1 for chunk in chunks if chunk.choices[0].delta.content) >= 2  # streamed, not one block
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_end_the_answer(server):
    """transformers hands `generate` the processor as its tokenizer, which stop strings cannot use (a 500 before);
    the answer ends with the stop string, as transformers' server answers (OpenAI's leaves it out)."""
    sample = QUESTIONS[2]  # "bottom-right"
    for stop, expected in [(["-"], "bottom-"), ("om", "bottom"), (["zz", "ri"], "bottom-ri")]:
        status, body = chat(server, {"messages": ask(data_uri(sample.image), sample.question), "stop": stop})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, (stop, body)
    status, body = chat(server, {"messages": ask(data_uri(sample.image), sample.question), "stop": "-",
                                 "stream": True})
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and "".join(event["choices"][0]["delta"].get("content") or "" for event in events) == \
        "bottom-"


@pytest.mark.parametrize("field,values", [
    ("temperature", [0, 0.0, 1e-300, 1, 2]), ("top_p", [0, 0.5, 1]), ("stop", ["x", ["a", "b", "c", "d"]]),
    ("seed", [-2**63, 0, 2**63 - 1]), ("frequency_penalty", [-0.99, 0, 2]),
    ("logit_bias", [{}, {"0": -100, "811": 100}]), ("n", [1, None]), ("stream", [True, False, None]),
    ("max_tokens", [1, None]), ("max_completion_tokens", [1]), ("model", [DEMO, None]),
    ("user", ["someone"]), ("stream_options", [{"include_usage": True}]), ("presence_penalty", [2, -2]),
    ("response_format", [{"type": "text"}]), ("tools", [[]]), ("tool_choice", ["none", "auto"]),
    ("logprobs", [False]), ("top_logprobs", [0]), ("metadata", [{"a": "b"}]), ("store", [False]),
    ("parallel_tool_calls", [False]), ("modalities", [["text"]]),
])
def test_valid_edge_values_are_answered(server, field, values):
    """Every value the checks accept is answered (200), with a one-token answer."""
    for value in values:
        body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "max_tokens": 1, field: value}
        if field == "max_completion_tokens":
            del body["max_tokens"]
        status, answer = chat(server, body)
        assert status == 200, (field, value, answer)


def test_multi_turn_matches_internvlx_chat(client, chat_session):
    """The server renders a conversation as `internvlx chat`'s multi-turn session does: the same answers."""
    sample, follow_up = QUESTIONS[0], "How many shapes?"
    session = chat_session([sample.image])
    expected = [session.ask(sample.question), session.ask(follow_up)]
    assert expected[0] == sample.expected

    messages = ask(data_uri(sample.image), sample.question)
    first = client.chat.completions.create(model=DEMO, messages=messages, max_tokens=32).choices[0].message.content
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
    second = client.chat.completions.create(model=DEMO, messages=messages, max_tokens=32).choices[0].message.content
    assert [first, second] == expected


def test_two_images_match_internvlx_chat(client, chat_session):
    first, second = QUESTIONS[0], QUESTIONS[3]
    session = chat_session([first.image, second.image])
    expected = session.ask(second.question)
    processor = session.processor
    content = [{"type": "image_url", "image_url": {"url": data_uri(first.image)}},
               {"type": "image_url", "image_url": {"url": data_uri(second.image)}},
               {"type": "text", "text": second.question}]
    response = client.chat.completions.create(model=DEMO, messages=[{"role": "user", "content": content}],
                                              max_tokens=32)
    assert response.choices[0].message.content == expected
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                            {"type": "text", "text": second.question}]}],
                                           add_generation_prompt=True, tokenize=False)
    tokens = processor(text=[prompt], images=[first.image, second.image])["input_ids"][0]
    assert response.usage.prompt_tokens == len(tokens)  # both images' tokens are in the prompt


# --- the trust boundary: defaults, the API key, routes ----------------------------------------------------------


def test_by_default_no_local_file_and_no_url_is_read(default_server, folders):
    media, _ = folders
    sample = QUESTIONS[0]
    cases = [
        (str(media / "colour.png"), "this server reads no local files; send the image as a data:image/png;base64,... "
                                    "URI (the server's operator can allow a folder with --allowed-local-media-path)"),
        ("/no/such/file.png", "this server reads no local files"),
        ((media / "colour.png").as_uri(), "this server reads no local files"),
        ("http://127.0.0.1:9/a.png", "this server fetches no image URLs; send the image as a data:image/png;base64,"
                                     "... URI (the server's operator can allow hosts with --allowed-media-domains)"),
    ]
    for url, message in cases:
        status, body = chat(default_server, {"messages": ask(url, sample.question)}, key=None)
        error = assert_openai_error(status, body, 400)
        assert error["message"].startswith(f"messages[0]: image 0 ('{url}'): {message}"), (url, error)
        assert error["param"] == "messages[0].content[0].image_url.url"
    status, body = chat(default_server, {"messages": ask(data_uri(sample.image), sample.question)}, key=None)
    assert status == 200 and body["choices"][0]["message"]["content"] == sample.expected  # no key needed by default


def test_the_api_key_is_required_on_v1_routes(server):
    """The whole key, nothing else: a longer one, a prefix of it (a check written as startswith passes that), an
    empty token, another scheme."""
    for path, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST")]:
        for key, message in [(None, "You didn't provide an API key."), ("wrong", "Incorrect API key provided."),
                             (KEY + "x", "Incorrect API key provided."), (KEY[:-1], "Incorrect API key provided."),
                             (KEY[:1], "Incorrect API key provided.")]:
            status, body = request(server, method, path, {"messages": [{"role": "user", "content": "Hi"}]}, key=key)
            error = assert_openai_error(status, body, 401)
            assert error["code"] == "invalid_api_key" and error["message"].startswith(message), (path, key)
        for header in ("Bearer ", "Bearer", "Bearer  ", f"Basic {KEY}", KEY, f"{KEY} Bearer"):
            status, body = request(server, method, path, {"messages": HI}, key=None,
                                   headers={"Authorization": header})
            error = assert_openai_error(status, body, 401)
            assert error["message"].startswith("Incorrect API key provided."), (path, header)
    assert request(server, "GET", "/v1/models", key=None, headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert request(server, "GET", "/health", key=None) == (200, {"status": "ok"})  # open, for health checks
    assert request(server, "GET", "/v1/models")[0] == 200


@pytest.mark.parametrize("method,path", [("POST", "/load_model"), ("POST", "/reset"), ("POST", "/v1/responses"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/audio/transcriptions"),
                                         ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nothing")])
def test_only_the_chat_routes_are_served(server, method, path):
    """transformers' other routes load any model a client names (/load_model, with trust_remote_code), unload the
    served one (/reset) or pass media to the processor unchecked (/v1/responses): not answered."""
    status, body = request(server, method, path, {"model": "/tmp", "input": "Hi"})
    error = assert_openai_error(status, body, 404)
    assert error["code"] == "unknown_url" and error["message"].startswith(f"Invalid URL ({method} {path})")
    status, body = request(server, "GET", "/v1/chat/completions")
    assert_openai_error(status, body, 405)


def test_the_warning_for_listening_beyond_loopback_without_a_key(capsys, monkeypatch):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert exposure_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "myhost.example"):
        assert exposure_warning(host, None).startswith(f"listening on {host}, beyond this machine, without an API "
                                                       "key"), host
        assert exposure_warning(host, "a-key") is None
    monkeypatch.delenv("INTERNVLX_API_KEY", raising=False)
    import importlib.util

    find_spec = importlib.util.find_spec  # the run stops right after the warning: no fastapi
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fastapi" else find_spec(name, *args))
    assert main(["serve", DEMO, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("internvlx serve: warning: listening on 0.0.0.0, beyond this machine, without an API key: any "
                      "client that reaches it can use the model and the media it may read or fetch; set --api-key "
                      "KEY (or INTERNVLX_API_KEY)")
    assert err[1].startswith("internvlx serve: error: serving needs fastapi")
    assert main(["serve", DEMO, "--host", "0.0.0.0", "--api-key", "k"]) == 2
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("INTERNVLX_API_KEY", "from-the-environment")
    assert main(["serve", DEMO, "--host", "0.0.0.0"]) == 2
    assert "warning" not in capsys.readouterr().err


def test_requests_for_names_of_other_hosts_are_a_403_on_loopback(servers):
    """DNS rebinding: a page on evil.example whose name then resolves to 127.0.0.1 reaches a server on this machine
    with ``Host: evil.example``. A server on a loopback address answers loopback names and addresses only, and the
    names --allowed-hosts adds (the open server: *.internal.example)."""
    for name, key in (("default", None), ("open", KEY)):
        url = servers[name].url
        port = url.rsplit(":", 1)[1]
        allowed = "localhost, *.localhost, 127.0.0.0/8, ::1" + (", *.internal.example" if name == "open" else "")
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io",
                     "internal.example", "[::2]", f"10.0.0.1:{port}", "0.0.0.0", ""):
            for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/chat/completions")):
                status, body = request(url, method, path, {"messages": HI}, key=key, headers={"Host": host})
                error = assert_openai_error(status, body, 403)
                assert (error["message"], error["code"]) == (
                    f"Host {host!r} is not allowed: this server answers requests for {allowed} (a name other than "
                    "this machine's, pointed at it, is how a web page reaches a local server: DNS rebinding). The "
                    "server's operator can allow more names with --allowed-hosts.", "host_not_allowed"), (name, host)
        accepted = [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "127.0.0.2", "app.localhost",
                    "LOCALHOST.", "::1"]
        if name == "open":
            accepted.append(f"api.internal.example:{port}")
        for host in accepted:
            assert request(url, "GET", "/v1/models", key=key, headers={"Host": host})[0] == 200, (name, host)


def test_the_host_names_answered_follow_where_the_server_listens():
    loopback = ("localhost", "*.localhost", "127.0.0.0/8", "::1")
    assert allowed_host_patterns("127.0.0.1") == allowed_host_patterns("::1") == loopback
    assert allowed_host_patterns("localhost", ["*.Example.COM.", "10.1.2.3", "10.0.0.0/8"]) == (
        *loopback, "*.example.com", "10.1.2.3", "10.0.0.0/8")
    assert allowed_host_patterns("0.0.0.0") is None and allowed_host_patterns("myhost.example") is None
    assert allowed_host_patterns("0.0.0.0", ["api.example.com"]) == (*loopback, "api.example.com")
    assert allowed_host_patterns("127.0.0.1", ["*"]) is None
    with pytest.raises(ValueError, match="allowed host 'http://x': not a host name, [*].name"):
        allowed_host_patterns("127.0.0.1", ["http://x"])
    from internvlx_hf.serving.exposure import host_allowed

    patterns = allowed_host_patterns("127.0.0.1", ["*.example.com"])
    assert [host_allowed(host, patterns) for host in (
        "localhost", "localhost:80", "a.b.localhost", "127.9.9.9:1", "[::1]:8000", "[::ffff:127.0.0.1]", "a.example.com",
        "example.com", "evil-example.com", "a.example.com.evil", "[::1", "", "10.0.0.1")] == [
        True, True, True, True, True, True, True, False, False, False, False, False, False]


def test_health_answers_within_a_second_while_the_server_is_saturated(default_server):
    """Eight clients at once, for 8 s, each sending two 36-megapixel PNGs (decoded, tiled, answered) or a
    200,000-character text (tokenized, over the context): /health, polled every 50 ms, answers within a second
    throughout (the work runs on worker threads; it held the event loop 3.1 s and 2.24 s before), and no request is
    a 5xx; a small request meanwhile is answered right."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(buffer, format="PNG")
    big = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    heavy = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}},
                                                        {"type": "image_url", "image_url": {"url": big}},
                                                        {"type": "text", "text": "What colour?"}]}], "max_tokens": 4},
             {"messages": [{"role": "user", "content": "word " * 40_000}], "max_tokens": 4}]
    statuses, stop = [], time.monotonic() + 8

    def hostile(number):
        while time.monotonic() < stop:
            statuses.append(chat(default_server, heavy[number % 2], key=None)[0])

    clients = [threading.Thread(target=hostile, args=(number,)) for number in range(8)]
    for client in clients:
        client.start()
    worst, polls, sample = 0.0, 0, QUESTIONS[3]
    try:
        while time.monotonic() < stop:
            started = time.monotonic()
            assert request(default_server, "GET", "/health", key=None) == (200, {"status": "ok"})
            worst, polls = max(worst, time.monotonic() - started), polls + 1
            time.sleep(0.05)
        status, answer = chat(default_server, {"messages": ask(data_uri(sample.image), sample.question)}, key=None)
    finally:
        for client in clients:
            client.join()
    print(f"/health: {polls} polls, worst {worst:.3f} s; statuses {sorted(set(statuses))} of {len(statuses)}")
    assert status == 200 and answer["choices"][0]["message"]["content"] == sample.expected
    assert set(statuses) <= {200, 400} and 200 in statuses and 400 in statuses, statuses
    assert worst < 1.0, worst


def test_at_most_max_concurrent_decodes_requests_decode_at_once():
    import asyncio

    from internvlx_hf.serving import ServerLimits
    from internvlx_hf.serving.workers import ServingWork

    work, seen = ServingWork(ServerLimits(max_concurrent_decodes=2, small_decode_pixels=1000)), []

    async def decode(pixels):
        async with work.decode_slot(pixels):
            seen.append((pixels, work.decoding))
            await work.prepare(time.sleep, 0.05)

    async def main_():
        await asyncio.gather(*(decode(pixels) for pixels in (1001, 5000, 1000, 10**8, 2000, 1, 3000)))

    asyncio.run(main_())
    work.shutdown()
    large = [decoding for pixels, decoding in seen if pixels > 1000]
    assert len(seen) == 7 and len(large) == 5 and max(large) == 2 and work.decoding == 0
    assert sorted(pixels for pixels, _ in seen[:4]) == [1, 1000, 1001, 5000]  # small ones never wait


def test_json_values_are_counted_outside_strings():
    from internvlx_hf.serving.middleware import json_values_over, parse_json_body

    # [0,0,0]: 4 values (the array, three numbers); {"a": [1, {"b": 2}]}: 5; ["a,\",", 1]: 3
    assert [json_values_over(raw, limit) for raw, limit in [
        (b"[0,0,0]", 4), (b"[0,0,0]", 3), (b"[0,0,0,0]", 4), (b'{"a": [1, {"b": 2}]}', 5), (b'{"a": [1, {"b": 2}]}', 4),
        (b'"a,b,[c,{d"', 1), (b'["a,\\",", 1]', 3), (b'["a,\\",", 1]', 2)]] == [
        False, True, True, False, True, False, False, True]
    assert parse_json_body(b"[1]", 10) == (None, (400, {"error": {
        "message": "The request body must be a JSON object.", "type": "invalid_request_error", "param": None,
        "code": None}, "detail": "The request body must be a JSON object."}))
    assert parse_json_body(b"[" * 100_000 + b"]" * 100_000, 10**6)[1][1]["detail"] == (
        "The request body is nested too deeply to parse; send a JSON object of messages.")


def test_the_log_names_a_local_folder_as_a_folder(servers):
    """transformers' manager logs `Loading DEMO@main` (a Hub revision) for a local folder too; the server says what it
    loads itself."""
    log = servers["open"].log.read_text()
    assert f"internvlx serve: loading the checkpoint folder {DEMO}\n" in log and "@main" not in log, log[-3000:]


# --- what a request may make the server read ----------------------------------------------------------------------


def test_a_refused_path_gets_the_same_error_whether_it_exists_or_not(server, folders):
    """Outside the folder (an existing image), missing, a folder, /etc/passwd, a link out of the folder, '..', a
    FIFO: one text, so a client learns nothing about the server's files."""
    media, outside = folders
    sibling = media.parent / f"{media.name}_sibling"
    question = QUESTIONS[0].question
    texts = set()
    for url in [str(outside / "secret.png"), str(outside / "missing.png"), str(media / "missing.png"), str(outside),
                str(media), "/etc/passwd", "/etc", "/no/such/dir/x.png", str(media / "escape.png"),
                str(media / "passwd.png"), f"{media}/../{outside.name}/secret.png", f"../{outside.name}/secret.png",
                str(media / "fifo.png"), (outside / "secret.png").as_uri(), "/dev/zero",
                # a folder inside the allowed one (it was a 500 that told it from a missing path)
                str(media / "sub"), "sub", "sub/", (media / "sub").as_uri(), "sub/..",
                # a sibling whose name starts with the allowed folder's (a startswith check lets it through)
                str(sibling / "colour.png"), f"../{sibling.name}/colour.png", sibling.as_uri() + "/colour.png"]:
        status, body = chat(server, {"messages": ask(url, question)})
        error = assert_openai_error(status, body, 400)
        texts.add(error["message"].replace(url, "URL"))
    assert texts == {"messages[0]: image 0 ('URL'): not an image file this server may read; a local path must name an "
                     "existing file inside the folder the server allows (--allowed-local-media-path), or send the "
                     "image as a data:image/png;base64,... URI"}
    # inside the folder, a file that is no image may be told apart: the client may read that folder anyway
    status, body = chat(server, {"messages": ask(str(media / "notes.png"), question)})
    assert "not a readable image (accepted formats: PNG, JPEG, WEBP, GIF, BMP)" in assert_openai_error(status, body)[
        "message"]


def test_folders_in_the_allowed_folder_leak_no_descriptor(servers, folders):
    """50 requests naming a folder inside the allowed one: each refused with the one text, and the server holds no
    more descriptors after them than before (each leaked one before: 120 such requests made a server with 150
    allowed descriptors refuse every connection)."""
    server = servers["open"]
    media, _ = folders
    sample = QUESTIONS[0]

    def settled() -> int:  # the count once the connections just closed are gone
        counts = []
        for _ in range(20):
            counts.append(open_descriptors(server.pid))
            if len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]:
                break
            time.sleep(0.1)
        return counts[-1]

    assert chat(server.url, {"messages": ask("sub", "Hi")})[0] == 400  # the worker threads exist from here on
    before = settled()
    for _ in range(50):
        status, body = chat(server.url, {"messages": ask(str(media / "sub"), "Hi")})
        assert "not an image file this server may read" in assert_openai_error(status, body, 400)["message"]
    assert settled() <= before
    status, answer = chat(server.url, {"messages": ask("colour.png", sample.question)})
    assert status == 200 and answer["choices"][0]["message"]["content"] == sample.expected


def test_url_fetches_are_limited_to_the_allowed_hosts_and_addresses(server, media_host):
    """Hosts outside the allow-list, redirects out of it, other schemes: refused; a fetch has a byte limit and a
    timeout. (A name resolving to an address that is not named: `test_media_policy_checks_the_resolved_address...`.)"""
    port = media_host.rsplit(":", 1)[1]
    question = QUESTIONS[1].question
    cases = [
        ("http://example.invalid/a.png", "the host 'example.invalid' is not one this server fetches from "
                                         "(--allowed-media-domains)"),
        (f"http://127.0.0.2:{port}/shape.png", "the host '127.0.0.2' is not one this server fetches from"),
        (f"http://[::1]:{port}/shape.png", "the host '::1' is not one this server fetches from"),
        (f"{media_host}/redirect?http://127.0.0.2:{port}/shape.png", "the host '127.0.0.2' is not one this server"),
        (f"{media_host}/redirect?http://example.invalid/a.png", "the host 'example.invalid' is not one this server"),
        (f"{media_host}/redirect?file:///etc/passwd", "only http(s) URLs with a host are fetched"),
        (f"{media_host}/loop", "more than 3 redirects"),
        (f"{media_host}/missing.png", "the URL answered HTTP 404 Not Found"),
        (f"{media_host}/big-announced.png", f"the image is {MAX_IMAGE_BYTES + 1} bytes; this server accepts images of "
                                            f"at most {MAX_IMAGE_BYTES} bytes (--max-image-bytes)"),
        (f"{media_host}/big-unannounced.png", f"the image is more than {MAX_IMAGE_BYTES} bytes"),
        (f"{media_host}/slow.png", f"the download did not finish within {FETCH_TIMEOUT} s (--media-fetch-timeout)"),
        (f"http://user:pw@127.0.0.1:{port}/shape.png", "URLs with a user name or password are not fetched"),
        (f"ftp://127.0.0.1:{port}/shape.png", "unsupported URL scheme 'ftp'"),
        ("file://otherhost/etc/passwd", "a file: URL names a file on this server"),
    ]
    for url, message in cases:
        status, body = chat(server, {"messages": ask(url, question)})
        error = assert_openai_error(status, body, 400)
        assert error["message"].startswith("messages[0]: image 0 (") and message in error["message"], (url, error)


def test_a_host_trickling_its_headers_is_cut_at_the_fetch_timeout(server, media_host):
    """A host that sends its status line and headers a byte every 0.05 s: the fetch ends at --media-fetch-timeout,
    headers included (a socket timeout per read let such a host hold a fetch 36.7 s under a 3 s timeout)."""
    started = time.monotonic()
    status, body = chat(server, {"messages": ask(f"{media_host}/trickle-headers.png", "Hi")})
    elapsed = time.monotonic() - started
    assert assert_openai_error(status, body, 400)["message"] == (
        f"messages[0]: image 0 ('{media_host}/trickle-headers.png'): the download did not finish within "
        f"{FETCH_TIMEOUT} s (--media-fetch-timeout)")
    assert FETCH_TIMEOUT - 0.5 < elapsed < FETCH_TIMEOUT + 4, elapsed  # not 4 x the timeout (the host's end)


def test_the_fetch_deadline_covers_the_status_line_without_a_server(media_host):
    policy = MediaPolicy(allowed_media_domains=("127.0.0.1",), fetch_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(MediaRefused) as err:
        load_request_image(f"{media_host}/trickle-headers.png", "image 0", policy)
    elapsed = time.monotonic() - started
    assert str(err.value) == "image 0: the download did not finish within 1 s (--media-fetch-timeout)"
    assert 0.9 < elapsed < 3.0, elapsed


def test_an_image_url_on_the_server_itself_does_not_stall_it(server):
    """Images are fetched off the event loop: a URL pointing back at the server is answered (401: the fetch sends
    no key) instead of waiting for the server that waits for it, as it did when the fetch blocked the loop."""
    status, body = chat(server, {"messages": ask(f"{server}/v1/models", "Hi")})
    assert "the URL answered HTTP 401 Unauthorized" in assert_openai_error(status, body, 400)["message"]


def test_image_limits_are_checked_before_decoding(server, folders):
    media, _ = folders
    question = QUESTIONS[0].question
    over_bytes = "data:image/png;base64," + base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 3)).decode()
    cases = [
        (over_bytes, f"the image is {MAX_IMAGE_BYTES + 3} bytes; this server accepts images of at most "
                     f"{MAX_IMAGE_BYTES} bytes (--max-image-bytes); send a smaller or more compressed image"),
        (str(media / "big.png"), f"the image is {len(png_bytes(QUESTIONS[0].image)) + MAX_IMAGE_BYTES} bytes; this "
                                 f"server accepts images of at most {MAX_IMAGE_BYTES} bytes"),
        # a header claiming 400 x 300 pixels and too little data to decode them: refused for its pixels
        ("data:image/png;base64," + base64.b64encode(png_header(400, 300)).decode(),
         f"the image has 400 x 300 = 120000 pixels; this server accepts images of at most {MAX_IMAGE_PIXELS} pixels "
         "(--max-image-pixels); send a smaller image"),
        # over PIL's own decompression-bomb limit, also from the header
        ("data:image/png;base64," + base64.b64encode(png_header(100_000, 100_000)).decode(),
         f"the image has more than {MAX_IMAGE_PIXELS} pixels"),
        ("data:image/png;base64," + base64.b64encode(png_header(200, 200)).decode(),
         "the image data could not be decoded"),  # within the limit: decoded, and truncated
    ]
    for url, message in cases:
        status, body = chat(server, {"messages": ask(url, question)})
        error = assert_openai_error(status, body, 400)
        assert message in error["message"], (url[:80], error)
    too_many = [{"type": "image_url", "image_url": {"url": data_uri(QUESTIONS[0].image)}}] * (MAX_IMAGES + 1)
    status, body = chat(server, {"messages": [{"role": "user", "content": too_many}]})
    assert assert_openai_error(status, body, 400)["message"] == (
        f"Too many images: {MAX_IMAGES + 1}; this server accepts at most {MAX_IMAGES} per request "
        "(--max-images-per-request).")


def test_a_request_s_images_together_are_bounded_before_any_is_decoded(server):
    """The per-request budgets: the images' pixels (from their headers: these truncated PNGs would fail to decode)
    and their encoded bytes, together; refused at the image that goes over, naming it."""
    question = QUESTIONS[0].question
    header = "data:image/png;base64," + base64.b64encode(png_header(300, 300)).decode()  # 90,000 pixels each
    padded = png_bytes(QUESTIONS[0].image) + b"\0" * 50_000  # a valid PNG of over 50,000 bytes
    padded_uri = "data:image/png;base64," + base64.b64encode(padded).decode()
    assert len(header) < 120 < len(padded_uri)  # the error names a long URI by its start and length
    cases = [
        ([header, header], f"messages[0]: image 1 ({header!r}): with this image the request's images have 180000 "
                           f"pixels; this server accepts at most {MAX_REQUEST_PIXELS} pixels per request "
                           "(--max-request-pixels); send fewer or smaller images"),
        ([padded_uri, padded_uri], f"messages[0]: image 1 ({padded_uri[:48]!r}... ({len(padded_uri)} characters)): "
                                   f"with this image the request's images are {2 * len(padded)} bytes; this server "
                                   f"accepts at most {MAX_REQUEST_IMAGE_BYTES} bytes of images per request "
                                   "(--max-request-image-bytes); send fewer or smaller images"),
    ]
    for urls, message in cases:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        status, body = chat(server, {"messages": [{"role": "user", "content": [*content, {"type": "text",
                                                                                         "text": question}]}]})
        error = assert_openai_error(status, body, 400)
        assert (error["message"], error["param"]) == (message, "messages[0].content[1].image_url.url")
    status, answer = chat(server, {"messages": ask(padded_uri, question)})  # one of them is within both budgets
    assert status == 200 and answer["choices"][0]["message"]["content"] == QUESTIONS[0].expected


def test_a_text_longer_than_the_context_is_refused_without_tokenizing(server):
    """No token of the demo model spans more than 13 characters (`<IMG_CONTEXT>`), nor 4 x 13 after its NFC
    normalization: 220,000 characters are at least 4,230 tokens, over its 4,096."""
    status, body = chat(server, {"messages": [{"role": "user", "content": "x" * 220_000}]})
    error = assert_openai_error(status, body, 400)
    assert (error["message"], error["param"], error["code"]) == (
        f"This model's maximum context length is {CONTEXT} tokens. However, the text of your messages alone is at "
        "least 4230 tokens (220000 characters other than spaces and line breaks; a token of this model spans at most "
        "13). Please reduce the length of the messages.", "messages", "context_length_exceeded")
    status, body = chat(server, {"messages": [{"role": "user", "content": " " * 220_000 + "Hi"}], "max_tokens": 1})
    assert status == 400 and "you requested" in body["error"]["message"]  # spaces count for nothing: tokenized


RESERVED_TAGS = ("<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>")


@pytest.mark.parametrize("tag", RESERVED_TAGS)
def test_a_tag_reserved_for_images_in_a_message_text_is_a_400_naming_it(server, tag):
    """A literal <image>, <video>, <img>, </img> or <IMG_CONTEXT> in a message's text would be read as an image
    placeholder (it was a 500: the prompt's image tokens no longer matched the images); it is a 400 naming the tag,
    as on the vLLM route, in string content and in a text part, with and without an image."""
    text = f"What does {tag} mean here?"
    image = {"type": "image_url", "image_url": {"url": data_uri(QUESTIONS[0].image)}}
    cases = {
        "messages[0].content": [{"role": "user", "content": text}],
        "messages[0].content[0].text": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "messages[1].content[1].text": [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": [image, {"type": "text", "text": text}]}],
        "messages[2].content": [{"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]},
                                {"role": "assistant", "content": "red"}, {"role": "user", "content": text}],
    }
    for param, messages in cases.items():
        for stream in (False, True):
            status, body = chat(server, {"messages": messages, "max_tokens": 4, "stream": stream})
            error = assert_openai_error(status, body, 400)
            assert error == {"message": f"message text contains '{tag}', which this model reserves for image input; "
                                        f"send images as image content parts and remove or reword '{tag}' in the "
                                        "text", "type": "invalid_request_error", "param": param, "code": None}


def test_text_near_the_reserved_tags_is_answered(server):
    status, body = chat(server, {"messages": [{"role": "user", "content": "Is <images> or <IMG> or image a tag?"}],
                                 "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body


def test_a_body_of_too_many_json_values_is_a_413_before_it_is_parsed(server):
    compact = json.dumps({"messages": HI, "metadata": {"values": [0] * 100_001}}, separators=(",", ":"))
    status, body = chat(server, compact.encode())  # 200 KB: within the 256 KiB limit
    error = assert_openai_error(status, body, 413)
    assert (error["message"], error["code"]) == (
        "The request body holds more than 100000 JSON values; this server parses at most 100000 per request. Send "
        "fewer messages or content parts.", "request_too_large")
    text = ",".join("[]" for _ in range(40_000))  # commas and brackets inside a string are no values: parsed,
    status, body = chat(server, {"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert assert_openai_error(status, body, 400)["code"] == "context_length_exceeded"  # and tokenized


def test_request_bodies_over_the_limit_are_a_413(server):
    body = {"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}
    status, answer = chat(server, body)
    assert assert_openai_error(status, answer, 413)["message"].startswith(
        f"The request body is {len(json.dumps(body))} bytes; this server accepts at most {MAX_REQUEST_BYTES} "
        "(--max-request-bytes).")
    status, answer = chat(server, body, chunked=True)  # no Content-Length: counted while reading
    assert assert_openai_error(status, answer, 413)["message"].startswith(
        f"The request body is more than {MAX_REQUEST_BYTES} bytes")
    status, answer = chat(server, body, key="wrong")  # the key is checked before any body is read
    assert status == 401


def test_validated_bodies_are_normalised():
    body = {"messages": HI, "temperature": 1e-300, "max_completion_tokens": 7}
    checked, images = validate_chat_request(body, RequestLimits())
    assert checked == {"messages": HI, "temperature": 0.0, "max_tokens": 7} and images == []
    assert body["temperature"] == 1e-300  # the caller's body is left alone
    checked, images = validate_chat_request({"messages": ask("data:x", "Hi"), "temperature": 0.5}, RequestLimits())
    assert checked["temperature"] == 0.5 and images == [("data:x", "messages[0].content[0].image_url.url")]
    for bias, expected in [({}, None), ({"3": 5}, {"3": 5.0})]:
        checked, _ = validate_chat_request({"messages": HI, "logit_bias": bias}, RequestLimits())
        assert checked.get("logit_bias") == expected
        assert all(type(value) is float for value in (checked.get("logit_bias") or {}).values())


def test_media_policy_checks_the_resolved_address_and_is_off_by_default(tmp_path):
    """`load_request_image` without a server: the defaults, and the address a name resolves to."""
    QUESTIONS[0].image.save(tmp_path / "a.png")
    with pytest.raises(MediaRefused, match="this server reads no local files"):
        load_request_image(str(tmp_path / "a.png"), "image 0", MediaPolicy())
    with pytest.raises(MediaRefused, match="this server fetches no image URLs"):
        load_request_image("http://127.0.0.1:9/a.png", "image 0", MediaPolicy())
    assert (MediaPolicy().max_image_bytes, MediaPolicy().max_image_pixels, MediaPolicy().fetch_timeout) == (
        20 * 2**20, 40_000_000, 10.0)
    assert load_request_image("a.png", "image 0", MediaPolicy(allowed_local_media_path=tmp_path)).size == (112, 112)
    policy = MediaPolicy(allowed_media_domains=("localhost", "10.0.0.0/8", "images.example.com"))
    assert policy.host_allowed("LOCALHOST.") and policy.host_allowed("10.1.2.3") and not policy.host_allowed("10.0")
    with pytest.raises(MediaRefused, match=r"the host 'localhost' resolves to (127\.0\.0\.1|::1), a non-public"):
        load_request_image("http://localhost:9/a.png", "image 0", policy)
    import ipaddress

    for address, allowed in [("10.9.9.9", True), ("8.8.8.8", True), ("127.0.0.1", False), ("192.168.1.1", False),
                             ("169.254.169.254", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
                             ("0.0.0.0", False), ("fe80::1", False)]:
        parsed = ipaddress.ip_address(address)
        parsed = parsed.ipv4_mapped or parsed if parsed.version == 6 else parsed
        assert policy.address_allowed(parsed) is allowed, address
    with pytest.raises(ValueError, match="not a host name, an IP address or a network"):
        MediaPolicy(allowed_media_domains=("https://images.example.com/",))


# --- client mistakes: a 4xx with OpenAI's error object --------------------------------------------------------

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body,message,param", [
    # the four of issue 42 (HTTP 500 before: KeyError, IndexError, ValueError, ValueError)
    ({}, "Missing required parameter: 'messages'.", "messages"),
    ({"messages": []}, "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
                       "array instead.", "messages"),
    ({"messages": HI, "max_tokens": -5}, "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, "
                                         "but got -5 instead.", "max_tokens"),
    ({"messages": HI, "max_tokens": "many"}, "Invalid type for 'max_tokens': expected an integer, but got a string "
                                             "instead.", "max_tokens"),
    ({"messages": HI, "max_tokens": 0}, "Invalid 'max_tokens': integer below minimum value.", "max_tokens"),
    ({"messages": HI, "max_tokens": 5000}, f"Invalid 'max_tokens': integer above maximum value. Expected a value <= "
                                           f"{CONTEXT} (the model's context length), but got 5000 instead.",
     "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 1.5}, "Invalid type for 'max_completion_tokens': expected an integer",
     "max_completion_tokens"),
    ({"messages": HI, "max_tokens": True}, "Invalid type for 'max_tokens': expected an integer, but got a boolean",
     "max_tokens"),
    ({"messages": "Hi"}, "Invalid type for 'messages': expected an array of messages, but got a string instead.",
     "messages"),
    ({"messages": [None]}, "Invalid type for 'messages[0]': expected an object, but got null instead.", "messages[0]"),
    ({"messages": [{"content": "Hi"}]}, "Invalid 'messages[0].role': null; InternVL-X's chat templates take "
                                        "'system' (the first message only), 'user' and 'assistant'.",
     "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "Invalid 'messages[0].role': 'tool'", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "Invalid 'messages[1].role': 'system' is only accepted as the first message.", "messages[1].role"),
    ({"messages": [{"role": "user"}]}, "Missing required parameter: 'messages[0].content'.", "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "Invalid type for 'messages[0].content': expected a string or "
                                                     "an array of content parts, but got an integer instead.",
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
     "Missing or invalid 'messages[0].content[0].type': expected one of text, image_url.",
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "Invalid type for 'messages[0].content[0].text': expected a string, but got null instead.",
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "Invalid type for 'messages[0].content[0].image_url.url': expected a non-empty string",
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]},
     "Invalid 'messages[0].content[0].type': 'input_audio' is not accepted; this server takes 'text' and "
     "'image_url' parts.", "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/etc/passwd"}}]}]},
     "(video is not served: send frames as images)", "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "image parts are only accepted in user messages, not in assistant messages.", "messages[0].content[0]"),
    ({"messages": HI, "temperature": -1}, "Invalid 'temperature': expected a number >= 0 and <= 2, but got -1 "
                                          "instead.", "temperature"),
    ({"messages": HI, "temperature": "hot"}, "Invalid type for 'temperature': expected a number", "temperature"),
    ({"messages": HI, "top_p": 1.5}, "Invalid 'top_p': expected a number >= 0 and <= 1", "top_p"),
    ({"messages": HI, "frequency_penalty": -1.5}, "(it becomes transformers' repetition_penalty = 1 + "
                                                  "frequency_penalty, which must be > 0)", "frequency_penalty"),
    ({"messages": HI, "stop": [1]}, "Invalid type for 'stop': expected a non-empty string or an array of non-empty "
                                    "strings", "stop"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "Invalid 'stop': expected 1 to 4 stop sequences, got 5.",
     "stop"),
    ({"messages": HI, "seed": "x"}, "Invalid type for 'seed': expected an integer", "seed"),
    ({"messages": HI, "seed": 2**70}, "Invalid 'seed': integer above maximum value.", "seed"),
    ({"messages": HI, "logit_bias": {"99999": 5}}, "Invalid 'logit_bias': key '99999' is not a token id (0 to 811).",
     "logit_bias"),
    ({"messages": HI, "logit_bias": {"5": 500}}, "the bias of token 5 must be a number from -100 to 100.",
     "logit_bias"),
    ({"messages": HI, "stream": "yes"}, "Invalid type for 'stream': expected a boolean, but got a string instead.",
     "stream"),
    ({"messages": HI, "model": 5}, "Invalid type for 'model': expected a string, but got an integer instead.",
     "model"),
    ({"messages": HI, "n": 2}, "Invalid 'n': 2; this server returns one choice per request.", "n"),
    ({"messages": HI, "logprobs": True}, "Invalid 'logprobs': true; this server does not return log probabilities.",
     "logprobs"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "InternVL-X's chat templates have no tool calling.", "tools"),
    ({"messages": HI, "response_format": {"type": "json_object"}},
     "this server does not constrain the answer's format.", "response_format"),
    ({"messages": HI, "generation_config": "{\"num_beams\": 64}"},
     "'generation_config' is not accepted by this server: it sets any generation option of the server.",
     "generation_config"),
    ({"messages": HI, "chat_template_kwargs": {"max_tiles": 1000}},
     "'chat_template_kwargs' is not accepted by this server: it sets any option of the chat template and the "
     "processor.", "chat_template_kwargs"),
    ({"messages": HI, "video": 1}, "Unrecognized request argument supplied: video", "video"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "Invalid string in 'messages[0].content': it is not valid "
                                                            "Unicode (a lone surrogate such as \\ud800).",
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 6000}]},
     f"This model's maximum context length is {CONTEXT} tokens. However, you requested ", "messages"),
    ({"messages": HI, "max_tokens": CONTEXT}, f"This model's maximum context length is {CONTEXT} tokens.", "messages"),
])
def test_client_mistakes_are_a_400_with_openai_error_object(server, body, message, param):
    for stream in (False, True):
        status, answer = chat(server, {**body, "stream": stream} if "stream" not in body else body)
        error = assert_openai_error(status, answer, 400)
        assert message in error["message"] and error["param"] == param, error
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw,message", [
    (b"not json", "We could not parse the JSON body of your request (Expecting value); send a JSON object."),
    (b'{"messages": [', "We could not parse the JSON body of your request"),
    (b"[1, 2]", "The request body must be a JSON object."),
    (b'"text"', "The request body must be a JSON object."),
    (b"", "The request has no body; send a JSON object."),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
     "Invalid 'temperature': expected a finite number, but got nan instead."),
    (b"\xff\xfe\x00", "There was an error parsing the body"),  # Starlette's own 400 (not UTF-8), in OpenAI's shape
])
def test_bodies_that_are_no_json_object_are_a_400(server, raw, message):
    status, answer = chat(server, raw)
    assert message in assert_openai_error(status, answer, 400)["message"]


def test_a_request_for_another_model_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:  # transformers' own check, in OpenAI's error object
        client.chat.completions.create(model="someone/else", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["message"] == f"Server is pinned to '{DEMO}'; requested 'someone/else'."


def test_bad_images_are_a_400_naming_the_image_streamed_or_not(client):
    """Through the openai client: the message names the message and the image, and is in the client's exception."""
    import openai

    good = data_uri(QUESTIONS[0].image)
    cases = [
        ("data:image/png;base64,iVBORw0K$$$", "messages[0]: image 1 ('data:image/png;base64,iVBORw0K$$$'): the "
                                              "base64 data is invalid ("),
        ("data:image/png;base64,aGVsbG8=", "messages[0]: image 1 ('data:image/png;base64,aGVsbG8='): not a "
                                           "readable image (accepted formats: PNG, JPEG, WEBP, GIF, BMP)"),
        ("data:image/png,no-comma-needed", "messages[0]: image 1 ('data:image/png,no-comma-needed'): not a readable "
                                           "image"),
        ("data:image/png;base64", "messages[0]: image 1 ('data:image/png;base64'): a data URI needs a comma"),
    ]
    for url, message in cases:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}},
                                                 {"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What differs?"}]}]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=DEMO, messages=messages, stream=stream)
            assert err.value.status_code == 400
            assert err.value.body["message"].startswith(message), (url, stream)
            assert err.value.body["type"] == "invalid_request_error"
            assert err.value.body["param"] == "messages[0].content[1].image_url.url"
            assert message in str(err.value)  # OpenAI clients show it in the exception
    # the server is still fine
    sample = QUESTIONS[3]
    answer = client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question))
    assert answer.choices[0].message.content == sample.expected


def test_fuzzed_requests_never_get_a_5xx(server, folders, media_host):
    """300 seeded requests: malformed JSON, wrong types, huge values, bad content parts and image URLs; each is
    answered 200 or 4xx with OpenAI's error object, never 5xx; the server answers right afterwards."""
    rng = random.Random(20261123)
    media, outside = folders
    image = data_uri(QUESTIONS[0].image)
    values = [None, True, False, 0, -1, 1, 2**31, 2**70, -2**70, 1e308, -0.0, 0.5, "", "x", "x" * 5000, "\x00",
              "\ud800", [], [None], [[]], {}, {"a": 1}, {"type": "text"}, {"url": image}, [{"type": "text"}], CONTEXT,
              {"type": "image_url", "image_url": {"url": image}}, "image_url", "text", "system", "assistant", "user"]
    urls = [image, "data:image/png;base64,", "data:,", "data:image/png;base64,====", "data:image/gif;base64,R0lGOD",
            "data:image/png;base64," + base64.b64encode(png_header(1, 60_000)).decode(), "/etc/shadow",
            str(outside / "secret.png"), str(media / "fifo.png"), "sub/shape.png", "../../../../etc/passwd",
            f"{media_host}/loop", f"{media_host}/shape.png", "http://[::1", "http://127.0.0.1:0/", "https://",
            "http://127.0.0.1:99999/", "javascript:alert(1)", "file://", "file:///", "C:\\windows\\win.ini",
            "%2e%2e/%2e%2e/etc/passwd", "\\\\server\\share\\a.png", "x" * 300]
    raw_bodies = [b"{", b"}", b"null", b"1e999999", b"[" * 5000 + b"]" * 5000, b'{"messages": ' + b"[" * 3000,
                  b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
                  b'{"a": "\\ud800"}', b"\x00\x01\x02", b'{"messages": "\\u0000"}', b"{" + b" " * 10000 + b"}"]

    def base() -> dict:
        return {"model": DEMO, "max_tokens": 1, "stream": rng.random() < 0.2, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "Sure?"}]}

    def slots(node, path=()):
        yield path
        if isinstance(node, dict):
            for key, child in node.items():
                yield from slots(child, (*path, key))
        elif isinstance(node, list):
            for index, child in enumerate(node):
                yield from slots(child, (*path, index))

    def mutate(body: dict) -> dict | bytes:
        choice = rng.random()
        if choice < 0.1:
            return rng.choice(raw_bodies)
        if choice < 0.3:  # an image URL from the list above
            body["messages"][1]["content"][0]["image_url"]["url"] = rng.choice(urls)
            return body
        for _ in range(rng.randint(1, 3)):  # max_tokens stays 1: answers are one token (huge values: tested above)
            path = rng.choice([path for path in slots(body) if path and path != ("max_tokens",)])
            parent = body
            for key in path[:-1]:
                parent = parent[key]
            action = rng.random()
            if action < 0.15:
                del parent[path[-1]]
            elif action < 0.25 and isinstance(parent, dict):
                parent[rng.choice(["n", "tools", "seed", "stop", "top_p", "logit_bias", "frequency_penalty", "model",
                                   "temperature", "user", "stream_options", "extra", "name", "tool_calls"])] = \
                    rng.choice(values)
            else:
                parent[path[-1]] = rng.choice(values)
        return body

    counts = {}
    for number in range(300):
        body = mutate(base())
        status, answer = chat(server, body)
        counts[status] = counts.get(status, 0) + 1
        shown = body[:300] if isinstance(body, bytes) else json.dumps(body)[:3000]
        assert status < 500, (number, shown, answer)
        if status == 200:
            assert isinstance(answer, str) or answer["object"] == "chat.completion", (number, shown, answer)
            if isinstance(answer, str):  # a stream: events, none an error
                assert answer.startswith("data: ") and '"error"' not in answer, (number, shown, answer)
        else:
            try:
                assert_openai_error(status, answer)
            except AssertionError:
                pytest.fail(f"request {number}: not OpenAI's error object: {shown} -> {status} {answer}")
    print("fuzz statuses:", counts)
    assert counts.get(200, 0) >= 10 and sum(n for status, n in counts.items() if status != 200) >= 200, counts
    sample = QUESTIONS[4]
    status, answer = chat(server, {"messages": ask(data_uri(sample.image), sample.question)})
    assert status == 200 and answer["choices"][0]["message"]["content"] == sample.expected


# --- without a server ------------------------------------------------------------------------------------------


def test_the_model_manager_stops_at_the_end_of_turn_token_and_routes_the_model_as_a_vlm(tmp_path):
    """A checkpoint whose generation_config.json stops only at <|endoftext|> (800) still ends answers at the chat
    template's <|im_end|> (802), as `internvlx chat` does; the model is routed as image-text-to-text."""
    import shutil

    pytest.importorskip("fastapi", reason='needs the serve extra: pip install "internvlx-hf[serve]"')
    from internvlx_hf.serving import serving_classes

    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 800}))
    manager_class, _, _ = serving_classes()
    manager = manager_class(device="cpu", trust_remote_code=True, force_model=str(folder))
    try:
        model, processor = manager.load_model_and_processor(manager.process_model_name(str(folder)))
        assert type(model).__name__ == "InternVLXForConditionalGeneration" and not model.training
        assert model.generation_config.eos_token_id == [800, 802]
        assert manager.get_model_modality(model, processor).value == "VLM"
        assert [entry["id"] for entry in manager.get_gen_models()] == [str(folder)]
    finally:
        manager.shutdown()


def test_tested_transformers_releases_run_newer_ones_warn_older_ones_are_refused(capsys):
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install "internvlx-hf[serve]"')
    from internvlx_hf.serving import app

    app._warn_untested.cache_clear()
    for version in (*TESTED_TRANSFORMERS, "5.20.0", "5.22.0", "5.23.4", "5.24.2"):
        check_serving_available(version)
    assert capsys.readouterr().err == ""
    check_serving_available("5.25.0")
    check_serving_available("5.25.0")  # once per process
    check_serving_available("6.1.0")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: transformers {version} is newer than the releases internvlx serve was tested with (5.16.1 to "
        "5.24.0); it builds on internals of transformers' server that may have changed: if requests fail, install a "
        f"tested release: pip install \"transformers{SUPPORTED_TRANSFORMERS}\"" for version in ("5.25.0", "6.1.0")]
    for version in ("5.16.0", "5.15.1", "5.0.0", "4.57.1"):
        with pytest.raises(ServingUnavailable) as err:
            check_serving_available(version)
        assert str(err.value).endswith(f"tested with transformers 5.16.1 to 5.24.0; this is transformers {version}. "
                                       f"Install a tested release: pip install \"transformers>=5.16.1,<5.25\"")


def test_a_missing_serve_extra_is_one_line_naming_it(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("fastapi", "uvicorn") else find_spec(name, *args))
    assert main(["serve", DEMO]) == 2
    assert capsys.readouterr().err == ("internvlx serve: error: serving needs fastapi, uvicorn (transformers' server): "
                                       "pip install \"internvlx-hf[serve]\"\n")


@pytest.mark.parametrize("argv,message", [
    (["serve", DEMO, "--port", "0"], "--port must be between 1 and 65535, got 0."),
    (["serve", "/no/such/folder"], "MODEL '/no/such/folder': no such folder"),
    (["serve", DEMO, "--allowed-local-media-path", "/no/such/folder"],
     "--allowed-local-media-path '/no/such/folder': no such folder; name the folder whose images clients may ask "
     "about."),
    (["serve", DEMO, "--allowed-media-domains", "https://images.example.com/"],
     "--allowed-media-domains: allowed media domain 'https://images.example.com/': not a host name, an IP address "
     "or a network"),
    (["serve", DEMO, "--max-images-per-request", "0"], "--max-images-per-request must be at least 1, got 0."),
    (["serve", DEMO, "--media-fetch-timeout", "0"], "--media-fetch-timeout must be more than 0 seconds, got 0."),
    (["serve", DEMO, "--api-key", " "], "--api-key (or INTERNVLX_API_KEY) is empty; give a key, or leave it out."),
    (["serve", DEMO, "--api-key", ""], "--api-key (or INTERNVLX_API_KEY) is empty; give a key, or leave it out."),
    (["serve", DEMO, "--api-key", "clé-secrète"],
     "--api-key (or INTERNVLX_API_KEY) contains 'é': a key is sent in an HTTP header ('Authorization: Bearer KEY'), "
     "so it may hold printable ASCII characters only, without spaces"),
    (["serve", DEMO, "--api-key", "two words"], "--api-key (or INTERNVLX_API_KEY) contains ' ': a key is sent"),
    (["serve", DEMO, "--api-key", "key\x07"], "--api-key (or INTERNVLX_API_KEY) contains '\\x07': a key is sent"),
    (["serve", DEMO, "--max-waiting-requests", "0"], "--max-waiting-requests must be at least 1, got 0."),
    (["serve", DEMO, "--max-connections", "0"], "--max-connections must be at least 1, got 0."),
    (["serve", DEMO, "--generation-timeout", "0"], "--generation-timeout must be more than 0 seconds, got 0."),
    (["serve", DEMO, "--request-timeout", "nan"], "--request-timeout must be more than 0 seconds, got nan."),
    (["serve", DEMO, "--keep-alive-timeout", "-1"], "--keep-alive-timeout must be more than 0 seconds, got -1."),
    (["serve", DEMO, "--max-request-pixels", "0"], "--max-request-pixels must be at least 1, got 0."),
    (["serve", DEMO, "--max-concurrent-decodes", "0"], "--max-concurrent-decodes must be at least 1, got 0."),
    (["serve", DEMO, "--allowed-hosts", "api.example.com:8000"],
     "--allowed-hosts: allowed host 'api.example.com:8000': not a host name, *.name (its subdomains), an IP address, "
     "a network or *; give names as in URLs (api.example.com), without a scheme, a port or a path"),
    (["serve", str(demo_model_dir().parent)], "MODEL '"),  # a folder without config.json
])
def test_bad_arguments_fail_before_loading(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value,shown", [("", None), ("ключ", "'к'"), ("key with spaces", "' '")])
def test_an_api_key_from_the_environment_is_checked_as_the_flag(value, shown, monkeypatch, capsys):
    monkeypatch.setenv("INTERNVLX_API_KEY", value)
    assert main(["serve", DEMO]) == 2
    error = capsys.readouterr().err
    if shown is None:
        assert "--api-key (or INTERNVLX_API_KEY) is empty; give a key, or leave it out." in error
    else:
        assert f"--api-key (or INTERNVLX_API_KEY) contains {shown}: a key is sent in an HTTP header" in error


def test_sizes_take_units(capsys):
    from internvlx_hf.cli.serve import _byte_size

    assert [_byte_size(text) for text in ("1048576", "20MiB", "5MB", "512KiB", "1.5GiB", "1 kb")] == [
        2**20, 20 * 2**20, 5 * 10**6, 2**19, 3 * 2**29, 1000]
    with pytest.raises(SystemExit):
        main(["serve", DEMO, "--max-image-bytes", "20XB"])
    assert ("argument --max-image-bytes: '20XB' is not a size: give bytes, or a number with KB, MB, GB, KiB, MiB or "
            "GiB (e.g. 20MiB)") in capsys.readouterr().err
