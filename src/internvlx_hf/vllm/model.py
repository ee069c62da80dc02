"""InternVL-X as a vLLM model: vLLM's InternViT, this package's projector (MLP or PVTC), vLLM's own LLM.

Weights are read as this package saves them (transformers' layout: ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``) and renamed on the fly into vLLM's
modules; nothing is converted on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.intern_vit import InternVisionModel
from vllm.model_executor.models.interfaces import (MultiModalEmbeddings, SupportsLoRA, SupportsMRoPE,
                                                   SupportsMultiModal, SupportsPP)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (AutoWeightsLoader, PPMissingLayer, WeightsMapper,
                                              init_vllm_registered_model, maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..modeling.configuration_internvlx import LVTCConfig, image_and_patch
from ..modeling.projectors import attach_projectors
from ..modeling.vir import ViRRouter, tile_tokens
from .config_hook import LLM_ARCHITECTURES, longrope_switch, needs_position_rows, require_config_hook
from .lvtc.geometry import lvtc_geometry_of, row_width
from .lvtc.masked import MaskedLayers
from .lvtc.positions import position_rows, read_rows, saving_positions
from .processing import InternVLXDummyInputsBuilder, InternVLXMultiModalProcessor, InternVLXProcessingInfo
from .router.config import router_on
from .router.rows import AdmittedRows, SeenScores
from .router.worker import route_requests


def vision_config_for_vllm(config) -> PretrainedConfig:
    """vLLM's InternViT reads InternVL's original config names; transformers' `InternVLVisionConfig` renamed them."""
    vision = config.vision_config
    image_size, patch_size = image_and_patch(vision)
    return PretrainedConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        qkv_bias=vision.attention_bias,
        qk_normalization=vision.use_qk_norm,
        norm_type=vision.norm_type,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act,
        initializer_factor=1.0,
    )


def vision_layers_to_run(config) -> int:
    """ViT layers up to `select_layer` (its hidden state index counts the embeddings as 0)."""
    depth = config.vision_config.num_hidden_layers
    select = config.select_layer
    return depth + select + 1 if select < 0 else select


