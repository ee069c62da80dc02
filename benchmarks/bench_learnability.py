"""Proof that it learns: tiny InternVL-X models trained from scratch on CPU, through the project's training pipeline.

Every configuration starts from a freshly initialised tiny model (`internvlx_hf.demo.recipe.TinySpec`: 112 px tiles
of 14 px patches, a 2-layer ViT of width 64, a 6-layer Qwen2 LLM of width 128, the byte-level tokenizer of the
converted test fixture) saved as a checkpoint, and is trained by `internvlx_hf.training.run` (HF `Trainer`,
`InternVLXDataset`, `InternVLXDataCollator`, preset `full`) on the synthetic visual QA of
`internvlx_hf.training.synthetic_vqa` (InternVL meta JSON + JSONL written to disk). It is then scored on a held-out set
by exact match of greedy `generate` answers, per task.

Fixed-size set (one 112 px tile per image), the paper's configurations in miniature (tokens per tile are 16x smaller
than the paper's 256 / 1024 per 448 px tile):

  plain-256      InternVL2's MLP projector, downsample 0.5: 16 tokens per tile
  plain-1024     the MLP projector at downsample 1.0: 64 tokens per tile
  pvtc-256       the PVTC projector: 16 tokens per tile
  lvtc-256-1024  MLP projector + LVTC (k=5 of 6 layers): layers 0-4 see 16 tokens per tile, layer 5 sees 64
  pvtc+lvtc      PVTC low-resolution projector + LVTC (the embedded demo model's recipe)

Mixed-size set (small images, banners, wide images, tall pages): the pvtc+lvtc model trained with RVTC tiling
`ratio` (InternVL2's), `area` and `edge` (the paper's caps), max 6 tiles (+ a thumbnail), at equal steps.

Tasks: colour, shape, position, count (basic) and fine (which of 8 letters, one per 14 px patch, is in the red
box). Training data: 3,600 basic samples + 200 fine samples repeated 9 times (`--fine-pages`, `--fine-repeat`);
held-out: 1,000 samples (200 per task). Hyper-parameters: batch 32, AdamW lr 1e-3 (beta2 0.98), cosine schedule
with 5% warm-up, gradient clipping 1.0, seed 0. "train s" is the Trainer's train_runtime (data loading and collation
included).

    python benchmarks/bench_learnability.py --quick                    # a 2-minute smoke run of the whole script
    python benchmarks/bench_learnability.py --plot benchmarks/results/learnability.png      # everything (~1.5 h)
    python benchmarks/bench_learnability.py --configs plain-256,plain-1024 --steps 800 --no-tiling
    python benchmarks/bench_learnability.py --no-fixed --tiling-steps 600                # only the RVTC comparison
    python benchmarks/bench_learnability.py --ablate-from WORKDIR/trained     # LVTC's HR path on or off (kept runs)

LVTC rows also report fine-detail accuracy with the high-resolution projector's output zeroed, and replaced by that
of another image of the batch: whether the trained model reads anything through its HR tokens at all.

It prints a markdown table (the one in docs/benchmarks-learnability.md), checks the issue's requirements and says which are met, and
writes the results as JSON (and markdown) next to each other. Use `--threads` to pin the CPU threads (timings are
comparable only within one run on one machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf.bench.harness import Progress, time_interleaved, write_text  # noqa: E402 - after the path to src/

TASK_COLUMNS = ("colour", "shape", "position", "count", "fine")


def parse_args(argv=None) -> argparse.Namespace:
    from internvlx_hf.demo.recipe import CONFIGS, EXTRA_CONFIGS, DataSpec

    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"fixed-size configurations to train, comma-separated (default: all of {list(CONFIGS)}; "
                             f"also {list(EXTRA_CONFIGS)})")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per fixed-size configuration")
    parser.add_argument("--tiling", default="ratio,area,edge", help="RVTC modes compared on the mixed-size set")
    parser.add_argument("--tiling-config", default="pvtc+lvtc", choices=list(CONFIGS),
                        help="the model trained for the tiling comparison")
    parser.add_argument("--tiling-steps", type=int, default=800, help="training steps per tiling mode")
    parser.add_argument("--tiling-from", default=None, metavar="DIR",
                        help="start the tiling runs from this trained checkpoint (e.g. the fixed-size pvtc+lvtc run "
                             "kept by --keep: WORKDIR/trained/pvtc+lvtc) instead of from scratch")
    parser.add_argument("--probe-rounds", type=int, default=0, metavar="N",
                        help="also time N interleaved training steps of every fixed-size configuration on the same "
                             "batches (robust to a machine whose load drifts; reported as 'probe s/step')")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed-size configurations")
    parser.add_argument("--no-tiling", action="store_true", help="skip the tiling comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, data order and training set seed")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out samples (all five tasks in turn)")
    parser.add_argument("--fine-pages", type=int, default=DataSpec.n_fine,
                        help="distinct fine-detail training pages (few: a model that cannot read the letters "
                             "memorises them; many: every model learns to read them)")
    parser.add_argument("--fine-repeat", type=int, default=DataSpec.fine_repeat,
                        help="how many times each fine-detail page is seen per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="where data and checkpoints go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the trained checkpoints in --workdir")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/learnability.json"),
                        help="results JSON (a .md with the tables is written next to it)")
    parser.add_argument("--plot", default=None, help="save a PNG of accuracy against training time")
    parser.add_argument("--from-json", default=None, metavar="A.json,B.json",
                        help="train nothing: merge the runs of earlier results files (e.g. a fixed-size and a tiling "
                             "run made separately) into --json, the table, the checks and --plot")
    parser.add_argument("--ablate-from", default=None, metavar="DIR",
                        help="train nothing: score the fine-detail task of kept LVTC checkpoints (DIR is one, or a "
                             "folder of them such as WORKDIR/trained of a --keep run) with the HR projector's output "
                             "intact, zeroed and taken from another image; results in --json (default "
                             "benchmarks/results/learnability-hr-ablation.json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 steps, 100 held-out samples, results under /tmp (not a measurement)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.tiling_steps, args.n_test = 30, 30, 100
        if args.json == parser.get_default("json"):
            args.json = os.path.join(tempfile.gettempdir(), "learnability-quick.json")
    if args.ablate_from and args.json == parser.get_default("json"):
        args.json = str(ROOT / "benchmarks/results/learnability-hr-ablation.json")
    unknown = [c for c in args.configs.split(",") if c and c not in CONFIGS and c not in EXTRA_CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS) + list(EXTRA_CONFIGS)}")
    if args.fine_pages < 1 or args.fine_repeat < 1:
        parser.error(f"--fine-pages {args.fine_pages} / --fine-repeat {args.fine_repeat}: both must be >= 1")
    bad_modes = [m for m in args.tiling.split(",") if m not in ("ratio", "area", "edge", "none")]
    if bad_modes:
        parser.error(f"--tiling: unknown mode(s) {bad_modes}; choose from ratio, area, edge, none")
    return args


def run_one(name, spec, data_spec, train_spec, workdir, base, *, tiling=None, threads=None, n_test=1000,
            keep=False, start_from=None):
    from internvlx_hf.demo.recipe import build_checkpoint, copy_checkpoint, evaluate, make_datasets, train_checkpoint

    train_meta, test_meta = make_datasets(workdir / "data", spec, data_spec)
    tag = name if tiling is None else f"{name}-{tiling}"
    if start_from is None:
        start = build_checkpoint(workdir / "init" / tag, spec, base, seed=train_spec.seed)
    else:  # a trained checkpoint, copied so that the run's own outputs never touch it
        start = copy_checkpoint(start_from, workdir / "init" / tag)
    out = workdir / "trained" / tag
    metrics = train_checkpoint(start, train_meta, out, train_spec, tiling=tiling, threads=threads)
    result = metrics.pop("result")
    model, processor = result.trainer.model, result.trainer.processing_class
    scores = evaluate(model, processor, test_meta, limit=n_test)
    config = model.config
    lvtc = config.lvtc
    row = {
        "name": tag,
        "started_from": str(start_from) if start_from else "scratch",
        "config": name,
        "tiling": str(getattr(processor.image_processor.tiling, "value", processor.image_processor.tiling)),
        "sizes": data_spec.sizes,
        "spec": spec.describe(),
        "tokens_per_tile": config.image_seq_length,
        "tokens_per_tile_from_k": config.hr_tokens_per_tile or config.image_seq_length,
        "lvtc_k": lvtc.expand_layer if lvtc is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": train_spec.steps,
        "batch_size": train_spec.batch_size,
        "train_s": metrics["train_runtime"],
        "s_per_step": metrics["train_runtime"] / train_spec.steps,
        "loss_first": metrics["loss_first"],
        "loss_last": metrics["loss_last"],
        "accuracy": scores["accuracy"],
        "basic_min": scores["basic_min"],
        "tiles_per_sample": scores["tiles_per_sample"],
        "visual_tokens_per_sample": scores["visual_tokens_per_sample"],
        "visual_tokens_per_sample_from_k": scores["visual_tokens_per_sample"]
        * (config.hr_tokens_per_tile or config.image_seq_length) // config.image_seq_length,
        "n_test": scores["n"],
        "eval_s": scores["eval_s"],
    }
    if getattr(model.model, "lvtc_hr_projector", None) is not None:
        row["fine_hr"] = hr_ablation(model, processor, test_meta, n_test, intact=scores["accuracy"].get("fine"))
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(start, ignore_errors=True)
    return row


HR_MODES = ("intact", "zeroed", "other image")


@contextlib.contextmanager
def hr_features(model, mode: str):
    """Run LVTC models with the HR projector's output as computed ("intact"), zeroed, or shifted by one tile in the
    batch ("other image": with one tile per image, every image gets its neighbour's high-resolution features)."""
    change = {"intact": None, "zeroed": lambda out: out.new_zeros(out.shape),
              "other image": lambda out: out.roll(1, 0)}[mode]
    handle = None
    if change is not None:
        handle = model.model.lvtc_hr_projector.register_forward_hook(lambda module, args, out: change(out))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def hr_ablation(model, processor, test_meta, n_test, intact: float | None = None,
                task: str = "fine") -> dict[str, float]:
    """Fine-detail accuracy on the run's held-out fine samples (or those of ``task``) for every `HR_MODES` entry
    (``intact``: the run's own accuracy on them, when it was already scored). A model that reads the letters through
    its HR tokens drops towards chance (1/8) without them; one that does not, stays put."""
    from internvlx_hf.demo.recipe import evaluate

    scores = {} if intact is None else {"intact": intact}
    for mode in (m for m in HR_MODES if m not in scores):
        with hr_features(model, mode):
            scores[mode] = evaluate(model, processor, test_meta, limit=n_test, tasks=(task,),
                                    progress=False)["accuracy"][task]
    return scores


def ablate_from(args) -> int:
    """``--ablate-from``: `hr_ablation` of kept LVTC checkpoints, on the held-out set their runs were scored on."""
    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.demo.recipe import CONFIGS, DataSpec, make_datasets, read_records

    source = Path(args.ablate_from)
    if not source.is_dir():
        raise SystemExit(f"--ablate-from {source}: no such folder")
    folders = [source] if (source / "config.json").is_file() else sorted(
        p for p in source.iterdir() if (p / "config.json").is_file())
    folders = [p for p in folders if json.loads((p / "config.json").read_text()).get("lvtc")]
    if not folders:
        raise SystemExit(f"--ablate-from {source}: no LVTC checkpoint there (a folder with config.json whose lvtc "
                         "is set, or a folder of such folders: WORKDIR/trained of a --keep run)")
    data = DataSpec(sizes="fixed", n_test=args.n_test, seed=args.seed, n_fine=args.fine_pages,
                    fine_repeat=args.fine_repeat)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="internvlx-ablation-"))
    _, test_meta = make_datasets(workdir / "data", CONFIGS["plain-256"], data)  # seeded: the runs' held-out set
    rows = []
    for folder in folders:
        model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
        processor = InternVLXProcessor.from_pretrained(folder)
        rows.append({"name": folder.name, "lvtc_k": model.config.lvtc.expand_layer,
                     "fine_hr": hr_ablation(model, processor, test_meta, args.n_test)})
        print(f"{folder.name}: " + ", ".join(f"{m} {v:.3f}" for m, v in rows[-1]["fine_hr"].items()), flush=True)
    n_fine = sum(1 for r in read_records(test_meta)[0][:args.n_test] if r["task"] == "fine")
    lines = hr_table(rows) + [f"{n_fine} held-out fine-detail samples (seed {args.seed}), greedy exact match; "
                              "chance is 1/8."]
    table = "\n".join(lines)
    print("\n" + table)
    results = {"settings": {"seed": args.seed, "n_test": args.n_test, "n_fine_test": n_fine,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
               "runs": rows}
    write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    write_text(Path(args.json).with_suffix(".md"), table + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _acc(row, task):
    value = row["accuracy"].get(task)
    return "-" if value is None else f"{value:.3f}"


def _tokens(row):
    short, long = row["visual_tokens_per_sample"], row["visual_tokens_per_sample_from_k"]
    return f"{short:.0f}" if short == long else f"{short:.0f} -> {long:.0f} (k={row['lvtc_k']})"


def markdown(results) -> str:
    lines = []
    meta = results["settings"]
    fixed = [r for r in results["runs"] if r["sizes"] == "fixed"]
    mixed = [r for r in results["runs"] if r["sizes"] == "mixed"]
    if fixed:
        ref = next((r for r in fixed if r["config"] == "plain-1024"), None)
        probe_s = results.get("probe") or {}
        lines += ["| configuration | visual tokens / sample | steps | train s | vs plain-1024 | probe s/step "
                  "| probe vs plain-1024 | colour | shape | position | count | fine |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in fixed:
            rel = f"{r['train_s'] / ref['train_s']:.2f}x" if ref else "-"
            p, p_ref = probe_s.get(r["config"]), probe_s.get("plain-1024")
            p_cols = f"{p:.3f} | {p / p_ref:.2f}x" if p and p_ref else "- | -"
            lines.append(f"| {r['config']} | {_tokens(r)} | {r['steps']} | {r['train_s']:.0f} | {rel} | {p_cols} | "
                         + " | ".join(_acc(r, t) for t in TASK_COLUMNS) + " |")
        lines.append("")
        lines += hr_table(fixed)
    if mixed:
        ref = next((r for r in mixed if r["tiling"] == "ratio"), None)
        origin = mixed[0].get("started_from", "scratch")
        origin = "from scratch" if origin == "scratch" else "fine-tuned from the fixed-size run"
        lines += ["| tiling (mixed sizes, " + mixed[0]["config"] + ", " + origin + ") | tiles / sample "
                  "| visual tokens / sample "
                  "| steps | train s | vs ratio | colour | shape | position | count | fine |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mixed:
            rel = f"{r['train_s'] / ref['train_s']:.2f}x" if ref else "-"
            lines.append(f"| {r['tiling']} | {r['tiles_per_sample']:.2f} | {_tokens(r)} | {r['steps']} | "
                         f"{r['train_s']:.0f} | {rel} | " + " | ".join(_acc(r, t) for t in TASK_COLUMNS) + " |")
        lines.append("")
    lines.append(f"Seed {meta['seed']}; batch {meta['batch_size']}; AdamW lr {meta['lr']} (cosine, 5% warm-up); "
                 f"{meta['n_train']} training samples ({meta['n_basic']} basic + {meta['n_fine']} fine x "
                 f"{meta['fine_repeat']}); {meta['n_test']} held-out samples (greedy exact match); "
                 f"{meta['threads']} CPU thread(s), {meta['machine']}; torch {meta['torch']}, transformers "
                 f"{meta['transformers']}.")
    return "\n".join(lines)


def hr_table(rows) -> list[str]:
    """The `hr_ablation` numbers of the rows that have them, as a markdown table (and a blank line)."""
    rows = [r for r in rows if r.get("fine_hr")]
    if not rows:
        return []
    lines = ["| LVTC model | k | fine, HR intact | fine, HR zeroed | fine, HR of another image |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['lvtc_k']} | " + " | ".join(f"{r['fine_hr'][m]:.3f}" for m in HR_MODES) + " |"
              for r in rows]
    return lines + [""]


def check_requirements(results) -> list[tuple[str, bool, str]]:
    runs = {r["name"]: r for r in results["runs"]}
    checks = []
    fixed = [r for r in results["runs"] if r["sizes"] == "fixed"]
    if fixed:
        worst = min(fixed, key=lambda r: r["basic_min"])
        checks.append(("every configuration >= 0.90 on the basic tasks", worst["basic_min"] >= 0.90,
                       f"lowest: {worst['basic_min']:.3f} ({worst['name']})"))
    p256, p1024, lvtc = runs.get("plain-256"), runs.get("plain-1024"), runs.get("lvtc-256-1024")
    if p256 and p1024:
        gap = p1024["accuracy"]["fine"] - p256["accuracy"]["fine"]
        checks.append(("fine: plain-1024 beats plain-256 by >= 0.15", gap >= 0.15,
                       f"{p1024['accuracy']['fine']:.3f} - {p256['accuracy']['fine']:.3f} = {gap:+.3f}"))
    if lvtc and p1024:
        diff = p1024["accuracy"]["fine"] - lvtc["accuracy"]["fine"]
        ratio = lvtc["train_s"] / p1024["train_s"]
        checks.append(("fine: LVTC within 0.05 of plain-1024", diff <= 0.05,
                       f"{lvtc['accuracy']['fine']:.3f} vs {p1024['accuracy']['fine']:.3f} ({-diff:+.3f})"))
        checks.append(("LVTC training time <= 0.65x plain-1024 (whole runs)", ratio <= 0.65,
                       f"{lvtc['train_s']:.0f} s / {p1024['train_s']:.0f} s = {ratio:.2f}x"))
        probe_s = results.get("probe") or {}
        if "lvtc-256-1024" in probe_s and "plain-1024" in probe_s:
            ratio = probe_s["lvtc-256-1024"] / probe_s["plain-1024"]
            checks.append(("LVTC training step <= 0.65x plain-1024 (interleaved probe)", ratio <= 0.65,
                           f"{probe_s['lvtc-256-1024']:.3f} s / {probe_s['plain-1024']:.3f} s = {ratio:.2f}x"))
    mixed = {r["tiling"]: r for r in results["runs"] if r["sizes"] == "mixed"}
    if "ratio" in mixed:
        for mode in ("area", "edge"):
            if mode in mixed:
                ratio = mixed[mode]["train_s"] / mixed["ratio"]["train_s"]
                cost = {t: mixed[mode]["accuracy"][t] - mixed["ratio"]["accuracy"][t] for t in TASK_COLUMNS}
                checks.append((f"RVTC {mode} cuts training time against ratio", ratio < 1.0,
                               f"{ratio:.2f}x; accuracy change " + ", ".join(f"{t} {v:+.3f}" for t, v in cost.items())))
    return checks


def plot(results, path):
    from internvlx_hf.bench.harness import figure

    with figure(path, 1, 2, figsize=(11, 4.2), dpi=110) as (fig, axes):
        for ax, sizes, title in ((axes[0], "fixed", "fixed-size set (one tile)"),
                                 (axes[1], "mixed", "mixed sizes: RVTC tiling modes")):
            runs = [r for r in results["runs"] if r["sizes"] == sizes]
            for r in runs:
                basic = min(r["accuracy"][t] for t in ("colour", "shape", "position", "count"))
                label = r["config"] if sizes == "fixed" else r["tiling"]
                ax.plot([r["train_s"]] * 2, [basic, r["accuracy"]["fine"]], "-", color="0.8", zorder=1)[0]
                ax.scatter([r["train_s"]], [r["accuracy"]["fine"]], marker="o", s=50, zorder=2, label=f"{label}: fine")
                ax.scatter([r["train_s"]], [basic], marker="s", s=30, zorder=2, facecolors="none",
                           edgecolors=ax.collections[-1].get_facecolor()[0])
                ax.annotate(label, (r["train_s"], r["accuracy"]["fine"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
            ax.set_title(title)
            ax.set_xlabel("training time (s, CPU)")
            ax.set_ylabel("held-out exact match")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        axes[0].text(0.02, 0.03, "filled: fine detail; hollow: lowest basic task", transform=axes[0].transAxes,
                     fontsize=8)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from tqdm.auto import tqdm

    from internvlx_hf.demo.recipe import CONFIGS, EXTRA_CONFIGS, DataSpec, TrainSpec, load_tokenizer_processor

    CONFIGS = {**CONFIGS, **EXTRA_CONFIGS}

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        return report(merge_results(args.from_json.split(",")), args)
    if args.ablate_from:
        return ablate_from(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="internvlx-learnability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = load_tokenizer_processor()
    fixed_data = DataSpec(sizes="fixed", n_test=args.n_test, seed=args.seed, n_fine=args.fine_pages,
                          fine_repeat=args.fine_repeat)
    mixed_data = replace(fixed_data, sizes="mixed")
    jobs = []
    if not args.no_fixed:
        jobs += [(name, CONFIGS[name], fixed_data, args.steps, None) for name in args.configs.split(",") if name]
    if not args.no_tiling:
        jobs += [(args.tiling_config, CONFIGS[args.tiling_config], mixed_data, args.tiling_steps, mode)
                 for mode in args.tiling.split(",") if mode]
    results = {
        "settings": {"seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "n_test": args.n_test,
                     "n_basic": fixed_data.n_basic, "n_fine": fixed_data.n_fine,
                     "fine_repeat": fixed_data.fine_repeat,
                     "n_train": fixed_data.n_basic + fixed_data.n_fine * fixed_data.fine_repeat,
                     "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                     "torch": torch.__version__, "transformers": transformers.__version__, "quick": args.quick,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "runs": [],
    }
    started = time.time()
    for name, spec, data_spec, steps, tiling in tqdm(jobs, desc="configurations"):
        train_spec = TrainSpec(steps=steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
        spec_run = replace(spec, tiling=tiling) if tiling else spec
        row = run_one(name, spec_run, data_spec, train_spec, workdir, base, tiling=tiling, threads=args.threads,
                      n_test=args.n_test, keep=args.keep, start_from=args.tiling_from if tiling else None)
        results["runs"].append(row)
        tqdm.write(f"{row['name']}: {row['train_s']:.0f} s, loss {row['loss_first']:.3f} -> {row['loss_last']:.4f}, "
                   + ", ".join(f"{t} {v:.3f}" for t, v in row["accuracy"].items()))
        # Partial results are kept after every configuration, so an interrupted run still leaves its numbers.
        write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    if args.probe_rounds:
        results["probe"] = probe(args.configs.split(","), fixed_data, workdir, base, args)
    results["total_s"] = time.time() - started
    report(results, args)
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def probe(names, data_spec, workdir, base, args):
    """Median seconds of one training step per configuration (`interleaved_step_times` on the training set)."""
    from internvlx_hf.demo.recipe import CONFIGS, EXTRA_CONFIGS, make_datasets

    specs = {name: {**CONFIGS, **EXTRA_CONFIGS}[name] for name in names}
    train_meta, _ = make_datasets(workdir / "data", specs[names[0]], data_spec)
    return interleaved_step_times(specs, train_meta, base, rounds=args.probe_rounds, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed)


def interleaved_step_times(specs, train_meta, base, *, rounds, batch_size, lr, seed=0) -> dict[str, float]:
    """Median seconds of one training step (collation, forward, backward, optimizer) of each `TinySpec` in
    ``specs`` (name -> spec), timed round-robin on identical batches of ``train_meta``, so that a drifting machine
    load hits all alike; two warm-up rounds are not counted."""
    import random

    import torch

    from internvlx_hf.demo.recipe import build_model, build_processor
    from internvlx_hf.training import InternVLXDataCollator, InternVLXDataset

    runs = []
    for name, spec in specs.items():
        processor = build_processor(spec, base)
        model = build_model(spec, processor, seed=seed).train()
        dataset = InternVLXDataset(str(train_meta), processor, progress=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        runs.append((name, model, InternVLXDataCollator(processor), dataset, optimizer))
    rng = random.Random(seed)
    rows: list[int] = []
    progress = Progress(rounds + 2, "interleaved step timing")

    def new_rows() -> None:  # every round's batch, the same for all models
        rows[:] = rng.sample(range(len(runs[0][3])), batch_size)
        progress.step(f"round {progress.done + 1}")

    def step(model, collator, dataset, optimizer) -> None:
        loss = model(**collator([dataset[i] for i in rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    calls = [lambda run=run: step(*run[1:]) for run in runs]
    timings = time_interleaved(calls, warmup=2, repeats=rounds, before_round=new_rows)  # two warm-up rounds
    return {name: timing["median_s"] for (name, *_), timing in zip(runs, timings)}


def merge_results(paths):
    """One results dict from several results files (their settings must agree, apart from the date)."""
    merged = None
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"--from-json: {path} not found")
        results = json.loads(path.read_text(encoding="utf-8"))
        if merged is None:
            merged = {"settings": results["settings"], "runs": [], "total_s": 0.0}
        else:
            differ = sorted(k for k in results["settings"] if k != "date"
                            and results["settings"][k] != merged["settings"].get(k))
            if differ:
                raise SystemExit(f"--from-json: {path} was run with other settings ({differ}); merge like runs only")
        merged["runs"] += results["runs"]
        if "probe" in results:
            merged["probe"] = results["probe"]
        merged["total_s"] += results.get("total_s", 0.0)
    merged["merged_from"] = [str(p) for p in paths]
    return merged


def report(results, args) -> int:
    results["checks"] = [{"requirement": r, "met": m, "numbers": n} for r, m, n in check_requirements(results)]
    table = markdown(results)
    checks = "\n".join(f"- {'met' if c['met'] else 'NOT met'}: {c['requirement']} ({c['numbers']})"
                       for c in results["checks"])
    print("\n" + table + "\n\n" + checks)
    write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    write_text(Path(args.json).with_suffix(".md"), table + "\n\n" + checks + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
