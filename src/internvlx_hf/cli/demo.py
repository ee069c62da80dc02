"""`internvlx demo`: the embedded tiny InternVL-X answers questions about images, offline, with what each costs."""

from __future__ import annotations

import argparse

from .command import CLIError, Command

_DEMO_DESCRIPTION = """\
Loads the demo model that ships inside the package (a tiny InternVL-X with a PVTC projector and LVTC, trained from
scratch by this project on synthetic visual QA: see docs/benchmarks.md, "Proof that it learns, and the demo") with
AutoModel.from_pretrained(..., trust_remote_code=True), nothing downloaded, and answers questions about images.

Without --image it draws one synthetic image per task (colour, shape, position, count, and fine: which letter is in
the red box, readable only at high resolution) and says whether each answer is right. For every image it prints:
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

examples:
  internvlx demo                                         # five synthetic images, answered and checked
  internvlx demo --seed 3 --save-images demo_images/     # other images, saved as PNG to look at
  internvlx demo --image my_drawing.png --question "What colour is the circle?"
  internvlx demo --image page.png --question "How many shapes?" --tiling area
  internvlx demo --model out/my-trained-model            # any checkpoint trained the same way
  internvlx demo --save demo-model/                      # the model as a folder for lmms-eval, pipeline(), ..."""


# How demo_model.json names the system prompts the held-out set was asked with (scripts/make_demo_model.py).
_SYSTEM_VARIANTS = {"empty": "empty system block (as asked here)", "default": "template's default system message",
                    "none": "no system turn (lmms-eval, pipelines, chat())"}


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", metavar="PATH", default=None,
                        help="answer about this image instead of the synthetic ones (needs --question)")
    parser.add_argument("--question", metavar="TEXT", default=None, help="the question about --image")
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


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..demo import (
        DemoSample,
        answer,
        demo_model_dir,
        demo_record,
        demo_samples,
        format_grid,
        load_demo_model,
        load_user_image,
        tile_grids,
    )
    from ..hub.resolve import read_internvlx_config

    if args.save:
        return _save(args)
    if (args.image is None) != (args.question is None):
        raise CLIError("--image and --question go together: give both (a question about your image), or neither "
                       "(the synthetic demo images)")
    if args.question is not None and not args.question.strip():
        raise CLIError("--question is empty; ask e.g. \"What colour is the circle?\"")
    if args.save_images and args.image:
        raise CLIError("--save-images saves the synthetic images; it does not apply with --image")
    folder = Path(args.model) if args.model else demo_model_dir()
    if args.model:
        read_internvlx_config(folder, f"--model {args.model!r}")
    if args.image:
        samples = [DemoSample(load_user_image(args.image), args.question.strip(), None, "", args.image)]
    else:
        samples = demo_samples(seed=args.seed, path=folder)

    model, processor = load_demo_model(folder)
    record = demo_record(folder)
    config = model.config
    ip = processor.image_processor
    tiling = args.tiling or getattr(ip.tiling, "value", str(ip.tiling))
    lvtc = config.lvtc if config.lvtc and config.lvtc["expand_layer"] < config.text_config.num_hidden_layers else None
    print(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"AutoModel loaded {type(model).__module__}.{type(model).__name__})")
    print(f"  {config.projector_type} projector, {config.image_seq_length} tokens per {ip.image_size}px tile"
          + (f", LVTC: layers >= {lvtc['expand_layer']} see "
             f"{config.hr_tokens_per_tile} per tile" if lvtc else "")
          + f"; tiling {tiling}, max {ip.max_tiles} tiles")
    by_system = record.get("held_out_by_system_prompt") or {"empty": record.get("held_out", {})}
    for variant, scores in by_system.items():
        if scores.get("accuracy"):
            print(f"  held-out exact match, {_SYSTEM_VARIANTS.get(variant, variant)}: "
                  + ", ".join(f"{t} {v:.2f}" for t, v in scores["accuracy"].items()))
    if args.save_images:
        out = Path(args.save_images)
        out.mkdir(parents=True, exist_ok=True)
    right = 0
    for index, sample in enumerate(samples, 1):
        width, height = sample.image.size
        grids = tile_grids(processor, width, height)
        result = answer(model, processor, sample.image, sample.question, tiling=args.tiling)
        print(f"\n[{index}/{len(samples)}] {sample.label}, {width}x{height}: {sample.question}")
        print("  tiles: " + ", ".join(f"{mode} {format_grid(grid)}" for mode, grid in grids.items())
              + f"  (used: {tiling}, {result.tiles} tile{'s' if result.tiles > 1 else ''})")
        print(f"  visual tokens: {result.visual_tokens}; LLM tokens: "
              + ", ".join(f"{group} {tokens}" for group, tokens in result.layer_tokens))
        verdict = ""
        if sample.expected is not None:
            ok = result.answer == sample.expected
            right += ok
            verdict = f"   {'right' if ok else 'WRONG, expected ' + sample.expected}"
        print(f"  answer: {result.answer!r} ({result.seconds:.2f} s){verdict}")
        if args.save_images:
            path = out / f"demo_{args.seed}_{index}_{sample.task}.png"
            sample.image.save(path)
            print(f"  saved {path}")
    if samples[0].expected is not None:
        print(f"\n{right}/{len(samples)} right")
    return 0


def _save(args: argparse.Namespace) -> int:
    from ..demo import save_demo_model

    given = [option for option, value in (("--image", args.image), ("--question", args.question),
                                          ("--model", args.model), ("--save-images", args.save_images),
                                          ("--tiling", args.tiling)) if value is not None]
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
)
