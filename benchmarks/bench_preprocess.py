"""Time image preprocessing of a document page against transformers' own tiling image processor.

Compares `InternVLXImageProcessor` with transformers' GotOcr2 PIL-backend image processor (the tiling InternVL uses
in transformers) configured identically: 448px tiles, `crop_to_patches=True`, 1..12 tiles, thumbnail, bicubic,
ImageNet mean/std. Both get the same in-memory PIL page and return PyTorch tensors; the table shows the median
(and min) of several runs, interleaved round-robin, after a warm-up.

    python benchmarks/bench_preprocess.py [--width 1700] [--height 2200] [--runs 15] [--threads N]
"""

import argparse

import torch
from PIL import Image, ImageDraw

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvlx_hf.bench.harness import time_interleaved
from internvlx_hf.processing import InternVLXImageProcessor


def make_page(width: int, height: int) -> Image.Image:
    """A deterministic page-like RGB image: white paper, grey text lines, a colour figure."""
    page = Image.new("RGB", (width, height), (250, 250, 247))
    draw = ImageDraw.Draw(page)
    generator = torch.Generator().manual_seed(0)
    margin, line = width // 12, max(12, height // 90)
    for y in range(margin, height - margin, line * 2):
        length = int(torch.randint(width // 3, width - 2 * margin, (1,), generator=generator))
        draw.rectangle([margin, y, margin + length, y + line], fill=(40, 40, 40))
    noise = torch.randint(0, 256, (height // 4, width // 2, 3), dtype=torch.uint8, generator=generator)
    figure = Image.frombytes("RGB", (width // 2, height // 4), noise.numpy().tobytes())
    page.paste(figure, (width // 4, height // 3))
    return page


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1700)
    parser.add_argument("--height", type=int, default=2200)
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    page = make_page(args.width, args.height)
    ours = InternVLXImageProcessor(max_tiles=args.max_tiles, tiling="ratio")
    ours_edge = InternVLXImageProcessor(max_tiles=args.max_tiles, tiling="edge")
    got_ocr2 = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=args.max_tiles,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )

    reference = got_ocr2(page, return_tensors="pt")
    mine = ours(page, return_tensors="pt")
    same_tiles = reference["pixel_values"].shape == mine["pixel_values"].shape
    max_diff = (reference["pixel_values"] - mine["pixel_values"]).abs().max().item() if same_tiles else float("nan")

    rows = [
        (f"GotOcr2ImageProcessorPil (crop_to_patches, max_patches={args.max_tiles})", got_ocr2, reference),
        (f"InternVLXImageProcessor (tiling='ratio', max_tiles={args.max_tiles})", ours, mine),
        (f"InternVLXImageProcessor (tiling='edge', max_tiles={args.max_tiles})", ours_edge, None),
    ]
    print(
        f"page {args.width}x{args.height} RGB, {args.runs} interleaved runs after 1 warm-up, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"tiles: GotOcr2 {tuple(reference['pixel_values'].shape)}, ours {tuple(mine['pixel_values'].shape)}; "
          f"max |difference| of pixel values {max_diff:.3g}")
    print()
    print(f"| {'processor':<68} | tiles | median ms | min ms | speed-up |")
    print(f"|{'-' * 70}|------:|----------:|-------:|---------:|")
    calls = [lambda p=processor: p(page, return_tensors="pt") for _, processor, _ in rows]
    timings = time_interleaved(calls, warmup=1, repeats=args.runs)
    baseline = None
    for (name, processor, output), timing in zip(rows, timings):
        median = timing["median_s"] * 1000
        baseline = baseline or median
        tiles = (output or processor(page, return_tensors="pt"))["pixel_values"].shape[0]
        fastest = timing["min_s"] * 1000
        print(f"| {name:<68} | {tiles:>5} | {median:>9.1f} | {fastest:>6.1f} | {baseline / median:>7.2f}x |")


if __name__ == "__main__":
    main()
