"""Fine-tuning InternVL-X / InternVL2 checkpoints with the Hugging Face stack (Trainer, peft, TRL).

    from internvlx_hf.training import InternVLXDataCollator, InternVLXDataset, apply_preset

Modules: `collator` (padded or packed batches, per-token loss weights), `presets` (stage1 / stage2 /
stage2-frozen-vit / full / lora), `trainer` (`InternVLXTrainer`: weighted losses, length grouping, provenance),
`arguments` (the argument dataclasses and `parse_train_args`), `run` (`train()`, behind `internvlx train`), `output`
(OUT checked and written), `runtime` (threads, memory, the distributed set-up and teardown), `teacher` (`--teacher`'s
model and answers), `distillation` (a converted checkpoint trained against its source without labels:
`InternVLXDistillationTrainer`, `DistillationCollator`, `teacher_answers`), `linear_cross_entropy` (how the loss runs
the LM head: on the labelled positions only by default, or through cut-cross-entropy / Liger), `synthetic_vqa`
(`generate_dataset`: seeded synthetic visual QA in InternVL's format, the data of `internvlx demo` and
`benchmarks/bench_learnability.py`). The data itself (InternVL meta JSON / JSONL / TRL rows, encoding, the lazy
`InternVLXDataset`) is read by `internvlx_hf.data`, whose main names are exported here too.
"""

from .collator import InternVLXDataCollator
from .distillation import DistillationCollator, InternVLXDistillationTrainer, teacher_answers
from .linear_cross_entropy import LM_HEAD_LOSSES
from ..data import DataSummary, InternVLXDataset, read_meta
from ..data.encoding import IGNORE_INDEX, ConversationEncoder
from ..data.formats import Sample, SampleError, sample_from_row
from .presets import PRESETS, LoraSettings, apply_preset, format_trainable, lora_target_modules, trainable_parameters
from .synthetic_vqa import combine_meta, generate_dataset
from .arguments import DataArguments, ModelArguments, PresetArguments, parse_train_args
from .run import TrainResult, train
from .runtime import end_distributed
from .trainer import InternVLXTrainer, last_complete_checkpoint

__all__ = [
    "IGNORE_INDEX",
    "LM_HEAD_LOSSES",
    "PRESETS",
    "ConversationEncoder",
    "DataArguments",
    "DataSummary",
    "DistillationCollator",
    "InternVLXDataCollator",
    "InternVLXDataset",
    "InternVLXDistillationTrainer",
    "InternVLXTrainer",
    "LoraSettings",
    "ModelArguments",
    "PresetArguments",
    "Sample",
    "SampleError",
    "TrainResult",
    "apply_preset",
    "combine_meta",
    "end_distributed",
    "format_trainable",
    "generate_dataset",
    "last_complete_checkpoint",
    "lora_target_modules",
    "parse_train_args",
    "read_meta",
    "sample_from_row",
    "teacher_answers",
    "train",
    "trainable_parameters",
]
