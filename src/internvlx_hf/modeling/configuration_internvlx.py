"""Configuration of InternVL-X models (InternVL2 family with PVTC / LVTC visual token compression, and
InternVL3.5-Flash's visual resolution router, ViR).

This file is saved next to checkpoints as remote code: it imports only the standard library and transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

try:  # transformers >= 5.20 builds sub-configs from `sub_configs_defaults` specs
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # 5.16-5.19: a plain `sub_configs` map, and the config builds them itself (see __post_init__)
    SubConfigSpec = None

PROJECTOR_TYPES = ("mlp", "pvtc")

# Written into every saved config.json so that `trust_remote_code=True` finds the classes without the plugin.
AUTO_MAP = {
    "AutoConfig": "configuration_internvlx.InternVLXConfig",
    "AutoModel": "modeling_internvlx.InternVLXForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_internvlx.InternVLXForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_internvlx.InternVLXForConditionalGeneration",
}
UPSAMPLE_MODES = ("nearest", "bilinear")
HR_SCALES = ("none", "rms")

# InternViT-300M-448px (the vision tower of InternVL2-1B/2B/4B/8B).
_INTERNVIT_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "attention_bias": True,
    "use_qk_norm": False,
    "hidden_act": "gelu",
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "layer_scale_init_value": 0.1,
    "image_size": 448,
    "patch_size": 14,
    "use_mean_pooling": True,
}

# InternLM2-chat-1.8B (the LLM of InternVL2-2B) in Llama layout, as `internvlx convert` writes it.
_INTERNLM2_1_8B_AS_LLAMA = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "vocab_size": 92553,
    "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}


def with_longrope_factor(text_config: dict[str, Any]) -> dict[str, Any]:
    """``text_config`` (a dict) with the ``factor`` of its long-context RoPE written out.

    Phi-3's RoPE ("su", transformers' "longrope") scales attention with ``max_position_embeddings /
    original_max_position_embeddings`` when its rope parameters carry no ``factor``, and transformers then warns on
    every load that ``factor`` should hold that ratio. Written out, the ratio gives the same frequencies and scaling
    without the warning; folders converted before it was written get it here when they load.
    """
    for key in ("rope_parameters", "rope_scaling"):
        rope = text_config.get(key)
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) not in ("longrope", "su"):
            continue
        original = rope.get("original_max_position_embeddings", text_config.get("original_max_position_embeddings"))
        longest = text_config.get("max_position_embeddings")
        if rope.get("factor") is None and original and longest and longest >= original:
            return {**text_config, key: {**rope, "factor": longest / original}}
    return text_config


def _tokens_per_side(image_size: int, patch_size: int, ratio: float, what: str) -> int:
    """Tokens per tile side after a projector that merges (1/ratio)^2 ViT tokens into one."""
    grid = image_size // patch_size
    window = 1.0 / ratio
    if ratio <= 0 or ratio > 1 or abs(window - round(window)) > 1e-6 or grid % round(window) != 0:
        raise ValueError(
            f"{what}={ratio} does not divide the {grid}x{grid} ViT grid (image_size {image_size} / patch_size "
            f"{patch_size}); use 1/M where M divides {grid}, e.g. 0.5 or 1.0."
        )
    return grid // round(window)


def _options_from_any(cls, value, name: str):
    """``value`` (None, a ``cls`` or the dict config.json holds) as a ``cls``, every key one of its fields."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be None, a dict or {cls.__name__}, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"Unknown {name} option(s) {unknown}; valid options are {sorted(known)}")
    return cls(**value)


