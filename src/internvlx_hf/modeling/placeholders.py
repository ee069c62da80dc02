"""Image placeholders (`<IMG_CONTEXT>`, `<img>`, `</img>`) kept out of what is not an image: a draft of assisted decoding
ends before one, and labels that name one are left out of the loss.

Saved next to checkpoints as remote code: imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class DraftsWithoutPlaceholders:
    """Wraps a transformers candidate generator (assisted / prompt-lookup decoding) so that a draft ends before its
    first `<IMG_CONTEXT>`: prompt lookup copies continuations from the prompt, image runs included, and a drafted
    placeholder has no tile behind it (the target's first forward would find more image tokens than tiles)."""

    def __init__(self, generator, image_token_id: int):
        self._generator = generator
        self._image_token_id = image_token_id

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        candidate_ids, candidate_logits = self._generator.get_candidates(input_ids, **kwargs)
        start = input_ids.shape[1]
        placeholder = (candidate_ids[:, start:] == self._image_token_id).any(0)
        if bool(placeholder.any()):
            keep = int(placeholder.int().argmax())
            candidate_ids = candidate_ids[:, : start + keep]
            candidate_logits = candidate_logits[:, :keep] if candidate_logits is not None else None
        return candidate_ids, candidate_logits


def ignore_placeholder_label_kwargs(model, args, kwargs):
    """Forward pre-hook of `InternVLXForConditionalGeneration`: ``labels`` / ``shift_labels`` that name an image
    placeholder become -100 before any LM head reads them (a collator with ``labels = input_ids``, TRL's default,
    labels every `<IMG_CONTEXT>`)."""
    # Whether the labels named placeholders is read on the host (a device synchronisation), so it is asked once per
    # model: on the first forward with images whose token count matters (training, or a given count). A collator
    # that labels placeholders does so in every image batch; the masking itself runs on every call, without a sync.
    check = not model._placeholder_labels_checked and kwargs.get("pixel_values") is not None \
        and (model.training or kwargs.get("num_items_in_batch") is not None)
    found = False
    for key in ("labels", "shift_labels"):
        labels = kwargs.get(key)
        if torch.is_tensor(labels):
            ignored = model._ignore_placeholder_labels(labels)
            if check:
                found = found or bool((ignored != labels).any())
            kwargs[key] = ignored
    if check and any(torch.is_tensor(kwargs.get(key)) for key in ("labels", "shift_labels")):
        model._placeholder_labels_checked = True
    if found:
        # transformers' Trainer and TRL count the loss's tokens (num_items_in_batch) from the batch's labels before
        # this call, over every micro-batch of the step and every rank: the count cannot be corrected here.
        logger.warning_once(
            "labels mark image placeholders (<IMG_CONTEXT>, <img>, </img>) as targets, as a collator with "
            "labels = input_ids does (TRL's default). The model leaves them out of the loss, but a trainer that "
            "counts the loss's tokens from the batch's labels (num_items_in_batch: transformers' Trainer, TRL) "
            "counts them too, so the loss is divided by more tokens than it has. Label the replies only: "
            "data_collator=InternVLXDataCollator(processor), or set these ids to -100 in your collator."
        )
    return args, kwargs
