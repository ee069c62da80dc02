"""`internvlx serve`'s bounds on connections and on generation (issue 58), on a server of its own.

The server runs with an open-file limit of 256 (set in the child, so the cap on open connections follows from it:
256 - 128 = 128), a request deadline of 2 s, two generations running at once taking turns of one token, one waiting
request at most and a generation deadline of 4 s; it serves the packaged demo model (PVTC + LVTC). The generation
queue's order and bounds and the lock's turns are also checked without a server.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
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

from internvlx_hf.demo import demo_model_dir, demo_samples
from internvlx_hf.serving import ServingUnavailable, check_serving_available
from internvlx_hf.serving.limits import ConnectionLimits, RESERVED_DESCRIPTORS, default_max_connections
from internvlx_hf.serving.queue import GenerationQueue, ServerBusy
from test_serve import stop

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


def settled_descriptors(pid: int) -> int:
    """The server's descriptors once the sockets of the requests before have been closed on its side."""
    counts = [descriptors(pid)]
    while len(counts) < 3 or len(set(counts[-3:])) > 1:
        time.sleep(0.2)
        counts.append(descriptors(pid))
    return counts[-1]


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
             "--max-active-generations", "2", "--generation-slice", "1",
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
        stop(process)


def test_silent_connections_beyond_the_cap_cannot_exhaust_descriptors(bounded):
    """More silent connections than the server has descriptors: it closes the oldest idle ones beyond its cap
    (128 = 256 - 128), answers /health throughout, and is back to its descriptors once they are gone."""
    start = settled_descriptors(bounded.pid)
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


def open_stream(base: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed chat completion whose first event was read: the request holds a running slot (transformers
    sends the first event once the handler returned, after the queue admitted the generation)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
    connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({**body, "stream": True}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    return connection, response


def stream_events(response: http.client.HTTPResponse) -> list[dict]:
    """The rest of a stream's events, decoded."""
    events = []
    for line in response:
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            events.append(json.loads(line[len(b"data: "):]))
    return events


def streamed_text(events: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for event in events for choice in event.get("choices", ()))


COUNT = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000, "logit_bias": NO_END}


def test_requests_beyond_the_waiting_bound_are_a_503_with_retry_after(bounded):
    """Two requests generate (streamed, so that they are known to hold the two running slots), one waits; the others
    are refused at once with a 503 and Retry-After; the waiting one is answered after a running one ended."""
    streams = [open_stream(bounded.url, COUNT) for _ in range(2)]
    answers = []

    def short() -> None:
        answers.append(post(bounded.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))

    threads = [threading.Thread(target=short) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for connection, long in streams:
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


def streamed(base: str, body: dict) -> tuple[str, int]:
    """A streamed answer's text and completion tokens (its last event's usage)."""
    connection, response = open_stream(base, body)
    try:
        events = stream_events(response)
    finally:
        connection.close()
    return streamed_text(events), events[-1]["usage"]["completion_tokens"]


def beside_a_long_one(base: str, long_body: dict, short_body: dict, gone: bool = False) -> dict:
    """``short_body`` streamed while ``long_body`` (no end of text: it runs to the 4 s deadline) streams: both
    answers, and whether the short one was complete before the long one's last event came. ``gone``: a second long
    request takes the other running slot first, and its client goes away at once."""
    connection, long = open_stream(base, long_body)
    if gone:
        other, _ = open_stream(base, long_body)
        other.sock.shutdown(socket.SHUT_RDWR)
        other.close()
    events, ended = [], {}

    def read_long() -> None:
        events.extend(stream_events(long))
        ended.setdefault("first", "long")

    reader = threading.Thread(target=read_long)
    reader.start()
    try:
        short = streamed(base, short_body)
        ended.setdefault("first", "short")
        reader.join(timeout=120)
    finally:
        connection.close()
    return {"short": short, "long": (streamed_text(events), events[-1]["usage"]["completion_tokens"]),
            "first": ended["first"], "finish": [choice["finish_reason"] for event in events
                                                for choice in event.get("choices", ()) if choice.get("finish_reason")]}


def test_a_short_request_is_answered_while_a_long_one_generates(bounded):
    """A 2-token request sent while a 3,000-token one streams takes turns with it and is answered while the long one
    still generates (without turns it waited for the long one's whole answer, here cut at the 4 s deadline)."""
    result = beside_a_long_one(bounded.url, COUNT, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 2, "logit_bias": NO_END})
    assert result["first"] == "short" and result["short"][1] == 2, result
    assert result["finish"] == ["length"] and 2 < result["long"][1] < 3000, result


def test_a_client_that_goes_away_frees_its_running_slot(bounded):
    """Both running slots taken by long streams, the client of the second goes away while its generation waits for
    its turn: the generation ends, and a 2-token request takes the slot while the first long one still generates."""
    result = beside_a_long_one(bounded.url, COUNT, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 2, "logit_bias": NO_END}, gone=True)
    assert result["first"] == "short" and result["short"][1] == 2, result


