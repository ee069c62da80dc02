"""LVTC on the path users take: a trained plain model upgraded with ``internvlx convert --lvtc``, then fine-tuned
(issue 30; docs/lvtc.md, "Upgrading a trained model").

Hypothesis: on the upgrade path, as from scratch (benchmarks/results/lvtc-hr-path.md), the paper's formulation
(``hr_scale="none"``) does not learn to read through its high-resolution tokens within a fine-tuning budget, while
``hr_scale="rms"`` does and matches a plain-1024 upgrade at about 0.62x its cost. Deciding quantities: fine-task
accuracy (mean, spread over seeds) against the upgraded plain-1024; the fine accuracy with the HR output zeroed or
taken from another image (does the model read through the HR tokens?); the lowest basic task against the pretrained
model's (no forgetting); the interleaved per-step cost against plain-1024.

The miniature of a user's path, with the learnability benchmark's tiny models and tasks
(`internvlx_hf.demo.recipe`):

1. ``pretrained``: a plain-256 model (InternVL2's MLP projector, 16 tokens per 112 px tile) trained from scratch on
   the basic tasks and the fine task exactly as `bench_learnability.py` trains it (1500 steps). It stands for the
   user's InternVL2 checkpoint; it is kept (``WORKDIR/pretrained``) and its scores are the forgetting baseline.
2. It is exported to transformers' native InternVL layout (`internvlx export native`: the form in which the users'
   checkpoints come) and upgraded by `internvlx_hf.conversion.convert` (the code of ``internvlx convert``):
       plain-256    ``convert SRC DST`` (the model as it is; fine-tuned on: the reference "do nothing")
       lvtc         ``--lvtc k=5``                  (the paper's formulation, today's default)
       lvtc-rms     ``--lvtc k=5,hr_scale=rms``
       pvtc+lvtc    ``--projector pvtc --lvtc k=5`` (a new PVTC projector: stage 1 has to align it)
       pvtc+lvtc-rms  the same with hr_scale=rms
   and, as the upper reference, plain-1024: the converted model with a new MLP projector at downsample 1.0 (64
   tokens per tile, 4x; the converter has no option for this, so the script swaps the projector: every other
   weight is the converted model's).
3. Each is fine-tuned on a fresh training set of the same tasks (another seed's images: the user's new data), by
   `internvlx_hf.training.train` with the presets users would use: ``stage1`` (projectors only, lr 1e-3) for
   ``--stage1-steps``, then ``stage2`` (everything, lr ``--stage2-lr``) for ``--stage2-steps`` ("s1+s2"); and
   ``stage2`` alone for the sum of both ("s2", equal steps). Batch 32, cosine schedule, 5% warm-up.
4. Scored on the learnability benchmark's held-out set (1000 samples, greedy exact match), LVTC models also with the
   HR projector's output zeroed and replaced by another image's.

Every run is a process of its own (``--jobs`` at a time, one thread each) writing
``benchmarks/results/lvtc-upgrade/runs/<config>-<schedule>-s<seed>.json``; runs already there are not redone, so
the study resumes. ``--summarise`` (also run at the end) writes ``benchmarks/results/lvtc-upgrade.json/.md`` and,
with ``--plot``, the PNG.

    python benchmarks/bench_lvtc_upgrade.py --workdir /tmp/upgrade                      # the whole study
    python benchmarks/bench_lvtc_upgrade.py --workdir /tmp/upgrade --seeds 0 --schedules s1+s2,s2
    python benchmarks/bench_lvtc_upgrade.py --summarise --plot benchmarks/results/lvtc-upgrade.png
    python benchmarks/bench_lvtc_upgrade.py --quick --workdir /tmp/upgrade-quick        # smoke run, not a result
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "lvtc-upgrade" / "runs"
K = 5  # of 6 LLM layers: the learnability benchmark's LVTC expand layer

# name -> (convert options, TinySpec name of the same architecture for the cost probe)
UPGRADES = {
    "plain-256": (dict(), "plain-256"),
    "plain-1024": (None, "plain-1024"),  # the projector swap, not a convert option
    "lvtc": (dict(lvtc=f"k={K}"), "lvtc-256-1024"),
    "lvtc-rms": (dict(lvtc=f"k={K},hr_scale=rms"), "lvtc-rms"),
    "pvtc+lvtc": (dict(projector="pvtc", lvtc=f"k={K}"), "pvtc+lvtc"),
    "pvtc+lvtc-rms": (dict(projector="pvtc", lvtc=f"k={K},hr_scale=rms"), "pvtc+lvtc-rms"),
}
# "s1+s2": --stage1-steps of stage1, then --stage2-steps of stage2; "s2": stage2 alone for their sum;
# "s1long+s2": a longer stage 1 (600 + 1100 steps: the HR projector aligns longer before the LLM unfreezes).
SCHEDULES = ("s1+s2", "s2", "s1long+s2")
LONG_STAGES = (600, 1100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--configs", default=",".join(UPGRADES), help="upgrades to fine-tune (default: all)")
    p.add_argument("--schedules", default="s1+s2", help="s1+s2 (stage1 then stage2), s2 (stage2 alone), s1long+s2 "
                   "(600 + 1100 steps), comma-separated")
    p.add_argument("--runs", default=None, metavar="CONFIG:SCHEDULE:SEED,...",
                   help="an explicit list of runs instead of --configs x --schedules x --seeds")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (new modules' init, data order)")
    p.add_argument("--stage2-alone-seeds", default=None,
                   help="seeds of the s2 schedule when it should differ from --seeds (e.g. 0)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage2-steps", type=int, default=700)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=5e-4)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--probe-rounds", type=int, default=30, help="interleaved cost probe rounds (0: skip)")
    p.add_argument("--workdir", default="/tmp/internvlx-lvtc-upgrade")
    p.add_argument("--runs-dir", default=str(RUNS))
    p.add_argument("--json", default=str(RESULTS / "lvtc-upgrade.json"))
    p.add_argument("--plot", default=None)
    p.add_argument("--summarise", action="store_true", help="train nothing: tabulate the runs there are")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny step counts, results under /tmp")
    p.add_argument("--run", nargs=3, metavar=("CONFIG", "SCHEDULE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.stage1_steps, args.stage2_steps, args.n_test = 20, 10, 10, 100
        args.probe_rounds = 2
        args.runs_dir = os.path.join(args.workdir, "runs")
        args.json = os.path.join(args.workdir, "lvtc-upgrade.json")
    bad = [c for c in args.configs.split(",") if c not in UPGRADES]
    bad += [s for s in args.schedules.split(",") if s not in SCHEDULES]
    if bad:
        p.error(f"unknown configuration(s)/schedule(s) {bad}; choose from {list(UPGRADES)} / {list(SCHEDULES)}")
    return args


def data_specs(args):
    from internvlx_hf.demo.recipe import DataSpec

    pretrain = DataSpec(sizes="fixed", n_test=args.n_test, seed=0)
    return pretrain, replace(pretrain, seed=1)  # fine-tuning: new images of the same tasks


def pretrain(args) -> Path:
    """Step 1: the plain-256 "InternVL2" (trained once, kept, scored)."""
    from internvlx_hf.conversion.export import export_native
    from internvlx_hf.demo.recipe import (CONFIGS, TrainSpec, build_checkpoint, evaluate, load_tokenizer_processor,
                                          make_datasets, train_checkpoint)

    work = Path(args.workdir)
    done = work / "pretrained" / "config.json"
    native = work / "pretrained-native"
    record = Path(args.runs_dir) / "pretrained.json"
    if done.is_file() and native.is_dir() and record.is_file():
        return native
    spec = CONFIGS["plain-256"]
    data, _ = data_specs(args)
    train_meta, test_meta = make_datasets(work / "data", spec, data)
    start = build_checkpoint(work / "init" / "pretrained", spec, load_tokenizer_processor(), seed=0)
    print(f"[pretrain] plain-256 from scratch, {args.pretrain_steps} steps", flush=True)
    metrics = train_checkpoint(start, train_meta, work / "pretrained",
                               TrainSpec(steps=args.pretrain_steps), threads=1)
    result = metrics.pop("result")
    scores = evaluate(result.trainer.model, result.trainer.processing_class, test_meta, limit=args.n_test)
    export_native(work / "pretrained", native, overwrite=True, progress=False)
    row = {"name": "pretrained", "steps": args.pretrain_steps, "train_s": metrics["train_runtime"],
           "loss_last": metrics["loss_last"], "accuracy": scores["accuracy"], "basic_min": scores["basic_min"]}
    _write(record, row)
    print(f"[pretrain] {scores['accuracy']}", flush=True)
    return native


def upgrade(native: Path, config: str, seed: int, dst: Path) -> Path:
    """Step 2: the user's ``internvlx convert`` (or, for plain-1024, the converted model with a new projector)."""
    import torch

    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.conversion import convert

    options, _ = UPGRADES[config]
    if options is not None:
        convert(native, dst, seed=seed, overwrite=True, progress=False, **options)
        return dst
    plain = dst.with_name(dst.name + "-plain")
    convert(native, plain, seed=seed, overwrite=True, progress=False)
    model = InternVLXForConditionalGeneration.from_pretrained(plain)
    processor = InternVLXProcessor.from_pretrained(plain)
    config_1024 = model.config
    config_1024.downsample_ratio = 1.0
    config_1024.image_seq_length = model.config.image_seq_length * 4
    torch.manual_seed(seed)
    wide = InternVLXForConditionalGeneration(config_1024)
    state = {k: v for k, v in model.state_dict().items() if "multi_modal_projector" not in k}
    missing, unexpected = wide.load_state_dict(state, strict=False)
    assert not unexpected and all("multi_modal_projector" in k for k in missing), (missing, unexpected)
    processor.image_seq_length = config_1024.image_seq_length
    wide.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


