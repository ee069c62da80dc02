"""Tiny InternVL-X models for tests: 56px tiles, 14px patches (a 4x4 ViT grid), so 4 LR / 16 HR tokens per tile."""

from __future__ import annotations

import torch

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration

IMAGE_TOKEN_ID = 100
PAD_ID = 0


def tiny_config(projector="mlp", lvtc=None, llm="llama", attn="eager", layers=4, text=None,
                **overrides) -> InternVLXConfig:
    """``text``: extra text-config values (e.g. ``{"sliding_window": 5}``); ``overrides``: InternVLXConfig values."""
    text = dict(
        model_type=llm, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=1,
        eos_token_id=2, **(text or {}),
    )
    if llm == "qwen2":
        text["tie_word_embeddings"] = True
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    return InternVLXConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                           projector_type=projector, pvtc_num_heads=4, lvtc=lvtc, attn_implementation=attn,
                           **overrides)


def tiny_model(*args, seed=0, **kwargs) -> InternVLXForConditionalGeneration:
    torch.manual_seed(seed)
    model = InternVLXForConditionalGeneration(tiny_config(*args, **kwargs)).eval()
    model.generation_config.eos_token_id = None  # fixed-length greedy runs in tests
    return model


def is_checkpointing(model) -> bool:
    """Whether transformers' activation checkpointing is on: `is_activation_checkpointing` from transformers 5.23 on,
    `is_gradient_checkpointing` (its name before) on 5.16-5.22."""
    on = getattr(model, "is_activation_checkpointing", None)
    return model.is_gradient_checkpointing if on is None else on


def enable_checkpointing(model, **kwargs) -> None:
    """`activation_checkpointing_enable` (5.23 on) or `gradient_checkpointing_enable` (its name on 5.16-5.22)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)
    assert is_checkpointing(model)


def prompt_ids(tiles: int, seed: int, n_text: int = 5, tokens_per_tile: int = 4) -> list[int]:
    """BOS, some text, one image's `<IMG_CONTEXT>` run (``tiles`` tiles), more text."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 90, (n_text,), generator=g).tolist()
    after = torch.randint(3, 90, (3,), generator=g).tolist()
    return [1] + before + [IMAGE_TOKEN_ID] * (tokens_per_tile * tiles) + after


def pixels(tiles: int, seed: int) -> torch.Tensor:
    return torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def greedy_by_recomputation(model, ids: list[int], pixel_values: torch.Tensor, steps: int
                            ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a cache: the whole sequence is run again for every new token. Returns the new tokens
    and each step's last-position logits ``(1, vocab)``."""
    seq, step_logits = torch.tensor([ids]), []
    for _ in range(steps):
        logits = model(input_ids=seq, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[0, len(ids):].tolist(), step_logits


def greedy_with_cache(model, ids: list[int], pixel_values: torch.Tensor, steps: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_greedy_with_cache_equals_recomputation(model, ids: list[int], pixel_values: torch.Tensor, steps: int):
    """Cached greedy generation gives the tokens and, at every step, the logits (1e-5) of a full forward without a
    cache. Tokens alone miss a decoding step that is slightly off: without LVTC's long-layout position offset the
    decoding logits move by ~2e-3 and the tiny random model's argmax mostly stays the same."""
    out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens, logits = greedy_by_recomputation(model, ids, pixel_values, steps)
    assert len(out.logits) == len(logits) == steps
    for step, (cached, recomputed) in enumerate(zip(out.logits, logits)):
        torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")
    assert out.sequences[0, len(ids):].tolist() == tokens


def assert_left_padded_batch_equals_alone(model, prompts: list[list[int]], images: list[torch.Tensor], steps: int):
    """Greedy generation of a left-padded batch gives each row the tokens and logits (1e-5) of its prompt alone."""
    ids, mask = left_pad(prompts)
    batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images), max_new_tokens=steps,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = model.generate(input_ids=torch.tensor([prompt]), pixel_values=image, max_new_tokens=steps,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert batch.sequences[row, ids.shape[1]:].tolist() == alone.sequences[0, len(prompt):].tolist()
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-5, rtol=0)
