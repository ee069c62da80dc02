"""What an image costs an InternVL-X checkpoint: tiles, `<IMG_CONTEXT>` tokens, LLM tokens per layer group, FLOPs.

Shared by `internvlx tokens`, the model card ("tokens per typical image"), the demo and `internvlx eval` (tokens per
LLM layer group), so all print the same numbers.

Prefill FLOPs estimate (`prefill_flops`): the LLM's matrix multiplications for one prompt of ``n`` tokens, counting
a multiply-add as 2 FLOPs, per decoder layer

    2n·h·(2·a·d + 2·g·d)     q, k, v, o projections  (h hidden size, a heads, g KV heads, d head dim)
  + 4n²·a·d                  attention scores QKᵀ and their weighted sum over the full n x n square
  + 6n·h·f                   gated MLP (gate, up, down; f intermediate size: Llama, Qwen2, Phi-3, InternLM2)

plus ``2·h·V`` for the LM head on the last position only (a `generate()` prefill keeps one position's logits).
With LVTC, layers ``< k`` see the short layout (``n_short`` tokens: text + LR visual tokens) and layers ``>= k``
the long one (``n_long``: text + HR visual tokens). The *uncompressed* model runs every layer on the long layout.
Norms, activations, RoPE, the LVTC upsampling/pooling and the vision side (ViT, projectors) are not counted; the
attention term counts the whole square as dense kernels and `torch.utils.flop_counter` do (a causal kernel that
skips masked blocks does about half of it).

InternVL3.5-Flash (`config.vir`): each tile enters the LLM at ``image_seq_length`` tokens or, where its router
compresses it, ``compressed_tokens_per_tile``; the decisions need the pixels (`load_router` + `route_image` run the
vision tower and the router, not the LLM), and a size alone gives bounds (`router_compressible`). `flash_row` prices
both with the FLOPs above, against the router off (every tile ``image_seq_length``).

vLLM's prompt (`vllm_prompt_tokens`, what its ``--max-model-len`` bounds) holds an LVTC checkpoint's every tile at the
long layout's count (the plugin schedules the tokens of layers >= k, `internvlx_hf.vllm.processing`), e.g. 1024
placeholder ids per 448px tile instead of 256; for other checkpoints it is transformers' prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .processing.image_processing_internvlx import get_tile_grid

#: The tilings `internvlx tokens` compares (paper Sec. 3.3): InternVL2's ratio matching and the two RVTC caps.
COMPARED_TILINGS = ("ratio", "area", "edge")

#: Image sizes the model card reports tokens for: one tile, a 4:3 photo, a 16:9 frame, a portrait document page.
TYPICAL_IMAGE_SIZES = ((448, 448), (1024, 768), (1920, 1080), (1700, 2200))

_SIZE = re.compile(r"^(\d+)[xX](\d+)$")


@dataclass(frozen=True)
class TilingSettings:
    """The processor settings that decide an image's token count (defaults: InternVL2-2B)."""

    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    tokens_per_tile: int = 256
    tiling: str = "ratio"

    @classmethod
    def from_processor(cls, processor) -> "TilingSettings":
        image_processor = processor.image_processor
        tiling = image_processor.tiling
        return cls(
            image_size=int(image_processor.image_size),
            min_tiles=int(image_processor.min_tiles),
            max_tiles=int(image_processor.max_tiles),
            use_thumbnail=bool(image_processor.use_thumbnail),
            tokens_per_tile=int(processor.image_seq_length),
            tiling=str(getattr(tiling, "value", tiling)),
        )


@dataclass(frozen=True)
class ImageBudget:
    """One image under one tiling: its grid, tile count (thumbnail included) and `<IMG_CONTEXT>` tokens."""

    width: int
    height: int
    tiling: str
    grid: tuple[int, int]
    tiles: int
    tokens: int


