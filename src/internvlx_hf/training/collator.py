"""`InternVLXDataCollator`: training rows -> a padded or packed batch with labels on the assistant replies only."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..data.encoding import IGNORE_INDEX, ConversationEncoder, EncodedConversation, truncate
from ..data.formats import SampleError, sample_from_row
from ..data.images import TileBudget, load_image
from ..data.videos import expand_video, read_sample_frames

logger = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("token", "sample", "square")


def sample_weight(num_labels: int, loss_reduction: str) -> float:
    """The weight of each labelled token of a sample with ``num_labels`` of them (InternVL's ``len2weight``)."""
    if loss_reduction == "token":
        return 1.0
    if loss_reduction == "sample":
        return 1.0 / num_labels
    if loss_reduction == "square":
        return num_labels ** -0.5
    raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {loss_reduction!r}")


class InternVLXDataCollator:
    r"""
    Builds training batches for InternVL-X / InternVL2 checkpoints from chat rows.

    Each row is a TRL-style ``{"messages": [...], "images": [...]}`` or an InternVL ``{"conversations": [...],
    "image": ...}`` row (what `InternVLXDataset` yields, or rows of a `datasets.Dataset`). For every row the images
    are tiled by the processor's image processor with its RVTC settings (``tiling``, ``max_tiles``; a row's
    ``max_tiles`` wins, and a row with N images gives each ``max(1, max_tiles // N)``), the
    conversation is rendered with the checkpoint's chat template and tokenized, and labels are set on the assistant
    replies and their end-of-turn token only (-100 for system and user turns, template headers, BOS, every
    `<img>` / `<IMG_CONTEXT>` / `</img>` and padding). See `internvlx_hf.data.encoding` for how replies are
    located from token boundaries.

    A row longer than ``max_length`` keeps its first ``max_length`` tokens and the labels of the replies among them,
    as InternVL's preprocessing does; a cut inside an image block moves to just before the block and the images
    after the cut are left out (see `internvlx_hf.data.encoding.truncate`). When no reply token is left, or a
    row is broken (missing/corrupt image, `<image>` count != images, a misplaced system turn), the row is dropped
    with a warning and counted in ``skipped`` (per process: DataLoader workers keep their own counts). Raw InternVL
    rows given here directly take relative image paths from the current directory; `InternVLXDataset` resolves them
    against the dataset's ``root`` first.

    Args:
        processor ([`InternVLXProcessor`]): the checkpoint's processor (fast tokenizer, chat template, image processor).
        max_length (`int`, *optional*): longest sequence in tokens (image tokens included).
        packing (`bool`, defaults to `False`): put all rows of the batch into one row without padding, with
            ``position_ids`` restarting at 0 for every sample and no ``attention_mask`` (attention stays inside each
            sample; LVTC models support such rows). Otherwise rows are padded on the right.
        pad_to_multiple_of (`int`, *optional*): pad (or, when packing, fill) the length up to a multiple of this.
        loss_reduction (`str`, defaults to `"token"`): how the loss averages over the labelled tokens, InternVL's
            ``--loss_reduction``: ``"token"`` (every token counts alike: the Trainer's own loss; the batch gets no
            weights), ``"sample"`` (every sample counts alike: each of its n labelled tokens weighs 1/n) or
            ``"square"`` (each weighs 1/sqrt(n)). With packing, each packed sample is a sample. The weights go in
            ``loss_weight``, which `InternVLXTrainer` turns into the loss.

    Returns a dict: ``input_ids``, ``labels``, ``attention_mask`` (padded) or ``position_ids`` and
    ``use_cache=False`` (packed), ``loss_weight`` (float, the shape of ``labels``, 0 where a label is -100; not with
    ``loss_reduction="token"``), and, when the batch has images, ``pixel_values`` (all tiles, in order) and
    ``num_patches`` (tiles per image).
    """

    def __init__(self, processor, max_length: int | None = None, packing: bool = False,
                 pad_to_multiple_of: int | None = None, loss_reduction: str = "token"):
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.processor = processor
        self.encoder = ConversationEncoder(processor)
        self.budget = TileBudget(processor.image_processor)
        self.max_length = max_length
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        pad_id = processor.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = processor.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set `processor.tokenizer.pad_token`.")
        self.pad_token_id = pad_id
        self.skipped: Counter = Counter()

    def _drop(self, source: str, reason: str, error: Exception) -> None:
        self.skipped[reason] += 1
        message = str(error)
        if not message.startswith(source):
            message = f"{source}: {message}"
        logger.warning("dropping %s (%s; %d dropped by the collator so far)", message, reason,
                       sum(self.skipped.values()))

    def encode_row(self, row: dict[str, Any], index: int = 0) \
            -> tuple[EncodedConversation, torch.Tensor | None, list[int]] | None:
        """One row's (encoded conversation, pixel values, tiles per image), or None if it was dropped."""
        source = str(row.get("source") or f"batch row {index}") if isinstance(row, Mapping) else f"batch row {index}"
        try:
            sample = sample_from_row(row, source=source, keep_leading_reply=self.encoder.keep_leading_reply)
        except SampleError as error:
            self._drop(source, error.reason, error)
            return None
        pixel_values, tiles = None, []
        if sample.video is not None:  # a video row passed to the collator directly (InternVLXDataset expands them)
            try:
                sample = expand_video(sample, read_sample_frames(sample))
            except SampleError as error:
                self._drop(source, error.reason, error)
                return None
        if sample.images:
            try:
                images = [load_image(image, i) for i, image in enumerate(sample.images)]
                options = self.budget.options(sample.max_tiles, len(images))
                out = self.processor.image_processor(images, return_tensors="pt", **options)
            except (ValueError, OSError, TypeError) as error:
                self._drop(source, "undecodable image", error)
                return None
            pixel_values, tiles = out["pixel_values"], [int(n) for n in out["num_patches"]]
        try:
            encoded = truncate(self.encoder.encode(sample.messages, tiles, source=source), self.max_length, source)
        except SampleError as error:
            self._drop(source, error.reason, error)
            return None
        if encoded.num_images < len(tiles):  # images after the cut
            tiles = tiles[: encoded.num_images]
            pixel_values = pixel_values[: sum(tiles)] if tiles else None
        return encoded, pixel_values, tiles

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [item for item in (self.encode_row(row, i) for i, row in enumerate(rows)) if item is not None]
        if not kept:
            raise ValueError(
                f"every row of this batch of {len(rows)} was dropped ({dict(self.skipped)}); check the warnings "
                "above, or load the data with InternVLXDataset, which skips unusable rows before training."
            )
        return self.collate(kept)

    def collate(self, kept: list[tuple[EncodedConversation, torch.Tensor | None, list[int]]]) \
            -> dict[str, torch.Tensor]:
        """The batch of rows encoded by `encode_row` (at least one)."""
        batch = self._pack(kept) if self.packing else self._pad(kept)
        if self.loss_reduction != "token":
            batch["loss_weight"] = self._loss_weight(kept, batch["labels"])
        pixel_values = [pv for _, pv, _ in kept if pv is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["num_patches"] = torch.tensor([n for _, _, tiles in kept for n in tiles], dtype=torch.long)
        return batch

    def _loss_weight(self, kept, labels: torch.Tensor) -> torch.Tensor:
        """InternVL's per-token weights (its ``len2weight``): each sample's labelled tokens weigh
        ``sample_weight(n)`` with n the sample's labelled tokens."""
        weights = torch.zeros(labels.shape, dtype=torch.float32)
        offset = 0
        for row, (encoded, _, _) in enumerate(kept):
            weight = sample_weight(encoded.num_labels, self.loss_reduction)
            if self.packing:
                weights[0, offset:offset + encoded.length] = weight
                offset += encoded.length
            else:
                weights[row, :encoded.length] = weight
        return weights.masked_fill(labels == IGNORE_INDEX, 0.0)

    def _round_up(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return -(-length // multiple) * multiple if multiple else length

    def _pad(self, kept) -> dict[str, torch.Tensor]:
        length = self._round_up(max(encoded.length for encoded, _, _ in kept))
        input_ids = torch.full((len(kept), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), length), dtype=torch.long)
        for row, (encoded, _, _) in enumerate(kept):
            n = encoded.length
            input_ids[row, :n] = torch.tensor(encoded.input_ids)
            labels[row, :n] = torch.tensor(encoded.labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, kept) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for encoded, _, _ in kept:
            input_ids.extend(encoded.input_ids)
            # The first token of a sample must not be predicted from the previous sample's last token.
            labels.extend([IGNORE_INDEX] + encoded.labels[1:])
            position_ids.extend(range(encoded.length))
        fill = self._round_up(len(input_ids)) - len(input_ids)
        if fill:  # the filler is a sequence of its own (positions from 0), never attended to by real samples
            input_ids.extend([self.pad_token_id] * fill)
            labels.extend([IGNORE_INDEX] * fill)
            position_ids.extend(range(fill))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            # Samples are told apart by their position resets only while no KV cache is built (a model with
            # `use_cache=True` would otherwise let them attend to each other).
            "use_cache": False,
        }


__all__ = ["LOSS_REDUCTIONS", "InternVLXDataCollator", "sample_weight"]
