"""InternVL3.5-Flash's router on every route a user or a trainer takes (issue 101): each gives a sample the answer of
that sample run alone from scratch, or stops with an error naming the route and the fix. The oracle is always another
run: the sample alone, the conversation from scratch, the full-precision model, the reference's reading of a config.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import DynamicCache

import golden
import training_helpers as th
from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
from internvlx_hf.modeling.compat import CACHE_NAME

FLASH = golden.FLASH_FIXTURE


@pytest.fixture(scope="module")
def folder():
    return th.converted(FLASH)


@pytest.fixture(scope="module")
def model(folder):
    return InternVLXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return InternVLXProcessor.from_pretrained(folder)


@pytest.fixture
def threshold(model):
    """Set ``config.vir.absolute_threshold`` for one test (restored after)."""
    before = model.config.vir.absolute_threshold

    def set_to(value):
        model.config.vir.absolute_threshold = value

    yield set_to
    model.config.vir.absolute_threshold = before


def image(name: str) -> Image.Image:
    flipped = name.endswith("-flipped")
    loaded = Image.open(golden.fixture_path("images", name.removesuffix("-flipped"))).convert("RGB")
    return loaded.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else loaded


def prompt(processor, images, question):
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def encode(processor, images, text, max_tiles, **kwargs):
    return processor(images=images, text=text, max_tiles=max_tiles, return_tensors="pt", **kwargs)


def last_logits_alone(model, processor, images, text, max_tiles, tail):
    alone = encode(processor, images, text, max_tiles)
    with torch.no_grad():
        return model(**alone).logits[0, -tail:]


# ------------------------------------------------------------------------------------------ 1. a forward on a batch


def test_a_forward_on_two_equal_length_prompts_gives_each_row_its_logits_alone(model, processor, threshold):
    """Two prompts of one length (no padding), 5 tiles each, which the router shortens by different amounts (1 and 3
    tiles at an absolute threshold of 0.78): every row's text after the image has the logits of its run alone, in the
    same columns counted from the end; `vir_routing.source` says which given column each routed one holds."""
    threshold(0.78)
    pictures = [image("image1.jpg"), image("image2.jpg")]
    texts = [prompt(processor, [p], "Describe the picture.") for p in pictures]
    batch = encode(processor, pictures, texts, 4, padding=True)
    assert int(batch.attention_mask.min()) == 1  # no padding given
    with torch.no_grad():
        out = model(**batch)
    tail = 20  # the text after </img>
    for row, (picture, text) in enumerate(zip(pictures, texts)):
        alone = last_logits_alone(model, processor, [picture], text, 4, tail)
        torch.testing.assert_close(out.logits[row, -tail:], alone, atol=1e-4, rtol=0)
    routing = out.vir_routing
    assert [int(c.sum()) for c in routing.compressed.split(5)] == [1, 3]
    assert torch.equal(routing.take(batch.input_ids, 0)[:, -tail:], batch.input_ids[:, -tail:])
    assert torch.equal(routing.source[:, -1], torch.full((2,), batch.input_ids.shape[1] - 1))


def test_a_left_padded_batch_with_labels_gives_each_row_its_loss_and_token_losses(model, processor, threshold):
    """A left-padded batch of different prompts and answers with labels: each row's per-token losses equal its run
    alone (1e-4), column for column from the end."""
    threshold(0.78)
    samples = [([image("image1.jpg")], "Describe it.", "A field."),
               ([image("img6.jpg"), image("image2.jpg")], "Compare the two pictures, please.", "They differ a lot.")]
    texts = [prompt(processor, pictures, question) + answer + "<|im_end|>" for pictures, question, answer in samples]
    pictures = [p for sample in samples for p in sample[0]]
    processor.tokenizer.padding_side = "left"
    batch = encode(processor, pictures, texts, 4, padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels, skip_logits=True)
    for row, (sample, text) in enumerate(zip(samples, texts)):
        alone = encode(processor, sample[0], text, 4)
        with torch.no_grad():
            single = model(**alone, labels=alone.input_ids, skip_logits=True)
        tail = 12
        torch.testing.assert_close(out.token_losses[row, -tail:], single.token_losses[0, -tail:], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- 2. scoring as TRL's trainers do it


def _scoring_batch(processor, samples):
    """TRL's layout: the prompts left-padded, the completions right-padded, side by side."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = encode(processor, [p for s in samples for p in s[0]], [prompt(processor, s[0], s[1]) for s in samples],
                     4, padding=True)
    completions = [tokenizer(s[2], add_special_tokens=False).input_ids for s in samples]
    width = max(map(len, completions))
    pad = tokenizer.pad_token_id
    completion_ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    return prompts, completion_ids, completion_mask


