"""InternVL3.5-Flash's visual resolution router (ViR, `config.vir`): a Flash folder converted and loaded as remote code
reproduces the reference run of the official Flash code (`../shared/fixtures_flash`, shipped compact in
`tests/fixtures/internvl3_5_flash`), case by case; batches equal each sample alone; the shortened prompt goes through
caches, chat turns and streaming; conversion refuses what it cannot convert, saying why."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import golden
from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
from internvlx_hf.conversion import ConversionError, convert
from internvlx_hf.modeling.compat import CACHE_NAME
from internvlx_hf.modeling.vir import vir_decisions
from parity import run_isolated_script

FLASH = golden.FLASH_FIXTURE
CASES = ("main", "second", "two_image", "main_abs075", "normal")


def fixture_file(name: str):
    return golden.fixture_path(FLASH, name)


@pytest.fixture(scope="module")
def reference():
    meta = json.loads(fixture_file("reference.json").read_text(encoding="utf-8"))
    tensors = load_file(str(fixture_file("reference.compact.safetensors")))
    return meta, tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("flash") / "converted"
    report = convert(fixture_file("config.json").parent, dst, progress=False)
    return dst, report


@pytest.fixture(scope="module")
def model(converted):
    return InternVLXForConditionalGeneration.from_pretrained(converted[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(converted):
    return InternVLXProcessor.from_pretrained(converted[0])


# What the remote code gives for every case, in a fresh interpreter where internvlx_hf cannot be imported: the
# processor's prompt, ids and tiles, the router's decisions and shortened ids, the last logits of a forward, greedy
# tokens with their scores (generate) and chat()'s answer.
PARITY_SCRIPT = r"""
import hashlib, json, sys, torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

