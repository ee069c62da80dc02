"""Held-out data for `internvlx eval`: what `internvlx train` reads, split into prompts and reference answers.

Rows are read by the reader training uses (`internvlx_hf.data`: InternVL meta JSON / JSONL, TRL rows,
`datasets.Dataset`), so they parse the same way and a bad row is named by the same ``file:line``. Each row's
prompt is its conversation up to the last assistant (``gpt``) turn, rendered with the processor's chat template and
``add_generation_prompt=True``; that last turn is the reference answer. A row may add ``"answers": [...]``, the
answers the metric scores against instead (e.g. the 10 human answers of VQAv2 for ``vqa``; any acceptable answer
for the others).

Unlike training, which skips an unusable row with a warning, evaluation stops at the first one: a score over a
silently smaller set is not the score asked for. Everything is checked before the first answer is generated
(rows, image files and their headers, `<image>` tags against images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..processing.chat_templates import parse_chat_template
from ..data.images import image_size
from ..data.sources import as_sources, parse_row, source_rows
from ..data.videos import VideoSampling, expand_video, read_sample_frames
from ..data.formats import SampleError
from ..metrics import DEFAULT_METRIC, get_metric

_IMAGE_TAG = "<image>"


class _AsWritten:
    """The default of ``system``: each conversation's system turn as the data has it (or none)."""

    def __repr__(self) -> str:
        return "AS_WRITTEN"


AS_WRITTEN = _AsWritten()


@dataclass
class EvalSample:
    """One question: the rendered prompt, its images and the reference answers."""

    prompt: str
    images: list[Any]
    reference: str  # the last assistant turn
    answers: list[str]  # what the metric scores against: the row's "answers", else [reference]
    source: str  # "file.jsonl:12"
    max_tiles: int | None = None  # the row's or its dataset's tile budget (max_dynamic_patch); None: the processor's
    id: Any = None
    video_frames: int = 0  # a video row: its images are this many frames, one tile each
    group: str | None = None  # the row's value of read_eval_data's ``group_by`` field (e.g. its "task")


@dataclass
class EvalSet:
    """One dataset of the held-out data, scored on its own with ``metric``."""

    name: str
    metric: str
    samples: list[EvalSample]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(item.get("text", "") for item in content
                       if isinstance(item, dict) and item.get("type") == "text")
    return ""


def _answers(row: dict[str, Any], where: str) -> list[str] | None:
    answers = row.get("answers")
    if answers is None:
        return None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: \"answers\" must be a non-empty list of strings (the reference answers), got "
                         f"{answers!r:.80}")
    return answers


def _group(row: dict[str, Any], group_by: str | None, where: str) -> str | None:
    if group_by is None:
        return None
    if row.get(group_by) is None:
        raise ValueError(f"{where}: the row has no {group_by!r} field to group the scores by; give every row one, "
                         "or score without group_by")
    return str(row[group_by])


def _sample(row: dict[str, Any], sample, processor, where: str, system: Any = AS_WRITTEN,
            group_by: str | None = None) -> EvalSample:
    frames = 0
    if sample.video is not None:
        # Deterministic frames for scoring: 'middle' (max_num_frame of them) where training draws them at random.
        sampling = sample.video_sampling or VideoSampling()
        if sampling.method == "rand":
            sample.video_sampling = VideoSampling(sampling.min_frames, sampling.max_frames, "middle")
        sample = expand_video(sample, read_sample_frames(sample))
        frames = len(sample.images)
    messages = sample.messages
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation must end with the reference answer (a gpt / assistant turn); "
                         f"its last turn is from the {messages[-1]['role']}")
    reference = _text(messages[-1]["content"]).strip()
    asked = messages[:-1]
    if system is not AS_WRITTEN:  # the question asked under another system block (None: no system turn)
        asked = [m for m in asked if m["role"] != "system"]
        asked = asked if system is None else [{"role": "system", "content": system}] + asked
    try:
        prompt = processor.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2's TemplateError (e.g. a misplaced system turn): training skips such a row
        raise ValueError(f"{where}: the chat template refused the conversation: {error}") from None
    tags = prompt.count(_IMAGE_TAG)
    if tags != len(sample.images):
        # the wording of training's check (internvlx_hf.data.encoding), so both name the same fix
        raise ValueError(f"{where}: the conversation has {tags} {_IMAGE_TAG} tag(s) but {len(sample.images)} "
                         "image(s); give one image per tag, in order")
    tokens = [t for t in (processor.start_image_token, processor.end_image_token, processor.image_token) if t in prompt]
    if tokens:
        raise ValueError(f"{where}: the text itself contains image tokens {tokens}; remove them and use "
                         f"{_IMAGE_TAG} tags")
    for image in sample.images:
        image_size(image)  # missing or unreadable image files fail here, before anything is generated
    answers = _answers(row, where)
    return EvalSample(prompt=prompt, images=sample.images, reference=reference, answers=answers or [reference],
                      source=where, max_tiles=sample.max_tiles, id=row.get("id"), video_frames=frames,
                      group=_group(row, group_by, where))