# transformers' InternViT names -> vLLM's (InternVL's original names); q/k/v are fused into `qkv` on load.
_VISION_RENAMES = (
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("encoder.layer.", "encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
)


def _vision_name(name: str) -> str:
    for old, new in _VISION_RENAMES:
        name = name.replace(old, new)
    return name


def vllm_weights(weights: Iterable[tuple[str, torch.Tensor]], vision_layers: int, router: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """This package's checkpoint names -> the names of `InternVLXForConditionalGeneration` below.

    ViT layers past `select_layer` and their weights are skipped (vLLM builds only the layers that run), and
    InternVL3.5-Flash's router where the model runs without it (`router`: with it on)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        if name.startswith("model.vision_tower."):
            name = name[len("model.vision_tower."):]
            if name.startswith("encoder.layer.") and int(name.split(".")[2]) >= vision_layers:
                continue
            if name.startswith("layernorm."):
                yield "vision_post_layernorm." + name[len("layernorm."):], tensor
                continue
            for part in ("q", "k", "v"):
                marker = f".attention.{part}_proj."
                if marker in name:
                    prefix, _, suffix = name.partition(marker)
                    key = _vision_name(prefix) + ".attn.qkv." + suffix
                    pending.setdefault(key, {})[part] = tensor
                    if len(pending[key]) == 3:
                        parts = pending.pop(key)
                        yield "vision_model." + key, torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
                    break
            else:
                yield "vision_model." + _vision_name(name), tensor
        elif name.startswith("model.language_model."):
            yield "language_model.model." + name[len("model.language_model."):], tensor
        elif name.startswith("lm_head."):
            yield "language_model." + name, tensor
        elif name.startswith("model.vir."):
            if router:  # InternVL3.5-Flash's router (`vir`): pooling, gate and the compressed tiles' projector
                yield name[len("model."):], tensor
        elif name.startswith("model."):
            yield name[len("model."):], tensor
        else:
            yield name, tensor
    if pending:
        raise ValueError(f"InternVL-X: the checkpoint lacks part of the ViT's attention weights: {sorted(pending)}")


class _LoRANames(WeightsMapper):
    """peft's names of an adapter's tensors (transformers' modules) -> this module tree's. vLLM applies LoRA to the
    LLM only; an adapter with tensors elsewhere (`--lora_target llm,vision`) would otherwise lose them silently (vLLM
    checks only the last part of each name, `q_proj`, which the LLM has too)."""

    def _map_name(self, key: str) -> str | None:
        if ".lora_" in key and not key.startswith(("model.language_model.", "lm_head.")):
            raise ValueError(
                f"InternVL-X: this LoRA adapter has weights for {key.split('.lora_')[0]}, outside the LLM, and vLLM "
                "applies LoRA to the LLM only: serve the merged model (`internvlx train` writes it as OUT, the adapter "
                "as OUT/adapter), or train the adapter with --lora_target llm")
        return super()._map_name(key)


@MULTIMODAL_REGISTRY.register_processor(InternVLXMultiModalProcessor, info=InternVLXProcessingInfo,
                                        dummy_inputs=InternVLXDummyInputsBuilder)
class InternVLXForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP, SupportsLoRA):
    """InternVL-X for vLLM: plain MLP or PVTC projector, and LVTC (`lvtc/`: vLLM's per-request position rows carry
    each token's layout, which is why this class speaks vLLM's M-RoPE interface; plain checkpoints never use it).
    Pipeline parallelism as vLLM's LLMs run it (the vision side on the first rank, where vLLM runs the encoder),
    for checkpoints without LVTC (refused with it at start-up: `config_hook`).

    LoRA adapters on the LLM (`--enable-lora`): peft saves them under transformers' module names
    (`model.language_model.layers.N...`), which `hf_to_vllm_mapper` turns into this module tree's, and vLLM's packed
    linears take q/k/v and gate/up as its own LLM class says (`packed_modules_mapping`)."""

    hf_to_vllm_mapper = _LoRANames(orig_to_new_prefix={"model.language_model.": "language_model.model.",
                                                       "lm_head.": "language_model.lm_head."})
    packed_modules_mapping: dict[str, list[str]] = {}  # the LLM class's, set per instance

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError(f"InternVL-X takes images and videos, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        require_config_hook(config)
        text_config = config.get_text_config()
        architecture = LLM_ARCHITECTURES[text_config.model_type]  # others are refused at config time (config_hook)
        self.config = config
        self.model_dtype = vllm_config.model_config.dtype
        self.layout = lvtc_geometry_of(config)
        quant_config = vllm_config.quant_config
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_model = InternVisionModel(
                vision_config_for_vllm(config), quant_config=quant_config,
                num_hidden_layers_override=vision_layers_to_run(config),
                prefix=maybe_prefix(prefix, "vision_model"),
            )
            # transformers' InternViT ends with a LayerNorm unless it pools by mean; only the last layer's output
            # passes through it.
            post_norm = not config.vision_config.use_mean_pooling and config.select_layer == -1
            self.vision_post_layernorm = (
                nn.LayerNorm(config.vision_config.hidden_size, eps=config.vision_config.layer_norm_eps)
                if post_norm else nn.Identity()
            )
            attach_projectors(self, config)  # the model's own projectors, under the checkpoint's names
            # InternVL3.5-Flash's router, run on the requests the scheduler is about to admit (`router/`)
            self.router_on = router_on(config)
            if self.router_on:
                self.vir = ViRRouter(config)
                self.admitted = AdmittedRows()  # the rows computed when routed, until their step embeds them
                self.seen_scores = SeenScores()  # each item's scores, for requests that send it again
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text_config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=[architecture],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self.packed_modules_mapping = dict(getattr(self.language_model, "packed_modules_mapping", {}))
        self.row_width = row_width(config, self.layout)
        self.tower_tiles = 0  # tiles the vision tower has run (`_vit`)
        # Per-token layout and RoPE factors in vLLM's position rows (`lvtc/positions.py`), where the config hook turned
        # them on: LVTC with expansion, a LongRoPE LLM whose prompts can pass the switch.
        self.max_model_len = vllm_config.model_config.max_model_len
        self.position_rows = needs_position_rows(self.layout, text_config, self.max_model_len)
        self.switch = longrope_switch(text_config) if self.position_rows else None
        if self.switch is not None:
            # The rows give each token's index into vLLM's LongRoPE table (short rows, then long ones), as
            # transformers picks the factors; vLLM's own choice (long for all once max_model_len > K) is off.
            for layer in self.language_model.model.layers:
                if not isinstance(layer, PPMissingLayer):  # another pipeline rank's layer
                    layer.self_attn.rotary_emb.use_long_rope = False
        # LVTC, or extra LR projectors alone (k = depth): the layers are run one by one (`lvtc/layers.py`). With
        # expansion the layers below k hold and compute the short layout only (`lvtc/saving/`), unless the config
        # hook chose the masked long layout (`lvtc/path.py`, with its log line). The engine core was
        # set up for the path the hook chose (its scheduler, prefix caching, chunks at tile boundaries): a worker that
        # cannot run the saving path stops rather than take the other one.
        self.lvtc: nn.Module | None = None
        self.saving = False
        if LVTCConfig.of(config) is not None:
            lvtc_prefix = maybe_prefix(prefix, "lvtc")
            if self.layout is not None and getattr(config, "lvtc_vllm_path", None) == "saving":
                from .lvtc.saving.layers import SavingFront, saving_unavailable

                reason = saving_unavailable(self)
                if reason is not None:
                    raise RuntimeError(
                        f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: the config hook chose the "
                        f"saving path, which this worker cannot run: {reason}. Serve it on the masked path: "
                        "hf_overrides={\"lvtc_vllm_path\": \"masked\"} (vllm serve --hf-overrides "
                        "'{\"lvtc_vllm_path\": \"masked\"}').")
                self.lvtc = SavingFront(self, vllm_config, self.switch, prefix=lvtc_prefix)
                self.saving = True
            if self.lvtc is None:
                self.lvtc = MaskedLayers(model=self, vllm_config=vllm_config, switch=self.switch, prefix=lvtc_prefix)

    # ------------------------------------------------------------------------------------------------ vision side

    def _vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.tower_tiles += pixel_values.shape[0]  # (read by tests and benchmarks)
        return self.vision_post_layernorm(self.vision_model(pixel_values=pixel_values))

    def _item_features(self, pixel_values: torch.Tensor, tiles_per_item: list[int],
                       compressed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One `(tokens, width)` tensor per image (or video), in order: the projector's output, with LVTC each tile's
        rows of every projector (`LVTCLayers.tile_rows`), with the router each compressed tile's rows from its
        projector (`compressed`: the router's decision per tile, given by the scheduler in the items' data)."""
        if pixel_values.shape[0] == 0:
            return ()
        return self._item_rows(self._vit(pixel_values), tiles_per_item, compressed)

    def _item_rows(self, vit: torch.Tensor, tiles_per_item: list[int],
                   compressed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`_item_features` from the vision tower's output."""
        if compressed is not None and bool(compressed.any()):
            rows = tile_tokens(vit, compressed, self.multi_modal_projector, self.vir.projector)
            per_tile = torch.where(compressed, self.config.compressed_tokens_per_tile, self.config.image_seq_length)
            return tuple(rows.split([int(part.sum()) for part in per_tile.cpu().split(tiles_per_item)]))
        features = self.multi_modal_projector(vit)
        if self.lvtc is not None:
            features = self.lvtc.tile_rows(vit, features)
        per_tile = features.shape[1]
        features = features.reshape(-1, features.shape[-1])
        return tuple(features.split([n * per_tile for n in tiles_per_item]))

    def route_requests(self, requests: list, dropped: list[int] | None = None) -> list[list[list[bool]]]:
        """The router's decisions for a batch of requests' tiles (`router/worker.py`, `route_requests`)."""
        return route_requests(self, requests, dropped)

    def _embedded(self, pixels: torch.Tensor, tiles_per_item: list[int], compressed: torch.Tensor | None,
                  keys: object) -> tuple[torch.Tensor, ...]:
        """The items' rows: each one's kept when it was routed (`keys`: the key of each tile's item, from the
        scheduler), the others computed (together: one vision-tower call for the items not kept)."""
        rows: list[torch.Tensor | None] = [None] * len(tiles_per_item)
        if isinstance(keys, torch.Tensor) and keys.numel() == sum(tiles_per_item) and tiles_per_item:
            per_tile = keys.reshape(-1).tolist()
            rows = self.admitted.take([per_tile[sum(tiles_per_item[:i])] for i in range(len(tiles_per_item))])
        missing = [index for index, kept in enumerate(rows) if kept is None]
        if len(missing) == len(rows):
            return self._item_features(pixels, tiles_per_item, compressed)
        if missing:
            tiles = pixels.split(tiles_per_item)
            decided = None if compressed is None else compressed.split(tiles_per_item)
            computed = self._item_features(torch.cat([tiles[i] for i in missing]), [tiles_per_item[i] for i in missing],
                                           None if decided is None else torch.cat([decided[i] for i in missing]))
            for index, item_rows in zip(missing, computed):
                rows[index] = item_rows
        return tuple(rows)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        embeddings: tuple[torch.Tensor, ...] = ()
        # (None in vLLM's profiling runs, whose dummy items nobody routed: every tile at full size)
        compressed = kwargs.get("vir_compressed") if self.router_on else None
        if isinstance(compressed, torch.Tensor):
            compressed = compressed.reshape(-1).bool()
        keys = kwargs.get("vir_rows_key") if self.router_on else None
        # vLLM groups the items by modality and calls once per group; the order of keys is the order of items.
        for key in kwargs:
            if key == "pixel_values":
                embeddings += self._embedded(kwargs["pixel_values"], _counts(kwargs["image_num_patches"]),
                                             compressed, keys)
            elif key == "image_embeds":  # the projector's output, given by the client (`--enable-mm-embeds`)
                given = kwargs["image_embeds"]
                items = given.unbind(0) if isinstance(given, torch.Tensor) and given.dim() == 3 else given
                embeddings += tuple(item.reshape(-1, item.shape[-1]).to(self.model_dtype) for item in items)
            elif key == "pixel_values_videos":
                frames = _counts(kwargs["video_num_frames"])
                embeddings += self._embedded(kwargs["pixel_values_videos"], frames, compressed, keys)
        return embeddings

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        if self.lvtc is not None:
            return self.lvtc.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)
        if multimodal_embeddings is None or is_multimodal is None:
            return super().embed_input_ids(input_ids)
        return super().embed_input_ids(input_ids, multimodal_embeddings=multimodal_embeddings,
                                       is_multimodal=is_multimodal)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        if self.saving:
            self.lvtc.channel.requests += 1  # (the short builder's dummy runs are those before the first)
            return saving_positions(self.layout, len(input_tokens), mm_features, self.switch)
        return position_rows(self.layout, len(input_tokens), mm_features, self.max_model_len, self.switch)

    def get_model_state_cls(self) -> type:
        """The runner state vLLM's second model runner keeps for this model (V2 asks the model first): on the saving
        path, one that also keeps each request's tiles for the short layers' builder (`lvtc/saving/model_state.py`);
        otherwise vLLM's default, which V2 would pick for this model."""
        if self.saving:
            from .lvtc.saving.model_state import LVTCModelState

            return LVTCModelState
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState

        return DefaultModelState

    # -------------------------------------------------------------------------------------------------- LLM side

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        if self.lvtc is not None:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            return self.lvtc(positions, inputs_embeds)
        if positions.dim() == 2:  # LongRoPE's per-token factors (`lvtc/positions.py`)
            positions = read_rows(positions, None, self.max_model_len, self.switch)[0]
        return self.language_model.model(input_ids=input_ids, positions=positions,
                                         intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(vllm_weights(weights, vision_layers_to_run(self.config), self.router_on))
        # (weights pushed into a running engine, as reinforcement-learning frameworks do: scores and rows computed
        # with the old ones would route and embed images the new model has not seen)
        self.forget_routing()
        return loaded

    def forget_routing(self) -> None:
        """Let go of every image's kept scores and rows (on a weight load, and with vLLM's encoder- or prefix-cache
        reset, `RouterSchedulerMixin`): the next request with an image runs the vision tower and the router again."""
        if self.router_on:
            self.seen_scores.scores.clear()
            self.admitted.drop(list(self.admitted.rows))

    def get_mm_mapping(self) -> MultiModelKeys:
        """Where vLLM's LoRA looks: the LLM (an adapter with weights on the ViT or the projectors is refused,
        `_LoRANames`)."""
        connectors = [name for name in ("multi_modal_projector", "lvtc_lr_projectors", "lvtc_hr_projector")
                      if hasattr(self, name)]
        return MultiModelKeys.from_string_field(language_model="language_model", connector=connectors,
                                                tower_model=["vision_model", "vision_post_layernorm"])


def _counts(value: object) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(n) for n in value.reshape(-1).tolist()]
    return [int(n) for n in value]  # type: ignore[union-attr]


__all__ = ["InternVLXForConditionalGeneration", "vllm_weights"]
