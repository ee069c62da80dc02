"""vLLM's multimodal processing for InternVL-X: this package's processor cuts the tiles, vLLM places the tokens.

vLLM tokenizes the prompt itself and calls the processor on the images and videos alone; each `<image>` of the
prompt is then replaced by `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, and each `<video>` by
InternVL's `Frame1: <image>\\nFrame2: <image>...` lines with every frame one tile, exactly the text that
[`InternVLXProcessor`] builds for transformers. The tiling (RVTC mode, tile budget, thumbnail) is the checkpoint's
`processor_config.json`; `mm_processor_kwargs` (e.g. `{"max_tiles": 6}`) override it per server or per request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageSize, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from ..modeling.configuration_internvlx import LVTCConfig
from ..processing import InternVLXProcessor
from ..processing.chat_templates import bos_prefix, parse_chat_template, reserved_tag_message
from ..processing.video import VIDEO_PLACEHOLDER, video_prompt
from .lvtc.geometry import lvtc_geometry_of
from .prompt_text import ImageTokens, expand_tags, item_spans, recover_prompt_text, split_bos


_TAGS_ONLY = re.compile("(?:<image>|" + re.escape(VIDEO_PLACEHOLDER) + ")*")


def _warn_if_chat_lacks_bos(processor: InternVLXProcessor) -> None:
    """vLLM's chat routes tokenize the rendered template without special tokens. The project's templates write the BOS
    that transformers' processor adds for the sentencepiece families (the processor gives a folder's older template
    that text when it loads, `chat_templates.for_tokenizer`); a template of the user's own that does not is said at
    start: prompts with images get the BOS from `_place_as_transformers`, text-only chat requests do not reach the
    plugin."""
    tokenizer = processor.tokenizer
    template = processor.chat_template if isinstance(processor.chat_template, str) else ""
    if not template or "bos_token" in template or (parse_chat_template(template) or ("", ""))[1]:
        return
    if bos_prefix(tokenizer, template) == "":  # the tokenizer adds nothing in front (Qwen2)
        return
    from vllm.logger import init_logger

    init_logger("internvlx_hf.vllm").warning(
        "InternVL-X: this chat template does not write the BOS token %r that transformers' processor adds; vLLM's "
        "chat routes add none, so text-only chat requests need \"add_special_tokens\": true (LLM.chat: "
        "tokenization_kwargs={\"add_special_tokens\": True}); requests with images get it without",
        tokenizer.bos_token)


#: Why an LVTC checkpoint takes no `image_embeds` (given where vLLM parses the request, whatever their width).
LVTC_TAKES_NO_EMBEDS = ("InternVL-X: this checkpoint uses LVTC, whose LLM takes each tile's high-resolution features "
                        "too; image_embeds (the projector's output) cannot give them: send the images themselves")


class _NoImageEmbeddings(MultiModalDataParser):
    """vLLM's parser (as vLLM's own models subclass it), refusing precomputed image embeddings (LVTC checkpoints)."""

    def _parse_image_data(self, data):
        if self.is_embeddings(data):
            raise ValueError(LVTC_TAKES_NO_EMBEDS)
        return super()._parse_image_data(data)


class InternVLXProcessingInfo(BaseProcessingInfo):
    """What vLLM asks about the inputs of an InternVL-X checkpoint: limits, token counts, the processor."""

    def get_data_parser(self) -> MultiModalDataParser:
        parser = super().get_data_parser()
        if LVTCConfig.of(self.get_hf_config()) is None:
            return parser
        return _NoImageEmbeddings(expected_hidden_size=parser.expected_hidden_size,
                                  allow_missing_mm_embeddings=parser.allow_missing_mm_embeddings)

    @cached_property
    def _processor(self) -> InternVLXProcessor:
        # The served folder or Hub repository at the served revision (`--revision`), with vLLM's own tokenizer
        # (`--tokenizer`, `--tokenizer-revision`, `--tokenizer-mode`), so that the image tokens' ids are those of the
        # tokenizer that makes the prompt. (vLLM's `get_hf_processor` would first load the folder's own tokenizer,
        # which a folder served with `--tokenizer` may not have.)
        processor = InternVLXProcessor.from_pretrained(self.model_id, revision=self.ctx.model_config.revision,
                                                       tokenizer=self.get_tokenizer())
        _warn_if_chat_lacks_bos(processor)
        return processor

    def get_hf_processor(self, **kwargs: object) -> InternVLXProcessor:
        return self._processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    @cached_property
    def layout(self):
        """The LVTC layout of the checkpoint (None for models without LVTC expansion)."""
        return lvtc_geometry_of(self.get_hf_config())

    @property
    def tokens_per_tile(self) -> int:
        """Placeholder tokens per tile in the prompt vLLM schedules: `image_seq_length`, or with LVTC the long
        layout's count (every tile is scheduled at its high-resolution size, see `lvtc/geometry.py`)."""
        layout = self.layout
        return layout.long_per_tile if layout is not None else self.get_hf_config().image_seq_length

    def _images_kwargs(self, mm_kwargs: Mapping[str, object] | None) -> dict[str, Any]:
        """The image processor's options among the server's `mm_processor_kwargs` and a request's (which win)."""
        known = set(self._processor.image_processor.valid_kwargs.__annotations__)
        merged = self.ctx.get_merged_mm_kwargs(dict(mm_kwargs or {}))
        return {key: value for key, value in merged.items() if key in known}

    def get_num_tiles(self, *, image_width: int, image_height: int,
                      mm_kwargs: Mapping[str, object] | None = None) -> int:
        return self._processor.image_processor.get_number_of_image_patches(
            int(image_height), int(image_width), self._images_kwargs(mm_kwargs)
        )

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.tokens_per_tile * self.get_num_tiles(image_width=image_width, image_height=image_height)

    def get_image_size_with_most_features(self) -> ImageSize:
        # Every tile grid within the budget, at its native size: the largest tile count among them is the most any
        # image can take (RVTC's caps only ever lower a budget).
        image_processor = self._processor.image_processor
        side = image_processor.image_size
        budget = int(self._images_kwargs(None).get("max_tiles", image_processor.max_tiles))
        best, best_size = 0, ImageSize(width=side, height=side)
        for cols in range(1, budget + 1):
            for rows in range(1, budget // cols + 1):
                size = ImageSize(width=cols * side, height=rows * side)
                tiles = self.get_num_tiles(image_width=size.width, image_height=size.height)
                if tiles > best:
                    best, best_size = tiles, size
        return best_size

    def get_max_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        image_tokens = self.get_max_image_tokens() * mm_counts.get("image", 0)
        # a frame costs its tile's tokens, `<img>`, `</img>` and its `FrameN: ` line (about 5 tokens)
        frames = (seq_len - image_tokens) // (self.tokens_per_tile + 8) // max(mm_counts.get("video", 0), 1)
        return max(frames, 1)

    def image_replacement(self, tiles: int) -> PromptUpdateDetails:
        """`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, the embeddings at `<IMG_CONTEXT>`."""
        processor = self._processor
        ids = [processor.start_image_token_id] + [processor.image_token_id] * (self.tokens_per_tile * tiles)
        return PromptUpdateDetails.select_token_id(ids + [processor.end_image_token_id], processor.image_token_id)

    def video_replacement(self, frames: int) -> PromptUpdateDetails:
        """InternVL's `Frame1: <image>\\n...` lines, each `<image>` a one-tile image."""
        processor = self._processor
        tokenizer = self.get_tokenizer()
        ids: list[int] = []
        for index, line in enumerate(video_prompt(frames).split("\n")):
            before, _, after = line.partition(processor.image_placeholder)
            text = ("\n" if index else "") + before
            ids += tokenizer.encode(text, add_special_tokens=False)
            ids += self.image_replacement(1).full
            ids += tokenizer.encode(after, add_special_tokens=False) if after else []
        return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)


