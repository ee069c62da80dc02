"""Does a bound late in a long video decode only a few frames? `VideoReader.get_frames` seeking, measured.

InternVL2's `load_video` reads a video with decord, which seeks. `internvlx_hf.processing.video.VideoReader` reads it
with PyAV and seeks to the keyframe before each wanted frame (`_decode_seeking`); where the timestamps cannot number
the frames it decodes from the start (`_decode_in_order`). This script writes a long synthetic video (a smooth
texture sliding 2 px a frame, so the encoder makes real P/B frames; H.264 in MP4, a keyframe every ``--gop``
frames), then, in the same run, takes the 8 segment-centre frames of a bound at the start and one at the end of the
video (`segment_frame_indices`, as `load_video(..., bound=...)` does) both ways:

  seek     VideoReader.get_frames (what the processor, `internvlx chat --bound` and training's `clip` use)
  start    the same frames decoded from the first frame on (VideoReader._decode_in_order: what a reader without
           seeking does)

and reports frames decoded, seconds (median of ``--repeats``) and the ratio seek / start. Opening the file
(`VideoReader(path)`: the frame count from the container) and the packet index (demuxed once, on the first
`get_frames`) are timed apart.

    python benchmarks/bench_video_seek.py                          # 10 min at 30 fps, 320x240: the run in results/
    python benchmarks/bench_video_seek.py --minutes 0.5 --repeats 1   # seconds: a check, not a result
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from internvlx_hf.bench.harness import environment, time_call, write_results

RESULTS = Path(__file__).parent / "results"


def write_long_video(path: Path, frames: int, fps: int, width: int, height: int, gop: int) -> None:
    import av
    from tqdm.auto import tqdm

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width + 2 * frames + 8, 3)).astype(np.uint16)
    for _ in range(3):  # smooth it, so that consecutive frames are alike and the codec predicts them
        texture = (texture + np.roll(texture, 1, 1) + np.roll(texture, 1, 0)) // 3
    texture = texture.astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={"g": str(gop), "bf": "2",
                                                                              "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in tqdm(range(frames), desc="writing the video", unit="frame", leave=False):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, 2 * i:2 * i + width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def timed(function, repeats: int):
    """(median seconds of ``repeats`` calls, the last call's result)."""
    results = []
    return time_call(lambda: results.append(function()), warmup=0, repeats=repeats)["median_s"], results[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--gop", type=int, default=250, help="frames between keyframes (x264's default keyint)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here (e.g. benchmarks/results/video-seek.json)")
    args = parser.parse_args(argv)

    from internvlx_hf.processing.video import VideoReader, segment_frame_indices

    width, height = (int(x) for x in args.size.split("x"))
    frames = int(round(args.minutes * 60 * args.fps))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.mp4"
        write_long_video(path, frames, args.fps, width, height, args.gop)
        size_mb = path.stat().st_size / 1e6
        opened, reader = timed(lambda: VideoReader(path), 1)
        indexed, _ = timed(lambda: reader.get_frames([0]), 1)  # the first seek demuxes the packet index once
        duration = reader.num_frames / reader.fps
        bounds = {"first minute": (0.0, min(60.0, duration)), "last minute": (max(0.0, duration - 60), duration)}
        rows = []
        for name, bound in bounds.items():
            indices = segment_frame_indices(reader.num_frames, reader.fps, 8, bound)
            seek_s, seek_frames = timed(lambda: reader.get_frames(indices), args.repeats)
            seek_decoded = reader.frames_decoded

            def from_start():
                reader.frames_decoded = 0
                found = reader._decode_in_order(_av(), sorted(set(indices)))
                return [found[i] for i in indices]

            start_s, start_frames = timed(from_start, args.repeats)
            start_decoded = reader.frames_decoded
            same = [a.tobytes() for a in seek_frames] == [b.tobytes() for b in start_frames]
            rows.append({"bound": name, "seconds": list(bound), "indices": indices,
                         "seek": {"frames_decoded": seek_decoded, "s": round(seek_s, 4)},
                         "start": {"frames_decoded": start_decoded, "s": round(start_s, 4)},
                         "ratio_seek_over_start": round(seek_s / start_s, 4), "same_frames": same})
    result = {"video": {"frames": reader.num_frames, "fps": reader.fps, "size": args.size, "codec": "h264 (libx264, "
                        f"keyframe every {args.gop}, 2 B-frames), mp4", "megabytes": round(size_mb, 2)},
              "open_s": round(opened, 4), "first_get_frames_with_index_s": round(indexed, 4), "repeats": args.repeats,
              "rows": rows}
    print(f"{reader.num_frames} frames ({duration:.0f} s at {reader.fps:g} fps, {args.size}, {size_mb:.1f} MB, "
          f"keyframe every {args.gop}); VideoReader(path) {opened:.3f} s, its packet index (first get_frames) "
          f"{indexed:.3f} s; median of {args.repeats}")
    print("| bound | frames | seek: decoded | seek: s | from the start: decoded | from the start: s | seek / start "
          "| same frames |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['bound']} ({row['seconds'][0]:g}-{row['seconds'][1]:g} s) | {row['indices'][0]}..."
              f"{row['indices'][-1]} | {row['seek']['frames_decoded']} | {row['seek']['s']:.3f} | "
              f"{row['start']['frames_decoded']} | {row['start']['s']:.3f} | {row['ratio_seek_over_start']:.3f} | "
              f"{row['same_frames']} |")
    if args.json:
        write_results(args.json, result | {"environment": environment("cpu")})
    return 0 if all(row["same_frames"] for row in rows) else 1


def _av():
    import av

    return av


if __name__ == "__main__":
    sys.exit(main())
