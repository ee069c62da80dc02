"""The checkpoints InternVL users hold, as `internvlx convert` writes them, small enough for vLLM on a CPU.

Each family starts from the shipped fixture of its source layout (tests/fixtures: the real InternLM2, InternLM2.5,
Phi-3 sentencepiece tokenizers and the Qwen2 / Qwen2.5 byte-level BPE ones, with their templates and processors) or,
where no fixture has that LLM, from a source built around a fixture's tokenizer (Llama/Yi: the Phi-3 sentencepiece
model with `legacy=True` as Yi has it; Llama-3: a byte-level BPE; Qwen3: a transformers-native InternVL3.5 folder).
`internvlx convert` turns it into an internvlx-hf folder (tokenizer, chat template, processor config, config), then
`widen` gives the LLM 32-wide heads and 4 layers (vLLM's CPU attention needs head sizes >= 32; the fixtures have 16)
and fresh random weights: everything but the weights and the head layout is what the converter wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

import golden
from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration
from internvlx_hf.conversion import convert

HEAD_SIZE = 32
LAYERS = 4


@dataclasses.dataclass(frozen=True)
class Family:
    """An LLM family as users hold it: `source(tmp)` makes the folder `internvlx convert` takes."""

    name: str
    holds: str  # the released checkpoints of this layout
    fixture: str | None = None  # a shipped fixture converted as it is
    build: str | None = None  # otherwise one of the builders below


FAMILIES = {family.name: family for family in (
    Family("internlm2", "InternVL2-2B/8B/26B (InternLM2, sentencepiece)", fixture="internvl2_internlm2"),
    Family("internlm2_5", "InternVL2.5-2B/8B/26B (InternLM2.5, sentencepiece)", fixture="internvl2_5_internlm2_5"),
    Family("internvlx", "InternVL-X-2B/8B release (PVTC, InternLM2, sentencepiece)", fixture="internvlx_pvtc"),
    Family("phi3", "InternVL2-4B (Phi-3 LongRoPE, sentencepiece legacy=False)", fixture="internvl2_phi3"),
    Family("yi", "InternVL2-40B (Nous-Hermes-2-Yi: Llama, sentencepiece legacy=True)", build="yi"),
    Family("llama3", "InternVL2-Llama3-76B (Llama, byte-level BPE)", build="llama3"),
    Family("qwen2", "InternVL2-1B (Qwen2, BPE)", fixture="internvl2_qwen2"),
    Family("qwen2_5", "InternVL3-1B..14B (Qwen2.5, BPE)", fixture="internvl3_qwen2_5"),
    Family("qwen2_5_vit6b", "InternVL2.5-38B/78B (InternViT-6B, Qwen2.5)", fixture="internvl2_5_vit6b_qwen2_5"),
    Family("qwen3", "InternVL3.5-1B..38B-HF (Qwen3, native layout)", build="qwen3"),
)}

#: name -> (convert's projector, convert's --lvtc, LVTC values set once the LLM has `LAYERS` layers): the
#: as-converted model and the upgrades users make. The fixtures' LLMs have 2 or 3 layers, so the converter gets k=1
#: and `widen` moves the expansion to layer 2 of 4 (with an extra LR projector injected before layer 1 for rms).
VARIANTS = {
    "keep": ("keep", None, None),
    "pvtc": ("pvtc", None, None),
    "lvtc-none": ("keep", "k=1,hr_scale=none", dict(expand_layer=2)),
    "lvtc-rms": ("pvtc", "k=1,upsample_mode=bilinear,hr_scale=rms",
                 dict(expand_layer=2, num_lr_projectors=2, inject_start=1)),
}


def _yi_source(parent: Path) -> Path:
    from test_native import yi_like_source

    return yi_like_source(parent, legacy=True)


def _llama3_source(parent: Path) -> Path:
    from internvlx_hf.conversion.synthetic_checkpoint import make_synthetic_internvl2

    return make_synthetic_internvl2(parent / "src", golden.fixture_path("internvl2_qwen2"), llm="llama")


def _qwen3_source(parent: Path) -> Path:
    from test_native import make_native

    converted = parent / "qwen2-converted"
    convert(golden.fixture_path("internvl2_qwen2"), converted, progress=False)
    text = dict(model_type="qwen3", head_dim=HEAD_SIZE, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return make_native(parent / "native", converted, tie=True, text=text)


_BUILDERS = {"yi": _yi_source, "llama3": _llama3_source, "qwen3": _qwen3_source}


def source_of(family: Family, parent: Path) -> Path:
    """The folder `internvlx convert` takes for `family` (built under `parent` when no fixture has it)."""
    if family.fixture is not None:
        return golden.fixture_path(family.fixture)
    return _BUILDERS[family.build](parent)


def widen(folder: Path, seed: int = 0, layers: int = LAYERS, text: dict | None = None,
          lvtc: dict | None = None) -> Path:
    """The converted checkpoint in `folder` with `HEAD_SIZE`-wide LLM heads, `layers` layers and random weights large
    enough that images and text move the logits visibly. `text`: more text-config values; `lvtc`: LVTC values."""
    config = InternVLXConfig.from_pretrained(folder)
    llm = config.text_config
    llm.num_attention_heads = max(llm.hidden_size // HEAD_SIZE, 1)
    llm.num_key_value_heads = 1
    if getattr(llm, "head_dim", None) is not None:
        llm.head_dim = HEAD_SIZE
    llm.num_hidden_layers = layers
    if getattr(llm, "layer_types", None) is not None:
        llm.layer_types = [llm.layer_types[0]] * layers
    rope = getattr(llm, "rope_parameters", None) or {}
    for key in ("long_factor", "short_factor"):  # LongRoPE: one factor per rotary frequency
        if key in rope:
            old = rope[key]
            rope[key] = [old[i * len(old) // (HEAD_SIZE // 2)] for i in range(HEAD_SIZE // 2)]
    for key, value in (text or {}).items():
        setattr(llm, key, value)
    if lvtc:
        config.lvtc = dataclasses.replace(config.lvtc, **lvtc).resolve(config)
    torch.manual_seed(seed)
    model = InternVLXForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embeddings" not in name:
                param.normal_(0.0, 0.08)
    for old in list(folder.glob("model*.safetensors*")):
        old.unlink()
    model.save_pretrained(folder)
    return folder


def converted_checkpoint(folder: Path, family: str, variant: str = "keep", seed: int = 0,
                         text: dict | None = None) -> Path:
    """`family` converted by `internvlx convert` with `variant`'s options into `folder`, widened (see `widen`)."""
    projector, lvtc, lvtc_updates = VARIANTS[variant]
    work = folder.parent / f"{folder.name}-source"
    source = source_of(FAMILIES[family], work)
    convert(source, folder, projector=projector, lvtc=lvtc, progress=False, seed=seed)
    shutil.rmtree(work, ignore_errors=True)
    return widen(folder, seed=seed, text=text, lvtc=lvtc_updates)


def describe(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    return (f"{text['model_type']} {config['projector_type']} lvtc={config.get('lvtc') and config['lvtc']['hr_scale']}"
            f" template={config.get('template')}")
