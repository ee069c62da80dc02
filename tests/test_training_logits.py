"""The model's own forward skips the logits of a training forward with labels (``skip_logits=None``), so that a plain
`transformers.Trainer`, TRL and a hand-written loop get the lean step with no option; whoever reads the logits still
gets them (computed when read), and evaluation, predictions, ``compute_metrics`` and label smoothing compute them as
always. The placeholder-label pre-hook synchronises with the host once per model, not on every forward."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import training_helpers as th
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator
from internvlx_hf.training.arguments import checkpointing_renames
from test_training_memory import _batch, _dataset, _labelled, _loss_and_gradients


class _HeadRows:
    """Rows the LM head ran on, per call (a forward hook)."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handle = model.lm_head.register_forward_hook(
            lambda module, args, out: self.calls.append(args[0].shape[:-1].numel()))


def _train_mode_without_dropout(model):
    """Training mode (what the default reads), with every dropout at 0 so that two passes see the same network."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


LAYOUTS = {"plain": ({}, ["image", "text"], False), "pvtc": ({"projector": "pvtc"}, ["image"], False),
           "lvtc-packed": ({"lvtc": "k=1"}, ["image", "text", "multi-turn"], True)}


@pytest.mark.parametrize("layout", [pytest.param(n, marks=pytest.mark.oldest) if n == "plain" else n for n in LAYOUTS])
def test_a_training_forward_with_labels_skips_the_logits_until_they_are_read(layout, tmp_path):
    options, kinds, packing = LAYOUTS[layout]
    model, processor = th.load(th.converted("internvl2_qwen2", **options))
    _train_mode_without_dropout(model)
    batch = _batch(processor, tmp_path, kinds, packing)
    labelled = _labelled(batch["labels"])
    full = _loss_and_gradients(model, batch, skip_logits=False)
    default = _loss_and_gradients(model, batch)  # no option
    assert full[2] == batch["input_ids"].numel() and default[2] == labelled  # the LM head's rows
    torch.testing.assert_close(default[0].loss, full[0].loss)
    for name, gradient in full[1].items():
        torch.testing.assert_close(default[1][name], gradient, msg=lambda m, name=name: f"{name}: {m}")
    outputs = default[0]
    assert "logits" not in outputs.keys() and outputs.logits_on_read is not None
    assert outputs[0] is outputs.loss and outputs["loss"] is outputs.loss  # the loss, without the logits
    assert "logits" not in outputs.keys()
    # read: the same logits as the full forward's, and from then on an ordinary output
    head = _HeadRows(model)
    try:
        logits = outputs.logits
    finally:
        head.handle.remove()
    assert head.calls == [batch["input_ids"].numel()]
    torch.testing.assert_close(logits, full[0].logits)
    assert list(outputs.keys())[:2] == ["loss", "logits"] and "logits_on_read" not in outputs.keys()
    assert outputs.logits is logits and outputs["logits"] is logits and outputs.to_tuple()[1] is logits


def test_logits_read_after_the_forward_carry_their_gradients(tmp_path):
    """A loop that builds its own loss from ``outputs.logits`` (labels passed as well) trains as with full logits."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    _train_mode_without_dropout(model)
    batch = _batch(processor, tmp_path, ["image", "text"], False)
    labels = batch["labels"]

    def own_loss(outputs):
        return torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, label_smoothing=0.1)

    gradients = []
    for option in ({"skip_logits": False}, {}):
        model.zero_grad(set_to_none=True)
        own_loss(model(**batch, **option)).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=lambda m, name=name: f"{name}: {m}")


