"""A pure-torch stand-in for flash-attn's kernels, so that transformers' own flash-attention code runs on CPU.

flash_attention_2 needs a CUDA GPU and the flash-attn package. What a model does *around* the kernel is transformers'
code, and it is the part that can go wrong with LVTC:
`transformers.integrations.flash_attention.flash_attention_forward` ->
`modeling_flash_attention_utils._flash_attention_forward`, which

- unpads the batch by the 2D attention mask (`_upad_input`) and calls the varlen kernel with ``cu_seqlens``,
- for one packed row without a mask, derives ``cu_seqlens`` from ``position_ids``
  (`prepare_fa_kwargs_from_position_ids`) and calls the varlen kernel,
- with precomputed ``cu_seq_lens_q/k`` / ``max_length_q/k`` kwargs calls the varlen kernel with them,
- otherwise calls the dense kernel (``causal``, ``softmax_scale``, ``window_size`` for sliding windows).

`register()` makes all of that run: it registers transformers' `flash_attention_forward` and its FA2 mask function
(`masking_utils.flash_attention_mask`: 2D masks, None when nothing is padded) under `NAME` through
`AttentionInterface` / `AttentionMaskInterface`, and installs `flash_attn_func` / `flash_attn_varlen_func` below
where transformers' loader (`lazy_import_flash_attention`) keeps the functions of the loaded implementation. That
loader imports flash-attn for ``flash_attention_2/3/4`` and goes to the Hub (`kernels`) for any other name, neither of
which exists on a CPU machine, so the stand-in takes the place of that import; nothing of the model is patched.
`NAME` contains "flash", so transformers' name-based checks (`is_flash_attention_requested`) treat it as flash
attention, as they do flash_attention_2.

The kernels follow flash-attn 2's contract: ``(batch, seq, heads, head_dim)`` inputs (``(total, heads, head_dim)``
for varlen), fewer KV heads than query heads (GQA), a causal mask aligned to the bottom-right corner when the query
is shorter than the keys (flash-attn >= 2.1), ``window_size=(left, right)`` (-1 = unlimited), rows with no key to
attend to give zeros. They compute attention in plain torch (float32 softmax), differentiably. Every call is
recorded in `CALLS`, so tests can assert which branch of transformers' code ran.
"""

from __future__ import annotations

import torch

NAME = "flash_attention_2_cpu_standin"

#: ``(kernel, details)`` of every call since the last `CALLS.clear()`: "dense" or "varlen", with shapes and lengths.
CALLS: list[tuple[str, dict]] = []


def _allowed(q_len: int, k_len: int, causal: bool, window_size, device) -> torch.Tensor:
    """``(q_len, k_len)`` bool: which keys each query may see. Query ``i`` sits at key position
    ``i + k_len - q_len`` (bottom-right alignment, as flash-attn >= 2.1)."""
    left, right = window_size
    query_at = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= query_at
    if left >= 0:
        allowed &= key >= query_at - left
    if right >= 0:
        allowed &= key <= query_at + right
    return allowed


def _attend(q, k, v, softmax_scale, causal, window_size):
    """q ``(b, sq, hq, d)``, k/v ``(b, sk, hk, d)`` -> ``(b, sq, hq, d)``."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    groups = q.shape[2] // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
    kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    allowed = _allowed(q.shape[1], k.shape[1], causal, window_size, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # empty rows -> 0
    return torch.matmul(weights, vh).transpose(1, 2).to(q.dtype)


def _check_dropout(dropout_p):
    if dropout_p:
        raise NotImplementedError(f"the flash-attention stand-in is deterministic; got dropout_p={dropout_p}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    deterministic=False):
    """flash-attn's dense kernel: q ``(batch, seq_q, heads, d)``, k/v ``(batch, seq_k, kv_heads, d)``."""
    _check_dropout(dropout_p)
    CALLS.append(("dense", {"q": tuple(q.shape), "k": tuple(k.shape), "causal": causal,
                            "window_size": tuple(window_size)}))
    return _attend(q, k, v, softmax_scale, causal, window_size)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False):
    """flash-attn's varlen kernel: q ``(total_q, heads, d)``, k/v ``(total_k, kv_heads, d)``; sequence ``i`` is
    rows ``cu_seqlens[i]:cu_seqlens[i+1]``, attended on its own."""
    _check_dropout(dropout_p)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q has {len(bounds_q)} entries but cu_seqlens_k has {len(bounds_k)}")
    if bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens end at {bounds_q[-1]} / {bounds_k[-1]} but q / k hold {q.shape[0]} / "
                         f"{k.shape[0]} rows")
    lengths_q = [b - a for a, b in zip(bounds_q, bounds_q[1:])]
    lengths_k = [b - a for a, b in zip(bounds_k, bounds_k[1:])]
    if max(lengths_q) > int(max_seqlen_q) or max(lengths_k) > int(max_seqlen_k):
        raise ValueError(f"a sequence is longer than max_seqlen_q={int(max_seqlen_q)} / "
                         f"max_seqlen_k={int(max_seqlen_k)}: {lengths_q} / {lengths_k}")
    CALLS.append(("varlen", {"q": tuple(q.shape), "k": tuple(k.shape), "cu_seqlens_q": bounds_q,
                             "cu_seqlens_k": bounds_k, "max_seqlen_q": max_seqlen_q, "causal": causal,
                             "window_size": tuple(window_size)}))
    outputs = [
        _attend(q[qa:qb][None], k[ka:kb][None], v[ka:kb][None], softmax_scale, causal, window_size)[0]
        for qa, qb, ka, kb in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])
    ]
    return torch.cat(outputs)


def flash_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' own `flash_attention_forward`, after making sure the stand-in is the loaded implementation
    (transformers keeps one implementation's functions at a time; loading another one replaces them)."""
    from transformers.integrations import flash_attention

    _install()
    return flash_attention.flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _install():
    """Put the stand-in where `lazy_import_flash_attention` keeps the loaded implementation's functions, as it
    would after importing them: pad/unpad are transformers' own torch versions (which it also uses for FA3)."""
    from transformers import modeling_flash_attention_utils as fa

    if fa._loaded_implementation == NAME:
        return
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    fa._loaded_implementation = NAME


def register() -> str:
    """Register the stand-in under `NAME` (models then take ``attn_implementation=NAME``); returns `NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    _install()  # model construction preloads the requested flash implementation
    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
