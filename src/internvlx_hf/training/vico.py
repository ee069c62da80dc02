"""Training a router: Visual Consistency Learning (ViCO, arXiv 2510.12793), how OpenGVLab trained InternVL3.5-Flash's
router, for any checkpoint with one (a Flash model, or one that gained it: `internvlx convert --add-router`).

    internvlx train --model DIR --data META --preset vico --output_dir OUT            # both stages
    internvlx train --model DIR --data META --preset vico-projector --output_dir OUT  # the LLM as it is
    internvlx train --model FLASH --data META --preset vico-router --output_dir OUT  # stage 2 alone

Two stages, in one `ViCOTrainer` run (the HF `Trainer` underneath; ``vico_stage_split`` of the steps go to stage 1):

- **Stage 1, consistency.** The model with every tile at full resolution (the router off) is the teacher: the same
  weights, run under ``torch.no_grad()`` before the student's forward (no second copy in memory). The student sees
  each tile compressed at random (a rate drawn per step, each tile compressed with that probability:
  ``vir_compressed``), and learns the teacher's next-token distributions on the answer tokens (forward KL, the
  distillation's `generalized_jsd`), with ``vico_ce_weight`` times the usual next-token loss beside it. What trains
  is the 64-token projector (``model.vir.projector``) and LoRA adapters on the LLM, which learns to read compressed
  tiles (merged into OUT at the end; the teacher runs with them off), or with `vico-projector` the projector alone:
  either way the teacher is exactly the model that was given, in eval mode.
- **Stage 2, the router.** Everything frozen but the router's pooling and gate. For each tile, the answer loss with
  that tile alone compressed, over the loss with none (a ratio per tile, from ``1 + tiles`` forwards without
  gradient) gives a label: compressible when the ratio stays at or under a threshold set dynamically, the
  ``vico_label_share`` quantile of the last ``vico_label_window`` ratios, never below ``1 + vico_label_tolerance``
  (a tile whose compression moves the loss by less is always compressible); the losses are the eval-mode model's.
  The gate trains as a binary classifier on the labels (cross-entropy on its two-way softmax, ``p0`` the score for
  compressing).

At the end the router is switched on (``config.vir.enabled``) with InternVL3.5-Flash's decision rule and thresholds
(above the 0.1 quantile of a sample's tiles and ``p0 >= 0.5``): OUT is a Flash checkpoint, loading without this
package and served on vLLM with its router as a converted OpenGVLab Flash folder is.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distillation import _divergence, labelled_logits
from .trainer import InternVLXTrainer

logger = logging.getLogger(__name__)

VICO_PRESETS = ("vico", "vico-projector", "vico-router")


@dataclass
class ViCOSettings:
    """ViCO's settings (`internvlx train` flags ``--vico_*``; see the module docstring)."""

    stage_split: float = 0.5  # share of the steps in stage 1 (1: stage 1 alone; `vico-router` runs stage 2 alone)
    ce_weight: float = 0.0  # stage 1: the next-token loss's weight beside the KL divergence
    label_share: float = 0.5  # stage 2: the quantile of recent loss ratios under which a tile is compressible
    label_window: int = 512  # stage 2: how many recent ratios the quantile is taken over
    label_tolerance: float = 0.01  # stage 2: a ratio up to 1 + this is compressible whatever the quantile

    def check(self) -> None:
        if not 0.0 <= self.stage_split <= 1.0:
            raise ValueError(f"--vico_stage_split must lie in [0, 1] (the share of steps in stage 1), got "
                             f"{self.stage_split}")
        if not 0.0 < self.label_share < 1.0:
            raise ValueError(f"--vico_label_share must lie in (0, 1) (a quantile), got {self.label_share}")
        if self.label_window < 1 or self.ce_weight < 0 or self.label_tolerance < 0:
            raise ValueError("--vico_label_window must be >= 1, --vico_ce_weight and --vico_label_tolerance >= 0")


def tiles_of(model, inputs) -> list[int]:
    """Tiles of each sample of a batch, samples in order (a row, or a packed sequence), from its placeholders."""
    from ..modeling.vir_routing import sample_starts, tiles_per_sample

    config = _base(model).config
    ids = inputs["input_ids"]
    starts = sample_starts(ids, inputs.get("attention_mask"), inputs.get("position_ids"))
    return tiles_per_sample(ids == config.image_token_id, starts, config.image_seq_length)


