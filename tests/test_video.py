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


def write_video(path: Path, frames, codec="ffv1", pix_fmt="bgr0", fps=FPS, options=None, format=None,
                pts_ms=None) -> Path:
    """Encode frames with PyAV; ffv1 is lossless, so decoded frames equal the arrays written. ``options``: the
    encoder's (e.g. ``{"g": "10"}``, a keyframe every 10 frames); ``format``: the container's, where the suffix does
    not say it; ``pts_ms``: each frame's timestamp in milliseconds (a variable frame rate), instead of 1 / fps."""
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'internvlx-hf[video]')")
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps), options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index, frame in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[index], Fraction(1, 1000)
            for packet in stream.encode(frame):
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


def moving_frames(count=60, height=48, width=64, seed=0) -> list[np.ndarray]:
    """A smoothed noise texture sliding 2 px a frame: every frame differs, yet consecutive ones are alike, so
    inter-frame codecs make P and B frames (on pure noise they code every frame as a keyframe)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, width * 4, 3)).astype(np.uint16)
    texture = ((texture + np.roll(texture, 1, 1) + np.roll(texture, 1, 0)) // 3).astype(np.uint8)
    return [np.ascontiguousarray(texture[:, 2 * i:2 * i + width]) for i in range(count)]


# 60 frames each: (file name, codec, pix_fmt, encoder options, container format, timestamps in ms, decoding of
# frame 57): "seek" from the last keyframe at or before it, "start" from the first frame, None not checked.
_VFR_MS = [40 * i + (7 if i % 3 == 1 else 0) + 100 * (i // 20) for i in range(60)]
SEEK_VIDEOS = {
    "ffv1 mkv, a keyframe every 10": ("clip.mkv", "ffv1", "bgr0", {"g": "10"}, None, None, "seek"),
    "h264 mp4, B-frames": ("clip.mp4", "libx264", "yuv420p", {"g": "10", "bf": "2"}, None, None, "seek"),
    "mpeg4 mkv, B-frames, variable frame rate": ("vfr.mkv", "mpeg4", "yuv420p", {"bf": "2", "qscale": "2"}, None,
                                                 _VFR_MS, "seek"),
    # AVI seeks by decode order and lands past the keyframe of frame 57: the reader sees it and starts over.
    "mpeg4 avi, B-frames": ("clip.avi", "mpeg4", "yuv420p", {"bf": "2", "qscale": "2"}, None, None, None),
    "raw h264, no timestamps": ("clip.h264", "libx264", "yuv420p", {"g": "10", "bf": "2"}, "h264", None, "start"),
}
INDEX_SETS = [[0], [5], [57], [59], [12, 3, 3, 40, 12], list(range(50, 60)), [59, 0, 30, 29, 31, 30]]


@pytest.mark.parametrize("case", SEEK_VIDEOS)
def test_seeking_gives_the_frames_of_a_decode_from_the_start(tmp_path, case):
    """`VideoReader.get_frames` seeks to the keyframe before each wanted frame; it must return exactly the frames
    that decoding the whole video in order numbers so (frame i = the i-th decoded), and decode from the start
    where timestamps cannot number the frames."""
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'internvlx-hf[video]')")
    name, codec, pix_fmt, options, container_format, pts_ms, decoding = SEEK_VIDEOS[case]
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames = moving_frames()
    path = write_video(tmp_path / name, frames, codec, pix_fmt, options=options, format=container_format,
                       pts_ms=pts_ms)
    with av.open(str(path)) as container:
        in_order = [frame.to_image().convert("RGB").tobytes() for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        packets = sorted((p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size and p.pts is not None)
    keyframes = [number for number, (_, key) in enumerate(packets) if key]
    assert len(in_order) == 60 and len(set(in_order)) == 60
    if codec == "ffv1":
        assert in_order == [Image.fromarray(frame).tobytes() for frame in frames]  # lossless
    if decoding == "seek":
        assert 1 < len(keyframes) < 60, keyframes  # a real group of pictures: seeking has something to skip

    reader = VideoReader(path)
    for indices in INDEX_SETS:
        assert [frame.tobytes() for frame in reader.get_frames(indices)] == [in_order[i] for i in indices], indices
    reader.get_frames([57])
    if decoding == "seek":
        assert reader.frames_decoded == 57 - max(k for k in keyframes if k <= 57) + 1
    elif decoding == "start":
        assert reader.frames_decoded == 58


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


def test_missing_pyav_in_remote_code_says_pip_install_av(tmp_path):
    """The copy of video.py next to a checkpoint runs where internvlx-hf may not be installed: it cannot name the
    package's extra, and `pip install av` is the fix there."""
    import textwrap

    from conftest import run_isolated_python
    from test_processor import make_processor

    checkpoint = tmp_path / "checkpoint"
    make_processor(image_seq_length=2).save_pretrained(checkpoint)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class _NoAV(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "av" or name.startswith("av."):
                    raise ModuleNotFoundError("No module named 'av' (hidden by the test)")
        sys.meta_path.insert(0, _NoAV())
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        try:
            processor(text=["<video>\\nQ"], videos=[{str(clip)!r}])
        except ImportError as error:
            print(type(processor).__module__.split(".")[0], "|", error)
        """
    )
    result = run_isolated_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "transformers_modules | Reading video files needs PyAV: pip install av (or pass a folder of frame images / "
        "a list of frames instead).")


# --- processor --------------------------------------------------------------------------------------------------


def _frame_tokens(num_frames: int, seq: int) -> list[int]:
    """Token ids of `Frame1: <image>\\n...FrameN: <image>` with each `<image>` one tile of `seq` tokens."""
    from test_processor import ids, image_tokens

    out = []
    for i in range(num_frames):
        out += ids(("\n" if i else "") + f"Frame{i + 1}: ") + image_tokens(1, seq)
    return out


def test_processor_takes_videos_as_internvl2_frames(tmp_path):
    from test_processor import ids, make_processor

    frames = synthetic_frames()
    path = write_video(tmp_path / "clip.mkv", frames)
    processor = make_processor(image_seq_length=2)
    out = processor(text=["<video>\nWhat moves?"], videos=[path], num_frames=8, return_tensors="pt")
    assert out["input_ids"][0].tolist() == _frame_tokens(8, 2) + ids("\nWhat moves?")
    assert out["num_patches"].tolist() == [1] * 8 and out["tile_grid"].tolist() == [[1, 1]] * 8
    indices = _reference_indices(NUM_FRAMES, float(FPS), None, 8)
    assert torch.equal(out["pixel_values"], reference_pixels([frames[i] for i in indices]))
    # a bound, and the default of 8 frames
    bounded = processor(text="<video>\nQ", videos=path, bound=(0.2, 0.6), num_frames=4, return_tensors="pt")
    indices = _reference_indices(NUM_FRAMES, float(FPS), [0.2, 0.6], 4)
    assert torch.equal(bounded["pixel_values"], reference_pixels([frames[i] for i in indices]))
    assert processor(text="<video>\nQ", videos=path)["num_patches"] == [1] * 8


def test_images_and_videos_keep_the_order_of_their_tags():
    from test_processor import ids, image_tokens, make_processor

    processor = make_processor(image_seq_length=1, max_tiles=4)
    wide = Image.new("RGB", (896, 448), (10, 200, 30))  # 2 tiles + thumbnail
    frames = [Image.fromarray(f) for f in synthetic_frames(count=3)]
    other = [Image.fromarray(f) for f in synthetic_frames(count=2, seed=1)]
    out = processor(text=["<image>\n<video>\nA", "<video>\nB"], images=[[wide], []], videos=[[frames], [other]],
                    padding=True, return_tensors="pt")
    assert out["num_patches"].tolist() == [3, 1, 1, 1, 1, 1]
    alone = [processor(images=[wide], return_tensors="pt")["pixel_values"]]
    alone += [processor(images=[f], max_tiles=1, return_tensors="pt")["pixel_values"] for f in frames + other]
    assert torch.equal(out["pixel_values"], torch.cat(alone))
    first = image_tokens(3, 1) + ids("\n") + _frame_tokens(3, 1) + ids("\nA")
    assert out["input_ids"][0].tolist()[-len(first):] == first
    # frames passed in memory are all used unless sampling is asked for
    sampled = processor(text="<video>", videos=[frames], num_frames=2, do_sample_frames=True)
    assert sampled["num_patches"] == [1, 1]


def test_chat_messages_with_video_items(tmp_path):
    from test_processor import make_processor

    path = write_video(tmp_path / "clip.mkv", synthetic_frames())
    processor = make_processor(image_seq_length=2)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "Q"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>user\n<video>\nQ<|im_end|>" in rendered
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        num_frames=4, return_tensors="pt")
    direct = processor(text=rendered, videos=[path], num_frames=4, return_tensors="pt")
    assert out["input_ids"].tolist() == direct["input_ids"].tolist()
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    frames = [Image.fromarray(f) for f in synthetic_frames(count=3)]
    in_memory = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Q"}]}]
    out = processor.apply_chat_template(in_memory, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["num_patches"] == [1, 1, 1]


def test_the_documented_video_calls_run_without_a_warning(tmp_path, monkeypatch):
    """docs/processing.md's video example, run as written (on a clip.mp4 of 12 s), prints nothing: the processor's
    options go to apply_chat_template in `processor_kwargs` (as plain keyword arguments transformers warns)."""
    import logging
    import re

    from transformers.utils import logging as hf_logging

    from conftest import REPO_ROOT
    from test_processor import make_processor

    doc = (REPO_ROOT / "docs" / "processing.md").read_text(encoding="utf-8")
    block = next(code for code in re.findall(r"```python\n(.*?)```", doc, re.S) if "num_frames" in code)
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "clip.mp4", synthetic_frames(count=24), fps=2)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        scope = {"processor": make_processor(image_seq_length=2)}
        exec(compile(block, "docs/processing.md", "exec"), scope)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert [record.getMessage() for record in records] == []
    assert scope["inputs"]["num_patches"].tolist() == [1] * 8
    # the same call with num_frames as a plain keyword argument is what transformers warns about
    messages = scope["messages"]
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        scope["processor"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               num_frames=8)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert [record.getMessage() for record in records] == [
        "Kwargs passed to `processor.__call__` have to be in `processor_kwargs` dict, not in `**kwargs`"]


def test_processor_video_mistakes_fail_in_one_line(tmp_path):
    from test_processor import make_processor

    processor = make_processor()
    frames = [Image.fromarray(f) for f in synthetic_frames(count=3)]
    cases = [
        (dict(text="<video>\nQ"), "The text has 1 `<video>` tag\\(s\\) but no videos were passed"),
        (dict(text="Q", videos=[frames]), r"The text has 0 `<video>` tag\(s\) \(per prompt: \[0\]\) but 1 video"),
        (dict(text="<video><video>", videos=[frames]), r"The text has 2 `<video>` tag\(s\).* but 1 video\(s\)"),
        (dict(text=["<video>", "Q"], videos=[[frames], [frames]]), r"per prompt: \[1, 0\]\) but 2 video"),
        (dict(text="<video>", videos=[frames], bound=(0, 1)), r"video \(3 frames in memory\): a bound needs frame"),
        (dict(text="<video>", videos=[3]), "videos: unsupported video int"),
        (dict(text="<video>", videos=[tmp_path / "nope.mp4"]), "video '.*nope.mp4': no such file"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message) as info:
            processor(**call)
        assert "\n" not in str(info.value)


def test_video_code_travels_with_the_checkpoint_and_runs_as_remote_code(tmp_path):
    import hashlib
    import sys
    import textwrap

    from conftest import remote_code_imports, run_isolated_python
    from test_processor import make_processor

    processor = make_processor(image_seq_length=2)
    checkpoint = tmp_path / "checkpoint"
    processor.save_pretrained(checkpoint)
    assert (checkpoint / "video.py").is_file()
    third_party = remote_code_imports(checkpoint / "video.py") - set(sys.stdlib_module_names)
    assert third_party == {".", "numpy", "PIL", "av"}
    # PyAV only inside a try (transformers' remote-code import check skips those), so a checkpoint loads without it
    from transformers.dynamic_module_utils import get_imports

    assert "av" not in get_imports(checkpoint / "video.py")

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(synthetic_frames(count=6)):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    inputs = dict(text=["<video>\nQ"], videos=[str(folder)], num_frames=3, return_tensors="pt")
    expected = processor(**inputs)
    code = textwrap.dedent(
        f"""
        import hashlib, json
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        out = processor(**{inputs!r})
        print(json.dumps({{"module": type(processor).__module__, "input_ids": out["input_ids"].tolist(),
                           "num_patches": out["num_patches"].tolist(),
                           "pixels": hashlib.sha256(out["pixel_values"].numpy().tobytes()).hexdigest()}}))
        """
    )
    result = run_isolated_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.")
    assert got["input_ids"] == expected["input_ids"].tolist() and got["num_patches"] == [1, 1, 1]
    assert got["pixels"] == hashlib.sha256(expected["pixel_values"].numpy().tobytes()).hexdigest()


# --- model.chat -------------------------------------------------------------------------------------------------


def test_model_chat_takes_frames_with_internvl2s_frame_prompt():
    from conftest import require_fixture
    from transformers import AutoTokenizer

    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.processing import get_chat_template

    reference = json.loads(require_fixture("internvl2_qwen2", "reference.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(require_fixture("internvl2_qwen2"))
    tokenizer.chat_template = get_chat_template(reference["template"])
    config = InternVLXConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": reference["vocab_size"]},
        image_token_id=reference["img_context_token_id"], template=reference["template"],
    )
    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration(config).eval()
    processor = InternVLXProcessor(InternVLXImageProcessor(), tokenizer, image_seq_length=256)

    frames = [Image.fromarray(f) for f in synthetic_frames(count=3)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Q?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    question = video_prompt(3) + "\nQ?"  # what InternVL2's model cards send
    prompt = model._chat_prompt(tokenizer, question, None, [1, 1, 1])
    assert tokenizer(prompt, return_tensors="pt")["input_ids"].tolist() == inputs["input_ids"].tolist()

    generation = dict(max_new_tokens=4, do_sample=False)
    answer = model.chat(tokenizer, inputs["pixel_values"], question, generation, num_patches_list=[1, 1, 1])
    generated = model.generate(**inputs, **generation)
    assert answer == processor.decode(generated[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"chat\(\) takes a video as its frames, as InternVL2 does") as info:
        model.chat(tokenizer, inputs["pixel_values"], "<video>\nQ?", generation, num_patches_list=[1, 1, 1])
    assert "\n" not in str(info.value)


# --- internvlx chat --video -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video") / "frames"
    folder.mkdir()
    for i, frame in enumerate(synthetic_frames(count=12, height=64, width=64)):
        Image.fromarray(frame).save(folder / f"frame_{i + 1}.png")
    return folder


def test_cli_chat_video_answers_as_model_chat_with_frame_prompts(capsys, frame_folder):
    from transformers import AutoModel, AutoProcessor

    from internvlx_hf.cli import main
    from internvlx_hf.demo import demo_model_dir

    argv = ["chat", str(demo_model_dir()), "--video", str(frame_folder), "--frames", "4", "--bound", "1,9",
            "--max-new-tokens", "4", "--device", "cpu", "Which colour comes first?"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip()

    processor = AutoProcessor.from_pretrained(demo_model_dir(), trust_remote_code=True)
    model = AutoModel.from_pretrained(demo_model_dir(), trust_remote_code=True).eval()
    frames = load_video(frame_folder, num_segments=4, bound=(1, 9))  # 1 fps for a folder
    pixel_values = processor.image_processor(frames, max_tiles=1, return_tensors="pt").pixel_values
    expected = model.chat(processor, pixel_values, video_prompt(4) + "\nWhich colour comes first?",
                          dict(max_new_tokens=4, do_sample=False), num_patches_list=[1] * 4)
    assert out == expected and expected


def test_cli_chat_video_errors_are_one_line(capsys, tmp_path, frame_folder):
    from internvlx_hf.cli import main
    from internvlx_hf.demo import demo_model_dir

    model = str(demo_model_dir())
    cases = [
        (["--bound", "1,2", "Q"], "--frames and --bound choose the frames of --video; pass --video PATH too."),
        (["--video", str(frame_folder), "--bound", "2", "Q"], "--bound '2': expected START,END in seconds"),
        (["--video", str(frame_folder), "--bound", "5,1", "Q"],
         "--bound '5,1': bound must satisfy 0 <= start < end (seconds), got (5, 1)."),
        (["--video", str(frame_folder), "--bound", "1,inf", "Q"],
         "--bound '1,inf': bound must satisfy 0 <= start < end (seconds), got (1, inf)."),
        (["--video", str(frame_folder), "--frames", "0", "Q"], "--frames must be >= 1, got 0."),
        (["--video", str(tmp_path / "nope.mp4"), "Q"], f"--video {str(tmp_path / 'nope.mp4')!r}: no such file or "
                                                       "folder; pass a video file or a folder of frame images."),
        (["--video", str(tmp_path), "Q"], f"--video: video {str(tmp_path)!r}: the folder holds no frame images"),
        (["--video", str(frame_folder), "--bound", "20,30", "Q"],
         "bound (20.0, 30.0) starts at frame 20, after the last frame (11)"),
    ]
    for extra, message in cases:
        assert main(["chat", model, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("internvlx chat: error: ") and message in err and err.count("\n") == 1, err


# --- internvlx tokens --video -----------------------------------------------------------------------------------


def test_tokens_video_rows_count_what_the_processor_produces(capsys, frame_folder):
    from transformers import AutoConfig, AutoProcessor

    from internvlx_hf.cli import main
    from internvlx_hf.demo import demo_model_dir
    from internvlx_hf.token_budget import LLMShape, prefill_flops

    assert main(["tokens", "--video", str(frame_folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["frames"], r["tiles"], r["tokens"]) for r in rows] == [(8, 8, 2048), (16, 16, 4096), (32, 32, 8192)]

    assert main(["tokens", str(demo_model_dir()), "--video", str(frame_folder), "--frames", "4", "--frames", "6",
                 "--text-tokens", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    processor = AutoProcessor.from_pretrained(demo_model_dir(), trust_remote_code=True)
    config = AutoConfig.from_pretrained(demo_model_dir(), trust_remote_code=True)
    shape = LLMShape.from_text_config(config.get_text_config())
    k = config.lvtc.expand_layer
    for row, frames in zip(rows, (4, 6)):
        ids = processor(text="<video>", videos=[str(frame_folder)], num_frames=frames)["input_ids"][0]
        assert row["llm_tokens"] == len(ids) and row["tokens"] == frames * processor.image_seq_length
        long = len(ids) + frames * (config.hr_tokens_per_tile - processor.image_seq_length)
        assert (row["llm_tokens_long"], row["expand_layer"]) == (long, k)
        assert row["prefill_flops"] == prefill_flops(shape, len(ids), long, k)
        assert row["uncompressed_prefill_flops"] == prefill_flops(shape, long)


def test_tokens_video_errors_are_one_line(capsys, tmp_path, frame_folder):
    from internvlx_hf.cli import main

    cases = [
        (["--video", str(frame_folder), "--image", "10x10"], "pass --image (repeatable) or --video, not both"),
        (["--image", "10x10", "--frames", "8"], "--frames is the frame count of --video; pass --video PATH too."),
        (["--video", str(frame_folder), "--frames", "0"], "--frames must be >= 1, got 0."),
        (["--video", str(frame_folder), "--max-tiles", "2"], "--tiling and --max-tiles apply to --image"),
        (["--video", str(tmp_path)], f"--video: video {str(tmp_path)!r}: the folder holds no frame images"),
        (["--video", str(tmp_path / "x.mp4")], "no such file"),
    ]
    for extra, message in cases:
        assert main(["tokens", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("internvlx tokens: error: ") and message in err and err.count("\n") == 1, err


# --- fine-tuning data -------------------------------------------------------------------------------------------


def _reference_sampler(num_frames, video_length, sample):
    for case in REFERENCE["get_frame_indices"]:
        if (case["num_frames"], case["video_length"], case["sample"]) == (num_frames, video_length, sample):
            return case["indices"]
    raise KeyError("case not recorded; add it to scripts/make_video_fixtures.py")


@pytest.mark.parametrize("template,fixture", [("Hermes-2", "internvl2_qwen2"), ("phi3-chat", "internvl2_phi3")])
def test_video_rows_train_as_internvl_prepares_them(template, fixture, tmp_path):
    import training_helpers as th

    from internvlx_hf.data import InternVLXDataset
    from internvlx_hf.processing import CHAT_TEMPLATES
    from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator

    _, processor = th.load(th.converted(fixture))
    processor.chat_template = CHAT_TEMPLATES[template]
    folder_frames, clip_frames = synthetic_frames(count=6, seed=2), synthetic_frames(seed=3)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(folder_frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"img_{i + 1}.png")
    write_video(tmp_path / "clip.mkv", clip_frames)
    rows = [
        {"video": "frames", "conversations": [{"from": "human", "value": "Which colour comes first?"},
                                              {"from": "gpt", "value": "Red, then blue."}]},
        {"video": "clip.mkv", "clip": [0.2, 0.6],
         "conversations": [{"from": "human", "value": "<video>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}]},
    ]
    th.write_jsonl(tmp_path / "videos.jsonl", rows)
    meta = {"videos": {"root": str(tmp_path), "annotation": str(tmp_path / "videos.jsonl"), "min_num_frame": 4,
                       "max_num_frame": 4, "sampling_method": "middle"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    dataset = InternVLXDataset(str(tmp_path / "meta.json"), processor, progress=False, check=True)
    assert len(dataset) == 2 and dataset.lengths[0] > 4 * processor.image_seq_length
    stats = dataset.summary.datasets[0]
    assert (stats.samples, stats.images, stats.tiles) == (2, 8, 8)  # frames counted as one-tile images

    # InternVL's video_get_item: `<video>\n` (prepended when missing) -> "Frame-i: <image>" lines, 4 frames picked
    # by its get_frame_indices ('middle'; the clip's frames counted from its start), each one tile
    lines = "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\n"
    expected_frames = [[folder_frames[i] for i in _reference_sampler(4, 6, "middle")],
                       [clip_frames[5 + i] for i in _reference_sampler(4, 10, "middle")]]
    collator = InternVLXDataCollator(processor)
    for index, (question, answer) in enumerate([("Which colour comes first?", "Red, then blue."),
                                                ("What is this?", "Noise.")]):
        item = dataset[index]
        assert item["messages"][0] == {"role": "user", "content": lines + question}
        assert [np.asarray(f).tobytes() for f in item["images"]] == [f.tobytes() for f in expected_frames[index]]
        batch = collator([item])
        text = processor.tokenizer.apply_chat_template(item["messages"], chat_template=processor.chat_template,
                                                       tokenize=False)
        reference = processor(text=[text], images=item["images"], max_tiles=1, return_tensors="pt")
        assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
        assert torch.equal(batch["pixel_values"], reference_pixels(expected_frames[index]))
        assert batch["num_patches"].tolist() == [1, 1, 1, 1]
        labels = [label for label in batch["labels"][0].tolist() if label != IGNORE_INDEX]
        assert processor.tokenizer.decode(labels[:-1]) == answer  # the reply and its end-of-turn token only


def test_video_rows_that_cannot_be_used_are_skipped_with_a_reason(tmp_path):
    from internvlx_hf.data.formats import SampleError, sample_from_row

    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    cases = [
        ({"video": "a.mp4", "image": "b.png", "conversations": turns}, "bad format", "either `image` or `video`"),
        ({"video": "http://x/a.mp4", "conversations": turns}, "remote video", "is a URL"),
        ({"video": "a.mp4", "clip": [3, 1], "conversations": turns}, "bad format", "0 <= start < end"),
        # the check of the processor's bound and `chat --bound` (an endless clip was once taken, then overflowed)
        ({"video": "a.mp4", "clip": [0, "inf"], "conversations": turns}, "bad format",
         r"^`clip` must satisfy 0 <= start < end \(seconds\), got \(0, inf\)$"),
        ({"video": "a.mp4", "clip": "2-10", "conversations": turns}, "bad format",
         r"^`clip` must be \(start, end\) in seconds, got '2-10'$"),
        ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video> <video>"}, turns[1]]},
         "video count mismatch", "exactly one <video> tag, got 2"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "A"}]},
         "video sample", "use InternVL's video rows"),
    ]
    for row, reason, message in cases:
        with pytest.raises(SampleError, match=message) as info:
            sample_from_row(row)
        assert info.value.reason == reason

    # a row without the tag gets it in its first human turn (InternVL: conversations[0]), also after a system turn
    system = {"from": "system", "value": ""}
    for row_turns in (turns, [system, *turns]):
        sample = sample_from_row({"video": "a.mp4", "conversations": row_turns})
        assert [m["content"] for m in sample.messages if m["role"] == "user"] == ["<video>\nQ"]
        assert all("<video>" not in m["content"] for m in sample.messages if m["role"] != "user")
    with pytest.raises(SampleError, match="exactly one <video> tag, got 2"):
        sample_from_row({"video": "a.mp4", "conversations": [{"from": "system", "value": "<video>"},
                                                             {"from": "human", "value": "<video>\nQ"}, turns[1]]})

    from internvlx_hf.data.videos import VideoSampling, read_sample_frames

    sample = sample_from_row({"video": str(tmp_path / "missing.mp4"), "conversations": turns})
    with pytest.raises(SampleError, match="missing.mp4' not found") as info:
        read_sample_frames(sample)
    assert info.value.reason == "video not found"
    short = write_video(tmp_path / "short.mkv", synthetic_frames(count=5))
    sample = sample_from_row({"video": str(short), "clip": [1, 2], "conversations": turns})
    with pytest.raises(SampleError, match=r"clip \[1.0, 2.0\] lies outside the video \(0.20 s\)"):
        read_sample_frames(sample)
    with pytest.raises(ValueError, match="min_num_frame \\(9\\) must not exceed max_num_frame \\(4\\)"):
        VideoSampling(9, 4)
    # 'rand' draws the count in [min, max] and one frame per interval, as InternVL's training reader
    sample.clip, sample.video_sampling = None, VideoSampling(2, 3, "rand")
    counts = {len(read_sample_frames(sample, random.Random(seed))) for seed in range(20)}
    assert counts == {2, 3}
    # only 'rand' draws the count (docs/fine-tuning-data.md): 'middle' and 'fpsN' take max_num_frame frames every time
    for method, expected in (("middle", [0, 1, 3]), ("fps10", [1, 4])):
        sample.video_sampling = VideoSampling(2, 3, method)
        drawn = {tuple(frame.tobytes() for frame in read_sample_frames(sample, random.Random(seed)))
                 for seed in range(20)}
        frames = [Image.fromarray(frame) for frame in synthetic_frames(count=5)]
        assert drawn == {tuple(frames[i].tobytes() for i in expected)}, method


# --- internvlx eval ---------------------------------------------------------------------------------------------


def test_eval_scores_video_rows_on_deterministic_middle_frames(tmp_path, capsys):
    import training_helpers as th

    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.cli import main
    from internvlx_hf.demo import demo_model_dir
    from internvlx_hf.evaluation import read_eval_data

    frames = synthetic_frames(count=6, height=32, width=32, seed=4)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i}.png")
    rows = [{"video": "frames", "conversations": [{"from": "human", "value": "What colour is first?"},
                                                  {"from": "gpt", "value": "red"}]}]
    th.write_jsonl(tmp_path / "video.jsonl", rows)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"clips": {"root": str(tmp_path), "annotation": str(tmp_path / "video.jsonl"),
                                          "max_num_frame": 4, "min_num_frame": 2}}))  # 'rand' in training

    processor = InternVLXProcessor.from_pretrained(str(demo_model_dir()), trust_remote_code=True)
    (eval_set,) = read_eval_data(str(meta), processor)
    sample = eval_set.samples[0]
    expected = [frames[i] for i in _reference_sampler(4, 6, "middle")]
    assert [np.asarray(f).tobytes() for f in sample.images] == [f.tobytes() for f in expected]
    assert sample.video_frames == 4
    assert "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\nWhat colour is first?" \
        in sample.prompt

    out = tmp_path / "eval.json"
    assert main(["eval", str(demo_model_dir()), str(meta), "--max-tiles", "12", "--json", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())["runs"][0]["datasets"][0]
    assert result["samples"] == 1 and result["tiles_per_sample"] == 4.0  # one tile per frame despite --max-tiles
    assert isinstance(result["predictions"][0]["prediction"], str)
