"""Video rows of InternVL data: which frames a sample gets, and the video row turned into an image row.

InternVL's fine-tuning (`internvl_chat_finetune.py` `video_get_item` + `train/dataset.py` readers) takes a random
number of frames between the dataset's ``min_num_frame`` and ``max_num_frame`` (meta keys; 8 and 32 by default),
picks them with ``sampling_method`` (``rand`` by default, ``middle`` or ``fpsN``) inside the row's ``clip``, and
replaces ``<video>\\n`` with ``Frame-1: <image>\\nFrame-2: <image>\\n...`` (its training prompt; its model cards
write ``Frame1:`` at inference). Every frame is one tile. Here a video sample becomes an image sample with those
frames as its images and a tile budget of one tile each, so encoding, labels, truncation (never inside a frame's
block), packing and the summary treat frames as images.

Outside training (``rand`` not wanted, e.g. `internvlx eval`), ``middle`` takes ``max_num_frame`` frames: the
reference draws the count at random even then, which would make evaluation non-deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..processing.video import VideoReader, frame_files, sample_frame_indices, video_prompt
from .formats import VIDEO_TAG, Sample, SampleError

#: InternVL's training prompt line of a frame (`video_get_item`).
TRAINING_FRAME_PROMPT = "Frame-{index}: <image>"


@dataclass(frozen=True)
class VideoSampling:
    """A dataset's frame sampling (meta keys ``min_num_frame``, ``max_num_frame``, ``sampling_method``)."""

    min_frames: int = 8
    max_frames: int = 32
    method: str = "rand"

    def __post_init__(self):
        for name, value in (("min_num_frame", self.min_frames), ("max_num_frame", self.max_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_num_frame ({self.min_frames}) must not exceed max_num_frame ({self.max_frames})")
        sample_frame_indices(1, 1, self.method)  # the error for an unknown method

    def frame_count(self, rng: random.Random) -> int:
        """Frames to take: a random count in [min, max] for ``rand`` (as InternVL draws it), else the maximum."""
        return rng.randint(self.min_frames, self.max_frames) if self.method == "rand" else self.max_frames


def read_sample_frames(sample: Sample, rng: random.Random | None = None) -> list[Any]:
    """The RGB frames of a video sample, chosen as InternVL's readers choose them; `SampleError` if unusable.

    ``rng`` defaults to the `random` module, which PyTorch's DataLoader seeds differently in every worker.
    """
    sampling = sample.video_sampling or VideoSampling()
    rng = rng or random
    count = sampling.frame_count(rng)
    path = Path(sample.video)
    where = f"video {str(sample.video)!r}"
    try:
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise SampleError("unreadable video", f"{where}: the folder holds no frame images")
            # InternVL's folder reader keeps every frame of a folder that has no more than it needs.
            indices = list(range(len(files)))
            if len(files) > count:
                indices = sample_frame_indices(count, len(files), sampling.method, rng=rng)
            from .images import load_image

            return [load_image(str(files[i]), i) for i in indices]
        if not path.is_file():
            raise SampleError("video not found", f"{where} not found")
        reader = VideoReader(path)
        length, first = reader.num_frames, 0
        if sample.clip is not None:
            start, end = sample.clip
            length, first = int((end - start) * reader.fps), int(start * reader.fps)
            if length < 1 or first + length > reader.num_frames:
                raise SampleError("unreadable video", f"{where}: clip {list(sample.clip)} lies outside the video "
                                                      f"({reader.duration:.2f} s)")
        indices = sample_frame_indices(count, length, sampling.method, fps=reader.fps,
                                       max_num_frames=sampling.max_frames, rng=rng)
        return reader.get_frames([first + i for i in indices])
    except SampleError:
        raise
    except ImportError as error:
        raise SampleError("unreadable video", f"{where}: {error}") from None
    except (ValueError, OSError) as error:
        message = str(error)
        raise SampleError("unreadable video", message if message.startswith("video") else f"{where}: {message}") \
            from None


def expand_video(sample: Sample, frames: list[Any]) -> Sample:
    """The video sample as an image sample: ``<video>\\n`` -> the frame lines, the frames as its images, one tile
    each (a budget of ``len(frames)`` tiles shared by ``len(frames)`` images)."""
    lines = video_prompt(len(frames), TRAINING_FRAME_PROMPT)
    messages = []
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, str) and VIDEO_TAG in content:
            content = content.replace(VIDEO_TAG + "\n", lines + "\n").replace(VIDEO_TAG, lines)
        messages.append({**message, "content": content})
    return replace(sample, messages=messages, images=list(frames), max_tiles=len(frames), video=None, clip=None)


def planned_frames(sample: Sample) -> int:
    """Frames a video sample is measured with before loading (length estimates): the dataset's maximum."""
    return (sample.video_sampling or VideoSampling()).max_frames


__all__ = ["TRAINING_FRAME_PROMPT", "VideoSampling", "expand_video", "planned_frames", "read_sample_frames"]
