"""`internvlx serve`'s bounds on connections and on generation (issue 58), on a server of its own.

The server runs with an open-file limit of 256 (set in the child, so the cap on open connections follows from it:
256 - 128 = 128), a request deadline of 2 s, one waiting request at most and a generation deadline of 4 s; it
serves the packaged demo model. The generation queue's order and bounds are also checked without a server.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from internvlx_hf.demo import demo_model_dir
from internvlx_hf.serving import ServingUnavailable, check_serving_available
from internvlx_hf.serving.limits import ConnectionLimits, RESERVED_DESCRIPTORS, default_max_connections
from internvlx_hf.serving.queue import GenerationQueue, ServerBusy

DEMO = str(demo_model_dir())
NOFILE, REQUEST_TIMEOUT, GENERATION_TIMEOUT = 256, 2, 4
# Keeps the demo model from ending its answer (<|endoftext|> and <|im_end|> banned): it generates to max_tokens.
NO_END = {"800": -100, "802": -100}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def low_nofile() -> None:  # in the server's process, before it starts
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def post(base: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        return response.status, dict(response.getheaders()), json.loads(text)
    finally:
        connection.close()


def health(base: str, timeout: float = 5) -> int:
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    try:
        check_serving_available()
    except ServingUnavailable as error:
        pytest.skip(str(error))
    log = tmp_path_factory.mktemp("bounds") / "server.log"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("INTERNVLX_API_KEY", None)
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "internvlx_hf", "serve", DEMO, "--port", str(port), "--log-level", "warning",
             "--request-timeout", str(REQUEST_TIMEOUT), "--max-waiting-requests", "1",
             "--generation-timeout", str(GENERATION_TIMEOUT)],
            stdout=output, stderr=subprocess.STDOUT, env=env, preexec_fn=low_nofile)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                return health(base) == 200
            except OSError:
                return False

        if not wait_for(up, 300):
            pytest.fail(f"the server did not answer /health within 300 s:\n{log.read_text()}")
        yield types.SimpleNamespace(url=base, pid=process.pid, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_silent_connections_beyond_the_cap_cannot_exhaust_descriptors(bounded):
    """More silent connections than the server has descriptors: it closes the oldest idle ones beyond its cap
    (128 = 256 - 128), answers /health throughout, and is back to its descriptors once they are gone."""
    start = descriptors(bounded.pid)
    sockets = []
    try:
        for _ in range(NOFILE + 44):  # 300 connections that send nothing
            sockets.append(socket.create_connection(("127.0.0.1", int(bounded.url.rpartition(":")[2])), timeout=5))
        assert health(bounded.url) == 200
        assert wait_for(lambda: descriptors(bounded.pid) <= start + NOFILE - RESERVED_DESCRIPTORS, 10)
        assert health(bounded.url) == 200
    finally:
        for sock in sockets:
            sock.close()
    assert wait_for(lambda: descriptors(bounded.pid) == start, 10 + REQUEST_TIMEOUT), (start, descriptors(bounded.pid))
    assert health(bounded.url) == 200
    assert "Too many open files" not in bounded.log.read_text()


def test_a_request_whose_headers_do_not_arrive_in_time_is_closed(bounded):
    port = int(bounded.url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10) as silent, \
            socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10) as trickling:
        trickling.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(REQUEST_TIMEOUT * 2 + 2):  # a header line every half second: never done
            try:
                trickling.sendall(b"X-Slow: 1\r\n")
            except OSError:  # closed by the server
                break
            time.sleep(0.5)
        assert silent.recv(1) == b""  # closed by the server, without an answer
        try:
            assert trickling.recv(1) == b""
        except ConnectionResetError:
            pass


def test_a_generation_stops_at_its_deadline_with_finish_reason_length(bounded):
    status, _, body = post(bounded.url, {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000,
                                         "logit_bias": NO_END})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < 3000, body


def test_requests_beyond_the_waiting_bound_are_a_503_with_retry_after(bounded):
    """One request generates (streamed, so that it is known to hold the model), one waits; the others are refused
    at once with a 503 and Retry-After; the waiting one is answered after the running one."""
    connection = http.client.HTTPConnection(bounded.url.removeprefix("http://"), timeout=120)
    connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000,
                                        "logit_bias": NO_END, "stream": True}))
    long = connection.getresponse()
    assert long.status == 200 and long.readline().startswith(b"data: ")  # generating
    answers = []

    def short() -> None:
        answers.append(post(bounded.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))

    threads = [threading.Thread(target=short) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    rest = long.read().decode()
    connection.close()
    assert '"finish_reason":"length"' in rest.replace(" ", "")
    assert sorted(status for status, _, _ in answers) == [200, 503, 503, 503], answers
    for status, headers, body in answers:
        if status == 503:
            assert {key.lower(): value for key, value in headers.items()}["retry-after"] == "5"
            assert body["error"] == {
                "message": "The server is busy: 1 requests are waiting for the model, the most it queues "
                           "(--max-waiting-requests). Retry after 5 seconds.",
                "type": "server_error", "param": None, "code": "server_busy"}


# --- without a server ------------------------------------------------------------------------------------------


def test_the_queue_serves_short_requests_first_without_starving_long_ones():
    """Finish-tag order: requests of 2 tokens that arrive behind requests of 3,800 go first; once the tokens served
    add up to a long one's, that one goes before newer short ones."""
    async def scenario() -> list[str]:
        queue, order = GenerationQueue(max_waiting=8, retry_after=5), []

        async def request(name: str, tokens: int) -> None:
            async with queue.turn(tokens):
                order.append(name)
                await asyncio.sleep(0)

        await queue.acquire(3800)  # a long one runs
        tasks = [asyncio.create_task(request(name, tokens))
                 for name, tokens in (("long1", 3800), ("long2", 3800), ("short1", 2), ("short2", 2))]
        await asyncio.sleep(0)
        assert queue.waiting == 4
        queue.release(0)  # the running one ends (charged 0: the virtual time stays 0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["short1", "short2", "long1", "long2"]

    async def no_starvation() -> list[str]:
        queue, order = GenerationQueue(max_waiting=8), []

        async def request(name: str, tokens: int) -> None:
            async with queue.turn(tokens):
                order.append(name)

        await queue.acquire(1)
        long = asyncio.create_task(request("long", 10))
        await asyncio.sleep(0)
        queue.release(12)  # 12 tokens served since the long one arrived: the virtual time is past its tag (10)
        short = asyncio.create_task(request("short", 2))
        await asyncio.gather(long, short)
        return order

    assert asyncio.run(no_starvation()) == ["long", "short"]


