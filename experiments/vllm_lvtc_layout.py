"""Issue 52, experiment E1: do LVTC's HR-only slots form whole KV blocks in the layout vLLM schedules?

Hypothesis 1: per image, every tile's LR slots first and its HR-only slots after them (the plugin's order), both
block-aligned (256 and 768 are multiples of vLLM's block sizes), so that for layers below `k` the HR-only slots form
whole blocks, which a KV-cache manager could leave unbacked.

Deciding quantity: the share of HR-only slots lying in blocks made only of HR-only slots, for real prompts (the
packaged demo model's chat template and tokenizer, the image after the template's text, a video as InternVL's
`Frame1: <image>` lines) at the block sizes vLLM uses (16: its GPU default; 32: the CPU kernel's granularity; 128:
its CPU default), for 448px tiles (256 LR / 1024 long slots) and for the tiny test models' 112px tiles (16 / 64).
No engine runs: the prompt is tokenized by the package's processor and laid out as the plugin lays it out (each
tile at its long count, LR slots first). Writes `benchmarks/results/vllm-lvtc-layout.json`.

    python experiments/vllm_lvtc_layout.py
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
from PIL import Image

from internvlx_hf import InternVLXProcessor
from internvlx_hf.demo.packaged import DEMO_MODEL_DIR

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

#: (name, short per tile, long per tile)
GEOMETRIES = (("448px tiles (256 -> 1024)", 256, 1024), ("112px tiles (16 -> 64)", 16, 64))
BLOCK_SIZES = (16, 32, 128)

PROMPTS = {
    "image first": [{"role": "user", "content": "<image>\nDescribe the picture."}],
    "text, then image": [{"role": "user", "content": "Look at this: <image>\nWhat is written on the sign?"}],
    "system prompt + image": [{"role": "system", "content": "You are a careful assistant that answers briefly."},
                              {"role": "user", "content": "<image>\nHow many people are there?"}],
    "two images": [{"role": "user", "content": "<image>\nand <image>\nCompare them."}],
    "second turn": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
                    {"role": "user", "content": "<image>\nWhat is this?"}],
    "video (4 frames)": [{"role": "user", "content": "<video>\nWhat happens?"}],
}


def image_runs(processor: InternVLXProcessor, messages) -> tuple[list[int], int]:
    """Start index and tile count of each run of image tokens in the prompt transformers builds (short layout)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (112, 224, 3), dtype=np.uint8))
              for _ in range(text.count("<image>"))] or None
    videos = [rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)] if "<video>" in text else None
    ids = processor(text=text, images=images, videos=videos, return_tensors="np")["input_ids"][0]
    is_image = ids == processor.image_token_id
    starts = [int(i) for i in np.flatnonzero(is_image & ~np.r_[False, is_image[:-1]])]
    ends = [int(i) + 1 for i in np.flatnonzero(is_image & ~np.r_[is_image[1:], False])]
    return [(s, (e - s) // processor.image_seq_length) for s, e in zip(starts, ends)], len(ids)


def long_layout(runs, length: int, short: int, long: int) -> np.ndarray:
    """Per slot of the long layout: 0 text, 1 LR slot, 2 HR-only slot (each tile's LR slots first)."""
    kinds, cursor, shift = [], 0, 0
    for start, tiles in runs:
        kinds += [0] * (start - cursor)
        kinds += ([1] * short + [2] * (long - short)) * tiles
        cursor = start + tiles * short
        shift += tiles * (long - short)
    kinds += [0] * (length - cursor)
    return np.asarray(kinds, dtype=np.int8)


def whole_block_share(kinds: np.ndarray, block: int) -> tuple[float, int, int]:
    """(share of HR-only slots in all-HR-only blocks, such blocks, blocks the long layout takes)."""
    pad = (-len(kinds)) % block
    blocks = np.r_[kinds, np.zeros(pad, dtype=np.int8)].reshape(-1, block)
    whole = (blocks == 2).all(axis=1)
    hr_only = int((kinds == 2).sum())
    return (float(whole.sum() * block / hr_only) if hr_only else 1.0), int(whole.sum()), len(blocks)


def main() -> None:
    processor = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    rows = []
    for prompt, messages in PROMPTS.items():
        runs, length = image_runs(processor, messages)
        # the demo model has 16 tokens per tile; the offsets of text before each image do not depend on it
        for geometry, short, long in GEOMETRIES:
            scale = short // processor.image_seq_length
            starts = []
            runs_here, cursor_shift = [], 0
            for start, tiles in runs:  # each earlier tile adds (short - demo's) tokens before later images
                runs_here.append((start + cursor_shift, tiles))
                starts.append(start + cursor_shift)
                cursor_shift += tiles * processor.image_seq_length * (scale - 1)
            kinds = long_layout(runs_here, length + cursor_shift, short, long)
            for block in BLOCK_SIZES:
                share, whole, total = whole_block_share(kinds, block)
                rows.append({"prompt": prompt, "geometry": geometry, "block_size": block,
                             "first_image_offset": starts[0], "offset_mod_block": starts[0] % block,
                             "tiles": [t for _, t in runs], "hr_only_share_in_whole_blocks": round(share, 4),
                             "whole_hr_only_blocks": whole, "blocks": total})
    print(f"{'prompt':24} {'geometry':27} {'block':>5} {'offset':>6} {'mod':>4} {'share':>6}")
    for row in rows:
        print(f"{row['prompt']:24} {row['geometry']:27} {row['block_size']:5d} {row['first_image_offset']:6d} "
              f"{row['offset_mod_block']:4d} {row['hr_only_share_in_whole_blocks']:6.3f}")
    aligned = sum(row["offset_mod_block"] == 0 for row in rows)
    print(f"\nimage runs starting on a block boundary: {aligned} of {len(rows)}")
    out = {"experiment": "E1 (hypothesis 1: layout)", "date": datetime.date.today().isoformat(), "rows": rows,
           "aligned_runs": aligned, "runs": len(rows)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm-lvtc-layout.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
