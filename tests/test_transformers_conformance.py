"""Conformance with transformers (issue 9): transformers' own ``ModelTesterMixin`` against tiny plain and LVTC
InternVL-X models, plus this project's generation-conformance tests.

``ModelTesterMixin`` comes from the source distribution of the installed transformers version (see
``tests/transformers_glue``); without network the mixin test classes are replaced by one test that skips with the
reason. ``GenerationTesterMixin`` is not in the sdist, so generation conformance (assisted and prompt-lookup
decoding, beam search from ``inputs_embeds``, ``return_dict``, config-driven outputs) is tested below by hand.
"""

from __future__ import annotations

import dataclasses
import os
import unittest
import unittest.mock

import pytest
import torch
from transformers import DynamicCache
from transformers.models.auto import modeling_auto

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXModel
from internvlx_hf.modeling.lvtc_cache import InternVLXLVTCCache
from internvlx_hf.modeling.compat import CACHE_NAME

import conftest
from tiny import IMAGE_TOKEN_ID, PAD_ID, pixels, prompt_ids, tiny_config, tiny_model
from transformers_glue import SdistUnavailable, load_test_modeling_common

try:
    # This project runs with --strict-markers, so the markers transformers' module uses must be declared before it is
    # imported (transformers declares them in its own conftest, which the sdist does not ship).
    common = load_test_modeling_common(pytest_config=conftest.PYTEST_CONFIG)
    MIXIN_SKIP_REASON = None
except SdistUnavailable as err:
    common = None
    MIXIN_SKIP_REASON = f"transformers' ModelTesterMixin is not available: {err}"

# LVTC on the 2-layer tester LLM: expand at layer 1, one extra LR projector injected before layer 0.
LVTC_TESTER = {"expand_layer": 1, "num_lr_projectors": 2, "inject_start": 0}


# --------------------------------------------------------------------------------------------------------------------
# transformers' ModelTesterMixin
# --------------------------------------------------------------------------------------------------------------------


class InternVLXVisionText2TextModelTester:
    """Tiny config and inputs, built the way transformers' ``InternVLVisionText2TextModelTester`` builds them.

    Each row: BOS, two text tokens, one 56px tile's `<IMG_CONTEXT>` run (4 LR tokens), random text. The image run
    is not at the very start so that the mixin's padding tests (which mask the first / last two tokens of the last
    row) pad text, not half a tile.
    """

    def __init__(self, parent, lvtc=None, batch_size=3, text_length=6):
        self.parent = parent
        self.lvtc = lvtc
        self.batch_size = batch_size
        self.image_seq_length = 4
        self.image_start = 3
        self.seq_length = self.image_start + self.image_seq_length + text_length
        self.num_hidden_layers = 2
        self.hidden_size = 64
        self.vocab_size = 128
        self.num_attention_heads = 4
        self.is_training = True
        # what the mixin reads for the vision tower's expected hidden states / attentions
        self.vision_config = {"num_hidden_layers": 2}

    def get_config(self):
        return tiny_config("mlp", lvtc=self.lvtc, attn="eager", layers=self.num_hidden_layers)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[:, 0] = 1
        input_ids[:, self.image_start:self.image_start + self.image_seq_length] = IMAGE_TOKEN_ID
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": common.floats_tensor([self.batch_size, 3, 56, 56]),
        }
        return config, inputs


# The mixin tells base models from heads, and finds which heads get labels, by transformers' static name tables
# (modeling_auto); InternVL-X is registered with the Auto classes at run time instead, so each test adds its names
# there, as a native model's entries would be.
_AUTO_NAMES = {
    "MODEL_MAPPING_NAMES": "InternVLXModel",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "InternVLXForConditionalGeneration",
}