def test_the_waiting_bound_refuses_the_request_beyond_it():
    async def scenario():
        queue = GenerationQueue(max_waiting=2, retry_after=7)
        await queue.acquire(10)
        waiting = [asyncio.create_task(queue.acquire(1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ServerBusy) as refused:
            await queue.acquire(1)
        assert (refused.value.status, refused.value.retry_after, refused.value.code) == (503, 7, "server_busy")
        waiting[0].cancel()  # a client that gave up frees its place
        await asyncio.sleep(0)
        assert queue.waiting == 1
        queue.release(10)
        queue.release(1)
        await asyncio.gather(waiting[1])
        queue.release(1)
        assert not queue.running and queue.waiting == 0

    asyncio.run(scenario())


def test_the_connection_cap_follows_the_open_file_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = max(1, min(4096, soft - RESERVED_DESCRIPTORS)) if soft != resource.RLIM_INFINITY else 4096
    assert default_max_connections() == expected == ConnectionLimits().max_connections
    assert ConnectionLimits(max_connections=5).max_connections == 5
    with pytest.raises(ValueError, match="request_timeout must be more than 0 seconds"):
        ConnectionLimits(request_timeout=0)


def test_malloc_trim_is_found_where_libc_is_glibc():
    import platform

    from internvlx_hf.serving.media import _malloc_trim, return_freed_memory

    if platform.libc_ver()[0] != "glibc":
        assert _malloc_trim() is None and return_freed_memory() is False
        return
    assert _malloc_trim() is not None