class InternVLXDummyInputsBuilder(BaseDummyInputsBuilder[InternVLXProcessingInfo]):
    """The largest inputs, for vLLM's memory profiling at start-up."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0) + VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        side = self.info._processor.image_processor.image_size
        mm_options = mm_options or {}
        return {
            "image": self._get_dummy_images(width=size.width, height=size.height,
                                            num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")),
            "video": self._get_dummy_videos(width=side, height=side,
                                            num_frames=self.info.get_num_frames_with_most_features(seq_len, mm_counts),
                                            num_videos=mm_counts.get("video", 0), overrides=mm_options.get("video")),
        }


def _frames(video: Any) -> Any:
    """vLLM hands a loaded video as `(frames, metadata)`; the processor takes the frames."""
    return video[0] if isinstance(video, tuple) else video


class InternVLXMultiModalProcessor(BaseMultiModalProcessor[InternVLXProcessingInfo]):
    """Tiles images and frames with this package's processor; `<image>` / `<video>` become their tokens."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor()
        images_kwargs = self.info._images_kwargs(hf_kwargs)
        out: dict[str, Any] = {}
        images = hf_data.get("images")
        if images:
            done = self.info.ctx.call_hf_processor(processor, {"images": list(images)}, images_kwargs)
            out["pixel_values"] = done["pixel_values"]
            out["image_num_patches"] = done["num_patches"]
        videos = hf_data.get("videos")
        if videos:
            videos = [_frames(video) for video in videos]
            done = self.info.ctx.call_hf_processor(processor, {"videos": videos}, images_kwargs)
            out["pixel_values_videos"] = done["pixel_values"]
            out["video_num_frames"] = torch.tensor([len(video) for video in videos])
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        image_tiles = hf_inputs.get("image_num_patches", torch.empty(0, dtype=torch.long))
        video_frames = hf_inputs.get("video_num_frames", torch.empty(0, dtype=torch.long))
        return dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", image_tiles),
            image_num_patches=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            image_embeds=MultiModalFieldConfig.batched("image"),
            pixel_values_videos=MultiModalFieldConfig.flat_from_sizes("video", video_frames),
            video_num_frames=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        )

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates):
        """Each item's tokens in its place, with the prompt ids transformers' processor gives (`prompt_text.py`);
        vLLM's own matching of the tags' token ids only where the ids are not a tokenized text (a prompt given as
        ids). A prompt text whose tags do not match its items is refused, never placed some other way."""
        placed = self._place_as_transformers(token_ids, mm_prompt_updates)
        if placed is not None:
            return placed
        try:
            return super()._apply_prompt_updates(token_ids, mm_prompt_updates)
        except RuntimeError as error:
            raise ValueError(
                "InternVL-X: cannot find the `<image>` / `<video>` tags of this prompt: its token ids are not what the "
                "checkpoint's tokenizer gives for any text; send the prompt as text (or as the ids the tokenizer "
                f"gives for it), with one tag per image and video ({error})"
            ) from None

    def _place_as_transformers(self, token_ids: list[int], mm_prompt_updates):
        from vllm.multimodal.processing.processor import PlaceholderFeaturesInfo

        processor = self.info.get_hf_processor()
        tokenizer = self.info.get_tokenizer()
        for token, token_id in ((processor.start_image_token, processor.start_image_token_id),
                                (processor.end_image_token, processor.end_image_token_id),
                                (processor.image_token, processor.image_token_id)):
            if token_id in token_ids:  # typed by the client: only the expansion below writes them
                raise ValueError(reserved_tag_message(token))
        bos, body = split_bos(tokenizer, token_ids)
        recovered = recover_prompt_text(tokenizer, body)
        if recovered is None:
            return None
        text, add_special_tokens = recovered
        tokens = ImageTokens(processor.start_image_token, processor.image_token, processor.end_image_token,
                             processor.start_image_token_id, processor.image_token_id, processor.end_image_token_id)

        def blocks(update) -> list[int]:
            """`<IMG_CONTEXT>` count of each `<img>` block of an item's replacement."""
            counts, count = [], None
            for token in update.content.full:
                if token == tokens.start_id:
                    count = 0
                elif token == tokens.context_id and count is not None:
                    count += 1
                elif token == tokens.end_id and count is not None:
                    counts.append(count)
                    count = None
            return counts

        updates = {modality: [alternatives[0] for alternatives in items]
                   for modality, items in mm_prompt_updates.items()}
        image_blocks = [blocks(update) for update in updates.get("image", [])]
        video_blocks = [blocks(update) for update in updates.get("video", [])]
        # (a tag typed as text, or too few tags: a ValueError, which vLLM answers with a 400 naming it)
        expanded_text, items = expand_tags(text, [sum(b) for b in image_blocks], [len(b) for b in video_blocks],
                                           self.info.tokens_per_tile, tokens)
        # with the one BOS transformers' processor gives, whatever the route's own default (vLLM's chat route tokenizes
        # without special tokens, completions with them; a folder's older template wrote no `<s>`)
        # (`verbose=False`: the length is checked against max_model_len below; the tokenizer's own limit is not vLLM's,
        # and a `--tokenizer-mode` of the user's keeps it, `tokenizer.py`)
        ids = bos + list(tokenizer.encode(expanded_text, add_special_tokens=add_special_tokens and not bos,
                                          verbose=False))
        limit = self.info.ctx.model_config.max_model_len
        if len(ids) >= limit and not _TAGS_ONLY.fullmatch(text):  # (tags alone: vLLM's profiling prompt)
            raise ValueError(
                f"the prompt with its images and videos is {len(ids)} tokens{self._long_layout_note(ids)}, and "
                f"max_model_len is {limit} (prompt and answer together): start vLLM with --max-model-len "
                f"{len(ids) + 1} or more (`LLM(..., max_model_len=...)`), or send fewer or smaller images (or a lower "
                "max_tiles in mm_processor_kwargs)")
        per_item = {"image": image_blocks, "video": video_blocks}
        spans = item_spans(ids, items, lambda modality, item: per_item[modality][item] if modality == "video"
                           else [sum(per_item[modality][item])], tokens)
        if spans is None:  # the expansion is ours: its blocks are always found
            raise RuntimeError("InternVL-X: the expanded prompt's image blocks are not those placed")
        placeholders: dict[str, list] = {}
        for span in spans:
            piece = ids[span.start: span.end]
            placeholders.setdefault(span.modality, []).append(PlaceholderFeaturesInfo(
                modality=span.modality, item_idx=span.item, start_idx=span.start, tokens=piece,
                is_embed=torch.tensor(piece) == tokens.context_id,
            ))
        for modality in placeholders:
            placeholders[modality].sort(key=lambda info: info.item_idx)
        return ids, placeholders

    def _long_layout_note(self, ids: list[int]) -> str:
        """How vLLM counts an LVTC prompt (each tile at the long layout), beside transformers' count; "" without."""
        layout = self.info.layout
        if layout is None:
            return ""
        context = ids.count(self.info.get_hf_processor().image_token_id)
        short = len(ids) - context + context // layout.long_per_tile * layout.short_per_tile
        return (f" as vLLM counts it (LVTC: {layout.long_per_tile} tokens per image tile, the layers >= k's layout; "
                f"transformers counts {layout.short_per_tile} per tile, {short} tokens for this prompt)")

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        data = out_mm_kwargs.get_data()
        video_frames = [int(n) for n in data.get("video_num_frames", [])]
        tokenizer = self.info.get_tokenizer()
        if "image" in mm_items and isinstance(mm_items["image"], ImageEmbeddingItems):
            embeds = mm_items["image"]
            image_tiles = [self._tiles_of_embeds(embeds.get_feature_size(index), index)
                           for index in range(embeds.get_count())]
        else:
            image_tiles = [int(n) for n in data.get("image_num_patches", [])]
        return [
            PromptReplacement(modality="image",
                              target=tokenizer.encode("<image>", add_special_tokens=False),
                              replacement=lambda index: self.info.image_replacement(image_tiles[index])),
            PromptReplacement(modality="video",
                              target=tokenizer.encode(VIDEO_PLACEHOLDER, add_special_tokens=False),
                              replacement=lambda index: self.info.video_replacement(video_frames[index])),
        ]

    def _tiles_of_embeds(self, rows: int, index: int) -> int:
        """Tiles of an image given as `image_embeds` (the projector's output, `rows` x the LLM's width): its rows
        are the image's `<IMG_CONTEXT>` tokens, `image_seq_length` a tile. LVTC checkpoints take images only: their
        LLM also needs each tile's high-resolution projector output, which a projector output alone does not hold."""
        config = self.info.get_hf_config()
        if LVTCConfig.of(config) is not None:  # (the parser refuses them first: `_NoImageEmbeddings`)
            raise ValueError(LVTC_TAKES_NO_EMBEDS)
        per_tile = config.image_seq_length
        if rows < 1 or rows % per_tile:
            raise ValueError(
                f"InternVL-X: image_embeds of image {index} has {rows} rows; an image's projector output has "
                f"{per_tile} rows per tile (image_seq_length): pass model.get_image_features(pixel_values)"
                ".pooler_output of the image's tiles, reshaped to (tiles * {per_tile}, hidden_size)")
        return rows // per_tile
