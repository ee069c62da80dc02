"""The conversion plan: which target tensors each source tensor becomes, checked before any data is read.

Planning works on names and shapes only. Every source key must map to target parameters of the model being
built (same shapes), or be dropped for a stated reason; every target parameter must be produced, or belong to a
module that is new by design (a replaced projector, LVTC projectors) and is initialised. Anything else is an error
that lists the offending keys, so a checkpoint with an unexpected layout never converts half-silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .errors import ConversionError
from .key_mapping import (
    DROPPED_SOURCE_KEYS,
    FUSED_SLOT,
    INTERNVIT_KEY_MAPPING,
    MLP_PROJECTOR_KEY_MAPPING,
    NATIVE_KEY_MAPPING,
    NATIVE_PROJECTOR,
    PACKED_QKV,
    PVTC_REFERENCE_KEY_MAPPING,
    SOURCE_PREFIXES,
    TARGET_PREFIXES,
    VIR_KEY_MAPPING,
    map_key,
)
from .shards import TensorInfo

_MAX_LISTED = 12


@dataclass(frozen=True)
class Rows:
    """Select row ranges (dim 0) of a packed source tensor; the result owns its memory."""

    ranges: tuple[range, ...]

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (sum(len(r) for r in self.ranges), *shape[1:])

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] < max(r.stop for r in self.ranges):
            raise ConversionError(f"packed tensor has {tensor.shape[0]} rows, fewer than the layout needs")
        return torch.cat([tensor[r.start:r.stop] for r in self.ranges]).contiguous()


@dataclass(frozen=True)
class FusedSlot:
    """Where one source tensor goes in a fused target: ``target[index, part * n:(part + 1) * n]`` with ``n`` the
    target's dim 1 over ``parts`` (Qwen3-MoE's per-expert projections in transformers' fused expert tensors)."""

    index: int
    part: int
    parts: int

    def piece_shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (target_shape[1] // self.parts, *target_shape[2:])

    def place(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        rows = target.shape[1] // self.parts
        target[self.index, self.part * rows:(self.part + 1) * rows] = tensor


@dataclass(frozen=True)
class TargetTensor:
    name: str
    rows: Rows | None = None  # None = the source tensor as is
    slot: FusedSlot | None = None  # a part of a fused target (written once every part is read)

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.rows.shape(source_shape) if self.rows is not None else tuple(source_shape)

    def make(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.rows(tensor) if self.rows is not None else tensor


@dataclass(frozen=True)
class PlanInputs:
    """What the planner needs to know about the source and the target, besides the key lists."""

    llm_key_mapping: list[tuple[str, str]]
    vision_qkv_rows: dict[str, tuple[range, ...]]  # part -> rows of InternViT attn.qkv
    llm_qkv_rows: dict[str, tuple[range, ...]] | None  # part -> rows of InternLM2 wqkv (None: no packing)
    source_projector: str  # "mlp" or "pvtc"
    target_projector: str
    num_extra_lr_projectors: int  # LVTC T - 1 (0 without LVTC)
    init_lr_from_mlp1: bool
    tie_word_embeddings: bool
    source_layout: str = "opengvlab"  # or "native" (transformers' InternVLForConditionalGeneration)
    vir: bool = False  # the target has InternVL3.5-Flash's router (config.vir)
    add_router: bool = False  # the router is new: the source has none (`convert(add_router=True)`)


@dataclass
class ConversionPlan:
    reads: list[tuple[int, list[tuple[str, list[TargetTensor]]]]]  # (source shard index, [(key, targets)])
    dropped: dict[str, str]  # source key -> reason
    new: dict[str, tuple[int, ...]]  # target parameters to initialise -> shape
    copies: dict[str, str] = field(default_factory=dict)  # target -> source key, for tensors written twice
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _expand_packed(name: str, rows: dict[str, tuple[range, ...]] | None, key: str) -> list[TargetTensor]:
    if FUSED_SLOT in name:
        name, _, where = name.partition(FUSED_SLOT)
        index, part = (int(n) for n in where.split(":"))
        return [TargetTensor(name, slot=FusedSlot(index, part, 2 if name.endswith("gate_up_proj") else 1))]
    if PACKED_QKV not in name:
        return [TargetTensor(name)]
    if rows is None:
        raise ConversionError(f"{key} is a packed qkv tensor but this architecture has no packing rule")
    return [TargetTensor(name.replace(PACKED_QKV, part), Rows(rows[part])) for part in "qkv"]


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _projector_targets(name: str, inputs: PlanInputs, what: str) -> list[TargetTensor] | str:
    """An MLP projector tensor (InternVL2's mlp1 or the native projector): kept, copied into the extra LVTC LR
    projectors (init_lr_from_mlp1), or dropped when --projector replaces it."""
    targets = []
    if inputs.target_projector == "mlp":
        targets.append(TargetTensor(TARGET_PREFIXES["projector"] + name))
    if inputs.init_lr_from_mlp1:
        targets += [TargetTensor(TARGET_PREFIXES["lvtc_lr"].format(index=j) + name)
                    for j in range(inputs.num_extra_lr_projectors)]
    if not targets:
        return f"{what} replaced by a newly initialised {inputs.target_projector} projector (--projector)"
    return targets


def _map_native_key(key: str, inputs: PlanInputs) -> list[TargetTensor] | str | None:
    name = map_key(key, NATIVE_KEY_MAPPING)
    if name is None:
        return None
    if name.startswith(NATIVE_PROJECTOR):
        return _projector_targets(name[len(NATIVE_PROJECTOR):], inputs, "the native MLP projector")
    if name == "lm_head.weight" and inputs.tie_word_embeddings:
        return "tie_word_embeddings=True: the LM head is the input embedding matrix (tied), as in the source"
    return [TargetTensor(name)]


def map_source_key(key: str, inputs: PlanInputs) -> list[TargetTensor] | str | None:
    """Targets of one source key; a string is the reason it is dropped; None = unknown key."""
    for pattern, reason in DROPPED_SOURCE_KEYS:
        if re.fullmatch(pattern, key):
            return reason
    if inputs.source_layout == "native":
        return _map_native_key(key, inputs)
    prefix = SOURCE_PREFIXES["vision"]
    if key.startswith(prefix):
        name = map_key(key[len(prefix):], INTERNVIT_KEY_MAPPING)
        if name is None:
            return None
        return _expand_packed(TARGET_PREFIXES["vision"] + name, inputs.vision_qkv_rows, key)
    prefix = SOURCE_PREFIXES["mlp"]
    if key.startswith(prefix):
        name = map_key(key[len(prefix):], MLP_PROJECTOR_KEY_MAPPING)
        if name is None:
            return None
        return _projector_targets(name, inputs, "InternVL2 mlp1")
    prefix = SOURCE_PREFIXES["pvtc"]
    if key.startswith(prefix):
        name = map_key(key[len(prefix):], PVTC_REFERENCE_KEY_MAPPING)
        if name is None:
            return None
        if inputs.target_projector != "pvtc":
            return f"PVTC projector replaced by a newly initialised {inputs.target_projector} projector (--projector)"
        return [TargetTensor(TARGET_PREFIXES["projector"] + name)]
    if key.startswith(SOURCE_PREFIXES["vir"]):
        name = map_key(key, VIR_KEY_MAPPING) if inputs.vir else None
        return [TargetTensor(TARGET_PREFIXES["vir"] + name)] if name is not None else None
    prefix = SOURCE_PREFIXES["llm"]
    if key.startswith(prefix):
        name = map_key(key[len(prefix):], inputs.llm_key_mapping)
        if name is None:
            return None
        if name == "lm_head.weight" and inputs.tie_word_embeddings:
            # The reference model ties the LM head to the input embeddings, so this tensor is never used.
            return "tie_word_embeddings=True: the LM head is the input embedding matrix (tied), as in the reference"
        return _expand_packed(name, inputs.llm_qkv_rows, key)
    return None


def fused_parts_needed(name: str, shape: tuple[int, ...]) -> int:
    """Source tensors a fused expert target is made of: an expert's gate and up for ``gate_up_proj``, one else."""
    return shape[0] * (2 if name.endswith("gate_up_proj") else 1)


def is_new_by_design(name: str, inputs: PlanInputs) -> bool:
    """Target parameters that the source cannot hold and that the converter initialises."""
    if name.startswith(("model.lvtc_lr_projectors.", TARGET_PREFIXES["lvtc_hr"])):
        return True
    if inputs.add_router and name.startswith(TARGET_PREFIXES["vir"]):
        return True
    return name.startswith(TARGET_PREFIXES["projector"]) and inputs.target_projector != inputs.source_projector


def _refuse_unmapped(unknown: list[str], not_in_model: list[str], shape_errors: list[str], inputs: PlanInputs) -> None:
    """`build_plan`'s refusal of source tensors it cannot place: no mapping, no target, or the wrong shape."""
    if unknown and inputs.source_layout == "native":
        raise ConversionError(
            f"{len(unknown)} source tensor(s) have no mapping: {_listing(unknown)}. A transformers-native InternVL "
            "checkpoint holds model.vision_tower.*, model.multi_modal_projector.{layer_norm,linear_1,linear_2}.*, "
            "model.language_model.* and lm_head.weight only; merge LoRA adapters and remove extra modules first."
        )
    if unknown:
        raise ConversionError(
            f"{len(unknown)} source tensor(s) have no mapping: {_listing(unknown)}. The checkpoint is not in the "
            "InternVL2 / InternVL-X layout this converter knows (vision_model.*, mlp1.* or projector.*, "
            "language_model.*); merge LoRA adapters and remove extra modules before converting."
        )
    if not_in_model:
        raise ConversionError(
            f"{len(not_in_model)} source tensor(s) map to names the target model does not have: "
            f"{_listing(not_in_model)}. The config.json does not describe these weights (e.g. layer counts or "
            "architecture differ); check that config.json belongs to this checkpoint."
        )
    if shape_errors:
        raise ConversionError(
            f"{len(shape_errors)} shape mismatch(es) between the source tensors and the model described by its "
            f"config.json: {_listing(shape_errors)}."
        )


def build_plan(
    shards: list[dict[str, TensorInfo]],
    expected: dict[str, tuple[int, ...]],
    inputs: PlanInputs,
) -> ConversionPlan:
    """Map every source tensor (``shards``: per file, key -> info) onto ``expected`` (target name -> shape)."""
    reads: list[tuple[int, list[tuple[str, list[TargetTensor]]]]] = []
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    produced: dict[tuple[str, tuple[int, int] | None], str] = {}  # (target, fused slot) -> source key
    shape_errors: list[str] = []
    not_in_model: list[str] = []
    source_shapes: dict[str, tuple[int, ...]] = {}
    copies: dict[str, str] = {}
    for shard_index, infos in enumerate(shards):
        entries = []
        for key, info in infos.items():
            if key in source_shapes:
                raise ConversionError(f"source key {key} appears in two weight files; the checkpoint is inconsistent")
            source_shapes[key] = info.shape
            mapped = map_source_key(key, inputs)
            if mapped is None:
                unknown.append(key)
                continue
            if isinstance(mapped, str):
                dropped[key] = mapped
                continue
            for target in mapped:
                slot = (target.slot.index, target.slot.part) if target.slot is not None else None
                if (target.name, slot) in produced:
                    raise ConversionError(f"{key} and {produced[target.name, slot]} both map to {target.name}")
                produced[target.name, slot] = key
                if target.name not in expected:
                    not_in_model.append(f"{key} -> {target.name}")
                    continue
                try:
                    shape = target.shape(info.shape)
                except ValueError:
                    shape = None
                wanted = tuple(expected[target.name])
                if target.slot is not None:
                    wanted = target.slot.piece_shape(wanted)
                    if target.slot.index >= expected[target.name][0]:
                        not_in_model.append(f"{key} -> {target.name}[{target.slot.index}] (the model has "
                                            f"{expected[target.name][0]} experts)")
                        continue
                if shape != wanted:
                    shape_errors.append(f"{key} {tuple(info.shape)} -> {target.name} {shape}, expected {wanted}")
            if len(mapped) > 1 and all(t.rows is None for t in mapped):
                copies.update({t.name: key for t in mapped[1:]})
            entries.append((key, mapped))
        reads.append((shard_index, entries))

    _refuse_unmapped(unknown, not_in_model, shape_errors, inputs)
    fused_parts: dict[str, int] = {}
    for name, slot in produced:
        if slot is not None:
            fused_parts[name] = fused_parts.get(name, 0) + 1
    incomplete = [f"{name} ({count} of {fused_parts_needed(name, expected[name])} parts)"
                  for name, count in fused_parts.items()
                  if name in expected and count != fused_parts_needed(name, expected[name])]
    if incomplete:
        raise ConversionError(
            f"{len(incomplete)} fused expert tensor(s) lack per-expert source tensors: {_listing(incomplete)}. The "
            "checkpoint is incomplete (a missing shard?) or its config.json's num_experts does not match its weights."
        )
    produced_names = {name for name, _ in produced}
    missing = [name for name in expected if name not in produced_names]
    new = {name: tuple(expected[name]) for name in missing if is_new_by_design(name, inputs)}
    absent = [name for name in missing if name not in new]
    if absent:
        raise ConversionError(
            f"{len(absent)} parameter(s) of the converted model have no source tensor: {_listing(absent)}. "
            "The checkpoint is incomplete (a missing shard?) or its config.json does not match its weights."
        )
    return ConversionPlan(reads=reads, dropped=dropped, new=new, copies=copies, source_shapes=source_shapes)
