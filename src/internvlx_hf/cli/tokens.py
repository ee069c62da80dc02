"""`internvlx tokens`: what images and videos cost in tiles, `<IMG_CONTEXT>` tokens, LLM tokens and prefill FLOPs."""

from __future__ import annotations

import argparse

from .command import CLIError, Command

_TOKENS_DESCRIPTION = """\
For each --image: its size, the tile grid and the <IMG_CONTEXT> tokens it becomes under InternVL2's aspect-ratio
tiling ("ratio") and the paper's two RVTC caps ("area": max_tiles <= ceil(W*H/448^2); "edge": max_tiles <=
ceil(W/448)*ceil(H/448)). A thumbnail tile is added when the grid has more than one tile.

Without MODEL the InternVL2-2B settings are used (448px tiles, max 12 tiles, 256 tokens per tile). With MODEL (a
checkpoint folder, or a Hub id when the Hub is reachable) its processor's settings are used, and the table adds the
LLM's prompt length (--text-tokens of text + <img> + the image tokens + </img>) and the LLM prefill FLOPs. For an
LVTC model it shows the tokens of each layer group (layers < k see the short layout, layers >= k the long one) and
compares the FLOPs with the uncompressed model (every layer on the long layout), in a second table. "vLLM prompt" (JSON:
vllm_prompt_tokens) is the prompt's length on vLLM, what its --max-model-len bounds (prompt and answer together):
vLLM schedules an LVTC model's every tile at the long layout (e.g. 1024 ids per 448px tile instead of 256); for
other models it is the LLM tokens.

FLOPs formula (matmuls only, a multiply-add = 2 FLOPs), per decoder layer on n tokens:
  2n*h*(2*a*d + 2*g*d)  [q,k,v,o projections]  +  4n^2*a*d  [QK^T and AV, full n x n]  +  6n*h*f  [gated MLP]
(h hidden size, a heads, g KV heads, d head dim, f intermediate size, from the checkpoint's text config), summed
over the layers (n_short before layer k, n_long from k on), plus 2*h*V for the LM head on the last position.

For an InternVL3.5-Flash MODEL (its config has a router, "vir"), what an image costs depends on its pixels: per
tile the router scores p0 and the tile enters the LLM compressed (64 tokens at 448px) when p0 is above the
relative_threshold quantile of its image's tiles' scores and p0 >= absolute_threshold, else at 256. For each image
file (and tiling) the command runs the router on the image alone in a prompt: MODEL's vision tower, projector and
router only, loaded on --device in --dtype (default: the checkpoint's dtype); the LLM is neither loaded nor run.
The rows give the tiles compressed, the LLM tokens (text + <img> + 64 per compressed tile + 256 per other + </img>)
and the prefill FLOPs, against the router off (config.vir.enabled = False: the same weights as plain InternVL3.5,
every tile 256); the lines under the table sum them per tiling over the images: tiles compressed in all, their share
(and its range over the images) and the fraction of the image tokens, LLM tokens and FLOPs kept. A size (WxH) has
no pixels to route: its row gives the range, from the most tiles the relative threshold lets the router compress
(tiles - 1 - floor(q * (tiles - 1)): those strictly above the quantile, when every score differs and reaches
absolute_threshold) to none (a one-tile image is never compressed). Each image is routed as its own prompt: in a
prompt of several images the quantile is over all their tiles. --video rows are the router off (frames are not
routed here). With --json a Flash MODEL prints
{"rows": [...], "summary": [...]}: per row also the decision ("compressed") and score ("scores") of each tile (the
thumbnail last), the bounds of each figure ("..._bounds", [low, high]; for a routed image both the same) and
vllm_prompt_tokens, the router-off count: vLLM checks the prompt as sent (every tile in full) against --max-model-len
when a request arrives, before its router shortens it.

With --video instead of --image: one row per --frames N (default 8, 16 and 32). Each frame is one tile (InternVL2's
load_video: max_num=1, no thumbnail), so a video costs N x tokens-per-tile <IMG_CONTEXT> tokens whatever its length
(short videos repeat frames); with MODEL the LLM prompt adds the "Frame1: <img>...</img>\\n..." lines as its
tokenizer encodes them."""

