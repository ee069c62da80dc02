"""Training presets: which parts of InternVL-X learn (the paper's two stages, InternVL2's usual fine-tuning, LoRA).

| preset              | trainable                                                             | frozen            |
|---------------------|-----------------------------------------------------------------------|-------------------|
| `stage1`            | projectors: `mlp` / `pvtc`, LVTC's LR and HR projectors                | ViT, LLM, lm_head |
| `stage2`            | everything (the paper's instruction tuning, Sec. 4.1: "all model      | -                 |
|                     | parameters are finetuned")                                            |                   |
| `stage2-frozen-vit` | projectors + LLM + lm_head (InternVL2's `2nd_finetune` scripts:       | ViT               |
|                     | `--freeze_backbone True`)                                             |                   |
| `full`              | everything (the same parameters as `stage2`)                          | -                 |
| `lora`              | LoRA adapters on the LLM's attention and MLP linears (`lora_target`), | the rest          |
|                     | plus the projectors in full                                           |                   |
| `qlora`             | as `lora`, on a base loaded in 4-bit nf4 (QLoRA; the projectors and   | the rest (4-bit)  |
|                     | lm_head stay in full precision, `internvlx_hf.quantization`)          |                   |
| `vico`              | the 64-token projector and LoRA adapters on the LLM (stage 1; merged  | the rest          |
|                     | into OUT), then the router's pooling and gate (stage 2): ViCO,        |                   |
|                     | `training.vico`; a model with a router                                |                   |
| `vico-projector`    | as `vico`, without the adapters: the LLM stays as it is               | the rest          |
| `vico-router`       | the router's pooling and gate (ViCO's stage 2 alone)                  | the rest          |

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer, so they stay bit-identical.
InternVL3.5-Flash's router (``model.vir``: its pooling and gate) is frozen by every preset but ViCO's (`vico`,
`vico-projector`, `vico-router`: `training.vico` trains it on labels, a decision itself has no gradient); its compressed
tiles' projector (``mlp2``) counts among the projectors.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

PRESETS = ("stage1", "stage2", "stage2-frozen-vit", "full", "lora", "qlora", "vico", "vico-projector", "vico-router")
# Presets that train LoRA adapters (a peft `PeftModel`; OUT/adapter plus the merged model).
LORA_PRESETS = frozenset({"lora", "qlora", "vico"})
# What the projectors do beside LoRA adapters (`LoraSettings.projectors`).
LORA_PROJECTORS = ("train", "freeze")

# (group, module prefix) in the order the report lists them.
MODULE_GROUPS = (
    ("vision", "model.vision_tower"),
    ("projector", "model.multi_modal_projector"),
    ("lvtc_lr_projectors", "model.lvtc_lr_projectors"),
    ("lvtc_hr_projector", "model.lvtc_hr_projector"),
    ("compressed_projector", "model.vir.projector"),  # InternVL3.5-Flash's 64-token projector (before the router)
    ("router", "model.vir"),
    ("llm", "model.language_model"),
    ("lm_head", "lm_head"),
)
PROJECTOR_GROUPS = frozenset({"projector", "lvtc_lr_projectors", "lvtc_hr_projector", "compressed_projector"})
# The router trains only in ViCO's presets (see the module docstring).
ALL_GROUPS = frozenset(group for group, _ in MODULE_GROUPS) - {"router"}
_TRAINABLE_GROUPS = {
    "stage1": PROJECTOR_GROUPS,
    "stage2": ALL_GROUPS,
    "stage2-frozen-vit": PROJECTOR_GROUPS | {"llm", "lm_head"},
    "full": ALL_GROUPS,
    "vico-projector": frozenset({"compressed_projector", "router"}),
    "vico-router": frozenset({"router"}),
}
_PEFT_PREFIX = "base_model.model."


def module_group(name: str) -> str:
    """The group (``vision``, ``projector``, ``lvtc_lr_projectors``, ``lvtc_hr_projector``, ``llm``, ``lm_head``) of a
    parameter or module name of an `InternVLXForConditionalGeneration`, bare or wrapped by peft."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    for group, prefix in MODULE_GROUPS:
        if name == prefix or name.startswith(prefix + "."):
            return group
    return "other"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters of the `lora` preset (peft's `LoraConfig` names), and what the projectors do.

    ``projectors="train"`` trains them in full beside the adapters (peft's ``modules_to_save``: the paper's second
    stage trains every projector); ``"freeze"`` keeps them as they are, as InternVL2's own ``*_lora.sh`` scripts do,
    so that the adapter holds LoRA weights only and vLLM can serve it unmerged (`--enable-lora`), which it refuses
    for an adapter with ``modules_to_save``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target: str = "llm"
    projectors: str = "train"


def _linear_names(model: nn.Module, part: str) -> list[str]:
    prefix = {"llm": "model.language_model.layers.", "vision": "model.vision_tower.encoder."}[part]
    return [name for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, nn.Linear)]