def image_budget(width: int, height: int, tiling: str, settings: TilingSettings, processor=None) -> ImageBudget:
    """Tile grid and tokens of a ``width x height`` image; ``processor.num_visual_tokens`` gives the tokens when a
    processor is passed (the count a checkpoint's processor will really produce)."""
    mode = getattr(tiling, "value", tiling)
    cols, rows = get_tile_grid(width, height, mode, settings.min_tiles, settings.max_tiles, settings.image_size)
    tiles = cols * rows + (1 if settings.use_thumbnail and cols * rows > 1 else 0)
    tokens = tiles * settings.tokens_per_tile
    if processor is not None:
        tokens = processor.num_visual_tokens([(width, height)], tiling=mode, max_tiles=settings.max_tiles)[0]
    return ImageBudget(width, height, mode, (cols, rows), tiles, tokens)


def image_size_of(spec: str) -> tuple[int, int]:
    """``(width, height)`` of an image file, or of a ``WxH`` size such as ``1024x768`` (when no such file exists).

    Only the header is read (PIL opens lazily), so huge images cost nothing.
    """
    path = Path(spec)
    if not path.exists():
        match = _SIZE.match(spec.strip())
        if match:
            width, height = int(match.group(1)), int(match.group(2))
            if width < 1 or height < 1:
                raise ValueError(f"--image {spec!r}: a size needs both sides >= 1 pixel, e.g. 1024x768.")
            return width, height
        raise FileNotFoundError(f"--image {spec!r}: no such file; pass an image file or a size such as 1024x768.")
    if path.is_dir():
        raise ValueError(f"--image {spec!r} is a folder; pass an image file or a size such as 1024x768.")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--image {spec!r} is not a readable image ({type(error).__name__}: {error}).") from None


