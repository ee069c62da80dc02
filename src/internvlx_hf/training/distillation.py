"""Knowledge distillation: a converted checkpoint (the student) learns its source's (the teacher's) next-token
distributions on the answer tokens, so that new modules (a PVTC projector, LVTC's projectors) recover without labels.

    from internvlx_hf.training import InternVLXDistillationTrainer, DistillationCollator, teacher_answers

Three pieces, each usable on its own (`internvlx train --teacher DIR` puts them together):

- `teacher_answers`: rows whose conversation ends with a question get the teacher's greedy answer (``"missing"``),
  or every row's last answer is replaced by the teacher's (``"all"``: no label of the data is used). Rows with their
  own answer keep it otherwise: the teacher's distribution over that answer is then the target, not the answer.
  The answers are written once (JSONL files beside a meta JSON, read again by a resumed run).
- `DistillationCollator`: each row collated twice, for the student and for the teacher, each with its own
  processor: teacher and student may lay out the visual tokens differently (a plain-256 or plain-1024 teacher, a
  PVTC or LVTC student); they are aligned on the answer tokens, which a row has the same in both (a row where they
  differ, e.g. cut by ``max_length`` in one of them only, is dropped with a warning).
- `InternVLXDistillationTrainer`: `InternVLXTrainer` whose loss is the generalized Jensen-Shannon divergence of
  TRL's GKD / DistillationTrainer (``beta`` 0: forward KL(teacher || student), the default; 1: reverse KL;
  between: the JSD of the mixture) between the teacher's and the student's next-token distributions at every
  labelled position, at ``temperature``. Both LM heads run on the labelled positions only (the model's
  ``skip_logits`` path with a ``linear_cross_entropy`` that computes the divergence): the teacher in eval mode under
  ``torch.no_grad()``, optionally 8-bit or 4-bit (bitsandbytes), the student as in supervised training (its loss
  is divided by the Trainer's token count; ``loss_reduction`` sample / square weigh the tokens alike).

Why not TRL's `DistillationTrainer` (TRL 1.16): it feeds the teacher the student's ``input_ids`` (one processing
class for both) and the student's completions generated on-policy every step; a plain-1024 teacher needs four times
the student's `<IMG_CONTEXT>` tokens per tile, and the student's image inputs (``num_patches``, ``image_flags``)
are InternVL-X's own.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_file
from ..data.encoding import EncodedConversation
from ..data.formats import SampleError
from ..data.sources import DataSource, as_sources, parse_row, source_rows
from ..hub.upload import TEACHER_ANSWERS
from .collator import InternVLXDataCollator
from .trainer import InternVLXTrainer

logger = logging.getLogger(__name__)

#: Batch keys of the teacher's inputs (`DistillationCollator`): ``teacher_input_ids``, ``teacher_labels``, ...
TEACHER_PREFIX = "teacher_"
#: The folder of OUTPUT_DIR that `internvlx train --teacher` writes the teacher's answers to (`internvlx push`
#: leaves it out).
TEACHER_ANSWERS_DIR = TEACHER_ANSWERS
TEACHER_ANSWER_MODES = ("missing", "all")


# ----------------------------------------------------------------------------------------------------- the loss


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence ``(n,)`` between the next-token distributions of ``(n, vocab)`` logits, as TRL's
    ``generalized_jsd_loss``: ``beta`` 0 is KL(teacher || student), 1 is KL(student || teacher), in between the
    generalized JSD with the mixture ``beta * teacher + (1 - beta) * student``; both at ``temperature``."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
    return beta * (teacher.exp() * (teacher - mixture)).sum(-1) \
        + (1 - beta) * (student.exp() * (student - mixture)).sum(-1)


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """An LM head weight as a plain tensor (FSDP2 / tensor parallelism hold it as a sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def labelled_logits(model, inputs: dict[str, Any]) -> torch.Tensor:
    """``model``'s logits ``(n, vocab)`` at the positions whose next-token label (``inputs["labels"]``) is not -100,
    row after row: its own forward with the LM head on those positions only (``skip_logits``), the logits kept."""
    kept: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        kept.append(F.linear(hidden, _full_weight(weight).to(hidden.dtype)))
        return hidden.new_zeros(targets.shape, dtype=torch.float32)

    if inputs.get("labels") is None:
        raise ValueError("labelled_logits needs labels: the positions whose logits are kept")
    model(**inputs, skip_logits=True, linear_cross_entropy=keep)
    return kept[0]


def _divergence(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, teacher_logits: torch.Tensor,
                beta: float, temperature: float) -> torch.Tensor:
    """The student's ``linear_cross_entropy``: the per-token divergence from the teacher at the labelled rows."""
    if hidden.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"the student has {hidden.shape[0]} labelled positions in this batch and the teacher "
                         f"{teacher_logits.shape[0]}; collate the batch with DistillationCollator, which aligns them "
                         "on the answer tokens")
    student_logits = F.linear(hidden, _full_weight(weight).to(hidden.dtype))
    return generalized_jsd(student_logits, teacher_logits.to(student_logits.device), beta, temperature)