_TOKENS_EPILOG = """\
examples:
  # InternVL2-2B settings: a photo and a document page, under the three tilings
  internvlx tokens --image photo.jpg --image page.png

  # sizes instead of files (nothing is read)
  internvlx tokens --image 1024x768 --image 1700x2200 --max-tiles 6

  # an LVTC checkpoint: tokens per layer group and prefill FLOPs vs the uncompressed model, as JSON
  internvlx tokens ./InternVL2-2B-X --image 1024x768 --text-tokens 64 --json

  # a video at 8, 16 and 32 frames, in an LVTC checkpoint
  internvlx tokens ./InternVL2-2B-X --video clip.mp4 --frames 8 --frames 16 --frames 32

  # only the tiling the checkpoint uses
  internvlx tokens ./InternVL-X-2B-HD --image photo.jpg --tiling edge

  # an InternVL3.5-Flash checkpoint: what its router keeps of each photo (the router runs, not the LLM)
  internvlx tokens ./InternVL3_5-2B-Flash-X --image photo.jpg --image page.png --tiling ratio"""


def _add_tokens_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="checkpoint folder or Hub id (optional; default: InternVL2-2B settings)")
    parser.add_argument("--image", metavar="PATH|WxH", action="append", default=None,
                        help="an image file, or a size such as 1024x768; repeat for several images")
    parser.add_argument("--video", metavar="PATH", default=None,
                        help="a video file or folder of frame images (instead of --image)")
    parser.add_argument("--frames", metavar="N", type=int, action="append", default=None,
                        help="frames taken from --video; repeat to compare (default: 8, 16 and 32)")
    parser.add_argument("--tiling", action="append", choices=("ratio", "area", "edge", "none"), default=None,
                        help="tiling(s) to show (repeatable; default: ratio, area and edge)")
    parser.add_argument("--max-tiles", type=int, default=None, metavar="N",
                        help="tile budget (default: the processor's, or 12 without MODEL)")
    parser.add_argument("--text-tokens", type=int, default=64, metavar="N",
                        help="text tokens of the prompt besides the image, for the LLM columns (default 64)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where an InternVL3.5-Flash MODEL's router runs on the images: cpu (default), cuda, ...")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                        help="the router's dtype (Flash MODEL; default auto: the checkpoint's, as a deployment "
                             "loads it; a score near a threshold may decide otherwise in another dtype)")


def _run_tokens(args: argparse.Namespace) -> int:
    from ..modeling.configuration_internvlx import LVTCConfig

    from dataclasses import replace

    from ..token_budget import (
        COMPARED_TILINGS,
        TilingSettings,
        budget_rows,
        format_table,
        image_size_of,
        rows_to_json,
    )

    if args.max_tiles is not None and args.max_tiles < 1:
        raise CLIError(f"--max-tiles must be >= 1, got {args.max_tiles}.")
    if args.text_tokens < 0:
        raise CLIError(f"--text-tokens must be >= 0, got {args.text_tokens}.")
    if (args.image is None) == (args.video is None):
        raise CLIError("pass --image (repeatable) or --video, not both and not neither.")
    if args.video is not None:
        return _run_video_tokens(args)
    if args.frames is not None:
        raise CLIError("--frames is the frame count of --video; pass --video PATH too.")
    sizes = [(spec, image_size_of(spec)) for spec in args.image]
    processor = config = None
    settings = TilingSettings()
    if args.model is not None:
        processor, config = _load_processor_and_config(args.model)
        settings = TilingSettings.from_processor(processor)
    if args.max_tiles is not None:
        if args.max_tiles < settings.min_tiles:
            raise CLIError(f"--max-tiles {args.max_tiles} is below the processor's min_tiles ({settings.min_tiles}).")
        settings = replace(settings, max_tiles=args.max_tiles)
    tilings = tuple(dict.fromkeys(args.tiling)) if args.tiling else COMPARED_TILINGS
    if config is not None and config.vir is not None:
        return _run_flash_tokens(args, sizes, settings, tilings, processor, config)
    _check_router_options(args, config)
    rows = budget_rows(sizes, settings, tilings, processor=processor, config=config, text_tokens=args.text_tokens)
    if args.json:
        print(rows_to_json(rows))
        return 0
    source = f"{args.model} (its processor: {settings.tiling} tiling)" if args.model else "InternVL2-2B settings"
    print(f"{source}: {settings.image_size}px tiles, max {settings.max_tiles} tiles, "
          f"{settings.tokens_per_tile} tokens per tile" + (", thumbnail" if settings.use_thumbnail else ""))
    lvtc = LVTCConfig.of(config) if config is not None else None
    depth = config.get_text_config().num_hidden_layers if config is not None else None
    if lvtc is not None and lvtc.expand_layer < depth:
        print(f"LVTC: layers < {lvtc.expand_layer} see {settings.tokens_per_tile} tokens per tile, "
              f"layers >= {lvtc.expand_layer} see {config.hr_tokens_per_tile}; {args.text_tokens} text tokens")
    elif lvtc is not None:
        print(f"LVTC without expansion: k = {lvtc.expand_layer} is the LLM's depth, so all {depth} layers see "
              f"{settings.tokens_per_tile} tokens per tile; {args.text_tokens} text tokens")
    if config is not None:
        print(_vllm_line(config))
    print(format_table(rows))
    return 0


