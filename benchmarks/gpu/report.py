"""Tables and a plot from the JSON files `benchmarks/gpu/speed.sh` writes (bench_models.py on a GPU).

    python benchmarks/gpu/report.py benchmarks/results/gpu/gpu-2b.json benchmarks/results/gpu/gpu-8b.json \
        --markdown benchmarks/results/gpu/h100.md --plot benchmarks/results/gpu/h100.png

For every preset: the GPU targets with their verdicts, then prefill/decoding per tile count and the training step per
ViT mode (wall time, the time the GPU's kernels ran, throughput, peak memory, the SDPA kernels that ran). The plot
shows LVTC's time relative to plain-1024, by wall clock and by GPU-busy time, next to the FLOP ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_models", HERE.parent / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown(runs: list[dict]) -> str:
    bench = _bench()
    out = []
    for data in runs:
        meta = data["meta"]
        out += [f"## {meta['preset']} on {meta.get('gpu', meta['device'])} ({meta['date']})", "",
                f"`{meta['command']}`; torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}, "
                f"attention {meta['attn']}, SDPA backend forced: {meta['sdpa_backend']}, {meta['runs']} timed rounds "
                f"(median) after a warm-up round.", ""]
        for note in ("device_s_correction", "device_s_source"):
            if meta.get(note):
                out += [f"Note: {meta[note]}", ""]
        out += ["| check | value | FLOPs predict | required | verdict |", "|---|---|---|---|---|"]
        for name, check in data["checks"].items():
            if check["ok"] is None or not ("tile(s)" in name or "ViT" in name):
                continue  # the rest are the CPU benchmark's checks (one tile, issue 14's bars)
            flops = f"{check['flop_ratio']:.3f}" if check.get("flop_ratio") else "-"
            out.append(f"| {name} | {check['value']:.3f} | {flops} | {check['required']} | "
                       f"{'met' if check['ok'] else 'NOT met'} |")
        out.append(bench.sweep_markdown(data["sweep"], meta))
        out.append("")
    return "\n".join(out)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, data in zip(axes[0], runs):
        labels, wall, busy, flops = [], [], [], []
        cases = [(f"prefill {t} tile(s)", summary, "prefill") for t, summary in data["sweep"]["prefill"].items()]
        cases += [(f"train, ViT {vit}", summary, "train") for vit, summary in data["sweep"]["train"].items()]
        for label, summary, what in cases:
            row, ref = summary["lvtc"], summary["plain-1024"]
            labels.append(label)
            wall.append(row[f"{what}_s"] / ref[f"{what}_s"])
            flops.append(row[f"{what}_flops"] / ref[f"{what}_flops"])
            b, r = row.get(f"{what}_device_s"), ref.get(f"{what}_device_s")
            busy.append(b / r if b and r else float("nan"))
        x = range(len(labels))
        ax.bar([i - 0.27 for i in x], wall, 0.27, label="wall time")
        ax.bar(list(x), busy, 0.27, label="GPU-busy time")
        ax.bar([i + 0.27 for i in x], flops, 0.27, label="FLOPs")
        ax.axhline(0.65, color="tab:red", lw=0.8, ls="--", label="prefill target 0.65")
        ax.axhline(1 / 1.6, color="tab:purple", lw=0.8, ls=":", label="training target 1/1.6")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        meta = data["meta"]
        ax.set_title(f"LVTC / plain-1024, {meta['preset']} ({meta['dtype']}, {meta.get('gpu', meta['device'])})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="bench_models.py --json files")
    parser.add_argument("--markdown", type=Path, help="write the tables here (default: print them)")
    parser.add_argument("--plot", type=Path, help="save the LVTC / plain-1024 ratios as a PNG")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.json]
    text = markdown(runs)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
