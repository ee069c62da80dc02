"""Scores on held-out data at every evaluation of a `transformers.Trainer` run (`internvlx train --eval-data`).

    trainer = Trainer(..., eval_dataset=heldout_for_loss, args=TrainingArguments(eval_strategy="steps", ...))
    trainer.add_callback(EvaluationCallback(trainer, "heldout.json"))

After each of the Trainer's evaluations (``eval_strategy`` steps / epoch, or a call to ``trainer.evaluate()``), the
callback answers the held-out data with the model being trained and logs ``eval_<dataset>_accuracy``,
``eval_<dataset>_samples``, ``eval_<dataset>_visual_tokens`` and ``eval_<dataset>_seconds_per_sample`` with
``trainer.log``: they go wherever the Trainer's logs go (the console, ``report_to`` integrations, and the log history
that ``trainer_state.json`` keeps). They are also added to what ``trainer.evaluate()`` returns, so
``metric_for_best_model="eval_<dataset>_accuracy"`` (with ``load_best_model_at_end``) can pick the best checkpoint
by them. With an `InternVLXTrainer`, the latest scores also join its provenance record,
so every folder it saves afterwards carries them and `internvlx card` shows them.

Under DDP / FSDP every process answers the whole set (identical greedy answers, and sharded weights are gathered
in step); the held-out set is scored with the model as it is at that step, without a separate copy.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from .data import read_eval_data


class EvaluationCallback(TrainerCallback):
    """Run `internvlx_hf.evaluation.evaluate` on held-out data after each of ``trainer``'s evaluations.

    Args:
        trainer: the Trainer whose model is scored and whose log the scores go to.
        data: held-out data (what `read_eval_data` reads, or the `EvalSet`s it returned); it is read and checked
            once, here.
        processor: the model's processor (default: ``trainer.processing_class``).
        metric, batch_size, max_new_tokens, limit: as for `evaluate` (``batch_size`` defaults to the Trainer's
            ``per_device_eval_batch_size``).
        data_name: how the provenance record names the data (default: the path given as ``data``).
    """

    def __init__(self, trainer, data: Any, *, processor=None, metric: str | None = None,
                 batch_size: int | None = None, max_new_tokens: int = 32, limit: int | None = None,
                 data_name: str | None = None):
        self.trainer = trainer
        self.processor = processor if processor is not None else trainer.processing_class
        if self.processor is None:
            raise ValueError("EvaluationCallback needs the model's processor: pass processor= or give the Trainer "
                             "processing_class=processor")
        if isinstance(data, (str, os.PathLike)):
            data_name = data_name or os.fspath(data)
        self.data_name = data_name
        self.sets = read_eval_data(data, self.processor, metric=metric, limit=limit)
        self.batch_size = batch_size or trainer.args.per_device_eval_batch_size
        self.max_new_tokens = max_new_tokens
        self.latest = None  # the EvalRun of the last evaluation
        self._scored_step = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._scored_step != state.global_step:  # not twice at one step (a trainer.evaluate() after the last)
            self._score(state)
        if metrics is not None:  # what evaluate() returns, so that metric_for_best_model can name these scores
            metrics.update(self.latest.metrics())
        return control

    def _score(self, state) -> None:
        from .runner import evaluate

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if hasattr(model, "get_base_model"):  # a PeftModel: generate through the model with its adapters in place
            model = model.get_base_model()
        run = evaluate(model, self.processor, self.sets, batch_size=self.batch_size,
                       max_new_tokens=self.max_new_tokens, progress=False, label=f"step {state.global_step}")
        self.latest = run
        self._scored_step = state.global_step
        self.trainer.log(run.metrics())
        provenance = getattr(self.trainer, "provenance", None)
        if isinstance(provenance, dict):
            provenance["evaluation"] = {
                "data": self.data_name, "step": state.global_step,
                "options": {key: run.options[key] for key in ("tiling", "max_tiles", "max_new_tokens")},
                "datasets": [result.to_dict(predictions=False) for result in run.datasets],
            }


__all__ = ["EvaluationCallback"]