def test_generations_taking_turns_answer_as_each_does_alone(bounded):
    """Greedy answers are the same token for token when two generations take turns one token at a time as when each
    runs alone, for an image request through PVTC + LVTC and a text one, each as the long and as the short one:
    nothing a generation keeps between its steps lives on the shared model."""
    sample = demo_samples(seed=0)[0]
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": sample.question}]}],
             "logit_bias": NO_END, "temperature": 0}
    text = {"messages": [{"role": "user", "content": "Count to ten."}], "logit_bias": NO_END, "temperature": 0}
    for long, short in ((image, text), (text, image)):
        result = beside_a_long_one(bounded.url, {**long, "max_tokens": 3000}, {**short, "max_tokens": 64})
        assert result["first"] == "short", result
        long_text, long_tokens = result["long"]
        assert result["short"] == streamed(bounded.url, {**short, "max_tokens": 64})
        # the long one, cut by the 4 s deadline beside the short one, against its first tokens alone (few enough to
        # end well before the deadline on a loaded machine): the same text
        first = min(long_tokens, 200)
        alone_text, alone_tokens = streamed(bounded.url, {**long, "max_tokens": first})
        assert alone_tokens == first and long_text.startswith(alone_text), (long_tokens, alone_tokens)


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


def test_the_queue_runs_up_to_its_running_bound_at_once():
    async def scenario():
        queue = GenerationQueue(max_waiting=1, max_running=2)
        await queue.acquire(10)
        await queue.acquire(10)  # a second slot: no wait
        third = asyncio.create_task(queue.acquire(2))
        await asyncio.sleep(0)
        assert (queue.running, queue.waiting, third.done()) == (2, 1, False)
        with pytest.raises(ServerBusy):
            await queue.acquire(1)
        queue.release(10)
        await third
        assert (queue.running, queue.waiting) == (2, 0)
        queue.release(10)
        queue.release(2)
        assert queue.running == 0

    asyncio.run(scenario())


