"""LVTC inside the LLM forward (issue 4): layouts, KV cache, padding, packing, gradients, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvlx_hf import InternVLXConfig
from internvlx_hf.modeling.lvtc import build_lvtc_layout
from internvlx_hf.modeling.lvtc_cache import InternVLXLVTCCache, InternVLXLVTCStaticCache

from test_modeling import _remote_code_check, reported_max_diff, run_with_checkpointing
from tiny import (
    IMAGE_TOKEN_ID,
    PAD_ID,
    assert_greedy_with_cache_equals_recomputation,
    assert_left_padded_batch_equals_alone,
    greedy_with_cache,
    left_pad,
    pixels,
    prompt_ids,
    tiny_model,
)

# Two LVTC set-ups on the 4-layer tiny LLM: MLP projectors with one extra LR projector, and PVTC LR/HR
# projectors with bilinear upsampling and two extra LR projectors injected before layers 0 and 1.
LVTC_MLP = dict(projector="mlp", lvtc={"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1})
LVTC_PVTC = dict(projector="pvtc", lvtc={"expand_layer": 3, "num_lr_projectors": 3, "inject_start": 0,
                                         "upsample_mode": "bilinear", "hr_projector_type": "pvtc"})
SETUPS = {"mlp": LVTC_MLP, "pvtc": LVTC_PVTC}


# ----------------------------------------------------------------------------------------------------------- config


def test_lvtc_defaults_follow_the_paper():
    config = InternVLXConfig(lvtc={})
    assert config.lvtc.expand_layer == 18  # 3/4 of InternVL2-2B's 24 layers
    assert config.lvtc.lr_downsample_ratio == 0.5 and config.lvtc.hr_downsample_ratio == 1.0
    assert config.lvtc.num_lr_projectors == 1 and config.lvtc.injection_layers == []
    assert config.image_seq_length == 256  # input ids stay in the short (LR) layout
    assert config.hr_tokens_per_tile == 1024 and InternVLXConfig().hr_tokens_per_tile is None
    assert InternVLXConfig(downsample_ratio=0.25, lvtc={"hr_downsample_ratio": 0.5}).hr_tokens_per_tile == 256


@pytest.mark.parametrize("lvtc,message", [
    ({"expand_layer": 0}, r"expand_layer=0 must lie in \[1, 24\]"),
    ({"expand_layer": 25}, r"expand_layer=25 must lie in \[1, 24\]"),
    ({"expand_layer": 4, "num_lr_projectors": 3, "inject_start": 3}, r"injection layers \[3, 4\] .* \[4\] do not"),
    ({"hr_downsample_ratio": 0.5}, "must expand each tile from 16x16"),
    ({"hr_downsample_ratio": 0.3}, "hr_downsample_ratio=0.3 does not divide the 32x32 ViT grid"),
    ({"lr_downsample_ratio": 0.25}, "differs from downsample_ratio=0.5"),
    ({"lr_projector_type": "pvtc"}, "differs from projector_type='mlp'"),
    ({"upsample_mode": "bicubic"}, "upsample_mode must be one of"),
    ({"hr_scale": "layernorm"}, "hr_scale must be one of"),
    ({"num_lr_projectors": 0}, "num_lr_projectors must be >= 1"),
    ({"expand": 3}, r"Unknown lvtc option\(s\) \['expand'\]"),
])
def test_lvtc_values_are_validated(lvtc, message):
    with pytest.raises(ValueError, match=message):
        InternVLXConfig(lvtc=lvtc)


# ----------------------------------------------------------------------------------------------------------- layout


def test_layout_expands_tiles_and_repads_on_the_left():
    # row 0: 1 tile; row 1: 2 tiles, right-padded by one token. 4 LR -> 16 HR tokens per tile.
    image = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                          [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1] * 10, [1] * 9 + [0]])
    positions = torch.arange(10)[None].expand(2, -1)
    layout = build_lvtc_layout(image, mask, positions, 4, 16)
    assert layout.long_len == 10 + 2 * 12
    assert layout.long_mask[0].tolist() == [0] * 12 + [1] * 22  # row 0 grew by 12 slots less than row 1
    assert layout.long_mask[1].tolist() == [1] * 33 + [0]
    assert layout.position_offset.tolist() == [12, 24]
    # row 0: text token 5 (after its tile) sits 12 positions later than in the short layout
    assert layout.long_position_ids[0, 12 + 1 + 16].item() == 5 + 12
    assert layout.long_position_ids[1, 1:17].tolist() == list(range(1, 17))


def test_layout_positions_restart_with_packed_sequences():
    # one row, two packed sequences (positions restart at 0), each with one tile
    image = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    layout = build_lvtc_layout(image, None, positions, 4, 16)
    expected_first = list(range(0, 17)) + [17]
    expected_second = list(range(0, 17)) + [17]
    assert layout.long_position_ids[0].tolist() == expected_first + expected_second


def test_layout_translates_flash_attention_varlen_boundaries():
    # one packed row: [text, tile, text] (6 tokens) + [text, text] (2 tokens) + [tile, text] (5 tokens)
    image = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3, 4]])
    layout = build_lvtc_layout(image, None, positions, 4, 16)
    cu = torch.tensor([0, 6, 8, 13], dtype=torch.int32)
    long = layout.varlen_kwargs({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu})
    assert long["cu_seq_lens_q"].tolist() == [0, 18, 20, 37] and long["cu_seq_lens_q"].dtype == torch.int32
    assert long["max_length_q"] == 18 and long["max_length_k"] == 18
    with pytest.raises(ValueError, match=r"cu_seq_lens_k \[0, 6, 8\] does not describe the flattened batch of 1 x "
                                         r"13 tokens: it must rise from 0 to 13"):
        layout.varlen_kwargs({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu[:-1]})


def test_a_decoding_step_refuses_packed_sequence_boundaries():
    model = tiny_model(**LVTC_MLP)
    ids = torch.tensor([prompt_ids(1, seed=87)])
    cache = model(input_ids=ids, pixel_values=pixels(1, seed=88), use_cache=True).past_key_values
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="an LVTC decoding step .* takes none"):
        model(input_ids=torch.tensor([[5]]), past_key_values=cache, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_layout_refuses_runs_that_split_a_tile():
    # 8 image tokens = 2 tiles of 4 in all, but as runs of 6 and 2: one tile would straddle two images
    image = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"Row 0 has a run of 6 image tokens at position 1, which is not a whole"):
        build_lvtc_layout(image, None, torch.arange(11)[None], 4, 16)


# ------------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
@pytest.mark.parametrize("tiles", [1, 3])
def test_greedy_with_cache_equals_recomputation(setup, attn, tiles):
    model = tiny_model(**SETUPS[setup], attn=attn)
    ids, pv = prompt_ids(tiles, seed=tiles), pixels(tiles, seed=10 + tiles)
    assert_greedy_with_cache_equals_recomputation(model, ids, pv, 20)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
def test_left_padded_batch_of_1_2_3_tiles_equals_each_alone(setup, attn):
    model = tiny_model(**SETUPS[setup], attn=attn)
    prompts = [prompt_ids(t, seed=20 + t, n_text=3 + 2 * t) for t in (1, 2, 3)]
    images = [pixels(t, seed=30 + t) for t in (1, 2, 3)]
    assert_left_padded_batch_equals_alone(model, prompts, images, steps=8)


@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
def test_text_only_batches_equal_the_plain_llm(setup):
    """No image anywhere: nothing to expand, so LVTC must equal the model without LVTC (same weights)."""
    model = tiny_model(**SETUPS[setup])
    plain = tiny_model(SETUPS[setup]["projector"])
    plain.load_state_dict(model.state_dict(), strict=False)
    ids, mask = left_pad([[1, 5, 6, 7, 8], [1, 9, 10]])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    expected = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_beam_search_reorders_the_lvtc_state():
    model = tiny_model(**LVTC_PVTC)
    prompts = [prompt_ids(1, seed=40, n_text=2), prompt_ids(2, seed=41, n_text=6)]
    images = [pixels(1, seed=42), pixels(2, seed=43)]
    ids, mask = left_pad(prompts)
    batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images), max_new_tokens=6,
                           num_beams=3, do_sample=False)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = model.generate(input_ids=torch.tensor([prompt]), pixel_values=image, max_new_tokens=6, num_beams=3,
                               do_sample=False)
        assert batch[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


@pytest.mark.parametrize("lvtc", [None, LVTC_PVTC["lvtc"]])
def test_several_returned_sequences_keep_their_own_tiles(lvtc):
    """num_return_sequences / beams repeat each prompt; its tiles must be repeated as a block with it."""
    model = tiny_model("pvtc", lvtc=lvtc)
    prompts = [prompt_ids(2, seed=44, n_text=3), prompt_ids(1, seed=45, n_text=6)]
    images = [pixels(2, seed=46), pixels(1, seed=47)]
    ids, mask = left_pad(prompts)
    sampled = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images), do_sample=True,
                             top_k=1, num_return_sequences=2, max_new_tokens=6)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        greedy = greedy_with_cache(model, prompt, image, 6)
        assert sampled[2 * row, ids.shape[1]:].tolist() == greedy
        assert sampled[2 * row + 1, ids.shape[1]:].tolist() == greedy


@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
@pytest.mark.parametrize("beams", [1, 2])
def test_static_cache_generation_equals_the_dynamic_cache(setup, beams):
    """``cache_implementation="static"``: a left-padded batch of prompts with 1-3 tiles (LVTC with extra LR
    projectors) gives the dynamic cache's tokens, greedy and with beam search (the LVTC state follows the beams); the
    logits of greedy steps agree to 1e-5."""
    model = tiny_model(**SETUPS[setup], attn="sdpa")
    prompts = [prompt_ids(2, seed=52, n_text=3), prompt_ids(1, seed=53, n_text=9), prompt_ids(3, seed=54, n_text=1)]
    ids, mask = left_pad(prompts)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pixels(2, 55), pixels(1, 56),
                                                                              pixels(3, 57)]),
                  max_new_tokens=6, do_sample=False, num_beams=beams, output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(**kwargs)
    static = model.generate(**kwargs, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    if beams == 1:
        for step, (a, b) in enumerate(zip(static.logits, dynamic.logits)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")
    cache = static.past_key_values
    assert isinstance(cache, InternVLXLVTCStaticCache)
    # layers < k: prompt + new tokens (the last one is never cached); layers >= k: + 12 slots per tile of the row
    # with the most tiles (the others are re-padded on the left)
    short = ids.shape[1] + 5
    k = SETUPS[setup]["lvtc"]["expand_layer"]
    assert [layer.max_cache_len for layer in cache.layers] == [short] * k + [short + 3 * 12] * (4 - k)


def test_static_cache_passed_in_is_sized_by_the_prefill_and_reusable_after_reset():
    """A transformers `StaticCache` handed to an LVTC prefill becomes an `InternVLXLVTCStaticCache` in place; its
    ``max_cache_len`` counts input ids, the long layers get the prompt's extra visual slots on top. A filled cache
    without its LVTC state is refused; after reset() it serves a new prompt."""
    from transformers import StaticCache

    model = tiny_model(**LVTC_MLP, attn="sdpa")
    ids, pv = torch.tensor([prompt_ids(2, seed=58)]), pixels(2, seed=59)
    expected = greedy_with_cache(model, ids[0].tolist(), pv, 4)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=40)
    out = model.generate(input_ids=ids, pixel_values=pv, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == expected
    assert type(cache) is InternVLXLVTCStaticCache
    assert [layer.max_cache_len for layer in cache.layers] == [40, 40, 40 + 24, 40 + 24]
    assert int(cache.get_seq_length()) == ids.shape[1] + 3
    cache.lvtc_state = None
    with pytest.raises(ValueError, match="static cache holds tokens but no LVTC state"):
        model(input_ids=ids, pixel_values=pv, past_key_values=cache)
    cache.reset()
    out = model.generate(input_ids=ids, pixel_values=pv, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == expected


def test_static_cache_with_a_sliding_window_is_refused_with_a_clear_message():
    model = tiny_model("mlp", lvtc=LVTC_MLP["lvtc"], llm="mistral", text={"sliding_window": 8})
    with pytest.raises(NotImplementedError, match="LVTC's static cache holds full-attention layers only"):
        model.generate(input_ids=torch.tensor([prompt_ids(1, seed=48)]), pixel_values=pixels(1, seed=49),
                       max_new_tokens=2, cache_implementation="static")


def test_generate_uses_the_lvtc_cache_and_decode_rejects_foreign_caches():
    model = tiny_model(**LVTC_MLP)
    ids, pv = torch.tensor([prompt_ids(1, seed=50)]), pixels(1, seed=51)
    out = model(input_ids=ids, pixel_values=pv, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, InternVLXLVTCCache)
    # layers below k cache the short layout, layers from k the long one (+12 slots for one tile)
    assert cache.layers[0].keys.shape[-2] == ids.shape[1]
    assert cache.layers[2].keys.shape[-2] == ids.shape[1] + 12
    from transformers import DynamicCache

    foreign = DynamicCache(config=model.config.get_text_config())
    model(input_ids=ids, pixel_values=pv, past_key_values=foreign)
    foreign.lvtc_state = None
    with pytest.raises(ValueError, match="no LVTC state"):
        model(input_ids=torch.tensor([[5]]), past_key_values=foreign)


# -------------------------------------------------------------------------------------------- padding and packing


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padded_training_batch_equals_each_alone(attn):
    model = tiny_model(**LVTC_PVTC, attn=attn)
    prompts = [prompt_ids(2, seed=60, n_text=2), prompt_ids(1, seed=61, n_text=9)]
    images = [pixels(2, seed=62), pixels(1, seed=63)]
    length = max(map(len, prompts))
    ids = torch.tensor([p + [PAD_ID] * (length - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p in prompts])
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images)).logits
    assert logits.shape[:2] == ids.shape
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = model(input_ids=torch.tensor([prompt]), pixel_values=image).logits[0]
        torch.testing.assert_close(logits[row, : len(prompt)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_sequences_equal_each_alone(attn):
    model = tiny_model(**LVTC_MLP, attn=attn)
    first, second = prompt_ids(1, seed=70, n_text=3), prompt_ids(2, seed=71, n_text=4)
    images = [pixels(1, seed=72), pixels(2, seed=73)]
    ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    packed = model(input_ids=ids, position_ids=positions, pixel_values=torch.cat(images), use_cache=False).logits[0]
    for offset, prompt, image in ((0, first, images[0]), (len(first), second, images[1])):
        alone = model(input_ids=torch.tensor([prompt]), pixel_values=image, use_cache=False).logits[0]
        torch.testing.assert_close(packed[offset: offset + len(prompt)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lvtc", [None, LVTC_MLP["lvtc"]], ids=["plain", "lvtc"])
def test_packed_training_forward_needs_no_use_cache_flag(lvtc):
    """In train mode the model builds no cache unless asked: a cache would switch off transformers' detection of
    packed sequences, and packed rows (position resets, no mask) would attend across samples."""
    model = tiny_model(lvtc=lvtc).train()
    first, second = prompt_ids(1, seed=78, n_text=3), prompt_ids(1, seed=79, n_text=5)
    images = [pixels(1, seed=80), pixels(1, seed=81)]
    ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    out = model(input_ids=ids, position_ids=positions, pixel_values=torch.cat(images))
    assert out.past_key_values is None
    for offset, prompt, image in ((0, first, images[0]), (len(first), second, images[1])):
        alone = model(input_ids=torch.tensor([prompt]), pixel_values=image).logits[0]
        torch.testing.assert_close(out.logits[0, offset: offset + len(prompt)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_in_a_batch_with_different_tile_counts_stay_apart(attn):
    """Row 0 packs [1-tile sequence | text-only sequence]; row 1 has 2 tiles, so row 0 is re-padded in the long
    layout. Without a mask, the sequences of row 0 must still not see each other (nor the padding)."""
    model = tiny_model(**LVTC_MLP, attn=attn)
    first, second = prompt_ids(1, seed=74, n_text=3), [1, 11, 12, 13, 14, 15, 16]
    other = prompt_ids(2, seed=75, n_text=len(first) + len(second) - 12)
    ids = torch.tensor([first + second, other])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second))), list(range(len(other)))])
    images = [pixels(1, seed=76), pixels(2, seed=77)]
    batch = model(input_ids=ids, position_ids=positions, pixel_values=torch.cat(images), use_cache=False).logits
    parts = ((0, 0, first, images[0]), (0, len(first), second, None), (1, 0, other, images[1]))
    for row, offset, prompt, image in parts:
        alone = model(input_ids=torch.tensor([prompt]), pixel_values=image, use_cache=False).logits[0]
        torch.testing.assert_close(batch[row, offset: offset + len(prompt)], alone, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- equivalences, grads


@pytest.mark.parametrize("projector", ["mlp", "pvtc"])
def test_never_expanding_with_one_projector_equals_the_plain_model(projector):
    plain = tiny_model(projector)
    lvtc = tiny_model(projector, lvtc={"expand_layer": 4, "num_lr_projectors": 1}, seed=1)
    assert not hasattr(lvtc.model, "lvtc_hr_projector")  # never expanded: no HR projector to run or to train
    lvtc.load_state_dict(plain.state_dict(), strict=True)
    ids, mask = left_pad([prompt_ids(1, seed=80), prompt_ids(2, seed=81, n_text=8)])
    pv = pixels(3, seed=82)
    torch.testing.assert_close(lvtc(input_ids=ids, attention_mask=mask, pixel_values=pv).logits,
                               plain(input_ids=ids, attention_mask=mask, pixel_values=pv).logits, atol=1e-6, rtol=0)


def test_never_expanding_leaves_no_unused_parameters():
    """With expand_layer = depth no HR projector exists, so one image batch gives every parameter a gradient and
    DistributedDataParallel needs no find_unused_parameters=True."""
    model = tiny_model("mlp", lvtc={"expand_layer": 4, "num_lr_projectors": 2}).train()
    ids = torch.tensor([prompt_ids(1, seed=85)])
    model(input_ids=ids, pixel_values=pixels(1, seed=86), labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    assert model.get_image_features(pixels(1, seed=86)).hr_features is None


@torch.no_grad()
def algorithm_1_by_hand(model, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1 written out on the model's own submodules (ViT, projectors, decoder layers, norm,
    head), for a left-padded batch: the extra LR projectors are added to the visual tokens before layers s, s+i, ...;
    at layer k every tile's 4 LR states (2x2) are upsampled 2D to 16 (4x4) plus the HR projector's 16 tokens; after
    the last layer each tile's HR states are averaged back to 2x2. Each layout (short, then long) is left-padded and
    masked on its own, positions count from every row's first real token (as generate() numbers them). Returns
    logits in the short layout; those at padding mean nothing."""
    m, lm = model.model, model.model.language_model
    lvtc = model.config.lvtc
    k, s, i, mode = lvtc.expand_layer, lvtc.inject_start, lvtc.inject_interval, lvtc.upsample_mode
    (batch, short_len), dim = ids.shape, lm.config.hidden_size
    vit = m.vision_tower(pixel_values=pixel_values).last_hidden_state
    v_lr = [m.multi_modal_projector(vit)] + [proj(vit) for proj in m.lvtc_lr_projectors]  # each (tiles, 4, dim)
    v_hr = m.lvtc_hr_projector(vit)  # (tiles, 16, dim)
    assert v_lr[0].shape[1:] == (4, dim) and v_hr.shape[1:] == (16, dim)
    vis_pos = ids == IMAGE_TOKEN_ID
    # tiles in the order of their <IMG_CONTEXT> runs, row by row: (row, first short slot) -> feature index
    firsts = [(row, int(j)) for row in range(batch) for j in vis_pos[row].nonzero()[::4, 0]]
    tile_at = {first: t for t, first in enumerate(firsts)}
    assert len(tile_at) == pixel_values.shape[0]

    def run(layer, hidden, valid):
        n = hidden.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :].bool()
        attention = torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min)[:, None]
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        return layer(hidden, attention_mask=attention, position_ids=positions,
                     position_embeddings=lm.rotary_emb(hidden, position_ids=positions))

    x = lm.embed_tokens(ids).clone()
    x[vis_pos] = v_lr[0].reshape(-1, dim)
    valid, extra_lr = mask, v_lr[1:]  # VLR after `del VLR[0]`
    for idx, layer in enumerate(lm.layers):
        if idx == k:
            rows = []
            for row in range(batch):
                seq = []
                for j in mask[row].nonzero()[:, 0].tolist():
                    if not vis_pos[row, j]:
                        seq.append(x[row, j])
                    elif (row, j) in tile_at:
                        grid = x[row, j:j + 4].reshape(1, 2, 2, dim).permute(0, 3, 1, 2)
                        up = F.interpolate(grid, size=(4, 4), mode=mode).permute(0, 2, 3, 1).reshape(16, dim)
                        hr = v_hr[tile_at[row, j]]
                        if lvtc.hr_scale == "rms":  # each HR token at its LR state's RMS
                            hr = hr * up.pow(2).mean(-1, keepdim=True).sqrt() / (hr.pow(2).mean(-1, keepdim=True)
                                                                                 + 1e-6).sqrt()
                        seq += list(up + hr)
                rows.append(torch.stack(seq))
            long_len = max(len(r) for r in rows)
            pads = [long_len - len(r) for r in rows]
            x = torch.stack([torch.cat([r.new_zeros(p, dim), r]) for r, p in zip(rows, pads)])
            valid = torch.tensor([[0] * p + [1] * (long_len - p) for p in pads])
        elif s <= idx < s + i * len(extra_lr) and (idx - s) % i == 0:
            x[vis_pos] += extra_lr[(idx - s) // i].reshape(-1, dim)
        x = run(layer, x, valid)

    if k < len(lm.layers):  # back to the short layout: text slots in order, HR tiles averaged 4x4 -> 2x2
        short = x.new_zeros(batch, short_len, dim)
        for row in range(batch):
            slot = pads[row]
            for j in mask[row].nonzero()[:, 0].tolist():
                if not vis_pos[row, j]:
                    short[row, j] = x[row, slot]
                    slot += 1
                elif (row, j) in tile_at:
                    hr = x[row, slot:slot + 16].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
                    short[row, j:j + 4] = F.avg_pool2d(hr, 2).permute(0, 2, 3, 1).reshape(4, dim)
                    slot += 16
            assert slot == x.shape[1]
        x = short
    return model.lm_head(lm.norm(x))


@pytest.mark.parametrize("tiles", [1, 2])
def test_forward_equals_algorithm_1_written_out(tiles):
    """One unpadded row with one image of 1 or 2 tiles; one extra LR projector before layer 1, k = 2."""
    model = tiny_model(**LVTC_MLP)
    assert (model.config.lvtc.expand_layer, model.config.lvtc.injection_layers) == (2, [1])
    ids, pv = torch.tensor([prompt_ids(tiles, seed=91)]), pixels(tiles, seed=92)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pv).logits
    expected = algorithm_1_by_hand(model, ids, torch.ones_like(ids), pv)
    assert got.shape == expected.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, hr_scale", [("nearest", "none"), ("bilinear", "none"), ("nearest", "rms")])
