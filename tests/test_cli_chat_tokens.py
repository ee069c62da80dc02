"""`internvlx chat` and `internvlx tokens` (and the FLOPs estimate behind `tokens`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from internvlx_hf.cli import main
from internvlx_hf.token_budget import LLMShape, layer_flops, prefill_flops

from conftest import REPO_ROOT, require_fixture
from tiny import pixels, prompt_ids, tiny_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The Qwen2 golden fixture converted: 448px tiles, 256 tokens per tile, Hermes-2 template."""
    from internvlx_hf.conversion import convert

    dst = tmp_path_factory.mktemp("chat") / "internvl2_qwen2"
    convert(require_fixture("internvl2_qwen2"), dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def converted_lvtc(tmp_path_factory):
    from internvlx_hf.conversion import convert

    dst = tmp_path_factory.mktemp("chat") / "internvl2_qwen2_lvtc"
    convert(require_fixture("internvl2_qwen2"), dst, lvtc="k=1", progress=False)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = []
    for name, (width, height) in (("wide.png", (1000, 747)), ("square.png", (300, 300))):
        data = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(data).save(folder / name)
        paths.append(folder / name)
    return paths


def _json_rows(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------------- tokens


def test_tokens_without_model_uses_internvl2_2b_settings(capsys, images):
    rows = _json_rows(capsys, ["tokens", "--image", str(images[0]), "--image", "1000x747", "--json"])
    expected = [("ratio", "4x3", 13, 3328), ("area", "2x2", 5, 1280), ("edge", "3x2", 7, 1792)]
    assert [(r["tiling"], r["grid"], r["tiles"], r["tokens"]) for r in rows] == expected * 2
    assert [(r["width"], r["height"]) for r in rows] == [(1000, 747)] * 6
    assert "llm_tokens" not in rows[0]  # no LLM without a model

    assert main(["tokens", "--image", "300x300", "--max-tiles", "6"]) == 0
    table = capsys.readouterr().out
    assert "InternVL2-2B settings: 448px tiles, max 6 tiles, 256 tokens per tile" in table
    assert "| 300x300 | 300x300 | ratio | 1x1 | 1 | 256 |" in table


def test_tokens_with_a_model_use_its_processor(capsys, converted, images):
    from transformers import AutoProcessor

    from internvlx_hf import InternVLXConfig

    rows = _json_rows(capsys, ["tokens", str(converted), "--image", str(images[0]), "--max-tiles", "6",
                               "--text-tokens", "10", "--json"])
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    config = InternVLXConfig.from_pretrained(converted)
    shape = LLMShape.from_text_config(config.get_text_config())
    for row in rows:
        assert row["tokens"] == processor.num_visual_tokens([(1000, 747)], tiling=row["tiling"], max_tiles=6)[0]
        assert row["llm_tokens"] == 10 + 2 + row["tokens"]
        assert row["prefill_flops"] == prefill_flops(shape, row["llm_tokens"])
        assert row["llm_tokens_long"] is None and row["uncompressed_prefill_flops"] is None
    assert [r["tokens"] for r in rows] == [1792, 1280, 1792]  # ratio 3x2+1, area 2x2+1, edge 3x2+1 at 6 tiles


def test_tokens_of_an_lvtc_model_per_layer_group(capsys, converted_lvtc):
    from internvlx_hf import InternVLXConfig

    rows = _json_rows(capsys, ["tokens", str(converted_lvtc), "--image", "1000x747", "--tiling", "area", "--json"])
    config = InternVLXConfig.from_pretrained(converted_lvtc)
    shape = LLMShape.from_text_config(config.get_text_config())
    (row,) = rows
    assert (row["tiles"], row["tokens"], row["expand_layer"]) == (5, 1280, 1)
    assert row["llm_tokens"] == 64 + 2 + 1280
    assert row["llm_tokens_long"] == 64 + 2 + 5 * 1024
    assert shape.num_layers == 2
    assert row["prefill_flops"] == layer_flops(shape, 1346) + layer_flops(shape, 5186) \
        + 2 * shape.hidden_size * shape.vocab_size
    assert row["uncompressed_prefill_flops"] == prefill_flops(shape, 5186)

    assert main(["tokens", str(converted_lvtc), "--image", "1000x747", "--tiling", "area"]) == 0
    table = capsys.readouterr().out
    assert "LVTC: layers < 1 see 256 tokens per tile, layers >= 1 see 1024" in table
    assert "| image | tiling | LLM, layers < 1 | layers >= 1 | vLLM prompt | TFLOPs | uncompressed | ratio |" in table
    assert max(len(line) for line in table.splitlines() if line.startswith("|")) <= 100  # (once 12 columns wide)
    ratio = row["prefill_flops"] / row["uncompressed_prefill_flops"]
    assert "| 1346 | 5186 | 5186 |" in table and f"| {ratio:.3f} |" in table


def test_tokens_give_the_prompt_length_vllm_counts(capsys, converted, converted_lvtc, tmp_path):
    """vLLM schedules an LVTC checkpoint's every tile at the long layout (1024 placeholder ids per 448px tile here,
    against transformers' 256): its prompt, what --max-model-len bounds, is the text + <img></img> + 1024 per tile
    (thumbnail included); a video's frames likewise. Without LVTC (or k = depth) it is transformers' prompt."""
    # 768x448 by area: 2x1 + thumbnail; 1000x747 by ratio: 4x3 + thumbnail (13,312 placeholders on vLLM)
    rows = _json_rows(capsys, ["tokens", str(converted_lvtc), "--image", "768x448", "--tiling", "area",
                               "--text-tokens", "179", "--json"])
    rows += _json_rows(capsys, ["tokens", str(converted_lvtc), "--image", "1000x747", "--tiling", "ratio",
                                "--text-tokens", "179", "--json"])
    assert [(r["tiles"], r["llm_tokens"], r["vllm_prompt_tokens"]) for r in rows] == [
        (3, 949, 3253), (13, 179 + 2 + 13 * 256, 179 + 2 + 13_312)]
    assert main(["tokens", str(converted_lvtc), "--image", "768x448", "--tiling", "area", "--text-tokens", "179"]) == 0
    table = capsys.readouterr().out
    assert "vLLM: every tile at the long layout (1024 tokens) in the prompt, whose length (vLLM prompt)\n" \
           "--max-model-len bounds" in table
    assert "| 768x448 | 768x448 | area | 2x1 | 3 | 768 |" in table and "| 768x448 | area | 949 | 3253 | 3253 |" in table

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(frames / f"frame_{i + 1}.png")
    (video,) = _json_rows(capsys, ["tokens", str(converted_lvtc), "--video", str(frames), "--frames", "4",
                                   "--text-tokens", "0", "--json"])
    assert video["llm_tokens"] == video["frame_text_tokens"] + 4 * 256
    assert video["vllm_prompt_tokens"] == video["frame_text_tokens"] + 4 * 1024

    rows = _json_rows(capsys, ["tokens", str(converted), "--image", "768x448", "--tiling", "area",
                               "--text-tokens", "179", "--json"])
    assert [(r["llm_tokens"], r["vllm_prompt_tokens"]) for r in rows] == [(949, 949)]
    assert main(["tokens", str(converted), "--image", "768x448"]) == 0
    assert "vLLM: the same prompt (the LLM tokens) is what its --max-model-len bounds" in capsys.readouterr().out


#: vLLM's own processor (the plugin's, without an engine) on prompts of images and videos: the prompt ids' lengths.
_VLLM_PROMPT_LENGTHS = """
import json, sys
import numpy as np
from PIL import Image
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.multimodal.registry import MultiModalTimingRegistry
from vllm.plugins import load_general_plugins

load_general_plugins()
lengths = []
for folder, prompt, kind, size in json.loads(sys.argv[1]):
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=folder, max_model_len=32768))
    data = ({"image": [Image.new("RGB", tuple(size))]} if kind == "image"
            else {"video": [np.zeros((size, 64, 64, 3), dtype=np.uint8)]})
    ids = processor.info.get_tokenizer().encode(prompt)
    out = processor.apply(ProcessorInputs(ids, processor.info.parse_mm_data(data)),
                          MultiModalTimingRegistry(None).get(str(len(lengths))))
    lengths.append(len(out["prompt_token_ids"]))
print(json.dumps(lengths))
"""


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed; .ci/run's vLLM environment has it")
def test_vllm_prompt_tokens_are_vllms_own_count(capsys, converted, converted_lvtc, tmp_path):
    """`internvlx tokens`' vLLM prompt tokens are the length of the prompt vLLM's processor (the plugin's) makes, for
    the transformers prompt the rows describe (--text-tokens: its ids besides the image's): LVTC images (7 and 13
    tiles) and a 4-frame video, and an image of a checkpoint without LVTC."""
    from internvlx_hf import InternVLXProcessor

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64)).save(frames / f"frame_{i + 1}.png")
    image_prompt, video_prompt = "<image>\nDescribe the picture.", "<video>\nWhat happens?"
    cases = [(converted_lvtc, image_prompt, "image", (768, 448)), (converted_lvtc, image_prompt, "image", (1000, 747)),
             (converted_lvtc, video_prompt, "video", 4), (converted, image_prompt, "image", (768, 448))]
    ours = []
    for folder, prompt, kind, size in cases:
        processor = InternVLXProcessor.from_pretrained(folder)
        if kind == "image":
            length = len(processor(text=prompt, images=[Image.new("RGB", size)])["input_ids"][0])
            (row,) = _json_rows(capsys, ["tokens", str(folder), "--image", f"{size[0]}x{size[1]}", "--tiling",
                                         "ratio", "--text-tokens", "0", "--json"])
            text_tokens = length - row["llm_tokens"]
            (row,) = _json_rows(capsys, ["tokens", str(folder), "--image", f"{size[0]}x{size[1]}", "--tiling",
                                         "ratio", "--text-tokens", str(text_tokens), "--json"])
        else:
            length = len(processor(text=prompt, videos=[[Image.new("RGB", (64, 64))] * size])["input_ids"][0])
            argv = ["tokens", str(folder), "--video", str(frames), "--frames", str(size), "--json"]
            (row,) = _json_rows(capsys, argv + ["--text-tokens", "0"])
            (row,) = _json_rows(capsys, argv + ["--text-tokens", str(length - row["llm_tokens"])])
        assert row["llm_tokens"] == length
        ours.append(row["vllm_prompt_tokens"])
    argument = json.dumps([[str(folder), prompt, kind, size] for folder, prompt, kind, size in cases])
    done = subprocess.run([sys.executable, "-c", _VLLM_PROMPT_LENGTHS, argument], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    vllm_lengths = json.loads(done.stdout.strip().splitlines()[-1])
    assert ours == vllm_lengths
    assert ours[0] - 7 * 768 == ours[3] and ours[1] == 2 + 13 * 1024 + (ours[0] - 2 - 7 * 1024)  # the tiles' share


def test_lvtc_that_never_expands_is_described_as_such(capsys, converted_lvtc, tmp_path):
    """k = depth is a valid config (the model then only injects its extra LR projectors; `internvlx convert`
    refuses it): `tokens` and the card say that every layer sees the short layout."""
    import shutil

    from internvlx_hf.hub import build_model_card

    folder = tmp_path / "never"
    shutil.copytree(converted_lvtc, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lvtc"]["expand_layer"] = 2  # the depth of this LLM
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["tokens", str(folder), "--image", "1000x747", "--tiling", "area"]) == 0
    table = capsys.readouterr().out
    assert "LVTC without expansion: k = 2 is the LLM's depth, so all 2 layers see 256 tokens per tile" in table
    assert "layers >=" not in table and "| LLM tokens | prefill TFLOPs |" in table
    assert max(len(line) for line in table.splitlines() if line.startswith("|")) <= 100
    assert "vLLM: the same prompt (the LLM tokens)" in table  # nothing expands on vLLM either
    card = build_model_card(folder, license="mit").content
    assert "| LVTC | on, without expansion (paper Sec. 3.2): k = 2 is the LLM's depth, so all 2 layers see 256 " \
           "tokens per tile; T = 1 LR projector(s)" in card
    assert "layers >= k" not in card and "LLM tokens from layer k" not in card


@pytest.mark.parametrize("expand_layer", [2, 4])
def test_prefill_flops_estimate_equals_flop_counter(expand_layer):
    """The estimate counts exactly the matmuls FlopCounterMode sees in the LLM layers and the LM head (eager
    attention: the counter does not see the attention matmuls inside CPU SDPA kernels)."""
    torch.set_num_threads(1)
    lvtc = tiny_model(lvtc={"expand_layer": expand_layer, "num_lr_projectors": 2}, attn="eager")
    plain_hr = tiny_model(attn="eager", downsample_ratio=1.0)  # the uncompressed model: 16 tokens per tile
    ids_short = torch.tensor([prompt_ids(3, 0, n_text=20)])
    ids_long = torch.tensor([prompt_ids(3, 0, n_text=20, tokens_per_tile=16)])

    def counted(model, ids):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=ids, pixel_values=pixels(3, 0), logits_to_keep=1)
        counts = counter.get_flop_counts()
        prefix = f"{type(model).__name__}.model.language_model.layers."
        layers = sum(sum(v.values()) for k, v in counts.items() if k.startswith(prefix) and "." not in
                     k[len(prefix):])
        return layers + sum(counts[f"{type(model).__name__}.lm_head"].values())

    shape = LLMShape.from_text_config(lvtc.config.get_text_config())
    n_short, n_long = ids_short.shape[1], ids_long.shape[1]
    assert (n_short, n_long) == (36, 72)
    estimate = prefill_flops(shape, n_short, n_long, expand_layer)
    assert estimate == counted(lvtc, ids_short)  # exactly: the formula counts the same matmuls
    uncompressed = prefill_flops(shape, n_long)
    assert uncompressed == counted(plain_hr, ids_long)
    if expand_layer < shape.num_layers:
        assert estimate < uncompressed


