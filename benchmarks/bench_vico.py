"""Does a router trained by ViCO keep the tiles that hold the answer and compress the others? Measured on CPU on the
held-out images of `internvlx_hf.training.synthetic_tiles` (issue 103).

Hypothesis: on images where the answer sits in one tile (a page of small letters, read only at full resolution) and
the other tiles carry little (blank, flat colour, faint texture; the whole-image thumbnail shows the page too small to
read), a router trained by `internvlx train --preset vico` compresses most non-answer tiles and keeps the answer's, so
its accuracy stays that of the router off while random routing at the same share loses it.

What decides it, per seed of the ViCO run (the base model is trained once):
1. the base: a tiny plain model with the full 64 tokens per 112 px tile (the "1024" of the paper in miniature;
   `demo.recipe.TinySpec`), trained from scratch on the tile task (`--preset full`), its router absent;
2. `internvlx convert BASE ROUTED --add-router` (16 tokens per compressed tile: a quarter, as Flash's 64 of 256);
3. `internvlx train --model ROUTED --preset vico` (stage 1 then stage 2, half the steps each) on other rows than the
   base's (the base fits its own to a loss of ~1e-7), and the same with `--preset vico-projector` (stage 1 trains
   the compressed projector alone, the LLM frozen);
4. for each, on the held-out set: the share of tiles the router compresses, how often it keeps the answer's tile, and
   the accuracy (the first answer token's argmax, what greedy decoding answers: the answers are one letter) with its
   decisions, with the router off, with every tile compressed, and with random decisions at the router's share (the
   same number of tiles per image, drawn 5 times); a sweep of the absolute threshold gives accuracy against share.
5. the `vico` checkpoint of the first seed fine-tuned with `--preset stage2` on other rows (its ViT moves): how many
   of its router's decisions change, then after `--preset vico-router` on the fine-tuned model.

    python benchmarks/bench_vico.py --workdir /tmp/vico --out benchmarks/results/vico.json \\
        --plot benchmarks/results/vico.png                  # everything: about 40 minutes on one CPU thread
    python benchmarks/bench_vico.py --quick --workdir /tmp/vico-quick                  # a smoke run (2 minutes)

It prints a markdown table (docs/flash.md's) and whether each of the issue's targets is met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf.bench.harness import Progress, environment, write_results, write_text  # noqa: E402

TILE = 112
PRESETS = ("vico", "vico-projector")
SWEEP = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)
TARGETS = {"compressed_share": 0.40, "accuracy_drop": 0.01, "answer_kept": 0.90}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--workdir", required=True, help="where the data and checkpoints go")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the ViCO runs (default 0,1,2)")
    parser.add_argument("--base-steps", type=int, default=600, help="steps of the base model's training")
    parser.add_argument("--vico-steps", type=int, default=300, help="steps of each ViCO run (half per stage)")
    parser.add_argument("--drift-steps", type=int, default=200, help="steps of the stage2 fine-tune and of "
                        "--preset vico-router after it")
    parser.add_argument("--grid", default="2x1", help="tiles per image, COLSxROWS (default 2x1; the processor adds "
                        "the whole-image thumbnail)")
    parser.add_argument("--n-train", type=int, default=3000, help="the base model's rows")
    parser.add_argument("--n-vico", type=int, default=2400, help="ViCO's rows (others than the base's: seed 300)")
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sets and few steps")
    parser.add_argument("--out", help="write the results as JSON (its folder must exist)")
    parser.add_argument("--plot", help="accuracy against the share of tiles compressed (PNG)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.base_steps, args.vico_steps, args.drift_steps = "0", 20, 8, 4
        args.n_train, args.n_vico, args.n_test = 64, 32, 16
    args.seeds = [int(s) for s in args.seeds.split(",")]
    cols, _, rows = args.grid.partition("x")
    if not (cols.isdigit() and rows.isdigit() and int(cols) * int(rows) >= 2):
        parser.error(f"--grid {args.grid!r}: give COLSxROWS with at least 2 tiles, e.g. 2x1 or 2x2")
    args.grid = (int(cols), int(rows))
    return args


def train(base, meta, out, steps, preset, seed, batch=16, lr=1e-3, threads=1, options=None):
    from internvlx_hf.demo.recipe import TrainSpec, train_checkpoint

    return train_checkpoint(base, meta, out, TrainSpec(steps=steps, batch_size=batch, learning_rate=lr, seed=seed),
                            preset=preset, progress=False, threads=threads, options=options)


def test_batches(folder, meta, batch=32):
    """The held-out rows as (collated batch, answer token ids, answer tile index per row) batches."""
    import torch

    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.training import InternVLXDataCollator

    processor = InternVLXProcessor.from_pretrained(folder)
    collator = InternVLXDataCollator(processor)
    entry = next(iter(json.loads(Path(meta).read_text()).values()))
    rows = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()]
    batches = []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        for row in part:
            row["image"] = str(Path(entry["root"]) / row["image"])
        inputs = collator([{k: v for k, v in row.items() if k != "tiles"} for row in part])
        labels = inputs["labels"]
        first = (labels != -100).float().argmax(-1)  # each row's first answer token
        answers = labels[torch.arange(len(part)), first]
        batches.append((inputs, first, answers, [row["tiles"]["answer"][0] for row in part]))
    return batches


def first_token_accuracy(model, batches, decide):
    """Accuracy and decisions: ``decide(inputs, routing)`` gives each batch's compressed tiles (None: the router's)."""
    import torch

    correct = total = 0
    compressed_all, kept_answer = [], []
    with torch.no_grad():
        for inputs, first, answers, answer_tiles in batches:
            routing = model.model.route(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
            compressed = decide(inputs, routing)
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"], vir_compressed=compressed)
            rows = torch.arange(len(answers))
            predicted = out.logits[rows, first - 1].argmax(-1)  # the prediction of the first answer token
            correct += int((predicted == answers).sum())
            total += len(answers)
            per_row = compressed.reshape(len(answers), -1)  # (rows, tiles): grid tiles then the thumbnail
            compressed_all.append(per_row)
            kept_answer += [not bool(per_row[i, tile]) for i, tile in enumerate(answer_tiles)]
    decisions = torch.cat(compressed_all)
    return {"accuracy": correct / total, "compressed_share": float(decisions.float().mean()),
            "answer_kept": sum(kept_answer) / len(kept_answer), "n": total}


def evaluate(folder, batches, seed):
    """The figures of one Flash checkpoint (step 4 of the module docstring)."""
    import torch

    from internvlx_hf import InternVLXForConditionalGeneration

    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    vir = model.config.vir
    router = first_token_accuracy(model, batches, lambda inputs, routing: routing.compressed)
    off = first_token_accuracy(model, batches, lambda inputs, routing: torch.zeros_like(routing.compressed))
    every = first_token_accuracy(model, batches, lambda inputs, routing: torch.ones_like(routing.compressed))
    draws = []
    for draw in range(5):
        generator = torch.Generator().manual_seed(1000 * seed + draw)

        def random_like(inputs, routing, generator=generator):
            per_row = routing.compressed.reshape(len(inputs["input_ids"]), -1)
            out = torch.zeros_like(per_row)
            for i, row in enumerate(per_row):
                chosen = torch.randperm(row.numel(), generator=generator)[:int(row.sum())]
                out[i, chosen] = True
            return out.reshape(-1)

        draws.append(first_token_accuracy(model, batches, random_like))
    sweep = []
    before = vir.absolute_threshold
    for threshold in SWEEP:
        vir.absolute_threshold = threshold
        sweep.append({"absolute_threshold": threshold,
                      **first_token_accuracy(model, batches, lambda inputs, routing: routing.compressed)})
    vir.absolute_threshold = before
    return {"router": router, "router_off": off, "compress_every_tile": every,
            "random_at_router_share": {"accuracy": statistics.mean(d["accuracy"] for d in draws),
                                       "accuracy_draws": [d["accuracy"] for d in draws],
                                       "answer_kept": statistics.mean(d["answer_kept"] for d in draws),
                                       "compressed_share": statistics.mean(d["compressed_share"] for d in draws)},
            "sweep": sweep}


def decisions_of(folder, batches):
    """The router's decisions and scores (p0) on every held-out tile."""
    import torch

    from internvlx_hf import InternVLXForConditionalGeneration

    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        routings = [model.model.route(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
                    for inputs, *_ in batches]
    return torch.cat([r.compressed for r in routings]), torch.cat([r.scores for r in routings])


def run(args) -> dict:
    import torch

    from internvlx_hf.conversion import convert
    from internvlx_hf.demo.recipe import TinySpec, build_checkpoint, load_tokenizer_processor
    from internvlx_hf.training.synthetic_tiles import generate_tile_dataset

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    steps = 5 + 2 * len(args.seeds)
    progress = Progress(steps, "vico")
    # four sets drawn alike: the base model's rows, ViCO's (the base fits its own rows to a loss of ~1e-7, where
    # stage 2's loss ratios are noise), the fine-tune's of step 5, and the held-out images
    grid = args.grid
    train_meta, vico_meta, tune_meta, test_meta = (
        generate_tile_dataset(work / name, n=n, seed=seed, tile=TILE, grid=grid, overwrite=True)
        for name, n, seed in (("train", args.n_train, 100), ("vico-data", args.n_vico, 300),
                              ("tune-data", args.n_vico, 400), ("test", args.n_test, 200)))
    progress.step("data")
    spec = TinySpec(projector="mlp", downsample_ratio=1.0, max_tiles=grid[0] * grid[1])
    plain = build_checkpoint(work / "plain", spec, load_tokenizer_processor(), seed=0)
    shutil.rmtree(work / "base", ignore_errors=True)
    base_train = train(plain, train_meta, work / "base", args.base_steps, "full", 0, threads=args.threads)
    progress.step("base model")
    batches = test_batches(work / "base", test_meta)
    runs = {}
    for seed in args.seeds:
        routed = work / f"routed-{seed}"
        shutil.rmtree(routed, ignore_errors=True)
        convert(work / "base", routed, add_router=True, seed=seed)
        runs[seed] = {}
        for preset in PRESETS:
            flash = work / f"{preset}-{seed}"
            shutil.rmtree(flash, ignore_errors=True)
            vico = train(routed, vico_meta, flash, args.vico_steps, preset, seed, batch=8, threads=args.threads)
            runs[seed][preset] = {"train_s": vico["train_runtime"], **evaluate(flash, batches, seed)}
            progress.step(f"seed {seed}, {preset}")
    # step 5: the first seed's Flash model fine-tuned (its ViT moves), then its router trained again
    first = work / f"vico-{args.seeds[0]}"
    tuned, refit = work / "stage2", work / "vico-router"
    for folder in (tuned, refit):
        shutil.rmtree(folder, ignore_errors=True)
    train(first, tune_meta, tuned, args.drift_steps, "stage2", 7, lr=1e-3, threads=args.threads)
    train(tuned, vico_meta, refit, args.drift_steps, "vico-router", 7, batch=8, threads=args.threads)
    progress.step("stage2 and vico-router")
    (original, p_original), (after, p_after), (again, p_again) = (decisions_of(folder, batches)
                                                                   for folder in (first, tuned, refit))
    drift = {"decisions_changed_by_stage2": float((original != after).float().mean()),
             "decisions_changed_after_vico_router": float((original != again).float().mean()),
             "score_change_by_stage2": float((p_original - p_after).abs().mean()),
             "score_change_after_vico_router": float((p_original - p_again).abs().mean()),
             "stage2": evaluate(tuned, batches, 99)["router"], "vico_router": evaluate(refit, batches, 98)["router"]}
    progress.step("drift")
    return {"benchmark": "vico", "date": datetime.date.today().isoformat(),
            "environment": environment("cpu", "float32"),
            "settings": {"tile": TILE, "grid": list(grid), "spec": spec.describe(), "n_train": args.n_train,
                         "n_vico": args.n_vico,
                         "n_test": args.n_test, "base_steps": args.base_steps, "vico_steps": args.vico_steps,
                         "drift_steps": args.drift_steps, "seeds": args.seeds, "threads": args.threads,
                         "metric": "the first answer token's argmax (greedy decoding's first token)"},
            "base": {"train_s": base_train["train_runtime"], "loss_last": base_train["loss_last"]},
            "runs": {str(seed): run for seed, run in runs.items()}, "drift": drift}


def summary(results, preset="vico") -> dict:
    runs = [run[preset] for run in results["runs"].values()]

    def figure(*path):
        values = runs
        for key in path:
            values = [value[key] for value in values]
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    return {"compressed_share": figure("router", "compressed_share"),
            "answer_kept": figure("router", "answer_kept"),
            "accuracy_router": figure("router", "accuracy"), "accuracy_router_off": figure("router_off", "accuracy"),
            "accuracy_random": figure("random_at_router_share", "accuracy"),
            "accuracy_compress_every_tile": figure("compress_every_tile", "accuracy"),
            "train_s": figure("train_s")}


ROWS = (("compressed_share", "tiles compressed by the router"), ("answer_kept", "answer's tile kept by the router"),
        ("accuracy_router", "accuracy, router"),
        ("accuracy_router_off", "accuracy, router off (every tile at full resolution)"),
        ("accuracy_random", "accuracy, random decisions at the router's share (5 draws)"),
        ("accuracy_compress_every_tile", "accuracy, every tile compressed"))


def table(results) -> str:
    figures = {preset: summary(results, preset) for preset in PRESETS}
    seeds, n_test = len(results["runs"]), results["settings"]["n_test"]

    def cell(f):
        return f"{f['mean']:.3f} ({f['min']:.3f}-{f['max']:.3f})"

    lines = [f"| held-out, {n_test} images, {seeds} seeds: mean (min-max) | "
             + " | ".join(f"`--preset {preset}`" for preset in PRESETS) + " |", "|---" * (1 + len(PRESETS)) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(figures[p][name]) for p in PRESETS) + " |" for name, label in ROWS]
    drift = results["drift"]
    lines += ["", ("| the first seed's `vico` model | decisions changed | mean change of a tile's score | "
                   "tiles compressed | answer's tile kept | accuracy |"), "|---|---|---|---|---|---|"]
    for label, key, row in (("after `--preset stage2`", "by_stage2", "stage2"),
                            ("then `--preset vico-router`", "after_vico_router", "vico_router")):
        lines.append(f"| {label} | {drift['decisions_changed_' + key]:.3f} | {drift['score_change_' + key]:.4f} | "
                     f"{drift[row]['compressed_share']:.3f} | {drift[row]['answer_kept']:.3f} | "
                     f"{drift[row]['accuracy']:.3f} |")
    return "\n".join(lines)