# ModelTesterMixin tests that do not apply to InternVL-X, each with the reason (matched by name prefix).
_NOT_APPLICABLE = {
    # GenerationTesterMixin is not shipped in the sdist (tests/transformers_glue/stand_in_generation_test_utils.py);
    # generation is covered by the tests at the end of this module and in test_lvtc.py / test_modeling.py.
    "test_generation_tester_mixin_inheritance": "GenerationTesterMixin is not in the transformers sdist",
    # torch.compile / flex attention compile kernels (minutes on CPU); not part of this project's supported set-up.
    "test_sdpa_can_compile_dynamic": "torch.compile is not supported by this project",
    "test_torch_compile_for_training": "torch.compile is not supported by this project",
    "test_flex_attention_with_grads": "flex attention is not supported by this project (compiles kernels)",
}

# The tests collected by default: those that exercise what InternVL-X adds or overrides (outputs and return_dict,
# LVTC's layouts, padding and batching, input embeddings, training and checkpointing, labels, tied/TP weights,
# save/load, get_image_features, attention backends, RoPE through LVTC's positions). The others (embedding resizing
# variants, DeepSpeed, offloading, dtype and device loading helpers, ...) exercise transformers' PreTrainedModel
# machinery that InternVL-X does not touch; they all pass too and run with INTERNVLX_FULL_CONFORMANCE=1. Measured
# on this project's idle 2-core CPU, both models: 86 tests in 6 s selected, 226 in 16 s in full (pytest's times;
# other jobs on the same cores slow both by up to 10x).
_SELECTED = {
    # outputs: return_dict, config-driven and index-selected hidden states, attention weights (LVTC layouts)
    "test_model_outputs_equivalence", "test_attention_outputs", "test_hidden_states_output",
    "test_retain_grad_hidden_states_attentions", "test_can_capture_specific_layers_hidden_states",
    "test_capture_outputs_decorator", "test_model_forward_default_config_values",
    # batching, padding and the attention backends (eager vs SDPA in float32: left / right padding with a mask,
    # no mask, output_attentions)
    "test_batching_equivalence", "test_eager_matches_sdpa_inference_08_fp32_pad_left_sdpa_kernels",
    "test_eager_matches_sdpa_inference_10_fp32_pad_left_no_attn_mask_sdpa_kernels",
    "test_eager_matches_sdpa_inference_12_fp32_pad_right_sdpa_kernels",
    "test_eager_matches_sdpa_inference_24_fp32_pad_left_output_attentions",
    "test_attn_implementation_composite_models", "test_sdpa_can_dispatch_composite_models",
    "test_can_set_attention_dynamically_composite_model", "test_config_attn_implementation_setter",
    "test_internal_model_config_and_subconfig_are_same",
    # inputs and training
    "test_inputs_embeds", "test_inputs_embeds_matches_input_ids", "test_model_main_input_name", "test_training",
    "test_training_gradient_checkpointing", "test_causal_lm_loss_honors_shift_labels",
    "test_enable_input_require_grads",
    # weights: save/load, tying, tensor-parallel plan, initialisation, embeddings
    "test_save_load", "test_tied_weights_keys", "test_tied_head_has_a_tp_plan_entry", "test_tp_plan_matches_params",
    "test_load_save_without_tied_weights", "test_model_weights_reload_no_missing_tied_weights",
    "test_correct_missing_keys", "test_can_init_all_missing_weights", "test_init_weights_can_init_buffers",
    "test_resize_tokens_embeddings", "test_model_get_set_embeddings", "test_model_is_small",
    "test_num_layers_is_small",
    # the transformers 5 VLM contract of get_image_features
    "test_get_image_features_output_0", "test_get_image_features_output_1", "test_get_image_features_output_2",
    "test_get_image_features_pooler_output", "test_get_image_features_hidden_states",
    "test_get_image_features_attentions",
    # InternLM2's dynamic NTK rope, fed LVTC's long positions
    "test_model_rope_scaling_from_config_1_dynamic",
}
_FULL = os.environ.get("INTERNVLX_FULL_CONFORMANCE") == "1"