def test_left_padded_batch_with_two_images_equals_algorithm_1_written_out(mode, hr_scale):
    """Row 0: one image of 4 tiles; row 1: two images of 1 and 2 tiles with text between. Row 0 is the shorter in
    the input ids (left-padded by 1) but the longer from layer k (row 1 gets 11 slots of new left padding). Two
    extra LR projectors, s = 1, i = 2: added before layers 1 and 3; k = 5 of 6. Positions as generate() makes them
    (0 from the first real token)."""
    model = tiny_model("mlp", layers=6, lvtc={"expand_layer": 5, "num_lr_projectors": 3, "inject_start": 1,
                                              "inject_interval": 2, "upsample_mode": mode, "hr_scale": hr_scale})
    assert model.config.lvtc.injection_layers == [1, 3]
    first = prompt_ids(4, seed=140, n_text=2)
    second = prompt_ids(1, seed=141, n_text=2) + [7, 8] + [IMAGE_TOKEN_ID] * 8 + [9, 10, 11]
    assert (len(first), len(second), len(first) + 4 * 12, len(second) + 3 * 12) == (22, 23, 70, 59)
    ids, mask = left_pad([first, second])
    pv = pixels(7, seed=142)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    pixel_values=pv).logits
    expected = algorithm_1_by_hand(model, ids, mask, pv)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-5)


