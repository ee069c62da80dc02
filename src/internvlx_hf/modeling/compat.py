"""What differs between the transformers releases this model supports (5.16.1 to 5.24), in one place: the modeling
files call these helpers and otherwise read like transformers' own models. Each helper names the release that
changed the behaviour; when the oldest supported release moves past it, the helper goes.

Saved next to checkpoints as remote code: imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

#: The installed transformers' name for the KV cache, as an argument and as an output field: transformers 5.24
#: renamed `past_key_values` to `cache` (generate() passes `cache=`, outputs hold `.cache`; the old name is a
#: deprecated alias until 5.40). The model takes either name and speaks the installed release's to transformers.
CACHE_NAME = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
              else "past_key_values")


def cache_kwarg(cache) -> dict:
    """``{CACHE_NAME: cache}``: the cache as the installed release's modules and outputs take it (``**cache_kwarg(c)``)."""
    return {CACHE_NAME: cache}


def cache_of(outputs):
    """The cache an output of the installed release holds (``outputs.cache`` from 5.24, ``past_key_values`` before)."""
    return getattr(outputs, CACHE_NAME)


def one_cache(past_key_values, cache):
    """The cache a caller passed under either name; both is refused."""
    if past_key_values is not None and cache is not None:
        raise ValueError("Got both past_key_values= and cache= (one cache under two names); pass only one: cache= "
                         "is transformers 5.24's name, past_key_values= the older one.")
    return cache if cache is not None else past_key_values


def one_cache_argument(forward):
    """A model forward whose one cache argument is ``cache`` (transformers 5.24's name), taking ``past_key_values=``
    (the name transformers 5.16-5.23's generate() passes, and callers written for it use) as that argument."""

    @functools.wraps(forward)
    def with_older_name(self, *args, past_key_values=None, **kwargs):
        kwargs["cache"] = one_cache(past_key_values, kwargs.get("cache"))
        return forward(self, *args, **kwargs)

    return with_older_name


def _slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' `slice_logits_to_keep` (5.21 on), for 5.16-5.20: the last ``logits_to_keep`` positions (0 = all),
    1D or 2D positions, or a 2D boolean mask (its True positions, flattened)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, keep, :]


try:
    from transformers.modeling_utils import slice_logits_to_keep  # transformers >= 5.21
except ImportError:
    slice_logits_to_keep = _slice_logits_to_keep


def activation_checkpointing(model) -> bool:
    """Whether gradient checkpointing is on: `is_activation_checkpointing` from transformers 5.23 on,
    `is_gradient_checkpointing` on 5.16-5.22."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    return model.is_gradient_checkpointing if checkpointing is None else checkpointing


def hidden_state_selection(output_hidden_states, count: int) -> set[int] | None:
    """Indices a list/int ``output_hidden_states`` selects (negative ones count from the end); None = all. transformers
    5.23 added selecting layers by index; the LVTC forward applies it on every release."""
    if isinstance(output_hidden_states, bool) or output_hidden_states is None:
        return None
    selected = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % count for i in selected if -count <= i < count}


def select_hidden_states(hidden_states: tuple | None, output_hidden_states) -> tuple | None:
    """The LLM's hidden states with the layers ``output_hidden_states`` does not select set to None, as transformers
    5.23 on returns them (earlier releases keep every layer's)."""
    selection = hidden_state_selection(output_hidden_states, len(hidden_states)) if hidden_states else None
    if selection is None:
        return hidden_states
    return tuple(h if i in selection else None for i, h in enumerate(hidden_states))