if common is not None:
    _original_ids_tensor = common.ids_tensor

    def _ids_without_image_token(*args, **kwargs):
        ids = _original_ids_tensor(*args, **kwargs)
        return ids.masked_fill(ids == IMAGE_TOKEN_ID, PAD_ID + 3)

    class _InternVLXModelTest(common.ModelTesterMixin):
        all_model_classes = (InternVLXForConditionalGeneration, InternVLXModel)
        # pixel_values travels with input_ids in the SDPA-vs-eager comparison (InternVL-X needs its tiles)
        additional_model_inputs = ["pixel_values"]
        _is_composite = True  # vision and text sub-configs: the composite attention-dispatch tests apply
        lvtc = None

        def setUp(self):
            name = self._testMethodName
            for prefix, reason in _NOT_APPLICABLE.items():
                if name.startswith(prefix):
                    self.skipTest(reason)
            # The SDPA-vs-eager comparison runs 7 rows: with fewer, it appends rows of random ids without image
            # tokens while extending pixel_values to 7 tiles.
            batch_size = 7 if name.startswith(("test_eager_matches_sdpa", "test_eager_matches_batched")) else 3
            self.model_tester = InternVLXVisionText2TextModelTester(self, lvtc=self.lvtc, batch_size=batch_size)
            patchers = [unittest.mock.patch.dict(getattr(modeling_auto, table), {"internvlx": class_name})
                        for table, class_name in _AUTO_NAMES.items()]
            # Tests that draw random ids over the whole vocabulary (rope scaling, ...) would hit <IMG_CONTEXT>
            # without pixel_values, which InternVL-X refuses with a clear error where transformers' VLMs embed the
            # placeholder as text: their random ids get a text token in its place.
            patchers.append(unittest.mock.patch.object(common, "ids_tensor", _ids_without_image_token))
            for patcher in patchers:
                patcher.start()
                self.addCleanup(patcher.stop)

    if not _FULL:  # not collected at all (a non-callable attribute is no test for unittest's loader)
        for _name in dir(_InternVLXModelTest):
            if _name.startswith("test_") and callable(getattr(_InternVLXModelTest, _name)) and _name not in _SELECTED \
                    and not _name.startswith(tuple(_NOT_APPLICABLE)):
                setattr(_InternVLXModelTest, _name, None)

    class PlainInternVLXModelTest(_InternVLXModelTest, unittest.TestCase):
        pass

    class LVTCInternVLXModelTest(_InternVLXModelTest, unittest.TestCase):
        lvtc = LVTC_TESTER

else:

    def test_model_tester_mixin():
        pytest.skip(MIXIN_SKIP_REASON)


# --------------------------------------------------------------------------------------------------------------------
# Generation conformance (GenerationTesterMixin is not obtainable from the sdist)
# --------------------------------------------------------------------------------------------------------------------