dst, images_dir, cases_path, out_path = sys.argv[1:5]
cases = json.load(open(cases_path))
model = AutoModel.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
result, tensors = {"module": type(model).__module__}, {}
for name, case in cases.items():
    vir = model.config.vir
    vir.enabled, vir.absolute_threshold = case["flash_mode"], case["absolute_threshold"]
    images = [Image.open(f"{images_dir}/{image}") for image in case["images"]]
    prompt = case["prompt"]  # the reference's, with its <image> tags: the processor expands them
    if len(images) == 1:  # and as the chat template renders a message with an image
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=prompt, max_tiles=6, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    ids = inputs["input_ids"]
    routing = model.model.route(ids, pixel_values, inputs["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values, attention_mask=inputs["attention_mask"]).logits
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    chat = model.chat(processor.tokenizer, pixel_values, case["chat_question"], dict(max_new_tokens=8, do_sample=False),
                      num_patches_list=inputs["num_patches"].tolist())
    result[name] = {"prompt": prompt, "pixel_sha256": hashlib.sha256(pixel_values.numpy().tobytes()).hexdigest(),
                    "generated": out.sequences[0, ids.shape[1]:].tolist(), "chat": chat,
                    "compressed": routing.compressed.tolist()}
    tensors.update({f"{name}.input_ids": ids, f"{name}.routed_ids": routing.input_ids,
                    f"{name}.scores": routing.scores, f"{name}.logits_last": logits[0, -1],
                    f"{name}.generation_scores": torch.cat(out.scores)})
save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def remote_run(converted, reference, tmp_path_factory):
    meta, _ = reference
    cases = {}
    for name in CASES:
        case = meta["cases"]["main" if name == "normal" else name]
        images = [image["image"] for image in case["images"]]
        cases[name] = {"images": images, "question": case["question"], "chat_question": case["question_as_sent"],
                       "prompt": case["prompt_with_image_tag"],
                       "flash_mode": name != "normal", "absolute_threshold": case["flash_absolute_threshold"]}
    tmp = tmp_path_factory.mktemp("flash_remote")
    (tmp / "cases.json").write_text(json.dumps(cases))
    images_dir = golden.fixture_path("images", "image1.jpg").parent
    result = run_isolated_script(PARITY_SCRIPT, [str(converted[0]), str(images_dir), str(tmp / "cases.json"),
                                                 str(tmp / "out.safetensors")], tmp)
    return result, load_file(str(tmp / "out.safetensors"))


@pytest.mark.oldest
@pytest.mark.parametrize("case", CASES)
def test_converted_flash_folder_reproduces_the_reference_case(case, remote_run, reference):
    """Loaded as remote code without the package: the processor's prompt, ids and tiles (bit-exact digests) are the
    reference's; the router's decision per tile, its scores (1e-5) and the shortened ids equal the reference's
    (`normal`: flash_mode off, nothing shortened); the last logits within 1e-4, the 8 greedy tokens and their scores
    (1e-4) and chat()'s answer equal."""
    meta, ref = reference
    result, out = remote_run
    assert result["module"].startswith("transformers_modules")
    key = "main" if case == "normal" else case
    source = meta["cases"][key]
    mine = result[case]
    assert mine["prompt"] == source["prompt_with_image_tag"]
    assert torch.equal(out[f"{case}.input_ids"], ref[f"{key}.input_ids"])
    assert mine["pixel_sha256"] == source["pixel_values_sha256"]
    if case == "normal":
        assert mine["compressed"] == [False] * len(mine["compressed"])
        assert torch.equal(out[f"{case}.routed_ids"], ref["main.input_ids"])
        expected_prefix = "normal."
    else:
        assert mine["compressed"] == ref[f"{case}.compress"].tolist()
        assert torch.equal(out[f"{case}.routed_ids"], ref[f"{case}.input_ids_compressed"])
        torch.testing.assert_close(out[f"{case}.scores"], ref[f"{case}.gate_probs"][:, 0], atol=1e-5, rtol=0)
        expected_prefix = f"{case}."
    torch.testing.assert_close(out[f"{case}.logits_last"], ref[expected_prefix + "logits_last"], atol=1e-4, rtol=0)
    assert mine["generated"] == ref[expected_prefix + "generated_ids"][0].tolist()
    torch.testing.assert_close(out[f"{case}.generation_scores"], ref[expected_prefix + "generation_scores"],
                               atol=1e-4, rtol=0)
    generation = (meta["normal"] if case == "normal" else source)["generation"]
    assert mine["chat"] == generation["chat_response"]


def test_conversion_reports_the_router_and_the_pooling_weights_it_never_uses(converted):
    """The summary names the router; attn3/attn4/norm3/norm4 (stored, never used by the reference's pooling) are
    dropped with that reason; nothing else is dropped or new."""
    dst, report = converted
    assert report.vir["enabled"] and report.vir["compressed_tokens"] == 64
    assert "ViR router      on: a tile is compressed to 64 tokens" in str(report)
    assert sorted(report.dropped) == sorted(f"pooling_before_gating.{m}{n}.{p}" for n in (3, 4) for m, p in
                                            [("attn", "in_proj_weight"), ("attn", "in_proj_bias"),
                                             ("attn", "out_proj.weight"), ("attn", "out_proj.bias"),
                                             ("norm", "weight"), ("norm", "bias")])
    assert all("never used" in reason for reason in report.dropped.values())
    assert report.new == {}
    config = json.loads((dst / "config.json").read_text())
    assert config["vir"] == {"enabled": True, "relative_threshold": 0.1, "absolute_threshold": 0.5,
                             "scope": "sample", "compressed_downsample_ratio": 0.25, "pooling_num_heads": 16}


def test_decisions_at_ties_follow_torch_quantile_and_the_strict_comparison(reference, model, processor):
    """The reference's tie checks: the main tiles with the lowest-scoring one duplicated (both copies kept, 6
    compressed, 896 placeholders left) and four copies of the highest (nothing compressed: a group of equal scores
    compresses none), from the scores and through the model on the duplicated tiles."""
    meta, _ = reference
    main = Image.open(golden.fixture_path("images", "image1.jpg"))
    tiles = processor.image_processor(images=[main], max_tiles=6, return_tensors="pt")["pixel_values"]
    for name, check in meta["ties"].items():
        scores = torch.tensor(check["p0"])
        assert vir_decisions(scores, [len(scores)], 0.1, 0.5).tolist() == check["compress"], name
        pixel_values = tiles[check["tile_indices_into_main"]]
        ids = torch.full((1, 256 * len(pixel_values)), model.config.image_token_id)
        routing = model.model.route(ids, pixel_values)
        assert routing.compressed.tolist() == check["compress"], name
        assert int((routing.input_ids == model.config.image_token_id).sum()) == check["img_context_tokens_after"]


def _sample(processor, images, question):
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def batch_samples():
    image = lambda name: Image.open(golden.fixture_path("images", name)).convert("RGB")  # noqa: E731
    one, two, six = image("image1.jpg"), image("image2.jpg"), image("img6.jpg")
    flipped = one.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return [([one], "Describe it."), ([two, six], "Compare them, please."), ([six, flipped, two], "What differs?"),
            ([flipped], "A longer question about the picture, to pad the others on the left.")]


def test_a_batch_of_samples_with_one_to_three_images_equals_each_alone(model, processor, batch_samples):
    """Left-padded batch of 4 samples (1-3 images, 2-4 tiles each, the router's decisions mixed within and across
    samples): each sample's decisions, greedy tokens and scores (1e-4) equal its run alone (the quantile per sample,
    the default scope); the returned sequences start with the prompts as given."""
    texts = [_sample(processor, images, question) for images, question in batch_samples]
    images = [image for sample_images, _ in batch_samples for image in sample_images]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, max_tiles=3, padding=True, return_tensors="pt")
    routing = model.model.route(batch.input_ids, batch.pixel_values, batch.attention_mask)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :batch.input_ids.shape[1]], batch.input_ids)
    assert 0 < int(routing.compressed.sum()) < len(routing.compressed)
    tiles_done = 0
    for row, (sample_images, question) in enumerate(batch_samples):
        alone = processor(images=sample_images, text=texts[row], max_tiles=3, return_tensors="pt")
        alone_routing = model.model.route(alone.input_ids, alone.pixel_values)
        tiles = len(alone.pixel_values)
        assert routing.compressed[tiles_done:tiles_done + tiles].tolist() == alone_routing.compressed.tolist()
        tiles_done += tiles
        single = model.generate(**alone, max_new_tokens=6, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        assert out.sequences[row, batch.input_ids.shape[1]:].tolist() == \
            single.sequences[0, alone.input_ids.shape[1]:].tolist()
        for step, scores in enumerate(single.scores):
            torch.testing.assert_close(out.scores[step][row], scores[0], atol=1e-4, rtol=0)


def test_batch_chat_answers_each_question_as_chat_does(model, processor):
    """InternVL's `batch_chat` (one image per question, a left-padded batch) on a Flash model: each answer is
    `chat()`'s for that question alone."""
    images = [Image.open(golden.fixture_path("images", name)).convert("RGB") for name in ("image1.jpg", "img6.jpg")]
    tiles = [processor.image_processor(images=[image], max_tiles=4, return_tensors="pt")["pixel_values"]
             for image in images]
    questions = ["Describe it.", "What is the longest thing you can see in this picture?"]
    config = dict(max_new_tokens=5, do_sample=False)
    together = model.batch_chat(processor.tokenizer, torch.cat(tiles), questions, config,
                                num_patches_list=[len(t) for t in tiles])
    assert together == [model.chat(processor.tokenizer, t, q, config) for t, q in zip(tiles, questions)]


def test_beam_search_repeats_each_prompts_routed_tokens(model, processor):
    """num_beams / num_return_sequences repeat every prompt: the router's visual tokens follow each as a block, so a
    two-sample batch's beams are each sample's beams alone."""
    images = [Image.open(golden.fixture_path("images", name)).convert("RGB") for name in ("image1.jpg", "img6.jpg")]
    texts = [_sample(processor, [image], question) for image, question in zip(images, ["Describe it.", "What?"])]
    options = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    batch = processor(images=images, text=texts, max_tiles=4, padding=True, return_tensors="pt")
    together = model.generate(**batch, **options)
    assert together.shape[0] == 4 and torch.equal(together[:, :batch.input_ids.shape[1]],
                                                  batch.input_ids.repeat_interleave(2, dim=0))
    for row, (image, text) in enumerate(zip(images, texts)):
        alone = processor(images=[image], text=text, max_tiles=4, return_tensors="pt")
        single = model.generate(**alone, **options)
        assert together[2 * row:2 * row + 2, batch.input_ids.shape[1]:].tolist() == \
            single[:, alone.input_ids.shape[1]:].tolist()


def test_the_call_scope_takes_the_quantile_over_every_tile_of_the_batch(model, processor, reference):
    """scope="call" (the reference's): one quantile over the batch's tiles. A batch of two samples, image1 and image2
    (6 tiles at most), gives the decisions of the reference's one call on both images (its two-image case: image1's
    tile 3 kept), which differ from each sample's own quantile (the default scope)."""
    _, ref = reference
    pictures = [Image.open(golden.fixture_path("images", name)) for name in ("image1.jpg", "image2.jpg")]
    texts = [_sample(processor, [picture], "Describe it.") for picture in pictures]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=pictures, text=texts, max_tiles=6, padding=True, return_tensors="pt")
    per_sample = model.model.route(batch.input_ids, batch.pixel_values, batch.attention_mask)
    model.config.vir.scope = "call"
    try:
        whole = model.model.route(batch.input_ids, batch.pixel_values, batch.attention_mask)
    finally:
        model.config.vir.scope = "sample"
    assert whole.compressed.tolist() == ref["two_image.compress"].tolist()
    assert per_sample.compressed.tolist() == ref["main.compress"].tolist() + ref["second.compress"].tolist()
    assert whole.compressed.tolist() != per_sample.compressed.tolist()


