"""vLLM as users call it (issue 57): `python -m vllm.entrypoints.openai.api_server` on converted folders and the
`openai` client's chat completions with images, a system prompt and several turns; the prompt ids and greedy tokens
are transformers' (`processor.apply_chat_template` + `processor(...)` + `generate`). A tag typed as message text gets
a 400 that names it.

One server process per family (InternLM2 and Phi-3: sentencepiece tokenizers that add BOS, which vLLM's chat route
does not; Qwen2: byte-level BPE without BOS), all started at once; `.ci/run` runs the module in its vLLM environment.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("vllm and openai are not installed here; .ci/run runs these tests in its vLLM environment",
                allow_module_level=True)

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402

from vllm_checkpoints import converted_checkpoint  # noqa: E402
from vllm_helpers import image, reference_generate  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FAMILIES = ("internlm2", "phi3", "qwen2")
MAX_TILES = 4
MAX_MODEL_LEN = 4096
TAGS = ("<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", "0.15", "--max-num-seqs", "4",
               "--limit-mm-per-prompt", '{"image": 2}', "--mm-processor-kwargs", f'{{"max_tiles": {MAX_TILES}}}']
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_CACHE_ROOT": str(log.parent / f"{folder.name}-vllm-cache")}
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), port


def _wait(process: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the vLLM server stopped:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"the vLLM server did not start in {timeout} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """family -> (checkpoint folder, openai client) of a running server."""
    from openai import OpenAI

    root = tmp_path_factory.mktemp("chat")
    folders = {family: converted_checkpoint(root / family, family) for family in FAMILIES}
    started = {family: _start(folder, root / f"{family}.log") for family, folder in folders.items()}
    try:
        for family, (process, port) in started.items():
            _wait(process, port, root / f"{family}.log")
        yield {family: (folders[family], OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                                max_retries=0, timeout=600))
               for family, (process, port) in started.items()}
    finally:
        for process, _ in started.values():
            process.terminate()
        for process, _ in started.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


#: name -> OpenAI messages; an image part is (width, height, seed)
CONVERSATIONS = {
    "image": [{"role": "user", "content": [{"type": "image_url", "image_url": (900, 448, 1)},
                                           {"type": "text", "text": "What is in the picture?"}]}],
    "system, two turns, two images": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": [{"type": "image_url", "image_url": (448, 448, 2)},
                                     {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A square of colours."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "image_url", "image_url": (600, 420, 3)}]},
    ],
}


def _openai_messages(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _data_url(image(*part["image_url"]))}}
                       if part["type"] == "image_url" else part for part in content]
        out.append({"role": message["role"], "content": content})
    return out


def _transformers_answer(folder: Path, messages: list[dict]) -> dict:
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(*part["image_url"]) for message in messages if isinstance(message["content"], list)
              for part in message["content"] if part["type"] == "image_url"]
    local = [{"role": m["role"], "content": [{"type": "image"} if part["type"] == "image_url" else part
                                             for part in m["content"]] if isinstance(m["content"], list)
              else m["content"]} for m in messages]
    prompt = processor.apply_chat_template(local, add_generation_prompt=True)
    return reference_generate(model, processor, prompt, images=images or None, max_tiles=MAX_TILES)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_completions_give_transformers_prompt_ids_and_tokens(servers, family, conversation):
    folder, client = servers[family]
    messages = CONVERSATIONS[conversation]
    answer = client.chat.completions.create(
        model=str(folder), messages=_openai_messages(messages), max_tokens=8, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    reference = _transformers_answer(folder, messages)
    assert answer.prompt_token_ids == reference["prompt_ids"]
    assert answer.choices[0].token_ids == reference["tokens"]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tag_typed_in_a_message_gets_a_400_naming_it(servers, family, tag):
    from openai import BadRequestError

    folder, client = servers[family]
    expected = (f"message text contains '{tag}', which this model reserves for image input; send images as image "
                f"content parts and remove or reword '{tag}' in the text")
    for content in (f"What does {tag} mean?",  # string content (what clients send for text-only turns)
                    [{"type": "image_url", "image_url": {"url": _data_url(image(448, 448, 5))}},
                     {"type": "text", "text": f"Is this {tag}?"}]):
        with pytest.raises(BadRequestError) as error:
            client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": content}],
                                           max_tokens=2)
        assert expected in str(error.value)