# ----------------------------------------------------------------------------------------------- the collator


def answer_tokens(encoded: EncodedConversation) -> list[int]:
    """The labelled token ids of an encoded row, in order: what teacher and student are aligned on."""
    return [encoded.labels[position] for position in encoded.label_positions]


class DistillationCollator:
    """Collates every row for the student (``student``, its processor) and for the teacher (``teacher``, its
    processor): the student's batch as `InternVLXDataCollator` gives it, plus the teacher's under ``teacher_*`` keys
    (``teacher_input_ids``, ``teacher_labels``, ``teacher_pixel_values``, ...).

    The two sequences of a row differ where the models lay out visual tokens differently (tokens per tile, tiles)
    and agree on the text, so their labelled tokens line up one to one. A row whose labelled tokens differ (a
    ``max_length`` cut that only the longer layout reaches, or tokenizers that disagree) is dropped with a warning
    and counted in ``skipped``, as are rows either collator drops.
    """

    def __init__(self, student: InternVLXDataCollator, teacher: InternVLXDataCollator):
        if teacher.loss_reduction != "token":
            raise ValueError("the teacher's collator weighs no tokens: build it with loss_reduction='token'")
        if teacher.packing != student.packing:
            raise ValueError("the teacher's and the student's collators must both pack, or both pad")
        self.student = student
        self.teacher = teacher
        self.mismatched = 0

    @property
    def skipped(self) -> Counter:
        skipped = self.student.skipped + self.teacher.skipped
        if self.mismatched:
            skipped["answer tokens differ between teacher and student"] += self.mismatched
        return skipped

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = []
        for index, row in enumerate(rows):
            student = self.student.encode_row(row, index)
            teacher = self.teacher.encode_row(row, index) if student is not None else None
            if student is None or teacher is None:
                continue
            if answer_tokens(student[0]) != answer_tokens(teacher[0]):
                self.mismatched += 1
                source = row.get("source") if isinstance(row, Mapping) else None
                logger.warning("dropping %s: its answer tokens differ between the teacher (%d) and the student (%d): "
                               "a max_length cut in the longer layout, or different tokenizers (%d dropped so far)",
                               source or f"batch row {index}", len(answer_tokens(teacher[0])),
                               len(answer_tokens(student[0])), self.mismatched)
                continue
            pairs.append((student, teacher))
        if not pairs:
            raise ValueError(f"every row of this batch of {len(rows)} was dropped ({dict(self.skipped)}); check the "
                             "warnings above")
        batch = self.student.collate([student for student, _ in pairs])
        teacher = self.teacher.collate([teacher for _, teacher in pairs])
        batch.update({TEACHER_PREFIX + key: value for key, value in teacher.items() if key != "use_cache"})
        return batch