def read_eval_data(data: Any, processor, *, metric: str | None = None, limit: int | None = None,
                   system: str | None | _AsWritten = AS_WRITTEN, group_by: str | None = None) -> list[EvalSet]:
    """The datasets of ``data`` with their prompts rendered by ``processor``; raises on the first unusable row.

    Args:
        data: what `InternVLXDataset` accepts: a meta JSON / JSONL path (or comma-separated paths), a
            `datasets.Dataset`, a list of rows; or `EvalSet`s read before (``metric`` and ``limit`` still apply).
        metric: the metric of every dataset (default: each meta entry's ``"metric"``, else ``exact_match``).
        limit: score only the first ``limit`` rows of each dataset.
        system: the system block every question is asked with, replacing the conversation's: a string (``""``: an
            empty block), or None for no system turn (the chat template then writes its default, as clients that
            send none get). Default: each conversation as written. How the demo model is scored under each prompt.
        group_by: a row field (e.g. ``"task"``) whose value each sample keeps (`EvalSample.group`), for scores per
            value (`evaluate`'s ``group_by``); a row without it is an error.

    Raises:
        ValueError / FileNotFoundError: naming the file and line of the row (or the option) and the fix.
    """
    if metric is not None:
        get_metric(metric, "--metric")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be an integer >= 1, got {limit!r}")
    if isinstance(data, list) and data and all(isinstance(item, EvalSet) for item in data):
        if system is not AS_WRITTEN:
            raise ValueError("system: the prompts of EvalSets are rendered already; pass system to the "
                             "read_eval_data call that reads the rows")
        if group_by is not None and any(x.group is None for s in data for x in s.samples):
            raise ValueError(f"group_by={group_by!r}: these EvalSets were read without it; pass group_by to the "
                             "read_eval_data call that reads the rows")
        return [EvalSet(s.name, metric or s.metric, s.samples[:limit]) for s in data]
    # as training reads them: internvl2_5 keeps a `gpt` turn before the first `human` one (as context here)
    template = processor.chat_template
    template = template.get("default") if isinstance(template, dict) else template
    keep_leading_reply = (parse_chat_template(template) or ("",))[0] == "internvl2_5"
    sets = []
    for source in as_sources(data):
        samples = []
        for where, raw in source_rows(source):
            if limit is not None and len(samples) >= limit:
                break
            try:
                row, sample = parse_row(source, where, raw, keep_leading_reply=keep_leading_reply)
                samples.append(_sample(row, sample, processor, where, system, group_by))
            except SampleError as error:
                message = str(error)
                raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
        described = str(source.annotation) if source.annotation is not None else source.name
        if not samples:
            raise ValueError(f"{described}: no samples to evaluate (the dataset {source.name!r} is empty)")
        sets.append(EvalSet(name=source.name, metric=metric or source.metric or DEFAULT_METRIC, samples=samples))
    names = [s.name for s in sets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"dataset name(s) {duplicates} appear more than once; results are reported per dataset, so "
                         "give the JSONL files distinct names (or list them in one meta JSON under distinct keys)")
    return sets


__all__ = ["AS_WRITTEN", "EvalSample", "EvalSet", "read_eval_data"]
