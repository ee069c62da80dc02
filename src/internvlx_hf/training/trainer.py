"""The HF `Trainer`, with what InternVL-X training data needs: the LM head on the labelled positions only, InternVL's
per-sample loss weighting, length-grouped sampling from the dataset's own length estimates, a provenance record in
every folder it saves, and checkpoints that appear whole or not at all.

Everything else (DDP / FSDP / DeepSpeed, mixed precision, gradient checkpointing, checkpoints and resuming, logging)
is transformers' own `Trainer`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..atomic import atomic_file, replace_folder
from ..provenance import record_training
from .collator import InternVLXDataCollator
from .linear_cross_entropy import LM_HEAD_LOSSES, resolve

logger = logging.getLogger(__name__)

#: Where `InternVLXTrainer` writes a checkpoint before renaming it into ``OUTPUT_DIR/checkpoint-N``.
CHECKPOINT_STAGING = ".checkpoint-staging"


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weight * cross-entropy)`` over the shifted labels (position t predicts label t + 1 with its weight),
    -100 labels left out; the numerator of InternVL's weighted loss."""
    shift_labels = labels[..., 1:].reshape(-1).to(logits.device)
    shift_weights = weights[..., 1:].reshape(-1).to(logits.device, torch.float32)
    losses = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), shift_labels, ignore_index=-100, reduction="none")
    return (losses * shift_weights).sum()


