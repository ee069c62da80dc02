"""The model's output types: image features, the base model's output, the causal-LM output, and the lean training
output whose logits are computed when read (`LogitsOnRead`).

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput


@dataclass
class InternVLXImageFeatures(BaseModelOutputWithPooling):
    """What `get_image_features` returns (the transformers 5 VLM contract plus LVTC's extra projectors).

    Args:
        last_hidden_state: ``(tiles, 1 + S*S, C)`` ViT output of ``config.select_layer`` (CLS first), dummy tiles
            (``image_flags == 0``) removed.
        pooler_output: ``(tiles, N1*N1, D)`` the model's projector output: the tokens that replace `<IMG_CONTEXT>`.
        hidden_states, attentions: the vision tower's, when requested.
        extra_lr_features: LVTC only: the ``T-1`` further LR projectors' outputs, each ``(tiles, N1*N1, D)``.
        hr_features: LVTC only (and only when ``expand_layer < depth``): the HR projector's output
            ``(tiles, N2*N2, D)``.
    """

    extra_lr_features: tuple[torch.Tensor, ...] | None = None
    hr_features: torch.Tensor | None = None


@dataclass
class InternVLXModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the projected visual features.

    With LVTC, ``last_hidden_state`` is in the short layout (pooled back per tile); ``hidden_states[i]`` is the
    input of layer ``i`` and ``attentions[i]`` the attention weights of layer ``i``, each in the layout that layer
    ran on (long for ``i >= k``); the last hidden state is the normed output in the short layout.
    ``vir_routing``: InternVL3.5-Flash's `ViRRouting` of the inputs, where this forward routed them (its outputs then
    have the routed prompt's length; ``vir_routing.source`` names the given column of each).
    """

    image_hidden_states: torch.Tensor | None = None
    vir_routing: ModelOutput | None = None


class LogitsOnRead:
    """What a forward that skipped its logits by default (training with labels) keeps to compute them when they are
    read: the LM head and the final hidden states (``(batch, seq, hidden)``, already alive for the backward).

    Logits computed after an optimizer step would come from weights that forward never used, so the LM head's
    parameter versions (bumped by every in-place update) are recorded at the forward, and a read after they changed
    raises instead of answering; a copy of the head's weight would cost one LM head of memory per output, which is
    what the lean path saves.
    """

    __slots__ = ("lm_head", "hidden_states", "versions")

    def __init__(self, lm_head: nn.Module, hidden_states: torch.Tensor):
        self.lm_head = lm_head
        self.hidden_states = hidden_states
        self.versions = self._versions()

    def _versions(self) -> tuple[int, ...] | None:
        try:
            return tuple(parameter._version for parameter in self.lm_head.parameters())
        except RuntimeError:  # weights made under torch.inference_mode keep no version (no training step updates them)
            return None

    def __call__(self) -> torch.Tensor:
        if self._versions() != self.versions:
            raise RuntimeError(
                "The logits of this training forward were skipped (skip_logits=None with labels) and the LM head's "
                "weights have changed since that forward (an optimizer step or another in-place update), so they "
                "can no longer be computed as that forward would have. Read `outputs.logits` before "
                "`optimizer.step()`, or pass `skip_logits=False` to compute them in the forward."
            )
        return self.lm_head(self.hidden_states)

    def __repr__(self) -> str:
        return f"LogitsOnRead(hidden_states={tuple(self.hidden_states.shape)})"


@dataclass
class InternVLXCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal LM output; ``logits`` always line up with ``input_ids`` (short layout), LVTC or not.

    With ``skip_logits=True`` (the LM head runs on the labelled positions only) ``logits`` is None and
    ``token_losses`` ``(batch, seq)`` holds the cross-entropy of the prediction made at each position (of
    ``labels[:, t + 1]``, or ``shift_labels[:, t]``), 0 where that label is -100. A training forward with labels
    and the default ``skip_logits=None`` returns its subclass `InternVLXLogitsOnReadOutput`. The cache field is
    transformers' (`compat.CACHE_NAME`: ``past_key_values``, ``cache`` from transformers 5.24 on). ``vir_routing``
    as in `InternVLXModelOutputWithPast`.
    """

    image_hidden_states: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    vir_routing: ModelOutput | None = None


@dataclass
class InternVLXLogitsOnReadOutput(InternVLXCausalLMOutputWithPast):
    """The output of a training forward with labels that skipped its logits by default (``skip_logits=None``): it
    keeps ``logits_on_read`` instead, and reading ``logits`` (as an attribute, ``output["logits"]``, by position or
    through ``to_tuple()``) computes them then, once, from the same forward's final hidden states (the values and the
    autograd graph of the full forward's logits), after which the output is exactly what a forward with logits
    returns. Nothing that never reads them pays for them. ``logits_on_read`` is a field, not a private attribute, so
    that it survives the wrappers that rebuild an output from its items (DDP, accelerate's float32 conversion of
    mixed-precision outputs). A class of its own: its ``__getattribute__`` is not traceable by torch.compile, which
    the outputs of evaluation and generation (the parent class) must be (``fullgraph=True``, static-cache decoding).
    """

    logits_on_read: LogitsOnRead | None = None

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        if name == "logits" and value is None:
            source = self.__dict__.get("logits_on_read")
            if source is not None and "logits_on_read" in self.keys():  # set up (after __post_init__)
                value = self._read_logits(source)
        return value

    def _read_logits(self, source: LogitsOnRead) -> torch.Tensor:
        logits = source()
        # rebuilt in field order, without the source: the output of a forward that computed its logits
        items = [(key, logits if key == "logits" else self.__dict__.get(key)) for key in
                 (f.name for f in dataclasses.fields(self) if f.name != "logits_on_read")]
        OrderedDict.clear(self)
        object.__setattr__(self, "logits_on_read", None)
        for key, value in items:
            if value is not None:
                self[key] = value
        return logits

    def __getitem__(self, k):
        if k == 0 and "loss" in self.keys():  # `outputs[0]`, the loss, as callers that take it by position do
            return super().__getitem__("loss")
        if k == "logits" or not isinstance(k, str):
            self.logits  # noqa: B018 - computed now if they were skipped: positions are those of a full output
        return super().__getitem__(k)

    def to_tuple(self) -> tuple:
        self.logits  # noqa: B018 - a tuple has its logits at their place
        return super().to_tuple()
