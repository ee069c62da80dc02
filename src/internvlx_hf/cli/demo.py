"""`internvlx demo`: the embedded tiny InternVL-X answers questions about images, offline, with what each costs."""

from __future__ import annotations

import argparse

from .command import CLIError, Command, check_image_file

_DEMO_DESCRIPTION = """\
Loads the demo model that ships inside the package (a tiny InternVL-X with a PVTC projector and LVTC, trained from
scratch by this project on synthetic visual QA: see docs/benchmarks-learnability.md, "Proof that it learns, and the demo") with
AutoModel.from_pretrained(..., trust_remote_code=True), nothing downloaded, and answers questions about images.

Without --image it draws one synthetic image per task (colour, shape, position, count, and fine: which letter is in
the red box, readable only at high resolution) and says whether each answer is right. With --video it draws clips of
4 frames instead (a shape appears, then a second one of another colour joins it: "Which colour appears first?"),
fed as InternVL2 feeds a video: one 112 px tile per frame after "Frame1: ", "Frame2: ", ... For every image it prints:
the tile grid under RVTC's three tilings (ratio = InternVL2's, area and edge = the paper's caps; the model uses its
processor's), the visual tokens, the tokens each group of LLM layers processes (LVTC: layers < k see 16 tokens per
112 px tile, layers >= k see 64), and the time of the answer.

The model knows only what it was trained on: the questions below about simple shapes and letter grids on a light
background, asked with an empty system block (as here) or with the chat template's default one (what lmms-eval,
transformers' pipelines and InternVL2's chat() send). Other questions or photos get an answer, but not a meaningful
one."""

_DEMO_EPILOG = """\
questions it was trained on:
  What colour is the circle?         (circle, square, triangle, cross)
  What shape is the red one?         (red, green, blue, yellow, purple, orange)
  Where is the red circle?           (top-left ... bottom-right)
  How many shapes?                   (1-6)
  Which letter is in the red box?    (a grid of 5x5-pixel letters A E H L O T X Z)
  Which colour appears first?        (a clip of 4 frames: --video)

examples:
  internvlx demo                                         # five synthetic images, answered and checked
  internvlx demo --seed 3 --save-images demo_images/     # other images, saved as PNG to look at
  internvlx demo --image my_drawing.png --question "What colour is the circle?"
  internvlx demo --image page.png --question "How many shapes?" --tiling area
  internvlx demo --video                                 # three synthetic clips, answered and checked
  internvlx demo --video clip.mp4 --question "Which colour appears first?" --frames 4   # a video file or frame folder
  internvlx demo --model out/my-trained-model            # any checkpoint trained the same way
  internvlx demo --save demo-model/                      # the model as a folder for lmms-eval, pipeline(), ..."""


# How demo_model.json names the system prompts the held-out set was asked with (scripts/make_demo_model.py).
_SYSTEM_VARIANTS = {"empty": "empty system block (as asked here)", "default": "template's default system message",
                    "none": "no system turn (lmms-eval, pipelines, chat())"}


_SYNTHETIC = "\0synthetic"  # --video without a value


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", metavar="PATH", default=None,
                        help="answer about this image instead of the synthetic ones (needs --question)")
    parser.add_argument("--question", metavar="TEXT", default=None, help="the question about --image or --video PATH")
    parser.add_argument("--video", metavar="PATH", nargs="?", const=_SYNTHETIC, default=None,
                        help="alone: answer synthetic clips instead of images; with PATH (a video file, which needs "
                        "PyAV: pip install \"internvlx-hf[video]\", or a folder of frame images) and --question: "
                        "answer about that video")
    parser.add_argument("--frames", metavar="N", type=int, default=None,
                        help="frames taken from --video PATH, at segment centres (default 4, what the model learnt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    parser.add_argument("--tiling", choices=("ratio", "area", "edge", "none"), default=None,
                        help="tiling the model's processor uses for the answer (default: its own, ratio)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="a checkpoint folder to use instead of the packaged demo model")
    parser.add_argument("--save-images", metavar="DIR", default=None,
                        help="write the synthetic images as PNG files into DIR")
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="write the demo model as a self-contained checkpoint folder into DIR (new or empty) "
                        "and stop: weights, config, tokenizer and the remote code that AutoModel / AutoProcessor / "
                        "pipeline load with trust_remote_code=True where internvlx-hf is not installed")