@dataclass
class LVTCConfig:
    """Layer-wise visual token compression (paper Sec. 3.2, Algorithm 1).

    Args:
        lr_downsample_ratio: ratio of the low-resolution (LR) projectors. ``None`` = the model's
            ``downsample_ratio`` (the input ids are in this short layout). 0.5 gives M1=2: 256 tokens per 448px tile.
        hr_downsample_ratio: ratio of the high-resolution (HR) projector whose output is added at layer ``k``.
            1.0 gives M2=1: 1024 tokens per tile.
        expand_layer: ``k``; layers ``< k`` run on the LR tokens, layers ``>= k`` on the upsampled HR tokens.
            ``None`` = 3/4 of the LLM depth (the paper's choice). ``k == depth`` never expands.
        num_lr_projectors: ``T >= 1``; the first LR projector feeds the input layer, the other ``T-1`` are added
            to the visual positions before layers ``s, s+i, ...``.
        inject_start: ``s``; ``None`` = 1 when ``T > 1``.
        inject_interval: ``i``.
        upsample_mode: ``"nearest"`` (default) or ``"bilinear"`` 2D upsampling of each tile's LR states.
        lr_projector_type: ``"mlp"`` or ``"pvtc"``; ``None`` = the model's ``projector_type``.
        hr_projector_type: ``"mlp"`` or ``"pvtc"``.
        hr_scale: ``"none"`` (default, the paper: the HR projector's output is added as it is) or ``"rms"``: each
            HR token is rescaled to the RMS of the upsampled LR state it is added to (per token, over the hidden
            size), so the HR signal enters the residual stream at the same scale as the LR one whatever the depth
            of k. `internvlx convert --lvtc` writes "rms" unless told otherwise: after an upgrade it is the formulation
            whose HR tokens carried the detail (docs/lvtc.md, "Which compression"); the default here stays the
            paper's, which trained InternVL-X checkpoints and configs saved before the option existed mean.
    """

    lr_downsample_ratio: float | None = None
    hr_downsample_ratio: float = 1.0
    expand_layer: int | None = None
    num_lr_projectors: int = 1
    inject_start: int | None = None
    inject_interval: int = 1
    upsample_mode: str = "nearest"
    lr_projector_type: str | None = None
    hr_projector_type: str = "mlp"
    hr_scale: str = "none"

    @classmethod
    def of(cls, config) -> "LVTCConfig | None":
        """The LVTC settings of any InternVL-X config: ``config.lvtc``, where the config may also come from a
        checkpoint's own remote code saved by an earlier version, whose ``lvtc`` is the dict config.json holds. Code
        outside the model reads a config it did not build this way (the model reads ``config.lvtc``)."""
        value = getattr(config, "lvtc", None)
        return cls.from_any(value) if isinstance(value, dict) else value

    @classmethod
    def from_any(cls, value: "LVTCConfig | dict | None") -> "LVTCConfig | None":
        return _options_from_any(cls, value, "lvtc")

    def resolve(self, config: "InternVLXConfig") -> "LVTCConfig":
        """Fill the ``None`` defaults from the model config and validate every value."""
        depth = config.text_config.num_hidden_layers
        lr_ratio = self.lr_downsample_ratio if self.lr_downsample_ratio is not None else config.downsample_ratio
        if abs(lr_ratio - config.downsample_ratio) > 1e-9:
            raise ValueError(
                f"lvtc.lr_downsample_ratio={lr_ratio} differs from downsample_ratio={config.downsample_ratio}: the "
                "input ids are in the LR layout, so set downsample_ratio to the LR ratio (or leave this None)."
            )
        lr_type = self.lr_projector_type if self.lr_projector_type is not None else config.projector_type
        if lr_type != config.projector_type:
            raise ValueError(
                f"lvtc.lr_projector_type={lr_type!r} differs from projector_type={config.projector_type!r}: the first "
                "LR projector is the model's projector; set projector_type instead (or leave this None)."
            )
        if self.hr_projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"lvtc.hr_projector_type must be one of {PROJECTOR_TYPES}, got {self.hr_projector_type!r}")
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"lvtc.upsample_mode must be one of {UPSAMPLE_MODES}, got {self.upsample_mode!r}")
        if self.hr_scale not in HR_SCALES:
            raise ValueError(f"lvtc.hr_scale must be one of {HR_SCALES}, got {self.hr_scale!r}")
        image_size, patch_size = image_and_patch(config.vision_config)
        n1 = _tokens_per_side(image_size, patch_size, lr_ratio, "lvtc.lr_downsample_ratio")
        n2 = _tokens_per_side(image_size, patch_size, self.hr_downsample_ratio, "lvtc.hr_downsample_ratio")
        if n2 <= n1 or n2 % n1 != 0:
            raise ValueError(
                f"LVTC must expand each tile from {n1}x{n1} to a multiple; got {n2}x{n2} from hr_downsample_ratio="
                f"{self.hr_downsample_ratio}. Use an hr_downsample_ratio larger than lr_downsample_ratio={lr_ratio}."
            )
        k = self.expand_layer if self.expand_layer is not None else (3 * depth) // 4
        if not 1 <= k <= depth:
            raise ValueError(f"lvtc.expand_layer={k} must lie in [1, {depth}] (the LLM has {depth} layers).")
        if self.num_lr_projectors < 1:
            raise ValueError(f"lvtc.num_lr_projectors must be >= 1, got {self.num_lr_projectors}")
        if self.inject_interval < 1:
            raise ValueError(f"lvtc.inject_interval must be >= 1, got {self.inject_interval}")
        s = self.inject_start if self.inject_start is not None else 1
        resolved = LVTCConfig(
            lr_downsample_ratio=lr_ratio,
            hr_downsample_ratio=self.hr_downsample_ratio,
            expand_layer=k,
            num_lr_projectors=self.num_lr_projectors,
            inject_start=s,
            inject_interval=self.inject_interval,
            upsample_mode=self.upsample_mode,
            lr_projector_type=lr_type,
            hr_projector_type=self.hr_projector_type,
            hr_scale=self.hr_scale,
        )
        bad = [layer for layer in resolved.injection_layers if not 0 <= layer < k]
        if bad:
            raise ValueError(
                f"LVTC injection layers {resolved.injection_layers} (inject_start={s}, inject_interval="
                f"{self.inject_interval}, {self.num_lr_projectors - 1} extra LR projectors) must lie before the "
                f"expand layer k={k}; {bad} do not. Lower inject_start/inject_interval or num_lr_projectors."
            )
        return resolved

    @property
    def injection_layers(self) -> list[int]:
        """Layer indices before which LR projectors 1..T-1 are added (Algorithm 1)."""
        s = self.inject_start if self.inject_start is not None else 1
        return [s + j * self.inject_interval for j in range(self.num_lr_projectors - 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VIR_SCOPES = ("sample", "call")


@dataclass
class ViRConfig:
    """InternVL3.5-Flash's Visual Resolution Router (ViR): per tile, after the vision tower, a pooled score decides
    whether the tile enters the LLM as ``image_seq_length`` tokens (the model's projector, InternVL's ``mlp1``) or as
    a quarter of them (the compressed projector, ``mlp2``: 64 tokens per 448px tile). Not in the InternVL-X paper;
    what InternVL3.5-Flash checkpoints ship (docs/flash.md).

    The prompt holds ``image_seq_length`` `<IMG_CONTEXT>` tokens per tile, as for every InternVL model; `generate()`
    (and a forward given ``pixel_values``) deletes a compressed tile's placeholders after its first
    ``compressed_tokens_per_tile``, as the reference does before its LLM.

    Args:
        enabled: the reference's ``flash_mode``. ``False`` runs the same weights as plain InternVL3.5 (every tile on
            the model's projector).
        relative_threshold: ``flash_relative_threshold``. A tile is compressed when its score ``p0`` is above this
            quantile (``torch.quantile``, linear interpolation) of the scores of its scope ...
        absolute_threshold: ``flash_absolute_threshold``: ... and ``p0 >= absolute_threshold``.
        scope: where the quantile is taken. ``"sample"`` (default): over the tiles of each sample (each row, or each
            packed sequence), so that an answer does not depend on the other samples of a batch. ``"call"``: over
            every tile of the call, as the reference's `generate_flash` (which takes batch size 1, where both agree).
        compressed_downsample_ratio: the pixel-shuffle ratio of the compressed projector (``downsample_ratio ** 2``
            in the reference: 0.25, 8x8 = 64 tokens per 448px tile).
        pooling_num_heads: heads of the pooling's cross-attention (the reference hard-codes 16; the ViT width must be
            a multiple).
    """

    enabled: bool = True
    relative_threshold: float = 0.1
    absolute_threshold: float = 0.5
    scope: str = "sample"
    compressed_downsample_ratio: float | None = None
    pooling_num_heads: int = 16

    @classmethod
    def from_any(cls, value: "ViRConfig | dict | None") -> "ViRConfig | None":
        return _options_from_any(cls, value, "vir")

    def resolve(self, config: "InternVLXConfig") -> "ViRConfig":
        """Fill the ``None`` defaults from the model config and validate every value."""
        if config.projector_type != "mlp" or config.lvtc is not None:
            raise ValueError("vir (InternVL3.5-Flash's router) runs on the MLP projector without LVTC; set "
                             "projector_type='mlp' and lvtc=None, or drop vir.")
        if config.select_layer != -1:
            raise ValueError(f"select_layer={config.select_layer} with vir: InternVL3.5-Flash's router path reads the "
                             "ViT's last layer whatever select_layer says (every published Flash model has -1); "
                             "set select_layer=-1, or drop vir.")
        self.check()
        ratio = self.compressed_downsample_ratio
        ratio = ratio if ratio is not None else config.downsample_ratio ** 2
        image_size, patch_size = image_and_patch(config.vision_config)
        side = _tokens_per_side(image_size, patch_size, ratio, "vir.compressed_downsample_ratio")
        if side * side >= config.image_seq_length:
            raise ValueError(f"vir.compressed_downsample_ratio={ratio} gives {side * side} tokens per tile, not fewer "
                             f"than the model's {config.image_seq_length}; use a ratio below downsample_ratio.")
        width = config.vision_config.hidden_size
        if self.pooling_num_heads < 1 or width % self.pooling_num_heads:
            raise ValueError(f"vir.pooling_num_heads={self.pooling_num_heads} does not divide the ViT width "
                             f"{width} (vision_config.hidden_size); the router's pooling needs a divisor of it "
                             "(the reference's 16).")
        return ViRConfig(enabled=bool(self.enabled), relative_threshold=float(self.relative_threshold),
                         absolute_threshold=float(self.absolute_threshold), scope=self.scope,
                         compressed_downsample_ratio=ratio, pooling_num_heads=self.pooling_num_heads)

    def check(self) -> None:
        """The settings a decision reads, checked where they are used too (`config.vir.relative_threshold = 1.5` set
        in Python would otherwise fail inside torch.quantile)."""
        if isinstance(self.relative_threshold, bool) or not isinstance(self.relative_threshold, (int, float)) \
                or not 0.0 <= self.relative_threshold <= 1.0:
            raise ValueError(f"config.vir.relative_threshold must be a number in [0, 1] (a quantile of the tiles' "
                             f"scores), got {self.relative_threshold!r}")
        if isinstance(self.absolute_threshold, bool) or not isinstance(self.absolute_threshold, (int, float)):
            raise ValueError(f"config.vir.absolute_threshold must be a number (a score p0 in [0, 1]), got "
                             f"{self.absolute_threshold!r}")
        if self.scope not in VIR_SCOPES:
            raise ValueError(f"config.vir.scope must be one of {VIR_SCOPES}, got {self.scope!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_and_patch(vision_config) -> tuple[int, int]:
    """The ViT's tile and patch size in pixels (a config may give either as an int or a (height, width) pair)."""
    image_size = vision_config.image_size
    patch_size = vision_config.patch_size
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    return int(image_size), int(patch_size)


class InternVLXConfig(PreTrainedConfig):
    r"""Configuration of [`InternVLXForConditionalGeneration`].

    The defaults reproduce InternVL2-2B geometry (InternViT-300M-448px + InternLM2-chat-1.8B in Llama layout).

    Args:
        vision_config (`InternVLVisionConfig` or `dict`): transformers' InternViT config.
        text_config (`PreTrainedConfig` or `dict`): any decoder-only LLM config (Llama, Qwen2, Phi3, ...);
            a dict needs a `model_type`.
        downsample_ratio (`float`, defaults to 0.5): tokens per tile side = (image_size / patch_size) * ratio.
        select_layer (`int`, defaults to -1): ViT layer whose output feeds the projector (InternVL2 `select_layer`).
        image_token_id (`int`): id of `<IMG_CONTEXT>`; the visual features replace these placeholders in order.
        image_start_token_id, image_end_token_id (`int`, optional): ids of `<img>` / `</img>`, which frame each
            image's `<IMG_CONTEXT>` run. Only used to keep these framing tokens out of the loss (like `<IMG_CONTEXT>`,
            they are never a training target); `internvlx convert` fills them from the tokenizer.
        image_seq_length (`int`, optional): visual tokens per tile fed to the LLM. Derived from the image size,
            patch size and downsample ratio (256 at 448/14/0.5, 1024 at ratio 1.0); an explicit value that
            disagrees is an error. With LVTC this is the low-resolution (short layout) count.
        projector_type (`str`, defaults to `"mlp"`): `"mlp"` = InternVL2 pixel shuffle + LayerNorm/Linear/GELU/Linear;
            `"pvtc"` = the paper's PVTC projector (Sec. 3.1).
        pvtc_num_layers (`int`, defaults to 1): cross-attention layers `L` of each PVTC branch.
        pvtc_num_heads (`int`, defaults to 16): attention heads of PVTC (the reference hard-codes 16).
        lvtc (`dict` or `LVTCConfig`, optional): enables layer-wise visual token compression (see `LVTCConfig`).
            Held resolved as an `LVTCConfig` (every default filled in; ``config.lvtc.expand_layer``), written to
            config.json as a dict, as transformers writes ``quantization_config``.
        vir (`dict` or `ViRConfig`, optional): InternVL3.5-Flash's visual resolution router (see `ViRConfig`): per
            tile, 256 or 64 tokens. Held resolved, written to config.json as a dict.
        template (`str`, defaults to `"internlm2-chat"`): InternVL2 chat template name.
        tie_word_embeddings (`bool`, optional): defaults to the text config's value.
    """

    model_type = "internvlx"
    # The Trainer's evaluation keeps every other output field as predictions: the cache (under both of its names) and
    # the router's routing (a structure per batch, not a tensor) stay out.
    keys_to_ignore_at_inference = ["past_key_values", "cache", "vir_routing"]
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "text_config": SubConfigSpec(
                config_class=AutoConfig, model_type="llama", init_kwargs=_INTERNLM2_1_8B_AS_LLAMA
            ),
            "vision_config": SubConfigSpec(config_class=InternVLVisionConfig, init_kwargs=_INTERNVIT_300M),
        }
    else:
        sub_configs = {"text_config": AutoConfig, "vision_config": InternVLVisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    downsample_ratio: float = 0.5
    select_layer: int = -1
    image_token_id: int = 92546
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    image_seq_length: int | None = None
    projector_type: str = "mlp"
    pvtc_num_layers: int = 1
    pvtc_num_heads: int = 16
    lvtc: LVTCConfig | dict | None = None
    vir: ViRConfig | dict | None = None
    template: str = "internlm2-chat"
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVLVisionConfig(**{**_INTERNVIT_300M, **self.vision_config})
        if isinstance(self.text_config, dict) and "model_type" not in self.text_config:
            raise ValueError(
                "text_config needs a 'model_type' (e.g. 'llama', 'qwen2', 'phi3') so the LLM class can be chosen."
            )
        if isinstance(self.text_config, dict):
            self.text_config = with_longrope_factor(self.text_config)
        if SubConfigSpec is None:
            # What transformers >= 5.20 does from `sub_configs_defaults` before its own __post_init__.
            if self.vision_config is None:
                self.vision_config = InternVLVisionConfig(**_INTERNVIT_300M)
            if self.text_config is None:
                self.text_config = dict(_INTERNLM2_1_8B_AS_LLAMA)
            if isinstance(self.text_config, dict):
                self.text_config = CONFIG_MAPPING[self.text_config["model_type"]](**self.text_config)
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        image_size, patch_size = image_and_patch(self.vision_config)
        side = _tokens_per_side(image_size, patch_size, self.downsample_ratio, "downsample_ratio")
        derived = side * side
        if self.image_seq_length is not None and self.image_seq_length != derived:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} conflicts with image_size {image_size}, patch_size "
                f"{patch_size} and downsample_ratio {self.downsample_ratio}, which give {derived} tokens per tile. "
                "Leave image_seq_length unset (it is derived) or fix downsample_ratio."
            )
        self.image_seq_length = derived
        if self.pvtc_num_layers < 1:
            raise ValueError(f"pvtc_num_layers must be >= 1, got {self.pvtc_num_layers}")
        lvtc = LVTCConfig.from_any(self.lvtc)
        # Held resolved (every default filled in) so that the saved config.json says exactly what runs.
        self.lvtc = lvtc.resolve(self) if lvtc is not None else None
        vir = ViRConfig.from_any(self.vir)
        self.vir = vir.resolve(self) if vir is not None else None
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key, kind in (("lvtc", LVTCConfig), ("vir", ViRConfig)):
            if isinstance(output.get(key), kind):
                output[key] = output[key].to_dict()
        return output

    @property
    def vision_tokens_per_side(self) -> int:
        """ViT patch grid side (32 for 448px tiles with 14px patches)."""
        image_size, patch_size = image_and_patch(self.vision_config)
        return image_size // patch_size

    @property
    def hr_tokens_per_tile(self) -> int | None:
        """Visual tokens per tile from the LVTC expand layer ``k`` on (1024 for 448px tiles at
        ``hr_downsample_ratio=1.0``), or None when LVTC is off; layers before ``k`` see ``image_seq_length``."""
        lvtc = self.lvtc
        if lvtc is None:
            return None
        return (self.vision_tokens_per_side // round(1.0 / lvtc.hr_downsample_ratio)) ** 2

    @property
    def compressed_tokens_per_tile(self) -> int | None:
        """Visual tokens of a tile the ViR compresses (64 for 448px tiles), or None without the router."""
        vir = self.vir
        if vir is None:
            return None
        return (self.vision_tokens_per_side // round(1.0 / vir.compressed_downsample_ratio)) ** 2


InternVLXConfig.register_for_auto_class()

__all__ = ["InternVLXConfig", "LVTCConfig", "ViRConfig"]