def test_caches_chat_turns_and_streaming_follow_the_shortened_prompt(model, processor):
    """generate() with a DynamicCache or a StaticCache the caller passes gives the tokens it gives without; a second
    turn on the first turn's DynamicCache (the conversation passed as generate returned it) equals the same
    conversation run from scratch; chat() with a history and a streamer answers as the plain calls do."""
    from transformers import DynamicCache, StaticCache, TextIteratorStreamer

    image = Image.open(golden.fixture_path("images", "image1.jpg"))
    prompt = _sample(processor, [image], "Describe it.")
    inputs = processor(images=[image], text=prompt, max_tiles=4, return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    cache = DynamicCache(config=model.config.get_text_config())
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, **{CACHE_NAME: cache}), plain)
    static = StaticCache(config=model.config.get_text_config(), max_cache_len=2048)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, **{CACHE_NAME: static}), plain)

    follow = processor.tokenizer("<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n",
                                 return_tensors="pt").input_ids
    conversation = torch.cat([plain, follow], dim=-1)
    second = model.generate(input_ids=conversation, max_new_tokens=4, do_sample=False, **{CACHE_NAME: cache})
    scratch = model.generate(input_ids=conversation, pixel_values=inputs.pixel_values, max_new_tokens=4,
                             do_sample=False)
    assert torch.equal(second, scratch)

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == processor.tokenizer.decode(plain[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    answer, history = model.chat(processor.tokenizer, inputs.pixel_values, "Describe it.",
                                 dict(max_new_tokens=5, do_sample=False), return_history=True)
    again = model.chat(processor.tokenizer, inputs.pixel_values, "And the colours?",
                       dict(max_new_tokens=5, do_sample=False), history=history)
    # the oracle: the same conversation written by the chat template and generated from scratch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    whole = processor(images=[image], text=text, max_tiles=4, return_tensors="pt")
    scratch = model.generate(**whole, max_new_tokens=5, do_sample=False)
    assert again == processor.tokenizer.decode(scratch[0, whole.input_ids.shape[1]:],
                                               skip_special_tokens=True).split("<|im_end|>")[0].strip()


def test_a_training_forward_shortens_the_labels_and_packed_rows_give_the_rows_loss(model, processor):
    """A forward with labels runs the LLM on the shortened prompt and gives its outputs in the given columns (the
    deleted placeholders' zero, their labels ignored); two samples packed in one row (position ids restarting, no
    mask) give the loss of the two-row batch, and the lean LM head (the training default) gives the loss of full
    logits."""
    image = Image.open(golden.fixture_path("images", "image1.jpg"))
    six = Image.open(golden.fixture_path("images", "img6.jpg"))
    rows = [processor(images=[img], text=_sample(processor, [img], q) + "An answer.<|im_end|>", max_tiles=3,
                      return_tensors="pt") for img, q in ((image, "Describe it."), (six, "What is it?"))]
    routed = [model.model.route(r.input_ids, r.pixel_values) for r in rows]
    with torch.no_grad():
        separate = [model(input_ids=r.input_ids, pixel_values=r.pixel_values, labels=r.input_ids) for r in rows]
    assert [out.logits.shape[1] for out in separate] == [r.input_ids.shape[1] for r in rows]
    for out, r, routing in zip(separate, rows, routed):  # a deleted placeholder's outputs are zeros
        assert torch.equal(out.logits[0, ~routing.kept[0]], torch.zeros_like(out.logits[0, ~routing.kept[0]]))
    assert sum(r.input_ids.shape[1] for r in routed) < sum(r.input_ids.shape[1] for r in rows)
    packed_ids = torch.cat([r.input_ids for r in rows], dim=-1)
    positions = torch.cat([torch.arange(r.input_ids.shape[1]) for r in rows])[None]
    labels = packed_ids.clone()
    labels[0, rows[0].input_ids.shape[1]] = -100  # the second sample's first token has no predecessor in its sample
    with torch.no_grad():
        packed = model(input_ids=packed_ids, pixel_values=torch.cat([r.pixel_values for r in rows]),
                       position_ids=positions, labels=labels, use_cache=False)
    ignored = torch.tensor(model.placeholder_label_ids())
    counts = [int((~torch.isin(r.input_ids[0, 1:], ignored)).sum()) for r in routed]
    weighted = sum(out.loss * n for out, n in zip(separate, counts)) / sum(counts)
    torch.testing.assert_close(packed.loss, weighted, atol=1e-5, rtol=0)
    model.train()
    try:
        lean = model(input_ids=rows[0].input_ids, pixel_values=rows[0].pixel_values, labels=rows[0].input_ids)
        full = model(input_ids=rows[0].input_ids, pixel_values=rows[0].pixel_values, labels=rows[0].input_ids,
                     skip_logits=False)
    finally:
        model.eval()
    torch.testing.assert_close(lean.loss, full.loss)


def test_inputs_embeds_with_tiles_are_refused_while_the_router_is_on(model, processor):
    """The router shortens the prompt's ids: a forward given embeddings and tiles says so instead of running every
    tile at full resolution unasked; with the router off it runs as plain InternVL3.5."""
    image = Image.open(golden.fixture_path("images", "img6.jpg"))
    inputs = processor(images=[image], text=_sample(processor, [image], "What is it?"), return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs.input_ids)
    with pytest.raises(ValueError, match=r"needs input_ids with pixel_values, not inputs_embeds"):
        model(inputs_embeds=embeds, pixel_values=inputs.pixel_values)
    model.config.vir.enabled = False
    try:
        with torch.no_grad():
            off = model(inputs_embeds=embeds, pixel_values=inputs.pixel_values).logits
            ids = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    finally:
        model.config.vir.enabled = True
    torch.testing.assert_close(off, ids)


def _edited_copy(tmp_path, edit):
    src = fixture_file("config.json").parent
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("flash_relative_threshold"), "lacks a numeric flash_relative_threshold"),
    (lambda c: c["vision_config"].update(hidden_size=72, num_attention_heads=4),
     "vir.pooling_num_heads=16 does not divide the ViT width 72"),
    (lambda c: c.update(select_layer=-2), "select_layer=-2"),
], ids=["no-threshold", "vit-width", "select-layer"])
def test_a_flash_folder_that_cannot_convert_is_refused_in_one_line_and_nothing_is_written(edit, message, tmp_path):
    folder = _edited_copy(tmp_path, edit)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(".", r"\.")) as caught:
        convert(folder, tmp_path / "out", progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def _photo_data(tmp_path, count=8):
    """InternVL meta JSON of ``count`` rows about the fixture photos (several tiles each, which the router splits)."""
    import training_helpers as th

    names = ["image1.jpg", "image2.jpg", "img6.jpg"]
    (tmp_path / "images").mkdir()
    for name in names:
        shutil.copyfile(golden.fixture_path("images", name), tmp_path / "images" / name)
    rows = [{"id": index, "image": names[index % 3], "conversations": [
        {"from": "human", "value": "<image>\nWhich photo is it?"},
        {"from": "gpt", "value": f"It is {names[index % 3].split('.')[0]}."}]} for index in range(count)]
    th.write_jsonl(tmp_path / "photos.jsonl", rows)
    entry = {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "photos.jsonl"), "data_augment": False,
             "repeat_time": 1, "max_dynamic_patch": 3}
    (tmp_path / "meta.json").write_text(json.dumps({"photos": entry}))
    return tmp_path / "meta.json"


