"""transformers-native InternVL checkpoints in (`internvlx convert`) and out (`internvlx export native`).

Native models here are built with transformers' own InternVLConfig / InternVLForConditionalGeneration (random weights,
56px tiles) and saved as transformers saves them; the tokenizer is the Qwen2 fixture's. transformers'
InternVLProcessor cannot be constructed on a machine without torchvision (its video processor slot checks for
BaseVideoProcessor, which needs torchvision), so `native_processor` builds it with that class check disabled; the image
processor itself is transformers' PIL GotOcr2ImageProcessorPil, loaded from the saved files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from PIL import Image
from safetensors import safe_open

from conftest import require_fixture
from internvlx_hf import InternVLXForConditionalGeneration
from internvlx_hf.cli import main
from internvlx_hf.conversion import ConversionError, convert
from internvlx_hf.conversion.export import export_native
from internvlx_hf.conversion.native import to_our_template
from internvlx_hf.processing import CHAT_TEMPLATES, InternVLXProcessor
from internvlx_hf.processing.chat_templates import parse_chat_template
from internvlx_hf.processing.image_processing_internvlx import get_tile_grid
from tiny import tiny_model

IMAGES = Path(__file__).parent / "fixtures" / "images"
NATIVE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
# The chat template transformers' InternVL checkpoints carry (an image item becomes `<IMG_CONTEXT>\n`).
NATIVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


@pytest.fixture(scope="module")
def ours_qwen2(tmp_path_factory) -> Path:
    """The InternVL2 Qwen2 fixture as an internvlx-hf checkpoint (448px tiles, MLP projector)."""
    dst = tmp_path_factory.mktemp("ours") / "qwen2"
    convert(require_fixture("internvl2_qwen2"), dst, progress=False)
    return dst


def make_native(folder: Path, tokenizer_source: Path, *, tie: bool = True, dtype=torch.float32, seed: int = 0,
                max_patches: int = 6, vision_feature_layer: int = -1, downsample_ratio: float = 0.5,
                text: dict | None = None) -> Path:
    """A tiny transformers-native InternVL checkpoint, saved with transformers' own classes."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, TokenizersBackend
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    settings = json.loads((tokenizer_source / "tokenizer_config.json").read_text())
    tokenizer = TokenizersBackend.from_pretrained(str(tokenizer_source), extra_special_tokens=NATIVE_TOKENS,
                                                  additional_special_tokens=settings["extra_special_tokens"])
    for key in ("auto_map", "processor_class"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.chat_template = NATIVE_TEMPLATE
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer) + 8, max_position_embeddings=512,
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id) | (text or {})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                  patch_size=14, attention_bias=True)
    tokens = int(round((56 // 14 * downsample_ratio) ** 2))
    config = InternVLConfig(text_config=text, vision_config=vision, image_seq_length=tokens,
                            downsample_ratio=downsample_ratio, vision_feature_layer=vision_feature_layer,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the position embeddings and CLS token to zero
        for name, param in model.named_parameters():
            if "embeddings" in name and "vision_tower" in name:
                param.normal_(0, 0.02)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True,
                                               max_patches=max_patches, image_mean=[0.485, 0.456, 0.406],
                                               image_std=[0.229, 0.224, 0.225])
    image_processor.save_pretrained(str(folder))
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": image_processor.to_dict(), "image_seq_length": tokens,
         "processor_class": "InternVLProcessor"}))
    return folder


@pytest.fixture
def native(tmp_path, ours_qwen2) -> Path:
    return make_native(tmp_path / "native", ours_qwen2)


def native_processor(folder: Path, monkeypatch):
    """transformers' InternVLProcessor from ``folder`` (GotOcr2ImageProcessorPil + AutoTokenizer), video slot empty."""
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    settings = json.loads((folder / "processor_config.json").read_text())
    chat_template = (folder / "chat_template.jinja").read_text()
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None)
    return InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(str(folder)),
                             tokenizer=AutoTokenizer.from_pretrained(str(folder)), video_processor=None,
                             image_seq_length=settings["image_seq_length"], chat_template=chat_template)


def _images() -> list[Image.Image]:
    return [Image.open(IMAGES / "image1.jpg").convert("RGB"), Image.new("RGB", (300, 120), (200, 40, 90))]


