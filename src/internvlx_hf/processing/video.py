# Copyright 2025 The internvlx-hf developers. Licensed under the Apache License, Version 2.0.
"""Video frames for InternVL2 / InternVL-X: which frames to take, and decoding them to RGB PIL images.

InternVL2 feeds a video as a handful of frames, each one 448px tile (no tiling, no thumbnail), and writes the prompt
prefix `Frame1: <image>\\nFrame2: <image>\\n...`. Two frame pickers exist in the reference code:

- inference (the model cards' `get_index`): `num_segments` frames at the centres of equal segments of the video, or of
  an optional `(start, end)` bound in seconds -> [`segment_frame_indices`];
- fine-tuning (`internvl_chat/internvl/train/dataset.py`): `rand` (one random frame per interval, for training),
  `middle` (the middle of each interval) or `fpsN` (N frames per second) -> [`sample_frame_indices`].

Decoding uses PyAV (`pip install "internvlx-hf[video]"`; `pip install av` for this file's copy next to a
checkpoint), imported only when a video file is read. A folder of frame
images, a list of PIL images / uint8 arrays, or a 4D uint8 array `(frames, H, W, C)` are videos too.

This file is copied next to checkpoints as remote code: it imports only the standard library, numpy, torch, PIL and
its sibling files (PyAV inside a `try`, so transformers' remote-code import check does not require it).
"""

from __future__ import annotations

import bisect
import os
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from .image_processing_internvlx import load_rgb_image

#: The prompt line of frame `index` (1-based), as InternVL2's model cards write it; `<video>` becomes these lines
#: joined by newlines.
FRAME_PROMPT = "Frame{index}: <image>"
VIDEO_PLACEHOLDER = "<video>"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def video_prompt(num_frames: int, frame_prompt: str = FRAME_PROMPT) -> str:
    """The text a `<video>` of `num_frames` frames stands for: `Frame1: <image>\\n...\\nFrameN: <image>`."""
    return "\n".join(frame_prompt.format(index=i + 1) for i in range(num_frames))


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_bound(bound: Any, name: str = "bound") -> tuple[float, float] | None:
    """`None` or a `(start, end)` pair of seconds with `0 <= start < end` (finite), as floats: the one check of a
    processor's `bound`, `internvlx chat --bound` and a training row's `clip` (``name`` is what the error calls it)."""
    if bound is None:
        return None
    try:
        start, end = (float(x) for x in bound)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (start, end) in seconds, got {bound!r:.60}") from None
    if not (0 <= start < end) or not np.isfinite(end):
        raise ValueError(f"{name} must satisfy 0 <= start < end (seconds), got ({start:g}, {end:g})")
    return start, end


def segment_frame_indices(
    num_frames: int, fps: float, num_segments: int = 32, bound: Sequence[float] | None = None, first_index: int = 0
) -> list[int]:
    """Frame indices InternVL2's `load_video` decodes: the centres of `num_segments` equal segments.

    The segments split the frames from `round(start * fps)` to `round(end * fps)` (the whole video, last frame
    included, without a bound); each index is `int(first + size / 2 + round(size * k))` with round-half-to-even, as
    the model cards' `get_index` computes it. Short videos repeat frames rather than return fewer.

    Args:
        num_frames: frames in the video (the reference's `max_frame` is `num_frames - 1`).
        fps: the video's average frame rate.
        num_segments: frames to return.
        bound: optional `(start, end)` in seconds; the end may lie past the video (it is clipped to the last frame).
        first_index: the smallest index allowed.
    """
    _check_count("num_frames", num_frames)
    _check_count("num_segments", num_segments)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    last = num_frames - 1
    start_index, end_index = first_index, last
    bound = check_bound(bound)
    if bound is not None:
        start_index = max(first_index, round(bound[0] * fps))
        end_index = min(round(bound[1] * fps), last)
        if start_index > last:
            raise ValueError(
                f"bound {bound} starts at frame {start_index}, after the last frame ({last}) of a video of "
                f"{num_frames} frames at {fps:g} fps ({num_frames / fps:g} s); pass a bound inside the video"
            )
    size = (end_index - start_index) / num_segments
    return [int(start_index + size / 2 + round(size * k)) for k in range(num_segments)]