def _check_demo(args: argparse.Namespace) -> None:
    """The arguments' checks that need no heavy import (a broken --image last): answered before torch loads."""
    if args.save:
        return  # `_save` names what does not go with --save
    video = args.video is not None
    user_video = video and args.video != _SYNTHETIC
    if args.image and video:
        raise CLIError("--image and --video do not go together: ask about an image or about a video")
    if args.question is not None and args.image is None and not user_video:
        raise CLIError("--question goes with --image PATH or --video PATH (a question about your image or video); "
                       "without them the demo asks its own questions about synthetic images (or clips: --video)")
    if (args.image is not None or user_video) and args.question is None:
        what = "--video PATH" if user_video else "--image"
        raise CLIError(f"{what} needs --question (what to ask about it), e.g. --question \"What colour is the "
                       "circle?\"")
    if args.question is not None and not args.question.strip():
        raise CLIError("--question is empty; ask e.g. \"What colour is the circle?\"")
    if args.save_images and (args.image or user_video):
        raise CLIError("--save-images saves the synthetic images; it does not apply with --image or --video PATH")
    if args.frames is not None and not user_video:
        raise CLIError("--frames applies to --video PATH (the synthetic clips have the frames the model learnt)")
    if video and args.tiling:
        raise CLIError("--tiling does not apply with --video: every frame is one tile, as InternVL2 feeds videos")
    if args.image is not None:
        check_image_file(args.image)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..demo import DemoSample, demo_model_dir, demo_samples, demo_video_samples, load_user_image
    from ..hub.resolve import read_internvlx_config

    if args.save:
        return _save(args)
    video = args.video is not None
    user_video = video and args.video != _SYNTHETIC
    folder = Path(args.model) if args.model else demo_model_dir()
    if args.model:
        read_internvlx_config(folder, f"--model {args.model!r}")
    if args.image:
        samples = [DemoSample(load_user_image(args.image), args.question.strip(), None, "", args.image)]
    elif user_video:
        from ..demo import demo_video_frames
        from ..loading import load_video_frames

        if args.frames is not None and args.frames < 1:
            raise CLIError(f"--frames must be >= 1, got {args.frames}.")
        # the frames first, so that a bad video fails in one line before the model loads
        try:
            frames = load_video_frames(args.video, demo_video_frames(folder) if args.frames is None else args.frames)
        except ValueError as error:
            raise CLIError(f"--video: {error}") from None
        samples = [DemoSample(frames[-1], args.question.strip(), None, "", args.video, video=frames)]
    elif video:
        samples = demo_video_samples(seed=args.seed, path=folder)
    else:
        samples = demo_samples(seed=args.seed, path=folder)

    from ..demo import load_demo_model

    model, processor = load_demo_model(folder)
    _print_model(folder, model, processor, args)
    if args.save_images:
        out = Path(args.save_images)
        out.mkdir(parents=True, exist_ok=True)
    right = 0
    for index, sample in enumerate(samples, 1):
        if sample.video is not None:
            result = _answer_clip(model, processor, sample, index, len(samples), args)
        else:
            result = _answer_image(model, processor, sample, index, len(samples), args)
        verdict = ""
        if sample.expected is not None:
            ok = result.answer == sample.expected
            right += ok
            verdict = f"   {'right' if ok else 'WRONG, expected ' + sample.expected}"
        print(f"  answer: {result.answer!r} ({result.seconds:.2f} s){verdict}")
        if args.save_images:
            path = out / f"demo_{'video_' if video else ''}{args.seed}_{index}_{sample.task}.png"
            _picture(sample).save(path)
            print(f"  saved {path}")
    if samples[0].expected is not None:
        print(f"\n{right}/{len(samples)} right")
    return 0