def one_run(args, config: str, schedule: str, seed: int) -> dict:
    """Steps 2-4 for one configuration, schedule and seed."""
    import shutil

    from bench_learnability import hr_ablation
    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.demo.recipe import CONFIGS, TrainSpec, evaluate, make_datasets, train_checkpoint

    work = Path(args.workdir)
    _, fine_data = data_specs(args)
    train_meta, test_meta = make_datasets(work / "data", CONFIGS["plain-256"], fine_data)
    tag = f"{config}-{schedule}-s{seed}"
    start = upgrade(work / "pretrained-native", config, seed, work / "init" / tag)
    s1, s2 = LONG_STAGES if schedule == "s1long+s2" else (args.stage1_steps, args.stage2_steps)
    stages = ([("stage1", s1, args.stage1_lr), ("stage2", s2, args.stage2_lr)]
              if schedule != "s2" else [("stage2", s1 + s2, args.stage2_lr)])
    row = {"name": tag, "config": config, "schedule": schedule, "seed": seed, "stages": []}
    current = start
    for i, (preset, steps, lr) in enumerate(stages):
        out = work / "trained" / f"{tag}-{preset}"
        print(f"[{tag}] {preset}: {steps} steps, lr {lr}", flush=True)
        metrics = train_checkpoint(current, train_meta, out, TrainSpec(steps=steps, learning_rate=lr, seed=seed),
                                   preset=preset, threads=1, progress=False)
        metrics.pop("result")
        row["stages"].append({"preset": preset, "steps": steps, "lr": lr, "train_s": metrics["train_runtime"],
                              "loss_first": metrics["loss_first"], "loss_last": metrics["loss_last"]})
        current = out  # `train` saved the model and its processor there
    model = InternVLXForConditionalGeneration.from_pretrained(current).eval()
    processor = InternVLXProcessor.from_pretrained(current)
    scores = evaluate(model, processor, test_meta, limit=args.n_test, progress=False)
    row.update(accuracy=scores["accuracy"], basic_min=scores["basic_min"],
               tokens_per_tile=model.config.image_seq_length,
               tokens_per_tile_from_k=model.config.hr_tokens_per_tile or model.config.image_seq_length,
               train_s=sum(s["train_s"] for s in row["stages"]))
    if getattr(model.model, "lvtc_hr_projector", None) is not None:
        row["fine_hr"] = hr_ablation(model, processor, test_meta, args.n_test, intact=scores["accuracy"]["fine"])
    trained = [work / "trained" / f"{tag}-{stage[0]}" for stage in stages]
    for folder in [start, start.with_name(start.name + "-plain"), *trained]:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def cost_probe(args) -> dict[str, float]:
    """Median seconds per training step of each architecture, interleaved (`bench_learnability`)."""
    from bench_learnability import interleaved_step_times
    from internvlx_hf.demo.recipe import CONFIGS, EXTRA_CONFIGS, load_tokenizer_processor, make_datasets

    all_specs = {**CONFIGS, **EXTRA_CONFIGS,
                 "pvtc+lvtc-rms": replace(CONFIGS["pvtc+lvtc"], lvtc_hr_scale="rms")}
    specs = {name: all_specs[UPGRADES[name][1]] for name in UPGRADES}
    _, fine_data = data_specs(args)
    train_meta, _ = make_datasets(Path(args.workdir) / "data", CONFIGS["plain-256"], fine_data)
    return interleaved_step_times(specs, train_meta, load_tokenizer_processor(), rounds=args.probe_rounds,
                                  batch_size=32, lr=1e-3)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n" if not isinstance(data, str) else data)
    os.replace(tmp, path)