# ---------------------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class LLMShape:
    """The LLM dimensions the FLOPs estimate needs, read from a text config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_text_config(cls, text_config) -> "LLMShape":
        heads = int(text_config.num_attention_heads)
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden_size=int(text_config.hidden_size),
            intermediate_size=int(text_config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(text_config.vocab_size),
        )


def layer_groups(config, prompt_tokens: int, tiles: int) -> list[tuple[str, int]]:
    """Tokens each group of LLM layers processes for a prompt of ``prompt_tokens`` with ``tiles`` image tiles.

    Without LVTC every layer sees the prompt. With LVTC, layers ``< k`` see it with ``image_seq_length`` tokens per
    tile and layers ``>= k`` see every tile expanded to its high-resolution token count.
    """
    from .modeling.configuration_internvlx import LVTCConfig

    depth = config.text_config.num_hidden_layers
    lvtc = LVTCConfig.of(config)
    if lvtc is None or lvtc.expand_layer >= depth:  # k = depth never expands
        return [(f"layers 0-{depth - 1}", prompt_tokens)]
    k = lvtc.expand_layer
    extra = tiles * (config.hr_tokens_per_tile - config.image_seq_length)
    long = f"layer {k}" if k == depth - 1 else f"layers {k}-{depth - 1}"
    return [(f"layers 0-{k - 1}" if k > 1 else "layer 0", prompt_tokens), (long, prompt_tokens + extra)]


def layer_flops(shape: LLMShape, n: int) -> int:
    """Matmul FLOPs of one decoder layer on ``n`` tokens (see the module docstring for the formula)."""
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    projections = 2 * n * shape.hidden_size * (2 * q_width + 2 * kv_width)
    attention = 4 * n * n * q_width
    mlp = 6 * n * shape.hidden_size * shape.intermediate_size
    return projections + attention + mlp


def prefill_flops(shape: LLMShape, n_short: int, n_long: int | None = None, expand_layer: int | None = None) -> int:
    """LLM prefill FLOPs: layers ``< expand_layer`` on ``n_short`` tokens, the rest on ``n_long`` (LVTC), plus the
    LM head on the last position. Without ``expand_layer`` every layer runs on ``n_short``."""
    k = shape.num_layers if expand_layer is None else expand_layer
    n_long = n_short if n_long is None else n_long
    layers = k * layer_flops(shape, n_short) + (shape.num_layers - k) * layer_flops(shape, n_long)
    return layers + 2 * shape.hidden_size * shape.vocab_size


def vllm_tokens_per_tile(config) -> int:
    """Placeholder ids per tile in the prompt vLLM schedules for a checkpoint (`internvlx_hf.vllm.processing`'s
    ``tokens_per_tile``): the long layout's with LVTC expansion, else ``image_seq_length``. Pure arithmetic on the
    config (`vllm.lvtc.geometry` imports nothing of vLLM)."""
    from .vllm.lvtc.geometry import lvtc_geometry_of

    layout = lvtc_geometry_of(config)
    return layout.long_per_tile if layout is not None else int(config.image_seq_length)


def vllm_prompt_tokens(config, prompt_tokens: int, tiles: int, image_tokens: int) -> int:
    """The length of vLLM's prompt (what ``--max-model-len`` bounds) for transformers' prompt of ``prompt_tokens``
    ids holding ``tiles`` tiles of ``image_tokens`` `<IMG_CONTEXT>` ids: each tile takes `vllm_tokens_per_tile` ids
    there (the text, `<img>`, `</img>` and `FrameN: ` lines are the same ids)."""
    return prompt_tokens - image_tokens + tiles * vllm_tokens_per_tile(config)


@dataclass(frozen=True)
class ModelBudget:
    """An image's cost inside an InternVL-X checkpoint's LLM."""

    llm_tokens: int                         # the prompt's length in the input ids (short layout)
    llm_tokens_long: int | None             # layers >= k (LVTC only)
    vllm_prompt_tokens: int                 # vLLM's prompt (LVTC: every tile at the long layout); --max-model-len
    expand_layer: int | None                # k (LVTC only)
    prefill_flops: int
    uncompressed_prefill_flops: int | None  # every layer on the long layout (LVTC only)


def model_budget(config, image: ImageBudget, text_tokens: int) -> ModelBudget:
    """LLM tokens per layer group and prefill FLOPs for a prompt of ``text_tokens`` text tokens and ``image``.

    The prompt holds ``<img>`` + the image's tokens + ``</img>``; with LVTC each tile's LR tokens become
    ``config.hr_tokens_per_tile`` from layer k on.
    """
    from .modeling.configuration_internvlx import LVTCConfig

    shape = LLMShape.from_text_config(config.get_text_config())
    n_short = text_tokens + 2 + image.tokens
    n_vllm = vllm_prompt_tokens(config, n_short, image.tiles, image.tokens)
    lvtc = LVTCConfig.of(config)
    if lvtc is None or lvtc.expand_layer >= shape.num_layers:  # k = depth: LVTC that never expands
        return ModelBudget(llm_tokens=n_short, llm_tokens_long=None, vllm_prompt_tokens=n_vllm, expand_layer=None,
                           prefill_flops=prefill_flops(shape, n_short), uncompressed_prefill_flops=None)
    n_long = text_tokens + 2 + image.tiles * config.hr_tokens_per_tile
    return ModelBudget(
        llm_tokens=n_short,
        llm_tokens_long=n_long,
        vllm_prompt_tokens=n_vllm,
        expand_layer=lvtc.expand_layer,
        prefill_flops=prefill_flops(shape, n_short, n_long, lvtc.expand_layer),
        uncompressed_prefill_flops=prefill_flops(shape, n_long),
    )


def budget_rows(sizes: list[tuple[str, tuple[int, int]]], settings: TilingSettings, tilings=COMPARED_TILINGS,
                processor=None, config=None, text_tokens: int = 64) -> list[dict[str, Any]]:
    """One row per (image, tiling): what `internvlx tokens` prints (``--json`` prints these dicts)."""
    rows = []
    for name, (width, height) in sizes:
        for tiling in tilings:
            budget = image_budget(width, height, tiling, settings, processor)
            row: dict[str, Any] = {"image": name, **asdict(budget), "grid": f"{budget.grid[0]}x{budget.grid[1]}"}
            if config is not None:
                row.update(asdict(model_budget(config, budget, text_tokens)))
                row["text_tokens"] = text_tokens
            rows.append(row)
    return rows


def video_budget_rows(video: str, frame_counts: list[int], settings: TilingSettings, processor=None, config=None,
                      text_tokens: int = 64) -> list[dict[str, Any]]:
    """One row per frame count: a video of ``frames`` frames is ``frames`` tiles (one 448px tile each, no
    thumbnail) and, in the prompt, InternVL2's ``Frame1: <image>\\n...`` lines.

    With a checkpoint (``processor`` and ``config``), the LLM prompt is ``text_tokens`` + the frame lines as the
    checkpoint's tokenizer encodes them (``FrameN: ``, ``<img>``, ``</img>``, newlines) + the visual tokens; with
    LVTC each frame's tokens become ``config.hr_tokens_per_tile`` from layer k on.
    """
    from .modeling.configuration_internvlx import LVTCConfig

    from .processing.video import video_prompt

    rows = []
    for frames in frame_counts:
        row: dict[str, Any] = {"video": video, "frames": frames, "tiles": frames,
                               "tokens": frames * settings.tokens_per_tile}
        if config is not None and processor is not None:
            lines = video_prompt(frames).replace("<image>", "<img></img>")
            frame_text = len(processor.tokenizer(lines, add_special_tokens=False)["input_ids"])
            shape = LLMShape.from_text_config(config.get_text_config())
            n_short = text_tokens + frame_text + row["tokens"]
            row.update(text_tokens=text_tokens, frame_text_tokens=frame_text, llm_tokens=n_short,
                       llm_tokens_long=None,
                       vllm_prompt_tokens=vllm_prompt_tokens(config, n_short, frames, row["tokens"]),
                       expand_layer=None, prefill_flops=prefill_flops(shape, n_short), uncompressed_prefill_flops=None)
            lvtc = LVTCConfig.of(config)
            if lvtc is not None and lvtc.expand_layer < shape.num_layers:
                n_long = text_tokens + frame_text + frames * config.hr_tokens_per_tile
                row.update(llm_tokens_long=n_long, expand_layer=lvtc.expand_layer,
                           prefill_flops=prefill_flops(shape, n_short, n_long, lvtc.expand_layer),
                           uncompressed_prefill_flops=prefill_flops(shape, n_long))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """`budget_rows` as Markdown tables that fit 100 columns: the tiles and visual tokens of each row, then (with a
    model) the LLM's tokens and prefill FLOPs of each row, in a second table."""
    video = bool(rows) and "frames" in rows[0]
    name = [("video", "video"), ("frames", "frames")] if video else [("image", "image"), ("tiling", "tiling")]
    tiles = (name + [("tiles", "tiles"), ("<IMG_CONTEXT>", "tokens")] if video else
             [("image", "image"), ("size", None), ("tiling", "tiling"), ("grid", "grid"), ("tiles", "tiles"),
              ("<IMG_CONTEXT>", "tokens")])
    has_model = bool(rows) and "llm_tokens" in rows[0]
    if not has_model:
        return _markdown(rows, tiles)
    if rows[0].get("expand_layer") is not None:
        k = rows[0]["expand_layer"]
        llm = name + [(f"LLM, layers < {k}", "llm_tokens"), (f"layers >= {k}", "llm_tokens_long"),
                      ("vLLM prompt", "vllm_prompt_tokens"), ("TFLOPs", "prefill_flops"),
                      ("uncompressed", "uncompressed_prefill_flops"), ("ratio", None)]
        note = "LLM tokens per layer group and prefill TFLOPs (uncompressed: every layer on the long layout)"
    else:
        llm = name + [("LLM tokens", "llm_tokens"), ("prefill TFLOPs", "prefill_flops")]
        note = "LLM tokens and prefill TFLOPs"
    return f"{_markdown(rows, tiles)}\n\n{note}:\n{_markdown(rows, llm)}"