def _logps(logits, completion_ids):
    return torch.gather(F.log_softmax(logits.float(), -1), 2, completion_ids[..., None])[..., 0]


SCORED = [([image("image1.jpg")], "Describe it.", " A field under a sky."),
          ([image("image2.jpg")], "What is the main colour of this picture?", " Green."),
          ([image("img6.jpg"), image("image1.jpg-flipped")], "Compare them.", " The first is brighter.")]


def test_completion_log_probs_read_from_the_end_equal_each_sample_alone(model, processor, threshold):
    """GRPO / RLOO's scoring: ``logits_to_keep = completion length + 1``, log-probs of the completion ids read from
    the last columns: each sample's completion log-probs equal its run alone (prompt + completion unpadded), 1e-4."""
    threshold(0.7)
    prompts, completion_ids, completion_mask = _scoring_batch(processor, SCORED)
    input_ids = torch.cat([prompts.input_ids, completion_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, completion_mask], dim=1)
    keep = completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=prompts.pixel_values,
                       logits_to_keep=keep + 1).logits
    batch_logps = _logps(logits[:, :-1], completion_ids)
    tiles = 0
    for row, sample in enumerate(SCORED):
        n = int(completion_mask[row].sum())
        expected, alone = _completion_logps_alone(model, processor, sample, n)
        torch.testing.assert_close(batch_logps[row, :n], expected, atol=1e-4, rtol=0)
        tiles += len(alone.pixel_values)
    assert tiles == len(prompts.pixel_values)


def _completion_logps_alone(model, processor, sample, n):
    """The log-probs of `sample`'s last `n` tokens (its completion) run alone, and its inputs."""
    pictures, question, completion = sample
    alone = encode(processor, pictures, prompt(processor, pictures, question) + completion, 4)
    with torch.no_grad():
        single = model(**alone).logits
    return _logps(single[:, -n - 1:-1], alone.input_ids[:, -n:])[0], alone


