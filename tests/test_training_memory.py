"""Training memory: the LM head runs only on the labelled positions (``skip_logits``), with the loss and every
gradient of the full logits, in every layout; `InternVLXTrainer` opts in where nothing reads the logits; the fused
linear cross-entropies (cut-cross-entropy, Liger) give the same loss and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import training_helpers as th
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator, InternVLXTrainer
from internvlx_hf.training.linear_cross_entropy import LM_HEAD_LOSSES, cut_cross_entropy, resolve

HAS_CCE = importlib.util.find_spec("cut_cross_entropy") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _image_row(folder, colour="red"):
    th.draw(folder / f"{colour}.png", colour)
    return {"image": str(folder / f"{colour}.png"), "conversations": [
        {"from": "human", "value": "What colour is the square?"}, {"from": "gpt", "value": f"It is {colour}."}]}


def _text_row():
    return {"conversations": [{"from": "human", "value": "Say something long."},
                              {"from": "gpt", "value": "Here is a rather long answer with many words in it."}]}


def _multi_turn_row(folder):
    th.draw(folder / "blue.png", "blue")
    return {"image": str(folder / "blue.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And the background?"}, {"from": "gpt", "value": "It is white."}]}


def _video_row(folder):
    frames = folder / "frames"
    frames.mkdir()
    for index, colour in enumerate(["red", "green", "blue", "yellow"]):
        th.draw(frames / f"{index:03d}.png", colour)
    return {"video": str(frames), "conversations": [
        {"from": "human", "value": "<video>\nWhich colours appear?"},
        {"from": "gpt", "value": "Red, green, blue and yellow."}]}


# (checkpoint conversion options, rows, packing)
LAYOUTS = {
    "plain": ({}, ["image"], False),
    "pvtc": ({"projector": "pvtc"}, ["image"], False),
    "lvtc": ({"lvtc": "k=1"}, ["image"], False),
    "padded": ({}, ["image", "text", "multi-turn"], False),
    "lvtc-padded": ({"lvtc": "k=1"}, ["image", "text", "multi-turn"], False),
    "packed": ({}, ["image", "text", "multi-turn"], True),
    "lvtc-packed": ({"lvtc": "k=1"}, ["image", "text", "multi-turn"], True),
    "multi-turn": ({}, ["multi-turn"], False),
    "video": ({}, ["video"], False),
}


def _batch(processor, folder, kinds, packing):
    makers = {"image": lambda: _image_row(folder), "text": _text_row, "multi-turn": lambda: _multi_turn_row(folder),
              "video": lambda: _video_row(folder)}
    return InternVLXDataCollator(processor, packing=packing)([makers[kind]() for kind in kinds])


def _loss_and_gradients(model, batch, **options):
    """(outputs, {parameter: gradient}, rows the LM head ran on) of one forward + backward."""
    rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        model.zero_grad(set_to_none=True)
        outputs = model(**batch, **options)
        outputs.loss.backward()
    finally:
        hook.remove()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, gradients, sum(rows)


def _assert_same(full, lean):
    (full_out, full_grads, _), (lean_out, lean_grads, _) = full, lean
    torch.testing.assert_close(lean_out.loss, full_out.loss)
    assert lean_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, gradient in full_grads.items():
        torch.testing.assert_close(lean_grads[name], gradient, msg=lambda m, name=name: f"{name}: {m}")


def _labelled(labels):
    """Positions whose next-token label is not -100: the rows the lean LM head runs on."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_skip_logits_has_the_loss_and_gradients_of_the_full_logits(layout, tmp_path):
    options, kinds, packing = LAYOUTS[layout]
    model, processor = th.load(th.converted("internvl2_qwen2", **options))
    model.eval()  # no dropout / drop path: the two passes must see the same network
    # In float64: the two paths run the LM head's matmuls on different row counts (all positions or the labelled
    # ones), which BLAS may split differently across threads; in float32 that alone moved an LVTC projector's
    # gradient by 4e-6 relative with 2 threads (not with 1). The paths must agree in their arithmetic, not by luck
    # of the summation order (both still take the cross-entropy of float32 logits, as in training).
    model.double()
    batch = _batch(processor, tmp_path, kinds, packing)
    batch["pixel_values"] = batch["pixel_values"].double() if "pixel_values" in batch else None
    batch = {key: value for key, value in batch.items() if value is not None}
    if packing:
        assert batch["position_ids"].shape[0] == 1 and int((batch["position_ids"][0] == 0).sum()) == len(kinds)
    else:
        assert batch["input_ids"].shape[0] == len(kinds)
    if "image" in kinds or "video" in kinds:
        assert "pixel_values" in batch
    if "video" in kinds:
        assert batch["num_patches"].tolist() == [1, 1, 1, 1]  # one tile per frame
    labelled = _labelled(batch["labels"])
    assert 0 < labelled < batch["labels"].numel() // 3  # mostly unlabelled (image, prompt, template, padding)

    full = _loss_and_gradients(model, batch)
    lean = _loss_and_gradients(model, batch, skip_logits=True)
    _assert_same(full, lean)
    assert full[2] == batch["input_ids"].numel() and lean[2] == labelled
    outputs = lean[0]
    assert outputs.logits is None
    assert outputs.token_losses.shape == batch["labels"].shape
    assert int((outputs.token_losses != 0).sum()) == labelled
    torch.testing.assert_close(outputs.token_losses.sum() / labelled, outputs.loss)
    # the per-token losses are the full logits' cross-entropies at the same positions
    with torch.no_grad():
        logits = model(**batch).logits.float()
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none").view(logits.shape[0], -1)
    torch.testing.assert_close(outputs.token_losses[:, :-1].detach(), expected)