_ANSWER_ANYWHERE = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, image = sys.argv[1:3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which photo is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(image)], text=prompt, max_tiles=6, return_tensors="pt")
routing = model.model.route(inputs["input_ids"], inputs["pixel_values"])
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print("RESULT" + json.dumps({"module": type(model).__module__, "compressed": routing.compressed.tolist(),
                             "answer": processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])}))
"""


@pytest.mark.parametrize("preset", ["stage2", "lora"])
def test_a_four_step_fine_tune_keeps_the_router_frozen_and_reloads_anywhere(preset, converted, tmp_path, capsys):
    """`internvlx train` on a Flash folder (photos of 3 tiles, the router's sequence): 4 steps, the router's pooling
    and gate bit-identical, the compressed tiles' projector trained (stage2: in full; lora: beside the adapters), and
    the output folder loads as remote code without the package and answers with the router on."""
    from internvlx_hf.cli import main

    source = load_file(str(converted[0] / "model.safetensors"))
    out = tmp_path / "out"
    code = main(["train", "--model", str(converted[0]), "--data", str(_photo_data(tmp_path)), "--preset", preset,
                 "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "no", "--use_cpu", "--report_to",
                 "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "1",
                 "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"^  router +0 +[1-9][\d,]*$", printed, re.M), printed
    trained = load_file(str(out / "model.safetensors"))
    router = [key for key in source if key.startswith(("model.vir.pooling.", "model.vir.gating."))]
    assert router and all(torch.equal(trained[key], source[key]) for key in router)
    assert any(not torch.equal(trained[key], source[key]) for key in source if key.startswith("model.vir.projector."))
    result = run_isolated_script(_ANSWER_ANYWHERE, [str(out), str(golden.fixture_path("images", "image1.jpg"))],
                                 tmp_path)
    assert result["module"].startswith("transformers_modules")
    assert len(result["compressed"]) == 7 and isinstance(result["answer"], str)


def test_a_plain_trainer_trains_a_flash_model_on_the_routers_sequence(model, processor, tmp_path):
    """transformers' `Trainer` with the package's dataset and collator: the forward shortens each sample by the frozen
    router (the router's parameters take no gradient and are out of the optimizer), and the rest trains."""
    import copy

    from transformers import Trainer

    import training_helpers as th
    from internvlx_hf.data import InternVLXDataset
    from internvlx_hf.training import InternVLXDataCollator

    rows = [json.loads(line) for line in (_photo_data(tmp_path).parent / "photos.jsonl").read_text().splitlines()]
    for row in rows:
        row["image"] = str(tmp_path / "images" / row["image"])
    student = copy.deepcopy(model).train()
    assert not any(p.requires_grad for n, p in student.named_parameters() if n.startswith(("model.vir.pooling",
                                                                                            "model.vir.gating")))
    before = th.snapshot(student)
    six_tiles = copy.deepcopy(processor)
    six_tiles.image_processor.max_tiles = 6
    trainer = Trainer(student, th.training_args(tmp_path / "out", max_steps=2, remove_unused_columns=False),
                      train_dataset=InternVLXDataset(rows, six_tiles, progress=False, cache_dir=False),
                      data_collator=InternVLXDataCollator(six_tiles))
    trainer.train()
    after = dict(student.named_parameters())
    router = [name for name in before if name.startswith(("model.vir.pooling", "model.vir.gating"))]
    assert router and all(after[name].detach().equal(before[name]) for name in router)
    assert any(not after[name].detach().equal(value) for name, value in before.items()
               if name.startswith("model.vir.projector"))


def test_a_videos_frames_are_routed_as_tiles(model, processor):
    """A video's frames are one tile each (as InternVL3.5 feeds them): the router decides per frame, with the
    quantile over the sample's frames, as for the same frames given as one-tile images; generation runs on the
    shortened prompt."""
    frames = [Image.open(golden.fixture_path("images", name)).convert("RGB")
              for name in ("image1.jpg", "image2.jpg", "img6.jpg", "image1.jpg")]
    frames[3] = frames[3].transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    video = processor(text=prompt, videos=[frames], return_tensors="pt")
    assert video["num_patches"].tolist() == [1, 1, 1, 1]
    routing = model.model.route(video["input_ids"], video["pixel_values"])
    as_images = processor(images=frames, text=_sample(processor, frames, "What happens?"), max_tiles=1,
                          return_tensors="pt")
    assert torch.equal(as_images["pixel_values"], video["pixel_values"])
    # the oracle: the frames given as four one-tile images of one sample (the image path of the processor)
    assert routing.compressed.tolist() == model.model.route(as_images["input_ids"],
                                                            as_images["pixel_values"]).compressed.tolist()
    assert 0 < int(routing.compressed.sum()) < 4
    kept = int((routing.input_ids == model.config.image_token_id).sum())
    assert kept == sum(64 if c else 256 for c in routing.compressed.tolist())
    out = model.generate(**video, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :video["input_ids"].shape[1]], video["input_ids"]) and out.shape[1] == \
        video["input_ids"].shape[1] + 3


def test_a_plain_internvl3_5_folder_converts_and_answers_as_the_flash_one_with_its_router_off(tmp_path, reference):
    """InternVL3.5 without Flash (Qwen3, no router in config or weights): converted without `config.vir`, it gives
    the reference's flash_mode-off logits (1e-4) and greedy tokens on the main case's prompt."""
    from safetensors.torch import save_file

    folder = _edited_copy(tmp_path, lambda c: [c.pop(k) for k in ("flash_mode", "flash_relative_threshold",
                                                                    "flash_absolute_threshold")])
    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
               if not k.startswith(("pooling_before_gating.", "gating.", "mlp2."))}
    save_file(weights, str(folder / "model.safetensors"))
    report = convert(folder, tmp_path / "out", progress=False)
    assert report.vir is None and report.dropped == {}
    plain = InternVLXForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert plain.config.vir is None and not hasattr(plain.model, "vir")
    processor = InternVLXProcessor.from_pretrained(tmp_path / "out")
    meta, ref = reference
    image = Image.open(golden.fixture_path("images", "image1.jpg"))
    inputs = processor(images=[image], text=meta["cases"]["main"]["prompt_with_image_tag"], max_tiles=6,
                       return_tensors="pt")
    assert torch.equal(inputs.input_ids, ref["main.input_ids"])
    with torch.no_grad():
        logits = plain(**inputs).logits[0, -1]
    torch.testing.assert_close(logits, ref["normal.logits_last"], atol=1e-4, rtol=0)
    out = plain.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out[0, inputs.input_ids.shape[1]:].tolist() == ref["normal.generated_ids"][0].tolist()