def _markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str | None]]) -> str:
    def cell(row, header, key):
        if header == "size":
            return f"{row['width']}x{row['height']}"
        if header == "ratio":
            return f"{row['prefill_flops'] / row['uncompressed_prefill_flops']:.3f}"
        value = row[key]
        return _tflops(value) if key.endswith("flops") else str(value)

    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, header, key) for header, key in columns) + " |" for row in rows]
    return "\n".join(lines)


def _tflops(flops: int) -> str:
    value = flops / 1e12
    return f"{value:.3f}" if value >= 0.01 else f"{value:.2e}"


# ------------------------------------------------------------------------------------------- InternVL3.5-Flash (ViR)


#: The base model's modules the router runs on (the LLM is not one).
ROUTER_MODULES = ("vision_tower", "multi_modal_projector", "vir")


def router_compressible(tiles: int, relative_threshold: float, absolute_threshold: float = 0.0) -> int:
    """The most tiles of one image (one sample of ``tiles`` tiles) the router can compress: those strictly above the
    ``relative_threshold`` quantile of the scores, ``tiles - 1 - floor(q * (tiles - 1))`` when every score differs
    (ties give fewer), none when ``absolute_threshold`` is above 1 (a softmax score never reaches it).

    Counted on the distinct scores ``0 .. tiles - 1`` with ``torch.quantile`` in float32, as the router takes its
    quantile, so that the rounding of ``q * (tiles - 1)`` is the router's own."""
    import torch

    if tiles < 1 or absolute_threshold > 1.0:
        return 0
    ranks = torch.arange(tiles, dtype=torch.float32)
    return int((ranks > torch.quantile(ranks, float(relative_threshold))).sum())


