"""Batched generation over held-out data and the scores per dataset.

Each dataset is answered in left-padded batches with `generate()` (greedy unless ``num_beams`` > 1), stopping at
the chat template's end-of-turn token; answers are decoded by the processor, which cuts them there. Samples whose
tile budgets differ (a dataset's ``max_dynamic_patch``, several images per sample) go into separate batches, so
every image is tiled as training tiled it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.images import TileBudget
from ..metrics import get_metric
from .data import AS_WRITTEN, EvalSet, read_eval_data


@dataclass
class Prediction:
    source: str  # "file.jsonl:12"
    id: Any
    prediction: str
    reference: str
    answers: list[str]
    score: float
    tiles: int
    visual_tokens: int  # <IMG_CONTEXT> tokens in the prompt (what the LLM's layers before LVTC's k see)


@dataclass
class DatasetResult:
    """A dataset's score (the mean of its samples' metric) and what answering it cost, per sample."""

    name: str
    metric: str
    accuracy: float
    samples: int
    tiles_per_sample: float
    visual_tokens_per_sample: list[tuple[str, float]]  # (LLM layer group, visual tokens): one group without LVTC
    seconds_per_sample: float  # generate() wall time (prefill + decoding), divided by the samples
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def visual_tokens(self) -> float:
        """Visual tokens per sample in the input ids (the first layer group)."""
        return self.visual_tokens_per_sample[0][1]

    def to_dict(self, predictions: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["visual_tokens_per_sample"] = dict(self.visual_tokens_per_sample)
        if not predictions:
            del data["predictions"]
        return data


@dataclass
class EvalRun:
    """One checkpoint under one set of options, scored on every dataset."""

    label: str
    checkpoint: str
    options: dict[str, Any]
    datasets: list[DatasetResult]

    def dataset(self, name: str) -> DatasetResult:
        for result in self.datasets:
            if result.name == name:
                return result
        raise KeyError(f"no dataset {name!r} in this run; it has {[d.name for d in self.datasets]}")

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        """Flat numbers for a Trainer log: ``{prefix}{dataset}_accuracy``, ``_samples``, ``_visual_tokens`` (and
        ``_visual_tokens_long`` under LVTC: the tokens of the layers from k on), ``_seconds_per_sample``."""
        logged: dict[str, float] = {}
        for result in self.datasets:
            key = f"{prefix}{result.name}"
            logged[f"{key}_accuracy"] = result.accuracy
            logged[f"{key}_samples"] = result.samples
            logged[f"{key}_visual_tokens"] = result.visual_tokens
            if len(result.visual_tokens_per_sample) > 1:
                logged[f"{key}_visual_tokens_long"] = result.visual_tokens_per_sample[-1][1]
            logged[f"{key}_seconds_per_sample"] = result.seconds_per_sample
        return logged

    def to_dict(self, predictions: bool = True) -> dict[str, Any]:
        return {"label": self.label, "checkpoint": self.checkpoint, "options": dict(self.options),
                "datasets": [result.to_dict(predictions) for result in self.datasets]}


def _batches(eval_set: EvalSet, budget: TileBudget, max_tiles: int | None, batch_size: int
             ) -> list[tuple[dict[str, int], list[int]]]:
    """Batches of sample indices that share their tile options (InternVL's budget rules, `TileBudget`)."""
    groups: dict[tuple, list[int]] = {}
    for index, sample in enumerate(eval_set.samples):
        if sample.video_frames:  # every frame one tile, whatever --max_tiles says
            options = {"max_tiles": 1, "min_tiles": 1}
        else:
            options = budget.options(max_tiles or sample.max_tiles, len(sample.images)) if sample.images else {}
        groups.setdefault(tuple(sorted(options.items())), []).append(index)
    return [(dict(key), indices[i: i + batch_size]) for key, indices in groups.items()
            for i in range(0, len(indices), batch_size)]


def _sync(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, processor, samples, options, *, tiling, max_new_tokens, num_beams, eos, pad):
    """Answers, tiles and visual tokens of one batch, and the seconds generate() took."""
    import torch

    from ..data.images import load_image

    images = []
    for sample in samples:
        try:  # the headers were read up front; the pixels are decoded only now
            images.append([load_image(image, i) for i, image in enumerate(sample.images)])
        except (ValueError, OSError) as error:
            raise ValueError(f"{sample.source}: {error}") from None
    options = dict(options)
    if tiling is not None:
        options["tiling"] = tiling
    inputs = processor(images=images if any(images) else None, text=[s.prompt for s in samples], padding=True,
                       padding_side="left", return_tensors="pt", **(options if any(images) else {}))
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    _sync(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True)
    _sync(model.device)
    seconds = time.perf_counter() - start
    answers = [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:].cpu(),
                                                           skip_special_tokens=True)]
    per_image = inputs["num_patches"].tolist() if "num_patches" in inputs else []
    tiles, start_image = [], 0
    for sample_images in images:
        tiles.append(int(sum(per_image[start_image: start_image + len(sample_images)])))
        start_image += len(sample_images)
    visual = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    return answers, tiles, [int(v) for v in visual], seconds