def test_a_transformers_without_the_llm_is_named_with_the_fix(tmp_path, monkeypatch):
    """Qwen3-MoE on a transformers that lacks it: one line naming the LLM, the release and the fix; nothing written."""
    import internvlx_hf.conversion.llm as llm

    monkeypatch.setattr(llm, "CONFIG_MAPPING", {key: llm.CONFIG_MAPPING[key] for key in ("qwen3", "llama")})
    folder, _ = _moe_source(tmp_path)
    with pytest.raises(ConversionError, match=r"names Qwen3MoeForCausalLM, which this transformers \(.+\) does not "
                                              r"have \(no model type 'qwen3_moe'\); upgrade transformers"):
        convert(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _moe_source(tmp_path, experts=4, drop_expert=None):
    """The Flash fixture with a Qwen3-MoE LLM (random, seeded) in the OpenGVLab layout: one tensor per expert."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from safetensors.torch import save_file

    def edit(config):
        config["llm_config"].update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                                    num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=32,
                                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    folder = _edited_copy(tmp_path, edit)
    llm_config = json.loads((folder / "config.json").read_text())["llm_config"]
    torch.manual_seed(0)
    llm = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in llm_config.items() if k != "architectures"}))
    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
               if not k.startswith("language_model.")}
    for key, tensor in llm.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base = "language_model." + key[:-len("gate_up_proj")]
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                weights[f"{base}{e}.gate_proj.weight"] = tensor[e, :half].clone()
                weights[f"{base}{e}.up_proj.weight"] = tensor[e, half:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            base = "language_model." + key[:-len("down_proj")]
            for e in range(tensor.shape[0]):
                if e != drop_expert:
                    weights[f"{base}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            weights["language_model." + key] = tensor.clone()
    save_file(weights, str(folder / "model.safetensors"))
    return folder, llm.eval()


def test_a_qwen3_moe_flash_folder_converts_its_experts_into_transformers_fused_tensors(tmp_path):
    """InternVL3.5-30B-A3B's layout (Qwen3-MoE, one tensor per expert and projection): converted into transformers'
    fused expert tensors, bit for bit the tensors of transformers' Qwen3-MoE built from the same weights, so the LLM's
    logits equal that model's (to the rounding of the CPU's kernels: the same weights in another module tree can take
    another kernel, AVX512-BF16 machines differ by 1e-7), and the router runs on an image; an expert missing from the
    weights is refused, naming the tensor."""
    folder, llm = _moe_source(tmp_path)
    report = convert(folder, tmp_path / "out", progress=False)
    assert report.text_model_type == "qwen3_moe" and report.vir["enabled"]
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {"model.language_model." + key.removeprefix("model."): tensor
                for key, tensor in llm.state_dict().items() if not key.startswith("lm_head.")}
    fused = [key for key in expected if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]
    assert fused and all(torch.equal(converted[key], expected[key]) for key in fused)
    assert all(torch.equal(converted[key], tensor) for key, tensor in expected.items())
    model = InternVLXForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 100, 7, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-5, rtol=0)
    processor = InternVLXProcessor.from_pretrained(tmp_path / "out")
    image = Image.open(golden.fixture_path("images", "image1.jpg"))
    inputs = processor(images=[image], text=_sample(processor, [image], "Describe it."), max_tiles=6,
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 3

    broken, _ = _moe_source(tmp_path / "broken", drop_expert=2)
    with pytest.raises(ConversionError, match=r"fused expert tensor\(s\) lack per-expert source tensors: "
                                              r"model\.language_model\.layers\.0\.mlp\.experts\.down_proj \(3 of 4"):
        convert(broken, tmp_path / "broken_out", progress=False)
    assert not (tmp_path / "broken_out").exists()