def test_logits_are_never_computed_from_weights_updated_after_their_forward(tmp_path):
    """Read after ``optimizer.step()``, skipped logits would come from weights no forward used: the read raises,
    saying how to get them; read before the step, they are those of the forward (the full forward's values)."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    _train_mode_without_dropout(model)
    batch = _batch(processor, tmp_path, ["image", "text"], False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        full = model(**batch, skip_logits=False).logits
    before = model(**batch)
    torch.testing.assert_close(before.logits, full)  # read before the step: that forward's logits
    after = model(**batch)
    after.loss.backward()
    optimizer.step()
    message = r"changed since that forward.*before `optimizer.step\(\)`.*skip_logits=False"
    with pytest.raises(RuntimeError, match=message):
        after.logits  # noqa: B018
    with torch.no_grad():
        assert not torch.allclose(model(**batch, skip_logits=False).logits, full)  # the head did change
    torch.testing.assert_close(before.logits, full)  # read before, kept: unchanged


def test_evaluation_and_calls_without_labels_compute_the_logits(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    batch = _batch(processor, tmp_path, ["image", "text"], False)
    positions = batch["input_ids"].numel()
    head = _HeadRows(model)
    try:
        with torch.no_grad():
            model.eval()
            evaluated = model(**batch)  # evaluation with labels: Trainer.evaluate / prediction_step
            model.train()
            unlabelled = model(**{k: v for k, v in batch.items() if k != "labels"})  # label smoothing, generation
            explicit = model(**batch, skip_logits=True)  # asked for none: none, even on read
    finally:
        head.handle.remove()
    assert head.calls == [positions, positions, _labelled(batch["labels"])]
    assert evaluated.logits.shape == (*batch["input_ids"].shape, model.config.get_text_config().vocab_size)
    assert unlabelled.logits is not None and unlabelled.loss is None
    assert explicit.logits is None and getattr(explicit, "logits_on_read", None) is None


def test_a_tuple_and_rebuilt_outputs_still_have_their_logits(tmp_path):
    """``return_dict=False`` puts the logits at index 1, as always; wrappers that rebuild an output from its items
    (DDP's pytree unflatten, accelerate's float32 conversion of mixed-precision outputs) keep what computes them."""
    from accelerate.utils import convert_to_fp32
    from torch.utils._pytree import tree_flatten, tree_unflatten

    model, processor = th.load(th.converted("internvl2_qwen2"))
    _train_mode_without_dropout(model)
    batch = _batch(processor, tmp_path, ["image"], False)
    with torch.no_grad():
        expected = model(**batch, skip_logits=False).logits
        as_tuple = model(**batch, return_dict=False)
        leaves, spec = tree_flatten(model(**batch))
        rebuilt = tree_unflatten(leaves, spec)
        bf16 = model(**batch)
        converted = convert_to_fp32(type(bf16)(**{k: v.bfloat16() if k == "loss" else v for k, v in bf16.items()}))
    torch.testing.assert_close(as_tuple[1], expected)
    assert len(as_tuple) == len(model(**batch, skip_logits=False, return_dict=False))
    torch.testing.assert_close(rebuilt.logits, expected)
    assert converted.loss.dtype == torch.float32
    torch.testing.assert_close(converted.logits, expected)


# --------------------------------------------------------------------------------------------- the HF Trainer


def _plain_trainer(folder, **arguments):
    from transformers import Trainer

    model, processor = th.load(th.converted("internvl2_qwen2"))
    # no KV cache in the outputs: transformers 5.16's Trainer cannot gather one into predictions
    model.config.use_cache = model.config.get_text_config().use_cache = False
    args = th.training_args(folder / "out", max_steps=1, optim="sgd", learning_rate=0.5, remove_unused_columns=False,
                            per_device_train_batch_size=2, per_device_eval_batch_size=2, **arguments)
    return Trainer(model=model, args=args, train_dataset=_dataset(folder), eval_dataset=_dataset(folder),
                   data_collator=InternVLXDataCollator(processor)), processor


def test_a_plain_transformers_trainer_takes_the_lean_step(tmp_path):
    trainer, processor = _plain_trainer(tmp_path)
    batch = InternVLXDataCollator(processor)([trainer.train_dataset[0], trainer.train_dataset[1]])
    head = _HeadRows(trainer.model)
    try:
        trainer.train()
    finally:
        head.handle.remove()
    assert head.calls == [_labelled(batch["labels"])]  # one step, on the labelled rows only


def test_prediction_and_compute_metrics_get_the_logits(tmp_path):
    """``prediction_loss_only=False`` / ``compute_metrics``: the Trainer evaluates in eval mode, with logits."""
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions[0].shape  # (logits, image_hidden_states): the outputs but the loss
        return {"labelled": float((prediction.label_ids != IGNORE_INDEX).sum())}

    trainer, processor = _plain_trainer(tmp_path, prediction_loss_only=False)
    trainer.compute_metrics = compute_metrics
    head = _HeadRows(trainer.model)
    try:
        metrics = trainer.evaluate()
    finally:
        head.handle.remove()
    vocab = trainer.model.config.get_text_config().vocab_size
    assert seen["shape"][0] == 4 and seen["shape"][-1] == vocab
    assert len(head.calls) == 2 and all(rows % 2 == 0 and rows > 2 * 100 for rows in head.calls)  # every position
    assert metrics["eval_labelled"] > 0 and metrics["eval_loss"] > 0


@pytest.mark.parametrize("trainer_class", ["Trainer", "InternVLXTrainer"])
def test_label_smoothing_reads_the_full_logits(trainer_class, tmp_path):
    """The label smoother calls the model without labels and smooths over every logit. transformers' Trainer shifts
    the labels only for the models of its causal-LM list (no image-text-to-text model is on it, InternVL's neither),
    so it smooths position t's prediction against label t; `InternVLXTrainer` shifts, as for a causal LM."""
    from transformers.trainer_pt_utils import LabelSmoother

    from internvlx_hf.training import InternVLXTrainer

    trainer, processor = _plain_trainer(tmp_path, label_smoothing_factor=0.1)
    if trainer_class == "InternVLXTrainer":
        trainer = InternVLXTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                                   data_collator=trainer.data_collator)
    batch = InternVLXDataCollator(processor)([trainer.train_dataset[0], trainer.train_dataset[1]])
    model = _train_mode_without_dropout(trainer.model)
    with torch.no_grad():
        expected = LabelSmoother(0.1)(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"],
                                      shift_labels=trainer_class == "InternVLXTrainer")
    head = _HeadRows(model)
    try:
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch))
    finally:
        head.handle.remove()
    assert head.calls == [batch["input_ids"].numel()]
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------------------- TRL


