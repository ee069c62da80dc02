"""The HF `Trainer`, with what InternVL-X training data needs: length-grouped sampling from the dataset's own
length estimates and a provenance record in every folder it saves.

Everything else (DDP / FSDP / DeepSpeed, mixed precision, gradient checkpointing, checkpoints and resuming, logging)
is transformers' own `Trainer`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..atomic import atomic_file
from ..provenance import record_training
from .collator import InternVLXDataCollator

logger = logging.getLogger(__name__)


class InternVLXTrainer(Trainer):
    """`transformers.Trainer` for InternVL-X checkpoints.

    - ``train_sampling_strategy="group_by_length"`` uses the dataset's ``lengths`` (exact token counts that
      `InternVLXDataset` computes from image headers and text) instead of tokenizing every item.
    - With an `InternVLXDataCollator`, ``remove_unused_columns`` is turned off: the collator needs the raw
      ``messages`` / ``images`` columns, which the model's forward does not name.
    - Every folder saved (``checkpoint-*`` and the final model) gets an ``internvlx_provenance.json`` that copies the
      record of ``started_from`` and appends this run (``provenance`` details, ``output`` kind ``"full"`` or
      ``"adapter"``).
    - Adapter folders are left publishable (`tidy_adapter_folder`): without peft's template README.md and without
      an ``auto_mapping`` that names internvlx_hf.

    Args:
        started_from: the folder the model was loaded from (its provenance record is carried over).
        provenance: JSON-serialisable details of the run for the record (preset, data, LoRA settings, ...).
        Everything else: as `transformers.Trainer`.
    """

    def __init__(self, *args, started_from: str | Path | None = None, provenance: dict[str, Any] | None = None,
                 **kwargs):
        collator = kwargs.get("data_collator")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(collator, InternVLXDataCollator) and training_args is not None \
                and training_args.remove_unused_columns:
            logger.info("InternVLXTrainer: remove_unused_columns=False (the collator reads messages/images).")
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.started_from = str(started_from) if started_from is not None else None
        self.provenance = dict(provenance or {})

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
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

    def _save(self, output_dir: str | None = None, state_dict=None):
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        had_card = (folder / "README.md").exists()
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            if self.output_kind() == "adapter":
                tidy_adapter_folder(folder, keep_card=had_card)
            self.record_provenance(folder)


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


__all__ = ["InternVLXTrainer", "tidy_adapter_folder"]
