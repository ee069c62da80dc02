"""Issue 56 step 3: the compiled LVTC-saving prototype behind vLLM's OpenAI server, as users run it.

`python -m vllm.entrypoints.openai.api_server` with vLLM's defaults for the process layout and compilation (no
`--enforce-eager`; engine core and worker in processes of their own), the prototype picked with `--hf-overrides`, on
the tiny Qwen2 + LVTC k=2 checkpoint of tests/test_vllm_lvtc_savings.py. The `openai` client sends chat completions
(one 12-tile image; a system prompt, two turns and two images; text only), greedy, with the image requests sent once
alone and then all at once on threads; the answers' tokens are compared with transformers' (`model.generate` of the
processor's chat rendering). Writes the JSON given as the first argument.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src:. flock /work/.vllm-lock .venv-vllm/bin/python \
     experiments/issue56/server_probe.py benchmarks/results/issue56-step3-server.json"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_helpers import build_checkpoint, image, reference_generate  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.vllm.config_hook import SAVING_ARCHITECTURE  # noqa: E402

MAX_TILES = 12
CONVERSATIONS = {
    "12 tiles": [{"role": "user", "content": [{"type": "image_url", "image_url": (1344, 1008, 1)},
                                              {"type": "text", "text": "What is in the picture?"}]}],
    "system, two turns, two images": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": [{"type": "image_url", "image_url": (448, 448, 2)},
                                     {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A square of colours."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "image_url", "image_url": (600, 420, 3)}]}],
    "text": [{"role": "user", "content": "Say something about colours."}],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _openai(messages):
    return [{"role": m["role"], "content": [
        {"type": "image_url", "image_url": {"url": _data_url(image(*p["image_url"]))}} if p["type"] == "image_url"
        else p for p in m["content"]] if isinstance(m["content"], list) else m["content"]} for m in messages]


def _reference(folder: Path, messages) -> dict:
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(*p["image_url"]) for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image_url"]
    local = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p
                                             for p in m["content"]] if isinstance(m["content"], list)
              else m["content"]} for m in messages]
    prompt = processor.apply_chat_template(local, add_generation_prompt=True)
    return reference_generate(model, processor, prompt, images=images or None, max_tiles=MAX_TILES)


def main() -> None:
    from openai import OpenAI

    root = Path(tempfile.mkdtemp())
    folder = build_checkpoint(root / "qwen2-lvtc", llm="qwen2", projector="mlp", lvtc=dict(expand_layer=2))
    port, log = _free_port(), root / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
               "--gpu-memory-utilization", "0.15", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 2}',
               "--mm-processor-kwargs", json.dumps({"max_tiles": MAX_TILES}),
               "--hf-overrides", json.dumps({"architectures": [SAVING_ARCHITECTURE]})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(root / "vllm-cache")}
    server = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    began = time.time()
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server stopped:\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(2)
        started = time.time() - began
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(name):
            answer = client.chat.completions.create(
                model=str(folder), messages=_openai(CONVERSATIONS[name]), max_tokens=8, temperature=0.0,
                extra_body={"return_token_ids": True, "ignore_eos": True})
            return answer.choices[0].token_ids

        alone = {name: ask(name) for name in CONVERSATIONS}
        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
            together = dict(zip(CONVERSATIONS, pool.map(ask, CONVERSATIONS)))
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = log.read_text()
    out = {"architecture": SAVING_ARCHITECTURE, "server_start_s": round(started),
           "enforce_eager": "--enforce-eager" in command,
           "engine_core_process": "EngineCore" in text, "worker_process": "(Worker pid=" in text or "Worker" in text,
           "compilation": sorted({line.strip()[-120:] for line in text.splitlines()
                                  if "Warming up done" in line or "CompilationMode" in line})[:4],
           "requests": {}}
    for name, messages in CONVERSATIONS.items():
        reference = _reference(folder, messages)
        out["requests"][name] = {"transformers_tokens": reference["tokens"], "alone": alone[name],
                                 "together": together[name],
                                 "equal": alone[name] == reference["tokens"] == together[name]}
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
    print("server log:", log)


if __name__ == "__main__":
    main()