def _result(name: str, metric: str, predictions: list[Prediction], seconds_per_sample: float, config
            ) -> DatasetResult:
    """The mean score of ``predictions`` and what they cost per sample (visual tokens per LVTC layer group)."""
    from ..token_budget import layer_groups

    n = len(predictions)
    groups: dict[str, int] = {}
    for p in predictions:
        for group, tokens in layer_groups(config, p.visual_tokens, p.tiles):
            groups[group] = groups.get(group, 0) + tokens
    return DatasetResult(
        name=name, metric=metric, accuracy=sum(p.score for p in predictions) / n, samples=n,
        tiles_per_sample=sum(p.tiles for p in predictions) / n,
        visual_tokens_per_sample=[(group, total / n) for group, total in groups.items()],
        seconds_per_sample=seconds_per_sample, predictions=predictions,
    )


def _select(sets: list[EvalSet], groups, group_by: str | None, data: Any) -> list[EvalSet]:
    """Only the samples whose group is one of ``groups`` (datasets left with none are dropped)."""
    if groups is None:
        return sets
    if group_by is None:
        raise ValueError("groups selects values of group_by; pass group_by too (e.g. group_by='task')")
    wanted = {str(g) for g in groups}
    kept = [EvalSet(s.name, s.metric, [x for x in s.samples if x.group in wanted]) for s in sets]
    kept = [s for s in kept if s.samples]
    if not kept:
        raise ValueError(f"groups={sorted(wanted)}: no sample of {data} has such a {group_by!r}")
    return kept