def _same_inputs(ours_folder: Path, native_folder: Path, monkeypatch):
    """Our processor and InternVLProcessor on the same chat prompt and images: identical ids and pixels."""
    ours = InternVLXProcessor.from_pretrained(str(ours_folder))
    theirs = native_processor(native_folder, monkeypatch)
    for image in _images():
        a = ours(images=[image], text=ours.apply_chat_template(MESSAGES, add_generation_prompt=True),
                 return_tensors="pt")
        prompt = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)
        # as transformers' `apply_chat_template(tokenize=True)` tokenizes a template that writes the BOS
        b = theirs(images=[image], text=prompt, return_tensors="pt",
                   add_special_tokens=not prompt.startswith(theirs.tokenizer.bos_token or "\0"))
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["num_patches"].tolist() == [b["pixel_values"].shape[0]]
    return ours, a


def _ids_and_pixels(config, tiles: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    ids = [5, 6, 7] + [config.image_token_id] * (config.image_seq_length * tiles) + [8, 9]
    return torch.tensor([ids]), torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(0))


def _assert_same_model(native_model, our_model):
    ids, pixels = _ids_and_pixels(our_model.config)
    with torch.no_grad():
        a = native_model(input_ids=ids, pixel_values=pixels).logits
        b = our_model(input_ids=ids, pixel_values=pixels).logits
    # Same modules in the same order, so the same float operations: the logits agree bit for bit.
    assert torch.equal(a, b)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(native_model.generate(input_ids=ids, pixel_values=pixels, **options),
                       our_model.generate(input_ids=ids, pixel_values=pixels, **options))


# ---------------------------------------------------------------------------------------------------------- import


def test_import_matches_the_native_model(native, tmp_path):
    from transformers import InternVLForConditionalGeneration

    report = convert(native, tmp_path / "ours", progress=False)
    assert report.projector_type == "mlp" and report.lvtc is None and not report.dropped and not report.new
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "internvlx" and config["select_layer"] == -1 and config["image_seq_length"] == 4
    assert config["tie_word_embeddings"] is True
    _assert_same_model(InternVLForConditionalGeneration.from_pretrained(native).eval(),
                       InternVLXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())


# InternVL3.5's `-HF` checkpoints are native folders with Qwen3 LLMs (1B..38B; head_dim 128 is not hidden / heads)
# and GPT-OSS for InternVL3.5-GPT-OSS-20B-A4B (mixture of experts, attention sinks, sliding and full attention layers
# in turn, YaRN RoPE). Tiny text configs with those features:
INTERNVL35_TEXT = {
    "qwen3": dict(model_type="qwen3", head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "gpt_oss": dict(model_type="gpt_oss", head_dim=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True,
                    max_position_embeddings=131072),
}


@pytest.mark.parametrize("family", list(INTERNVL35_TEXT))
def test_internvl35_native_folders_import(family, tmp_path, ours_qwen2):
    from transformers import InternVLForConditionalGeneration

    native = make_native(tmp_path / "native", ours_qwen2, tie=family == "qwen3", text=INTERNVL35_TEXT[family])
    report = convert(native, tmp_path / "ours", progress=False)
    assert report.text_model_type == family and not report.dropped and not report.new
    original = InternVLForConditionalGeneration.from_pretrained(native).eval()
    assert any(".mlp.experts." in name for name, _ in original.named_parameters()) == (family == "gpt_oss")
    _assert_same_model(original, InternVLXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())

    # Upgraded with PVTC + LVTC (k=2: layer 2 is a sliding-window layer in GPT-OSS): cached greedy generation gives
    # the tokens of the uncached forward, step by step, and it trains.
    convert(native, tmp_path / "x", projector="pvtc", lvtc="k=2,T=2", progress=False)
    model = InternVLXForConditionalGeneration.from_pretrained(tmp_path / "x").eval()
    ids, pixels = _ids_and_pixels(model.config)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels, **options)
        sequence = ids
        for _ in range(4):
            step = model(input_ids=sequence, pixel_values=pixels).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert torch.equal(generated, sequence)
    model.train()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.lvtc_hr_projector.parameters())


def test_import_processor_matches_internvl_processor(native, tmp_path, monkeypatch):
    convert(native, tmp_path / "ours", progress=False)
    ours, _ = _same_inputs(tmp_path / "ours", native, monkeypatch)
    ip = ours.image_processor
    assert (ip.image_size, ip.min_tiles, ip.max_tiles, ip.use_thumbnail, str(ip.tiling.value)) == (56, 1, 6, True,
                                                                                                    "ratio")
    # The native `<IMG_CONTEXT>\n` image item is our `<image>\n`.
    assert "<image>\n" in ours.apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_single_tile_native_processor_imports_as_no_tiling(tmp_path, ours_qwen2, monkeypatch):
    native = make_native(tmp_path / "native", ours_qwen2, max_patches=1)
    convert(native, tmp_path / "ours", progress=False)
    ours, inputs = _same_inputs(tmp_path / "ours", native, monkeypatch)
    assert str(ours.image_processor.tiling.value) == "none" and inputs["num_patches"].tolist() == [1]