def test_skip_logits_with_shift_labels_and_num_items_in_batch(tmp_path):
    """Pre-shifted labels (as TRL passes them under context parallelism) and the Trainer's ``num_items_in_batch``
    (the loss is a sum over the whole accumulated step divided by it) on a packed row."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model.eval()
    batch = _batch(processor, tmp_path, ["image", "text", "multi-turn"], True)
    shift_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    options = {"shift_labels": shift_labels, "num_items_in_batch": torch.tensor(37)}
    full = _loss_and_gradients(model, batch, **options)
    lean = _loss_and_gradients(model, batch, skip_logits=True, **options)
    _assert_same(full, lean)
    assert lean[2] == _labelled(batch["labels"])
    torch.testing.assert_close(lean[0].loss, lean[0].token_losses.sum() / 37)


def test_placeholder_labels_are_ignored_without_logits_too(tmp_path):
    """``labels=input_ids`` (TRL's default collator labels every token): `<img>`, `<IMG_CONTEXT>` and `</img>` are
    never targets, with or without logits."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model.eval()
    batch = _batch(processor, tmp_path, ["image"], False)
    batch["labels"] = batch["input_ids"].clone()
    full = _loss_and_gradients(model, batch)
    lean = _loss_and_gradients(model, batch, skip_logits=True)
    _assert_same(full, lean)
    placeholders = torch.isin(batch["input_ids"][:, 1:], torch.tensor(model.placeholder_label_ids()))
    assert int(placeholders.sum()) > 0
    assert lean[2] == batch["input_ids"].shape[1] - 1 - int(placeholders.sum())


def test_skip_logits_refuses_what_it_cannot_do(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    batch = _batch(processor, tmp_path, ["image"], False)
    labels = batch.pop("labels")
    with pytest.raises(ValueError, match="skip_logits=True returns the loss without logits, so it needs labels"):
        model(**batch, skip_logits=True)
    with pytest.raises(ValueError, match="it does not combine with logits_to_keep"):
        model(**batch, labels=labels, skip_logits=True, logits_to_keep=1)
    with pytest.raises(ValueError, match="linear_cross_entropy replaces the logits of the loss: pass skip_logits"):
        model(**batch, labels=labels, linear_cross_entropy=cut_cross_entropy, skip_logits=False)


# ----------------------------------------------------------------------------------------------- the trainer


def _dataset(folder):
    import datasets

    return datasets.Dataset.from_list([_image_row(folder, c) for c in ("red", "green", "blue", "yellow")])


def _trainer(folder, lm_head_loss="labelled", loss_reduction="token", **arguments):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    args = th.training_args(folder / f"out-{lm_head_loss}-{loss_reduction}", max_steps=1, optim="sgd",
                            learning_rate=0.5, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                            **arguments)
    return InternVLXTrainer(model=model, args=args, train_dataset=_dataset(folder), eval_dataset=_dataset(folder),
                            processing_class=processor, lm_head_loss=lm_head_loss,
                            data_collator=InternVLXDataCollator(processor, loss_reduction=loss_reduction))


class _HeadRows:
    """Rows the LM head ran on, per call (a forward hook)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.lm_head.register_forward_hook(
            lambda module, args, out: self.calls.append(args[0].shape[:-1].numel()))


@pytest.mark.parametrize("loss_reduction", ["token", "square"])
def test_the_trainer_trains_on_the_labelled_rows_to_the_same_weights(loss_reduction, tmp_path):
    """A training step with ``lm_head_loss="labelled"`` (the default) runs the LM head on the labelled rows only and
    reaches the weights of ``"full"``, for the Trainer's loss and InternVL's weighted one."""
    weights = {}
    for mode in ("full", "labelled"):
        trainer = _trainer(tmp_path, mode, loss_reduction)
        rows = _HeadRows(trainer.model)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.train()
        expected = batch["input_ids"].numel() if mode == "full" else _labelled(batch["labels"])
        assert rows.calls == [expected]
        weights[mode] = (th.losses(trainer)[0], th.snapshot(trainer.model))
    assert weights["labelled"][0] == pytest.approx(weights["full"][0], abs=1e-6)
    for name, value in weights["full"][1].items():
        torch.testing.assert_close(weights["labelled"][1][name], value, msg=name)


def test_evaluation_gets_full_logits_only_where_it_returns_them(tmp_path):
    trainer = _trainer(tmp_path)
    rows = _HeadRows(trainer.model)
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(2)])
    loss_only = trainer.evaluate()  # no compute_metrics: prediction_loss_only, the loss without logits
    assert rows.calls == [_labelled(batch["labels"])] * 2  # 4 samples, batches of 2 of the same shape
    rows.calls.clear()
    predicted = trainer.predict(trainer.eval_dataset)  # predictions: the logits of every position
    assert rows.calls == [batch["input_ids"].numel()] * 2
    logits = predicted.predictions[0]  # then image_hidden_states
    assert logits.shape == (4, batch["input_ids"].shape[1], trainer.model.config.text_config.vocab_size)
    assert predicted.metrics["test_loss"] == pytest.approx(loss_only["eval_loss"], abs=1e-6)


def test_label_smoothing_keeps_the_full_logits(tmp_path):
    trainer = _trainer(tmp_path, label_smoothing_factor=0.1)
    rows = _HeadRows(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.train()
    assert rows.calls == [batch["input_ids"].numel()]


def test_lm_head_loss_names_and_missing_packages():
    assert LM_HEAD_LOSSES == ("labelled", "cut_cross_entropy", "liger", "full")
    assert resolve("labelled") is None and resolve("full") is None
    with pytest.raises(ValueError, match=r"lm_head_loss must be one of \['labelled', 'cut_cross_entropy', 'liger', "
                                         r"'full'\], got 'fused'"):
        resolve("fused")
    if HAS_CCE:
        assert resolve("cut_cross_entropy") is cut_cross_entropy
    else:
        with pytest.raises(ValueError, match="needs the cut-cross-entropy package: pip install cut-cross-entropy"):
            resolve("cut_cross_entropy")
    if not HAS_LIGER:
        with pytest.raises(ValueError, match="needs Liger-Kernel on a CUDA machine: pip install liger-kernel"):
            resolve("liger")


# ---------------------------------------------------------------------------------- fused linear cross-entropy


@pytest.mark.skipif(not HAS_CCE, reason="cut-cross-entropy is not installed (pip install cut-cross-entropy; it "
                                        "brings triton, about 290 MB, so it is not in the test extra)")
def test_cut_cross_entropy_has_the_loss_and_gradients_of_the_default(tmp_path):
    """cut-cross-entropy's torch.compile implementation (its CPU path; the first call compiles, about a minute on
    2 cores) on a padded batch, plain losses and per-token weights alike."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model.eval()
    batch = _batch(processor, tmp_path, ["image", "text", "multi-turn"], False)
    default = _loss_and_gradients(model, batch, skip_logits=True)
    fused = _loss_and_gradients(model, batch, skip_logits=True, linear_cross_entropy=resolve("cut_cross_entropy"))
    _assert_same(default, fused)
    assert fused[2] == 0  # the LM head module never runs: the kernel reads its weight
    torch.testing.assert_close(fused[0].token_losses, default[0].token_losses)


@pytest.mark.skipif(not (HAS_LIGER and torch.cuda.is_available()),
                    reason="Liger-Kernel's fused linear cross-entropy runs on CUDA only (Triton kernels); needs "
                           "liger-kernel and a GPU")
def test_liger_has_the_loss_and_gradients_of_the_default(tmp_path):  # pragma: no cover - CUDA only
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model = model.cuda().eval()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in
             _batch(processor, tmp_path, ["image", "text", "multi-turn"], False).items()}
    default = _loss_and_gradients(model, batch, skip_logits=True)
    fused = _loss_and_gradients(model, batch, skip_logits=True, linear_cross_entropy=resolve("liger"))
    _assert_same(default, fused)