class InternVLXTrainer(Trainer):
    """`transformers.Trainer` for InternVL-X checkpoints.

    - The loss runs the LM head on the labelled positions only (``lm_head_loss="labelled"``: the model's forward with
      ``skip_logits=True``): same loss and gradients, without the ``(batch, seq, vocab)`` logits of the image and
      prompt tokens. This applies to training steps and loss-only evaluation (``prediction_loss_only``, the default
      without ``compute_metrics``); evaluation that returns predictions, label smoothing and ``compute_loss_func``
      get the full logits as before. ``"cut_cross_entropy"`` / ``"liger"`` compute the same loss with a fused linear
      cross-entropy (`internvlx_hf.training.linear_cross_entropy`); ``"full"`` always computes every logit.
    - Batches with a ``loss_weight`` (`InternVLXDataCollator` with ``loss_reduction="sample"`` / ``"square"``) get
      InternVL's weighted loss: ``sum(w * ce) / sum(w)`` over the labelled tokens, with the sum of weights taken
      over the whole optimizer step (all gradient-accumulation batches and, with ``average_tokens_across_devices``,
      all processes), as the Trainer's own ``num_items_in_batch`` does for the token count. Batches without one
      take the Trainer's loss unchanged.
    - ``train_sampling_strategy="group_by_length"`` uses the dataset's ``lengths`` (a row's own ``length``, else
      token counts that `InternVLXDataset` computes from image headers and text, once, cached) instead of
      tokenizing every item.
    - With an `InternVLXDataCollator`, ``remove_unused_columns`` is turned off: the collator needs the raw
      ``messages`` / ``images`` columns, which the model's forward does not name.
    - Every folder saved (``checkpoint-*`` and the final model) gets an ``internvlx_provenance.json`` that copies the
      record of ``started_from`` and appends this run (``provenance`` details, ``output`` kind ``"full"`` or
      ``"adapter"``).
    - Adapter folders are left publishable (`tidy_adapter_folder`): without peft's template README.md and without
      an ``auto_mapping`` that names internvlx_hf.
    - A ``checkpoint-N`` folder appears whole or not at all: every process writes its part into
      ``OUTPUT_DIR/.checkpoint-staging/checkpoint-N``, and once all have, it is renamed into place (then old
      checkpoints are rotated out, as the Trainer does). A run killed while saving leaves only the staging folder,
      which no resume picks (``get_last_checkpoint`` finds the last complete checkpoint) and the next save removes.
      The Trainer's own save writes into ``checkpoint-N`` file by file: killed after the weights and before
      ``trainer_state.json``, it leaves a folder that the resume takes for the last checkpoint and then fails on.

    Args:
        started_from: the folder the model was loaded from (its provenance record is carried over).
        provenance: JSON-serialisable details of the run for the record (preset, data, LoRA settings, ...).
        lm_head_loss: ``"labelled"`` (default), ``"cut_cross_entropy"``, ``"liger"`` or ``"full"`` (see above).
        Everything else: as `transformers.Trainer`.
    """

    def __init__(self, *args, started_from: str | Path | None = None, provenance: dict[str, Any] | None = None,
                 lm_head_loss: str = "labelled", **kwargs):
        self.linear_cross_entropy = resolve(lm_head_loss)  # a clear error before any work for a missing package
        self.lm_head_loss = lm_head_loss
        self._prediction_loss_only: bool | None = None  # set while prediction_step runs
        collator = kwargs.get("data_collator")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(collator, InternVLXDataCollator) and training_args is not None \
                and training_args.remove_unused_columns:
            logger.info("InternVLXTrainer: remove_unused_columns=False (the collator reads messages/images).")
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.started_from = str(started_from) if started_from is not None else None
        self.provenance = dict(provenance or {})
        if lm_head_loss in ("cut_cross_entropy", "liger"):
            from transformers.integrations import is_deepspeed_zero3_enabled

            # the kernels read lm_head.weight, which ZeRO-3 gathers only inside the head's own forward
            if is_deepspeed_zero3_enabled():
                raise ValueError(f"lm_head_loss={lm_head_loss!r} does not combine with DeepSpeed ZeRO-3 (its "
                                 "partitioned LM head weight); use lm_head_loss='labelled'")

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        count = super()._get_num_items_in_batch(batch_samples, device)
        if count is None or not batch_samples or "loss_weight" not in batch_samples[0]:
            return count
        if self.args.n_gpu > 1:
            raise ValueError("loss_reduction 'sample' / 'square' needs one process per GPU (torchrun), not "
                             "torch.nn.DataParallel over several GPUs")
        # As the Trainer's token count: over labels[..., 1:], the positions the shifted loss predicts.
        total = sum(batch["loss_weight"][..., 1:].sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._prediction_loss_only = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._prediction_loss_only = None

    def skips_logits(self, inputs, return_outputs: bool = False) -> bool:
        """Whether this loss runs the LM head on the labelled positions only: ``lm_head_loss`` is not ``"full"``,
        the batch has labels, nothing reads the logits (no label smoothing, no ``compute_loss_func``) and the
        outputs are not returned, except to a loss-only prediction step."""
        return (self.lm_head_loss != "full" and inputs.get("labels") is not None and self.label_smoother is None
                and self.compute_loss_func is None and (not return_outputs or self._prediction_loss_only is True))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lean = self.skips_logits(inputs, return_outputs)
        # Said either way: the model's own default (skip_logits=None) skips the logits of any training forward with
        # labels, and "full" or a returned output must have them.
        lean_inputs = {"skip_logits": lean}
        if lean and self.linear_cross_entropy is not None:
            lean_inputs["linear_cross_entropy"] = self.linear_cross_entropy
        if "loss_weight" not in inputs and self.label_smoother is not None and inputs.get("labels") is not None:
            return self._smoothed_loss(model, inputs, return_outputs, num_items_in_batch)
        if "loss_weight" not in inputs:
            return super().compute_loss(model, {**inputs, **lean_inputs}, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.label_smoother is not None:
            raise ValueError("loss_reduction 'sample' / 'square' does not combine with label_smoothing_factor")
        if lean and self.lm_head_loss == "liger":  # older Liger releases scale a per-token gradient by its first one
            raise ValueError("lm_head_loss='liger' computes the token-averaged loss only; loss_reduction 'sample' / "
                             "'square' weighs tokens: use lm_head_loss='labelled' or 'cut_cross_entropy'")
        inputs = dict(inputs)
        weights, labels = inputs.pop("loss_weight"), inputs.pop("labels")
        if lean:
            outputs = model(**inputs, labels=labels, **lean_inputs)
            # token_losses[:, t] is the loss of predicting labels[:, t + 1]: the weights shift with it
            shifted = torch.nn.functional.pad(weights[..., 1:], (0, 1)).to(outputs.token_losses.device)
            total = (outputs.token_losses * shifted).sum()
        else:
            outputs = model(**inputs)
            total = weighted_token_loss(outputs.logits, labels, weights)
        if num_items_in_batch is None:  # a per-batch mean; the Trainer divides by the accumulation steps
            loss = total / weights[..., 1:].sum().clamp_min(torch.finfo(torch.float32).tiny)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:  # DDP averages the gradients of the processes
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _smoothed_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Label smoothing over the full logits, shifted as for every causal LM. transformers' Trainer shifts only for
        the models of its causal-LM list, which has no image-text-to-text model (InternVL's neither): it would smooth
        position t's prediction against label t instead of t + 1."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, skip_logits=False)
        loss = self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Only read when needed: a lazy `InternVLXDataset` computes its lengths on first use.
        lengths = getattr(dataset, "lengths", None) if self.args.train_sampling_strategy == "group_by_length" \
            else None
        if lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, dataset=dataset, lengths=lengths
            )
        return super()._get_train_sampler(train_dataset)

    def output_kind(self) -> str:
        return "adapter" if hasattr(self.accelerator.unwrap_model(self.model), "peft_config") else "full"

    def record_provenance(self, output_dir: str | Path, output: str | None = None) -> None:
        details = {
            **self.provenance,
            "steps": self.state.global_step,
            "epochs": round(float(self.state.epoch or 0.0), 4),
            "output": output or self.output_kind(),
        }
        record_training(output_dir, started_from=self.started_from, details=details)

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        if self.args.push_to_hub:  # its upload reads the folder in the background: it must stay where it is written
            return super()._save_checkpoint(model, trial)
        run_dir = Path(self._get_output_dir(trial))
        staging = run_dir / CHECKPOINT_STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a run killed while saving left
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # every process writes its part (RNG state, shards) in staging
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == staging:  # recorded where it was written
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            replace_folder(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: Path) -> None:
        """Old checkpoints removed down to ``save_total_limit``, as the Trainer's save does (it ran on the staging
        folder, which holds only the new one)."""
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers releases before the function: the Trainer's method
            self._rotate_checkpoints(use_mtime=True, output_dir=str(run_dir))
            return
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict=None):
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        had_card = (folder / "README.md").exists()
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            if self.output_kind() == "adapter":
                tidy_adapter_folder(folder, keep_card=had_card)
            self.record_provenance(folder)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (not a folder, or no readable ``trainer_state.json``, which the Trainer
    writes last), or None. Checkpoints written by `InternVLXTrainer` are complete or absent; this names the
    half-written ones another writer (or an older internvlx-hf) left."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder" if folder.exists() else "it does not exist"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the Trainer writes it last: the run stopped while saving it)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its trainer_state.json cannot be read ({' '.join(str(error).split())[:120]})"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder of ``output_dir`` with the largest N that `checkpoint_problem` accepts."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(entry.name.rsplit("-", 1)[1]), entry) for entry in output_dir.iterdir()
             if entry.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and entry.name.rsplit("-", 1)[1].isdigit()]
    for _, entry in sorted(found, reverse=True):
        if checkpoint_problem(entry) is None:
            return entry
    return None


def tidy_adapter_folder(folder: Path, keep_card: bool = False) -> None:
    """Undo two things PEFT's ``save_pretrained`` writes into an adapter folder that keep it from being published:
    a template model card (README.md: "[More Information Needed]", the base model's local path), which
    `internvlx card` replaces with the real one, and an ``auto_mapping`` that names the Python module of the base
    model's class (``internvlx_hf.modeling...``): machines loading the checkpoint do not have it, and PEFT's
    AutoPeftModel classes refuse to import it."""
    if not keep_card:
        (folder / "README.md").unlink(missing_ok=True)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict) and str(mapping.get("parent_library", "")).split(".")[0] == "internvlx_hf":
        config["auto_mapping"] = None
        with atomic_file(config_file) as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["CHECKPOINT_STAGING", "LM_HEAD_LOSSES", "InternVLXTrainer", "checkpoint_problem",
           "last_complete_checkpoint", "tidy_adapter_folder", "weighted_token_loss"]