def split_teacher_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the student's inputs, the teacher's inputs without their prefix) of a `DistillationCollator` batch."""
    student = {key: value for key, value in inputs.items() if not key.startswith(TEACHER_PREFIX)}
    teacher = {key[len(TEACHER_PREFIX):]: value for key, value in inputs.items() if key.startswith(TEACHER_PREFIX)}
    if teacher.get("labels") is None:
        raise ValueError("a distillation batch needs the teacher's inputs (teacher_input_ids, teacher_labels, ...): "
                         "collate it with DistillationCollator(student_collator, teacher_collator)")
    if student.get("labels") is None:
        raise ValueError("a distillation batch needs labels: the answer tokens the student learns the teacher's "
                         "distributions on")
    return student, teacher


# ------------------------------------------------------------------------------------------------ the trainer


class InternVLXDistillationTrainer(InternVLXTrainer):
    """`InternVLXTrainer` that trains the model (the student) to match ``teacher_model``'s next-token distributions
    on the labelled (answer) tokens of `DistillationCollator` batches; the labels only say where.

    Args:
        teacher_model: an `InternVLXForConditionalGeneration` with the student's vocabulary (e.g. the checkpoint the
            student was converted from, or a fine-tuned one). It is put in eval mode, its parameters frozen, and
            moved to the training device unless it is quantized or placed with a device map.
        beta: 0 (default) forward KL(teacher || student), 1 reverse KL, in between the generalized JSD (TRL's
            ``beta``).
        temperature: both distributions are taken at this temperature (1: as the models predict).
        Everything else: as `InternVLXTrainer` (``lm_head_loss`` must stay ``"labelled"``).

    The logged ``loss`` is the divergence (per answer token, as the supervised loss is per token). Evaluation gives
    the same divergence as ``eval_loss``; a prediction step that returns logits (``prediction_loss_only=False``)
    runs the student once more without labels for them.
    """

    def __init__(self, *args, teacher_model, beta: float = 0.0, temperature: float = 1.0, **kwargs):
        if kwargs.get("lm_head_loss", "labelled") != "labelled":
            raise ValueError(f"lm_head_loss={kwargs['lm_head_loss']!r}: distillation computes its own loss from the "
                             "logits of the labelled positions; leave lm_head_loss='labelled'")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {beta!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        collator = kwargs.get("data_collator")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(collator, DistillationCollator) and training_args is not None:
            training_args.remove_unused_columns = False  # the collators read messages / images
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError("distillation's loss is the divergence from the teacher; it does not combine with "
                             "label_smoothing_factor or compute_loss_func")
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # the divergence reads lm_head.weight, which ZeRO-3 partitions
            raise ValueError("distillation does not combine with DeepSpeed ZeRO-3 (its partitioned LM head weight); "
                             "use ZeRO-1/2, FSDP or DDP")
        student = self.accelerator.unwrap_model(self.model)
        student_vocab = student.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if student_vocab != teacher_vocab:
            raise ValueError(f"the teacher's vocabulary ({teacher_vocab:,}) differs from the student's "
                             f"({student_vocab:,}): distillation compares their distributions token by token, so "
                             "the teacher must be the student's source (or share its tokenizer)")
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        placed = getattr(teacher_model, "hf_device_map", None) is not None \
            or getattr(teacher_model, "is_quantized", False)
        if not placed:
            teacher_model.to(self.args.device)
        self.teacher = teacher_model
        self.beta = beta
        self.temperature = temperature

    def skips_logits(self, inputs, return_outputs: bool = False) -> bool:
        return inputs.get("labels") is not None  # the divergence needs the labelled positions' logits only

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student, teacher = split_teacher_inputs(inputs)
        self.teacher.eval()  # the Trainer puts models in train mode; not this one
        with torch.no_grad():
            teacher_logits = labelled_logits(self.teacher, teacher)
        # InternVLXTrainer's loss passes this to the model's forward as linear_cross_entropy (the labelled rows)
        self.linear_cross_entropy = functools.partial(_divergence, teacher_logits=teacher_logits, beta=self.beta,
                                                      temperature=self.temperature)
        try:
            loss, outputs = super().compute_loss(model, student, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        finally:
            self.linear_cross_entropy = None
        if return_outputs and self._prediction_loss_only is False:
            with torch.no_grad():  # the student's logits, for compute_metrics / predictions
                unlabelled = {k: v for k, v in student.items() if k not in ("labels", "loss_weight")}
                outputs = model(**{**unlabelled, "use_cache": False}, skip_logits=False)
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------------------ the teacher's answers


def _answered_row(row: dict[str, Any], answer: str, replace_last: bool) -> dict[str, Any]:
    """``row`` with ``answer`` as its last assistant turn (appended, or replacing the last one), in its own format."""
    row = dict(row)
    if "conversations" in row:
        turns = list(row["conversations"])
        if replace_last:
            turns = turns[:-1]
        row["conversations"] = turns + [{"from": "gpt", "value": answer}]
    else:
        messages = list(row["messages"])
        if replace_last:
            messages = messages[:-1]
        row["messages"] = messages + [{"role": "assistant", "content": answer}]
    return row


def _fingerprint(sources: list[DataSource], teacher: str, mode: str, max_new_tokens: int) -> dict[str, Any]:
    """What the answers written for ``sources`` depend on (a resumed run reuses them when it matches)."""
    files = []
    for source in sources:
        if source.annotation is None:
            return {}  # rows in memory: nothing to recognise them by
        stat = Path(source.annotation).stat()
        files.append([str(Path(source.annotation).resolve()), stat.st_size, stat.st_mtime_ns])
    return {"teacher": teacher, "mode": mode, "max_new_tokens": max_new_tokens, "files": files}


def teacher_answers(teacher, processor, data: Any, folder: str | os.PathLike | None = None, *,
                    mode: str = "missing", batch_size: int = 8, max_new_tokens: int = 256,
                    progress: bool = True) -> tuple[list[DataSource], dict[str, Any]]:
    """The rows of ``data`` with the teacher's greedy answers where ``mode`` asks for them.

    Args:
        teacher: the teacher model (any device / dtype; 8-bit / 4-bit too).
        processor: the teacher's `InternVLXProcessor` (its chat template renders the prompts, its tiling applies).
        data: what `InternVLXDataset` reads (meta JSON / JSONL paths, rows, a `datasets.Dataset`, `DataSource`s).
        folder: where the answered files go (``folder/meta.json`` and one JSONL per dataset); None keeps every
            dataset in memory. A folder that holds answers for the same files, teacher and settings is reused.
        mode: ``"missing"``: rows that end with a question (a user turn) get an answer, rows with an answer keep
            theirs; ``"all"``: every row's last turn is the teacher's answer (no label of the data is used).
        batch_size, max_new_tokens: of the greedy generation (stopped at the chat template's end of turn).

    Returns:
        (the datasets to train on, as `DataSource`s: repeat_time, max_dynamic_patch and image roots kept; a report:
        rows, rows answered, distinct prompts generated, seconds, whether the answers were reused).

    A row that cannot be read is written as it is (training skips it with its usual warning); prompts that are the
    same (text, images and tile budget) are answered once.
    """
    if mode not in TEACHER_ANSWER_MODES:
        raise ValueError(f"mode must be one of {list(TEACHER_ANSWER_MODES)}, got {mode!r}")
    sources = as_sources(data)
    folder = Path(folder) if folder is not None else None
    name = str(getattr(teacher.config, "name_or_path", "") or type(teacher).__name__)
    fingerprint = _fingerprint(sources, name, mode, max_new_tokens)
    record = folder / "teacher-answers.json" if folder is not None else None
    reused = _reused_answers(folder, record, fingerprint)
    if reused is not None:
        return reused
    start = time.perf_counter()
    plans, prompts = _plan_answers(sources, processor, mode)
    answers = _generate_answers(teacher, processor, prompts, batch_size, max_new_tokens, progress)
    out_sources, meta, answered = _answered_sources(plans, answers, folder)
    report = {"rows": sum(len(plan.rows) for plan in plans), "answered": answered, "generated": len(prompts),
              "mode": mode, "max_new_tokens": max_new_tokens, "seconds": round(time.perf_counter() - start, 1),
              "reused": False}
    # Without every dataset in files, the folder cannot stand for the data: nothing to reuse, so no meta or record.
    if folder is not None and len(meta) == len(plans):
        with atomic_file(folder / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if fingerprint:
            with atomic_file(record) as tmp:
                tmp.write_text(json.dumps({"fingerprint": fingerprint, "report": report}, indent=1) + "\n",
                               encoding="utf-8")
    return out_sources, report


def _reused_answers(folder: Path | None, record: Path | None,
                    fingerprint: dict[str, Any]) -> tuple[list[DataSource], dict[str, Any]] | None:
    """The answers an earlier run wrote to ``folder`` for the same inputs (a resumed run), else None."""
    if record is None or not fingerprint or not record.is_file():
        return None
    previous = json.loads(record.read_text(encoding="utf-8"))
    if previous.get("fingerprint") != fingerprint:
        return None
    from ..data.sources import read_meta

    return read_meta(folder / "meta.json"), {**previous["report"], "reused": True}


@dataclass
class _AnswerPlan:
    """One dataset's rows (raw JSON text or dicts) and which of them wait for the answer of which prompt."""

    source: DataSource
    rows: list[Any] = field(default_factory=list)
    waiting: list[tuple[int, int, bool]] = field(default_factory=list)  # (row position, prompt index, replace_last)


def _plan_answers(sources: list[DataSource], processor, mode: str) -> tuple[list[_AnswerPlan], list[Any]]:
    """(per dataset, its rows and the ones waiting for an answer; the distinct prompts to answer)."""
    from ..evaluation.data import _sample
    from ..processing.chat_templates import parse_chat_template

    template = processor.chat_template
    template = template.get("default") if isinstance(template, dict) else template
    keep_leading_reply = (parse_chat_template(template) or ("",))[0] == "internvl2_5"
    plans, prompts, keys = [], [], {}
    for source in sources:
        plan = _AnswerPlan(source)
        for where, raw in source_rows(source):
            try:
                row, sample = parse_row(source, where, raw, keep_leading_reply=keep_leading_reply)
            except SampleError:
                plan.rows.append(raw if isinstance(raw, str) else raw[1])  # training skips it, with its warning
                continue
            last = sample.messages[-1]["role"]
            if last == "assistant" and mode == "missing":
                plan.rows.append(raw if isinstance(raw, str) else row)
                continue
            replace_last = last == "assistant"
            # the prompt: the conversation before the answer (a placeholder reference keeps `_sample`'s checks)
            if not replace_last:
                sample.messages = sample.messages + [{"role": "assistant", "content": ""}]
            try:
                prompt = _sample(row, sample, processor, where)
            except ValueError as error:
                raise ValueError(f"the teacher cannot answer {error}") from None
            key = (prompt.prompt, tuple(str(image) for image in prompt.images), prompt.max_tiles,
                   prompt.video_frames)
            if key not in keys:
                keys[key] = len(prompts)
                prompts.append(prompt)
            plan.waiting.append((len(plan.rows), keys[key], replace_last))
            plan.rows.append(row)
        plans.append(plan)
    return plans, prompts


def _generate_answers(teacher, processor, prompts: list[Any], batch_size: int, max_new_tokens: int,
                      progress: bool) -> list[str]:
    """The teacher's greedy answer to each prompt, in order (the evaluation loop: batching, stop at end of turn)."""
    if not prompts:
        return []
    from ..evaluation import evaluate
    from ..evaluation.data import EvalSet

    run = evaluate(teacher, processor, [EvalSet("teacher answers", "exact_match", prompts)],
                   batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    return [p.prediction for result in run.datasets for p in result.predictions]


def _answered_sources(plans: list[_AnswerPlan], answers: list[str],
                      folder: Path | None) -> tuple[list[DataSource], dict[str, Any], int]:
    """(the datasets with their answers, as `DataSource`s; the meta entries of those written to ``folder``; the
    number of rows answered)."""
    answered = 0
    out_sources = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    meta = {}
    for index, plan in enumerate(plans):
        source, rows = plan.source, plan.rows
        for position, prompt_index, replace_last in plan.waiting:
            rows[position] = _answered_row(rows[position], answers[prompt_index], replace_last)
            answered += 1
        if folder is None or source.annotation is None:  # rows in memory (images may be decoded) stay there
            out_sources.append(replace(source, rows=[json.loads(r) if isinstance(r, str) else r for r in rows],
                                       annotation=None))
            continue
        path = folder / f"{index:03d}-{_safe(source.name)}.jsonl"
        _write_rows(path, rows)
        out_sources.append(replace(source, annotation=path, rows=None))
        meta[source.name] = _meta_entry(source, path)
    return out_sources, meta, answered


def _write_rows(path: Path, rows: list[Any]) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write((row.rstrip("\n") if isinstance(row, str) else json.dumps(row, default=str)) + "\n")


def _meta_entry(source: DataSource, path: Path) -> dict[str, Any]:
    """``source``'s entry of an InternVL meta JSON, its annotation now ``path`` (beside the meta file)."""
    entry = {"annotation": path.name, "repeat_time": source.repeat_time}
    if source.root is not None:
        entry["root"] = str(Path(source.root).resolve())
    if source.max_dynamic_patch is not None:
        entry["max_dynamic_patch"] = source.max_dynamic_patch
    if source.video_sampling is not None:
        entry.update(min_num_frame=source.video_sampling.min_frames,
                     max_num_frame=source.video_sampling.max_frames,
                     sampling_method=source.video_sampling.method)
    return entry


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "data"


__all__ = ["TEACHER_ANSWERS_DIR", "TEACHER_ANSWER_MODES", "TEACHER_PREFIX", "DistillationCollator",
           "InternVLXDistillationTrainer", "answer_tokens", "generalized_jsd", "labelled_logits",
           "split_teacher_inputs", "teacher_answers"]