LVTC = {"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1}


def _greedy(model, ids, pv, steps, **kwargs):
    out = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_prompt_lookup_decoding_gives_the_greedy_tokens(lvtc):
    """The prompt ends with a repeated n-gram, so prompt lookup drafts tokens from the very first step: the first
    forward runs prompt + draft, and the rejected draft is cropped from the prefill's text tail."""
    model = tiny_model("pvtc", lvtc=lvtc)
    ids = torch.tensor([prompt_ids(2, seed=3) + [5, 6, 7, 5, 6, 7]])
    pv = pixels(2, seed=4)
    assert _greedy(model, ids, pv, 12, prompt_lookup_num_tokens=3) == _greedy(model, ids, pv, 12)


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
@pytest.mark.parametrize("assistant_lvtc", [None, LVTC], ids=["plain-assistant", "lvtc-assistant"])
def test_assisted_decoding_with_an_internvlx_assistant_gives_the_greedy_tokens(lvtc, assistant_lvtc):
    """The assistant's first forward (an empty cache) gets the tiles although transformers calls it with
    is_first_iteration=False; the target's first forward checks prompt + draft."""
    model = tiny_model("pvtc", lvtc=lvtc)
    assistant = tiny_model("mlp", lvtc=assistant_lvtc, seed=7)
    ids, pv = torch.tensor([prompt_ids(1, seed=5)]), pixels(1, seed=6)
    assert _greedy(model, ids, pv, 10, assistant_model=assistant) == _greedy(model, ids, pv, 10)


def test_assisted_decoding_with_itself_accepts_every_draft_token():
    """The model as its own assistant drafts exactly its greedy tokens (LVTC in both: its layout is rebuilt in the
    assistant's own prefill)."""
    model = tiny_model("mlp", lvtc=LVTC)
    ids, pv = torch.tensor([prompt_ids(2, seed=8)]), pixels(2, seed=9)
    assert _greedy(model, ids, pv, 10, assistant_model=model) == _greedy(model, ids, pv, 10)


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_beam_search_and_several_sequences_from_inputs_embeds(lvtc):
    model = tiny_model("pvtc", lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(2, seed=10)]), pixels(2, seed=11)
    embeds = model.get_input_embeddings()(ids)
    from_ids = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, num_beams=2, do_sample=False,
                              num_return_sequences=2)
    from_embeds = model.generate(inputs_embeds=embeds, pixel_values=pv, max_new_tokens=4, num_beams=2,
                                 do_sample=False, num_return_sequences=2)
    assert from_embeds.tolist() == from_ids[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_return_dict_false_gives_the_tuple_of_the_output(lvtc):
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=12)]), pixels(1, seed=13)
    as_dict = model(input_ids=ids, pixel_values=pv, labels=ids)
    as_tuple = model(input_ids=ids, pixel_values=pv, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    base = model.model(input_ids=ids, pixel_values=pv, return_dict=False)
    torch.testing.assert_close(base[0], model.model(input_ids=ids, pixel_values=pv).last_hidden_state)


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_output_flags_default_to_the_config(lvtc):
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=14)]), pixels(1, seed=15)
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    out = model(input_ids=ids, pixel_values=pv)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert model(input_ids=ids, pixel_values=pv, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_output_hidden_states_selects_layers_by_index(lvtc):
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=16)]), pixels(1, seed=17)
    every = model(input_ids=ids, pixel_values=pv, output_hidden_states=True).hidden_states
    some = model(input_ids=ids, pixel_values=pv, output_hidden_states=[0, 3, -1]).hidden_states
    assert len(some) == len(every) == 5
    assert [h is None for h in some] == [False, True, True, False, False]
    for i in (0, 3, 4):
        torch.testing.assert_close(some[i], every[i])


def test_lvtc_attention_weights_are_in_each_layers_layout():
    model = tiny_model(lvtc=LVTC)  # k = 2 of 4 layers; eager attention
    ids, pv = torch.tensor([prompt_ids(2, seed=18)]), pixels(2, seed=19)
    out = model(input_ids=ids, pixel_values=pv, output_attentions=True, output_hidden_states=True)
    short, long = ids.shape[1], ids.shape[1] + 2 * 12
    assert [tuple(a.shape) for a in out.attentions] == [(1, 4, n, n) for n in (short, short, long, long)]
    for weights in out.attentions:  # softmax rows over the causal keys
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert bool((weights.triu(1) == 0).all())
    assert [h.shape[1] for h in out.hidden_states] == [short, short, long, long, short]


def test_get_image_features_follows_the_vlm_contract():
    model = tiny_model(lvtc=LVTC)
    pv = pixels(3, seed=20)
    features = model.get_image_features(pv, output_hidden_states=True)
    assert features.last_hidden_state.shape == (3, 1 + 16, 32)  # ViT tokens (CLS + 4x4 patches)
    assert features.pooler_output.shape == (3, 4, 64)  # the tokens that replace <IMG_CONTEXT>
    assert len(features.hidden_states) == 3 and features.hr_features.shape == (3, 16, 64)
    as_tuple = model.get_image_features(pv, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], features.pooler_output)


