"""transformers' flash-attention integration code, run on CPU with LVTC (issue 14).

The kernels are `fa_standin`'s pure-torch `flash_attn_func` / `flash_attn_varlen_func`, registered under a name of
their own through transformers' `AttentionInterface` / `AttentionMaskInterface`; everything around them is
transformers' code, as with flash_attention_2 on a GPU: 2D masks instead of 4D ones, unpadding by the mask
(`_upad_input`), varlen boundaries from `position_ids` for a packed row, precomputed ``cu_seq_lens_*`` kwargs.
`fa_standin.CALLS` shows which of those branches ran. The test of the real kernel stays in test_lvtc.py (CUDA only).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening
from transformers.utils.generic import is_flash_attention_requested

import fa_standin
from tiny import PAD_ID, left_pad, pixels, prompt_ids, tiny_model

FLASH = fa_standin.register()

# Two LVTC set-ups on the 4-layer tiny LLM (4 LR -> 16 HR tokens per tile): MLP projectors, k = 2, one extra LR
# projector; PVTC LR/HR projectors, bilinear upsampling, k = 3, two extra LR projectors.
LVTC_MLP = dict(projector="mlp", lvtc={"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1})
LVTC_PVTC = dict(projector="pvtc", lvtc={"expand_layer": 3, "num_lr_projectors": 3, "inject_start": 0,
                                         "upsample_mode": "bilinear", "hr_projector_type": "pvtc"})
SETUPS = {"mlp": LVTC_MLP, "pvtc": LVTC_PVTC}
EXTRA_PER_TILE = 16 - 4


def cumulative(lengths):
    return [0] + list(itertools.accumulate(lengths))


def llm_calls():
    """The stand-in's calls from the LLM's (causal) layers; the vision tower's attention is not causal."""
    return [(kind, call) for kind, call in fa_standin.CALLS if call["causal"]]


# ------------------------------------------------------------------------------------------------ the stand-in


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(7, 7), (3, 9), (1, 6)])
@pytest.mark.parametrize("window", [(-1, -1), (2, 2)])
def test_standin_kernel_equals_sdpa_with_the_mask_flash_attn_documents(causal, q_len, k_len, window):
    """GQA (4 query heads on 2 KV heads), a causal mask aligned to the bottom-right corner, a sliding window."""
    g = torch.Generator().manual_seed(q_len * 10 + k_len)
    q, k, v = (torch.randn(2, n, h, 8, generator=g) for n, h in ((q_len, 4), (k_len, 2), (k_len, 2)))
    query_at = torch.arange(q_len)[:, None] + k_len - q_len
    key = torch.arange(k_len)[None]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        allowed &= key <= query_at
    if window[0] >= 0:
        allowed &= (key >= query_at - window[0]) & (key <= query_at + window[1])
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=allowed, scale=0.3, enable_gqa=True).transpose(1, 2)
    out = fa_standin.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # varlen over two sequences = each sequence alone
    cu_q, cu_k = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32), torch.tensor([0, k_len, 2 * k_len])
    varlen = fa_standin.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k,
                                               q_len, k_len, softmax_scale=0.3, causal=causal, window_size=window)
    torch.testing.assert_close(varlen, out.flatten(0, 1), atol=1e-6, rtol=1e-5)


def test_standin_refuses_what_it_does_not_model():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(NotImplementedError, match="deterministic; got dropout_p=0.1"):
        fa_standin.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="cu_seqlens end at 2 / 3 but q / k hold 3 / 3 rows"):
        fa_standin.flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 2]), torch.tensor([0, 3]), 3, 3)


def test_the_model_takes_the_flash_attention_path_of_transformers():
    model = tiny_model(**LVTC_MLP, attn=FLASH)
    # transformers' name-based checks see flash attention, as for flash_attention_2
    assert is_flash_attention_requested(model.config.get_text_config())
    assert model.model.language_model.config._attn_implementation == FLASH
    assert model.model.vision_tower.config._attn_implementation == FLASH
    from transformers.masking_utils import create_causal_mask

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    built = create_causal_mask(config=model.config.get_text_config(), inputs_embeds=torch.zeros(2, 3, 8),
                               attention_mask=mask, past_key_values=None)
    assert built.dtype == torch.bool and built.tolist() == mask.bool().tolist()  # 2D, as flash attention takes it


