#!/usr/bin/env python3
"""Record InternVL's video frame pickers, run from their own source, into ``tests/fixtures/video/frame_indices.json``.

Two functions of github.com/OpenGVLab/InternVL at a pinned commit are extracted and run in a throw-away namespace
(numpy and random only; nothing else of the reference is imported):

* ``get_index(bound, fps, max_frame, first_idx=0, num_segments=32)`` of ``internvl_chat/README.md`` (the model
  cards' ``load_video``): inference frame indices;
* ``get_frame_indices(num_frames, vlen, sample, fix_start, input_fps, max_num_frames)`` of
  ``internvl_chat/internvl/train/dataset.py``: the fine-tuning sampler (``middle``, ``fpsN``, and ``rand`` after
  ``random.seed(seed)``, which our sampler reproduces draw for draw with ``random.Random(seed)``).

Usage (any Python with numpy)::

    python scripts/make_video_fixtures.py --reference /path/to/InternVL.git [--commit SHA]

``--reference`` is a git clone or bare mirror of OpenGVLab/InternVL. tests/test_video.py compares our
``segment_frame_indices`` / ``sample_frame_indices`` to every recorded case.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PINNED_COMMIT = "2410d1dbf208f0e799459aff9376e5747dbf41a2"
OUT = ROOT / "tests" / "fixtures" / "video" / "frame_indices.json"

# (frames in the video, fps, bound or None, num_segments): short/long videos, fractional fps, bounds inside, partly
# past the end and starting at 0, more segments than frames.
GET_INDEX_CASES = [
    (1, 30.0, None, 8), (5, 25.0, None, 8), (8, 1.0, None, 8), (20, 10.0, None, 32), (100, 30.0, None, 8),
    (100, 30.0, None, 16), (300, 29.97, None, 32), (241, 23.976, None, 8), (1000, 60.0, None, 32),
    (100, 30.0, (0.0, 1.0), 8), (100, 30.0, (1.0, 2.5), 8), (300, 29.97, (2.5, 100.0), 16),
    (241, 23.976, (0.5, 3.25), 32), (90, 30.0, (2.9, 3.0), 4), (50, 5.0, (3.3, 7.7), 8), (75, 24.0, (0.0, 0.5), 8),
    # the synthetic videos of tests/test_video.py (20 frames at 25 fps)
    (20, 25.0, None, 8), (20, 25.0, (0.2, 0.6), 4),
    # a folder of 10 frames (no frame rate: InternVL's folder reader assumes 1 fps)
    (10, 1.0, None, 4),
]
# (num_frames, video length, sample, input fps, max_num_frames)
SAMPLE_CASES = [
    (8, 100, "middle", 1, -1), (32, 100, "middle", 1, -1), (8, 5, "middle", 1, -1), (16, 333, "middle", 29.97, -1),
    (4, 4, "middle", 1, -1), (1, 50, "middle", 1, -1),
    (8, 300, "fps1", 30.0, -1), (8, 300, "fps0.5", 30.0, -1), (8, 301, "fps2", 29.97, 8), (8, 250, "fps1", 25.0, 4),
    (8, 10, "fps1", 24.0, -1),
    # tests/test_video.py's training rows: 4 of a 6-frame folder, 4 of the 10 frames of a 0.4 s clip at 25 fps
    (4, 6, "middle", 1, -1), (4, 10, "middle", 25.0, -1),
]
# (num_frames, video length, seed): every interval has >= 2 frames, so the reference draws with random.choice only.
RAND_CASES = [(8, 100, 0), (8, 100, 1), (32, 300, 7), (16, 64, 3), (4, 9, 11)]


def _git_show(reference: Path, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", str(_git_dir(reference)), "show", f"{commit}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def _git_dir(reference: Path) -> Path:
    return reference / ".git" if (reference / ".git").exists() else reference


def _function_source(text: str, name: str) -> str:
    """The source of top-level function `name` from Python text (or a Markdown file's code)."""
    match = re.search(rf"^def {name}\(.*?(?=^\S)", text, flags=re.S | re.M)
    if match is None:
        raise SystemExit(f"function {name} not found")
    tree = ast.parse(match.group(0))
    assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == name
    return match.group(0)


def _load(source: str, name: str):
    namespace = {"np": np, "random": random}
    exec(compile(source, f"<reference {name}>", "exec"), namespace)
    return namespace[name]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="git clone or mirror of OpenGVLab/InternVL")
    parser.add_argument("--commit", default=PINNED_COMMIT)
    args = parser.parse_args()

    readme = "internvl_chat/README.md"
    dataset = "internvl_chat/internvl/train/dataset.py"
    get_index = _load(_function_source(_git_show(args.reference, args.commit, readme), "get_index"), "get_index")
    get_frame_indices = _load(_function_source(_git_show(args.reference, args.commit, dataset), "get_frame_indices"),
                              "get_frame_indices")

    record = {
        "source": {"repository": "https://github.com/OpenGVLab/InternVL", "commit": args.commit,
                   "get_index": readme, "get_frame_indices": dataset,
                   "numpy": np.__version__, "script": "scripts/make_video_fixtures.py"},
        "get_index": [
            {"num_frames": n, "fps": fps, "bound": list(bound) if bound else None, "num_segments": segments,
             "indices": [int(i) for i in get_index(bound, fps, n - 1, first_idx=0, num_segments=segments)]}
            for n, fps, bound, segments in GET_INDEX_CASES
        ],
        "get_frame_indices": [
            {"num_frames": n, "video_length": length, "sample": sample, "fps": fps, "max_num_frames": cap,
             "indices": [int(i) for i in get_frame_indices(n, length, sample=sample, input_fps=fps,
                                                             max_num_frames=cap)]}
            for n, length, sample, fps, cap in SAMPLE_CASES
        ],
        "rand": [],
    }
    for n, length, seed in RAND_CASES:
        random.seed(seed)
        indices = get_frame_indices(n, length, sample="rand")
        record["rand"].append({"num_frames": n, "video_length": length, "seed": seed,
                               "indices": [int(i) for i in indices]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per case, so a diff of the fixture shows which case changed.
    lines = ["{", f' "source": {json.dumps(record["source"])},']
    for i, key in enumerate(("get_index", "get_frame_indices", "rand")):
        cases = ",\n  ".join(json.dumps(case) for case in record[key])
        lines.append(f' "{key}": [\n  {cases}\n ]' + ("," if i < 2 else ""))
    OUT.write_text("\n".join(lines + ["}"]) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(record['get_index'])} get_index, "
          f"{len(record['get_frame_indices'])} get_frame_indices, {len(record['rand'])} rand cases")


if __name__ == "__main__":
    main()