def test_tile_grids_match_gotocr2():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for low, high in ((1, 12), (1, 6), (2, 6), (6, 12)):
        for width in range(1, 1400, 37):
            for height in range(1, 1400, 41):
                assert get_tile_grid(width, height, "ratio", low, high, 448) == \
                    tuple(get_optimal_tiled_canvas((height, width), (448, 448), low, high)), (low, high, width, height)


def test_import_with_upgrades(native, tmp_path):
    report = convert(native, tmp_path / "x", projector="pvtc", lvtc="k=3,T=2", progress=False)
    assert report.projector_type == "pvtc" and report.lvtc["expand_layer"] == 3
    assert "model.multi_modal_projector" in report.new and "model.lvtc_hr_projector" in report.new
    assert set(report.dropped.values()) == {"the native MLP projector replaced by a newly initialised pvtc projector "
                                            "(--projector)"}
    InternVLXForConditionalGeneration.from_pretrained(tmp_path / "x")

    convert(native, tmp_path / "lvtc", lvtc="k=3,T=2,init_lr_from_mlp1", progress=False)
    tensors, source = read_tensors(tmp_path / "lvtc"), read_tensors(native)
    for part in ("layer_norm.weight", "linear_1.weight", "linear_2.bias"):
        assert torch.equal(tensors[f"model.lvtc_lr_projectors.0.{part}"],
                           source[f"multi_modal_projector.{part}"])


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy='full'"),
    ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer=\\[-1, -2\\]"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu'"),
    ({"image_token_id": 5}, "config.image_token_id=5"),
])
def test_native_configs_that_cannot_be_mapped_are_refused(native, tmp_path, changes, message):
    _edit_json(native / "config.json", **changes)
    with pytest.raises(ConversionError, match=message):
        convert(native, tmp_path / "ours", progress=False)
    assert not (tmp_path / "ours").exists()


def test_native_image_size_must_be_the_tile(native, tmp_path):
    settings = json.loads((native / "processor_config.json").read_text())
    settings["image_processor"]["size"] = {"height": 64, "width": 64}
    (native / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConversionError, match="square tile 56x56"):
        convert(native, tmp_path / "ours", progress=False)