def test_trls_fused_lm_head_reads_the_shortened_labels(model, processor, threshold):
    """TRL's fused LM head (GRPO's and DPO's scoring in TRL >= 1.16) replaces the forward, calls the base model and
    reads ``labels`` as given: the router's pre-hook shortens them first, so its per-token log-probs of the
    completions, read from the end, equal each sample's alone."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this TRL has no fused LM head")
    threshold(0.7)
    fused = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(fused)
    prompts, completion_ids, completion_mask = _scoring_batch(processor, SCORED)
    input_ids = torch.cat([prompts.input_ids, completion_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, completion_mask], dim=1)
    keep = completion_ids.shape[1]
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    with torch.no_grad():
        out = fused(input_ids=input_ids, attention_mask=mask, pixel_values=prompts.pixel_values, labels=labels,
                    fused_lm_head=True)
    logps = out.log_probs[:, -keep:]
    for row, sample in enumerate(SCORED):
        n = int(completion_mask[row].sum())
        torch.testing.assert_close(logps[row, :n], _completion_logps_alone(model, processor, sample, n)[0], atol=1e-4,
                                   rtol=0)


# ------------------------------------------------------------------------------------------------------ 3-5. caches


def test_a_cache_filled_by_a_forward_continues_as_the_prompt_from_scratch(model, processor):
    """transformers' prompt reuse: a forward fills a DynamicCache with the prompt, then generate() on the prompt and
    more text with (a copy of) that cache: the tokens of generate() from scratch."""
    picture = image("image1.jpg")
    text = prompt(processor, [picture], "Describe it.")
    first = encode(processor, [picture], text, 4)
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**first, use_cache=True, **{CACHE_NAME: cache})
    more = encode(processor, [picture], text + "Sure", 4)
    options = dict(max_new_tokens=6, do_sample=False)
    scratch = model.generate(**more, **options)
    reused = model.generate(input_ids=more.input_ids, attention_mask=more.attention_mask, **options,
                            **{CACHE_NAME: copy.deepcopy(cache)})
    assert reused.tolist() == scratch.tolist()


def _turn_two(processor, first_out, question, pictures=()):
    follow = "<|im_end|>\n<|im_start|>user\n" + "".join("<image>\n" for _ in pictures) + question + \
        "<|im_end|>\n<|im_start|>assistant\n"
    encoded = processor(images=list(pictures) or None, text=follow, max_tiles=4, return_tensors="pt")
    return torch.cat([first_out, encoded.input_ids], dim=-1), encoded.get("pixel_values")


def test_a_cache_rebuilt_from_its_layers_is_refused_on_the_next_turn(model, processor):
    """A cache rebuilt by the caller from its layers (moved, serialised) has no record of the router's decisions: the
    next turn stops with an error naming the fix instead of running the full prompt against a shortened cache."""
    picture = image("image2.jpg")
    first = encode(processor, [picture], prompt(processor, [picture], "Describe it."), 4)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(**first, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    rebuilt = DynamicCache(config=model.config.get_text_config())
    for index, layer in enumerate(cache.layers):
        rebuilt.update(layer.keys.clone(), layer.values.clone(), index)
    conversation, _ = _turn_two(processor, out, "And the colours?")
    with pytest.raises(ValueError, match=r"no record of how the router shortened it.*copy\.deepcopy"):
        model.generate(input_ids=conversation, max_new_tokens=3, do_sample=False, **{CACHE_NAME: rebuilt})
    # the same cache as the model left it continues, as the conversation from scratch
    scratch = model.generate(input_ids=conversation, pixel_values=first.pixel_values, max_new_tokens=3,
                             do_sample=False)
    assert model.generate(input_ids=conversation, max_new_tokens=3, do_sample=False,
                          **{CACHE_NAME: cache}).tolist() == scratch.tolist()


def test_a_new_image_in_a_later_turn_is_routed_with_the_cached_tiles(model, processor):
    """Turn 2 brings a new image: the router ranks its tiles together with the cached ones (the scores the cache
    recorded), as the conversation from scratch does, and the answer equals that conversation's (turn 1: a flipped
    photo of 5 tiles; turn 2: img6, whose tiles the joint quantile all compresses, one kept alone)."""
    first_picture, second_picture = image("image1.jpg-flipped"), image("img6.jpg")
    first = encode(processor, [first_picture], prompt(processor, [first_picture], "Describe it."), 4)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(**first, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    conversation, new_pixels = _turn_two(processor, out, "And this one?", [second_picture])
    scratch_pixels = torch.cat([first.pixel_values, new_pixels])
    routing = model.model.route(conversation, scratch_pixels)
    assert routing.compressed[-3:].tolist() == [True, True, True]  # alone, img6 keeps one tile
    scratch = model.generate(input_ids=conversation, pixel_values=scratch_pixels, max_new_tokens=4, do_sample=False)
    turn = model.generate(input_ids=conversation, pixel_values=new_pixels, max_new_tokens=4, do_sample=False,
                          **{CACHE_NAME: cache})
    assert turn.tolist() == scratch.tolist()


def test_a_new_image_that_changes_a_cached_tiles_decision_reroutes_or_is_refused(model, processor):
    """image1 then image2 (the golden fixture's two-image case: image1's tile 3 is compressed alone and kept beside
    image2): with only the new tiles the turn is refused, naming the fix; with every image's tiles the cache is
    refilled from the start and the answer is the conversation's from scratch."""
    first_picture, second_picture = image("image1.jpg"), image("image2.jpg")
    first = processor(images=[first_picture], text=prompt(processor, [first_picture], "Describe it."), max_tiles=6,
                      return_tensors="pt")
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(**first, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    follow = processor(images=[second_picture], text="<|im_end|>\n<|im_start|>user\n<image>\nAnd this?<|im_end|>\n"
                       "<|im_start|>assistant\n", max_tiles=6, return_tensors="pt")
    conversation = torch.cat([out, follow.input_ids], dim=-1)
    with pytest.raises(ValueError, match=r"change the router's decision on 1 tile\(s\) already in the cache"):
        model.generate(input_ids=conversation, pixel_values=follow.pixel_values, max_new_tokens=3, do_sample=False,
                       **{CACHE_NAME: copy.deepcopy(cache)})
    every = torch.cat([first.pixel_values, follow.pixel_values])
    scratch = model.generate(input_ids=conversation, pixel_values=every, max_new_tokens=3, do_sample=False)
    assert model.generate(input_ids=conversation, pixel_values=every, max_new_tokens=3, do_sample=False,
                          **{CACHE_NAME: cache}).tolist() == scratch.tolist()


def test_a_later_turn_that_does_not_extend_the_cached_prompt_is_refused(model, processor):
    picture = image("image2.jpg")
    first = encode(processor, [picture], prompt(processor, [picture], "Describe it."), 4)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(**first, max_new_tokens=3, do_sample=False, **{CACHE_NAME: cache})
    other = out.clone()
    other[0, 5] += 1
    with pytest.raises(ValueError, match=r"does not start with the prompt the cache holds"):
        model.generate(input_ids=other, max_new_tokens=2, do_sample=False, **{CACHE_NAME: cache})


def test_a_forward_with_tiles_on_a_filled_cache_is_refused(model, processor):
    picture = image("image2.jpg")
    first = encode(processor, [picture], prompt(processor, [picture], "Describe it."), 4)
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**first, use_cache=True, **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match=r"A forward given pixel_values on a cache that already holds tokens"):
            model(**first, **{CACHE_NAME: cache})


