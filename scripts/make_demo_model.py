"""Regenerate the demo model that ships inside the package (`src/internvlx_hf/demo/model/`), from nothing but seeds.

The recipe is the `pvtc+lvtc` configuration of `benchmarks/bench_learnability.py` (`internvlx_hf.demo.recipe`):

1. the tokenizer, chat template and processor of the converted test fixture `tests/fixtures/internvl2_qwen2`
   (Qwen2 byte-level BPE, 812 ids; `internvlx_hf.conversion.convert`), with 112 px tiles;
2. a freshly initialised tiny InternVL-X (seed 0): PVTC projector, LVTC k=5 of 6 layers (16 -> 64 tokens per tile),
   saved as a checkpoint;
3. the synthetic visual QA (`internvlx_hf.training.synthetic_vqa`): 3,600 basic samples + 200 fine-detail samples x 9,
   written as InternVL meta JSON + JSONL; each conversation has (drawn from its seed) an empty system block or no
   system turn, i.e. the chat template's default system message, so that the model answers both the way
   `internvlx demo` asks and the way clients that send no system turn ask (lmms-eval, pipelines, `chat()`);
4. `internvlx_hf.training.run` (the code behind `internvlx train`): preset `full`, 1,500 steps of batch 32, AdamW
   lr 1e-3, cosine schedule, seed 0;
5. the video stage (`VideoSpec`): 500 more steps (lr 5e-4) on the image training set joined with 2,000 clips of 4
   frames of the `first-colour` task ("Which colour appears first?": InternVL video rows over frame folders, read by
   the training pipeline's video path), so that the model learns the video question without forgetting the others;
6. held-out exact match on 1,000 image samples and 200 clips under each system prompt (empty, the template's default,
   no system turn), written with the recipe into `demo_model.json` next to the weights; the folder (weights, config,
   processor, tokenizer, provenance: no code, which `internvlx_hf.demo.demo_model_dir()` adds from the package's own
   modules) replaces OUT in one rename.

    python scripts/make_demo_model.py --threads 1              # ~45 + ~20 min of training on one CPU thread
    python scripts/make_demo_model.py --steps 30 --video-steps 10 --out /tmp/demo-smoke     # a quick try
    python scripts/make_demo_model.py --from-trained /tmp/w/trained/pvtc+lvtc   # from a bench checkpoint

`--from-trained` starts from a folder trained with the image stage of the same recipe instead of training it again
(a `demo_model.json` there, e.g. in a copy of an earlier packaged model, gives the record of that stage); the video
stage then runs on it (`--video-steps 0`: none) and it is evaluated the same way. (`bench_learnability.py --keep`
trains on empty system blocks only: use its pvtc+lvtc run with `--system-prompts empty`.) CPU float results can
differ in the last bits between machines and
thread counts, so a regenerated model may differ slightly from the shipped one; the held-out scores in
`demo_model.json` say how it does. (The default system message, ~150 byte-level tokens, makes half the prompts about
four times longer than with an empty system block: training takes ~4x the steps' time of the learnability
benchmark's runs.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Files of a training run that the packaged model does not ship: training_args.bin is a pickle, trainer_state.json
# the run's log (demo_model.json records its losses), and the remote code
# (*.py) is written from the package's modules when the model is loaded or saved (internvlx_hf.demo.packaged).
SKIP = {"training_args.bin", "trainer_state.json"}
SKIP_SUFFIXES = (".py",)


def main(argv=None) -> int:
    from internvlx_hf.demo.recipe import (
        CONFIGS,
        DEMO_MODEL_DIR,
        FIXTURE_TOKENIZER,
        SYSTEM_PROMPTS,
        DataSpec,
        TrainSpec,
        VideoSpec,
    )

    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEMO_MODEL_DIR), help="where the model goes (default: the package's)")
    parser.add_argument("--steps", type=int, default=TrainSpec().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workdir", default=None, help="data and the training run (default: a temp folder)")
    parser.add_argument("--from-trained", default=None,
                        help="start from this folder, trained by the image stage (bench_learnability.py --keep, or a "
                        "copy of an earlier packaged model), instead of training that stage")
    parser.add_argument("--video-steps", type=int, default=VideoSpec().steps,
                        help=f"steps of the video stage (default {VideoSpec().steps}; 0: no video stage)")
    parser.add_argument("--system-prompts", choices=list(SYSTEM_PROMPTS), default="empty+default",
                        help="system blocks of the training conversations (default: empty+default)")
    args = parser.parse_args(argv)

    import torch

    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.demo.recipe import (
        build_checkpoint,
        copy_checkpoint,
        load_tokenizer_processor,
        make_datasets,
        make_video_datasets,
        train_checkpoint,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "pvtc+lvtc"
    spec = CONFIGS[name]
    data = DataSpec(seed=args.seed, system_prompts=args.system_prompts)
    training = TrainSpec(steps=args.steps, seed=args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="internvlx-demo-model-"))
    train_meta, test_meta = make_datasets(workdir / "data", spec, data)
    video = VideoSpec(steps=args.video_steps)
    image_stage = {}
    if args.from_trained:
        trained = Path(args.from_trained)
        if not (trained / "config.json").is_file():
            raise SystemExit(f"--from-trained {trained}: no config.json there; pass a folder trained by "
                             "bench_learnability.py --keep or a copy of a packaged demo model")
        earlier = trained / "demo_model.json"
        if earlier.is_file():
            earlier = json.loads(earlier.read_text(encoding="utf-8"))
            training = TrainSpec(**earlier["training"])
            image_stage = {key: earlier.get(key) for key in ("train_runtime_s", "loss_first", "loss_last")}
    else:
        base = load_tokenizer_processor(_converted_fixture(workdir, FIXTURE_TOKENIZER))
        start = build_checkpoint(workdir / "init", spec, base, seed=args.seed)
        trained = workdir / "trained"
        metrics = train_checkpoint(start, train_meta, trained, training, threads=args.threads)
        image_stage = {"train_runtime_s": metrics.get("train_runtime"), "loss_first": metrics.get("loss_first"),
                       "loss_last": metrics.get("loss_last")}
    video_stage = None
    if video.steps > 0:
        video_meta, video_test = make_video_datasets(workdir / "data", spec, data, video)
        stage = TrainSpec(steps=video.steps, learning_rate=video.learning_rate, seed=args.seed,
                          batch_size=training.batch_size, warmup=training.warmup)
        metrics = train_checkpoint(trained, video_meta, workdir / "video", stage, threads=args.threads)
        trained = workdir / "video"
        video_stage = {**asdict(video), "train_runtime_s": metrics.get("train_runtime"),
                       "loss_first": metrics.get("loss_first"), "loss_last": metrics.get("loss_last")}
    model = InternVLXForConditionalGeneration.from_pretrained(trained)
    processor = InternVLXProcessor.from_pretrained(str(trained), trust_remote_code=True)
    by_system = score_system_prompts(model, processor, test_meta, data.n_test)
    scores = by_system["empty"]
    record = {"recipe": name, "model": asdict(spec), "data": asdict(data), "training": asdict(training),
              **image_stage, "held_out": scores, "held_out_by_system_prompt": by_system}
    if video_stage is not None:
        record["video"] = video_stage
        record["held_out_video"] = score_system_prompts(model, processor, video_test, video.n_test)
    record.update({"scored_with": SCORED_WITH, "regenerate": "python scripts/make_demo_model.py",
                   "trained_by": f"scripts/make_demo_model.py --from-trained {args.from_trained}"
                   if args.from_trained else "scripts/make_demo_model.py"})
    staging = Path(tempfile.mkdtemp(prefix="internvlx-demo-stage-"))
    for entry in sorted(trained.iterdir()):
        if entry.is_file() and entry.name not in SKIP and not entry.name.endswith(SKIP_SUFFIXES) \
                and not entry.name.startswith("."):
            shutil.copy2(entry, staging / entry.name)
    (staging / "demo_model.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    copy_checkpoint(staging, out)
    shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB); held-out exact match:")
    for variant, result in by_system.items():
        video_scores = record.get("held_out_video", {}).get(variant, {}).get("accuracy", {})
        scores = result["accuracy"] | video_scores
        print(f"  system {variant}: " + ", ".join(f"{t} {v:.3f}" for t, v in scores.items()))
    return 0


SCORED_WITH = ("exact match of greedy answers (max 8 new tokens) to the held-out set's first n samples, float32, "
               "left-padded batches of 50, one 112 px tile each (a clip: one per frame, `internvlx eval`'s video "
               "rows); held_out = system 'empty' (how `internvlx demo` asks); held_out_by_system_prompt (images) and "
               "held_out_video (clips): 'empty' = an empty system block, 'default' = the chat template's "
               "default system message written out, 'none' = no system turn (the template renders its default)")


def score_system_prompts(model, processor, test_meta, n: int) -> dict:
    """Held-out scores under an empty system block, the template's default system message and no system turn."""
    from internvlx_hf.demo.recipe import evaluate, template_default_system

    variants = {"empty": "", "default": template_default_system(processor), "none": None}
    return {name: evaluate(model, processor, test_meta, limit=n, system=system) | {"system": system}
            for name, system in variants.items()}


def _converted_fixture(workdir: Path, fixture: Path) -> Path:
    from internvlx_hf.conversion import convert

    if not fixture.is_dir():
        raise SystemExit(f"{fixture} not found: the tokenizer comes from the repository's test fixture; run this "
                         "script from a clone of the repository")
    target = workdir / "tokenizer-source"
    if not (target / "tokenizer.json").is_file():
        convert(fixture, target, progress=False, overwrite=True)
    return target


if __name__ == "__main__":
    sys.exit(main())
