"""InternVL-X's generation hooks on transformers' `GenerationMixin`: the tiles stay with their prompts through beam
search and assisted decoding, LVTC's caches are built for `generate`, and InternVL3.5-Flash's router plans a call
before transformers runs it (`vir_routing.plan_generation`). `InternVLXForConditionalGeneration` is the one user.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import create_masks_for_generate

from .compat import CACHE_NAME, cache_kwarg, one_cache
from .lvtc_cache import InternVLXLVTCCache, InternVLXLVTCStaticCache, as_lvtc_cache
from .placeholders import DraftsWithoutPlaceholders
from .vir_routing import DELETED_COLUMNS, plan_generation, record_routing


class InternVLXGenerationMixin(GenerationMixin):
    """`generate` and its hooks for `InternVLXForConditionalGeneration` (``self.model``: the `InternVLXModel`)."""

    #: Inputs indexed by tile (or image), not by row: they follow their prompts as blocks.
    _per_tile_inputs = ("pixel_values", "image_flags", "num_patches", "tile_grid")

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None,
                                      is_first_iteration=False, cache=None, **kwargs):
        past_key_values = one_cache(past_key_values, cache)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration,
            **cache_kwarg(past_key_values), **kwargs
        )
        # An assistant model (assisted / speculative decoding) runs generate() once per draft with
        # is_first_iteration=False, so transformers drops pixel_values even from its first forward. That forward
        # fills an empty cache: it is the prefill and must see the images (LVTC also builds its layout there).
        cache_is_empty = past_key_values is None or past_key_values.get_seq_length() == 0
        if not is_first_iteration and cache_is_empty:
            for key in self._per_tile_inputs:
                if kwargs.get(key) is not None:
                    model_inputs[key] = kwargs[key]
        if is_first_iteration or cache_is_empty:  # the router's visual tokens fill the prefill's placeholders only
            if kwargs.get("image_features") is not None:
                model_inputs["image_features"] = kwargs["image_features"]
        else:
            model_inputs.pop("image_features", None)
        return model_inputs

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """transformers' `generate`. With InternVL3.5-Flash's router (``config.vir`` enabled) and tiles given, the
        router first shortens the prompts (`InternVLXModel.route`; the vision tower runs once) and the LLM generates
        from them; the sequences returned hold the prompts as given, then the new tokens, as for every model
        (``out[:, inputs.input_ids.shape[1]:]`` are the new tokens), and ``max_length`` / ``min_length`` count the
        prompt as given. A cache filled by a routed prompt (here or by a forward) keeps a record of it, so a later
        turn on that cache takes the conversation as generate returned it, new images included
        (`vir_routing.plan_generation`)."""
        input_ids = kwargs.get("input_ids", inputs)
        cache = one_cache(kwargs.get("past_key_values"), kwargs.get("cache"))
        routed_kwargs = dict(kwargs)
        plan = plan_generation(self.model, input_ids, cache if isinstance(cache, Cache) else None, routed_kwargs)
        if plan is None:
            return super().generate(inputs, generation_config, *args, **kwargs)
        routed_kwargs.pop("input_ids", None)
        if plan.image_features is not None:
            routed_kwargs["image_features"] = plan.image_features
        deleted = DELETED_COLUMNS.set(plan.given_ids.shape[1] - plan.input_ids.shape[1])
        try:
            out = super().generate(None, generation_config, *args, input_ids=plan.input_ids,
                                   attention_mask=plan.attention_mask, **routed_kwargs)
        finally:
            DELETED_COLUMNS.reset(deleted)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        record = plan.record.repeated(sequences.shape[0] // plan.given_ids.shape[0])
        record_routing(cache if isinstance(cache, Cache) else None, record)
        record_routing(None if isinstance(out, torch.Tensor) else getattr(out, CACHE_NAME, None), record)
        return restore_prompts(out, plan.given_ids, plan.input_ids.shape[1])

    def _prepare_generated_length(self, generation_config, has_default_max_length, has_default_min_length, *args,
                                  **kwargs):
        generation_config = super()._prepare_generated_length(generation_config, has_default_max_length,
                                                              has_default_min_length, *args, **kwargs)
        deleted = DELETED_COLUMNS.get()
        if deleted:
            # InternVL3.5-Flash's router shortened the prompt by `deleted` columns: a max_length / min_length the
            # caller set counts the prompt as given (max_new_tokens / min_new_tokens and the default count new tokens)
            if generation_config.max_new_tokens is None and not has_default_max_length:
                generation_config.max_length -= deleted
            if generation_config.min_new_tokens is None and not has_default_min_length and generation_config.min_length:
                generation_config.min_length = max(generation_config.min_length - deleted, 0)
        return generation_config

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and ``num_return_sequences`` repeat every prompt; its tiles must follow it as a block
        (``pixel_values`` is indexed by tile, so transformers' row-wise ``repeat_interleave`` would mix prompts)."""
        per_tile = {key: model_kwargs.pop(key, None) for key in self._per_tile_inputs}
        image_features = model_kwargs.pop("image_features", None)
        if expand_size > 1 and image_features is not None and input_ids is not None:
            # the router's visual tokens, one block per prompt: repeated as blocks like the tiles below (the prompt
            # after what a cache holds: a later turn's new images fill only its own placeholders)
            cache = model_kwargs.get(CACHE_NAME)
            past = cache.get_seq_length() if isinstance(cache, Cache) else 0
            blocks = torch.split(image_features, (input_ids[:, past:] == self.config.image_token_id).sum(-1).tolist())
            image_features = torch.cat([block for block in blocks for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if image_features is not None:
            model_kwargs["image_features"] = image_features
        if expand_size > 1 and per_tile["pixel_values"] is not None:
            if per_tile["image_flags"] is not None:
                raise ValueError("image_flags (dummy tiles of training batches) cannot be combined with num_beams or "
                                 "num_return_sequences > 1; drop the dummy tiles from pixel_values instead.")
            # Prompts given as inputs_embeds come with empty input_ids: find their placeholders in the embeddings.
            if input_ids is not None and input_ids.shape[-1] > 0:
                image_mask = input_ids[::expand_size] == self.config.image_token_id
            else:
                image_mask = self.model.get_placeholder_mask(None, model_kwargs["inputs_embeds"][::expand_size])
            tiles = (image_mask.sum(-1) // self.config.image_seq_length).tolist()
            if sum(tiles) != per_tile["pixel_values"].shape[0]:
                raise ValueError(
                    f"The prompts have <IMG_CONTEXT> runs for {sum(tiles)} tiles but pixel_values holds "
                    f"{per_tile['pixel_values'].shape[0]}; build the inputs with the processor."
                )
            # images per prompt = runs of <IMG_CONTEXT> (each image's run is closed by </img>)
            starts = image_mask & ~torch.nn.functional.pad(image_mask, (1, 0))[:, :-1]
            images = starts.sum(-1).tolist()

            def repeat_blocks(tensor, sizes):
                blocks = torch.split(tensor, sizes)
                return torch.cat([block for block in blocks for _ in range(expand_size)])

            per_tile["pixel_values"] = repeat_blocks(per_tile["pixel_values"], tiles)
            for key in ("num_patches", "tile_grid"):
                if per_tile[key] is not None and len(per_tile[key]) == sum(images):
                    per_tile[key] = repeat_blocks(torch.as_tensor(per_tile[key]), images)
                else:
                    per_tile[key] = None  # only a consistency check; unknown split -> dropped
        model_kwargs.update({key: value for key, value in per_tile.items() if value is not None})
        return input_ids, model_kwargs

    def _get_candidate_generator(self, *args, **kwargs):
        return DraftsWithoutPlaceholders(super()._get_candidate_generator(*args, **kwargs), self.config.image_token_id)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        given = model_kwargs.get(CACHE_NAME)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if self.config.lvtc is None or type(cache) not in (DynamicCache, StaticCache) or cache.get_seq_length() != 0:
            return
        # The LVTC state (that decoding steps need and that beam search and cropping must update) lives on the cache.
        if given is None:
            # generate() built it from the text config, its length and the offloading option (all that 5.16-5.24
            # pass): the LVTC cache is built with them instead, marked for past recording as generate() marks an
            # assistant's. (A static one is not initialised early: LVTC sizes its long layers at the prefill.)
            text_config = self.config.get_text_config(decoder=True)
            offloading = "offloaded" in (generation_config.cache_implementation or "")
            if type(cache) is DynamicCache:
                built = InternVLXLVTCCache(config=text_config, offloading=offloading)
            else:
                built = InternVLXLVTCStaticCache(config=text_config, max_cache_len=cache.layers[0].max_cache_len,
                                                 offloading=offloading)
            if getattr(generation_config, "is_assistant", False):
                built.activate_past_recording()
            model_kwargs[CACHE_NAME] = built
            return
        # A cache the user passed is the one that gets filled (transformers' convention): it becomes the LVTC subclass
        # in place (`as_lvtc_cache`).
        as_lvtc_cache(cache)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values=None, cache=None,
                                  **kwargs):
        """generate()'s mask hook for compilable (static) caches: transformers' 4D mask, except for LVTC.

        One 4D mask cannot serve LVTC (layers ``>= k`` attend over the long layout), so its forward builds one per
        layout from the 2D mask. The prefill gets the 2D mask as is; a decoding step gets it padded with zeros to the
        short layers' cache length, so that every step has the same shapes (one compiled graph for all steps).
        """
        past_key_values = one_cache(past_key_values, cache)
        if self.config.lvtc is None or not isinstance(past_key_values, InternVLXLVTCStaticCache):
            return create_masks_for_generate(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             **cache_kwarg(past_key_values), **kwargs)
        if attention_mask is None or past_key_values.lvtc_state is None:
            return attention_mask
        free = past_key_values.layers[0].max_cache_len - attention_mask.shape[-1]
        return F.pad(attention_mask, (0, free)) if free > 0 else attention_mask


def restore_prompts(out, prompts: torch.Tensor, routed_length: int):
    """`generate`'s output with the prompts as given (``prompts``, repeated for beams and ``num_return_sequences``) in
    place of the router's shortened ones (``routed_length`` columns)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    expand = sequences.shape[0] // prompts.shape[0]
    prompts = prompts.to(sequences.device).repeat_interleave(expand, dim=0)
    restored = torch.cat([prompts, sequences[:, routed_length:]], dim=-1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


__all__ = ["InternVLXGenerationMixin", "restore_prompts"]
