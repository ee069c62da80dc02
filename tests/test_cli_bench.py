"""`internvlx bench`: each subcommand on a tiny checkpoint (or a real `internvlx serve` on 127.0.0.1 with the demo
model): the table, the JSON of `--out` with its documented keys, the PNG of `--plot`, and clear errors for bad input.
Exact values are checked where they are exact (token counts, variant order, ratio of the reference); timings only
for being positive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from internvlx_hf.cli import main

from conftest import REPO_ROOT
from test_serve import start_server, stop, wait_until_healthy
from tiny import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
ENVIRONMENT_KEYS = {"python", "platform", "commit", "device", "dtype", "torch", "threads", "transformers",
                    "internvlx_hf"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tiny_model(lvtc={"expand_layer": 2}).save_pretrained(root / "lvtc")
    tiny_model().save_pretrained(root / "plain")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _check_results(path, benchmark: str) -> dict:
    data = json.loads(path.read_text())
    assert set(data) == {"benchmark", "environment", "settings", "rows"}
    assert data["benchmark"] == benchmark
    assert set(data["environment"]) >= ENVIRONMENT_KEYS
    assert data["environment"]["device"] == "cpu" and data["environment"]["dtype"] in (None, "float32")
    return data


@pytest.mark.parametrize("workload", ["prefill", "train-step"])
def test_timing_lvtc_folder_against_plain_variants(folders, tmp_path, capsys, workload):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = _run(["bench", workload, str(folders / "lvtc"), "--tiles", "2", "--text-tokens", "16",
                           "--warmup", "0", "--repeats", "2", "--out", str(out_json), "--plot", str(out_png)], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["variant", "tokens_per_tile", "prompt_tokens", "median_s", "vs_plain-1024"]
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["this", "plain-256", "plain-1024"]
    assert f"[{workload} 3/3] plain-1024" in err  # progress
    data = _check_results(out_json, f"bench {workload}")
    rows = data["rows"]
    # tiny tiles: 4 LR tokens, 16 HR tokens; the LVTC prompt is in the short layout, plain-1024's in the long one
    assert [(r["variant"], r["tokens_per_tile"], r["prompt_tokens"]) for r in rows] == [
        ("this", 16, 24), ("plain-256", 4, 24), ("plain-1024", 16, 48)]
    assert rows[2]["vs_plain-1024"] == 1.0
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in rows)
    assert data["settings"] == {"folder": str(folders / "lvtc"), "variants": ["this", "plain-256", "plain-1024"],
                                "device": "cpu", "dtype": "float32", "tiles": 2, "text_tokens": 16, "warmup": 0,
                                "repeats": 2}
    assert out_png.read_bytes().startswith(PNG)


def test_plain_folder_and_chosen_variants(folders, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _run(["bench", "prefill", str(folders / "plain"), "--variants", "plain-1024,this", "--warmup",
                           "0", "--repeats", "1", "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    assert err == ""  # --quiet
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["variant"], r["tokens_per_tile"], r["prompt_tokens"]) for r in rows] == [
        ("plain-1024", 16, 80), ("this", 4, 68)]


def test_memory(folders, tmp_path, capsys):
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    code, out, err = _run(["bench", "memory", str(folders / "lvtc"), "--variants", "this,plain-1024", "--workload",
                           "train-step", "--text-tokens", "16", "--out", str(out_json), "--plot", str(out_png)],
                          capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["variant", "workload", "peak_mib", "workload_mib", "measure"]
    rows = _check_results(out_json, "bench memory")["rows"]
    assert [(r["variant"], r["workload"]) for r in rows] == [("this", "train-step"), ("plain-1024", "train-step")]
    assert all(r["peak_mib"] > 0 and r["workload_mib"] >= 0 for r in rows)
    assert {r["measure"] for r in rows} == {"peak RSS (ru_maxrss), child process"}
    assert out_png.read_bytes().startswith(PNG)


@pytest.mark.parametrize("argv, message", [
    (["prefill", "{tmp}/missing"], "no such folder"),
    (["train-step", "{tmp}"], "has no config.json"),
    (["memory", "{root}/llama"], "not an InternVL-X one"),
    (["prefill", "{root}/plain", "--variants", "plain-512"], "--variants plain-512: choose from"),
    (["prefill", "{root}/plain", "--tiles", "0"], "--tiles must be >= 1"),
    (["serve", "ftp://127.0.0.1:1"], "give the server's base address"),
    (["serve", "http://127.0.0.1:{port}", "--requests", "1"], "cannot reach http://127.0.0.1:"),
])
def test_bad_input_is_one_clear_line(folders, tmp_path, capsys, argv, message):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [a.format(tmp=tmp_path, root=folders, port=port) for a in argv]
    code, out, err = _run(["bench", *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("internvlx bench: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_subcommand_help_and_errors_need_no_torch(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from internvlx_hf.cli import main\n"
        "for argv in (['bench', 'prefill', '--help'], ['bench', 'serve', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "    assert 'usage: ' in out.getvalue(), out.getvalue()\n"
        f"assert main(['bench', 'prefill', {str(tmp_path / 'missing')!r}]) == 2\n"
        "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_serve_against_internvlx_serve(tmp_path, capsys):
    from internvlx_hf.serving import ServingUnavailable, check_serving_available

    try:
        check_serving_available()
    except ServingUnavailable as error:
        pytest.skip(str(error))
    log = tmp_path / "serve.log"
    server, url = start_server([], log)  # `internvlx serve DEMO` on 127.0.0.1, a free port, no key
    try:
        wait_until_healthy(server, url, log)
        out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
        code, out, err = _run(["bench", "serve", url + "/v1", "--concurrency", "1", "--concurrency", "2",
                               "--requests", "3", "--image-size", "64", "--max-tokens", "2", "--out", str(out_json),
                               "--plot", str(out_png)], capsys)
    finally:
        stop(server)
    assert code == 0, err + log.read_text()
    assert out.splitlines()[0].split() == ["concurrency", "requests", "requests_per_s", "p50_s", "p95_s",
                                           "completion_tokens"]
    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "bench serve" and set(data["environment"]) >= ENVIRONMENT_KEYS
    rows = data["rows"]
    assert [(r["concurrency"], r["requests"]) for r in rows] == [(1, 3), (2, 3)]
    assert all(r["requests_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"] for r in rows)
    assert all(1 <= r["completion_tokens"] <= 6 for r in rows)
    assert out_png.read_bytes().startswith(PNG)