# --------------------------------------------------------------------------------------------- LVTC generation


@pytest.mark.parametrize("setup", ["mlp", "pvtc"])
def test_left_padded_lvtc_generation_of_1_2_3_tiles_equals_sdpa(setup):
    """Greedy decoding of a left-padded batch: the same tokens as SDPA, logits within 1e-5. The prefill unpads
    both layouts by their 2D masks (the long one re-padded on the left), decoding steps attend one query per row."""
    sdpa = tiny_model(**SETUPS[setup], attn="sdpa")
    flash = tiny_model(**SETUPS[setup], attn=FLASH)
    prompts = [prompt_ids(t, seed=110 + t, n_text=3 + 2 * t) for t in (1, 2, 3)]
    ids, mask = left_pad(prompts)
    pv = torch.cat([pixels(t, seed=120 + t) for t in (1, 2, 3)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    fa_standin.CALLS.clear()
    got = flash.generate(**kwargs)
    calls = llm_calls()
    expected = sdpa.generate(**kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")

    k, depth, steps = SETUPS[setup]["lvtc"]["expand_layer"], 4, 8
    short = [len(p) for p in prompts]
    long = [len(p) + EXTRA_PER_TILE * t for p, t in zip(prompts, (1, 2, 3))]
    assert [kind for kind, _ in calls] == ["varlen"] * depth * steps  # every LLM call went through the unpadding
    prefill, decoding = calls[:depth], calls[depth:]
    assert [c["cu_seqlens_k"] for _, c in prefill] == [cumulative(short)] * k + [cumulative(long)] * (depth - k)
    assert [c["cu_seqlens_q"] for _, c in prefill] == [c["cu_seqlens_k"] for _, c in prefill]
    for step in range(1, steps):
        layers = decoding[(step - 1) * depth: step * depth]
        assert [c["cu_seqlens_q"] for _, c in layers] == [[0, 1, 2, 3]] * depth
        assert [c["cu_seqlens_k"] for _, c in layers] == (
            [cumulative(n + step for n in short)] * k + [cumulative(n + step for n in long)] * (depth - k))


def test_unpadded_prompt_uses_the_dense_kernel_and_equals_sdpa():
    """One row without padding: no mask, flash-attn's dense kernel (causal) in both layouts and while decoding."""
    sdpa, flash = tiny_model(**LVTC_MLP, attn="sdpa"), tiny_model(**LVTC_MLP, attn=FLASH)
    ids, pv = torch.tensor([prompt_ids(2, seed=130)]), pixels(2, seed=131)
    fa_standin.CALLS.clear()
    got = flash.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False)
    calls = llm_calls()
    assert got.tolist() == sdpa.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False).tolist()
    assert {kind for kind, _ in calls} == {"dense"}
    short, long = ids.shape[1], ids.shape[1] + 2 * EXTRA_PER_TILE
    assert [c["k"][1] for _, c in calls[:4]] == [short, short, long, long]
    assert [c["k"][1] for _, c in calls[4:8]] == [short + 1, short + 1, long + 1, long + 1]


def test_sliding_window_lvtc_generation_equals_sdpa():
    """A Mistral-style window (every layer): flash-attn's ``window_size`` in both layouts, cache included."""
    def model(attn):
        return tiny_model("mlp", lvtc=LVTC_MLP["lvtc"], llm="mistral", text={"sliding_window": 8}, attn=attn)

    ids, mask = left_pad([prompt_ids(2, seed=132, n_text=6), prompt_ids(1, seed=133, n_text=2)])
    pv = torch.cat([pixels(2, seed=134), pixels(1, seed=135)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=10, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    fa_standin.CALLS.clear()
    got = model(FLASH).generate(**kwargs)
    # the prompts are longer than the window: flash-attn's window in every prefill call (a decoding step whose
    # cache holds no more than the window needs none)
    assert [c["window_size"] for _, c in llm_calls()[:4]] == [(7, 7)] * 4
    expected = model("sdpa").generate(**kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ LVTC training


SAMPLES = [prompt_ids(1, seed=140, n_text=3), prompt_ids(2, seed=141, n_text=6), prompt_ids(1, seed=142, n_text=9)]
TILES = [1, 2, 1]


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _padded_batch():
    length = max(map(len, SAMPLES))
    ids = torch.tensor([s + [PAD_ID] * (length - len(s)) for s in SAMPLES])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in SAMPLES])
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens"])
def test_packed_lvtc_training_batch_equals_the_padded_batch(boundaries):
    """transformers' DataCollatorWithFlattening packs three samples (1, 2 and 1 tiles) into one row: the loss and
    every gradient equal those of the right-padded batch (flash path) and of SDPA. The long-layout layers get varlen
    boundaries at the samples' long-layout starts, from the long positions or translated from ``cu_seq_lens_*``."""
    pv = torch.cat([pixels(t, seed=150 + i) for i, t in enumerate(TILES)])
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=boundaries == "cu_seq_lens")
    packed = collator([{"input_ids": s, "labels": s} for s in SAMPLES])
    assert packed["input_ids"].shape[0] == 1 and ("cu_seq_lens_q" in packed) == (boundaries == "cu_seq_lens")
    flash, sdpa = tiny_model(**LVTC_MLP, attn=FLASH), tiny_model(**LVTC_MLP, attn="sdpa")

    fa_standin.CALLS.clear()
    loss, grads = _loss_and_grads(flash, dict(packed, pixel_values=pv))
    calls = llm_calls()
    padded_loss, padded_grads = _loss_and_grads(flash, dict(_padded_batch(), pixel_values=pv))
    sdpa_loss, sdpa_grads = _loss_and_grads(sdpa, dict(_padded_batch(), pixel_values=pv))

    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, sdpa_loss, atol=1e-6, rtol=0)
    assert grads.keys() == padded_grads.keys() == sdpa_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(grad, sdpa_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    short = [len(s) for s in SAMPLES]
    long = [len(s) + EXTRA_PER_TILE * t for s, t in zip(SAMPLES, TILES)]
    assert [kind for kind, _ in calls] == ["varlen"] * 4
    assert [c["cu_seqlens_q"] for _, c in calls] == [cumulative(short)] * 2 + [cumulative(long)] * 2
    assert [int(c["max_seqlen_q"]) for _, c in calls] == [max(short)] * 2 + [max(long)] * 2
    # precomputed boundaries reach the kernel as given (python ints); boundaries that transformers derives from
    # position_ids (prepare_fa_kwargs_from_position_ids) arrive as tensors
    precomputed = boundaries == "cu_seq_lens"
    assert [isinstance(c["max_seqlen_q"], int) for _, c in calls] == [precomputed] * 4


def test_precomputed_boundaries_are_checked_against_the_batch():
    model = tiny_model(**LVTC_MLP, attn=FLASH)
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s} for s in SAMPLES[:2]])
    pv = torch.cat([pixels(1, seed=160), pixels(2, seed=161)])
    bad = dict(packed, cu_seq_lens_q=packed["cu_seq_lens_q"][:-1], cu_seq_lens_k=packed["cu_seq_lens_k"][:-1])
    with pytest.raises(ValueError, match=r"cu_seq_lens_q \[0, \d+\] does not describe the flattened batch of 1 x"):
        model(**bad, pixel_values=pv)
    with pytest.raises(ValueError, match=r"without both cu_seq_lens_q and cu_seq_lens_k"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], pixel_values=pv,
              cu_seq_lens_q=packed["cu_seq_lens_q"])