def _print_model(folder, model, processor, args: argparse.Namespace) -> None:
    from ..demo import demo_record
    from ..modeling.configuration_internvlx import LVTCConfig

    record = demo_record(folder)
    config = model.config
    ip = processor.image_processor
    tiling = args.tiling or getattr(ip.tiling, "value", str(ip.tiling))
    lvtc = LVTCConfig.of(config)
    if lvtc is not None and lvtc.expand_layer >= config.text_config.num_hidden_layers:  # k = depth never expands
        lvtc = None
    print(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"AutoModel loaded {type(model).__module__}.{type(model).__name__})")
    print(f"  {config.projector_type} projector, {config.image_seq_length} tokens per {ip.image_size}px tile"
          + (f", LVTC: layers >= {lvtc.expand_layer} see "
             f"{config.hr_tokens_per_tile} per tile" if lvtc else "")
          + f"; tiling {tiling}, max {ip.max_tiles} tiles")
    by_system = record.get("held_out_by_system_prompt") or {"empty": record.get("held_out", {})}
    clips = record.get("held_out_video", {})
    for variant, scores in by_system.items():
        accuracy = scores.get("accuracy", {}) | clips.get(variant, {}).get("accuracy", {})
        if accuracy:
            print(f"  held-out exact match, {_SYSTEM_VARIANTS.get(variant, variant)}: "
                  + ", ".join(f"{t} {v:.2f}" for t, v in accuracy.items()))


def _answer_image(model, processor, sample, index: int, count: int, args: argparse.Namespace):
    from ..demo import answer, format_grid, tile_grids

    ip = processor.image_processor
    tiling = args.tiling or getattr(ip.tiling, "value", str(ip.tiling))
    width, height = sample.image.size
    grids = tile_grids(processor, width, height)
    result = answer(model, processor, sample.image, sample.question, tiling=args.tiling)
    print(f"\n[{index}/{count}] {sample.label}, {width}x{height}: {sample.question}")
    print("  tiles: " + ", ".join(f"{mode} {format_grid(grid)}" for mode, grid in grids.items())
          + f"  (used: {tiling}, {result.tiles} tile{'s' if result.tiles > 1 else ''})")
    _print_tokens(result)
    return result


def _answer_clip(model, processor, sample, index: int, count: int, args: argparse.Namespace):
    from ..demo import answer_video

    result = answer_video(model, processor, sample.video, sample.question)
    print(f"\n[{index}/{count}] {sample.label}: {sample.question}")
    print(f"  frames: {result.tiles}, one {processor.image_processor.image_size}px tile each")
    _print_tokens(result)
    return result


def _print_tokens(result) -> None:
    print(f"  visual tokens: {result.visual_tokens}; LLM tokens: "
          + ", ".join(f"{group} {tokens}" for group, tokens in result.layer_tokens))


def _picture(sample):
    """The image, or a clip's frames side by side."""
    if sample.video is None:
        return sample.image
    from PIL import Image

    width, height = sample.video[0].size
    strip = Image.new("RGB", (width * len(sample.video) + 4 * (len(sample.video) - 1), height), (0, 0, 0))
    for index, frame in enumerate(sample.video):
        strip.paste(frame, (index * (width + 4), 0))
    return strip


def _save(args: argparse.Namespace) -> int:
    from ..demo import save_demo_model

    given = [option for option, value in (("--image", args.image), ("--question", args.question),
                                          ("--model", args.model), ("--save-images", args.save_images),
                                          ("--tiling", args.tiling), ("--video", args.video),
                                          ("--frames", args.frames)) if value is not None]
    if given:
        raise CLIError(f"--save writes the packaged demo model and answers nothing; drop {', '.join(given)}")
    try:
        folder = save_demo_model(args.save)
    except FileExistsError as error:
        raise CLIError(f"--save {error}") from None
    names = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"wrote {folder} ({size:.1f} MiB): {', '.join(names)}")
    print(f"load it anywhere with transformers: AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)")
    return 0


DEMO = Command(
    name="demo",
    help="the embedded tiny InternVL-X answers questions about images, offline (no arguments needed)",
    description=_DEMO_DESCRIPTION,
    epilog=_DEMO_EPILOG,
    add_arguments=_add_demo_arguments,
    run=_run_demo,
    check=_check_demo,
)