# ------------------------------------------------------------------------------------- 6. max_length, min_length


def test_max_length_and_min_length_count_the_prompt_as_given(model, processor):
    """``max_length = prompt + 5`` gives 5 new tokens, as for any model (the router's prompt is shorter);
    ``min_length = prompt + 4`` with the first answer token as eos gives the tokens ``min_new_tokens=4`` gives."""
    picture = image("image1.jpg")
    inputs = encode(processor, [picture], prompt(processor, [picture], "Describe it."), 4)
    length = inputs.input_ids.shape[1]
    bounded = model.generate(**inputs, max_length=length + 5, do_sample=False)
    assert bounded.shape[1] == length + 5
    assert bounded.tolist() == model.generate(**inputs, max_new_tokens=5, do_sample=False).tolist()
    eos = int(bounded[0, length])
    at_least = model.generate(**inputs, min_length=length + 4, max_new_tokens=8, eos_token_id=eos, do_sample=False)
    assert at_least.tolist() == model.generate(**inputs, min_new_tokens=4, max_new_tokens=8, eos_token_id=eos,
                                               do_sample=False).tolist()
    assert at_least.shape[1] >= length + 4


# ---------------------------------------------------------------------------------------------- 8. packed samples


def _packed(processor, samples):
    rows = [encode(processor, s[0], prompt(processor, s[0], s[1]) + s[2] + "<|im_end|>", 4) for s in samples]
    ids = torch.cat([r.input_ids for r in rows], dim=-1)
    positions = torch.cat([torch.arange(r.input_ids.shape[1]) for r in rows])[None]
    return rows, ids, positions, torch.cat([r.pixel_values for r in rows])


PACKED = [([image("image1.jpg")], "Describe it.", "A field."), ([image("image2.jpg")], "What is it?", "A road.")]


