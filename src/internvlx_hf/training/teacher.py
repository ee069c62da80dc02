"""``--teacher``: the teacher model of a distillation run loaded beside the student (optionally in 4/8 bits), its
answers written once by the main process (``--teacher_answers``), and what the provenance records of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainingArguments


from .arguments import check_model_folder, DataArguments, ModelArguments


def describe_distillation(model_args: ModelArguments, answers: dict[str, Any]) -> dict[str, Any]:
    return {"teacher": str(Path(model_args.teacher).expanduser().resolve()), "teacher_bits": model_args.teacher_bits,
            "beta": model_args.distill_beta, "temperature": model_args.distill_temperature,
            "teacher_answers": answers}


def load_teacher(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                 processor, sources: list, out: Path, dtype: Any, is_main: bool, say: Callable[[str], None]):
    """(teacher model, its processor, the data with the teacher's answers where --teacher_answers asks, the answers'
    report) for ``--teacher``. The main process writes the answers (OUT/teacher-answers/); the others read them."""
    import torch

    from .. import InternVLXForConditionalGeneration, InternVLXProcessor
    from ..quantization import quantized_loading_kwargs

    if model_args.lm_head_loss != "labelled":
        raise ValueError(f"--lm_head_loss {model_args.lm_head_loss} does not combine with --teacher: distillation "
                         "computes its own loss from the logits of the answer tokens (leave --lm_head_loss labelled)")
    for name, least in (("teacher_max_new_tokens", 1), ("teacher_batch_size", 1)):
        if getattr(model_args, name) < least:
            raise ValueError(f"--{name} must be >= {least}, got {getattr(model_args, name)}")
    teacher_folder = check_model_folder(model_args.teacher, "--teacher")
    teacher_processor = InternVLXProcessor.from_pretrained(teacher_folder, trust_remote_code=True)
    # the teacher sees the images as the student does (the --tiling / --max_tiles overrides apply to both)
    teacher_processor.image_processor.tiling = processor.image_processor.tiling
    teacher_processor.image_processor.max_tiles = processor.image_processor.max_tiles
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if model_args.teacher_bits is not None:
        load_kwargs.update(quantized_loading_kwargs(teacher_folder, model_args.teacher_bits, dtype,
                                                    what="--teacher_bits"))
        load_kwargs["device_map"] = {"": training_args.device}
    teacher = InternVLXForConditionalGeneration.from_pretrained(teacher_folder, **load_kwargs)
    if model_args.teacher_bits is None:
        teacher.to(training_args.device)
    teacher.eval().requires_grad_(False)
    bits = f", {model_args.teacher_bits}-bit" if model_args.teacher_bits else ""
    say(f"Teacher: {teacher_folder} ({teacher.config.image_seq_length} visual tokens per tile{bits}); the student "
        f"learns its next-token distributions on the answer tokens (beta {model_args.distill_beta}, temperature "
        f"{model_args.distill_temperature})")
    from .distillation import TEACHER_ANSWERS_DIR, teacher_answers

    with training_args.main_process_first(local=False, desc="the teacher's answers"), torch.no_grad():
        answered, report = teacher_answers(
            teacher, teacher_processor, sources, out / TEACHER_ANSWERS_DIR, mode=model_args.teacher_answers,
            batch_size=model_args.teacher_batch_size, max_new_tokens=model_args.teacher_max_new_tokens,
            progress=is_main)
    what = "reused" if report["reused"] else f"written in {report['seconds']:.0f} s"
    say(f"Teacher's answers (--teacher_answers {model_args.teacher_answers}): {report['answered']:,} of "
        f"{report['rows']:,} rows ({report['generated']:,} distinct prompts), {what}"
        + (f", in {out / TEACHER_ANSWERS_DIR}" if any(s.annotation is not None for s in answered) else ""))
    return teacher, teacher_processor, answered, report