def lora_target_modules(model: nn.Module, target: str = "llm") -> list[str]:
    """Full names of the Linear layers that ``target`` selects for LoRA.

    ``target`` is a comma-separated list of: ``llm`` (every attention and MLP Linear of the LLM's layers),
    ``vision`` (every Linear of the ViT's layers), ``llm.NAME`` / ``vision.NAME`` (the Linears of that part whose
    name ends with NAME, e.g. ``llm.q_proj`` or ``vision.mlp.fc1``) or a bare ``NAME`` (= ``llm.NAME``). Projectors
    are never LoRA targets: they are trained in full by the preset.

    Raises:
        ValueError: an item selects nothing (the message lists the names that exist).
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"lora_target must be a non-empty comma-separated string, got {target!r}")
    selected: dict[str, None] = {}
    for item in (part.strip() for part in target.split(",")):
        if not item:
            continue
        part, _, suffix = item.partition(".") if item.split(".")[0] in ("llm", "vision") else ("llm", "", item)
        names = _linear_names(model, part)
        matched = names if not suffix else [n for n in names if n == suffix or n.endswith("." + suffix)]
        if not matched:
            leaves = sorted({n.split(".")[-1] for n in names})
            raise ValueError(
                f"lora_target item {item!r} matches no Linear layer of the {part}; its Linear layers are named "
                f"{leaves} (use e.g. '{part}.{leaves[0] if leaves else 'q_proj'}', or '{part}' for all of them)."
            )
        selected.update(dict.fromkeys(matched))
    return list(selected)


def _target_regex(model: nn.Module, names: list[str]) -> str:
    """One regex that matches exactly ``names`` among the model's modules, with layer indices generalised.

    peft rewrites a list of target names into their last components ("q_proj", ...), which would also match the
    ViT's and the PVTC projector's layers of the same name when the adapter is loaded again; a regex is kept as is.
    """
    patterns = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) for name in names)
    regex = "|".join(patterns)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]
    if sorted(matched) != sorted(names):  # cannot generalise: list the names themselves
        regex = "|".join(re.escape(name) for name in names)
    return regex


def _projector_modules(model: nn.Module) -> list[str]:
    names = ["model.multi_modal_projector"]
    lr = getattr(model.model, "lvtc_lr_projectors", None)
    if lr is not None:
        names += [f"model.lvtc_lr_projectors.{i}" for i in range(len(lr))]
    if getattr(model.model, "lvtc_hr_projector", None) is not None:
        names.append("model.lvtc_hr_projector")
    if getattr(model.model, "vir", None) is not None:
        names.append("model.vir.projector")
    return names


def lora_config(model: nn.Module, settings: LoraSettings | None = None):
    """peft `LoraConfig` of the `lora` preset: adapters on the selected Linears, projectors fully trainable (or
    frozen with ``settings.projectors="freeze"``)."""
    from peft import LoraConfig

    settings = settings or LoraSettings()
    if settings.r < 1:
        raise ValueError(f"lora_r must be >= 1, got {settings.r}")
    if settings.projectors not in LORA_PROJECTORS:
        raise ValueError(f"lora_projectors must be one of {list(LORA_PROJECTORS)}, got {settings.projectors!r} "
                         "(train: the projectors train in full beside the adapters; freeze: adapters only, which "
                         "vLLM can serve unmerged)")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_target_regex(model, lora_target_modules(model, settings.target)),
        modules_to_save=_projector_modules(model) if settings.projectors == "train" else None,
        bias="none",
    )


@contextmanager
def ignore_peft_checkpointing_warning():
    """peft reads transformers' deprecated alias `is_gradient_checkpointing` (transformers 5.23 warns about it on
    every LoRA model peft builds; the value is that of `is_activation_checkpointing`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_preset(model: nn.Module, preset: str, lora: LoraSettings | None = None) -> nn.Module:
    """Set which parameters of an `InternVLXForConditionalGeneration` train; returns the model (a peft
    `PeftModel` wrapping it for ``preset="lora"`` / ``"qlora"``).

    ``qlora`` needs a model loaded in 4-bit (`internvlx_hf.quantization.bitsandbytes_config(4, ...)`): peft's
    `prepare_model_for_kbit_training` then casts its half-precision non-quantized weights to float32 (stable
    adapter training), and LoRA is applied as for ``lora``. Activation checkpointing is left to the Trainer's flag.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if preset == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("preset 'qlora' trains LoRA on a 4-bit base: load the model with quantization_config="
                         "internvlx_hf.quantization.bitsandbytes_config(4, config) (as `internvlx train --preset "
                         "qlora` does), or use preset 'lora' on a full-precision model")
    if preset.startswith("vico") and getattr(model.model, "vir", None) is None:
        raise ValueError(f"preset {preset!r} trains a router, and this model has none (config.vir is None): add one "
                         "first, `internvlx convert SRC DST --add-router`")
    if preset in LORA_PRESETS:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if preset == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = lora_config(model, lora)
        if preset == "vico":
            if lora is not None and lora.projectors == "freeze":
                raise ValueError("--lora_projectors freeze: preset vico trains the compressed tiles' projector "
                                 "and the router beside the adapters; drop the flag")
            # beside the adapters: what ViCO trains (the 256-token projector stays as it is: the teacher's)
            config.modules_to_save = ["model.vir.projector", "model.vir.pooling", "model.vir.gating"]
        model.requires_grad_(False)
        with ignore_peft_checkpointing_warning():
            peft_model = get_peft_model(model, config)
        # With the embeddings frozen, a text-only batch would give checkpointed layers inputs without grad.
        peft_model.enable_input_require_grads()
        return peft_model
    trainable = _TRAINABLE_GROUPS[preset]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(module_group(name) in trainable)
    if "llm" not in trainable:
        model.enable_input_require_grads()
    return model


@dataclass
class GroupCount:
    group: str
    trainable: int
    total: int


def _weights(parameter) -> int:
    """Weights in a parameter: a bitsandbytes 4-bit one packs two per byte, its original shape is in ``quant_state``."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def trainable_parameters(model: nn.Module) -> list[GroupCount]:
    """Trainable and total parameters per module group (LoRA adapters count in the group they adapt; peft's frozen
    copies of fully trained modules are not counted; 4-bit weights count as the weights they stand for)."""
    counts: dict[str, GroupCount] = {}
    for name, parameter in model.named_parameters():
        if ".original_module." in name:
            continue
        group = module_group(name)
        count = counts.setdefault(group, GroupCount(group, 0, 0))
        count.total += _weights(parameter)
        if parameter.requires_grad:
            count.trainable += _weights(parameter)
    order = [group for group, _ in MODULE_GROUPS] + ["other"]
    return [counts[group] for group in order if group in counts]


def format_trainable(model: nn.Module, preset: str | None = None) -> str:
    rows = trainable_parameters(model)
    title = "Trainable parameters" + (f" (preset {preset})" if preset else "")
    lines = [title, f"  {'group':<20} {'trainable':>14} {'total':>14}"]
    for row in rows:
        lines.append(f"  {row.group:<20} {row.trainable:>14,} {row.total:>14,}")
    trainable, total = sum(r.trainable for r in rows), sum(r.total for r in rows)
    lines.append(f"  {'total':<20} {trainable:>14,} {total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)


def describe_lora(config: Any) -> dict[str, Any]:
    """The LoRA settings of a peft config, JSON-serialisable (for the provenance record)."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": config.target_modules, "modules_to_save": list(config.modules_to_save or [])}


__all__ = ["GroupCount", "LORA_PRESETS", "LORA_PROJECTORS", "LoraSettings", "MODULE_GROUPS", "PRESETS", "apply_preset",
           "describe_lora", "format_trainable", "lora_config", "lora_target_modules", "module_group",
           "trainable_parameters"]