def test_expanding_changes_the_output():
    base = tiny_model(**LVTC_MLP)
    never = tiny_model("mlp", lvtc={**LVTC_MLP["lvtc"], "expand_layer": 4})
    missing, unexpected = never.load_state_dict(base.state_dict(), strict=False)
    assert missing == [] and unexpected and all(key.startswith("model.lvtc_hr_projector.") for key in unexpected)
    ids, pv = torch.tensor([prompt_ids(1, seed=83)]), pixels(1, seed=84)
    difference = base(input_ids=ids, pixel_values=pv).logits - never(input_ids=ids, pixel_values=pv).logits
    assert difference.abs().max() > 1e-3


@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
def test_every_lr_and_hr_projector_gets_gradients_and_checkpointing_matches(setup):
    def grads(checkpointing):
        model = tiny_model(**SETUPS[setup]).train()
        ids = torch.tensor([prompt_ids(2, seed=90)])
        inputs = dict(input_ids=ids, pixel_values=pixels(2, seed=91), labels=ids)
        if checkpointing:  # LVTC runs the LLM layers itself: each must still go through the checkpoint function
            calls = run_with_checkpointing(model, **inputs)
            assert {name: n for name, n in calls.items() if "language_model" in name} == {
                f"model.language_model.layers.{i}": 1 for i in range(4)}
        else:
            model(**inputs).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain = grads(False)
    projectors = ["model.multi_modal_projector.", "model.lvtc_hr_projector."] + [
        f"model.lvtc_lr_projectors.{j}." for j in range(SETUPS[setup]["lvtc"]["num_lr_projectors"] - 1)
    ]
    for prefix in projectors:
        params = {n: g for n, g in plain.items() if n.startswith(prefix)}
        assert params and all(g is not None and g.abs().sum() > 0 for g in params.values()), prefix
    checkpointed = grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_hidden_states_are_in_the_layout_each_layer_ran_on():
    model = tiny_model(**LVTC_MLP)  # k = 2 of 4 layers
    ids, pv = torch.tensor([prompt_ids(2, seed=95)]), pixels(2, seed=96)
    out = model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    short, long = ids.shape[1], ids.shape[1] + 2 * 12
    assert lengths == [short, short, long, long, short]
    assert out.logits.shape[1] == short