def sample_losses(model, inputs, compressed: torch.Tensor) -> torch.Tensor:
    """``(samples,)`` each sample's mean next-token loss on its answer tokens with ``compressed`` tiles (no
    gradient)."""
    from ..modeling.vir_routing import sample_starts

    ids = inputs["input_ids"]
    out = model(**inputs, vir_compressed=compressed, skip_logits=True)
    labelled = F.pad(inputs["labels"], (0, 1), value=-100)[..., 1:] != -100  # position t predicts label t + 1
    sample = torch.cumsum(sample_starts(ids, inputs.get("attention_mask"), inputs.get("position_ids"))
                          .reshape(-1).long(), 0) - 1
    count = int(sample[-1]) + 1
    losses = torch.zeros(count, device=out.token_losses.device).index_add_(
        0, sample.to(out.token_losses.device), (out.token_losses * labelled.to(out.token_losses.device)).reshape(-1))
    tokens = torch.zeros(count, device=losses.device).index_add_(0, sample.to(losses.device),
                                                                 labelled.reshape(-1).float().to(losses.device))
    return losses / tokens.clamp_min(1)


def loss_ratios(model, inputs) -> torch.Tensor:
    """``(tiles,)``: each tile's answer loss with it alone compressed over the loss with none, in tile order (what
    stage 2's labels come from); ``1 + most tiles of a sample`` forwards, the j-th tile of every sample at once."""
    groups = tiles_of(model, inputs)
    total = sum(groups)
    device = inputs["input_ids"].device
    with torch.no_grad(), evaluating(model):
        none = sample_losses(model, inputs, torch.zeros(total, dtype=torch.bool, device=device))
        with_samples = [i for i, n in enumerate(groups) if n]  # the samples that have tiles, in order
        starts = [sum(groups[:i]) for i in range(len(groups))]
        ratios = torch.empty(total, device=none.device)
        for j in range(max(groups, default=0)):
            compressed = torch.zeros(total, dtype=torch.bool, device=device)
            tiles = [starts[i] + j for i in with_samples if groups[i] > j]
            compressed[tiles] = True
            losses = sample_losses(model, inputs, compressed)
            for i in with_samples:
                if groups[i] > j:
                    ratios[starts[i] + j] = losses[i] / none[i].clamp_min(1e-8)
    return ratios


class RatioThreshold:
    """Stage 2's dynamic threshold: the ``share`` quantile of the last ``window`` loss ratios, never below
    ``1 + tolerance``."""

    def __init__(self, share: float, window: int, tolerance: float):
        self.share, self.tolerance = share, tolerance
        self.recent: deque[float] = deque(maxlen=window)

    def labels(self, ratios: torch.Tensor) -> torch.Tensor:
        """``(tiles,)`` float 1 (compressible) / 0 for ``ratios``, which then join the window."""
        self.recent.extend(float(r) for r in ratios.detach().cpu())
        threshold = max(torch.quantile(torch.tensor(list(self.recent)), self.share).item(), 1.0 + self.tolerance)
        return (ratios <= threshold).float()


@contextmanager
def evaluating(model):
    """``model`` in eval mode (no dropout, no drop path) inside, its mode restored after: the teacher and the
    labels are the deterministic model's, as it answers after training."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def _base(model):
    """The `InternVLXForConditionalGeneration` inside DDP / peft wrappers."""
    model = _base_wrapper(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def full_resolution_logits(model, inputs) -> torch.Tensor:
    """Stage 1's teacher: the model's logits at the labelled positions with no tile compressed (the router off),
    without gradient; a peft model's adapters are off for it, so the teacher stays the model that was given."""
    total = sum(tiles_of(model, inputs))
    adapters = getattr(_base_wrapper(model), "disable_adapter", None)
    with torch.no_grad(), evaluating(model), adapters() if callable(adapters) else nullcontext():
        return labelled_logits(model, {**inputs, "vir_compressed": torch.zeros(
            total, dtype=torch.bool, device=inputs["input_ids"].device)})


def consistency_loss(model, inputs, compressed: torch.Tensor, ce_weight: float = 0.0) -> torch.Tensor:
    """Stage 1's loss for one batch: KL(full resolution || ``compressed`` tiles) per answer token, averaged (plus
    ``ce_weight`` times the next-token loss)."""
    teacher = full_resolution_logits(model, inputs)
    return model(**inputs, vir_compressed=compressed, skip_logits=True, linear_cross_entropy=functools.partial(
        _consistency, teacher_logits=teacher, ce_weight=ce_weight)).loss