def test_liger_refuses_weighted_losses_and_cpu_tensors(tmp_path):
    if HAS_LIGER:
        hidden, weight = torch.randn(3, 8), torch.randn(16, 8)
        with pytest.raises(ValueError, match="need a CUDA device; this model is on cpu"):
            resolve("liger")(hidden, weight, torch.tensor([1, 2, 3]))
        trainer = _trainer(tmp_path, "liger", "square")
        with pytest.raises(ValueError, match="lm_head_loss='liger' computes the token-averaged loss only"):
            trainer.train()
    else:
        with pytest.raises(ValueError, match="needs Liger-Kernel on a CUDA machine"):
            _trainer(tmp_path, "liger")


# ------------------------------------------------------------------------------ benchmarks/bench_train_memory.py


def _bench():
    from conftest import load_script

    return load_script("benchmarks/bench_train_memory.py")


def test_the_memory_benchmark_counts_the_same_tensors_without_the_arithmetic():
    """bench_train_memory.py measures the big configurations with matrix products, convolutions and attention not
    computed (their outputs allocated at the shape the meta kernels give, zero-filled): the tensors the step keeps
    are those of the computed step, byte for byte (on LVTC, whose layouts come from the input ids), and the two
    paths' computed losses are equal."""
    bench = _bench()
    measured = {}
    for layout in ("lvtc",):
        for path in ("before", "after"):
            for arithmetic in ("real", "skip"):
                run = dict(family="tiny", layout=layout, tiles=2, vit="full", path=path,
                           llm_layers=2 if layout == "lvtc" else 1, expand_layer=1 if layout == "lvtc" else None,
                           vit_layers=1, batch=1, arithmetic=arithmetic, device="cpu", dtype="bfloat16",
                           answer_tokens=8, threads=torch.get_num_threads(), measure_rss=False)
                measured[layout, path, arithmetic] = bench.worker(run)
    for (layout, path, arithmetic), result in measured.items():
        real = measured[layout, path, "real"]
        assert result["positions"] == 1 + 32 + 256 * 2 + 16 + 8 and result["labelled"] == 8
        assert (result["tensor_peak_bytes"], result["activation_peak_bytes"]) == \
            (real["tensor_peak_bytes"], real["activation_peak_bytes"])
        assert result["skipped_ops"] > 0 if arithmetic == "skip" else result["skipped_ops"] == 0
    for layout in ("lvtc",):
        before, after = measured[layout, "before", "real"], measured[layout, "after", "real"]
        assert before["loss"] == pytest.approx(after["loss"], rel=1e-6)
        assert before["activation_peak_bytes"] > after["activation_peak_bytes"]