def test_lm_head_has_a_tensor_parallel_plan_entry():
    assert InternVLXForConditionalGeneration._tp_plan == {"lm_head": "colwise_gather_output"}
    assert tiny_model(llm="qwen2").tp_plan["lm_head"] == "colwise_gather_output"


def test_a_users_empty_cache_is_the_one_generate_fills():
    model = tiny_model(lvtc=LVTC)
    ids, pv = torch.tensor([prompt_ids(1, seed=21)]), pixels(1, seed=22)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(input_ids=ids, pixel_values=pv, past_key_values=cache, max_new_tokens=3,
                         return_dict_in_generate=True, do_sample=False)
    assert out.past_key_values is cache and isinstance(cache, InternVLXLVTCCache)
    assert cache.layers[3].keys.shape[-2] == cache.layers[0].keys.shape[-2] + 12  # long layout from k = 2


def test_offloaded_cache_stays_offloaded_under_lvtc():
    """generate(cache_implementation="offloaded") keeps transformers' offloading cache (CUDA-only to run, so the
    cache generate() prepares is checked here; test_offloaded_generation_on_gpu runs it)."""
    from transformers import GenerationConfig

    model = tiny_model(lvtc=LVTC)
    model_kwargs = {}
    model._prepare_cache_for_generation(GenerationConfig(cache_implementation="offloaded"), model_kwargs, None, 1, 64)
    cache = model_kwargs[CACHE_NAME]
    assert isinstance(cache, InternVLXLVTCCache) and cache.offloading


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_the_cache_is_taken_under_either_name_and_returned_under_transformers_name(lvtc):
    """transformers 5.24 renamed `past_key_values` to `cache` (argument and output field): the model takes both
    names, returns the installed release's field and continues a prefill the same way under each name."""
    import transformers.modeling_outputs as outputs

    assert {f.name for f in dataclasses.fields(outputs.CausalLMOutputWithPast)} & {"cache", "past_key_values"} == \
        {CACHE_NAME}
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=25)]), pixels(1, seed=26)
    steps = []
    for name in ("past_key_values", "cache"):
        prefill = model(input_ids=ids, pixel_values=pv, use_cache=True)
        cache = getattr(prefill, CACHE_NAME)
        assert CACHE_NAME in prefill.keys() and cache.get_seq_length() == ids.shape[1]
        steps.append(model(input_ids=torch.tensor([[5]]), use_cache=True, **{name: cache}).logits)
        assert cache.get_seq_length() == ids.shape[1] + 1
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="both past_key_values= and cache="):
        model(input_ids=ids, pixel_values=pv, past_key_values=DynamicCache(), cache=DynamicCache())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded caches need a CUDA device")
def test_offloaded_generation_on_gpu():
    model = tiny_model(lvtc=LVTC).cuda()
    ids, pv = torch.tensor([prompt_ids(1, seed=23)]).cuda(), pixels(1, seed=24).cuda()
    assert _greedy(model, ids, pv, 6, cache_implementation="offloaded") == _greedy(model, ids, pv, 6)


@pytest.mark.parametrize("lvtc", [None, LVTC], ids=["plain", "lvtc"])
def test_prompt_lookup_never_drafts_image_placeholders(lvtc):
    """The prompt's last token also stands right before its image run, so prompt lookup would draft <IMG_CONTEXT>
    tokens, which have no tile behind them: drafts stop before the first placeholder."""
    model = tiny_model("mlp", lvtc=lvtc)
    ids = torch.tensor([[1, 5, 9] + [IMAGE_TOKEN_ID] * 4 + [7, 8, 9]])
    pv = pixels(1, seed=25)
    assert _greedy(model, ids, pv, 6, prompt_lookup_num_tokens=3) == _greedy(model, ids, pv, 6)