def schedule_runs(args) -> None:
    """Every (config, schedule, seed) without a results file, ``--jobs`` processes at a time, seed by seed."""
    runs_dir = Path(args.runs_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    alone = [int(s) for s in args.stage2_alone_seeds.split(",")] if args.stage2_alone_seeds else seeds
    todo = []
    for item in (args.runs.split(",") if args.runs else []):
        config, schedule, seed = item.split(":")
        if not (runs_dir / f"{config}-{schedule}-s{seed}.json").is_file():
            todo.append((config, schedule, int(seed)))
    for seed in ([] if args.runs else sorted(set(seeds) | set(alone))):
        for schedule in args.schedules.split(","):
            if seed not in (alone if schedule == "s2" else seeds):
                continue
            for config in args.configs.split(","):
                if not (runs_dir / f"{config}-{schedule}-s{seed}.json").is_file():
                    todo.append((config, schedule, seed))
    print(f"{len(todo)} runs to do, {args.jobs} at a time", flush=True)
    running: list[tuple[subprocess.Popen, str, float]] = []
    passthrough = ["--workdir", args.workdir, "--runs-dir", args.runs_dir, "--n-test", str(args.n_test),
                   "--stage1-steps", str(args.stage1_steps), "--stage2-steps", str(args.stage2_steps),
                   "--stage1-lr", str(args.stage1_lr), "--stage2-lr", str(args.stage2_lr)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            config, schedule, seed = todo.pop(0)
            tag = f"{config}-{schedule}-s{seed}"
            log = open(Path(args.workdir) / f"{tag}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, "--run", config, schedule, str(seed), *passthrough],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, tag, time.time()))
        time.sleep(5)
        for item in list(running):
            proc, tag, started = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see {tag}.log)"
                if proc.returncode:
                    failed.append(tag)
                print(f"{tag}: {status} in {time.time() - started:.0f} s; {len(todo)} waiting", flush=True)
    if failed:
        raise SystemExit(f"failed runs: {failed}")


def summarise(args) -> int:
    from internvlx_hf.training.synthetic import BASIC_TASKS

    runs_dir = Path(args.runs_dir)
    rows = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*-s*.json"))]
    pre_path = runs_dir / "pretrained.json"
    pretrained = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    probe_path = runs_dir / "probe.json"
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["schedule"]), []).append(row)

    def mean_sd(values):
        if not values:
            return None, None
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    table = []
    for config in UPGRADES:
        for schedule in SCHEDULES:
            group = groups.get((config, schedule))
            if not group:
                continue
            fine = [r["accuracy"]["fine"] for r in group]
            entry = {"config": config, "schedule": schedule, "seeds": sorted(r["seed"] for r in group),
                     "fine": mean_sd(fine), "fine_runs": fine,
                     "basic_min": min(r["basic_min"] for r in group),
                     "basic_min_runs": [r["basic_min"] for r in group],
                     "tokens": (group[0]["tokens_per_tile"], group[0]["tokens_per_tile_from_k"]),
                     "train_s_max": max(r["train_s"] for r in group)}
            if "fine_hr" in group[0]:
                entry["fine_zeroed"] = mean_sd([r["fine_hr"]["zeroed"] for r in group])[0]
                entry["fine_other"] = mean_sd([r["fine_hr"]["other image"] for r in group])[0]
            if probe:
                entry["cost"] = probe[config] / probe["plain-1024"]
            entry["basic_mean"] = {t: statistics.mean(r["accuracy"][t] for r in group) for t in BASIC_TASKS}
            if pretrained:
                entry["worst_basic_drop"] = max(((t, pretrained["accuracy"][t] - entry["basic_mean"][t])
                                                 for t in BASIC_TASKS), key=lambda item: item[1])
            table.append(entry)
    lines = ["| configuration | schedule | visual tokens per tile (layers < k / >= k) | cost vs plain-1024 (probe) | "
             "fine, mean ± sd (seeds) | fine, HR zeroed | fine, HR of another image | lowest basic task | "
             "largest basic-task drop vs pretrained |",
             "|---|---|---|---|---|---|---|---|---|"]
    if pretrained:
        acc = pretrained["accuracy"]
        lines.append(f"| pretrained plain-256 (before the upgrade) | - | 16 | - | {acc['fine']:.3f} | - | - | "
                     f"{pretrained['basic_min']:.3f} | - |")
    for e in table:
        tokens = f"{e['tokens'][0]}" if e["tokens"][0] == e["tokens"][1] else f"{e['tokens'][0]} / {e['tokens'][1]}"
        cost = f"{e['cost']:.2f}x" if "cost" in e else "-"
        zeroed = f"{e['fine_zeroed']:.3f}" if "fine_zeroed" in e else "-"
        other = f"{e['fine_other']:.3f}" if "fine_other" in e else "-"
        drop = f"{e['worst_basic_drop'][1]:+.3f} ({e['worst_basic_drop'][0]})" if "worst_basic_drop" in e else "-"
        lines.append(f"| {e['config']} | {e['schedule']} | {tokens} | {cost} | {e['fine'][0]:.3f} ± "
                     f"{e['fine'][1]:.3f} ({len(e['seeds'])}) | {zeroed} | {other} | {e['basic_min']:.3f} | {drop} |")
    checks = check_targets(table, pretrained)
    lines += [""] + [f"- {'met' if ok else 'NOT met'}: {text}" for ok, text in checks]
    text = "\n".join(lines)
    print(text)
    keys = ("pretrain_steps", "stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr", "n_test")
    results = {"settings": {key: getattr(args, key) for key in keys}
               | {"machine": f"{platform.machine()} {os.cpu_count()} cores", "threads_per_run": 1,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
               "pretrained": pretrained, "probe_s_per_step": probe, "table": table, "runs": rows,
               "checks": [{"met": ok, "text": t} for ok, t in checks]}
    _write(Path(args.json), results)
    _write(Path(args.json).with_suffix(".md"), text + "\n")
    if args.plot:
        plot(table, pretrained, args.plot)
    return 0


def check_targets(table, pretrained) -> list[tuple[bool, str]]:
    """The issue's targets, per LVTC configuration and schedule."""
    by = {(e["config"], e["schedule"]): e for e in table}
    checks = []
    for schedule in SCHEDULES:
        ref, low = by.get(("plain-1024", schedule)), by.get(("plain-256", schedule))
        if ref is None or low is None:
            continue
        for config in ("lvtc", "lvtc-rms", "pvtc+lvtc", "pvtc+lvtc-rms"):
            e = by.get((config, schedule))
            if e is None:
                continue
            fine, ref_fine = e["fine"][0], ref["fine"][0]
            cost = e.get("cost")
            ok = fine >= ref_fine - 0.05 and (cost is not None and cost <= 0.65)
            checks.append((ok, f"{config} ({schedule}): within 0.05 of plain-1024 on fine at <= 0.65x its cost "
                               f"({fine:.3f} vs {ref_fine:.3f}, cost {cost if cost is None else round(cost, 2)}x)"))
            if "fine_zeroed" in e:
                # "falls": the zeroed score must drop (a model that never used its HR tokens is not "reading" them)
                ok = e["fine_zeroed"] <= low["fine"][0] + 0.10 and fine - e["fine_zeroed"] >= 0.05
                checks.append((ok, f"{config} ({schedule}): reads through its HR tokens (HR zeroed: {fine:.3f} -> "
                                   f"{e['fine_zeroed']:.3f}, a fall to within 0.10 of plain-256's "
                                   f"{low['fine'][0]:.3f} or below)"))
            if pretrained:
                task, drop = e["worst_basic_drop"]
                checks.append((drop <= 0.03, f"{config} ({schedule}): no forgetting (no basic task more than 0.03 "
                                             f"below the pretrained model's; largest drop {drop:+.3f} on {task}, "
                                             "mean over seeds)"))
    return checks


def plot(table, pretrained, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = {"s1+s2": "o", "s2": "s"}
    for e in table:
        if "cost" not in e:
            continue
        ax.errorbar(e["cost"], e["fine"][0], yerr=e["fine"][1], marker=markers[e["schedule"]], capsize=3,
                    label=f"{e['config']} ({e['schedule']})", linestyle="none")
        if "fine_zeroed" in e:
            ax.plot(e["cost"], e["fine_zeroed"], marker="x", color="grey", linestyle="none")
    if pretrained:
        ax.axhline(pretrained["accuracy"]["fine"], color="grey", linestyle=":", label="pretrained plain-256")
    ax.axhline(1 / 8, color="lightgrey", linestyle="--", label="chance")
    ax.set_xlabel("training step cost vs plain-1024 (interleaved probe)")
    ax.set_ylabel("fine-detail accuracy (held-out)")
    ax.set_title("Upgrading a trained plain-256 model (x: HR output zeroed)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        import torch

        torch.set_num_threads(1)
        config, schedule, seed = args.run[0], args.run[1], int(args.run[2])
        row = one_run(args, config, schedule, seed)
        _write(Path(args.runs_dir) / f"{config}-{schedule}-s{seed}.json", row)
        print(json.dumps({k: row[k] for k in ("name", "accuracy", "train_s")} | {"fine_hr": row.get("fine_hr")}))
        return 0
    if args.summarise:
        return summarise(args)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    pretrain(args)
    probe_path = Path(args.runs_dir) / "probe.json"
    if args.probe_rounds and not probe_path.is_file():
        import torch

        torch.set_num_threads(1)
        _write(probe_path, cost_probe(args))
    schedule_runs(args)
    return summarise(args)


if __name__ == "__main__":
    raise SystemExit(main())
