"""The host time of one step's LVTC short layout (the saving path's metadata on vLLM), built from host data (this
version), against the layout of an earlier version read from a file (`--baseline`, e.g. ``git show
f3be96e:src/internvlx_hf/vllm/lvtc/short_layout.py`` with its one relative import, ``from .geometry``, made absolute),
which worked on the device's tensors and read four counts and each request's lengths back once per step
(`--baseline-takes host` for a baseline with this version's inputs). Then this version's layout from the rows
alone, V1's (the rows checked against those each request's tiles give, `short_layout(rows, ..., tiles=)`) and V2's
(built from the tiles alone, `short_layout(None, ..., tiles=)`).

A step as vLLM runs it while a request prefills beside decoding ones: one request of `--tiles` 448px tiles (1024 long,
256 short slots each) and `--decoding` requests of one token, each after an image of `--decoding-tiles` tiles. On a
GPU the previous step's forward pass is still queued when the runner builds the next step's metadata; `--queued-ms`
simulates it with a spin kernel enqueued before each call (`torch.cuda._sleep`): a layout that reads the device waits
for it, one built on the host does not. The figure is the host time of the call (what delays the step's launch),
median and 95% interval over rounds that alternate the versions, and the ratio of each median to the baseline's.

    python benchmarks/bench_short_layout.py --baseline /tmp/old_short_layout.py [--device cuda] [--rounds 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import time

import torch

from internvlx_hf.bench.harness import format_table, median_interval
from internvlx_hf.vllm.lvtc.geometry import LVTCGeometry
from internvlx_hf.vllm.lvtc.positions import saving_positions
from internvlx_hf.vllm.lvtc.short_layout import short_layout
from internvlx_hf.vllm.lvtc.tiles import RequestTiles

SHORT, LONG, BLOCK = 256, 1024, 16


def step_inputs(tiles: int, decoding: int, decoding_tiles: int = 0):
    """Host rows, long positions, query offsets, sequence lengths, a block table and each request's tiles for the
    step; each decoding request's prompt held `decoding_tiles` tiles (at index 10) before its decoded tokens."""
    layout = LVTCGeometry(expand_layer=4, short_side=16, long_side=32, upsample_mode="bilinear", hr_scale="none",
                          injection_layers=())
    prompt = 20 + tiles * LONG + 30
    feature = type("F", (), {})()
    feature.mm_position = type("P", (), {"offset": 20, "length": tiles * LONG, "is_embed": None})()
    rows, delta = saving_positions(layout, prompt, [feature])
    tiles_of_requests = [RequestTiles.of(type("R", (), {"mm_features": [feature]})(), SHORT, LONG)]
    spans = tuple((10 + tile * LONG, 10 + tile * LONG + LONG - 1) for tile in range(decoding_tiles))
    tiles_of_requests += [RequestTiles(spans, SHORT, LONG)] * decoding
    columns, positions, seq_lens = [rows], [torch.arange(prompt)], [prompt]
    for index in range(decoding):
        p = 600 + decoding_tiles * LONG + 7 * index
        # a request decoding: its rows all its short position, p less its tiles' HR-only slots
        columns.append(torch.full((3, 1), p - decoding_tiles * (LONG - SHORT), dtype=torch.int64))
        positions.append(torch.tensor([p]))
        seq_lens.append(p + 1)
    rows = torch.cat(columns, 1)
    qsl = torch.tensor([0, prompt] + [prompt + i + 1 for i in range(decoding)], dtype=torch.int32)
    width = (max(prompt, 600 + decoding_tiles * LONG) + 800) // BLOCK + 1
    table = torch.arange(1, 1 + (decoding + 1) * width, dtype=torch.int32).reshape(decoding + 1, width)
    return rows, torch.cat(positions), qsl, torch.tensor(seq_lens, dtype=torch.int32), table, tiles_of_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--baseline", required=True, help="an earlier short_layout.py (device-side layout)")
    parser.add_argument("--baseline-takes", choices=("device", "host"), default="device",
                        help="the baseline's inputs: f3be96e's device tensors (default), or host ones as this "
                             "version's (1f3e66c and later)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiles", type=int, default=7)
    parser.add_argument("--decoding", type=int, default=63)
    parser.add_argument("--decoding-tiles", type=int, default=1,
                        help="tiles of the image each decoding request's prompt held (0: text-only requests)")
    parser.add_argument("--queued-ms", type=float, default=5.0, help="GPU work queued before each call (cuda only)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", help="write the rows (each figure with its 95%% interval) as JSON here")
    parser.add_argument("--raw", help="also write every round's times (ms) as JSON here (not a record to commit: "
                                      "the rows are the figures and spreads)")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("baseline_short_layout", args.baseline)
    baseline = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    device = torch.device(args.device)
    rows, positions, qsl, seq_lens, table, tiles = step_inputs(args.tiles, args.decoding, args.decoding_tiles)
    tokens = int(qsl[-1])
    d_rows, d_positions, d_qsl, d_table = (t.to(device) for t in (rows, positions, qsl, table))
    common = dict(num_tokens=tokens, short_per_tile=SHORT, long_per_tile=LONG, block_size=BLOCK)
    if args.baseline_takes == "device":
        candidates = {"device layout (baseline)": lambda: baseline.short_layout(d_rows, d_positions, d_qsl, d_table,
                                                                                **common)}
    else:
        candidates = {"host layout (baseline)": lambda: baseline.short_layout(rows, qsl, seq_lens, d_table, **common)}
        if "tiles" in inspect.signature(baseline.short_layout).parameters:  # (9faa4cf and later: V1's and V2's)
            candidates["rows checked against tiles, V1 (baseline)"] = lambda: baseline.short_layout(
                rows, qsl, seq_lens, d_table, tiles=tiles, **common)
            candidates["from tiles, V2 (baseline)"] = lambda: baseline.short_layout(
                None, qsl, seq_lens, d_table, tiles=tiles, **common)
        elif hasattr(baseline, "step_rows"):  # (V2's layout in 1655ef9: the rows from the tiles, then the layout)
            candidates["from tiles, V2 (baseline)"] = lambda: baseline.short_layout(
                baseline.step_rows(tiles, qsl, seq_lens, tokens), qsl, seq_lens, d_table, **common)
    candidates["host layout, rows only (this version)"] = lambda: short_layout(rows, qsl, seq_lens, d_table,
                                                                               **common)
    # V1's: the rows checked against each request's tiles (the rows computed from them)
    candidates["rows checked against tiles, V1 (this version)"] = lambda: short_layout(
        rows, qsl, seq_lens, d_table, tiles=tiles, **common)
    # V2's: the layout from the tiles alone
    candidates["from tiles, V2 (this version)"] = lambda: short_layout(None, qsl, seq_lens, d_table, tiles=tiles,
                                                                       **common)
    baseline_name = next(iter(candidates))
    a, *others = (fn() for fn in candidates.values())
    for b in others:
        assert a.gather.tolist() == b.gather.tolist() and a.slot_mapping.tolist() == b.slot_mapping.tolist()
    spin = 0
    if device.type == "cuda" and args.queued_ms > 0:  # cycles per millisecond, measured once
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):  # (the first launch pays the kernel's loading)
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            end.synchronize()
        spin = int(10_000_000 / start.elapsed_time(end) * args.queued_ms)
        start.record()
        torch.cuda._sleep(spin)
        end.record()
        end.synchronize()
        print(f"queued work per call: {start.elapsed_time(end):.2f} ms measured")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(args.rounds + 5):
        for name, fn in (candidates.items() if index % 2 else reversed(list(candidates.items()))):
            if spin:
                torch.cuda._sleep(spin)
            begin = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begin
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 5:
                times[name].append(elapsed * 1e3)
    base = statistics.median(times[baseline_name])
    table_rows = []
    for name, values in times.items():
        median, (low, high, _) = statistics.median(values), median_interval(values)
        table_rows.append({"layout": name, "host ms (median)": round(median, 3),
                           "95% interval": f"{low:.3f}-{high:.3f}", "ratio to baseline": round(median / base, 3)})
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{args.tiles} tiles prefilling + {args.decoding} decoding, {tokens} tokens, "
          f"GPU work queued per call: {args.queued_ms if spin else 0} ms, {args.rounds} rounds")
    print(format_table(table_rows))
    (low_a, high_a, _), *others = (median_interval(values) for values in times.values())
    for name, (low_b, high_b, _) in zip(list(times)[1:], others):
        if low_a <= high_b and low_b <= high_a:
            print(f"{name}: its 95% interval overlaps the baseline's: the ratio is within the noise")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"settings": vars(args), "rows": table_rows}, handle, indent=1)
    if args.raw:
        with open(args.raw, "w") as handle:
            json.dump({"settings": vars(args), "times_ms": times}, handle, indent=1)


if __name__ == "__main__":
    main()
