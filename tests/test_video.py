"""Video (issue 29): InternVL's frame pickers against the reference's own outputs, decoding with PyAV, frame folders
and in-memory frames, the per-frame pixels against InternVL2's load_video pipeline, and bad input in one line."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvlx_hf.processing import InternVLXImageProcessor
from internvlx_hf.processing.video import (
    VideoReader,
    load_video,
    sample_frame_indices,
    segment_frame_indices,
    video_prompt,
)

FIXTURE = Path(__file__).parent / "fixtures" / "video" / "frame_indices.json"
REFERENCE = json.loads(FIXTURE.read_text())
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FPS, NUM_FRAMES = 25, 20


def _reference_indices(num_frames, fps, bound, num_segments):
    for case in REFERENCE["get_index"]:
        if (case["num_frames"], case["fps"], case["bound"], case["num_segments"]) == (num_frames, fps, bound,
                                                                                       num_segments):
            return case["indices"]
    raise KeyError("case not recorded; add it to scripts/make_video_fixtures.py")


def synthetic_frames(count=NUM_FRAMES, height=48, width=64, seed=0) -> list[np.ndarray]:
    """Noise frames, each different, so a wrong frame index or a wrong resize changes the pixels."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def write_video(path: Path, frames, codec="ffv1", pix_fmt="bgr0", fps=FPS) -> Path:
    """Encode frames with PyAV; ffv1 is lossless, so decoded frames equal the arrays written."""
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'internvlx-hf[video]')")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reference_pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """InternVL2's load_video per frame: `Image.fromarray(frame).convert('RGB')`, dynamic_preprocess with max_num=1
    (the frame resized to one 448 tile, no thumbnail), then build_transform(448): T.Resize((448, 448), BICUBIC) (a
    no-op on a 448x448 image), T.ToTensor() (`u8 / 255` in float32), T.Normalize(ImageNet mean, std)."""
    out = []
    for frame in frames:
        tile = Image.fromarray(frame).convert("RGB").resize((448, 448), Image.BICUBIC)  # dynamic_preprocess, 1x1
        tile = tile.resize((448, 448), Image.BICUBIC)  # T.Resize: PIL returns a copy at the same size
        x = np.asarray(tile).astype(np.float32) / np.float32(255)
        out.append(((x - MEAN) / STD).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


# --- frame indices ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE["get_index"], ids=lambda c: f"{c['num_frames']}f-{c['fps']}-{c['bound']}")
def test_segment_indices_equal_internvl_get_index(case):
    assert REFERENCE["source"]["commit"] == "2410d1dbf208f0e799459aff9376e5747dbf41a2"
    ours = segment_frame_indices(case["num_frames"], case["fps"], case["num_segments"], case["bound"])
    assert ours == case["indices"]


@pytest.mark.parametrize("case", REFERENCE["get_frame_indices"],
                         ids=lambda c: f"{c['sample']}-{c['num_frames']}-{c['video_length']}")
def test_training_sampler_equals_internvl_get_frame_indices(case):
    ours = sample_frame_indices(case["num_frames"], case["video_length"], case["sample"], fps=case["fps"],
                                max_num_frames=case["max_num_frames"])
    assert ours == case["indices"]


@pytest.mark.parametrize("case", REFERENCE["rand"], ids=lambda c: f"seed{c['seed']}")
def test_rand_sampler_draws_as_internvl_with_the_same_seed(case):
    rng = random.Random(case["seed"])
    assert sample_frame_indices(case["num_frames"], case["video_length"], "rand", rng=rng) == case["indices"]


def test_rand_falls_back_to_a_sorted_subset_when_intervals_are_too_short():
    indices = sample_frame_indices(6, 7, "rand", rng=random.Random(0))  # intervals of one frame: no choice
    assert len(indices) == 6 and indices == sorted(indices) and len(set(indices)) == 6 and max(indices) < 7
    # more frames asked than the video has: padded with the last one
    assert sample_frame_indices(5, 3, "middle") == [0, 1, 2, 2, 2]


def test_bad_sampler_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"sampling method must be 'rand', 'middle' or 'fps<N>'.*got 'uniform'"):
        sample_frame_indices(8, 100, "uniform")
    with pytest.raises(ValueError, match="num_segments must be an integer >= 1, got 0"):
        segment_frame_indices(10, 25.0, 0)
    with pytest.raises(ValueError, match=r"bound must satisfy 0 <= start < end \(seconds\), got \(2, 1\)"):
        segment_frame_indices(10, 25.0, 4, bound=(2, 1))


def test_video_prompt_is_internvl2s_frame_lines():
    assert video_prompt(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>"


# --- decoding and pixels ----------------------------------------------------------------------------------------


def test_decoded_frames_and_pixels_equal_the_reference_pipeline(tmp_path):
    frames = synthetic_frames()
    path = write_video(tmp_path / "clip.mkv", frames)
    reader = VideoReader(path)
    assert (reader.num_frames, reader.fps) == (NUM_FRAMES, FPS)  # mkv stores no count: counted by demuxing

    processor = InternVLXImageProcessor()
    for bound, segments in ((None, 8), ((0.2, 0.6), 4)):
        indices = _reference_indices(NUM_FRAMES, float(FPS), list(bound) if bound else None, segments)
        decoded = load_video(path, num_segments=segments, bound=bound)
        assert [np.asarray(f).tobytes() for f in decoded] == [frames[i].tobytes() for i in indices]
        ours = processor(decoded, max_tiles=1, use_thumbnail=False, return_tensors="pt")
        assert ours["num_patches"].tolist() == [1] * segments
        assert torch.equal(ours["pixel_values"], reference_pixels([frames[i] for i in indices]))


def test_lossy_mp4_reads_its_frame_count_and_rate(tmp_path):
    path = write_video(tmp_path / "clip.mp4", synthetic_frames(count=12), codec="mpeg4", pix_fmt="yuv420p", fps=24)
    reader = VideoReader(path)
    assert (reader.num_frames, reader.fps) == (12, 24.0)
    frames = load_video(path, num_segments=4)
    assert [f.size for f in frames] == [(64, 48)] * 4 and all(f.mode == "RGB" for f in frames)


def test_frame_folders_and_in_memory_frames(tmp_path):
    frames = synthetic_frames(count=10)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):  # frame_10 must sort after frame_9
        Image.fromarray(frame).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    expected = _reference_indices(10, 1.0, None, 4)  # a folder has no frame rate: 1 fps
    picked = load_video(folder, num_segments=4)
    assert [np.asarray(f).tobytes() for f in picked] == [frames[i].tobytes() for i in expected]
    # frames passed in memory are the caller's choice: all kept, unless sampling is asked for
    assert len(load_video(frames)) == 10
    assert [np.asarray(f).tobytes() for f in load_video(np.stack(frames), 4, sample=True)] == [
        frames[i].tobytes() for i in expected]


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_videos_fail_in_one_line_naming_the_file(tmp_path):
    pytest.importorskip("av", reason="PyAV is not installed (pip install 'internvlx-hf[video]')")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    short = write_video(tmp_path / "short.mkv", synthetic_frames(count=5))  # 0.2 s at 25 fps
    cases = [
        (garbage, {}, ValueError, "video '.*garbage.mp4': not a readable video"),
        (empty, {}, ValueError, "video '.*empty.mp4': not a readable video"),
        (tmp_path / "missing.mp4", {}, FileNotFoundError, "video '.*missing.mp4': no such file"),
        (short, {"bound": (1.0, 2.0)}, ValueError,
         r"video '.*short.mkv': bound \(1.0, 2.0\) starts at frame 25, after the last frame \(4\)"),
        (short, {"bound": (3, 1)}, ValueError, r"video '.*short.mkv': bound must satisfy 0 <= start < end"),
        (tmp_path, {}, ValueError, "video '.*': the folder holds no frame images"),
    ]
    for video, options, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_video(video, **options)
        assert "\n" not in str(info.value)


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"x")
    with pytest.raises(ImportError, match=r'^Reading video files needs PyAV: pip install "internvlx-hf\[video\]"'):
        load_video(path)
