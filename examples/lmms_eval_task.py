"""Write an offline lmms-eval task: the demo model's held-out questions as a dataset on disk, with its task YAML.

    python examples/lmms_eval_task.py OUT_DIR [--n 100]
    lmms-eval eval --model huggingface \\
        --model_args pretrained=MODEL_DIR,device_map=cpu,trust_remote_code=True \\
        --device cpu --batch_size 4 --include_path OUT_DIR/internvlx_demo --tasks internvlx_demo

lmms-eval's own tasks download their datasets from the Hugging Face Hub; this one is drawn here, from seeds: the first
N samples of the held-out set that `scripts/make_demo_model.py` scores (`internvlx_hf.training.synthetic_vqa`, seed
999999, 112 px squares, five tasks in turn). OUT_DIR gets

- ``data/``: a `datasets.DatasetDict` saved with ``save_to_disk`` (split ``test``: ``id``, ``image``, ``question``,
  ``answer``, ``task``), which the YAML loads with ``load_from_disk``;
- ``internvlx_demo/internvlx_demo.yaml`` and ``utils.py``: a ``generate_until`` task (greedy, 8 new tokens) scored
  by exact match of the stripped answer.

The task sends the image and the question as one user turn, with no system turn, like lmms-eval's other tasks.
Runs in seconds; downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK_YAML = """\
# Written by examples/lmms_eval_task.py: the demo model's held-out questions, offline.
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
task: internvlx_demo
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
"""Written by examples/lmms_eval_task.py: how lmms-eval reads the internvlx_demo dataset."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def write_task(out: str | Path, n: int = 100) -> Path:
    """Write the dataset and the task under ``out``; returns the folder to pass as ``--include_path``."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    from internvlx_hf.demo import demo_record
    from internvlx_hf.training.synthetic_vqa import TASKS, generate_dataset

    out = Path(out).absolute()
    record = demo_record()
    data = record.get("data", {})
    meta = generate_dataset(out / "images", n=n, tasks=TASKS, seed=999_999, sizes="fixed",
                            image_size=int(record.get("model", {}).get("tile", 112)),
                            fine_grid=int(data.get("fine_grid", 8)), fine_glyphs=int(data.get("fine_glyphs", 8)),
                            name="internvlx_demo", overwrite=True)
    (entry,) = json.loads(meta.read_text(encoding="utf-8")).values()
    rows = [json.loads(line) for line in Path(entry["annotation"]).read_text(encoding="utf-8").splitlines()]
    columns = {
        "id": [r["id"] for r in rows],
        "image": [str(Path(entry["root"]) / r["image"]) for r in rows],
        "question": [r["conversations"][0]["value"].removeprefix("<image>\n") for r in rows],
        "answer": [r["conversations"][1]["value"] for r in rows],
        "task": [r["task"] for r in rows],
    }
    features = Features({"id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "task": Value("string")})
    DatasetDict({"test": Dataset.from_dict(columns, features=features)}).save_to_disk(str(out / "data"))
    task = out / "internvlx_demo"
    task.mkdir(parents=True, exist_ok=True)
    (task / "internvlx_demo.yaml").write_text(TASK_YAML.format(data=json.dumps(str(out / "data"))), encoding="utf-8")
    (task / "utils.py").write_text(TASK_UTILS, encoding="utf-8")
    return task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the dataset and the task")
    parser.add_argument("--n", type=int, default=100, help="held-out samples (default 100)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    task = write_task(args.out, args.n)
    print(f"wrote {task}; run lmms-eval with --include_path {task} --tasks internvlx_demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