def test_packed_samples_with_an_attention_mask_are_routed_each_as_alone(model, processor):
    """Padding-free packing that keeps an all-ones mask (position ids restart per sample): each sample's decisions
    are its own (its own quantile) and its positions restart at 0, as without the mask."""
    rows, ids, positions, pixels = _packed(processor, PACKED)
    routing = model.model.route(ids, pixels, torch.ones_like(ids), positions)
    alone = [model.model.route(r.input_ids, r.pixel_values) for r in rows]
    assert routing.compressed.tolist() == sum((a.compressed.tolist() for a in alone), [])
    start = alone[0].input_ids.shape[1]
    assert routing.position_ids[0, start] == 0
    expected = torch.cat([torch.arange(a.input_ids.shape[1]) for a in alone])
    assert torch.equal(routing.position_ids[0], expected)
    without_mask = model.model.route(ids, pixels, None, positions)
    assert torch.equal(without_mask.position_ids, routing.position_ids)
    assert without_mask.compressed.tolist() == routing.compressed.tolist()


def test_packed_training_under_flash_attention_translates_the_boundaries(folder, processor):
    """DataCollatorWithFlattening's flash-attention boundaries (``cu_seq_lens_*``) on a packed row of two samples:
    after the router they name the shortened samples, so the loss is the loss of the two samples as a padded batch
    (transformers' flash-attention code, on the CPU stand-in of flash-attn's kernels)."""
    import fa_standin
    from transformers import DataCollatorWithFlattening

    fa_standin.register()
    model = InternVLXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation=fa_standin.NAME).eval()
    rows = [encode(processor, s[0], prompt(processor, s[0], s[1]) + s[2] + "<|im_end|>", 4) for s in PACKED]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": r.input_ids[0].tolist(), "labels": r.input_ids[0].tolist()} for r in rows])
    pixels = torch.cat([r.pixel_values for r in rows])
    fa_standin.CALLS.clear()
    with torch.no_grad():
        loss = model(**packed, pixel_values=pixels).loss
    routed = [model.model.route(r.input_ids, r.pixel_values).input_ids.shape[1] for r in rows]
    assert [c["cu_seqlens_q"] for kind, c in fa_standin.CALLS if kind == "varlen"][0] == [0, routed[0],
                                                                                         sum(routed)]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    padded = processor(images=[s[0][0] for s in PACKED], text=[prompt(processor, s[0], s[1]) + s[2] + "<|im_end|>"
                                                                for s in PACKED],
                       max_tiles=4, padding=True, return_tensors="pt")
    labels = padded.input_ids.masked_fill(padded.attention_mask == 0, -100)
    with torch.no_grad():
        expected = model(**padded, labels=labels).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ 10-11. settings, graph


def test_a_threshold_set_in_python_is_checked_where_it_is_used(model, processor):
    picture = image("image2.jpg")
    inputs = encode(processor, [picture], prompt(processor, [picture], "Describe it."), 4)
    model.config.vir.relative_threshold = 1.5
    try:
        with pytest.raises(ValueError, match=r"config\.vir\.relative_threshold must be a number in \[0, 1\]"):
            model(**inputs)
        with pytest.raises(ValueError, match=r"config\.vir\.relative_threshold must be"):
            model.generate(**inputs, max_new_tokens=2)
    finally:
        model.config.vir.relative_threshold = 0.1


@pytest.mark.parametrize("routed", ["none compressed", "mixed"])
def test_every_trained_projector_gets_a_gradient_whatever_the_router_decides(model, processor, routed):
    """A training step where the router compresses no tile still gives the 64-token projector a gradient (of 0), so
    DDP and ZeRO find every trained parameter in the graph; with some compressed, both projectors' are nonzero."""
    student = copy.deepcopy(model).train()
    picture = image("image2.jpg")
    text = prompt(processor, [picture], "Describe it.") + "A road.<|im_end|>"
    inputs = encode(processor, [picture], text, 1 if routed == "none compressed" else 4)
    loss = student(**inputs, labels=inputs.input_ids).loss
    loss.backward()
    projectors = {name: p for name, p in student.named_parameters()
                  if name.startswith(("model.multi_modal_projector.", "model.vir.projector.")) and p.requires_grad}
    assert projectors and all(p.grad is not None for p in projectors.values())
    small = [p.grad for name, p in projectors.items() if name.startswith("model.vir.projector.")]
    assert any(bool(g.abs().sum() > 0) for g in small) == (routed == "mixed")


# ------------------------------------------------------------------------------------- 9. conversion of a config


