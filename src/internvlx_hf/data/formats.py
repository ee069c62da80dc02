"""Training rows in the two formats InternVL users have, normalised to one: chat `messages` + `images`.

- InternVL's JSONL (`internvl_chat/shell/data/*.json` meta files point at these): ``{"image": "a.jpg" | [...],
  "conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}``, image paths relative to the
  dataset's ``root``. Values are stripped (InternVL's internlm2-chat preprocessing does; its Hermes-2 / phi3-chat /
  internvl2_5 ones keep the whitespace, see the fine-tuning docs for why every template strips here), a leading
  non-human turn (after an optional system turn) is dropped as InternVL2's preprocessing does (InternVL2.5's keeps
  and trains it: ``keep_leading_reply``), and a single-image sample whose conversation has no ``<image>`` gets
  ``"<image>\\n"`` prepended to its first human turn.
- TRL's conversational rows: ``{"messages": [{"role": ..., "content": str | [{"type": "image"}, {"type": "text",
  "text": ...}]}], "images": [...]}`` (or a single ``"image"``). Images are paths, PIL images or undecoded
  ``datasets.Image`` dicts (``{"bytes", "path"}``). When no message holds an image placeholder, the images are put
  at the start of the first user message, as TRL's ``prepare_multimodal_messages`` does.
- InternVL's video rows: ``{"video": "x.mp4" | "frames_folder/", "clip": [start, end] (optional, seconds),
  "conversations": [...]}``; a first turn without ``<video>`` gets ``"<video>\\n"`` prepended, as InternVL's
  ``video_get_item`` does. The frames are chosen and the tag expanded when the sample is loaded (`videos`).

Both become a `Sample`; anything unusable raises `SampleError`, whose ``reason`` is the short category counted in
the dataset summary. A system turn is allowed only as the first turn, once (every InternVL template renders it as
the system block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..processing.video import check_bound

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_INTERNVL_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_CHAT_ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A training sample that cannot be used. ``reason`` is a short category ("image not found", ...) for counts;
    the message gives the details."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Sample:
    """One training conversation: chat messages (InternVL templates' content format) and its images in order."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    source: str = ""
    max_tiles: int | None = None
    video: Any = None  # an InternVL video row's video (file or frame folder), until `videos.expand_video`
    clip: tuple[float, float] | None = None
    video_sampling: Any = None  # the dataset's `videos.VideoSampling`

    def as_row(self) -> ChatRow:
        return ChatRow({"messages": self.messages, "images": self.images, "max_tiles": self.max_tiles,
                        "source": self.source})


class ChatRow(Mapping):
    """A row as `InternVLXDataset` yields it (``messages``, ``images``, ``max_tiles``, ``source``): a read-only
    mapping that is deliberately not a `dict`.

    Its keys are the collator's input, not the model's. transformers' `Trainer` with its default
    ``remove_unused_columns=True`` wraps the collator of a torch dataset in `RemoveColumnsCollator`, which keeps only
    the keys of a `dict` row that ``model.forward`` names (none of these: the collator then saw empty rows, "got keys
    []") and passes any other row through as it is. So the plain `Trainer` works with its default arguments, and the
    model's signature does not have to name collator inputs."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ChatRow({self._values!r})"

    def __reduce__(self):  # DataLoader workers pickle rows; __slots__ without __dict__ needs this
        return ChatRow, (self._values,)


def _resolve_image(image: Any, root: Path | None) -> Any:
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if "://" in image:
            raise SampleError("remote image", f"image {image!r} is a URL; download the images and give local paths")
        if root is not None and not os.path.isabs(image):
            return os.path.join(root, image)
    return image


def _check_system_turns(messages: list[dict[str, Any]]) -> None:
    positions = [i + 1 for i, message in enumerate(messages) if message["role"] == "system"]
    if positions and positions != [1]:
        raise SampleError(
            "misplaced system turn",
            f"a system turn must be the first turn, and only one is allowed; this row has {len(positions)} at "
            f"turn(s) {positions}. Merge them into one first turn",
        )


def _internvl_video(row: dict[str, Any], root: Path | None) -> tuple[Any, tuple[float, float] | None]:
    """The video and clip of an InternVL video row, and its first turn given a `<video>` tag if it has none."""
    if row.get("image") not in (None, "", []):
        raise SampleError("bad format", "a row has either `image` or `video`, not both (InternVL reads the video only)")
    video = row["video"]
    if not isinstance(video, (str, os.PathLike)):
        raise SampleError("bad format", f"`video` must be a file or folder path, got {type(video).__name__}")
    if "://" in os.fspath(video):
        raise SampleError("remote video", f"video {video!r} is a URL; download the videos and give local paths")
    if root is not None and not os.path.isabs(video):
        video = os.path.join(root, video)
    try:
        clip = check_bound(row.get("clip"), "`clip`")
    except ValueError as error:
        raise SampleError("bad format", str(error)) from None
    turns = row.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(turn, dict) for turn in turns):
        count = sum(turn["value"].count(VIDEO_TAG) for turn in turns if isinstance(turn.get("value"), str))
        # InternVL prepends the tag to conversations[0] when the row has none; that is the human turn unless the row
        # opens with a system turn, where the tag belongs to the first turn after it.
        first = next((i for i, turn in enumerate(turns) if turn.get("from") != "system"), None)
        if count == 0 and first is not None and isinstance(turns[first].get("value"), str):
            turns = [*turns[:first], {**turns[first], "value": VIDEO_TAG + "\n" + turns[first]["value"]},
                     *turns[first + 1:]]
            count = 1
        if count != 1:
            raise SampleError("video count mismatch", f"a video row needs exactly one {VIDEO_TAG} tag, got {count}")
        row["conversations"] = turns
    return video, clip


def _internvl_sample(row: dict[str, Any], root: Path | None, source: str, keep_leading_reply: bool) -> Sample:
    video = clip = None
    if row.get("video"):
        row = dict(row)
        video, clip = _internvl_video(row, root)
    raw_images = row.get("image")
    if raw_images is None or raw_images == "" or raw_images == []:
        images = []
    elif isinstance(raw_images, (list, tuple)):
        images = list(raw_images)
    else:
        images = [raw_images]
    conversations = row["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("bad format", "`conversations` must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError("bad format", f"a turn must be {{'from': ..., 'value': ...}}, got {turn!r:.80}")
        role = _INTERNVL_ROLES.get(turn["from"])
        if role is None:
            raise SampleError(
                "unknown role", f"turn 'from' must be one of {sorted(_INTERNVL_ROLES)}, got {turn['from']!r}"
            )
        if not isinstance(turn["value"], str):
            raise SampleError("bad format", f"turn 'value' must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": role, "content": turn["value"].strip()})
    _check_system_turns(messages)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    # InternVL2's preprocessing skips a first turn that is not from the human; InternVL2.5's trains it.
    if turns and turns[0]["role"] != "user" and not keep_leading_reply:
        turns = turns[1:]
    first_user = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
    if first_user is None:
        raise SampleError("no human turn", "the conversation has no human turn to learn a reply to (a leading gpt "
                                           "turn is dropped, as InternVL does); start it with a human turn")
    if not any(IMAGE_TAG in m["content"] for m in turns) and len(images) == 1:
        turns[first_user] = {"role": "user", "content": IMAGE_TAG + "\n" + turns[first_user]["content"]}
    if video is not None and not any(VIDEO_TAG in m["content"] for m in turns):
        raise SampleError("video count mismatch", f"the {VIDEO_TAG} tag was in a dropped leading turn; put it in "
                                                  "the first human turn")
    return Sample(messages=system + turns, images=[_resolve_image(i, root) for i in images], source=source,
                  video=video, clip=clip)


def _has_placeholder(messages: list[dict[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            if IMAGE_TAG in content:
                return True
        elif isinstance(content, list):
            for item in content:
                if isinstance(item, str) and IMAGE_TAG in item:
                    return True
                if isinstance(item, dict) and (item.get("type") in ("image", "image_url")
                                               or IMAGE_TAG in str(item.get("text", ""))):
                    return True
    return False


def _strip_media(content: Any) -> Any:
    # The template only needs to know that an image item is there; dropping the decoded image keeps rendering cheap.
    if isinstance(content, list):
        return [{"type": "image"} if isinstance(item, dict) and item.get("type") in ("image", "image_url") else item
                for item in content]
    return content


def _chat_sample(row: dict[str, Any], root: Path | None, source: str) -> Sample:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad format", "`messages` must be a non-empty list of {'role', 'content'} messages")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise SampleError("bad format", f"a message must be {{'role': ..., 'content': ...}}, got {message!r:.80}")
        if message["role"] not in _CHAT_ROLES:
            raise SampleError("unknown role", f"message role must be one of {list(_CHAT_ROLES)}, got "
                                              f"{message['role']!r}")
        clean.append({"role": message["role"], "content": _strip_media(message.get("content", ""))})
    _check_system_turns(clean)
    if row.get("video") or any(isinstance(item, dict) and item.get("type") == "video"
                               for m in clean if isinstance(m["content"], list) for item in m["content"]):
        raise SampleError("video sample", "video in `messages` rows is not supported; use InternVL's video rows "
                                          '{"video": "x.mp4", "conversations": [...]}')
    if "images" in row and row["images"] is not None:
        images = list(row["images"]) if isinstance(row["images"], (list, tuple)) else [row["images"]]
    elif row.get("image") is not None:
        images = [row["image"]]
    else:
        images = []
    if images and not _has_placeholder(clean):
        first_user = next((i for i, m in enumerate(clean) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("no user turn", f"the row has {len(images)} image(s) but no user message to put them "
                                              "in; start the conversation with a user message")
        content = clean[first_user]["content"]
        items = content if isinstance(content, list) else [{"type": "text", "text": content}]
        clean[first_user] = {"role": "user", "content": [{"type": "image"} for _ in images] + items}
    return Sample(messages=clean, images=[_resolve_image(i, root) for i in images], source=source)


def sample_from_row(row: Any, *, root: str | os.PathLike | None = None, source: str = "",
                    max_tiles: int | None = None, keep_leading_reply: bool = False) -> Sample:
    """Normalise one InternVL (`conversations`) or TRL (`messages`) row; raises `SampleError` if unusable.

    Args:
        root: folder that relative image paths are relative to (None: as given, i.e. the current directory).
        source: where the row comes from (``"file.jsonl:12"``), used in messages.
        max_tiles: the row's tile budget (a dataset's ``max_dynamic_patch``), or None for the processor's.
        keep_leading_reply: keep a `gpt` turn that comes before the first `human` turn of an InternVL row (InternVL's
            `internvl2_5` preprocessing trains it) instead of dropping it (its InternVL2 templates' preprocessing).
    """
    if not isinstance(row, Mapping):
        raise SampleError("bad format", f"a row must be a JSON object, got {type(row).__name__}")
    root = Path(root) if root is not None else None
    if "conversations" in row:
        sample = _internvl_sample(row, root, source, keep_leading_reply)
    elif "messages" in row:
        sample = _chat_sample(row, root, source)
    elif not row:
        # What transformers' Trainer leaves of a `datasets.Dataset` row (remove_unused_columns=True drops every
        # column that model.forward does not name, before the collator sees them).
        raise SampleError("bad format", "a row with no keys: a Trainer with remove_unused_columns=True dropped the "
                                        "`messages`/`conversations` columns before the collator; give the Trainer "
                                        "TrainingArguments(remove_unused_columns=False), or an InternVLXDataset "
                                        "built on the data")
    else:
        raise SampleError(
            "bad format",
            f"a row needs `conversations` (InternVL JSONL) or `messages` (TRL), got keys {sorted(row)[:8]}",
        )
    row_tiles = row.get("max_tiles")
    sample.max_tiles = row_tiles if isinstance(row_tiles, int) and row_tiles > 0 else max_tiles
    return sample


__all__ = ["IMAGE_TAG", "VIDEO_TAG", "Sample", "SampleError", "sample_from_row"]