def _check_router_options(args: argparse.Namespace, config, video: bool = False) -> None:
    if args.device is not None or args.dtype is not None:
        what = ("--video rows are not routed" if video else
                f"{args.model} has no router (its config's vir is null)" if config is not None else
                "no MODEL is given")
        raise CLIError(f"--device and --dtype choose where an InternVL3.5-Flash MODEL's router runs; {what}, so "
                       "nothing runs: leave them out.")


def _run_flash_tokens(args: argparse.Namespace, sizes, settings, tilings, processor, config) -> int:
    """The rows of an InternVL3.5-Flash MODEL: each image file routed (vision tower + router), each size bounded."""
    import json
    from pathlib import Path

    from ..token_budget import flash_row, flash_summary, format_flash_table, image_budget, load_router, route_image

    files = [spec for spec, _ in sizes if Path(spec).is_file()]
    router = None
    if files and config.vir.enabled:
        from ..loading import device_map_for

        try:
            device = device_map_for(args.device or "cpu")
        except ValueError as error:
            raise CLIError(str(error)) from None
        device = "cuda" if device == "auto" else device  # one device: the router is small
        router = load_router(_router_weights(args.model), config, args.dtype or "auto", device)
    rows = []
    for spec, (width, height) in sizes:
        image = None
        if router is not None and spec in files:
            from PIL import Image

            image = Image.open(spec)
            image.load()  # the pixels, once for every tiling (and the file closed)
        for tiling in tilings:
            budget = image_budget(width, height, tiling, settings, processor)
            if not config.vir.enabled:  # off, it compresses nothing: exact without the pixels
                compressed, scores = [False] * budget.tiles, None
            elif image is None:
                compressed, scores = None, None
            else:
                compressed, scores = route_image(router, processor, image, budget.tiling, settings.max_tiles)
            rows.append(flash_row(spec, config, budget, args.text_tokens, compressed, scores))
    summary = flash_summary(rows)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return 0
    vir = config.vir
    print(f"{args.model} (its processor: {settings.tiling} tiling): {settings.image_size}px tiles, max "
          f"{settings.max_tiles} tiles, {settings.tokens_per_tile} tokens per tile"
          + (", thumbnail" if settings.use_thumbnail else "") + f"; {args.text_tokens} text tokens")
    if vir.enabled:
        weight = next(router.vision_tower.parameters()) if router is not None else None
        where = (f"; routed on {weight.device} in {str(weight.dtype).removeprefix('torch.')} (vision tower + "
                 "router; the LLM is not run)" if weight is not None else "")
        print(f"ViR router (InternVL3.5-Flash): a tile enters the LLM as {config.compressed_tokens_per_tile} tokens "
              f"when its score p0 is above the {vir.relative_threshold:g} quantile of its image's tiles' scores and "
              f">= {vir.absolute_threshold:g}, else as {config.image_seq_length}{where}")
    else:
        print(f"ViR router: off in {args.model}'s config (vir.enabled is false): every tile "
              f"{config.image_seq_length} tokens, as plain InternVL3.5")
    print("vLLM: checks the prompt as sent, every tile in full (the router-off count, JSON: vllm_prompt_tokens), "
          "against --max-model-len when a request arrives; its router then shortens the prompt it runs and caches "
          "(the LLM tokens above)")
    print(format_flash_table(rows, summary))
    sized = [row["image"] for row in rows if not row["decided"]]
    if sized:
        names = ", ".join(dict.fromkeys(sized))
        print(f"size only ({names}): no pixels, so no decisions; the row spans the most tiles the router can compress "
              f"(those strictly above the {vir.relative_threshold:g} quantile, when every score differs and reaches "
              f"{vir.absolute_threshold:g}) to none; pass the image file for its decisions")
    return 0


def _router_weights(model: str):
    """MODEL's folder with the safetensors files that hold the router's weights: from the Hub only the shards that
    hold the vision tower, the projector or the router (the LLM's are most of a checkpoint and never read)."""
    import json

    from ..hub.resolve import resolve_model
    from ..token_budget import ROUTER_MODULES

    path = resolve_model(model, allow_patterns=["*.json"])
    index = path / "model.safetensors.index.json"
    shards = ["model.safetensors"]
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({shard for key, shard in weight_map.items()
                         if key.removeprefix("model.").split(".", 1)[0] in ROUTER_MODULES})
    return resolve_model(model, allow_patterns=["*.json", *shards])