def test_the_memory_benchmark_measures_a_plain_trainer_step():
    """The ``trainer`` path: a plain `transformers.Trainer` step with no option takes the lean step (the model's own
    default), the same loss as both other paths and the tensors of ``skip_logits=True`` within a few temporaries."""
    bench = _bench()
    measured = {}
    for path in ("before", "after", "trainer"):
        run = dict(family="tiny", layout="plain-256", tiles=2, vit="frozen", path=path, llm_layers=1,
                   expand_layer=None, vit_layers=1, batch=1, arithmetic="real", device="cpu", dtype="float32",
                   answer_tokens=8, threads=torch.get_num_threads(), measure_rss=False)
        measured[path] = bench.worker(run)
    before, after, trainer = measured["before"], measured["after"], measured["trainer"]
    assert trainer["loss"] == pytest.approx(after["loss"], rel=1e-6) == pytest.approx(before["loss"], rel=1e-6)
    logits = 4 * trainer["positions"] * 1000  # float32 logits of the tiny family's vocabulary
    assert abs(trainer["tensor_peak_bytes"] - after["tensor_peak_bytes"]) < logits / 20
    assert before["tensor_peak_bytes"] - trainer["tensor_peak_bytes"] > logits
    rows = bench.trainer_comparisons(list(measured.values()))
    assert len(rows) == 1 and rows[0]["peak_trainer_bytes"] == trainer["tensor_peak_bytes"]
    assert "| tiny (1,000) | plain-256 | 2 |" in bench.trainer_table(rows)


