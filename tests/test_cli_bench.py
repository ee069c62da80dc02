"""`internvlx bench`: each subcommand on a tiny checkpoint (or a real `internvlx serve` on 127.0.0.1 with the demo
model): the table, the JSON of `--out` with its documented keys, the PNG of `--plot`, and clear errors for bad input.
Exact values are checked where they are exact (token counts, variant order, ratio of the reference); timings only
for being positive."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

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


TIMING_HEADER = ["variant", "tokens_per_tile", "prompt_tokens", "median_s", "interval_s", "vs_plain-1024",
                 "vs_plain-1024", "interval"]
TIMING_KEYS = {"variant", "tokens_per_tile", "prompt_tokens", "median_s", "min_s", "max_s", "low_s", "high_s",
               "coverage", "rounds", "times_s", "vs_plain-1024", "vs_plain-1024_low", "vs_plain-1024_high",
               "vs_plain-1024_min", "vs_plain-1024_max", "within_noise"}


@pytest.mark.parametrize("workload", ["prefill", "train-step"])
def test_timing_lvtc_folder_against_plain_variants(folders, tmp_path, capsys, workload):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = _run(["bench", workload, str(folders / "lvtc"), "--tiles", "2", "--text-tokens", "16",
                           "--warmup", "0", "--repeats", "2", "--out", str(out_json), "--plot", str(out_png)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == TIMING_HEADER
    assert [line.split()[0] for line in lines[2:5]] == ["this", "plain-256", "plain-1024"]
    assert lines[5] == "tiles: 2 (--tiles)"
    assert lines[6].startswith("rounds: 2 interleaved after 0 warm-up (--repeats, ")
    assert "with 2 rounds an interval covers only 50%" in out  # fixed repeats: the coverage is said
    assert f"[{workload}] 3 variants, 2 tiles (--tiles); 2 rounds" in err  # progress
    data = _check_results(out_json, f"bench {workload}")
    rows = data["rows"]
    # tiny tiles: 4 LR tokens, 16 HR tokens; the LVTC prompt is in the short layout, plain-1024's in the long one
    assert [(r["variant"], r["tokens_per_tile"], r["prompt_tokens"]) for r in rows] == [
        ("this", 16, 24), ("plain-256", 4, 24), ("plain-1024", 16, 48)]
    assert all(set(r) == TIMING_KEYS for r in rows)
    assert rows[2]["vs_plain-1024"] == 1.0 and rows[2]["within_noise"] is None
    assert all(isinstance(r["within_noise"], bool) for r in rows[:2])
    assert all(len(r["times_s"]) == r["rounds"] == 2 and r["median_s"] > 0 and r["coverage"] == 0.5 for r in rows)
    assert all(r["min_s"] <= r["low_s"] <= r["median_s"] <= r["high_s"] <= r["max_s"] for r in rows)
    assert all(r["vs_plain-1024_min"] <= r["vs_plain-1024_low"] <= r["vs_plain-1024"] <= r["vs_plain-1024_high"]
               <= r["vs_plain-1024_max"] for r in rows)
    settings = dict(data["settings"])
    assert settings.pop("stopped") == "repeats" and settings.pop("rounds") == 2
    assert settings == {"folder": str(folders / "lvtc"), "variants": ["this", "plain-256", "plain-1024"],
                        "device": "cpu", "dtype": "float32", "tiles": 2, "tiles_from": "--tiles", "text_tokens": 16,
                        "warmup": 0, "repeats": 2, "time_budget_s": 60.0, "precision": 0.02}
    assert out_png.read_bytes().startswith(PNG)


def test_plain_folder_and_chosen_variants(folders, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _run(["bench", "prefill", str(folders / "plain"), "--variants", "plain-1024,this", "--warmup",
                           "0", "--repeats", "1", "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    assert err == ""  # --quiet
    data = json.loads(out_json.read_text())
    # no processor settings saved: the image processor's default budget, 12 tiles + the thumbnail
    assert data["settings"]["tiles"] == 13
    assert "tiles: 13 (the folder's tile budget: max_tiles 12 + the thumbnail, from no processor settings saved in " \
           "the folder: the image processor's defaults; --tiles N to change)" in out.splitlines()
    assert [(r["variant"], r["tokens_per_tile"], r["prompt_tokens"]) for r in data["rows"]] == [
        ("plain-1024", 16, 64 + 16 * 13), ("this", 4, 64 + 4 * 13)]


def test_defaults_take_the_folders_tile_budget_and_time_until_precise(folders, tmp_path, capsys):
    folder = tmp_path / "budget"
    shutil.copytree(folders / "lvtc", folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_size": 56, "max_tiles": 3, "min_tiles": 1, "use_thumbnail": True}}))
    out_json = tmp_path / "r.json"
    code, out, err = _run(["bench", "prefill", str(folder), "--text-tokens", "16", "--time-budget", "3",
                           "--out", str(out_json)], capsys)
    assert code == 0, err
    assert "tiles: 4 (the folder's tile budget: max_tiles 3 + the thumbnail, from processor_config.json; --tiles N " \
           "to change)" in out.splitlines()
    data = json.loads(out_json.read_text())
    settings, rows = data["settings"], data["rows"]
    assert (settings["tiles"], settings["repeats"], settings["time_budget_s"]) == (4, "auto", 3.0)
    assert [r["prompt_tokens"] for r in rows] == [16 + 4 * 4, 16 + 4 * 4, 16 + 16 * 4]
    # auto: at least 6 rounds (a 95% interval), then until precise or the budget; every variant timed every round
    assert settings["stopped"] in ("precision", "time budget") and settings["rounds"] >= 6
    assert all(len(r["times_s"]) == r["rounds"] == settings["rounds"] and r["coverage"] >= 0.95 for r in rows)
    assert f"stopped by {settings['stopped']}" in err
    # a folder with max_tiles 1 gets no thumbnail: one tile
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {"max_tiles": 1}}))
    from internvlx_hf.bench.variants import default_tiles

    assert default_tiles(folder)[0] == 1


def test_timing_notes_flag_a_ratio_within_the_noise_and_lvtc_overhead():
    from internvlx_hf.bench.checkpoint_runs import timing_notes

    def row(name, ratio, low, high, noise):
        return {"variant": name, "coverage": 0.96875, "vs_plain-1024": ratio, "vs_plain-1024_low": low,
                "vs_plain-1024_high": high, "within_noise": noise}

    run = {"reference": "plain-1024", "tiles": 1, "tiles_from": "--tiles", "rounds": 6, "warmup": 1,
           "stopped": "time budget", "elapsed_s": 60.2, "spread": 0.081, "lvtc": {"this": True, "plain-256": False,
                                                                                 "plain-1024": False}}
    lines = timing_notes([row("this", 1.31, 1.2, 1.4, False), row("plain-256", 0.98, 0.9, 1.05, True),
                          row("plain-1024", 1.0, 1.0, 1.0, None)], run, "prefill")
    assert lines == [
        "tiles: 1 (--tiles)",
        "rounds: 6 interleaved after 1 warm-up (time budget reached, figures within ±8.1%, 60.2 s); intervals: 95% of "
        "the median; ratios: median of the per-round ratios",
        "this takes longer than plain-1024 here, 1.31x plain-1024 (interval 1.2-1.4): at 1 tile LVTC's extra work "
        "(the HR projector, the expansion at layer k) outweighs what its short layers save in prefill; the saving "
        "grows with the tiles (--tiles)",
        "within the noise: plain-256 at 0.98x plain-1024 (interval 0.9-1.05): these rounds cannot tell it from "
        "plain-1024; a longer --time-budget or more --tiles can",
    ]
    clear = timing_notes([row("this", 0.74, 0.72, 0.76, False), row("plain-1024", 1.0, 1.0, 1.0, None)], run,
                         "prefill")
    assert not any("noise" in line or "longer" in line for line in clear)


def test_memory(folders, tmp_path, capsys):
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    code, out, err = _run(["bench", "memory", str(folders / "lvtc"), "--variants", "this,plain-1024", "--workload",
                           "train-step", "--text-tokens", "16", "--tiles", "2", "--out", str(out_json), "--plot",
                           str(out_png)], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["variant", "workload", "workload_mib", "weights_mib", "peak_mib", "measure"]
    rows = _check_results(out_json, "bench memory")["rows"]
    assert [(r["variant"], r["workload"]) for r in rows] == [("this", "train-step"), ("plain-1024", "train-step")]
    assert all(r["peak_mib"] == pytest.approx(r["weights_mib"] + r["workload_mib"]) and r["workload_mib"] > 0
               for r in rows)
    assert {r["measure"] for r in rows} == {"peak bytes of live tensors (torch dispatch)"}
    assert out_png.read_bytes().startswith(PNG)


def test_memory_ranks_the_variants_by_what_they_hold(folders, tmp_path, capsys):
    # 12 tiles: 48 LR / 192 HR tokens against 16 text tokens, LVTC expanding at layer 2 of 4: a large difference
    out_json = tmp_path / "m.json"
    code, out, err = _run(["bench", "memory", str(folders / "lvtc"), "--tiles", "12", "--text-tokens", "16",
                           "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    held = {(r["variant"], r["workload"]): r["workload_mib"] for r in rows}
    # a train step holds every layer's activations for backward: LVTC's below k at the short layout
    assert held["plain-256", "train-step"] < held["this", "train-step"] < held["plain-1024", "train-step"], held
    assert held["this", "train-step"] < 0.85 * held["plain-1024", "train-step"], held
    # a prefill without grad holds one layer's working set at a time: LVTC's layers from k on are at the long layout,
    # so it holds about what plain-1024 does (what LVTC saves in serving is the KV cache below k, not this peak)
    assert held["plain-256", "prefill"] < 0.5 * min(held["this", "prefill"], held["plain-1024", "prefill"]), held
    # exact and the same on every call: a second run gives the very same bytes
    code, _, err = _run(["bench", "memory", str(folders / "lvtc"), "--tiles", "12", "--text-tokens", "16",
                         "--quiet", "--out", str(tmp_path / "again.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == rows


def test_train_step_labels_leave_the_image_out():
    # the model warns when labels name an image placeholder ("labels mark image placeholders ... set these ids to
    # -100 in your collator"), which the user never wrote here: the bench builds its own labels and must not set it
    # off; the demo's plain-1024 at 6 tiles (384 image positions) did, with random labels
    from internvlx_hf.bench.variants import build_variants, sample

    for name, model in build_variants(REPO_ROOT / "src" / "internvlx_hf" / "demo" / "model").items():
        inputs = sample(model, 6, 64, "cpu")
        # the pre-hook warns exactly when masking the placeholders changes the labels
        assert torch.equal(model._ignore_placeholder_labels(inputs["labels"]), inputs["labels"]), name
        image = inputs["input_ids"] == model.config.image_token_id
        assert bool((inputs["labels"][image] == -100).all()) and int((inputs["labels"] != -100).sum()) == 64, name


def test_plots_show_the_spread_and_memory_labels_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from internvlx_hf.bench.checkpoint_runs import draw_memory, draw_timing

    timing = [{"variant": v, "median_s": m, "low_s": m * 0.9, "high_s": m * 1.2, "coverage": 0.96875,
               "vs_plain-1024": m / 0.03, "vs_plain-1024_low": m / 0.03 * 0.95, "vs_plain-1024_high": m / 0.03 * 1.1}
              for v, m in (("this", 0.02), ("plain-256", 0.015), ("plain-1024", 0.03))]
    fig, axes = plt.subplots(1, 2)
    draw_timing(axes, timing, "plain-1024")
    for axis, (key, low, high) in zip(axes, (("median_s", 0.9, 1.2), ("vs_plain-1024", 0.95, 1.1))):
        bars = [c for c in axis.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 1  # error bars: the intervals, one per variant
        segments = bars[0].lines[2][0].get_segments()
        assert [float(y) for s in segments for y in s[:, 1]] == pytest.approx(
            [y for r in timing for y in (r[key] * low, r[key] * high)])
    plt.close(fig)

    labels = ["this", "plain-256", "plain-1024"]
    rows = [{"variant": v, "workload": w, "workload_mib": 10.0 + i, "measure": "peak bytes of live tensors (torch "
             "dispatch)"} for w in ("prefill", "train-step") for i, v in enumerate(labels)]
    fig, axes = plt.subplots(2, 1, figsize=(7.0, 4.0))
    for axis, workload in zip(axes, ("prefill", "train-step")):
        draw_memory(axis, [r for r in rows if r["workload"] == workload])
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for axis in axes for label in axis.get_yticklabels()
             + axis.get_xticklabels() if label.get_text()]
    assert len(boxes) >= 6
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert overlapping == []
    plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["prefill", "{tmp}/missing"], "no such folder"),
    (["train-step", "{tmp}"], "has no config.json"),
    (["memory", "{root}/llama"], "not an InternVL-X one"),
    (["prefill", "{root}/plain", "--variants", "plain-512"], "--variants plain-512: choose from"),
    (["prefill", "{root}/plain", "--tiles", "0"], "--tiles must be >= 1"),
    (["serve", "ftp://127.0.0.1:1"], "give the server's base address"),
    (["serve", "http://127.0.0.1:{port}", "--requests", "1"], "cannot reach http://127.0.0.1:"),
    (["serve", "http://127.0.0.1:{port}", "--turns", "0"], "--turns must be >= 1"),
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
        chat_json, chat_png = tmp_path / "c.json", tmp_path / "c.png"
        chat = _run(["bench", "serve", url, "--turns", "3", "--same-image", "--concurrency", "1", "--concurrency",
                     "2", "--requests", "2", "--image-size", "64", "--max-tokens", "2", "--out", str(chat_json),
                     "--plot", str(chat_png)], capsys)
    finally:
        stop(server)
    assert code == 0, err + log.read_text()
    _check_chat_rows(chat, chat_json, chat_png, log)
    assert out.splitlines()[0].split() == ["concurrency", "requests", "requests_per_s", "p50_s", "p95_s",
                                           "completion_tokens"]
    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "bench serve" and set(data["environment"]) >= ENVIRONMENT_KEYS
    rows = data["rows"]
    assert [(r["concurrency"], r["requests"]) for r in rows] == [(1, 3), (2, 3)]
    assert all(r["requests_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"] for r in rows)
    assert all(1 <= r["completion_tokens"] <= 6 for r in rows)
    assert out_png.read_bytes().startswith(PNG)


def _check_chat_rows(run, out_json, out_png, log):
    """`--turns 3`: a row per level with chats, first and later turns' latency and their ratio, the later turns' prompt
    tokens as the server counts them, and no cache count from a server that reports none, with a note that says so."""
    code, out, err = run
    assert code == 0, err + log.read_text()
    lines = out.splitlines()
    assert lines[0].split() == ["concurrency", "chats", "turns_per_s", "first_p50_s", "later_p50_s", "later_p95_s",
                                "later_vs_first", "later_prompt_tokens", "later_cached_tokens"]
    data = json.loads(out_json.read_text())
    assert data["settings"]["turns"] == 3 and data["settings"]["same_image"] is True
    rows = data["rows"]
    assert [(r["concurrency"], r["chats"], r["turns"]) for r in rows] == [(1, 2, 3), (2, 2, 3)]
    assert all(r["turns_per_s"] > 0 and 0 < r["later_p50_s"] <= r["later_p95_s"] and r["first_p50_s"] > 0
               for r in rows)
    assert all(r["later_vs_first"] == pytest.approx(r["later_p50_s"] / r["first_p50_s"]) for r in rows)
    assert all(r["later_cached_tokens"] is None for r in rows)
    assert all(r["later_prompt_tokens"] > 0 for r in rows), rows
    assert sum("did not say which prompt tokens came from its cache" in line for line in lines) == 2
    assert out_png.read_bytes().startswith(PNG)
