# Copyright 2025 The internvlx-hf developers. Licensed under the Apache License, Version 2.0.
"""Processor for InternVL2 / InternVL-X: image tiles + prompt text with each `<image>` expanded to its tokens.

This file is copied next to checkpoints as remote code: it imports only the standard library, torch, transformers
and its sibling files.
"""

import re
from typing import Any, TypedDict

import torch

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .chat_templates import (
    DEFAULT_CHAT_TEMPLATE,
    for_tokenizer,
    get_chat_template,
    parse_chat_template,
    starts_with_bos,
    turn_end_text,
)
from .image_processing_internvlx import InternVLXImageProcessor, InternVLXImageProcessorKwargs, flatten_images
from .video import VIDEO_PLACEHOLDER, flatten_videos, is_video, load_video, video_prompt


logger = logging.get_logger(__name__)


class InternVLXVideosKwargs(TypedDict, total=False):
    r"""
    num_frames (`int`, *optional*, defaults to 8):
        Frames taken from a video file or frame folder (InternVL2's `num_segments`; its model cards use 8).
    bound (`tuple[float, float]`, *optional*):
        `(start, end)` in seconds: frames are picked from that span only.
    fps (`float`, *optional*):
        Frame rate of a frame folder or of in-memory frames (for `bound`); default 1, as InternVL assumes.
    do_sample_frames (`bool`, *optional*):
        Pick `num_frames` frames (the default for files and folders) or keep every frame (the default for frames
        passed in memory).
    """

    num_frames: int
    bound: tuple[float, float] | None
    fps: float | None
    do_sample_frames: bool | None


class InternVLXProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: InternVLXImageProcessorKwargs
    videos_kwargs: InternVLXVideosKwargs
    # A batch of prompts is padded (on the left, see `InternVLXProcessor.__init__`) to its longest prompt, so that
    # `return_tensors="pt"` works without `padding=True`; one prompt is never padded. `padding=False` turns it off.
    _defaults = {"text_kwargs": {"padding": "longest"}, "videos_kwargs": {"num_frames": 8}}