def test_token_accuracy_and_entropy_read_from_the_logits_of_a_training_forward(tmp_path):
    """What TRL 1.0-1.14's SFTTrainer logs (it reads ``outputs.logits`` after a training forward with labels, under
    ``torch.no_grad()``): the same mean token accuracy and entropy as from the logits of a full forward."""
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits

    model, processor = th.load(th.converted("internvl2_qwen2"))
    _train_mode_without_dropout(model)
    batch = _batch(processor, tmp_path, ["image", "text"], False)

    def metrics(outputs):
        with torch.no_grad():
            logits, labels = outputs.logits[..., :-1, :], batch["labels"][..., 1:]
            mask = labels != IGNORE_INDEX
            entropy = (entropy_from_logits(logits) * mask).sum() / mask.sum()
            accuracy = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()
        return float(entropy), float(accuracy)

    full = metrics(model(**batch, skip_logits=False))
    lean = model(**batch)
    assert "logits" not in lean.keys()
    assert metrics(lean) == pytest.approx(full, abs=1e-6)


def test_trl_sft_trainer_logs_token_accuracy_and_entropy_of_the_full_logits(tmp_path):
    """TRL's SFTTrainer (its fused LM head from 1.16, the model's logits before): one step on one batch logs the mean
    token accuracy and entropy of the full logits at the starting weights."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits

    from test_training_trl import _rows

    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = _rows(tmp_path)
    collator = InternVLXDataCollator(processor)
    batch = collator([rows[i] for i in range(4)])
    _train_mode_without_dropout(model)
    with torch.no_grad():
        logits, labels = model(**batch, skip_logits=False).logits[..., :-1, :], batch["labels"][..., 1:]
        mask = labels != IGNORE_INDEX
        entropy = float((entropy_from_logits(logits.float()) * mask).sum() / mask.sum())
        accuracy = float(((logits.argmax(-1) == labels) & mask).sum() / mask.sum())
    checkpointing = ({"gradient_checkpointing": False} if checkpointing_renames()
                     else {"gradient_checkpointing": False, "activation_checkpointing": False})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-3, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                         use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
                         seed=0, **checkpointing)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                             data_collator=collator)
    for module in trainer.model.modules():  # as above: the step must see the network the expected values came from
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    # TRL 1.12 logs 6.2083 here where this computes 6.2143, with the model's old full-logits forward as with this
    # one (its own averaging; TRL 1.16's fused head logs 6.2143 +- 1e-3): the logits it reads are the same
    assert logged["entropy"] == pytest.approx(entropy, rel=2e-3)


# -------------------------------------------------------------------------------- the placeholder-label pre-hook

_SYNCHRONISING = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "masked_select")


class _Calls(TorchFunctionMode):
    """Counts host synchronisations (a tensor's value read on the host, a data-dependent shape) and tensors built
    from Python values, as torch functions are called."""

    def __init__(self):
        super().__init__()
        self.syncs = self.built = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.syncs += name in _SYNCHRONISING
        self.built += name in ("tensor", "as_tensor")
        return func(*args, **(kwargs or {}))


def test_the_placeholder_label_hook_synchronises_once_per_model(tmp_path):
    from internvlx_hf.modeling.placeholders import ignore_placeholder_label_kwargs

    model, processor = th.load(th.converted("internvl2_qwen2"))
    model.train()
    batch = _batch(processor, tmp_path, ["image", "text"], False)
    batch["labels"] = batch["input_ids"].clone()  # TRL's default collator: placeholders labelled
    counts = []
    for _ in range(3):  # the hook as three training forwards call it
        with _Calls() as calls:
            _, kwargs = ignore_placeholder_label_kwargs(model, (), dict(batch))
        counts.append((calls.syncs, calls.built))
        placeholders = torch.isin(batch["labels"], torch.tensor(model.placeholder_label_ids()))
        assert torch.equal(kwargs["labels"], batch["labels"].masked_fill(placeholders, IGNORE_INDEX))
    assert counts == [(1, 1), (0, 0), (0, 0)]
    # whole forwards: the hook's one read and the ids tensor happen in the first only
    model, _ = th.load(th.converted("internvl2_qwen2"))
    model.train()
    forwards = []
    for _ in range(3):
        with _Calls() as calls:
            model(**batch)
        forwards.append((calls.syncs, calls.built))
    assert forwards[1] == forwards[2] and forwards[0][0] == forwards[1][0] + 1 and forwards[0][1] == forwards[1][1] + 1