def test_flops_drop_with_lvtc_at_the_same_token_count():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model, ids, pv):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=ids, pixel_values=pv, logits_to_keep=1)
        return counter.get_total_flops()

    hr_plain = tiny_model("mlp", downsample_ratio=1.0)
    lvtc = tiny_model("mlp", lvtc={"expand_layer": 3})
    ids_lr = torch.tensor([prompt_ids(2, seed=97, n_text=4)])
    ids_hr = torch.tensor([prompt_ids(2, seed=97, n_text=4, tokens_per_tile=16)])
    pv = pixels(2, seed=98)
    assert flops(lvtc, ids_lr, pv) < flops(hr_plain, ids_hr, pv)


# ------------------------------------------------------------------------------------ benchmarks/bench_models.py


def _bench_models():
    from conftest import load_script

    return load_script("benchmarks/bench_models.py")


@pytest.mark.parametrize("workload", ["prefill", "padded prefill", "train"])
def test_benchmark_counts_sdpa_flops_as_eager_attention_does(workload):
    """FlopCounterMode misses CPU SDPA's fused kernels; with the benchmark's formulas for them the count under SDPA
    equals the count under eager attention (whose matmuls FlopCounterMode sees), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _bench_models()
    if workload == "padded prefill":  # 4D masks: SDPA's fused kernel with a mask
        ids, mask = left_pad([prompt_ids(1, seed=160), prompt_ids(2, seed=161, n_text=8)])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3, seed=162))
    else:
        ids = torch.tensor([prompt_ids(2, seed=160)])
        inputs = dict(input_ids=ids, pixel_values=pixels(2, seed=162), labels=ids)

    def run(model):
        if workload == "train":
            model.train()
            model(**inputs).loss.backward()
        else:
            with torch.no_grad():
                model(**inputs)

    counts = {attn: bench.count_flops(lambda: run(tiny_model(**LVTC_PVTC, attn=attn)))[0] for attn in ("eager", "sdpa")}
    assert counts["sdpa"] == counts["eager"]
    with FlopCounterMode(display=False) as plain_counter:  # torch's own formulas alone miss the attention
        run(tiny_model(**LVTC_PVTC, attn="sdpa"))
    assert plain_counter.get_total_flops() < counts["eager"]


def test_benchmark_runs_and_native_internvl_gives_our_logits(tmp_path):
    """A short run of the benchmark on the tiny preset: transformers' InternVLForConditionalGeneration with our MLP
    projector's weights computes exactly our logits; LVTC has the short layout's ids, fewer FLOPs than plain-1024 and
    caches the long layout from layer k only."""
    import json

    bench = _bench_models()
    out = tmp_path / "bench.json"
    data = bench.main(["--preset", "tiny", "--runs", "1", "--decode-tokens", "2", "--json", str(out),
                       "--models", "native-256,native-1024,plain-256,plain-1024,lvtc"])
    assert json.loads(out.read_text())["summary"].keys() == data["summary"].keys()
    summary = data["summary"]
    assert summary["plain-256"]["max_logit_diff_vs_native-256"] == 0.0
    assert summary["plain-1024"]["max_logit_diff_vs_native-1024"] == 0.0
    assert summary["lvtc"]["input_ids"] == summary["plain-256"]["input_ids"] == 64 + 256
    assert summary["plain-1024"]["input_ids"] == 64 + 1024
    for key in ("prefill_flops", "train_flops"):
        assert summary["plain-256"][key] < summary["lvtc"][key] < summary["plain-1024"][key]
    assert summary["lvtc"]["kv_cache"] == [  # 8-layer LLM, k = 6; 2 decoded tokens; 2 KV heads of 32 dims, float32
        {"layers": "0-5", "tokens_per_layer": 322, "bytes": 6 * 2 * 2 * 322 * 32 * 4},
        {"layers": "6-7", "tokens_per_layer": 1090, "bytes": 2 * 2 * 2 * 1090 * 32 * 4},
    ]
    assert {"lvtc / plain-1024 prefill time", "lvtc / plain-256 train step time"} <= data["checks"].keys()
    assert [row["ratio"]["tiles"] for row in data["rvtc"]] == [7, 7, 7, 7, 5]  # max_tiles 6 + thumbnail
    assert [row["area"]["tiles"] for row in data["rvtc"]] == [1, 7, 7, 1, 1]


# ---------------------------------------------------------------------------------------------------- save / load


def test_lvtc_survives_save_load_and_remote_code(tmp_path):
    model = tiny_model(**LVTC_PVTC)
    ids, pv = torch.tensor([prompt_ids(2, seed=99)]), pixels(2, seed=100)
    check = (
        "assert model.config.lvtc.expand_layer == 3 and model.config.lvtc.num_lr_projectors == 3\n"
        "out = model.generate(input_ids=t['ids'], pixel_values=t['pv'], max_new_tokens=6, do_sample=False)\n"
        "print('GEN', out[0, t['ids'].shape[1]:].tolist())\n"
    )
    stdout = _remote_code_check(tmp_path, model, ids, pv, extra_check=check)
    assert reported_max_diff(stdout) == 0.0  # bit-identical logits
    model.generation_config.eos_token_id = None
    expected = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False)
    assert f"GEN {expected[0, ids.shape[1]:].tolist()}" in stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU and flash-attn")
def test_flash_attention_2_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install internvlx-hf[flash])")
    sdpa = tiny_model(**LVTC_PVTC, attn="sdpa").cuda().to(torch.bfloat16)
    flash = tiny_model(**LVTC_PVTC, attn="flash_attention_2").cuda().to(torch.bfloat16)
    prompts = [prompt_ids(t, seed=110 + t, n_text=3 + 2 * t) for t in (1, 2, 3)]
    ids, mask = left_pad(prompts)
    pv = torch.cat([pixels(t, seed=120 + t) for t in (1, 2, 3)]).cuda().to(torch.bfloat16)
    kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=pv, max_new_tokens=8,
                  do_sample=False)
    assert flash.generate(**kwargs).tolist() == sdpa.generate(**kwargs).tolist()


# ------------------------------------------------------------------------------------------------- sliding window


def _sliding(lvtc, attn, window, seed=0):
    return tiny_model("mlp", lvtc=lvtc, llm="mistral", text={"sliding_window": window}, attn=attn, seed=seed)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_style_sliding_window_is_honoured(attn):
    """A text config with `sliding_window` but no `layer_types` (Mistral, Phi-3) slides the window in every layer:
    LVTC that never expands must equal the plain model, which builds its masks with the window."""
    plain = _sliding(None, attn, window=6)
    never = _sliding({"expand_layer": 4}, attn, window=6, seed=1)
    never.load_state_dict(plain.state_dict())
    ids, mask = left_pad([prompt_ids(1, seed=130, n_text=9), prompt_ids(2, seed=131, n_text=4)])
    pv = pixels(3, seed=132)
    expected = plain(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    torch.testing.assert_close(never(input_ids=ids, attention_mask=mask, pixel_values=pv).logits, expected,
                               atol=1e-6, rtol=0)
    unwindowed = _sliding(None, attn, window=None)
    unwindowed.load_state_dict(plain.state_dict())
    assert (unwindowed(input_ids=ids, attention_mask=mask, pixel_values=pv).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_greedy_with_cache_equals_recomputation(attn):
    """Layers from k slide the window over the long layout, in the prefill and in cached decoding alike."""
    model = _sliding(LVTC_MLP["lvtc"], attn, window=8)
    ids, pv = prompt_ids(2, seed=133), pixels(2, seed=134)
    assert_greedy_with_cache_equals_recomputation(model, ids, pv, 12)


# ------------------------------------------------------------------------------------------------------ cropping


def test_cropping_the_prompts_text_tail_then_decoding_equals_the_full_prefill():
    """Assisted / prompt-lookup decoding crop rejected draft tokens, also from the prefill (its first forward runs
    prompt + draft). Every layer loses the same number of slots; the LVTC state follows."""
    model = tiny_model(**LVTC_MLP)  # k = 2
    prompt, pv = prompt_ids(1, seed=135), pixels(1, seed=136)  # ... 4 image tokens, then 3 text tokens
    full = model(input_ids=torch.tensor([prompt]), pixel_values=pv, use_cache=True)
    cache = full.past_key_values
    cache.crop(-2)
    assert cache.layers[0].keys.shape[-2] == len(prompt) - 2
    assert cache.layers[2].keys.shape[-2] == len(prompt) - 2 + 12
    assert cache.lvtc_state.short_prefix_len == len(prompt) - 2 and cache.lvtc_state.text_tail == 1
    again = model(input_ids=torch.tensor([prompt[-2:]]), past_key_values=cache)
    torch.testing.assert_close(again.logits, full.logits[:, -2:], atol=1e-5, rtol=0)
    cache.crop(len(prompt) - 1)  # the older convention: the length to keep
    assert cache.layers[0].keys.shape[-2] == len(prompt) - 1 and cache.layers[3].keys.shape[-2] == len(prompt) + 11
    # 1 decoded token, then 2 of the prefill: only its last text token (after the earlier crop) may go
    with pytest.raises(ValueError, match=r"Cannot crop 2 prefill token\(s\) .* only the last 1 token\(s\) of the "
                                         r"prompt are text after its last image"):
        cache.crop(-3)


def test_hr_scale_rms_with_a_zero_hr_output_adds_nothing():
    """`internvlx convert --lvtc` zeroes the HR projector's output layer (an identity branch at first): with
    hr_scale="rms" that must stay an identity branch (no 0/0), with finite gradients."""
    lvtc = {"expand_layer": 1, "hr_scale": "rms"}
    model = tiny_model("mlp", lvtc=lvtc)
    reference = tiny_model("mlp", lvtc={"expand_layer": 1})
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        last = [mod for mod in m.model.lvtc_hr_projector.modules() if isinstance(mod, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    ids, pv = torch.tensor([prompt_ids(1, seed=31)]), pixels(1, seed=32)
    got = model(input_ids=ids, pixel_values=pv, labels=ids)
    torch.testing.assert_close(got.logits, reference(input_ids=ids, pixel_values=pv).logits, rtol=0, atol=0)
    got.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