def load_router(path: str | Path, config, dtype: str = "auto", device: str = "cpu"):
    """An InternVL3.5-Flash checkpoint's base model with only what its router needs in memory: the vision tower,
    the projector and the router (`InternVLXModel.route` runs on it); the LLM stays on the meta device, unread (it
    is most of a checkpoint's weights, an 8B LLM next to a 0.3B vision tower, and the router never reaches it).

    ``dtype``: "auto" takes the checkpoint's (config.json's ``dtype``), as ``from_pretrained(dtype="auto")`` does.
    A folder without safetensors files is loaded whole."""
    import torch

    from .modeling.modeling_internvlx import InternVLXForConditionalGeneration, InternVLXModel

    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    target = (saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved).removeprefix("torch."))) \
        if dtype == "auto" else getattr(torch, dtype)
    path = Path(path)
    shards = _safetensors_shards(path)
    if not shards or not all(shard.is_file() for shard in shards):
        whole = InternVLXForConditionalGeneration.from_pretrained(path, dtype=target).to(device).eval()
        return whole.model
    from safetensors import safe_open

    wanted = ROUTER_MODULES
    with torch.device("meta"):
        model = InternVLXModel(config)
    state = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as tensors:
            for key in tensors.keys():
                name = key.removeprefix("model.")
                if name.split(".", 1)[0] in wanted:
                    state[name] = tensors.get_tensor(key)
    model.load_state_dict(state, strict=False, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if tensor.is_meta and name.split(".", 1)[0] in wanted]
    if left:
        raise ValueError(f"{path}: the router's weights are not all in its safetensors files ({len(left)} missing, "
                         f"e.g. {left[0]}); convert the checkpoint again with `internvlx convert`.")
    for name in wanted:
        getattr(model, name).to(device=device, dtype=target)
    return model.eval()


