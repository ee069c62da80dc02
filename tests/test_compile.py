"""torch.compile: the plain model (MLP / PVTC projector) compiles with ``fullgraph=True`` and a static cache, as
transformers' native InternVL does; LVTC's decoding step compiles with ``fullgraph=True`` too, with its static cache
(`InternVLXLVTCStaticCache`), and its prefill has a counted, small number of graph breaks (its layout depends on where
the image tokens are, so it cannot be one graph). docs/benchmarks.md, "Compile".

The graph-break counts come from ``torch._dynamo.explain`` (tracing only, no code generation: fast). The generation
tests compile (with inductor, C++ code generation: ~20-40 s of CPU each): marked ``slow``.
The counts are those of torch 2.13 (what CI runs); another torch may split graphs differently.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from tiny import left_pad, pixels, prompt_ids, tiny_model
from transformers import CompileConfig, StaticCache

from internvlx_hf.modeling.lvtc_cache import InternVLXLVTCCache

LVTC = {"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1}
STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt(tiles=1, seed=0):
    ids = torch.tensor([prompt_ids(tiles, seed)])
    return ids, torch.ones_like(ids), pixels(tiles, seed)


@torch.no_grad()
def _breaks(model, cache):
    """Graph breaks of a prefill (with the image) and of the decoding step after it."""
    ids, mask, pixel_values = _prompt()
    prefill = torch._dynamo.explain(model.forward)(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                                   past_key_values=cache(), use_cache=True)
    filled = cache()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, past_key_values=filled, use_cache=True)
    torch._dynamo.reset()
    length = ids.shape[1]
    decode = torch._dynamo.explain(model.forward)(
        input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
        position_ids=torch.tensor([[length]]), past_key_values=filled, use_cache=True,
    )
    return prefill.graph_break_count, decode.graph_break_count


@pytest.mark.parametrize("projector", ["mlp", "pvtc"])
def test_plain_model_traces_as_one_graph_with_a_static_cache(projector):
    model = tiny_model(projector, attn="sdpa", layers=2)
    text_config = model.config.get_text_config()
    assert _breaks(model, lambda: StaticCache(config=text_config, max_cache_len=64)) == (0, 0)


def test_lvtc_graph_breaks_are_counted():
    """LVTC's layout (`build_lvtc_layout`) runs eagerly as one unit: one break, counted once per enclosing frame
    (the two forwards and `prepare_lvtc_step`); a decoding step is one graph. Before: 15 and 3."""
    model = tiny_model("mlp", lvtc=LVTC, attn="sdpa", layers=3)
    text_config = model.config.get_text_config()
    assert _breaks(model, lambda: InternVLXLVTCCache(config=text_config)) == (3, 0)


def test_lvtc_decoding_step_is_one_graph_with_a_static_cache():
    """With a static cache (plain `StaticCache` handed in: it becomes `InternVLXLVTCStaticCache`), the decoding step
    has no graph break, which ``fullgraph=True`` needs; the prefill keeps the eager layout step."""
    model = tiny_model("mlp", lvtc=LVTC, attn="sdpa", layers=3)
    text_config = model.config.get_text_config()
    assert _breaks(model, lambda: StaticCache(config=text_config, max_cache_len=64)) == (3, 0)


def test_compiled_input_check_still_refuses_ids_outside_the_vocabulary():
    """Under compilation the vocabulary check is an assert inside the graph (no break), not a silent pass."""
    model = tiny_model("mlp", attn="sdpa", layers=2)
    forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        forward(input_ids=torch.tensor([[1, 5, 7]]))
        with pytest.raises(RuntimeError, match="outside the vocabulary of 128 tokens"):
            forward(input_ids=torch.tensor([[1, 500, 7]]))


def test_eager_forward_keeps_the_explained_errors():
    model = tiny_model("mlp", attn="sdpa", layers=2)
    with pytest.raises(ValueError, match=r"id 500 \(1 id\(s\) in all\) outside the vocabulary"):
        model(input_ids=torch.tensor([[1, 500, 7]]))


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["mlp"])
def test_plain_fullgraph_static_cache_generation_equals_eager(projector):
    """transformers' recipe: a static cache makes generate() compile the decoding step (``fullgraph=True``: any graph
    break is an error); the tokens and every step's logits are eager's."""
    model = tiny_model(projector, attn="sdpa", layers=2)
    ids, mask, pixel_values = _prompt()
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=STEPS,
                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    eager = model.generate(**kwargs)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # generate() compiles on accelerators only unless told (transformers' flag)
    compiled = model.generate(**kwargs, cache_implementation="static", compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.slow
def test_lvtc_compiled_generation_equals_eager():
    """LVTC keeps its dynamic cache (layers hold different lengths), so it compiles without ``fullgraph``: the
    prefill resumes after the eager layout step in graphs of its own. ``aot_eager`` runs dynamo's and AOTAutograd's
    tracing (where graph breaks and resumed frames can go wrong) without inductor's code generation, which the
    plain test above covers: inductor on LVTC's graphs takes minutes on CPU."""
    model = tiny_model("mlp", lvtc=LVTC, attn="sdpa", layers=3)
    ids, mask, pixel_values = _prompt()
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=STEPS,
                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    eager = model.generate(**kwargs)
    model.forward = torch.compile(model.forward, backend="aot_eager")
    compiled = model.generate(**kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.slow
def test_lvtc_fullgraph_static_cache_generation_equals_eager():
    """LVTC with its static cache: generate() compiles the decoding step with ``fullgraph=True`` (inductor), the prefill
    runs eagerly; a left-padded batch of prompts with 1 and 2 tiles gives eager's (dynamic cache) tokens, and every
    step's logits within 1e-4."""
    model = tiny_model("mlp", lvtc=LVTC, attn="sdpa", layers=3)
    ids, mask = left_pad([prompt_ids(2, 1), prompt_ids(1, 2, n_text=9)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pixels(2, 1), pixels(1, 2)]),
                  max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eager = model.generate(**kwargs)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    compiled = model.generate(**kwargs, cache_implementation="static", compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")