def test_unknown_native_tensor_is_named(native, tmp_path):
    from safetensors.torch import save_file

    tensors = read_tensors(native)
    tensors["model.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, str(native / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="model.extra_head.weight.*transformers-native InternVL"):
        convert(native, tmp_path / "ours", progress=False)


# ---------------------------------------------------------------------------------------------------------- export


def test_export_loads_without_remote_code_and_matches(ours_qwen2, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

    report = export_native(ours_qwen2, tmp_path / "native", progress=False)
    assert report.num_tensors == len(read_tensors(ours_qwen2))
    assert not any(path.suffix == ".py" for path in (tmp_path / "native").iterdir())
    native_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "native", trust_remote_code=False).eval()
    assert type(native_model) is InternVLForConditionalGeneration
    _assert_same_model(native_model, InternVLXForConditionalGeneration.from_pretrained(ours_qwen2).eval())
    _same_inputs(ours_qwen2, tmp_path / "native", monkeypatch)
    # The fixture's embeddings have no spare row for InternVLProcessor's `<video>` placeholder: reported.
    assert any("<video>" in item for item in report.lost)


def test_export_reports_what_rvtc_loses(ours_qwen2, tmp_path):
    src = tmp_path / "edge"
    shutil.copytree(ours_qwen2, src)
    settings = json.loads((src / "processor_config.json").read_text())
    settings["image_processor"].update(tiling="edge", max_tiles=6, use_thumbnail=False)
    (src / "processor_config.json").write_text(json.dumps(settings))
    report = export_native(src, tmp_path / "native", progress=False)
    assert any("tiling='edge'" in item for item in report.lost)
    assert any("use_thumbnail=False" in item for item in report.lost)
    written = json.loads((tmp_path / "native" / "preprocessor_config.json").read_text())
    assert (written["min_patches"], written["max_patches"], written["crop_to_patches"]) == (1, 6, True)


@pytest.mark.parametrize("options, message", [
    ({"projector": "pvtc"}, "uses the PVTC projector; native InternVL has only"),
    ({"lvtc": {"expand_layer": 2}}, "uses LVTC"),
])
def test_pvtc_and_lvtc_are_refused(tmp_path, options, message):
    src = tmp_path / "src"
    tiny_model(**options).save_pretrained(src)
    with pytest.raises(ConversionError, match=message):
        export_native(src, tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staged folder left behind


def yi_like_source(parent: Path, legacy: bool) -> Path:
    """A tiny InternVL2 source shaped like InternVL2-40B (Nous-Hermes-2-Yi-34B): a Llama LLM, a sentencepiece
    `LlamaTokenizer` and the Hermes-2 template. The tokenizer model is the Phi-3 fixture's, with `<|im_start|>` and
    `<|im_end|>` added as special tokens (Yi has them in its vocabulary)."""
    from internvlx_hf.conversion.synthetic_checkpoint import make_synthetic_internvl2

    phi3 = require_fixture("internvl2_phi3")
    tokenizer = parent / "tokenizer"
    tokenizer.mkdir(parents=True)
    shutil.copyfile(phi3 / "tokenizer.model", tokenizer / "tokenizer.model")
    settings = json.loads((phi3 / "tokenizer_config.json").read_text())
    chat = ["<|im_start|>", "<|im_end|>"]
    for index, content in zip((820, 821), chat):
        settings["added_tokens_decoder"][str(index)] = {"content": content, "lstrip": False, "normalized": False,
                                                        "rstrip": False, "single_word": False, "special": True}
    settings.update(additional_special_tokens=settings["additional_special_tokens"] + chat, legacy=legacy)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    (tokenizer / "config.json").write_text(json.dumps({"template": "Hermes-2", "llm_config": {"vocab_size": 822}}))
    return make_synthetic_internvl2(parent / "src", tokenizer, llm="llama")


@pytest.mark.parametrize("legacy", [True, False])
def test_llama_tokenizer_checkpoints_export_with_the_same_ids(tmp_path, monkeypatch, legacy):
    """A Llama-source conversion (InternVLXLlamaTokenizerFast, remote code) exports: the native folder reads its
    tokenizer.json with transformers' TokenizersBackend, as transformers' own InternVL conversion ships sentencepiece
    LLMs, which gives our processor's ids on the chat prompts; the native model gives our logits bit for bit. What
    the native tokenizer does not do (the slow tokenizer's decode rules; with legacy=False its text-start rule, which
    these Hermes-2 prompts do not meet: they start with the special <|im_start|>) is listed as not carried."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, TokenizersBackend

    convert(yi_like_source(tmp_path, legacy), tmp_path / "ours", progress=False)
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "InternVLXLlamaTokenizerFast"
    report = export_native(tmp_path / "ours", tmp_path / "native", progress=False)
    native = tmp_path / "native"
    assert not any(path.suffix == ".py" for path in native.iterdir())
    settings = json.loads((native / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "TokenizersBackend" and "legacy" not in settings
    notes = [item.split(":")[0].split(" (")[0] for item in report.lost if "LlamaTokenizer" in item]
    assert notes == ["InternVLXLlamaTokenizerFast's decode()"] + (
        [] if legacy else ["the slow LlamaTokenizer's legacy=False text start"])
    native_model = AutoModelForImageTextToText.from_pretrained(native, trust_remote_code=False).eval()
    assert native_model.config.text_config.model_type == "llama"
    _assert_same_model(native_model, InternVLXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())
    ours, _ = _same_inputs(tmp_path / "ours", native, monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(native)
    assert type(tokenizer) is TokenizersBackend
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there, 2024?"},
                    {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "<ref>x</ref> And?"}]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system") and tokenizer(prompt)["input_ids"] == \
        ours.tokenizer(prompt)["input_ids"]
    # the native template writes the BOS for routes that tokenize without special tokens, as ours does
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>" + prompt
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == ours(text=prompt)["input_ids"][0]


def test_phi3_exports_since_its_prompts_start_with_the_bos(tmp_path, monkeypatch):
    """InternVL2-4B's tokenizer (legacy=False) puts a '▁' in front of a text that starts with <|system|>, which no
    tokenizer transformers ships does; its chat template now starts with `<s> ` (what vLLM's chat route needs too), a
    special token, so the native tokenizer reads every phi3-chat prompt as ours does: exported, with our processor's
    ids and logits. A folder written before (template without `<s> `) gets it on export."""
    from transformers import AutoModelForImageTextToText

    convert(require_fixture("internvl2_phi3"), tmp_path / "ours", progress=False)
    template = tmp_path / "ours" / "chat_template.jinja"
    assert parse_chat_template(template.read_text()) == ("phi3-chat", "<s> ")
    template.write_text(CHAT_TEMPLATES["phi3-chat"])  # as an earlier internvlx-hf wrote it
    export_native(tmp_path / "ours", tmp_path / "native", progress=False)
    exported = (tmp_path / "native" / "chat_template.jinja").read_text()
    assert parse_chat_template(to_our_template(exported)) == ("phi3-chat", "<s> ")
    native_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "native", trust_remote_code=False).eval()
    _assert_same_model(native_model, InternVLXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())
    _, inputs = _same_inputs(tmp_path / "ours", tmp_path / "native", monkeypatch)
    assert inputs["input_ids"][0, :3].tolist() == [1, 741, 806]  # <s> ▁ <|system|>, the reference's start


def test_a_template_whose_prompts_the_native_tokenizer_reads_otherwise_is_refused(tmp_path):
    """A chat template of the user's own whose phi3 prompts start with <|system|> (not a special token): the native
    tokenizer would drop the '▁' the slow tokenizer puts there. Refused, saying so, and nothing is written."""
    convert(require_fixture("internvl2_phi3"), tmp_path / "ours", progress=False)
    (tmp_path / "ours" / "chat_template.jinja").write_text(CHAT_TEMPLATES["phi3-chat"] + "{#- the user's own -#}")
    with pytest.raises(ConversionError) as info:
        export_native(tmp_path / "ours", tmp_path / "native", progress=False)
    assert str(info.value) == (
        f"{tmp_path / 'ours'}: its tokenizer (InternVLXLlamaTokenizerFast, legacy=False) encodes as the slow "
        "LlamaTokenizer, which puts a '▁' in front of a text that starts with an added token outside the special "
        "tokens; no tokenizer transformers ships does that, and this checkpoint's chat template starts its prompts "
        "with '<|system|>', so the native checkpoint would read them differently (ids [1, 741, 806, 13]... natively "
        "[1, 806, 13, 231]...). Llama tokenizers with legacy=True, or whose prompts start with a special token, "
        "export.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


@pytest.mark.parametrize("tie, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_round_trip_is_bit_identical(tmp_path, ours_qwen2, tie, dtype):
    native = make_native(tmp_path / "native", ours_qwen2, tie=tie, dtype=dtype)
    convert(native, tmp_path / "ours", progress=False)
    export_native(tmp_path / "ours", tmp_path / "back", progress=False)
    before, after = read_tensors(native), read_tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    assert ("language_model.lm_head.weight" in after) is not tie
    for key in before:
        assert before[key].dtype == after[key].dtype == dtype and torch.equal(before[key], after[key]), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"] and config["tie_word_embeddings"] is tie


def test_round_trip_carries_select_layer_and_the_other_config_fields(tmp_path, ours_qwen2):
    """A checkpoint that feeds the second-to-last ViT layer (InternVL2-1B's select_layer) to the projector, with
    untied embeddings, goes native -> ours -> native with every field the model's output depends on."""
    from transformers import InternVLForConditionalGeneration

    native = make_native(tmp_path / "native", ours_qwen2, tie=False, vision_feature_layer=-2)
    convert(native, tmp_path / "ours", progress=False)
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (ours["select_layer"], ours["downsample_ratio"], ours["image_seq_length"], ours["tie_word_embeddings"]) \
        == (-2, 0.5, 4, False)
    export_native(tmp_path / "ours", tmp_path / "back", progress=False)
    before = json.loads((native / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "downsample_ratio", "image_seq_length",
                "image_token_id", "projector_hidden_act", "tie_word_embeddings"):
        assert after[key] == before[key], key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "rope_parameters", "rms_norm_eps", "eos_token_id"):
        assert after["text_config"][key] == before["text_config"][key], key
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "layer_norm_eps", "use_qk_norm"):
        assert after["vision_config"][key] == before["vision_config"][key], key
    original = InternVLForConditionalGeneration.from_pretrained(native).eval()
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert back.config.vision_feature_layer == -2
    _assert_same_model(original, back)
    _assert_same_model(original, InternVLXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())
    # The layer matters: the last layer's features give other logits.
    ids, pixels = _ids_and_pixels(back.config)
    with torch.no_grad():
        selected = back(input_ids=ids, pixel_values=pixels).logits
        last = back(input_ids=ids, pixel_values=pixels, vision_feature_layer=-1).logits
    assert (selected - last).abs().max() > 1e-4  # tiny random weights: a small but real difference


def test_round_trip_keeps_the_template_name_and_the_text_it_accepts(tmp_path, ours_qwen2):
    """internlm2-chat and Hermes-2 are the same ChatML text; export records the name, so convert gives it back.
    The `<video>` placeholder export adds for InternVLProcessor has no embedding row in this checkpoint: the
    converted-back tokenizer leaves it out, so text containing "<video>" is read as the original read it."""
    src = tmp_path / "src"
    shutil.copytree(ours_qwen2, src)
    _edit_json(src / "config.json", template="internlm2-chat")
    report = export_native(src, tmp_path / "native", progress=False)
    assert any("<video>" in item for item in report.lost)
    back = convert(tmp_path / "native", tmp_path / "back", progress=False)
    assert back.template == "internlm2-chat"
    assert any(note.startswith("tokenizer: left out <video> (") for note in back.notes), back.notes
    assert json.loads((tmp_path / "back" / "config.json").read_text())["template"] == "internlm2-chat"

    original, returned = InternVLXProcessor.from_pretrained(str(src)), InternVLXProcessor.from_pretrained(
        str(tmp_path / "back"))
    vocab = json.loads((tmp_path / "back" / "config.json").read_text())["text_config"]["vocab_size"]
    assert len(returned.tokenizer) <= vocab
    text = "a <video> b <img></img> <|im_end|>"
    ids = returned.tokenizer(text)["input_ids"]
    assert ids == original.tokenizer(text)["input_ids"] and max(ids) < vocab
    model = InternVLXForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))


def test_export_summary_and_the_route_without_torchvision(ours_qwen2, tmp_path):
    """The summary says AutoProcessor needs torchvision; the route of docs/export.md ("Without torchvision":
    AutoTokenizer + AutoImageProcessor, <IMG_CONTEXT> expanded by hand) gives our processor's ids and pixels."""
    import importlib.util

    from transformers import AutoProcessor, AutoTokenizer
    # from its module: `from transformers import AutoImageProcessor` is a placeholder demanding torchvision on 5.16-5.17
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    report = export_native(ours_qwen2, tmp_path / "native", progress=False)
    assert "  needs           AutoProcessor / InternVLProcessor need torchvision" in str(report)
    folder = str(tmp_path / "native")
    if importlib.util.find_spec("torchvision") is None:
        import transformers

        # transformers 5.16 trips over the missing video processor before it can say so (from 5.17 on it does)
        error = (ValueError, "requires `torchvision`") if Version(transformers.__version__) >= Version("5.17") else \
            (AttributeError, "'NoneType' object has no attribute '__module__'")
        with pytest.raises(error[0], match=error[1]):
            AutoProcessor.from_pretrained(folder)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    assert type(image_processor).__name__ == "GotOcr2ImageProcessorPil"
    ours = InternVLXProcessor.from_pretrained(str(ours_qwen2))
    seq = json.loads((tmp_path / "native" / "config.json").read_text())["image_seq_length"]
    for image in _images():
        pixels = image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        tiles = int(pixels["num_patches"][0])
        prompt = prompt.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * (seq * tiles) + "</img>", 1)
        expected = ours(images=[image], text=ours.apply_chat_template(MESSAGES, add_generation_prompt=True),
                        return_tensors="pt")
        assert tokenizer(prompt)["input_ids"] == expected["input_ids"][0].tolist()
        assert torch.equal(pixels["pixel_values"], expected["pixel_values"])


# -------------------------------------------------------------------------------------------------------------- CLI


def test_cli_export(ours_qwen2, tmp_path, capsys):
    assert main(["export", "native", str(ours_qwen2), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "Exported" in capsys.readouterr().out

    assert main(["export", "native", str(tmp_path / "missing"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("internvlx export: error: SRC ") and "missing is not a folder" in err
    assert len(err.strip().splitlines()) == 1

    assert main(["export", "native", str(ours_qwen2), str(tmp_path / "out")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err

    assert main(["export", "onnx", str(ours_qwen2), str(tmp_path / "b")]) == 2
    assert "unknown TARGET 'onnx'; the only target is 'native'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "internvlx export native" in text and "without trust_remote_code" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export" in capsys.readouterr().out