def _safetensors_shards(path: Path) -> list[Path]:
    """The files that hold the router's weights (all of a single-file checkpoint)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [path / name for name in dict.fromkeys(
            shard for key, shard in weight_map.items()
            if key.removeprefix("model.").split(".", 1)[0] in ROUTER_MODULES)]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def route_image(router, processor, image, tiling: str, max_tiles: int) -> tuple[list[bool], list[float]]:
    """The router's decision (True: compressed) and score ``p0`` per tile of ``image`` alone in a prompt, its tiles
    made by ``processor`` under ``tiling`` and ``max_tiles`` (the thumbnail last, where there is one)."""
    import torch

    inputs = processor(images=[image], text="<image>", tiling=tiling, max_tiles=max_tiles, return_tensors="pt")
    device = next(router.vision_tower.parameters()).device
    with torch.inference_mode():
        routing = router.route(inputs["input_ids"].to(device), inputs["pixel_values"].to(device),
                               inputs["attention_mask"].to(device))
    return routing.compressed.tolist(), routing.scores.float().tolist()


def flash_row(name: str, config, image: ImageBudget, text_tokens: int, compressed: list[bool] | None = None,
              scores: list[float] | None = None) -> dict[str, Any]:
    """An image's cost in an InternVL3.5-Flash checkpoint's LLM, with its router and with it off (every tile
    ``image_seq_length`` tokens). ``compressed``: the router's decision per tile (`route_image`); None for a size
    without pixels, whose row holds the bounds: from the most tiles the router can compress
    (`router_compressible`) to none."""
    shape = LLMShape.from_text_config(config.get_text_config())
    full, small = int(config.image_seq_length), int(config.compressed_tokens_per_tile)
    vir = config.vir
    prefix = text_tokens + 2  # <img> and </img>

    def llm_tokens(count: int) -> int:
        return prefix + count * small + (image.tiles - count) * full

    most = router_compressible(image.tiles, vir.relative_threshold, vir.absolute_threshold) if vir.enabled else 0
    count = None if compressed is None else sum(bool(c) for c in compressed)
    bounds = [count, count] if count is not None else [0, most]
    tokens = [llm_tokens(bounds[1]), llm_tokens(bounds[0])]
    flops = [prefill_flops(shape, n) for n in tokens]
    return {"image": name, **asdict(image), "grid": f"{image.grid[0]}x{image.grid[1]}", "text_tokens": text_tokens,
            "decided": compressed is not None, "tiles_compressed": count, "tiles_compressed_bounds": bounds,
            "compressed": None if compressed is None else [bool(c) for c in compressed], "scores": scores,
            "image_tokens": None if count is None else tokens[0] - prefix,
            "router_off_image_tokens": image.tiles * full,
            "llm_tokens": None if count is None else tokens[0], "llm_tokens_bounds": tokens,
            "router_off_llm_tokens": llm_tokens(0),
            # vLLM checks the prompt as sent (every tile in full) against --max-model-len, before its router runs
            "vllm_prompt_tokens": llm_tokens(0),
            "prefill_flops": None if count is None else flops[0], "prefill_flops_bounds": flops,
            "router_off_prefill_flops": prefill_flops(shape, llm_tokens(0))}


def flash_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tiling, over the images whose decisions are known (`flash_row` rows with pixels): tiles compressed in all,
    their share (and its range over the images), and the fraction of image tokens, LLM tokens and prefill FLOPs kept
    against the router off. Sizes without pixels are counted apart (``size_only``)."""
    summary = []
    for tiling in dict.fromkeys(row["tiling"] for row in rows):
        mine = [row for row in rows if row["tiling"] == tiling]
        routed = [row for row in mine if row["decided"]]
        entry: dict[str, Any] = {"tiling": tiling, "images": len(routed), "size_only": len(mine) - len(routed)}
        if routed:
            tiles = sum(row["tiles"] for row in routed)
            compressed = sum(row["tiles_compressed"] for row in routed)
            shares = [row["tiles_compressed"] / row["tiles"] for row in routed]
            totals = {key: sum(row[key] for row in routed) for key in (
                "image_tokens", "router_off_image_tokens", "llm_tokens", "router_off_llm_tokens", "prefill_flops",
                "router_off_prefill_flops")}
            entry.update(tiles=tiles, tiles_compressed=compressed, compressed_share=compressed / tiles,
                         compressed_share_per_image=[min(shares), max(shares)], **totals,
                         image_tokens_kept=totals["image_tokens"] / totals["router_off_image_tokens"],
                         llm_tokens_kept=totals["llm_tokens"] / totals["router_off_llm_tokens"],
                         prefill_flops_kept=totals["prefill_flops"] / totals["router_off_prefill_flops"])
        summary.append(entry)
    return summary