def _vllm_line(config) -> str:
    """What vLLM counts against --max-model-len: the long layout's tokens per tile (LVTC), or the LLM tokens."""
    from ..token_budget import vllm_tokens_per_tile

    per_tile = vllm_tokens_per_tile(config)
    if per_tile == config.image_seq_length:
        return ("vLLM: the same prompt (the LLM tokens) is what its --max-model-len bounds, prompt and answer "
                "together")
    return (f"vLLM: every tile at the long layout ({per_tile} tokens) in the prompt, whose length (vLLM prompt)\n"
            "--max-model-len bounds, prompt and answer together")


def _run_video_tokens(args: argparse.Namespace) -> int:
    from ..modeling.configuration_internvlx import LVTCConfig

    from ..token_budget import TilingSettings, format_table, rows_to_json, video_budget_rows

    frame_counts = list(dict.fromkeys(args.frames or [8, 16, 32]))
    if min(frame_counts) < 1:
        raise CLIError(f"--frames must be >= 1, got {min(frame_counts)}.")
    if args.tiling or args.max_tiles is not None:
        raise CLIError("--tiling and --max-tiles apply to --image; every video frame is one tile.")
    length = _describe_video(args.video)
    processor = config = None
    settings = TilingSettings()
    if args.model is not None:
        processor, config = _load_processor_and_config(args.model)
        settings = TilingSettings.from_processor(processor)
    _check_router_options(args, config, video=True)
    rows = video_budget_rows(args.video, frame_counts, settings, processor, config, args.text_tokens)
    if args.json:
        print(rows_to_json(rows))
        return 0
    source = args.model if args.model else "InternVL2-2B settings"
    print(f"{args.video}: {length}; {source}: each frame one {settings.image_size}px tile of "
          f"{settings.tokens_per_tile} tokens" + (f"; {args.text_tokens} text tokens" if config is not None else ""))
    lvtc = LVTCConfig.of(config) if config is not None else None
    if lvtc is not None and lvtc.expand_layer < config.get_text_config().num_hidden_layers:
        print(f"LVTC: layers < {lvtc.expand_layer} see {settings.tokens_per_tile} tokens per frame, "
              f"layers >= {lvtc.expand_layer} see {config.hr_tokens_per_tile}")
    if config is not None and config.vir is not None:
        vir = config.vir
        state = (f"off in {args.model}'s config" if not vir.enabled else
                 f"not run on video frames here: these rows are the router off; of N frames (one prompt) it "
                 f"compresses at most those strictly above the {vir.relative_threshold:g} quantile of their scores, "
                 f"to {config.compressed_tokens_per_tile} tokens each")
        print(f"ViR router (InternVL3.5-Flash): {state}")
    elif config is not None:
        print(_vllm_line(config))
    print(format_table(rows))
    return 0


def _describe_video(path: str) -> str:
    """'300 frames at 30 fps (10.0 s)' for a file, '120 frame images' for a folder; bad input as a CLI error."""
    from pathlib import Path

    from ..processing.video import VideoReader, frame_files

    try:
        if Path(path).is_dir():
            count = len(frame_files(Path(path)))
            if not count:
                raise ValueError(f"video {path!r}: the folder holds no frame images")
            return f"{count} frame images"
        reader = VideoReader(path)
    except (ValueError, OSError, ImportError) as error:
        raise CLIError(f"--video: {error}") from None
    return f"{reader.num_frames} frames at {reader.fps:g} fps ({reader.duration:.1f} s)"


def _load_processor_and_config(model: str):
    from transformers import AutoProcessor

    from ..hub.resolve import read_internvlx_config, resolve_model
    from ..modeling import InternVLXConfig

    path = resolve_model(model, allow_patterns=["*.json", "*.py", "*.jinja", "*.model", "*.txt", "*.tiktoken"])
    read_internvlx_config(path, f"MODEL {str(model)!r}")
    config = InternVLXConfig.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    if not hasattr(processor, "num_visual_tokens"):
        raise CLIError(f"{model}: its processor is {type(processor).__name__}, not InternVLXProcessor; convert the "
                       "checkpoint with `internvlx convert`.")
    return processor, config


TOKENS = Command(
    name="tokens",
    help="tiles, <IMG_CONTEXT> tokens and LLM prefill FLOPs of images (ratio / area / edge tiling) or a video",
    description=_TOKENS_DESCRIPTION,
    epilog=_TOKENS_EPILOG,
    add_arguments=_add_tokens_arguments,
    run=_run_tokens,
)
