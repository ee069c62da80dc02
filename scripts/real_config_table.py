#!/usr/bin/env python3
"""Print the checkpoint table of docs/checkpoints.md, measured from the real configs in tests/fixtures/real_configs.

For each stored config.json: its LLM and ViT, the original's parameter count (closed-form formulas over the config,
tests/reference_counts.py), the count of the model `internvlx convert` builds (on the meta device, through
`internvlx_hf.conversion.sizes`), the same with `--projector pvtc` and with `--lvtc` (default settings), and what
`convert` does with it (or its refusal message).

    PYTHONPATH=src python scripts/real_config_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_counts import reference_count  # noqa: E402

from internvlx_hf.conversion import ConversionError  # noqa: E402
from internvlx_hf.conversion.sizes import size_from_config  # noqa: E402

REAL = ROOT / "tests" / "fixtures" / "real_configs"
# InternViT sizes by width (OpenGVLab's names for the two encoders InternVL2/2.5/3 use).
VIT_NAMES = {1024: "InternViT-300M", 3200: "InternViT-6B"}


def _vit(vision: dict) -> str:
    name = VIT_NAMES.get(vision["hidden_size"], "InternViT")
    return f"{name} ({vision['num_hidden_layers']} layers, {vision['hidden_size']} wide, {vision.get('image_size')}px)"


def _llm(llm: dict) -> str:
    architecture = (llm.get("architectures") or [llm.get("model_type")])[0]
    return f"{architecture} ({llm['num_hidden_layers']} layers, {llm['hidden_size']} wide)"


def _count(count: int) -> str:
    return f"{count:,}"


def row(path: Path) -> list[str]:
    config = json.loads(path.read_text())
    cells = [f"`{path.name}`", _llm(config["llm_config"]), _vit(config["vision_config"])]
    try:
        cells.append(_count(reference_count(config).total))
    except KeyError as error:
        cells.append(f"n/a ({error.args[0]})")
    try:
        ours = size_from_config(config, name=path.name)
        pvtc = size_from_config(config, projector="pvtc", name=path.name)
        lvtc = size_from_config(config, lvtc="default", name=path.name)
    except ConversionError as error:
        return cells + ["-", "-", "-", f"refuses: {error}"]
    text = ours.config.get_text_config()
    does = (f"converts: {ours.llm} -> {text.model_type}, template `{ours.config.template}`, "
            f"tie_word_embeddings={ours.config.tie_word_embeddings}")
    if ours.notes:
        does += "; note: " + "; ".join(ours.notes)
    return cells + [
        _count(ours.num_parameters),
        f"{_count(pvtc.num_parameters)} (PVTC, {_count(pvtc.new_parameters)}, replaces mlp1)",
        f"{_count(lvtc.num_parameters)} (+{_count(lvtc.new_parameters)}: LVTC projectors at "
        f"k={lvtc.config.lvtc.expand_layer}, T={lvtc.config.lvtc.num_lr_projectors})",
        does,
    ]


def main() -> None:
    header = ["config", "LLM", "ViT", "original", "ours", "with --projector pvtc", "with --lvtc", "internvlx convert"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for path in sorted(REAL.glob("*.json")):
        print("| " + " | ".join(row(path)) + " |")


if __name__ == "__main__":
    main()