def test_step_times_extrapolate_to_the_full_depth_from_one_more_layer():
    """The step-time study's full-depth estimate: the measured step plus, per missing layer, what one more LLM layer
    and one more ViT layer added (measured on the lean path; a layer's time does not depend on the LM head)."""
    bench = _bench()
    common = dict(family="2b", layout="plain-1024", tiles=6, vit="frozen", batch=1, arithmetic="real", device="cpu",
                  dtype="float32", answer_tokens=64, expand_layer=None, positions=6257, tensor_peak_bytes=1)
    runs = [dict(common, path="before", llm_layers=1, vit_layers=1, step_s=100.0),
            dict(common, path="after", llm_layers=1, vit_layers=1, step_s=40.0),
            dict(common, path="after", llm_layers=2, vit_layers=1, step_s=50.0),
            dict(common, path="after", llm_layers=1, vit_layers=2, step_s=42.0),
            dict(common, path="after", llm_layers=1, vit_layers=1, step_s=1.0, arithmetic="skip")]
    [row] = bench.step_times(runs)
    assert (row["full_llm_layers"], row["full_vit_layers"]) == (24, 24)
    assert (row["s_per_llm_layer"], row["s_per_vit_layer"]) == (10.0, 2.0)
    assert (row["full_step_s_before"], row["full_step_s_after"]) == (100.0 + 230 + 46, 40.0 + 230 + 46)
    assert row["ratio_after_over_before"] == 0.4 and row["full_ratio_after_over_before"] == 316 / 376
    assert "| 2b | plain-1024 | 6 | frozen | float32 | 6257 | 1/1 | 100.0 -> 40.0 | 0.40 | 10.0 / 2.0 | 376 -> 316" \
        in bench.step_times_table([row])
    # without the one-more-layer runs, only the measured depth; LVTC (short and long layers) gets no estimate
    assert "full_step_s_before" not in bench.step_times(runs[:2])[0]
    lvtc = [dict(run, layout="lvtc", expand_layer=1, llm_layers=run["llm_layers"] + 1) for run in runs]
    [row] = bench.step_times(lvtc)
    assert row["ratio_after_over_before"] == 0.4 and "full_step_s_before" not in row


def test_the_planning_table_in_the_docs_is_the_measured_one():
    """docs/fine-tuning-scale.md's planning table is `--docs`' rendering of benchmarks/results/train-memory.json: a run
    added without `--docs`, or a number edited by hand, fails here."""
    import json

    from conftest import REPO_ROOT

    bench = _bench()
    derived = json.loads((REPO_ROOT / "benchmarks/results/train-memory.json").read_text())["derived"]
    docs = (REPO_ROOT / "docs/fine-tuning-scale.md").read_text(encoding="utf-8")
    shown = docs.split(bench.DOCS_BEGIN + "\n", 1)[1].split("\n" + bench.DOCS_END, 1)[0]
    assert shown == bench.docs_planning_table(derived), (
        "run: python benchmarks/bench_train_memory.py --families 2b --json benchmarks/results/train-memory.json "
        "--docs --markdown benchmarks/results/train-memory.md --plot benchmarks/results/train-memory.png")
    assert "| 2B | plain-1024 | 6 | 6,257 | 7.24 -> 1.53 | 1 -> 4 | 8 -> 41 |" in shown