class InternVLXProcessor(ProcessorMixin):
    r"""
    Processor of InternVL2 / InternVL-X checkpoints: an [`InternVLXImageProcessor`], a tokenizer and a chat template.

    In the text, every `<image>` stands for the next image; it becomes `<img>` + `<IMG_CONTEXT>` x
    (`image_seq_length` x tiles of that image) + `</img>`, as in InternVL2's `chat()`. A batch of prompts is padded
    to its longest one, on the left (for generation) unless `padding_side="right"` is passed (`padding=False` to
    keep the lengths).

    Args:
        image_processor ([`InternVLXImageProcessor`]):
            Tiles and normalizes the images (tiling mode, `max_tiles`, ... can be overridden per call).
        tokenizer ([`PreTrainedTokenizerBase`]):
            A tokenizer that has `<img>`, `</img>` and `<IMG_CONTEXT>` in its vocabulary.
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to InternVL2's `internlm2-chat` (= `Hermes-2`) template. See
            `internvlx_hf.processing.CHAT_TEMPLATES` for the others. One of those templates is given the BOS text
            the tokenizer needs (`chat_templates.for_tokenizer`: `<s>` for InternLM2, `<s> ` for Phi-3), so that
            routes that tokenize the rendered text without special tokens (vLLM's chat routes) get the same ids; a
            folder saved before templates carried it is fixed here, with one log line.
        image_seq_length (`int`, *optional*, defaults to 256):
            `<IMG_CONTEXT>` tokens per tile: the model config's `image_seq_length` (for LVTC models, the
            low-resolution count that the input ids carry).
    """

    valid_processor_kwargs = InternVLXProcessorKwargs

    image_placeholder = "<image>"
    start_image_token = "<img>"
    end_image_token = "</img>"
    image_token = "<IMG_CONTEXT>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 256, **kwargs):
        if chat_template is None:
            chat_template = get_chat_template(DEFAULT_CHAT_TEMPLATE, tokenizer)
        else:
            chat_template = self._with_bos_for(chat_template, tokenizer)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be an integer >= 1, got {image_seq_length!r}")
        self.image_seq_length = image_seq_length

        vocab = tokenizer.get_vocab()
        missing = [t for t in (self.start_image_token, self.end_image_token, self.image_token) if t not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the image tokens {missing}; add them with "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': {missing}}})` (and resize the model's "
                "embeddings) or use the tokenizer saved with the checkpoint."
            )
        self.image_token_id = vocab[self.image_token]
        self.start_image_token_id = vocab[self.start_image_token]
        self.end_image_token_id = vocab[self.end_image_token]
        # Generation appends new tokens on the right, so prompts of a batch are padded on the left by default; set
        # `processor.tokenizer.padding_side` or pass `padding_side=` to a call to change it.
        self.tokenizer.padding_side = "left"

    @staticmethod
    def _with_bos_for(chat_template, tokenizer):
        """The template with the BOS text its tokenizer needs (`for_tokenizer`); the tokenizer's own copy of the old
        template is replaced too, so that `tokenizer.apply_chat_template` renders the same text."""
        fixed, changed = for_tokenizer(chat_template, tokenizer)
        if not changed:
            return chat_template
        name, _ = parse_chat_template(chat_template)
        logger.warning_once(
            f"InternVL-X: this chat template ({name}) does not start with the BOS token {tokenizer.bos_token!r} that "
            "transformers' processor adds for this tokenizer, so routes that tokenize the rendered text without "
            "special tokens (vLLM's chat completions, tokenizer.apply_chat_template(tokenize=True)) lost it; using "
            "the template that writes it (the folder was saved by an earlier internvlx-hf; to keep the fix, save the "
            "processor into the folder: InternVLXProcessor.from_pretrained(folder).save_pretrained(folder))")
        if getattr(tokenizer, "chat_template", None) == chat_template:
            tokenizer.chat_template = fixed
        return fixed

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `apply_chat_template`, rendering the text without the BOS that the template writes for
        routes that tokenize it without special tokens (`write_bos=False`, see `chat_templates`): the text is the
        reference's, and this processor's tokenization (with `tokenize=True` too), `LLM.generate` and vLLM's
        completions add the BOS to it."""
        template = chat_template if isinstance(chat_template, str) and "{" in chat_template else self.chat_template
        if isinstance(template, str) and "write_bos" in template:  # (a variable only of templates that write it)
            kwargs.setdefault("write_bos", False)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.start_image_token_id, self.end_image_token_id]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is always ours, so load it directly: this works for the installed package without
        # AutoImageProcessor registration and for remote code (where this class and its sibling are the copies).
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        subfolder = kwargs.pop("subfolder", "")
        # A tokenizer given by the caller (vLLM passes the one its `--tokenizer` names) is used as it is.
        tokenizer = kwargs.pop("tokenizer", None)
        image_processor = InternVLXImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        if tokenizer is not None:
            return [image_processor, tokenizer]
        # The tokenizer loader reads config.json (model_type internvlx): without the flag passed on, a machine
        # without internvlx_hf would ask interactively whether to run the checkpoint's code.
        if trust_remote_code is not None:
            kwargs["trust_remote_code"] = trust_remote_code
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        **kwargs: Unpack[InternVLXProcessorKwargs],
    ) -> BatchFeature:
        """
        Tokenize `text` (one prompt or a batch), tile `images` and sample `videos`, expanding each `<image>` and
        `<video>` in order.

        A prompt that starts with the tokenizer's BOS token (as the chat templates write it for the sentencepiece
        families) gets no second one, unless `add_special_tokens` is passed.

        A video becomes `num_frames` frames of one 448px tile each (no tiling, no thumbnail), and its `<video>` tag
        the lines `Frame1: <image>\\nFrame2: <image>...`, as InternVL2's model cards build video prompts.

        Args:
            images: one image, a flat list of images in the order of the `<image>` tags across the batch, or a list
                of lists (the images of each prompt). Images are PIL images, file paths, or uint8 arrays/tensors.
            text: a prompt or a list of prompts containing one `<image>` per image and one `<video>` per video.
            videos: one video, a list of videos in `<video>` order, or a list of lists (the videos of each prompt).
                A video is a file path (PyAV), a folder of frame images, a list of PIL images / uint8 arrays, or a
                uint8 array `(frames, H, W, C)`.
            **kwargs: tokenizer options (`padding`, `padding_side`, `return_tensors`, ...), image processor options
                (`max_tiles`, `tiling`, `min_tiles`, `use_thumbnail`, ...) and video options (`num_frames`,
                `bound`, `fps`, `do_sample_frames`) for this call.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (when `text` is given) and `pixel_values`,
            `num_patches`, `tile_grid` (when `images` or `videos` are given; one entry per image and per frame, in
            the order of their tags).
        """
        if text is None and images is None and videos is None:
            raise ValueError("InternVLXProcessor needs `text`, `images`, `videos` or a combination.")
        output_kwargs = self._merge_kwargs(
            InternVLXProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        images_kwargs = output_kwargs["images_kwargs"]
        text_kwargs = output_kwargs["text_kwargs"]
        image_seq_length = images_kwargs.pop("image_seq_length", None) or self.image_seq_length
        return_tensors = text_kwargs.get("return_tensors", images_kwargs.get("return_tensors"))

        prompts = None
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(prompt, str) for prompt in prompts):
                raise TypeError("`text` must be a string or a list of strings.")
        flat_images = self._check_image_layout(images, text) if images is not None else []
        flat_videos = self._check_video_layout(videos, prompts) if videos is not None else []
        if prompts is not None:
            for name, tag, given in (("image", self.image_placeholder, images), ("video", VIDEO_PLACEHOLDER, videos)):
                tags = sum(prompt.count(tag) for prompt in prompts)
                if tags and given is None:
                    raise ValueError(
                        f"The text has {tags} `{tag}` tag(s) but no {name}s were passed; pass one {name} per tag (in "
                        "order) or remove the tags."
                    )

        image_inputs = self._process_visuals(flat_images, flat_videos, prompts, images_kwargs,
                                             output_kwargs["videos_kwargs"])
        frame_counts = iter(image_inputs.pop("_frames_per_video", []))
        if prompts is None:
            return BatchFeature(data=image_inputs, tensor_type=return_tensors)
        # Each `<video>` becomes its frames' `FrameN: <image>` lines; the `<image>`s are expanded with the rest.
        prompts = [re.sub(VIDEO_PLACEHOLDER, lambda _: video_prompt(next(frame_counts)), prompt) for prompt in prompts]
        num_patches = [int(n) for n in image_inputs.get("num_patches", [])]
        prompts = self._expand_image_tags(prompts, num_patches, image_seq_length)

        if not self._special_tokens_given(kwargs) and starts_with_bos(self.tokenizer, prompts):
            # the chat template wrote the BOS (`chat_templates.bos_prefix`): the same ids as the text without it
            # tokenized with the special tokens (transformers' `apply_chat_template(tokenize=True)` does the same)
            text_kwargs["add_special_tokens"] = False
        text_inputs = self.tokenizer(prompts, **text_kwargs)
        self._check_image_token_counts(text_inputs["input_ids"], prompts)
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    @staticmethod
    def _special_tokens_given(kwargs: dict) -> bool:
        nested = kwargs.get("text_kwargs")
        return "add_special_tokens" in kwargs or (isinstance(nested, dict) and "add_special_tokens" in nested)

    def _process_visuals(self, flat_images, flat_videos, prompts, images_kwargs, videos_kwargs) -> dict:
        """Tiles of the images and frames of the videos, merged in the order of their tags in the prompts."""
        if not flat_images and not flat_videos:
            return {}
        if not flat_videos:
            return dict(self.image_processor(flat_images, **images_kwargs))
        # Lists out (return_tensors=None), merged below; the caller's BatchFeature converts them.
        images_kwargs = {**images_kwargs, "return_tensors": None}
        image_out = self.image_processor(flat_images, **images_kwargs) if flat_images else None
        frames = [
            load_video(video, videos_kwargs.get("num_frames", 8), videos_kwargs.get("bound"),
                       videos_kwargs.get("fps"), videos_kwargs.get("do_sample_frames"))
            for video in flat_videos
        ]
        # Each frame is one tile: the whole frame resized to image_size, as InternVL2's load_video (max_num=1).
        frame_options = {**images_kwargs, "min_tiles": 1, "max_tiles": 1, "use_thumbnail": False}
        frame_out = self.image_processor([f for video in frames for f in video], **frame_options)

        # Blocks of pixel rows (and their num_patches / tile_grid entries) in tag order across the batch.
        order = [m.group(0) for p in (prompts or []) for m in re.finditer(r"<image>|<video>", p)]
        if not order:  # no text: images first, then videos
            order = [self.image_placeholder] * len(flat_images) + [VIDEO_PLACEHOLDER] * len(flat_videos)
        blocks, patches, grids = [], [], []
        sources = {
            self.image_placeholder: _Rows(image_out, [1] * len(flat_images)),
            VIDEO_PLACEHOLDER: _Rows(frame_out, [len(video) for video in frames]),
        }
        for tag in order:
            pixels, count, grid = sources[tag].take()
            blocks.append(pixels)
            patches += count
            grids += grid
        return {"pixel_values": torch.cat(blocks), "num_patches": patches, "tile_grid": grids,
                "_frames_per_video": [len(video) for video in frames]}

    def _check_video_layout(self, videos: Any, prompts: list[str] | None) -> list[Any]:
        """Flatten `videos` in tag order and check it matches the `<video>` tags of each prompt."""
        try:
            flat_videos = flatten_videos(videos)
        except TypeError as err:
            raise TypeError(f"videos: {err}") from None
        if prompts is None:
            return flat_videos
        tags = [prompt.count(VIDEO_PLACEHOLDER) for prompt in prompts]
        nested = isinstance(videos, (list, tuple)) and not is_video(videos) and len(videos) == len(prompts) and all(
            isinstance(item, (list, tuple)) and not is_video(item) for item in videos
        )
        per_prompt = [len(flatten_videos(item)) if item else 0 for item in videos] if nested else None
        if (per_prompt is not None and per_prompt != tags) or len(flat_videos) != sum(tags):
            raise ValueError(
                f"The text has {sum(tags)} `{VIDEO_PLACEHOLDER}` tag(s) (per prompt: {tags}) but {len(flat_videos)} "
                "video(s) were passed; pass exactly one video per tag, in order (a video is a file path, a frame "
                "folder or a list of frames)."
            )
        return flat_videos

    def _check_image_layout(self, images: Any, text: str | list[str] | None) -> list[Any]:
        """Flatten `images` in tag order and check it matches the `<image>` tags of each prompt."""
        flat_images = flatten_images(images)
        if text is None:
            return flat_images
        prompts = [text] if isinstance(text, str) else list(text)
        tags = [prompt.count(self.image_placeholder) if isinstance(prompt, str) else 0 for prompt in prompts]
        nested = isinstance(images, (list, tuple)) and len(images) > 0 and isinstance(images[0], (list, tuple))
        if nested:
            per_prompt = [len(flatten_images(item)) for item in images]
            if len(images) != len(prompts) or per_prompt != tags:
                raise ValueError(
                    f"Images were given per prompt ({per_prompt} images for {len(images)} prompt(s)) but the "
                    f"prompts have {tags} `{self.image_placeholder}` tag(s); give each prompt one image per tag."
                )
        elif len(flat_images) != sum(tags):
            raise ValueError(
                f"The text has {sum(tags)} `{self.image_placeholder}` tag(s) (per prompt: {tags}) but "
                f"{len(flat_images)} image(s) were passed; pass exactly one image per tag, in order."
            )
        return flat_images

    def _expand_image_tags(self, prompts: list[str], num_patches: list[int], image_seq_length: int) -> list[str]:
        # Tag k (counting across the batch) becomes the tokens of image k, as InternVL2's chat() replaces them in order.
        images = iter(num_patches)
        expanded = []
        for prompt in prompts:
            pieces = prompt.split(self.image_placeholder)
            out = [pieces[0]]
            for piece in pieces[1:]:
                context = self.image_token * (image_seq_length * next(images))
                out.append(f"{self.start_image_token}{context}{self.end_image_token}{piece}")
            expanded.append("".join(out))
        return expanded

    def _check_image_token_counts(self, input_ids: Any, prompts: list[str]) -> None:
        expected = [prompt.count(self.image_token) for prompt in prompts]
        found = [_as_list(ids).count(self.image_token_id) for ids in input_ids]
        if found != expected:
            raise ValueError(
                f"After tokenization the prompts hold {found} `{self.image_token}` tokens instead of {expected}; "
                "this happens when `truncation`/`max_length` cut the image tokens. Raise `max_length` or disable "
                "truncation."
            )

    def num_visual_tokens(self, image_sizes: list[tuple[int, int]], **images_kwargs) -> list[int]:
        """`<IMG_CONTEXT>` tokens each image costs under the current settings (`<img>` and `</img>` add 2 more).

        Args:
            image_sizes: `(width, height)` of each image.
            **images_kwargs: image processor options to evaluate instead of the current ones, e.g. `tiling="edge"`.
        """
        options = self._merge_kwargs(InternVLXProcessorKwargs, **images_kwargs)["images_kwargs"]
        seq_length = options.pop("image_seq_length", None) or self.image_seq_length
        return [
            seq_length * self.image_processor.get_number_of_image_patches(int(height), int(width), options)
            for width, height in image_sizes
        ]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        # transformers' hook (used by serving engines); image sizes are (height, width) there.
        if image_sizes is None:
            return MultiModalData()
        tokens = self.num_visual_tokens([(width, height) for height, width in image_sizes], **kwargs)
        patches = [n // self.image_seq_length for n in tokens]
        return MultiModalData(num_image_tokens=[n + 2 for n in tokens], num_image_patches=patches)

    # --- decoding -----------------------------------------------------------------------------------------------

    def _reply_markers(self) -> tuple[list[int], list[int]]:
        """Token ids of the assistant header and of the end-of-turn separator, derived from the chat template."""
        template = self.chat_template if isinstance(self.chat_template, str) else None
        if isinstance(self.chat_template, dict):
            template = self.chat_template.get("default")
        cache = getattr(self, "_markers_cache", None)
        if cache is not None and cache[0] == template:
            return cache[1]
        header_ids, end_ids = [], []
        if template is not None:
            probe = [{"role": "user", "content": "x"}]
            render = self.tokenizer.apply_chat_template
            plain = render(probe, chat_template=template, tokenize=False)
            prompt = render(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
            if prompt.startswith(plain) and len(prompt) > len(plain):
                plain_ids = self.tokenizer(plain, add_special_tokens=False)["input_ids"]
                prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if prompt_ids[: len(plain_ids)] == plain_ids:
                    header_ids = prompt_ids[len(plain_ids) :]
            end = turn_end_text(render, chat_template=template)
            if end:
                end_ids = self.tokenizer(end, add_special_tokens=False)["input_ids"]
        self._markers_cache = (template, (header_ids, end_ids))
        return header_ids, end_ids

    def _reply_ids(self, ids: Any) -> list[int]:
        ids = _as_list(ids)
        header_ids, end_ids = self._reply_markers()
        if header_ids:
            start = _find_last(ids, header_ids)
            if start >= 0:
                ids = ids[start + len(header_ids) :]
        if end_ids:
            stop = _find_first(ids, end_ids)
            if stop >= 0:
                ids = ids[:stop]
        return ids

    def batch_decode(self, sequences: Any, **kwargs) -> list[str]:
        """Decode generated sequences to the assistant replies: everything up to and including the last assistant
        header (the prompt) and everything from the end-of-turn separator (`<|im_end|>`) on are dropped."""
        return self.tokenizer.batch_decode([self._reply_ids(ids) for ids in sequences], **kwargs)

    def decode(self, token_ids: Any, **kwargs) -> str:
        """Like [`batch_decode`] for one sequence."""
        return self.tokenizer.decode(self._reply_ids(token_ids), **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Assistant replies of `generate()` outputs (prompt and template stripped)."""
        if isinstance(generated_outputs, torch.Tensor) and generated_outputs.dim() == 1:
            generated_outputs = generated_outputs[None]
        elif len(generated_outputs) and not hasattr(generated_outputs[0], "__len__"):
            generated_outputs = [generated_outputs]
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names


class _Rows:
    """Hands out the pixel rows of a processed batch, item by item (an image's tiles, or a video's frames)."""

    def __init__(self, processed: Any, items_per_block: list[int]):
        self.processed, self.sizes, self.item, self.row = processed, iter(items_per_block), 0, 0

    def take(self) -> tuple[torch.Tensor, list[int], list[list[int]]]:
        items = next(self.sizes)
        patches = [int(n) for n in self.processed["num_patches"][self.item : self.item + items]]
        grids = [list(g) for g in self.processed["tile_grid"][self.item : self.item + items]]
        pixels = self.processed["pixel_values"][self.row : self.row + sum(patches)]
        self.item, self.row = self.item + items, self.row + sum(patches)
        return pixels, patches, grids


def _as_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    return [int(i) for i in ids]


def _find_first(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1


def _find_last(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n, -1, -1):
        if seq[i : i + n] == sub:
            return i
    return -1


InternVLXProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["InternVLXProcessor"]