def _flash_copy(tmp_path, edit):
    src = golden.fixture_path(FLASH, "config.json").parent
    target = tmp_path / "src"
    shutil.copytree(src, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("keys", [("flash_mode",), ("flash_mode", "flash_relative_threshold",
                                                   "flash_absolute_threshold")], ids=["flash_mode", "every-key"])
def test_a_flash_folder_without_flash_mode_converts_with_the_router_off_as_the_reference_reads_it(keys, tmp_path):
    """OpenGVLab's code reads ``getattr(config, "flash_mode", False)``: no key, router off (its weights kept, as the
    reference builds them), said at conversion; the converted model answers as the reference's flash-off run."""
    from internvlx_hf.conversion import convert

    source = _flash_copy(tmp_path, lambda c: [c.pop(k) for k in keys])
    report = convert(source, tmp_path / "out", progress=False)
    assert report.vir["enabled"] is False
    assert "no flash_mode" in str(report)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vir"]["enabled"] is False
    ref = load_file(str(golden.fixture_path(FLASH, "reference.compact.safetensors")))
    converted = InternVLXForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    processor = InternVLXProcessor.from_pretrained(tmp_path / "out")
    meta = json.loads(golden.fixture_path(FLASH, "reference.json").read_text())
    inputs = processor(images=[image("image1.jpg")], text=meta["cases"]["main"]["prompt_with_image_tag"],
                       max_tiles=6, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits[0, -1], ref["normal.logits_last"], atol=1e-4, rtol=0)


def test_flash_mode_false_without_thresholds_converts_as_the_reference_runs_it(tmp_path):
    """``flash_mode: false`` and no thresholds: the reference runs (it reads them only with flash_mode on); the
    conversion keeps the router off, with the default thresholds said."""
    from internvlx_hf.conversion import convert

    def edit(config):
        config.update(flash_mode=False)
        config.pop("flash_relative_threshold")
        config.pop("flash_absolute_threshold")

    report = convert(_flash_copy(tmp_path, edit), tmp_path / "out", progress=False)
    assert report.vir["enabled"] is False
    assert "thresholds" in str(report)


def test_a_config_without_ps_version_is_refused_as_the_references_v1(tmp_path):
    """InternVLChatConfig's default ``ps_version`` is 'v1' (a transposed pixel shuffle): a config without the key is
    not taken as v2."""
    from internvlx_hf.conversion import ConversionError, convert

    with pytest.raises(ConversionError, match=r"has no ps_version.*'v1'"):
        convert(_flash_copy(tmp_path, lambda c: c.pop("ps_version")), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_router_config_with_another_select_layer_is_refused(folder):
    from internvlx_hf import InternVLXConfig

    config = json.loads((folder / "config.json").read_text())
    config["select_layer"] = -2
    with pytest.raises(ValueError, match=r"select_layer=-2 with vir.*reads the ViT's last layer"):
        InternVLXConfig(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})


# ---------------------------------------------------------------------------------------------- 7. quantized loads


def test_a_4bit_flash_model_keeps_its_router_in_full_precision_and_routes_as_the_full_one(folder, model, processor):
    """4-bit with the vision tower kept: the router (pooling, gate, 64-token projector) is not quantized, so its
    scores and decisions are the full-precision model's."""
    pytest.importorskip("bitsandbytes")
    from internvlx_hf.quantization import bitsandbytes_config, check_kept_modules, quantized_linear_names

    quantization = bitsandbytes_config(4, model.config, keep_vision_tower=True)
    assert "model.vir" in quantization.llm_int8_skip_modules
    quantized = InternVLXForConditionalGeneration.from_pretrained(folder, quantization_config=quantization).eval()
    check_kept_modules(quantized, quantization.llm_int8_skip_modules)
    assert quantized_linear_names(quantized) and not any(n.startswith("model.vir") for n in
                                                         quantized_linear_names(quantized))
    pictures = [image("image1.jpg"), image("img6.jpg")]
    inputs = encode(processor, pictures, prompt(processor, pictures, "Compare them."), 6)
    full = model.model.route(inputs.input_ids, inputs.pixel_values)
    four = quantized.model.route(inputs.input_ids, inputs.pixel_values)
    torch.testing.assert_close(four.scores, full.scores, atol=1e-6, rtol=0)
    assert four.compressed.tolist() == full.compressed.tolist()


def test_qlora_trains_a_flash_model(folder, tmp_path, capsys):
    """`internvlx train --preset qlora` on a Flash folder: the 64-token projector trains in full beside the adapters
    (it is no longer a 4-bit layer in peft's modules_to_save), the router's pooling and gate stay frozen."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from internvlx_hf.cli import main

    rows = th.colour_rows(tmp_path / "images", 4, size=(896, 448))
    th.write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "meta.json").write_text(json.dumps({"colours": {
        "root": str(tmp_path / "images"), "annotation": str(tmp_path / "rows.jsonl"), "data_augment": False,
        "repeat_time": 1, "max_dynamic_patch": 2}}))
    out = tmp_path / "out"
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "meta.json"), "--preset", "qlora",
                 "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no", "--use_cpu", "--report_to",
                 "none", "--seed", "0", "--disable_tqdm", "true", "--per_device_train_batch_size", "2",
                 "--learning_rate", "1e-3"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters (preset qlora)" in printed
    source, trained = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(trained[k], source[k]) for k in source if k.startswith(("model.vir.pooling.",
                                                                                   "model.vir.gating.")))
    assert any(not torch.equal(trained[k], source[k]) for k in source if k.startswith("model.vir.projector."))


# ------------------------------------------------------------------------------------------- TRL's GRPO and DPO


class _FirstScoring:
    """Records the first forward of ``model`` that TRL scores with its fused LM head (its inputs as given, its
    per-token log-probs): at step 0, before any optimizer step."""

    def __init__(self, model):
        self.inputs = self.log_probs = None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs):
        if self.inputs is None and kwargs.get("fused_lm_head"):
            self.inputs = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}

    def _after(self, module, args, kwargs, output):
        if self.log_probs is None and kwargs.get("fused_lm_head"):
            self.log_probs = output.log_probs.detach().clone()
            for handle in self._handles:
                handle.remove()


def _assert_each_row_scores_as_alone(reference, scoring, image_token_id, per_tile):
    """Every labelled token's log-prob in the recorded batch equals the same row run alone (its unpadded columns and
    its tiles) through ``reference`` (a copy of the model at step 0), 1e-4."""
    inputs, log_probs = scoring.inputs, scoring.log_probs
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    tiles = ((ids == image_token_id).sum(-1) // per_tile).tolist()
    pixels = inputs["pixel_values"].split(tiles)
    assert log_probs.shape[1] == ids.shape[1] - 1  # TRL's layout: one per next token of the given columns
    checked = 0
    for row in range(ids.shape[0]):
        columns = mask[row].bool()
        alone_ids, alone_labels = ids[row, columns][None], labels[row, columns][None]
        with torch.no_grad():
            logits = reference(input_ids=alone_ids, pixel_values=pixels[row]).logits[0, :-1]
        targets = alone_labels[0, 1:]
        scored = targets != -100
        expected = torch.gather(F.log_softmax(logits.float(), -1), 1, targets.clamp(min=0)[:, None])[:, 0][scored]
        batch_scored = labels[row, 1:] != -100
        torch.testing.assert_close(log_probs[row][batch_scored], expected, atol=1e-4, rtol=0)
        checked += int(scored.sum())
    assert checked > 0


def _rl_rows():
    questions = [("image1.jpg", "Describe it.", "A field.", "A cat on a mat, sleeping."),
                 ("image2.jpg", "What colour is the sky in this picture?", "Blue.", "Green, I think.")]
    return [({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}, image(name),
             chosen, rejected) for name, question, chosen, rejected in questions]


def _trainer_model(folder):
    model = InternVLXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.model.vir.projector.dropout.p = 0.0  # train mode, but comparable with an eval run alone
    return model


@pytest.mark.parametrize("kind", ["GRPO"])
def test_grpo_trains_a_flash_model_and_scores_each_completion_as_alone(kind, folder, processor, tmp_path):
    """TRL's GRPOTrainer (transformers' generate for the rollouts, the fused LM head for the scores) on a converted
    Flash checkpoint: two steps run, and at step 0 every completion token's log-prob in the left-padded prompt +
    right-padded completion batch equals that sample's alone. (RLOO scores the same way, but passes every processor
    output to its scoring function, which takes no `num_patches`: docs/flash.md.)"""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = _trainer_model(folder)
    reference = copy.deepcopy(model).eval()
    data = datasets.Dataset.from_list([{"prompt": [message], "image": picture}
                                       for message, picture, _, _ in _rl_rows()])
    # bf16=False: TRL's configs default to bf16, which autocasts on a CPU too; the comparison is in float32
    args = getattr(trl, f"{kind}Config")(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=4, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, learning_rate=1e-4, seed=0, bf16=False)
    trainer = getattr(trl, f"{kind}Trainer")(
        model=model, reward_funcs=lambda completions, **kw: [float(len(str(c))) for c in completions], args=args,
        train_dataset=data, processing_class=processor)
    scoring = _FirstScoring(trainer.model)
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert scoring.inputs["input_ids"].shape[0] == 2
    _assert_each_row_scores_as_alone(reference, scoring, model.config.image_token_id, model.config.image_seq_length)


def test_dpo_trains_a_flash_model_and_scores_each_response_as_alone(folder, processor, tmp_path):
    """TRL's DPOTrainer on a converted Flash checkpoint (chosen and rejected side by side, right-padded, the images
    repeated): two steps run, and at step 0 every response token's log-prob equals that pair member's alone (DPO
    multiplies them by its given-width completion masks, which the outputs' given columns match)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = _trainer_model(folder)
    reference = copy.deepcopy(model).eval()
    data = datasets.Dataset.from_list([
        {"prompt": [message], "images": [picture],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}
        for message, picture, chosen, rejected in _rl_rows()])
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                         use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
                         learning_rate=1e-4, max_length=None, seed=0, bf16=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
    scoring = _FirstScoring(trainer.model)
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert scoring.inputs["input_ids"].shape[0] == 4  # chosen and rejected of both pairs
    _assert_each_row_scores_as_alone(reference, scoring, model.config.image_token_id, model.config.image_seq_length)


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_a_trainer_with_packed_batches_gives_the_loss_of_the_padded_batch(model, processor, tmp_path, reduction):
    """transformers' `Trainer` (and `InternVLXTrainer` with per-sample weights) with `InternVLXDataCollator(packing=
    True)`: the first step's loss on two samples packed in one row (the router's decisions per sample) is the loss
    of the same samples padded in two rows, computed on the untrained model."""
    from transformers import Trainer

    from internvlx_hf.training import InternVLXDataCollator, InternVLXTrainer

    rows = []
    for index, (name, question, answer) in enumerate([("image1.jpg", "Describe it.", "A field under a sky."),
                                                     ("image2.jpg", "What is it?", "A road.")]):
        path = tmp_path / f"{index}.jpg"
        image(name).save(path)
        rows.append({"image": str(path), "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                           {"from": "gpt", "value": answer}]})
    four = copy.deepcopy(processor)
    four.image_processor.max_tiles = 4
    padded = InternVLXDataCollator(four, loss_reduction=reduction)(rows)
    student = copy.deepcopy(model).train()
    student.model.vir.projector.dropout.p = 0.0  # the 64-token projector's dropout, off to compare two forwards
    with torch.no_grad():
        expected = InternVLXTrainer.compute_loss(
            InternVLXTrainer(copy.deepcopy(student), th.training_args(tmp_path / "x", remove_unused_columns=False)),
            copy.deepcopy(student), padded) if reduction == "sample" else copy.deepcopy(student)(**padded).loss
    kind = Trainer if reduction == "token" else InternVLXTrainer
    trainer = kind(student, th.training_args(tmp_path / "out", max_steps=1, remove_unused_columns=False,
                                             per_device_train_batch_size=2),
                   train_dataset=rows, data_collator=InternVLXDataCollator(four, packing=True,
                                                                            loss_reduction=reduction))
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([float(expected)], abs=1e-4)