def targets(results, preset="vico") -> list[tuple[str, bool, str]]:
    f = summary(results, preset)
    drop = f["accuracy_router_off"]["mean"] - f["accuracy_router"]["mean"]
    above = min(run[preset]["router"]["accuracy"] - run[preset]["random_at_router_share"]["accuracy"]
                for run in results["runs"].values())
    return [("at least 40% of held-out tiles compressed", f["compressed_share"]["min"] >= TARGETS["compressed_share"],
             f"{f['compressed_share']['min']:.3f} in the worst seed"),
            ("accuracy within 1 point of the router off", drop <= TARGETS["accuracy_drop"], f"{drop:+.3f} on average"),
            ("clearly above random routing at the same share", above > 0.05,
             f"{above:+.3f} in the closest seed"),
            ("the answer's tile kept at least 90% of the time", f["answer_kept"]["min"] >= TARGETS["answer_kept"],
             f"{f['answer_kept']['min']:.3f} in the worst seed")]


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.8, 4.4))
    for preset, colour in zip(PRESETS, ("tab:blue", "tab:orange")):
        for index, run in enumerate(run[preset] for run in results["runs"].values()):
            first = index == 0
            points = sorted((p["compressed_share"], p["accuracy"]) for p in run["sweep"])
            axis.plot(*zip(*points), color=colour, alpha=0.5, marker=".",
                      label=f"{preset}: absolute threshold swept" if first else None)
            axis.scatter([run["router"]["compressed_share"]], [run["router"]["accuracy"]], color=colour, s=60,
                         zorder=3, label=f"{preset}: its router (0.5)" if first else None)
            axis.scatter([run["random_at_router_share"]["compressed_share"]],
                         [run["random_at_router_share"]["accuracy"]], color=colour, marker="x", s=60,
                         label=f"{preset}: random at its share" if first else None)
    runs = [run[preset] for run in results["runs"].values() for preset in PRESETS]
    axis.scatter([0.0] * len(runs), [run["router_off"]["accuracy"] for run in runs], color="black", marker="s",
                 label="router off")
    axis.scatter([1.0] * len(runs), [run["compress_every_tile"]["accuracy"] for run in runs], color="gray",
                 marker="v", label="every tile compressed")
    axis.set_xlabel("share of held-out tiles compressed")
    axis.set_ylabel("accuracy (held-out)")
    axis.set_title("Routers trained by ViCO (tiny model, CPU)")
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = run(args)
    text = table(results)
    print(text)
    for name, met, detail in targets(results):
        print(f"target {name} (--preset vico): {'met' if met else 'NOT MET'} ({detail})")
    if args.out:
        results["table"] = text
        results["targets"] = [{"target": name, "met": met, "detail": detail} for name, met, detail in targets(results)]
        write_results(args.out, results)
        write_text(Path(args.out).with_suffix(".md"), text + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
