"""InternVL-X: InternVL2 with PVTC (projector) and LVTC (layer-wise) visual token compression.

Paper: "InternVL-X: Advancing and Accelerating InternVL Series with Efficient Visual Token Compression", Sec. 3.
This file holds the pretrained base and the models; `generate` and its hooks are in `generation.py`, the projectors in
`projectors.py`, LVTC's layout and forward (Algorithm 1) in `lvtc.py` and its caches in `lvtc_cache.py`,
InternVL3.5-Flash's router in `vir.py` and its routes in `vir_routing.py`, the output types in `outputs.py`, the input
checks in `input_checks.py`, the image placeholders' handling in drafts and labels in `placeholders.py`, `chat()` in
`chat.py` and what differs between transformers releases in `compat.py`. Saved next to checkpoints as remote code with those
files: they import only torch, transformers, the standard library and each other (single-dot relative imports).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.models.internvl.modeling_internvl import InternVLVisionModel, InternVLVisionRMSNorm
from transformers.utils.generic import can_return_tuple

from .chat import InternVL2ChatMixin
from .compat import (
    CACHE_NAME,
    activation_checkpointing,
    cache_kwarg,
    cache_of,
    one_cache_argument,
    select_hidden_states,
    slice_logits_to_keep,
)
from .configuration_internvlx import InternVLXConfig
from .input_checks import check_image_flags, check_image_inputs, check_input_ids, check_pixel_values
from .lvtc import build_lvtc_layout, prepare_lvtc_step, run_lvtc
from .generation import InternVLXGenerationMixin
from .lvtc_cache import InternVLXLVTCCache, InternVLXLVTCStaticCache, LVTCState
from .outputs import (
    InternVLXCausalLMOutputWithPast,
    InternVLXImageFeatures,
    InternVLXLogitsOnReadOutput,
    InternVLXModelOutputWithPast,
    LogitsOnRead,
)
from .placeholders import ignore_placeholder_label_kwargs
from .projectors import InternVLXMLPProjector, PVTCProjector, attach_projectors
from .vir import ViRRouter
from .vir_routing import ViRCacheRecord, ViRRouting, record_routing, route_batch, route_inputs


class InternVLXPreTrainedModel(PreTrainedModel):
    config: InternVLXConfig
    config_class = InternVLXConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVLVisionLayer", "InternVLXMLPProjector", "PVTCProjector"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        for module in model.modules():
            if isinstance(module, ViRRouter):  # loading made new parameters, which require grad
                module.freeze()
        return loaded

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the module's source: an `*Attention(nn.Module)` class there must use its
        # AttentionInterface. PVTC's window cross-attention always runs torch's SDPA (it has no backend to choose);
        # the modules that do are transformers' own vision tower and LLM, so set_attn_implementation() works.
        return True

    def save_pretrained(self, *args, **kwargs):
        # save_pretrained reverses the key renamings recorded at load time. transformers' ordinary loader records the
        # ones that matched the checkpoint; its DeepSpeed ZeRO-3 loader records every one it tried, so the legacy
        # `model.language_model.model.*` -> `model.language_model.*` renaming would be reversed on keys that never had
        # the extra `.model`, and the folder would not have the layout of every other save. Keep the used ones.
        conversions = getattr(self, "_weight_conversions", None)
        if conversions:
            self._weight_conversions = [c for c in conversions if c.was_used()]
        # save_pretrained recognises tied weights by their shared storage. A state dict handed in from outside may
        # hold copies (DeepSpeed ZeRO-1/2: accelerate clones every tensor), which would write `lm_head.weight` of a
        # tied model as a second tensor; drop the copies of weights this model ties.
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:
            tied = getattr(self, "all_tied_weights_keys", None) or {}
            copies = {target for target, source in tied.items() if target in state_dict and source in state_dict
                      and self.get_parameter_or_buffer(target) is self.get_parameter_or_buffer(source)}
            if copies:
                kwargs["state_dict"] = {name: value for name, value in state_dict.items() if name not in copies}
        return super().save_pretrained(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, InternVLVisionRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, PVTCProjector):
            init.normal_(module.cls_scale, mean=0.0, std=1.0)  # the reference draws it with torch.randn
        else:
            super()._init_weights(module)


class InternVLXModel(InternVLXPreTrainedModel):
    """Vision tower (transformers' InternVLVisionModel) + projector(s) + LLM backbone, without the LM head."""

    def __init__(self, config: InternVLXConfig):
        super().__init__(config)
        self.vision_tower = InternVLVisionModel(config.vision_config)
        attach_projectors(self, config)
        if config.vir is not None:
            self.vir = ViRRouter(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, image_flags: torch.Tensor | None = None,
                           **kwargs) -> InternVLXImageFeatures:
        r"""Encode tiles ``(tiles, 3, H, W)`` and run every projector on the ViT layer ``config.select_layer``.

        image_flags: optional ``(tiles,)``; tiles flagged 0 (InternVL2's dummy tiles) are dropped after the ViT.
        kwargs: ``output_hidden_states`` / ``output_attentions`` of the vision tower, ``return_dict``.
        """
        vit, vision_out, requested = self._vision_output(pixel_values, image_flags, kwargs)
        lvtc = self.config.lvtc
        hr_projector = getattr(self, "lvtc_hr_projector", None)
        return InternVLXImageFeatures(
            last_hidden_state=vit,
            pooler_output=self.multi_modal_projector(vit),
            hidden_states=vision_out.hidden_states if requested or self.config.select_layer == -1 else None,
            attentions=vision_out.attentions,
            extra_lr_features=tuple(p(vit) for p in self.lvtc_lr_projectors) if lvtc is not None else None,
            hr_features=hr_projector(vit) if hr_projector is not None else None,
        )

    def _vision_output(self, pixel_values: torch.Tensor, image_flags: torch.Tensor | None, kwargs: dict):
        """The ViT output of ``config.select_layer`` ``(tiles, 1 + S*S, C)`` (dummy tiles dropped), the vision tower's
        output and whether its hidden states were asked for."""
        check_pixel_values(self.config, pixel_values)
        if image_flags is not None:
            check_image_flags(image_flags, pixel_values.shape[0])
        select_layer = self.config.select_layer
        requested = kwargs.get("output_hidden_states")
        if select_layer != -1 and not requested:
            kwargs["output_hidden_states"] = True
        vision_out = self.vision_tower(pixel_values=pixel_values.to(dtype=self.vision_tower.dtype), return_dict=True,
                                       **kwargs)
        vit = vision_out.last_hidden_state if select_layer == -1 else vision_out.hidden_states[select_layer]
        if image_flags is not None:
            vit = vit[image_flags.reshape(-1).to(vit.device) == 1]
        return vit, vision_out, requested

    def route(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
              image_flags: torch.Tensor | None = None) -> ViRRouting:
        r"""Run InternVL3.5-Flash's router (``config.vir``) on a batch whose prompts hold ``image_seq_length``
        `<IMG_CONTEXT>` per tile (the processor's output): the vision tower once, a decision per tile, the prompt
        without the compressed tiles' deleted placeholders and the visual tokens that fill it. Every forward given
        ``pixel_values`` and `generate()` run it (`vir_routing.py`); its output goes to the forward as ``input_ids``,
        ``attention_mask`` and ``image_features``. Each row keeps its columns in order (its padding too); rows shortened
        less than the most get padding on the left; ``source`` names the given column of each routed one.

        Example:

        ```python
        >>> routing = model.model.route(inputs.input_ids, inputs.pixel_values, inputs.attention_mask)
        >>> routing.compressed  # one decision per tile
        >>> model(input_ids=routing.input_ids, attention_mask=routing.attention_mask,
        ...       image_features=routing.image_features)
        ```
        """
        return route_batch(self, input_ids, pixel_values, attention_mask, position_ids, image_flags, labels)

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    def _embed(self, input_ids, inputs_embeds, pixel_values, image_features, image_flags, num_patches, tile_grid,
               past_length: int):
        """The LLM's input embeddings with the visual tokens in the `<IMG_CONTEXT>` places (from ``pixel_values``, or
        given as ``image_features``), the placeholder mask and the image features (None without tiles)."""
        if input_ids is not None:
            check_input_ids(input_ids, self.get_input_embeddings().num_embeddings)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)

        features = None
        if pixel_values is not None:
            check_image_inputs(self.config, pixel_values, image_mask, image_flags, num_patches, tile_grid)
            features = self.get_image_features(pixel_values, image_flags=image_flags, return_dict=True)
            # As transformers' InternVL: the projector may sit on another device than the embeddings (device_map).
            lr = features.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], lr.reshape(-1, lr.shape[-1]))
        elif image_features is not None:
            if not torch.compiler.is_compiling() and int(image_mask.sum()) != image_features.shape[0]:
                raise ValueError(
                    f"image_features holds {image_features.shape[0]} visual tokens but the input has "
                    f"{int(image_mask.sum())} <IMG_CONTEXT> tokens; pass the input_ids that came with them "
                    "(model.model.route(...) returns both).")
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask[..., None], image_features.to(inputs_embeds.device, inputs_embeds.dtype))
        elif not torch.compiler.is_compiling() and past_length == 0 and bool(image_mask.any()):
            raise ValueError(
                f"The input has {int(image_mask.sum())} image tokens but no pixel_values were given; pass the "
                "images' pixel_values (the processor's output) or remove the <IMG_CONTEXT> tokens."
            )
        return inputs_embeds, image_mask, features

    # ------------------------------------------------------------------------------------------------------ forward

    @one_cache_argument
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        image_flags: torch.Tensor | None = None,
        num_patches: torch.Tensor | None = None,
        tile_grid: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> InternVLXModelOutputWithPast:
        r"""
        pixel_values: all tiles of the batch ``(tiles, 3, 448, 448)``, in the order of their `<IMG_CONTEXT>` runs.
            With InternVL3.5-Flash's router (``config.vir`` enabled) the prompt holds ``image_seq_length``
            placeholders per tile and the LLM runs on the prompt the router shortens (`route`); the hidden states
            come back in the given columns (zeros at the deleted placeholders; attention weights stay over the
            routed ones), the cache holds the shortened prompt, and ``vir_routing`` says how it was shortened.
        image_features: ``(n, D)`` visual tokens that fill the `<IMG_CONTEXT>` placeholders in order, instead of
            ``pixel_values`` (`route`'s ``image_features``, with its ``input_ids``).
        vir_compressed: ``(tiles,)`` bool, which tiles to compress, instead of the router's decisions (with the
            router on or off): what training a router feeds (`internvlx_hf.training.vico`).
        output_hidden_states: ``True`` or a list of indices of the hidden states to keep (the others are None).
        image_flags: optional ``(tiles,)``; tiles flagged 0 are dropped (InternVL2 dummy tiles).
        num_patches, tile_grid: what the processor returns (tiles per image, ``(cols, rows)`` per image); checked
            against ``pixel_values`` and the `<IMG_CONTEXT>` runs, otherwise unused.
        cache: the KV cache (transformers 5.24's name; ``past_key_values=``, the older one, is taken as it).
        """
        past_key_values = cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        # An explicit None means "the config's value" (transformers' convention), also for the LLM below.
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache is None and self.training:
            # A training forward has no use for a cache, and building one switches off transformers' detection of
            # packed sequences (position resets without a mask): packed rows would attend across samples.
            use_cache = False
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass pixel_values or image_features (visual tokens already computed), not both.")
        vir_routing = None
        vir_compressed = kwargs.pop("vir_compressed", None)  # decisions given (training a router), not the router's
        if pixel_values is not None and (self.config.vir is not None or vir_compressed is not None):
            routed = route_inputs(self, dict(kwargs, input_ids=input_ids, pixel_values=pixel_values,
                                             attention_mask=attention_mask, position_ids=position_ids,
                                             cache=past_key_values, image_flags=image_flags,
                                             vir_compressed=vir_compressed))
            if routed.get("vir_routing") is not None:
                vir_routing = routed.pop("vir_routing")
                input_ids, attention_mask, position_ids = vir_routing.input_ids, vir_routing.attention_mask, \
                    vir_routing.position_ids
                image_features, pixel_values, image_flags, num_patches, tile_grid = vir_routing.image_features, \
                    None, None, None, None
                kwargs.update({key: routed[key] for key in kwargs if key.startswith(("cu_seq_lens_", "max_length_"))})
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs_embeds, image_mask, features = self._embed(input_ids, inputs_embeds, pixel_values, image_features,
                                                          image_flags, num_patches, tile_grid, past_length)

        if self.config.lvtc is None:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
                **cache_kwarg(past_key_values),
                **kwargs,
            )
            hidden_states = select_hidden_states(outputs.hidden_states, output_hidden_states)
            last_hidden_state = outputs.last_hidden_state
            if vir_routing is not None:  # back in the given columns; the cache keeps what generate() needs
                record_routing(cache_of(outputs), ViRCacheRecord.of(vir_routing))
                last_hidden_state = vir_routing.restore(last_hidden_state)
                if hidden_states is not None:
                    hidden_states = tuple(None if h is None else vir_routing.restore(h) for h in hidden_states)
            return InternVLXModelOutputWithPast(
                last_hidden_state=last_hidden_state,
                hidden_states=hidden_states,
                attentions=outputs.attentions,
                image_hidden_states=features.pooler_output if features is not None else None,
                vir_routing=vir_routing,
                **cache_kwarg(cache_of(outputs)),
            )
        # LVTC (Algorithm 1, lvtc.py): this step's layouts, then the layers
        use_cache = use_cache if use_cache is not None else self.config.get_text_config().use_cache
        if self.training and activation_checkpointing(self):
            use_cache = False
        step = prepare_lvtc_step(self.config, inputs_embeds, image_mask, attention_mask, position_ids,
                                 past_key_values, past_length, use_cache, kwargs, has_images=features is not None)
        return run_lvtc(self.language_model, self.config, step, inputs_embeds, image_mask, features,
                        output_attentions, output_hidden_states, **kwargs)