def evaluate(model, processor, data: Any, *, metric: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 32, num_beams: int = 1, tiling: str | None = None, max_tiles: int | None = None,
             limit: int | None = None, progress: bool = True, label: str | None = None,
             checkpoint: str | None = None, system: Any = AS_WRITTEN, group_by: str | None = None,
             groups: Any = None) -> EvalRun:
    """Score ``model`` on held-out ``data``, dataset by dataset.

    Args:
        model: an InternVL-X model (any device and dtype; it is put in eval mode and back into training mode
            afterwards if it was training).
        processor: its `InternVLXProcessor` (chat template, tokenizer, tiling settings).
        data: a meta JSON / JSONL path (or comma-separated paths), a `datasets.Dataset`, a list of rows, or the
            `EvalSet`s of `read_eval_data`.
        metric: every dataset's metric (default: the meta entry's ``"metric"``, else ``exact_match``).
        batch_size: prompts per `generate()` call.
        max_new_tokens: the longest answer.
        num_beams: 1 is greedy decoding; more is beam search.
        tiling, max_tiles: RVTC settings instead of the processor's; ``max_tiles``, when given, is every
            sample's budget, else a dataset's ``max_dynamic_patch`` is its own (the precedence of training).
        limit: the first ``limit`` samples of each dataset only.
        progress: show a progress bar.
        label, checkpoint: how reports name this run (default: the model's ``name_or_path``).
        system: the system block every question is asked with instead of its conversation's (``""``: an empty
            block; None: no system turn, i.e. the chat template's default); see `read_eval_data`.
        group_by: a row field (e.g. ``"task"``): each dataset is scored per value of it, one `DatasetResult` per
            value (sorted), named by the value (``dataset/value`` when the data has several datasets). The samples
            are batched and answered as without it; only the scores are split.
        groups: with ``group_by``, the values to score (of the first ``limit`` samples, those that have them).

    Returns:
        An `EvalRun`: per dataset the mean score, the samples, tiles and visual tokens per sample (per LLM layer
        group under LVTC), generate() seconds per sample, and every prediction.
    """
    from tqdm.auto import tqdm

    from ..generation import end_of_turn_token_ids
    from ..processing import TilingMode

    for name, value, least in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                               ("num_beams", num_beams, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if tiling is not None:
        tiling = TilingMode(tiling).value
    sets = _select(read_eval_data(data, processor, metric=metric, limit=limit, system=system, group_by=group_by),
                   groups, group_by, data)
    if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
        raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
    budget = TileBudget(processor.image_processor)
    config = model.config
    eos = end_of_turn_token_ids(processor, model.generation_config)
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos[0]
    was_training = model.training
    model.eval()
    results = []
    try:
        for eval_set in sets:
            score = get_metric(eval_set.metric)
            predictions: list[Prediction | None] = [None] * len(eval_set.samples)
            seconds = 0.0
            bar = tqdm(total=len(eval_set.samples), desc=f"evaluating {eval_set.name}", unit=" samples",
                       disable=not progress, leave=False)
            for options, indices in _batches(eval_set, budget, max_tiles, batch_size):
                samples = [eval_set.samples[i] for i in indices]
                answers, tiles, visual, spent = _generate(model, processor, samples, options, tiling=tiling,
                                                          max_new_tokens=max_new_tokens, num_beams=num_beams,
                                                          eos=eos, pad=pad)
                seconds += spent
                for index, sample, answer, n_tiles, n_visual in zip(indices, samples, answers, tiles, visual):
                    predictions[index] = Prediction(sample.source, sample.id, answer, sample.reference,
                                                    sample.answers, score(answer, sample.answers), n_tiles, n_visual)
                bar.update(len(samples))
            bar.close()
            per_sample = seconds / len(predictions)
            if group_by is None:
                results.append(_result(eval_set.name, eval_set.metric, predictions, per_sample, config))
                continue
            by_value: dict[str, list[Prediction]] = {}
            for sample, prediction in zip(eval_set.samples, predictions):
                by_value.setdefault(sample.group, []).append(prediction)
            prefix = f"{eval_set.name}/" if len(sets) > 1 else ""
            results += [_result(prefix + value, eval_set.metric, by_value[value], per_sample, config)
                        for value in sorted(by_value)]
    finally:
        model.train(was_training)
    image_processor = processor.image_processor
    # The budgets that were applied: --max_tiles, else each dataset's max_dynamic_patch, else the processor's.
    budgets = {s.name: max_tiles or max([x.max_tiles or image_processor.max_tiles for x in s.samples])
               for s in sets}
    options = {"tiling": tiling or TilingMode(image_processor.tiling).value,
               "max_tiles": max(budgets.values()), "max_tiles_per_dataset": budgets, "max_new_tokens": max_new_tokens,
               "num_beams": num_beams, "batch_size": batch_size, "dtype": str(model.dtype).replace("torch.", ""),
               "device": str(model.device)}
    name = checkpoint or str(getattr(config, "name_or_path", "") or type(model).__name__)
    return EvalRun(label=label or name, checkpoint=name, options=options, datasets=results)


__all__ = ["DatasetResult", "EvalRun", "Prediction", "evaluate"]