def format_flash_table(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """`flash_row` rows as two Markdown tables (tiles; then the router's decisions, LLM tokens and prefill TFLOPs,
    router on against off) and `flash_summary` as lines under them."""
    tiles = [("image", "image"), ("size", None), ("tiling", "tiling"), ("grid", "grid"), ("tiles", "tiles"),
             ("<IMG_CONTEXT>", "tokens")]

    def span(low, high, show=str):
        return show(low) if low == high else f"{show(low)}..{show(high)}"

    def cells(row):
        low, high = row["tiles_compressed_bounds"]
        decided = f"{low}/{row['tiles']}" if row["decided"] else f"{span(low, high)} of {row['tiles']} (size only)"
        ratios = [f / row["router_off_prefill_flops"] for f in row["prefill_flops_bounds"]]
        return [row["image"], row["tiling"], decided, span(*row["llm_tokens_bounds"]),
                str(row["router_off_llm_tokens"]), span(*row["prefill_flops_bounds"], show=_tflops),
                _tflops(row["router_off_prefill_flops"]), span(*ratios, show=lambda r: f"{r:.3f}")]

    headers = ["image", "tiling", "compressed", "LLM tokens", "router off", "TFLOPs", "router off", "ratio"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    text = [_markdown(rows, tiles), "",
            "The router's decisions (tiles compressed), LLM tokens and prefill TFLOPs, against the router off "
            "(config.vir.enabled = False: every tile at the full count):", "\n".join(lines), ""]
    for entry in summary:
        if not entry["images"]:
            continue
        low, high = entry["compressed_share_per_image"]
        per_image = f"; per image {low:.1%} to {high:.1%}" if entry["images"] > 1 else ""
        plural = "" if entry["images"] == 1 else "s"
        text.append(f"{entry['tiling']} tiling, {entry['images']} image{plural}: {entry['tiles_compressed']} "
                    f"of {entry['tiles']} tiles compressed ({entry['compressed_share']:.1%}{per_image}); kept "
                    f"{entry['image_tokens_kept']:.1%} of the image tokens ({entry['image_tokens']} of "
                    f"{entry['router_off_image_tokens']}), {entry['llm_tokens_kept']:.1%} of the LLM tokens, "
                    f"{entry['prefill_flops_kept']:.1%} of the prefill FLOPs")
    return "\n".join(text).rstrip()


def rows_to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


__all__ = [
    "COMPARED_TILINGS",
    "TYPICAL_IMAGE_SIZES",
    "ImageBudget",
    "LLMShape",
    "ModelBudget",
    "TilingSettings",
    "budget_rows",
    "flash_row",
    "flash_summary",
    "format_flash_table",
    "format_table",
    "image_budget",
    "image_size_of",
    "layer_flops",
    "load_router",
    "model_budget",
    "prefill_flops",
    "route_image",
    "router_compressible",
    "video_budget_rows",
    "vllm_prompt_tokens",
    "vllm_tokens_per_tile",
]