class InternVLXForConditionalGeneration(InternVL2ChatMixin, InternVLXPreTrainedModel, InternVLXGenerationMixin):
    """InternVL-X for image-text-to-text generation. `AutoModel` resolves to this class, as in InternVL2."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As transformers' InternVL: a tied head shards the weight it reads, so it needs a tensor-parallel entry of its own.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: InternVLXConfig):
        super().__init__(config)
        self.model = InternVLXModel(config)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()
        # Before `forward`, not inside it: trainers replace `forward` with their own LM head and loss (TRL >= 1.16's
        # fused head, Liger's), which read the labels as given; a pre-hook runs for every `model(...)` call, PEFT's
        # included (its tuner calls the wrapped model).
        self.register_forward_pre_hook(ignore_placeholder_label_kwargs, with_kwargs=True)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, image_flags: torch.Tensor | None = None, **kwargs):
        """See `InternVLXModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, image_flags=image_flags, **kwargs)

    def placeholder_label_ids(self) -> list[int]:
        """Token ids that are never a training target: `<IMG_CONTEXT>` (replaced by visual features) and, when the
        config names them, `<img>` / `</img>` (they only frame the visual features)."""
        ids = [self.config.image_token_id, self.config.image_start_token_id, self.config.image_end_token_id]
        return [i for i in ids if i is not None]

    # Set by the placeholder-label pre-hook once it has looked at a batch's labels (`placeholders.ignore_placeholder_label_kwargs`)
    _placeholder_labels_checked = False

    def _ignore_placeholder_labels(self, labels: torch.Tensor) -> torch.Tensor:
        ids = tuple(self.placeholder_label_ids())
        cached = self.__dict__.get("_placeholder_ids")  # built once per device and dtype, not from a list per call
        if cached is None or cached[0] != ids or cached[1].device != labels.device or cached[1].dtype != labels.dtype:
            cached = (ids, torch.tensor(ids, device=labels.device, dtype=labels.dtype))
            self.__dict__["_placeholder_ids"] = cached
        return labels.masked_fill(torch.isin(labels, cached[1]), -100)

    @one_cache_argument
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        image_flags: torch.Tensor | None = None,
        num_patches: torch.Tensor | None = None,
        tile_grid: torch.Tensor | None = None,
        skip_logits: bool | None = None,
        linear_cross_entropy=None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> InternVLXCausalLMOutputWithPast:
        r"""
        labels: ``(batch, seq)``; the loss is the shifted cross-entropy over tokens whose label is not -100. Labels
            that are image placeholders (`placeholder_label_ids()`) are ignored too, so ``labels=input_ids`` does not
            train the model to predict `<IMG_CONTEXT>`.
        logits_to_keep: keep only the last N positions' logits (0 = all), e.g. 1 in a generation prefill.
        skip_logits: with ``labels``, run the LM head only on the positions whose (shifted) label is not -100 and
            return the same ``loss`` without logits: ``token_losses`` holds each position's cross-entropy (see
            `InternVLXCausalLMOutputWithPast`). A training sample is mostly image and prompt tokens, so this skips
            most of the ``(batch, seq, vocab)`` logits, their float32 copy and their gradient. The name and meaning
            are Liger-Kernel's:

            - ``None`` (default): skip them in training with labels (``model.train()``, ``labels`` or
              ``shift_labels`` given, no ``logits_to_keep``), so that `transformers.Trainer`, TRL, a hand-written
              loop (``model(**batch).loss.backward()``) all get the lean step with no option. Whoever reads
              ``outputs.logits`` (TRL 1.0-1.14's token accuracy and entropy, a loop's own metric) still gets them: they
              are computed when first read, from this forward's final hidden states. Evaluation (``model.eval()``,
              the Trainer's ``prediction_loss_only=False``, ``compute_metrics``) and calls without labels (the
              Trainer's label smoothing and ``compute_loss_func``, generation) compute the logits as always.
            - ``True``: skip them and return ``logits=None`` (in any mode; labels required).
            - ``False``: compute every logit (the loss reads them as transformers' models do).
        linear_cross_entropy: with ``skip_logits``, an optional ``fn(hidden, weight, targets) -> losses`` that
            computes the per-token cross-entropy ``(n,)`` of ``hidden @ weight.T`` (``(n, hidden)`` and ``(vocab,
            hidden)``) against ``targets`` ``(n,)`` without materialising the logits, e.g. cut-cross-entropy or
            Liger's fused kernel (`internvlx_hf.training.linear_cross_entropy`); default: the LM head and
            `torch.nn.functional.cross_entropy` in float32, as the loss without ``skip_logits``.
        return_dict: ``False`` returns a tuple (transformers' convention; ``config.return_dict`` is the default).
        cache: the KV cache (transformers 5.24's name; ``past_key_values=``, the older one, is taken as it).
        """
        past_key_values = cache
        if kwargs.get("loss_weight") is not None:  # it would otherwise vanish in **kwargs: a silently unweighted loss
            raise ValueError(
                "loss_weight (from InternVLXDataCollator(loss_reduction='sample' / 'square')) is applied by "
                "internvlx_hf.training.InternVLXTrainer, not by the model's forward; train with InternVLXTrainer "
                "or use loss_reduction='token'."
            )
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            cache=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, image_flags=image_flags,
            num_patches=num_patches, tile_grid=tile_grid, image_features=image_features, return_dict=True, **kwargs,
        )
        vir_routing = outputs.vir_routing
        loss = logits = token_losses = on_read = None
        if skip_logits is None:
            skip_logits = linear_cross_entropy is not None or (
                self.training and (labels is not None or kwargs.get("shift_labels") is not None)
                and isinstance(logits_to_keep, int) and logits_to_keep == 0)
            if skip_logits and linear_cross_entropy is None:
                on_read = LogitsOnRead(self.lm_head, outputs.last_hidden_state)
        if skip_logits:
            if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
                raise ValueError("skip_logits=True computes no logits; it does not combine with logits_to_keep")
            loss, token_losses = self._labelled_loss(
                outputs.last_hidden_state, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                linear_cross_entropy)
        else:
            if linear_cross_entropy is not None:
                raise ValueError("linear_cross_entropy replaces the logits of the loss: pass skip_logits=True too")
            logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
            if labels is not None:
                labels = self._ignore_placeholder_labels(labels)
                if kwargs.get("shift_labels") is not None:
                    kwargs["shift_labels"] = self._ignore_placeholder_labels(kwargs["shift_labels"])
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.get_text_config().vocab_size, **kwargs
                )
        items = dict(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                     image_hidden_states=outputs.image_hidden_states, vir_routing=vir_routing)
        items[CACHE_NAME] = cache_of(outputs)
        if on_read is not None:  # the default's output is a full forward's: no token_losses
            return InternVLXLogitsOnReadOutput(**items, logits_on_read=on_read)
        return InternVLXCausalLMOutputWithPast(**items, token_losses=token_losses)

    def _labelled_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor | None,
                       shift_labels: torch.Tensor | None, num_items_in_batch, linear_cross_entropy
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s loss with ``skip_logits``: transformers' ForCausalLMLoss (shift, -100 and placeholder labels
        ignored, float32 cross-entropy, mean or sum / ``num_items_in_batch``) computed on the labelled rows only."""
        if labels is None:
            raise ValueError("skip_logits=True returns the loss without logits, so it needs labels; call the model "
                             "without skip_logits for logits")
        if shift_labels is None:  # position t predicts label t + 1, as ForCausalLMLoss shifts
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        shift_labels = self._ignore_placeholder_labels(shift_labels.to(hidden_states.device))
        labelled = shift_labels != -100
        hidden, targets = hidden_states[labelled], shift_labels[labelled]
        if linear_cross_entropy is None:
            losses = F.cross_entropy(self.lm_head(hidden).float(), targets, reduction="none")
        else:
            losses = linear_cross_entropy(hidden, self.lm_head.weight, targets).float()
        if num_items_in_batch is None:
            loss = losses.sum() / labelled.sum()  # no labelled token: nan, as the mean of ForCausalLMLoss
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(losses.device)
            loss = losses.sum() / num_items_in_batch
        # masked_scatter keeps the per-token losses connected to the graph even when no label is left
        return loss, losses.new_zeros(labelled.shape).masked_scatter(labelled, losses)


# `save_pretrained` copies this file and `configuration_internvlx.py` next to the weights (remote code).
InternVLXForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "InternVLXPreTrainedModel",
    "InternVLXModel",
    "InternVLXForConditionalGeneration",
    "PVTCProjector",
    "InternVLXMLPProjector",
    "InternVLXLVTCCache",
    "InternVLXLVTCStaticCache",
    "LVTCState",
    "build_lvtc_layout",
]
