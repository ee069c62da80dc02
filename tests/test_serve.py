"""`internvlx serve`: transformers' OpenAI-compatible server on the demo model, called through the `openai` client.

One server for the module: `python -m internvlx_hf serve DEMO --port N` in a subprocess on 127.0.0.1 (a free port),
offline. The answers are checked against `demo_model.json`'s tasks (the questions `internvlx demo` asks), and a
multi-turn conversation against `internvlx chat`'s own multi-turn session on the same model.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from internvlx_hf.cli import main
from internvlx_hf.demo import demo_model_dir, demo_samples
from internvlx_hf.serving import TESTED_TRANSFORMERS, ServingUnavailable, check_serving_available

DEMO = str(demo_model_dir())
QUESTIONS = demo_samples(seed=0)  # one per task: colour, shape, position, count, fine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(image_url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of `internvlx serve DEMO` running in a subprocess (stopped after the module)."""
    try:
        check_serving_available()  # the serve extra, and a transformers release the server was tested with
    except ServingUnavailable as error:
        pytest.skip(str(error))
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "internvlx_hf", "serve", DEMO, "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}) before answering:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within 300 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_session():
    """A fresh `internvlx chat` session on the demo model (loaded once), to compare the server's answers with."""
    from internvlx_hf.cli.chat import ChatSession
    from internvlx_hf.demo import load_demo_model

    model, processor = load_demo_model()
    return lambda images: ChatSession(model, processor, images, max_new_tokens=32, stream=False)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [model.id for model in models] == [DEMO]
    assert models[0].object == "model" and models[0].owned_by == "local"


def test_the_demo_questions_are_answered_right_with_data_uri_images(client):
    for sample in QUESTIONS:
        response = client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question),
                                                  temperature=0)
        choice = response.choices[0]
        assert (sample.task, choice.message.content) == (sample.task, sample.expected)
        assert choice.finish_reason == "stop" and response.model == f"{DEMO}@main"
        assert response.usage.completion_tokens >= 1 and response.usage.prompt_tokens > 16  # 16 image tokens


def test_images_as_server_paths_and_http_urls(client, tmp_path, http_server):
    colour, shape = QUESTIONS[0], QUESTIONS[1]
    colour.image.save(tmp_path / "colour.png")
    shape.image.save(tmp_path / "shape.png")
    by_path = client.chat.completions.create(model=DEMO, messages=ask(str(tmp_path / "colour.png"), colour.question))
    by_url = client.chat.completions.create(model=DEMO, messages=ask(f"{http_server}/shape.png", shape.question))
    assert by_path.choices[0].message.content == colour.expected
    assert by_url.choices[0].message.content == shape.expected


def test_streaming_sends_the_answer_in_chunks(client):
    sample = QUESTIONS[2]  # position: "bottom-right", several tokens
    chunks = list(client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question),
                                                 stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == sample.expected == "bottom-right"
    assert sum(1 for chunk in chunks if chunk.choices[0].delta.content) >= 2  # streamed, not one block
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


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


def test_bad_images_are_a_400_naming_the_image(client, tmp_path):
    import openai

    good = data_uri(QUESTIONS[0].image)
    closed_port = free_port()
    cases = [
        (str(tmp_path / "missing.png"), f"messages[0]: image 1 ('{tmp_path / 'missing.png'}'): no such file on the "
                                        "server; send the image as a data:image/png;base64,... URI or an http(s) URL"),
        ("data:image/png;base64,iVBORw0K$$$", "messages[0]: image 1 ('data:image/png;base64,iVBORw0K$$$'): the "
                                              "base64 data is invalid ("),
        ("data:image/png;base64,aGVsbG8=", "messages[0]: image 1 ('data:image/png;base64,aGVsbG8='): not a "
                                           "readable image"),
        (f"http://127.0.0.1:{closed_port}/a.png", f"messages[0]: image 1 ('http://127.0.0.1:{closed_port}/a.png'): "
                                                  "could not download the image (ConnectError: "),
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
            assert message in str(err.value)  # OpenAI clients show it in the exception
    with pytest.raises(openai.BadRequestError, match=r"malformed messages \(KeyError: 'type'\)"):
        client.chat.completions.create(model=DEMO, messages=[{"role": "user", "content": [{"text": "no type"}]}])
    # the server is still fine
    sample = QUESTIONS[3]
    answer = client.chat.completions.create(model=DEMO, messages=ask(data_uri(sample.image), sample.question))
    assert answer.choices[0].message.content == sample.expected


def test_a_request_for_another_model_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:  # transformers' own check, its FastAPI-shaped body
        client.chat.completions.create(model="someone/else", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body == {"detail": f"Server is pinned to '{DEMO}'; requested 'someone/else'."}


# --- without a server ------------------------------------------------------------------------------------------


def test_the_model_manager_stops_at_the_end_of_turn_token_and_routes_the_model_as_a_vlm(tmp_path):
    """A checkpoint whose generation_config.json stops only at <|endoftext|> (800) still ends answers at the chat
    template's <|im_end|> (802), as `internvlx chat` does; the model is routed as image-text-to-text."""
    import json
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


def test_untested_transformers_releases_are_refused_with_the_fix():
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install "internvlx-hf[serve]"')
    check_serving_available("5.23.0")
    check_serving_available("5.23.4")
    for version in ("5.22.2", "5.24.0"):
        with pytest.raises(ServingUnavailable, match=f"this is transformers {version}"):
            check_serving_available(version)
    with pytest.raises(ServingUnavailable) as err:
        check_serving_available("5.30.0")
    assert str(err.value).endswith(f"this is transformers 5.30.0. Install a tested release: pip install "
                                   f"\"transformers{TESTED_TRANSFORMERS}\"")


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
])
def test_bad_arguments_fail_before_loading(argv, message, capsys):
    if "no such folder" in message:  # checked after the transformers release, which serving refuses outside its range
        try:
            check_serving_available()
        except ServingUnavailable as error:
            pytest.skip(str(error))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
