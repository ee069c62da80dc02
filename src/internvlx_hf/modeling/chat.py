"""InternVL2's chat API on InternVL-X: `chat()` and `batch_chat()`, as VLMEvalKit's and lmms-eval's InternVL2 classes
call them (a question string and the tiles they made, an answer string back), on top of the model's `generate()`.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.utils import logging

from .configuration_internvlx import image_and_patch

logger = logging.get_logger(__name__)


class InternVL2ChatMixin:
    """`chat()` / `batch_chat()` for `InternVLXForConditionalGeneration` (which provides `config`, `device`,
    `generate()`, `generation_config` and `model.vision_tower`)."""

    # InternVL2's `chat()` writes `model.system_message` into the prompt (VLMEvalKit sets it for its system prompts);
    # None renders the chat template's default system message, as InternVL2's default does.
    system_message: str | None = None

    @staticmethod
    def _templater(processor_or_tokenizer):
        templater = processor_or_tokenizer
        if getattr(templater, "chat_template", None) is None:
            templater = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        if getattr(templater, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer/processor has no chat_template. Use the tokenizer saved by `internvlx convert`, or "
                "set one with internvlx_hf.processing.get_chat_template(model.config.template)."
            )
        return templater

    def _chat_prompt(self, processor_or_tokenizer, question: str, history, num_patches_list) -> str:
        if "<video>" in question:
            # InternVL2's chat() has no <video> tag: a video is its frames, one `FrameN: <image>` line each.
            raise ValueError(
                "chat() takes a video as its frames, as InternVL2 does: put 'Frame1: <image>\\nFrame2: <image>\\n...' "
                "(one line per frame) before the question instead of <video> and pass num_patches_list=[1] * "
                "frames; or let the processor expand <video> (processor(text=..., videos=...))."
            )
        messages = [] if self.system_message is None else [{"role": "system", "content": self.system_message}]
        for old_question, old_answer in history or []:
            messages += [{"role": "user", "content": old_question}, {"role": "assistant", "content": old_answer}]
        messages.append({"role": "user", "content": question})
        templater = self._templater(processor_or_tokenizer)
        prompt = templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        n_tags = prompt.count("<image>")
        if n_tags != len(num_patches_list):
            raise ValueError(
                f"The prompt has {n_tags} <image> tags but {len(num_patches_list)} images were given "
                f"(num_patches_list={num_patches_list}); put one <image> per image in the question."
            )
        for tiles in num_patches_list:
            expansion = "<img>" + "<IMG_CONTEXT>" * (self.config.image_seq_length * int(tiles)) + "</img>"
            prompt = prompt.replace("<image>", expansion, 1)
        return prompt

    def _turn_separator(self, processor_or_tokenizer, tokenizer) -> tuple[str | None, int | None]:
        """The chat template's end-of-turn text and token id (`<|im_end|>` for Hermes-2/internlm2-chat, `<|end|>` for
        phi3-chat), found by rendering a probe exchange: what the template writes after an assistant reply.
        (The probe of `chat_templates.turn_end_text`, repeated here: this file loads as remote code on its own.)"""
        templater = self._templater(processor_or_tokenizer)
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
        rendered = templater.apply_chat_template(probe, tokenize=False)
        separator = (rendered.rsplit("REPLY", 1)[-1].strip() if "REPLY" in rendered else "") or None
        if separator is None:
            return None, None
        sep_id = tokenizer.convert_tokens_to_ids(separator)
        if sep_id is None or sep_id == tokenizer.unk_token_id:  # not one token of the vocabulary
            ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
            sep_id = ids[0] if len(ids) == 1 else None
        return separator, sep_id

    def _chat_generate(self, processor_or_tokenizer, prompts, pixel_values, generation_config):
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        if isinstance(generation_config, dict):
            generation_config = GenerationConfig(**generation_config)
        # a copy: the eos/pad defaults below must not leak into the caller's object
        generation_config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        separator, sep_id = self._turn_separator(processor_or_tokenizer, tokenizer)
        if generation_config.eos_token_id is None:
            # InternVL2 stops at the template separator; without one, at the model's own eos.
            generation_config.eos_token_id = sep_id if sep_id is not None else self.generation_config.eos_token_id
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            # a template made for a sentencepiece tokenizer writes its BOS (`chat_templates.bos_prefix`): no second one
            written = bool(tokenizer.bos_token) and all(prompt.startswith(tokenizer.bos_token) for prompt in prompts)
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not written)
        finally:
            tokenizer.padding_side = padding_side
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep_id
        self._check_chat_context(inputs.input_ids, inputs.attention_mask)
        if pixel_values is not None:
            pixel_values = self._chat_tiles(pixel_values)
        out = self.generate(
            input_ids=inputs.input_ids.to(self.device),
            attention_mask=inputs.attention_mask.to(self.device),
            pixel_values=pixel_values,
            generation_config=generation_config,
        )
        new_tokens = out[:, inputs.input_ids.shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [(text.split(separator)[0] if separator else text).strip() for text in texts]

    def _check_chat_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Refuse a `chat()` prompt longer than the LLM's context before generating: past
        ``max_position_embeddings`` transformers only warns, and the answer is garbage. With LVTC the long layout
        of layers >= k counts (every tile at its high-resolution token count)."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if limit is None:
            return
        tiles = (input_ids == self.config.image_token_id).sum(-1) // self.config.image_seq_length
        positions = attention_mask.sum(-1)
        lvtc = self.config.lvtc
        if lvtc is not None and lvtc.expand_layer < self.config.get_text_config().num_hidden_layers:
            positions = positions + tiles * (self.config.hr_tokens_per_tile - self.config.image_seq_length)
        longest = int(positions.max())
        if longest >= limit:
            row = int(positions.argmax())
            raise ValueError(
                f"chat(): the prompt{f' of question {row}' if len(positions) > 1 else ''} needs {longest:,} positions "
                f"({int(tiles[row])} image tiles), and the model has {limit:,} (text_config.max_position_embeddings); "
                "pass fewer tiles (InternVL2's load_image(..., max_num=N), the processor's max_tiles) or fewer images."
            )

    def _chat_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` on the model's device and dtype, square tiles resized to the model's tile size.

        The InternVL2 classes of VLMEvalKit and lmms-eval tile images themselves, always at InternVL2's 448 px
        (their `load_image` has no other size), and pass the tiles to `chat()`. A model with other tiles (the demo
        model's are 112 px) gets each tile resized (bicubic, antialiased; normalisation is per channel, so resizing
        normalised tiles equals normalising resized ones): the tile grid the client chose is kept.
        """
        image_size, _ = image_and_patch(self.config.vision_config)
        pixel_values = pixel_values.to(self.device)
        side = tuple(pixel_values.shape[-2:])
        if pixel_values.ndim == 4 and side[0] == side[1] != image_size:
            logger.warning_once(f"chat(): pixel_values tiles are {side[0]} px, this model's are {image_size} px; "
                                "resizing them (the processor makes tiles of the model's size).")
            pixel_values = F.interpolate(pixel_values.float(), size=(image_size, image_size), mode="bicubic",
                                         align_corners=False, antialias=True)
        return pixel_values.to(self.model.vision_tower.dtype)

    def chat(self, tokenizer, pixel_values, question, generation_config=None, history=None, return_history=False,
             num_patches_list=None, verbose=False):
        """InternVL2's `chat`: one question (with an optional image) -> the answer string.

        ``tokenizer`` may also be an `InternVLXProcessor`. Without `<image>` in the question, a first-turn image
        is put in front as ``"<image>\\n" + question``, as InternVL2 does. A video is passed as its frames (one tile
        each) with ``num_patches_list=[1] * frames`` and a question that starts with InternVL2's
        ``Frame1: <image>\\nFrame2: <image>\\n...`` lines (`internvlx_hf.processing.video.video_prompt`). The
        system block is ``model.system_message`` (None: the chat template's default). Generation stops at the chat
        template's end-of-turn token (unless ``generation_config`` sets an ``eos_token_id``). Tiles of another square
        size than the model's (InternVL2 clients make 448 px tiles) are resized to the model's.
        """
        if history is None and pixel_values is not None and "<image>" not in question and "<video>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        prompt = self._chat_prompt(tokenizer, question, history, num_patches_list)
        if verbose:
            print(prompt.replace("<IMG_CONTEXT>" * self.config.image_seq_length, "<IMG_CONTEXT>"))
        response = self._chat_generate(tokenizer, [prompt], pixel_values, generation_config)[0]
        if not return_history:
            return response
        return response, list(history or []) + [(question, response)]

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config=None, num_patches_list=None,
                   history=None, return_history=False, verbose=False):
        """InternVL2's `batch_chat`: one image (``num_patches_list[i]`` tiles) per question, left-padded batch."""
        if history is not None or return_history:
            raise NotImplementedError("batch_chat does not take a history, as in InternVL2; use chat() per turn.")
        if num_patches_list is None:
            num_patches_list = [1] * len(questions) if pixel_values is not None else [0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ValueError(f"{len(questions)} questions but num_patches_list has {len(num_patches_list)} entries.")
        prompts = []
        for question, tiles in zip(questions, num_patches_list):
            if tiles and "<image>" not in question:
                question = "<image>\n" + question
            prompts.append(self._chat_prompt(tokenizer, question, None, [tiles] if tiles else []))
        return self._chat_generate(tokenizer, prompts, pixel_values, generation_config)
