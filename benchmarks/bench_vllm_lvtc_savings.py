"""Issue 52, experiments E2 and E3: LVTC on vLLM with the short layers holding and computing the short layout only.

The experimental model (`lvtc_savings_vllm.py`, a subclass of the shipped plugin's model; not shipped) puts the layers
below `k` in a KV-cache group of their own indexed by short-layout position (hypothesis 2) and runs them on the live
tokens only with attention metadata rebuilt for them (hypothesis 3). Run in the vLLM environment (`.ci/run`'s
`.venv-ci-vllm`); every engine runs in a child process (`vllm_lvtc_savings_engine.py`).

  parity   (E2) tiny LVTC checkpoints with 32-wide heads (those of tests/test_vllm.py: Phi-3 + LVTC k=2; Qwen3 + PVTC
           + LVTC k=3, bilinear, hr_scale=rms, an extra LR projector; and Qwen2 + LVTC k=2) served by the
           experimental model; each request once alone and once in a batch of all; greedy tokens and logprobs against
           `InternVLXForConditionalGeneration.generate` (tolerance: tests/test_vllm.py's 2e-5), and the KV blocks each
           request held per group against the shipped plugin's engine on the same checkpoint.
  savings  (E3) a mid-size model where the LLM's work dominates (448px tiles: 256 LR / 1024 long slots per tile; a
           Qwen2 LLM of 8 x 512, k = 6; a 4 x 256 ViT), as three checkpoints sharing every weight: LVTC, plain-1024
           (the HR projector as its projector) and plain-256 (the LR projector). Four engines in one process, timed
           in interleaved rounds: plain-1024, plain-256, the shipped LVTC and the experimental LVTC-saving model.
           Records KV blocks held per request (layer-blocks: blocks x layers of each group), prefill time of one
           request (max_tokens=1), requests/s at concurrency 4 and 16, the FLOPs of each prefill counted on the
           transformers models (torch's FlopCounterMode, as bench_models.py counts them), and parity of the
           experimental model's greedy tokens with transformers'. Writes benchmarks/results/vllm-lvtc-savings.json
           (the issue's figures) and vllm-lvtc-savings-runs.json (everything measured).

    .venv-ci-vllm/bin/python benchmarks/bench_vllm_lvtc_savings.py parity
    .venv-ci-vllm/bin/python benchmarks/bench_vllm_lvtc_savings.py savings --plot
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_helpers import build_checkpoint, image, reference_generate, video  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402

LOGPROB_ATOL = 2e-5  # tests/test_vllm.py's
USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _request(text, images=(), videos=(), **mm_processor_kwargs):
    return {"prompt": USER.format(text), "images": [list(i) for i in images], "videos": [list(v) for v in videos],
            "mm_processor_kwargs": mm_processor_kwargs}


ONE_TILE, SIX_TILES, TWELVE_TILES, THIRTEEN_TILES = (112, 112), (560, 112), (1232, 112), (448, 336)
REQUESTS = {
    "text": _request("Write a haiku about the sea."),
    "1 tile": _request("<image>\nWhat is this?", images=[(*ONE_TILE, 1)]),
    "6 tiles": _request("<image>\nDescribe the picture.", images=[(*SIX_TILES, 2)]),
    "12 tiles": _request("Look: <image>\nDescribe.", images=[(*TWELVE_TILES, 3)]),
    "13 tiles": _request("<image>\nDescribe.", images=[(*THIRTEEN_TILES, 4)]),
    "two images": _request("<image>\nand <image>\nCompare them.", images=[(300, 200, 5), (*ONE_TILE, 6)]),
    "max_tiles=2": _request("<image>\nDescribe the picture.", images=[(*SIX_TILES, 2)], max_tiles=2),
    "video": _request("<video>\nWhat happens?", videos=[(4, 7)]),
}
PARITY_MODELS = {
    "phi3-lvtc": (dict(llm="phi3", projector="mlp", lvtc=dict(expand_layer=2), vision=dict(use_mean_pooling=False)),
                  ["text", "1 tile", "6 tiles", "12 tiles", "two images", "video", "max_tiles=2"]),
    "qwen3-pvtc-lvtc": (dict(llm="qwen3", projector="pvtc",
                             lvtc=dict(expand_layer=3, num_lr_projectors=2, inject_start=1, upsample_mode="bilinear",
                                       hr_scale="rms")),
                        ["text", "6 tiles", "13 tiles", "two images", "video"]),
    "qwen2-lvtc": (dict(llm="qwen2", projector="mlp", lvtc=dict(expand_layer=2)),
                   ["text", "1 tile", "12 tiles", "two images"]),
}
TINY_ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096,
                   gpu_memory_utilization=0.15, max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 1})


def run_engines(spec: dict, workdir: Path) -> dict:
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    child = subprocess.run([sys.executable, str(HERE / "vllm_lvtc_savings_engine.py"), str(spec_path),
                            str(out_path)], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = workdir / "engine.log"
    log.write_text(child.stdout)
    for line in child.stdout.splitlines():
        if line.startswith("[engine]"):
            print(line, flush=True)
    if child.returncode != 0:
        raise SystemExit(f"engine process failed ({child.returncode}); its last output:\n{child.stdout[-6000:]}")
    return json.loads(out_path.read_text())


def reference(folder: Path, request: dict, max_new_tokens: int = 8):
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    videos = [video(frames, seed) for frames, seed in request["videos"]] or None
    return reference_generate(model, processor, request["prompt"], images=images, videos=videos,
                              max_new_tokens=max_new_tokens, **request["mm_processor_kwargs"])


def layer_blocks(held: list[int] | None, groups: list[dict]) -> int | None:
    if held is None:
        return None
    return sum(blocks * group["layers"] for blocks, group in zip(held, groups))


# ------------------------------------------------------------------------------------------------ E2: parity


def parity(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engines, folders = [], {}
        for name, (options, requests) in PARITY_MODELS.items():
            folders[name] = build_checkpoint(root / name, **options)
            for saving in (True, False):
                engines.append({"name": f"{name}/{'saving' if saving else 'shipped'}", "checkpoint": str(folders[name]),
                                "engine": TINY_ENGINE, "saving": saving, "requests": [REQUESTS[r] for r in requests]})
        results = run_engines({"engines": engines, "max_tokens": 8}, root)
        rows, worst = [], 0.0
        for name, (options, requests) in PARITY_MODELS.items():
            saving, shipped = results[f"{name}/saving"], results[f"{name}/shipped"]
            for index, request_name in enumerate(requests):
                _, tokens, logprobs = reference(folders[name], REQUESTS[request_name])
                row = {"model": name, "request": request_name}
                for mode in ("alone", "together"):
                    got = saving[mode][index]
                    diff = max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))
                    worst = max(worst, diff)
                    row[f"tokens_equal_{mode}"] = got["tokens"] == tokens
                    row[f"logprob_diff_{mode}"] = diff
                    row[f"shipped_tokens_equal_{mode}"] = shipped[mode][index]["tokens"] == tokens
                row["layer_blocks_saving"] = layer_blocks(saving["alone"][index]["blocks_held"],
                                                          saving["info"]["groups"])
                row["layer_blocks_shipped"] = layer_blocks(shipped["alone"][index]["blocks_held"],
                                                           shipped["info"]["groups"])
                row["prompt_tokens"] = saving["alone"][index]["prompt_tokens"]
                rows.append(row)
                print(f"{name:16} {request_name:12} tokens equal {row['tokens_equal_alone']}/"
                      f"{row['tokens_equal_together']}  logprob diff {row['logprob_diff_alone']:.1e}/"
                      f"{row['logprob_diff_together']:.1e}  layer-blocks saving {row['layer_blocks_saving']} "
                      f"shipped {row['layer_blocks_shipped']}", flush=True)
    out = {"experiment": "E2 (hypotheses 2 and 3: short KV group + gathered compute), tiny checkpoints",
           "date": datetime.date.today().isoformat(), "engine": TINY_ENGINE, "tolerance": LOGPROB_ATOL,
           "all_tokens_equal": all(r["tokens_equal_alone"] and r["tokens_equal_together"] for r in rows),
           "max_logprob_diff": worst,
           "groups": {name: {k: results[f"{name}/{k}"]["info"] for k in ("saving", "shipped")}
                      for name in PARITY_MODELS},
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm-lvtc-parity-saving.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nall tokens equal: {out['all_tokens_equal']}; largest logprob difference {worst:.2e} "
          f"(tolerance {LOGPROB_ATOL})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["parity", "savings"])
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.experiment == "parity":
        parity(args)
    else:
        savings(args)


if __name__ == "__main__":
    main()