def _consistency(hidden, weight, targets, *, teacher_logits, ce_weight: float) -> torch.Tensor:
    """The student's per-token loss at the labelled positions: KL(teacher || student), plus ``ce_weight`` times the
    next-token cross-entropy."""
    divergence = _divergence(hidden, weight, targets, teacher_logits=teacher_logits, beta=0.0, temperature=1.0)
    if not ce_weight:
        return divergence
    logits = F.linear(hidden, weight.to(hidden.dtype))
    return divergence + ce_weight * F.cross_entropy(logits.float(), targets, reduction="none")


class ViCOTrainer(InternVLXTrainer):
    """`InternVLXTrainer` whose loss is ViCO's: stage 1 (consistency) for the first ``settings.stage_split`` of the
    steps, stage 2 (the router) after; ``router_only`` (preset ``vico-router``) runs stage 2 throughout. The logged
    ``loss`` is the stage's; stage 2 logs the share of tiles its labels call compressible."""

    def __init__(self, *args, settings: ViCOSettings | None = None, router_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings or ViCOSettings()
        self.settings.check()
        self.router_only = router_only
        base = _base(self.model)
        if getattr(base.config, "vir", None) is None:
            raise ValueError("--preset vico trains a router, and this model has none (config.vir is None): add one "
                             "first, `internvlx convert SRC DST --add-router`.")
        self.threshold = RatioThreshold(self.settings.label_share, self.settings.label_window,
                                        self.settings.label_tolerance)
        self._generator = torch.Generator().manual_seed(self.args.seed)
        self._labelled = [0, 0]  # compressible, all, since the last log
        self._last_stage = self.stage() if self.state is not None else 1

    def stage(self) -> int:
        if self.router_only:
            return 2
        return 1 if self.state.global_step < math.ceil(self.settings.stage_split * self.state.max_steps) else 2

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._last_stage = self.stage()  # (logged after the step, when global_step has moved on)
        if self._last_stage == 1:
            return self._consistency_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self._router_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def _consistency_loss(self, model, inputs, return_outputs, num_items_in_batch):
        total = sum(tiles_of(model, inputs))
        device = inputs["input_ids"].device
        teacher = full_resolution_logits(model, inputs)
        rate = torch.rand((), generator=self._generator).item()
        compressed = (torch.rand(total, generator=self._generator) < rate).to(device)
        self.linear_cross_entropy = functools.partial(_consistency, teacher_logits=teacher,
                                                      ce_weight=self.settings.ce_weight)
        try:
            return super().compute_loss(model, {**inputs, "vir_compressed": compressed}, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.linear_cross_entropy = None

    def _router_loss(self, model, inputs) -> torch.Tensor:
        base = _base(model)
        router = base.model.vir
        if inputs.get("pixel_values") is None:  # a batch of text rows: nothing to label, a zero loss on the router
            return sum(parameter.sum() for parameter in router.gating.parameters()) * 0.0
        ratios = loss_ratios(model, inputs)
        labels = self.threshold.labels(ratios)
        self._labelled[0] += int(labels.sum())
        self._labelled[1] += labels.numel()
        with torch.no_grad(), evaluating(model):
            vit, _, _ = base.model._vision_output(inputs["pixel_values"], inputs.get("image_flags"), {})
        probabilities = router.gating(router.pooling(vit[:, 1:]))
        # p0 (column 0) the probability that the tile is compressible
        return F.nll_loss(torch.log(probabilities.clamp_min(1e-8)), (1 - labels).long().to(probabilities.device))

    def log(self, logs, *args, **kwargs):
        if self._labelled[1]:
            logs = {**logs, "vico_compressible": self._labelled[0] / self._labelled[1]}
            self._labelled = [0, 0]
        if "loss" in logs:
            logs = {**logs, "vico_stage": self._last_stage}
        return super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.router_only or self.settings.stage_split < 1.0:  # the router trained: it decides from now on
            _base(self.model).config.vir.enabled = True
        return result


def _base_wrapper(model):
    """The peft model (which can disable its adapters) inside DDP wrappers, or the model."""
    while hasattr(model, "module"):
        model = model.module
    return model


__all__ = ["VICO_PRESETS", "RatioThreshold", "ViCOSettings", "ViCOTrainer", "consistency_loss",
           "full_resolution_logits", "loss_ratios", "sample_losses", "tiles_of"]