def test_the_model_lock_goes_round_robin_and_a_cancelled_turn_leaves_the_round():
    """Three generations of three steps, each handing the lock on after every step: they run in turns; one whose
    client went away while it waited for its first turn never runs, and the others go on without it."""
    from internvlx_hf.serving.slicing import RoundRobinLock, SliceCriteria, Turn

    lock, order = RoundRobinLock(), []
    turns = [Turn() for _ in range(4)]

    def generation(index: int) -> None:
        if not lock.take(turns[index]):
            order.append(f"{index} cancelled")
            return
        try:
            for step in range(3):
                order.append(index)
                if (index, step) == (0, 0):  # the others queue up behind the first turn
                    assert wait_for(lambda: lock.waiting == 3, 10)
                    lock.cancel(turns[3])
                    assert wait_for(lambda: "3 cancelled" in order, 10) and lock.waiting == 2
                lock.pass_if_waited_for(turns[index])
        finally:
            lock.give_back(turns[index])

    threads = [threading.Thread(target=generation, args=(0,))]
    threads[0].start()
    assert wait_for(lambda: bool(order), 10)
    for index in (1, 2, 3):
        threads.append(threading.Thread(target=generation, args=(index,)))
        threads[-1].start()
        assert wait_for(lambda: lock.waiting == index, 10)
    for thread in threads:
        thread.join(timeout=30)
    assert order == [0, "3 cancelled", 1, 2, 0, 1, 2, 0, 1, 2]

    import torch

    alone, ids = Turn(), torch.zeros(2, 5, dtype=torch.long)
    criteria = SliceCriteria(alone)
    assert lock.take(alone)
    assert criteria(ids, None).tolist() == [False, False] and criteria(ids, None).tolist() == [False, False]
    lock.cancel(alone)
    assert criteria(ids, None).tolist() == [True, True]  # its client went away: the generation stops
    lock.give_back(alone)


@pytest.mark.parametrize("max_tokens", [2, 3])
def test_a_generation_hands_the_lock_on_only_if_it_goes_on(max_tokens):
    """A generation of ``max_tokens`` (as the handler sets it up, turns of 2 tokens, the tiny model) admitted while
    another holds the lock: at the end of its first turn the other has the lock back. With max_tokens equal to the
    slice the generation has ended by then (it did not hand the lock on at its last token, to wait one more round
    for nothing); with one token more it waits for its next turn, its last token."""
    try:
        check_serving_available()
    except ServingUnavailable as error:
        pytest.skip(str(error))
    import torch
    from transformers import GenerationConfig

    from internvlx_hf.serving.handler import InternVLXChatCompletionHandler
    from internvlx_hf.serving.slicing import RoundRobinLock, SlicedGeneration, Turn
    from tiny import tiny_model

    model, lock, long, short, ended = tiny_model(layers=1), RoundRobinLock(), Turn(), Turn(), threading.Event()
    handler = types.SimpleNamespace(model_lock=lock, generation_slice=2, generation_timeout=None)
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7]])}
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False)
    InternVLXChatCompletionHandler._add_stopping_criteria(handler, inputs, config, 4, short)
    assert lock.take(long)
    generated = SlicedGeneration(lock, short, ended.set).submit(model.generate, **inputs, generation_config=config)
    assert wait_for(lambda: lock.waiting == 1, 10)
    assert lock.pass_if_waited_for(long)  # the long one's slice ends: the short one's turn, then the long one's
    behind = lock.waiting  # the short one, if it waits for another turn
    lock.give_back(long)
    assert generated.result(timeout=60).shape[-1] == 4 + max_tokens and ended.wait(10)
    assert behind == (0 if max_tokens == 2 else 1)


def test_a_cancelled_request_leaves_its_turn_at_once():
    """A request awaiting its generation (as transformers' non-streaming path does), cancelled while the generation
    waits for its turn: it leaves the round at once, its generation never runs, and its running slot is freed
    (``on_end``) while the other generation still holds the lock."""
    from internvlx_hf.serving.slicing import RoundRobinLock, SlicedGeneration, Turn

    lock, holder, waiter, ended, ran = RoundRobinLock(), Turn(), Turn(), threading.Event(), []
    assert lock.take(holder)

    async def generate() -> None:
        await SlicedGeneration(lock, waiter, ended.set).async_submit(ran.append, "ran")

    async def scenario() -> bool:
        request = asyncio.create_task(generate())
        assert await asyncio.to_thread(wait_for, lambda: lock.waiting == 1, 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        return await asyncio.to_thread(ended.wait, 10)

    try:
        assert asyncio.run(scenario()), "the cancelled request still waits for its turn"
        assert lock.waiting == 0 and not ran
    finally:
        lock.give_back(holder)


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
        await asyncio.gather(waiting[1])
        assert queue.running == 1
        queue.release(1)
        assert queue.running == 0 and queue.waiting == 0

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
