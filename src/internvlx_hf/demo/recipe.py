"""The recipe of the learnability benchmark and of the embedded demo model: tiny InternVL-X models trained from
scratch on the synthetic visual QA of `internvlx_hf.training.synthetic_vqa`, through the project's training pipeline.

- `TinySpec`: the architecture (112 px tiles of 14 px patches: 16 tokens per tile at downsample 0.5, 64 at 1.0;
  a 2-layer ViT of width 64; a 6-layer Qwen2 LLM of width 128) and the projector / LVTC / RVTC settings.
- `build_checkpoint`: a freshly initialised model saved with its processor (the byte-level Qwen2 tokenizer of the
  converted test fixture, 812 ids) and remote code, i.e. a folder `internvlx train` accepts.
- `make_datasets`: the training set (basic tasks + a small, repeated fine-detail set; empty system blocks, or for the
  demo model empty and default ones, `DataSpec.system_prompts`) and a held-out set.
- `make_video_datasets`: the demo model's video stage (`VideoSpec`): the image training set plus clips of the
  ``first-colour`` task (InternVL video rows over frame folders), and a held-out set of clips.
- `train_checkpoint`: `internvlx_hf.training.run` (HF `Trainer` + `InternVLXDataCollator`) with the recipe's
  hyper-parameters.
- `evaluate`: held-out exact match per task with greedy `generate` (left-padded batches), through
  `internvlx_hf.evaluation.evaluate` (what `internvlx eval` runs), under a chosen system block (`prompt_messages`,
  `template_default_system`).

Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import staged_folder
from ..training.synthetic_vqa import BASIC_TASKS, VIDEO_TASKS, combine_meta, generate_dataset
from .packaged import DEMO_MODEL_DIR

# The tokenizer source the recipe falls back to without the packaged demo model (the repository's test fixture).
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "internvl2_qwen2"

# Basic tasks as drawn for training: shape and count are the slowest to learn, so they are drawn twice as often.
TRAIN_TASKS = ("colour", "position", "shape", "shape", "count", "count")


@dataclass(frozen=True)
class TinySpec:
    """A tiny InternVL-X model and how its images are tiled."""

    projector: str = "mlp"  # "mlp" (InternVL2's) or "pvtc"
    downsample_ratio: float = 0.5  # 0.5: 16 tokens per 112 px tile ("256"); 1.0: 64 ("1024")
    lvtc_k: int | None = None  # LVTC expand layer: layers < k see 16 tokens per tile, layers >= k see 64
    lvtc_hr_scale: str = "none"  # LVTCConfig.hr_scale
    tile: int = 112
    patch: int = 14
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    pvtc_heads: int = 4
    init_std: float = 0.1  # larger than the usual 0.02: a from-scratch tiny model learns much faster with it
    tiling: str = "ratio"
    max_tiles: int = 6

    def describe(self) -> str:
        lvtc = f", LVTC k={self.lvtc_k}" if self.lvtc_k else ""
        lvtc += f" (hr_scale {self.lvtc_hr_scale})" if self.lvtc_k and self.lvtc_hr_scale != "none" else ""
        return (f"{self.projector}, downsample {self.downsample_ratio}{lvtc}, {self.tile}px tiles / {self.patch}px "
                f"patches, ViT {self.vision_layers}x{self.vision_hidden}, LLM {self.layers}x{self.hidden}, "
                f"tiling {self.tiling} (max {self.max_tiles})")


# The configurations of the issue, in the paper's naming (tokens per 448 px tile; ours are 16x smaller).
CONFIGS: dict[str, TinySpec] = {
    "plain-256": TinySpec(projector="mlp", downsample_ratio=0.5),
    "plain-1024": TinySpec(projector="mlp", downsample_ratio=1.0),
    "pvtc-256": TinySpec(projector="pvtc", downsample_ratio=0.5),
    "lvtc-256-1024": TinySpec(projector="mlp", downsample_ratio=0.5, lvtc_k=5),
    "pvtc+lvtc": TinySpec(projector="pvtc", downsample_ratio=0.5, lvtc_k=5),
}
# Variants the benchmark can also train (`--configs lvtc-k4`): LVTC expanding one layer earlier, or with the HR
# output rescaled.
EXTRA_CONFIGS: dict[str, TinySpec] = {
    "lvtc-k4": TinySpec(projector="mlp", downsample_ratio=0.5, lvtc_k=4),
    # LVTCConfig.hr_scale="rms": the HR projector's output enters at the upsampled LR state's scale.
    "lvtc-rms": TinySpec(projector="mlp", downsample_ratio=0.5, lvtc_k=5, lvtc_hr_scale="rms"),
}


@dataclass(frozen=True)
class DataSpec:
    """The synthetic data: ``n_basic`` basic samples, ``n_fine`` fine-detail samples repeated ``fine_repeat``
    times (a small set: a model that cannot read the letters memorises it instead of generalising), ``n_test``
    held-out samples of every task.

    ``detail_task``: the task of the small repeated set and of the held-out set's fifth share: ``"fine"`` (the letter
    in the red box) or ``"text"`` (a word of small letters, `internvlx_hf.training.synthetic_vqa`). The held-out sets of
    both share their basic samples (a sample depends on its index and task only)."""

    sizes: str = "fixed"
    n_basic: int = 3600
    n_fine: int = 200
    fine_repeat: int = 9
    n_test: int = 1000
    seed: int = 0
    fine_grid: int = 8
    fine_glyphs: int = 8
    # "empty": every training conversation has an empty system block (the learnability benchmark). "empty+default":
    # each has, drawn from its seed, an empty system block or no system turn, which the chat template renders as its
    # default system message: what clients that send no system turn render (the demo model).
    system_prompts: str = "empty"
    detail_task: str = "fine"


DETAIL_TASKS = ("fine", "text")
SYSTEM_PROMPTS: dict[str, str | list[str | None]] = {"empty": "", "empty+default": ["", None]}


@dataclass(frozen=True)
class VideoSpec:
    """The demo model's video stage: the trained image model fine-tuned for ``steps`` more steps on its image training
    set joined with ``n_train`` clips of ``frames`` frames (the ``first-colour`` task, "Which colour appears first?"),
    so that it learns the video task without forgetting the image ones; scored on ``n_test`` held-out clips."""

    frames: int = 4
    n_train: int = 2000
    n_test: int = 200
    steps: int = 500
    learning_rate: float = 5e-4


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup: float = 0.05
    seed: int = 0


def load_tokenizer_processor(source: str | os.PathLike | None = None):
    """The processor whose tokenizer and chat template the tiny models use.

    ``source``: a folder with an internvlx-hf processor; default: the packaged demo model, or else the converted
    test fixture ``tests/fixtures/internvl2_qwen2`` (Qwen2 byte-level BPE, 812 ids, Hermes-2 template).
    """
    from ..processing import InternVLXProcessor

    if source is None:
        if (DEMO_MODEL_DIR / "processor_config.json").is_file():
            source = DEMO_MODEL_DIR
        elif FIXTURE_TOKENIZER.is_dir():
            from ..conversion import convert

            tmp = Path(tempfile.mkdtemp(prefix="internvlx-tok-"))
            convert(FIXTURE_TOKENIZER, tmp / "converted", progress=False)
            source = tmp / "converted"
        else:
            raise FileNotFoundError(f"no tokenizer source: neither {DEMO_MODEL_DIR} nor {FIXTURE_TOKENIZER} exists; "
                                    "pass a folder with an internvlx-hf processor")
    if not (Path(source) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source}: no tokenizer.json; pass a folder made by `internvlx convert` or "
                                "`internvlx train`")
    return InternVLXProcessor.from_pretrained(str(source), trust_remote_code=True)


def build_processor(spec: TinySpec, base):
    """A processor for ``spec``: ``base``'s tokenizer and chat template, tiles of ``spec.tile`` pixels."""
    from ..processing import InternVLXImageProcessor, InternVLXProcessor

    image_processor = InternVLXImageProcessor(image_size=spec.tile, max_tiles=spec.max_tiles, tiling=spec.tiling)
    seq = round((spec.tile // spec.patch * spec.downsample_ratio) ** 2)
    return InternVLXProcessor(image_processor=image_processor, tokenizer=base.tokenizer,
                              chat_template=base.chat_template, image_seq_length=seq)


def build_model(spec: TinySpec, processor, seed: int = 0):
    """A freshly initialised model for ``spec`` with ``processor``'s vocabulary (seeded)."""
    import torch

    from .. import InternVLXConfig, InternVLXForConditionalGeneration

    tokenizer = processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(model_type="qwen2", hidden_size=spec.hidden, intermediate_size=2 * spec.hidden,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                vocab_size=len(tokenizer), max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, eos_token_id=im_end, tie_word_embeddings=True, initializer_range=spec.init_std)
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.tile,
                  patch_size=spec.patch, initializer_range=spec.init_std)
    lvtc = dict(expand_layer=spec.lvtc_k, num_lr_projectors=1, hr_scale=spec.lvtc_hr_scale) if spec.lvtc_k else None
    config = InternVLXConfig(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
                             projector_type=spec.projector, pvtc_num_heads=spec.pvtc_heads, lvtc=lvtc,
                             downsample_ratio=spec.downsample_ratio, template="Hermes-2")
    if config.image_seq_length != processor.image_seq_length:
        raise ValueError(f"processor has {processor.image_seq_length} tokens per tile, the model "
                         f"{config.image_seq_length}; build the processor with build_processor(spec, ...)")
    torch.manual_seed(seed)
    model = InternVLXForConditionalGeneration(config)
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_checkpoint(folder: str | os.PathLike, spec: TinySpec, base_processor, seed: int = 0) -> Path:
    """Save a fresh model for ``spec`` and its processor into ``folder`` (a checkpoint `train` accepts)."""
    folder = Path(folder)
    processor = build_processor(spec, base_processor)
    model = build_model(spec, processor, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_datasets(root: str | os.PathLike, spec: TinySpec, data: DataSpec) -> tuple[Path, Path]:
    """Write the training set (meta JSON joining the basic and the repeated fine set) and the held-out set under
    ``root``; returns ``(train meta path, test meta path)``. Sets that already exist are reused."""
    root = Path(root)
    if data.system_prompts not in SYSTEM_PROMPTS:
        raise ValueError(f"DataSpec.system_prompts={data.system_prompts!r} is not one of {list(SYSTEM_PROMPTS)}")
    if data.detail_task not in DETAIL_TASKS:
        raise ValueError(f"DataSpec.detail_task={data.detail_task!r} is not one of {list(DETAIL_TASKS)}")
    common = dict(sizes=data.sizes, image_size=spec.tile, fine_grid=data.fine_grid, fine_glyphs=data.fine_glyphs)

    def make(name, system_message="", **kwargs):
        folder = root / name
        if (folder / "meta.json").is_file():
            return folder / "meta.json"
        return generate_dataset(folder, name=name, system_message=system_message, **common, **kwargs)

    tag = f"{data.sizes}-{spec.tile}"
    # Sets that differ from the recipe's defaults get their own names, so that a shared workdir never mixes them.
    defaults = DataSpec()
    fine_tag = "" if (data.n_fine, data.fine_repeat) == (defaults.n_fine, defaults.fine_repeat) \
        else f"-{data.n_fine}x{data.fine_repeat}"
    basic_tag = "" if data.n_basic == defaults.n_basic else f"-{data.n_basic}"
    test_tag = "" if data.n_test == defaults.n_test else f"-{data.n_test}"
    system_tag = "" if data.system_prompts == defaults.system_prompts else f"-sys-{data.system_prompts}"
    system = SYSTEM_PROMPTS[data.system_prompts]
    detail = data.detail_task
    basic = make(f"basic-{tag}-s{data.seed}{basic_tag}{system_tag}", n=data.n_basic, tasks=TRAIN_TASKS,
                 seed=1000 + data.seed, system_message=system)
    fine = make(f"{detail}-{tag}-s{data.seed}{fine_tag}{system_tag}", n=data.n_fine, tasks=[detail],
                seed=5000 + data.seed, repeat_time=data.fine_repeat, system_message=system)
    # The held-out set is the same for every recipe; `evaluate(system=...)` chooses the prompt it is asked with.
    # With the text task in the fine task's place its basic samples are the same ones (same seed, same indices).
    detail_tag = "" if detail == "fine" else f"-{detail}"
    test = make(f"test{detail_tag}-{tag}{test_tag}", n=data.n_test, tasks=BASIC_TASKS + (detail,), seed=999_999)
    train_meta = root / f"train{detail_tag}-{tag}-s{data.seed}{basic_tag}{fine_tag}{system_tag}.json"
    if not train_meta.is_file():
        combine_meta([basic, fine], train_meta)
    return train_meta, test


def make_video_datasets(root: str | os.PathLike, spec: TinySpec, data: DataSpec, video: VideoSpec
                        ) -> tuple[Path, Path]:
    """Write the video stage's training meta (the image training set of `make_datasets` plus the training clips) and
    the held-out clips under ``root``; returns ``(train meta path, test meta path)``. Sets that exist are reused."""
    root = Path(root)
    image_meta, _ = make_datasets(root, spec, data)
    tag = f"{spec.tile}-f{video.frames}"
    system_tag = "" if data.system_prompts == DataSpec().system_prompts else f"-sys-{data.system_prompts}"

    def make(name, n, seed, system_message=""):
        folder = root / name
        if (folder / "meta.json").is_file():
            return folder / "meta.json"
        return generate_dataset(folder, name=name, n=n, tasks=VIDEO_TASKS, seed=seed, image_size=spec.tile,
                                video_frames=video.frames, system_message=system_message)

    clips = make(f"video-{tag}-s{data.seed}-{video.n_train}{system_tag}", video.n_train, 7000 + data.seed,
                 SYSTEM_PROMPTS[data.system_prompts])
    test = make(f"video-test-{tag}-{video.n_test}", video.n_test, 999_998)
    train_meta = root / f"{image_meta.stem}+video-{tag}-{video.n_train}.json"
    if not train_meta.is_file():
        combine_meta([image_meta, clips], train_meta)
    return train_meta, test


def train_checkpoint(base: str | os.PathLike, train_meta: str | os.PathLike, out: str | os.PathLike,
                     training: TrainSpec, *, tiling: str | None = None, progress: bool = True,
                     threads: int | None = None, preset: str = "full", callbacks: list | None = None,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``base`` on ``train_meta`` with `internvlx_hf.training.run` (``preset``; ``full``: everything trains,
    the model starts from scratch; ``callbacks``: extra Trainer callbacks; ``options``: more `internvlx train`
    options, e.g. ``teacher`` for distillation) and save it to ``out``. Returns the
    Trainer's metrics plus ``loss_first`` / ``loss_last`` (mean logged loss of the first / last logging window) and
    the `TrainResult` as ``result``."""
    import torch

    from ..training import parse_train_args, train

    if threads:
        torch.set_num_threads(threads)
    log_every = max(1, min(50, training.steps // 10))
    settings = dict(model=str(base), data=str(train_meta), preset=preset, output_dir=str(out),
                    per_device_train_batch_size=training.batch_size, learning_rate=training.learning_rate,
                    max_steps=training.steps, lr_scheduler_type="cosine", warmup_steps=training.warmup,
                    adam_beta2=0.98, weight_decay=0.0, max_grad_norm=1.0, seed=training.seed, data_seed=training.seed,
                    logging_steps=log_every, save_strategy="no", report_to="none", use_cpu=True,
                    dataloader_num_workers=0, disable_tqdm=not progress)
    if tiling:
        settings["tiling"] = tiling
    if threads:
        settings["threads"] = threads  # train() would otherwise choose from the machine's load
    result = train(*parse_train_args({**settings, **(options or {})}), callbacks=callbacks, print_fn=None)
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    metrics = dict(result.metrics)
    metrics["loss_first"] = losses[0] if losses else None
    metrics["loss_last"] = losses[-1] if losses else None
    metrics["result"] = result
    return metrics


def read_records(meta_path: str | os.PathLike) -> tuple[list[dict[str, Any]], Path]:
    """The JSONL records and image root of a one-dataset meta file written by `generate_dataset`."""
    (entry,) = json.loads(Path(meta_path).read_text(encoding="utf-8")).values()
    lines = Path(entry["annotation"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], Path(entry["root"])


def prompt_messages(question: str, system: str | None = "", tag: str = "<image>") -> list[dict[str, str]]:
    """The conversation the models are trained on (one image, then the question), without the reply.

    ``system``: the system block ("" = empty, as every model of the recipe was trained on); None sends no system turn,
    which the chat template renders as its default system message (what the demo model was also trained on).
    ``tag``: ``"<video>"`` asks about a clip instead (the processor writes its frame lines).
    """
    turns = [] if system is None else [{"role": "system", "content": system}]
    return turns + [{"role": "user", "content": f"{tag}\n" + question}]


def template_default_system(processor) -> str:
    """The system message ``processor``'s chat template writes when the conversation has no system turn."""
    probe = [{"role": "user", "content": "x"}]
    marker = "\x00SYSTEM\x00"
    without = processor.apply_chat_template(probe, tokenize=False)
    marked = processor.apply_chat_template([{"role": "system", "content": marker}] + probe, tokenize=False)
    head, _, tail = marked.partition(marker)
    if not (without.startswith(head) and without.endswith(tail)):
        raise ValueError("the chat template renders no system block in the same place with and without a system turn")
    return without[len(head): len(without) - len(tail)]


def evaluate(model, processor, test_meta: str | os.PathLike, *, batch_size: int = 50, limit: int | None = None,
             tasks: Collection[str] | None = None, progress: bool = True, system: str | None = "",
             max_new_tokens: int = 8) -> dict[str, Any]:
    """Held-out exact-match accuracy per task (greedy decoding), mean tiles and visual tokens per sample: the
    learnability benchmark's numbers, scored by `internvlx_hf.evaluation.evaluate` (what `internvlx eval` runs) in
    left-padded batches of ``batch_size`` in file order, split by the rows' ``task``.

    ``limit``: the first samples only; ``tasks``: of those, the samples of these tasks only (the same samples
    that a run without ``tasks`` scores for them); ``system``: the system block every question is asked with (see
    `prompt_messages`); ``max_new_tokens``: the longest answer generated. ``answers`` holds every task's
    ``(prediction, reference)`` pairs in file order.
    """
    from ..evaluation import evaluate as score
    from ..evaluation import read_eval_data

    start = time.perf_counter()
    sets = read_eval_data(str(test_meta), processor, metric="exact_match", limit=limit, system=system,
                          group_by="task")
    if tasks is not None and not any(sample.group in tasks for s in sets for sample in s.samples):
        raise ValueError(f"tasks={sorted(tasks)}: no such sample in {test_meta}")
    model.eval()  # and so it stays, as the benchmark's models after scoring always did
    run = score(model, processor, sets, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                group_by="task", groups=tasks)
    predictions = [p for result in run.datasets for p in result.predictions]
    accuracy = {result.name: result.accuracy for result in run.datasets}
    basic = [accuracy[t] for t in BASIC_TASKS if t in accuracy]
    return {"accuracy": accuracy, "basic_min": min(basic) if basic else None, "n": len(predictions),
            "tiles_per_sample": sum(p.tiles for p in predictions) / len(predictions),
            "visual_tokens_per_sample": sum(p.visual_tokens for p in predictions) / len(predictions),
            "answers": {result.name: [(p.prediction, p.reference) for p in result.predictions]
                        for result in run.datasets},
            "eval_s": time.perf_counter() - start}


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a saved checkpoint folder to ``dst`` (replaced) through a temporary folder (never half-written)."""
    src, dst = Path(src), Path(dst)
    with staged_folder(dst) as tmp:
        for entry in sorted(src.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                shutil.copy2(entry, tmp / entry.name)
                os.chmod(tmp / entry.name, 0o644)  # a packaged folder must be readable by everyone
    return dst