def sample_frame_indices(
    num_frames: int,
    video_length: int,
    method: str = "rand",
    fps: float = 1.0,
    max_num_frames: int = -1,
    rng: random.Random | None = None,
) -> list[int]:
    """Frame indices of InternVL's fine-tuning reader (`get_frame_indices` of its `train/dataset.py`).

    - `"rand"` / `"middle"`: split `video_length` frames into `min(num_frames, video_length)` intervals and take a
      random frame (training) or the middle frame of each; fewer frames than `num_frames` are padded with the last.
    - `"fpsN"` (e.g. `"fps0.5"`): one frame every `1 / N` seconds at the centre of its slot, at most `max_num_frames`
      when that is > 0 (`num_frames` is not used).

    `rand` draws from `rng` (a `random.Random`; the module's generator when `None`). When an interval is shorter
    than two frames, `rand` falls back, like the reference, to a sorted random subset of all frames.
    """
    _check_count("video_length", video_length)
    if method in ("rand", "middle"):
        _check_count("num_frames", num_frames)
        count = min(num_frames, video_length)
        edges = np.linspace(0, video_length, count + 1).astype(int).tolist()
        intervals = [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        rng = rng or random  # the module-level generator, as the reference draws
        if method == "middle":
            indices = [(lo + hi) // 2 for lo, hi in intervals]
        elif all(hi > lo for lo, hi in intervals):
            # The reference draws from range(lo, hi): the interval's last frame is never picked.
            indices = [rng.choice(range(lo, hi)) for lo, hi in intervals]
        else:
            indices = sorted(rng.sample(range(video_length), count))
        return indices + indices[-1:] * (num_frames - len(indices))
    match = re.fullmatch(r"fps(\d+(?:\.\d*)?|\.\d+)", method)
    if match is None:
        raise ValueError(f"sampling method must be 'rand', 'middle' or 'fps<N>' (e.g. 'fps1'), got {method!r}")
    output_fps = float(match.group(1))
    if not output_fps > 0 or not fps > 0:
        raise ValueError(f"{method!r} needs a frame rate > 0 (video fps {fps!r})")
    step = 1 / output_fps
    # Slot centres delta/2, 3*delta/2, ... up to the duration, each rounded to the nearest frame (numpy's arange and
    # around, so the float steps match the reference's).
    seconds = np.arange(step / 2, video_length / fps + step / 2, step)
    indices = [int(i) for i in np.around(seconds * fps).astype(int) if i < video_length]
    return indices[:max_num_frames] if max_num_frames > 0 else indices


# --- decoding ---------------------------------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError:
        # The package's extra pins the PyAV it was tested with; this file's copy next to a checkpoint runs where
        # internvlx-hf may not be installed (transformers_modules...), and there the package itself is the fix.
        fix = '"internvlx-hf[video]"' if __name__.split(".")[0] == "internvlx_hf" else "av"
        raise ImportError(
            f"Reading video files needs PyAV: pip install {fix} (or pass a folder of frame images / a list of frames "
            "instead)."
        ) from None
    return av


class VideoReader:
    """A video file opened with PyAV: its frame count and average fps, and the RGB frames at given indices.

    Frames are counted by demuxing when the container does not store the count. Frame `i` is the `i`-th frame in
    presentation order, as decord (InternVL's reader) numbers them, and `get_frames` seeks to the keyframe before each
    wanted frame rather than decoding from the start (a bound late in a long video decodes a few frames, not all).
    `frames_decoded` is how many frames the last `get_frames` call decoded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"video {self.path!r}: no such file; pass an existing video file or frame folder")
        av = _import_av()
        self._index: _FrameIndex | None = None
        self._indexed = False
        try:
            with av.open(self.path) as container:
                if not container.streams.video:
                    raise ValueError(f"video {self.path!r}: the file has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                count = stream.frames
                if not count:  # counted by demuxing, which reads what seeking needs as well
                    count, self._index = _scan_packets(container, stream)
                    self._indexed = True
        except av.FFmpegError as err:
            raise ValueError(
                f"video {self.path!r}: not a readable video ({err}); the file may be corrupt, truncated or not a video"
            ) from None
        if count < 1:
            raise ValueError(f"video {self.path!r}: the video has no frames (zero length)")
        if not rate:
            raise ValueError(f"video {self.path!r}: the file stores no frame rate; re-encode it or pass its frames")
        self.num_frames = int(count)
        self.fps = float(Fraction(rate))
        self.frames_decoded = 0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def get_frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """RGB PIL images of the frames at `indices` (in that order; repeats allowed)."""
        wanted = sorted(set(int(i) for i in indices))
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.num_frames):
            raise ValueError(f"video {self.path!r}: frame indices {wanted} outside 0..{self.num_frames - 1}")
        av = _import_av()
        self.frames_decoded = 0
        try:
            frames = self._decode_seeking(av, wanted) if wanted else {}
            if frames is None:  # the timestamps cannot be trusted to number the frames: decode from the start
                frames = self._decode_in_order(av, wanted)
        except av.FFmpegError as err:
            raise ValueError(f"video {self.path!r}: decoding failed ({err}); the file may be corrupt") from None
        missing = [i for i in wanted if i not in frames]
        if missing:
            raise ValueError(
                f"video {self.path!r}: the container says {self.num_frames} frames but frames {missing} could not be "
                "decoded; the file is probably truncated. Re-encode it."
            )
        return [frames[int(i)] for i in indices]

    def _decode_in_order(self, av, wanted: list[int]) -> dict[int, Image.Image]:
        """Every frame from the start, frame `i` being the `i`-th one decoded."""
        frames: dict[int, Image.Image] = {}
        pending = set(wanted)
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                self.frames_decoded += 1
                if position in pending:
                    frames[position] = frame.to_image().convert("RGB")
                if len(frames) == len(wanted):
                    break
        return frames

    def _decode_seeking(self, av, wanted: list[int]) -> dict[int, Image.Image] | None:
        """The `wanted` frames (sorted), each decoded from the last keyframe at or before it, or from where the
        previous one left off when no keyframe lies between them; None where the frames cannot be numbered exactly.

        A frame's number is the rank of its timestamp among the stream's packets (`_scan_packets`), which is its
        position in the decode from the start whenever the decoder gives one frame per packet in presentation order.
        Each decoded run is checked to do so: it must reach its keyframe exactly, decoded as a keyframe (a demuxer
        seeking by decode timestamps, as AVI's does, may land past it), and then give consecutive numbers; a frame
        that is dropped, unknown or out of place ends the attempt, and the caller decodes from the start instead.
        Variable frame rates need no special case: numbers come from the order of the timestamps, not their values.
        """
        if not self._indexed:
            with av.open(self.path) as container:
                _, self._index = _scan_packets(container, container.streams.video[0])
            self._indexed = True
        index = self._index
        if index is None or len(index.pts) != self.num_frames:
            return None
        rank = {pts: number for number, pts in enumerate(index.pts)}
        pending = set(wanted)
        frames: dict[int, Image.Image] = {}
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded, position = None, -1  # position: the number of the last frame decoded
            for target in wanted:
                if target in frames:
                    continue
                before = bisect.bisect_right(index.keyframes, target) - 1
                keyframe = index.keyframes[before] if before >= 0 else None
                if keyframe is not None and keyframe > position + 1:  # skip the frames up to the keyframe
                    container.seek(index.pts[keyframe], stream=stream, backward=True, any_frame=False)
                    decoded, position = container.decode(stream), keyframe - 1
                elif decoded is None:  # the target comes before any seek would help: decode from the start
                    decoded = container.decode(stream)
                for frame in decoded:
                    self.frames_decoded += 1
                    number = rank.get(frame.pts)
                    if number is None:
                        return None
                    if number <= position:  # before the keyframe: an open GOP's leading frames, or an early landing
                        continue
                    if number != position + 1 or (number == keyframe and not frame.key_frame):
                        return None
                    position = number
                    if number in pending:
                        frames[number] = frame.to_image().convert("RGB")
                    if number == target:
                        break
                else:  # the stream ended before the target: let the decode from the start report it
                    return None
        return frames


class _FrameIndex(NamedTuple):
    pts: list[int]  # the stream's packet timestamps in presentation order: frame i has pts[i]
    keyframes: list[int]  # numbers of the keyframes, ascending


def _scan_packets(container, stream) -> tuple[int, _FrameIndex | None]:
    """Demux `stream` (no decoding): its packet count, and its frames' timestamps and keyframes, or None where the
    timestamps cannot number the frames (a packet without pts, as raw elementary streams have; a repeated pts; a
    packet the demuxer marks as discarded, whose frame the decoder drops)."""
    count, usable, packets = 0, True, []
    for packet in container.demux(stream):
        if not packet.size:  # the flush packet at the end
            continue
        count += 1
        if packet.pts is None or packet.is_discard:
            usable = False
        if usable:
            packets.append((packet.pts, bool(packet.is_keyframe)))
    if not usable or len({pts for pts, _ in packets}) != len(packets):
        return count, None
    packets.sort()
    return count, _FrameIndex([pts for pts, _ in packets], [n for n, (_, key) in enumerate(packets) if key])


def frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in frame order: by the last number in the name (`frame_10` after `frame_9`),
    then by name."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]

    def key(path: Path):
        numbers = re.findall(r"\d+", path.stem)
        return (int(numbers[-1]) if numbers else -1, path.name)

    return sorted(files, key=key)


def is_frame(item: Any) -> bool:
    """A single frame: a PIL image or a 3D (HWC/CHW) uint8 array/tensor."""
    return isinstance(item, Image.Image) or (hasattr(item, "ndim") and hasattr(item, "shape") and item.ndim == 3)


def is_video(item: Any) -> bool:
    """A video: a file or folder path, a 4D array/tensor of frames, or a non-empty list of frames."""
    if isinstance(item, (str, os.PathLike)):
        return True
    if hasattr(item, "ndim") and hasattr(item, "shape"):
        return item.ndim == 4
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(is_frame(x) for x in item)


def flatten_videos(videos: Any) -> list[Any]:
    """Videos in order: one video, a list of videos, or a list of lists (the videos of each prompt)."""
    if is_video(videos):
        return [videos]
    if isinstance(videos, (list, tuple)):
        return [video for item in videos for video in flatten_videos(item)]
    raise TypeError(
        f"unsupported video {type(videos).__name__}: pass a video file path, a folder of frame images, a list of PIL "
        "images / uint8 arrays, or a uint8 array (frames, H, W, C)"
    )


def load_video(
    video: Any,
    num_segments: int = 8,
    bound: Sequence[float] | None = None,
    fps: float | None = None,
    sample: bool | None = None,
) -> list[Image.Image]:
    """The RGB frames InternVL2's `load_video` feeds the model, before the per-frame 448px transform.

    Args:
        video: a video file (decoded with PyAV), a folder of frame images, a list of PIL images / uint8 arrays, or
            a 4D uint8 array `(frames, H, W, C)`.
        num_segments: frames to pick with [`segment_frame_indices`].
        bound: optional `(start, end)` in seconds.
        fps: frame rate of a folder or list of frames (default 1, as InternVL's frame-folder reader assumes); a video
            file's own rate is used for files.
        sample: pick `num_segments` frames (the default for files and folders) or keep every frame (the default for
            frames passed in memory, which the caller already chose).
    """
    reader = None
    if isinstance(video, (str, os.PathLike)):
        where = f"video {os.fspath(video)!r}"
        if Path(video).is_dir():
            frames: list[Any] = frame_files(Path(video))
            if not frames:
                raise ValueError(f"{where}: the folder holds no frame images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        else:
            reader = VideoReader(video)
            frames, fps = range(reader.num_frames), reader.fps
        sample = True if sample is None else sample
    elif is_video(video):
        frames, where = list(video), f"video ({len(video)} frames in memory)"
    else:
        raise TypeError(
            f"unsupported video {type(video).__name__}: pass a video file path, a folder of frame images, a list of "
            "PIL images / uint8 arrays, or a uint8 array (frames, H, W, C)"
        )
    if sample:
        try:
            indices = segment_frame_indices(len(frames), fps or 1.0, num_segments, bound)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        frames = [frames[i] for i in indices]
    elif bound is not None:
        raise ValueError(f"{where}: a bound needs frame sampling (sample=False keeps every frame)")
    if reader is not None:
        return reader.get_frames(list(frames))
    return [load_rgb_image(frame, i) for i, frame in enumerate(frames)]


__all__ = [
    "FRAME_PROMPT",
    "VIDEO_PLACEHOLDER",
    "VideoReader",
    "flatten_videos",
    "frame_files",
    "is_video",
    "load_video",
    "sample_frame_indices",
    "segment_frame_indices",
    "video_prompt",
]
