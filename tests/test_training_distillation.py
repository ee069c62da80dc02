"""Distillation: a converted checkpoint (student) trained against its source (teacher) without labels: the teacher's
answers, the two token layouts aligned on the answer tokens, the divergence and its gradients, `internvlx train
--teacher`."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import training_helpers as th
from internvlx_hf.training import (
    IGNORE_INDEX,
    DistillationCollator,
    InternVLXDataCollator,
    InternVLXDistillationTrainer,
    parse_train_args,
    teacher_answers,
    train,
)
from internvlx_hf.training.distillation import generalized_jsd, labelled_logits, split_teacher_inputs

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _plain_1024(tmp_path):
    """A plain-1024 checkpoint: the converted fixture with a new projector at downsample 1.0 (4x the visual tokens
    per tile), as the compression study made its reference (experiments/lvtc-upgrade)."""
    from internvlx_hf import InternVLXForConditionalGeneration

    folder = tmp_path / "plain-1024"
    if (folder / "config.json").is_file():
        return folder
    model, processor = th.load(th.converted("internvl2_qwen2"))
    config = model.config
    config.downsample_ratio, config.image_seq_length = 1.0, config.image_seq_length * 4
    torch.manual_seed(0)
    wide = InternVLXForConditionalGeneration(config)
    state = {k: v for k, v in model.state_dict().items() if "multi_modal_projector" not in k}
    wide.load_state_dict(state, strict=False)
    processor.image_seq_length = config.image_seq_length
    wide.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _rows(folder, count=4, answers=True):
    rows = th.colour_rows(folder, count)
    for row in rows:
        row["image"] = str(folder / row["image"])
        if not answers:
            row["conversations"] = row["conversations"][:1]
    return rows


# ----------------------------------------------------------------------------------------------------- the loss


def test_the_divergence_is_trl_s_generalized_jsd():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    s, t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # KL(teacher || student)
    reverse = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), forward)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse)
    mixture = torch.log(0.5 * s.exp() + 0.5 * t.exp())
    jsd = 0.5 * F.kl_div(mixture, t, reduction="none", log_target=True).sum(-1) \
        + 0.5 * F.kl_div(mixture, s, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.5), jsd)
    torch.testing.assert_close(generalized_jsd(student / 2, teacher / 2), generalized_jsd(student, teacher,
                                                                                         temperature=2.0))
    assert float(generalized_jsd(teacher, teacher, beta=0.3).abs().max()) < 1e-6


# ----------------------------------------------------------------------------------------------- the collator


def test_teacher_and_student_layouts_align_on_the_answer_tokens(tmp_path):
    """A plain-1024 teacher sees 4x the student's `<IMG_CONTEXT>` tokens per tile; the answer tokens of every row
    are the same in both, in the same order."""
    _, student_processor = th.load(th.converted("internvl2_qwen2", projector="pvtc"))
    _, teacher_processor = th.load(_plain_1024(tmp_path))
    rows = _rows(tmp_path / "images")
    collator = DistillationCollator(InternVLXDataCollator(student_processor), InternVLXDataCollator(teacher_processor))
    batch = collator(rows)
    student, teacher = split_teacher_inputs(batch)
    image = student_processor.image_token_id
    assert (student["input_ids"] == image).sum(1).tolist() == [256] * 4
    assert (teacher["input_ids"] == image).sum(1).tolist() == [1024] * 4
    assert torch.equal(teacher["pixel_values"], student["pixel_values"])
    for row in range(4):
        ours = student["labels"][row][student["labels"][row] != IGNORE_INDEX]
        theirs = teacher["labels"][row][teacher["labels"][row] != IGNORE_INDEX]
        assert torch.equal(ours, theirs) and len(ours) > 2
    assert "teacher_use_cache" not in batch and not collator.skipped


def test_a_row_whose_answer_a_max_length_cut_reaches_in_one_layout_only_is_dropped(tmp_path, caplog):
    _, student_processor = th.load(th.converted("internvl2_qwen2"))
    _, teacher_processor = th.load(_plain_1024(tmp_path))
    rows = _rows(tmp_path / "images", 2)
    full = InternVLXDataCollator(student_processor)(rows[:1])
    # long enough for the student's whole row, shorter than the teacher's image block: the teacher's row keeps no
    # reply (its collator drops it), so the pair is dropped
    limit = full["input_ids"].shape[1]
    collator = DistillationCollator(InternVLXDataCollator(student_processor, max_length=limit),
                                    InternVLXDataCollator(teacher_processor, max_length=limit))
    with pytest.raises(ValueError, match="every row of this batch of 2 was dropped"):
        collator(rows)
    assert sum(collator.skipped.values()) == 2
    # a teacher layout that keeps the row but cuts its answer differently: the answers differ, the row is dropped
    teacher_full = InternVLXDataCollator(teacher_processor)(rows[:1])
    cut = teacher_full["input_ids"].shape[1] - 2  # the teacher's answer loses its last tokens
    collator = DistillationCollator(InternVLXDataCollator(student_processor, max_length=cut),
                                    InternVLXDataCollator(teacher_processor, max_length=cut))
    rows.append(_rows(tmp_path / "more", 1)[0])
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="dropped"):
        collator(rows[:1])
    assert collator.skipped["answer tokens differ between teacher and student"] == 1
    assert "its answer tokens differ between the teacher" in caplog.text


# ----------------------------------------------------------------------------------------------- the trainer


class _HeadRows(TorchFunctionMode):
    """(model, rows) of every product with an LM head weight (``heads``: id of the weight -> name)."""

    def __init__(self, heads):
        super().__init__()
        self.heads, self.calls = heads, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) > 1 and id(args[1]) in self.heads:
            self.calls.append((self.heads[id(args[1])], args[0].shape[:-1].numel()))
        return func(*args, **(kwargs or {}))


def _trainer(tmp_path, teacher_folder, student_options=None, **arguments):
    import datasets

    student, student_processor = th.load(th.converted("internvl2_qwen2", **(student_options or {})))
    teacher, teacher_processor = th.load(teacher_folder)
    args = th.training_args(tmp_path / "out", max_steps=2, optim="sgd", learning_rate=0.5,
                            per_device_train_batch_size=4, **arguments)
    collator = DistillationCollator(InternVLXDataCollator(student_processor), InternVLXDataCollator(teacher_processor))
    return InternVLXDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                        train_dataset=datasets.Dataset.from_list(_rows(tmp_path / "images")),
                                        data_collator=collator, processing_class=student_processor)


def test_the_loss_is_the_divergence_of_the_full_logits_and_so_are_its_gradients(tmp_path):
    """Both LM heads run on the answer rows only; the loss and the student's gradients are those of the full logits'
    KL(teacher || student) at the labelled positions, averaged over them."""
    trainer = _trainer(tmp_path, _plain_1024(tmp_path), {"projector": "pvtc"})
    student, teacher = trainer.model.eval(), trainer.teacher
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs, teacher_inputs = split_teacher_inputs(batch)

    with torch.no_grad():
        teacher_full = teacher(**{k: v for k, v in teacher_inputs.items() if k != "labels"}).logits
    mask_t = F.pad(teacher_inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX
    student.zero_grad(set_to_none=True)
    student_full = student(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    mask_s = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX
    expected = generalized_jsd(student_full[mask_s], teacher_full[mask_t]).mean()
    expected.backward()
    reference = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    heads = {id(teacher.lm_head.weight): "teacher", id(student.lm_head.weight): "student"}
    with _HeadRows(heads) as rows:
        student.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
    # each LM head ran once, on the labelled rows
    assert rows.calls == [("teacher", int(mask_t.sum())), ("student", int(mask_s.sum()))]
    assert int(mask_t.sum()) == int(mask_s.sum())
    torch.testing.assert_close(loss, expected)
    assert len(reference) > 10
    for name, gradient in reference.items():
        torch.testing.assert_close(student.get_parameter(name).grad, gradient, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in teacher.parameters())


def test_a_student_that_is_its_teacher_has_nothing_to_learn(tmp_path):
    trainer = _trainer(tmp_path, th.converted("internvl2_qwen2"))
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        assert abs(float(trainer.compute_loss(trainer.model, batch))) < 1e-6


def test_training_moves_the_student_and_never_the_teacher(tmp_path):
    trainer = _trainer(tmp_path, _plain_1024(tmp_path), {"projector": "pvtc"})
    teacher_before, student_before = th.snapshot(trainer.teacher), th.snapshot(trainer.model)
    trainer.train()
    assert not trainer.teacher.training and all(not p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in trainer.teacher.named_parameters())
    assert any(not torch.equal(p, student_before[n]) for n, p in trainer.model.named_parameters())
    assert len(th.losses(trainer)) == 2


def test_evaluation_reports_the_divergence_and_predictions_get_logits(tmp_path):
    trainer = _trainer(tmp_path, _plain_1024(tmp_path), {"projector": "pvtc"}, prediction_loss_only=False,
                       per_device_eval_batch_size=4)
    trainer.eval_dataset = trainer.train_dataset
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, dict(batch)))
    seen = {}

    def metrics(prediction):
        seen["shape"] = prediction.predictions[0].shape
        return {}

    trainer.compute_metrics = metrics
    result = trainer.evaluate()
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert seen["shape"][0] == 4 and seen["shape"][-1] == trainer.model.config.get_text_config().vocab_size


def test_what_distillation_refuses(tmp_path):
    from internvlx_hf import InternVLXForConditionalGeneration

    with pytest.raises(ValueError, match="leave lm_head_loss='labelled'"):
        InternVLXDistillationTrainer(model=None, teacher_model=None, lm_head_loss="full")
    with pytest.raises(ValueError, match="beta must lie in"):
        InternVLXDistillationTrainer(model=None, teacher_model=None, beta=2.0)
    model, processor = th.load(th.converted("internvl2_qwen2"))
    config = model.config
    config.get_text_config().vocab_size += 8
    other = InternVLXForConditionalGeneration(config)
    with pytest.raises(ValueError, match="the teacher's vocabulary \\(820\\) differs from the student's \\(812\\)"):
        InternVLXDistillationTrainer(model=th.load(th.converted("internvl2_qwen2"))[0], teacher_model=other,
                                     args=th.training_args(tmp_path / "out"))
    with pytest.raises(ValueError, match="collate it with DistillationCollator"):
        split_teacher_inputs(InternVLXDataCollator(processor)(_rows(tmp_path / "images", 1)))


def test_labelled_logits_are_the_full_logits_at_the_labelled_positions(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2", lvtc="k=1"))
    model.eval()
    batch = InternVLXDataCollator(processor)(_rows(tmp_path / "images", 2))
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        kept = labelled_logits(model, batch)
    mask = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(kept, full[mask])


# --------------------------------------------------------------------------------------------- the teacher's answers


def test_the_teacher_answers_the_rows_that_have_none(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = _rows(tmp_path / "images", 4, answers=False) + _rows(tmp_path / "more", 2)
    rows.append(dict(rows[0]))  # the same question twice: answered once
    data = th.write_jsonl(tmp_path / "data.jsonl", rows)
    meta = {"colours": {"annotation": str(data), "root": str(tmp_path), "repeat_time": 2, "max_dynamic_patch": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sources, report = teacher_answers(model, processor, str(tmp_path / "meta.json"), tmp_path / "answers",
                                      max_new_tokens=4, progress=False)
    assert report == {"rows": 7, "answered": 5, "generated": 4, "mode": "missing", "max_new_tokens": 4,
                      "seconds": report["seconds"], "reused": False}
    written = [json.loads(line) for line in sources[0].annotation.read_text().splitlines()]
    assert [len(row["conversations"]) for row in written] == [2] * 7
    assert written[4] == rows[4] and written[0]["conversations"][1] == written[6]["conversations"][1]
    assert (sources[0].repeat_time, sources[0].max_dynamic_patch) == (2.0, 1)
    saved = json.loads((tmp_path / "answers" / "meta.json").read_text())
    assert saved["colours"]["repeat_time"] == 2 and saved["colours"]["max_dynamic_patch"] == 1
    # the same request again: the answers are read back, not written anew
    again, report = teacher_answers(model, processor, str(tmp_path / "meta.json"), tmp_path / "answers",
                                    max_new_tokens=4, progress=False)
    assert report["reused"] and again[0].annotation == sources[0].annotation
    # "all": every row's last answer is the teacher's, the data's own answers are gone
    _, report = teacher_answers(model, processor, str(tmp_path / "meta.json"), tmp_path / "all", mode="all",
                                max_new_tokens=4, progress=False)
    assert report["answered"] == 7 and report["generated"] == 6
    greedy = json.loads((tmp_path / "all" / "000-colours.jsonl").read_text().splitlines()[4])
    assert greedy["conversations"][1]["value"] == written[0]["conversations"][1]["value"]  # same image colour...
    assert greedy["conversations"][1]["value"] != rows[4]["conversations"][1]["value"]  # ... not the label


def test_internvlx_train_with_a_teacher(tmp_path):
    """`internvlx train --teacher`: rows without answers get the teacher's, the student trains against the teacher
    (a plain-1024 teacher, a PVTC student), the run records it, a resumed run reuses the answers, and `internvlx
    push` leaves the answers home."""
    from internvlx_hf.hub.upload import plan_upload
    from internvlx_hf.provenance import read_provenance

    rows = _rows(tmp_path / "images", 6, answers=False) + _rows(tmp_path / "labelled", 2)
    data = th.write_jsonl(tmp_path / "data.jsonl", rows)
    options = dict(model=str(th.converted("internvl2_qwen2", projector="pvtc")), teacher=str(_plain_1024(tmp_path)),
                   data=str(data), preset="stage2", max_steps=2, save_steps=1, use_cpu=True, report_to="none",
                   disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                   teacher_max_new_tokens=6)
    printed = []
    result = train(*parse_train_args(options, output_dir=str(tmp_path / "out")), print_fn=printed.append)
    assert any("Teacher's answers (--teacher_answers missing): 6 of 8 rows (6 distinct prompts), written" in line
               for line in printed)
    assert isinstance(result.trainer, InternVLXDistillationTrainer) and len(th.losses(result.trainer)) == 2
    record = read_provenance(tmp_path / "out")["training"][-1]["distillation"]
    assert record["teacher"] == str(_plain_1024(tmp_path).resolve()) and record["beta"] == 0.0
    assert record["teacher_answers"]["answered"] == 6
    assert (tmp_path / "out" / "teacher-answers" / "meta.json").is_file()
    assert "teacher-answers/" in plan_upload(tmp_path / "out").left_out
    printed.clear()
    train(*parse_train_args(options, output_dir=str(tmp_path / "out"), max_steps=3,
                            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")), print_fn=printed.append)
    assert any("6 of 8 rows (6 distinct prompts), reused" in line for line in printed)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_an_8_bit_teacher(tmp_path):
    data = th.write_jsonl(tmp_path / "data.jsonl", _rows(tmp_path / "images", 4))
    result = train(*parse_train_args(dict(
        model=str(th.converted("internvl2_qwen2", projector="pvtc")), teacher=str(th.converted("internvl2_qwen2")),
        teacher_bits=8, data=str(data), preset="stage2", max_steps=1, use_cpu=True, report_to="none",
        disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", output_dir=str(tmp_path / "out"))), print_fn=None)
    teacher = result.trainer.teacher
    assert getattr(teacher, "is_loaded_in_8bit", False) and not teacher.training
    losses = th.losses(result.trainer)
    assert len(losses) == 1 and losses[0] > 0