def test_tokens_errors_are_one_line(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1, 2")
    cases = [
        (["tokens", "--image", str(tmp_path / "nope.jpg")], "no such file; pass an image file or a size"),
        (["tokens", str(tmp_path / "broken"), "--image", "448x448"],
         "config.json is not valid JSON (line 1 col 6): Expecting ',' delimiter;"),
        (["tokens", "--image", "0x10"], "a size needs both sides >= 1 pixel"),
        (["tokens", "--image", "448x448", "--max-tiles", "0"], "--max-tiles must be >= 1"),
        (["tokens", str(tmp_path / "folder"), "--image", "448x448"], "no config.json"),
        (["tokens", "--image", str(tmp_path / "folder")], "is a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("internvlx tokens: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["chat", "tokens", "card", "push"])
def test_help_teaches_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"internvlx {command} " in out.split("examples:")[1]


# --------------------------------------------------------------------------------------------------------- chat


def _reference_chat(folder, image, questions, max_new_tokens, max_tiles):
    """InternVL2's chat(history=...) on the same checkpoint: what the CLI must answer, turn by turn."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pixel_values = processor.image_processor(images=[str(image)], max_tiles=max_tiles, return_tensors="pt").pixel_values
    answers, history = [], None
    for question in questions:
        answer, history = model.chat(processor, pixel_values, question,
                                     dict(max_new_tokens=max_new_tokens, do_sample=False), history=history,
                                     return_history=True)
        answers.append(answer)
    return answers


def test_chat_streams_the_answer_token_by_token(capsys, monkeypatch, converted, images):
    from transformers import TextStreamer

    puts = []
    original_put = TextStreamer.put

    def put(self, value):
        puts.append(value.numel())
        return original_put(self, value)

    monkeypatch.setattr(TextStreamer, "put", put)
    question = "What is in the picture?"
    argv = ["chat", str(converted), "--image", str(images[0]), "--max-tiles", "2", "--max-new-tokens", "6", question]
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    (expected,) = _reference_chat(converted, images[0], [question], max_new_tokens=6, max_tiles=2)
    assert out.strip() == expected and expected
    # the answer is the output: no "Loading weights" bar of transformers' before it (the switch is restored after)
    assert "Loading weights" not in err and hf_logging.is_progress_bar_enabled() is bars
    assert puts[0] > 1 and puts[1:] == [1] * (len(puts) - 1) and len(puts) >= 2  # the prompt, then one per token


def test_chat_interactive_loop_through_a_pipe_keeps_the_history(converted, images, tmp_path):
    questions = ["Describe the image.", "And the colours?"]
    stdin = f"{questions[0]}\n\n{questions[1]}\n/reset\n{questions[0]}\n/nonsense\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-m", "internvlx_hf", "chat", str(converted), "--image", str(images[0]), "--max-tiles", "2",
         "--max-new-tokens", "5", "--device", "cpu"],
        input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    first, second = _reference_chat(converted, images[0], questions, max_new_tokens=5, max_tiles=2)
    # /reset starts over with the same image
    assert [line.strip() for line in result.stdout.splitlines()] == [first, second, first]
    assert "(conversation reset)" in result.stderr and "unknown command '/nonsense'" in result.stderr
    assert "Loading weights" not in result.stderr


def test_chat_session_attaches_images_to_later_turns(converted, images):
    from internvlx_hf.cli.chat import ChatSession
    from internvlx_hf.loading import load_checkpoint

    model, processor = load_checkpoint(str(converted), device="cpu")
    session = ChatSession(model, processor, [str(images[0])], max_tiles=1, max_new_tokens=2, stream=False)
    session.ask("First?")
    session.attach(str(images[1]))
    session.ask("Second?")
    assert session.images == [str(images[0]), str(images[1])]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"][0] == {"type": "image"}
    assert session.eos_token_ids == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    session.reset()
    assert session.messages == [] and session.pending_images == [str(images[0])]


def test_chat_errors_are_one_line(capsys, monkeypatch, converted, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    cases = [
        (["chat", "someone/some-model", "Hi"], "not a local folder and not in the Hugging Face cache, and "
                                               "HF_HUB_OFFLINE is set"),
        (["chat", str(tmp_path / "a" / "b" / "c"), "Hi"], "no such folder"),
        (["chat", str(converted), "--image", str(tmp_path / "missing.jpg"), "Hi"], "no such file"),
        (["chat", str(converted), "--image", str(tmp_path), "Hi"],
         f"--image {str(tmp_path)!r} is a folder, not an image file; pass the path of an image file."),
        (["chat", str(tmp_path / "plain"), "Hi"], "model_type 'llava', not 'internvlx'"),
        (["chat", str(converted), "--max-new-tokens", "0", "Hi"], "--max-new-tokens must be >= 1"),
        (["chat", str(converted), "  "], "the QUESTION is empty"),
    ]
    if not torch.cuda.is_available():
        cases.append((["chat", str(converted), "--device", "cuda", "Hi"], "CUDA is not available"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("internvlx chat: error: ") and message in err and err.count("\n") == 1, err


def _short_context(folder, tmp_path, positions=2000):
    """A copy of a converted checkpoint whose LLM has ``positions`` positions (the fixture's has 32,768)."""
    import shutil

    copy = tmp_path / f"{folder.name}-{positions}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_chat_refuses_a_prompt_past_the_context_and_names_the_fix(capsys, converted, converted_lvtc, images,
                                                                  tmp_path):
    """Two 1000x747 images at 12 tiles (13 with the thumbnail, 256 tokens each) are 6,834 positions; with 2,000 the
    prompt is refused before generating, with the largest --max-tiles that fits (3: one 256-token tile each), or
    fewer images when even one tile per image is too many for LVTC's long layout (1,024 tokens per tile)."""
    wide = str(images[0])
    plain, lvtc = _short_context(converted, tmp_path), _short_context(converted_lvtc, tmp_path)
    cases = [
        (["chat", str(plain), "--image", wide, "--image", wide, "Hi"],
         "the prompt needs 6,834 positions, and the model has 2,000 (text_config.max_position_embeddings): its 2 "
         "images at up to 12 tiles take 6,656 tokens; use --max-tiles 3 (690 positions) or fewer images."),
        (["chat", str(lvtc), "--image", wide, "--image", wide, "--max-tiles", "4", "Hi"],
         "the prompt needs 10,418 positions (LVTC: 1024 per tile from layer k on), and the model has 2,000 "
         "(text_config.max_position_embeddings): its 2 images at up to 4 tiles take 2,560 tokens (--max-tiles 1 "
         "still needs 2,226 positions); use fewer images."),
        (["chat", str(plain), "Hi " * 2000],
         "the prompt needs 6,170 positions, and the model has 2,000 (text_config.max_position_embeddings); ask a "
         "shorter question, or /reset a long conversation."),
    ]
    for argv, message in cases:
        assert main([*argv[:2], "--device", "cpu", *argv[2:]]) == 2
        captured = capsys.readouterr()
        # the error is stderr's last line (transformers' loading bars, when shown, come before it)
        assert f"\n{captured.err}".endswith(f"\ninternvlx chat: error: {message}\n") and captured.out == ""
    # the advice holds: one image at --max-tiles 3 answers
    assert main(["chat", str(plain), "--image", wide, "--image", wide, "--max-tiles", "3", "--max-new-tokens", "1",
                 "--device", "cpu", "Hi"]) == 0


def test_interactive_chat_goes_on_after_a_prompt_past_the_context(capsys, converted, tmp_path):
    import io

    from internvlx_hf.cli.chat import ChatSession, _interactive
    from internvlx_hf.loading import load_checkpoint

    model, processor = load_checkpoint(str(_short_context(converted, tmp_path, positions=400)), device="cpu")
    session = ChatSession(model, processor, max_new_tokens=1)
    _interactive(session, io.StringIO("Hi " * 200 + "\nHi\n"))
    captured = capsys.readouterr()
    assert captured.err.endswith("\nerror: the prompt needs 769 positions, and the model has 400 "
                                 "(text_config.max_position_embeddings); ask a shorter question, or /reset a long "
                                 "conversation.\n")
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the second question was answered
    assert session.messages[0]["content"] == [{"type": "text", "text": "Hi"}]


def test_model_chat_refuses_a_prompt_past_the_context(converted, tmp_path):
    from transformers import AutoModel, AutoProcessor

    folder = _short_context(converted, tmp_path)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pixel_values = torch.zeros(8, 3, 448, 448)
    with pytest.raises(ValueError) as error:
        model.chat(processor, pixel_values, "Hi", dict(max_new_tokens=1))
    assert str(error.value).startswith("chat(): the prompt needs 2,")
    assert str(error.value).endswith(" positions (8 image tiles), and the model has 2,000 (text_config."
                                     "max_position_embeddings); pass fewer tiles (InternVL2's load_image(..., "
                                     "max_num=N), the processor's max_tiles) or fewer images.")
    with pytest.raises(ValueError, match=r"^chat\(\): the prompt of question 1 needs "):
        model.batch_chat(processor, torch.zeros(9, 3, 448, 448), ["Hi", "Hi"], dict(max_new_tokens=1),
                         num_patches_list=[1, 8])
