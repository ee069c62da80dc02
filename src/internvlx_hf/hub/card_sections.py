"""The sections of a checkpoint's model card (`card.build_model_card` puts them together): the introduction, the
compressions, InternVL3.5-Flash's router, usage, how the model was made, results and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..token_budget import TYPICAL_IMAGE_SIZES, TilingSettings, image_budget
from .lineage import Lineage
from .resolve import looks_like_repo_id
from .results import ResultRow

CODE_URL = "https://github.com/ludc506/InternVL-X"


def intro(name: str, line: Lineage, tags: list[str], router: tuple[int, int] | None = None) -> str:
    """The title and first paragraph; ``router``: an InternVL3.5-Flash model's tokens per tile, full and compressed."""
    names = {"pvtc": "the PVTC projector", "lvtc": "LVTC inside the LLM", "rvtc": "RVTC tiling"}
    used = "this one uses " + ", ".join(names[t] for t in tags) if tags else \
        "this one uses none of them yet: InternVL2's architecture, ready for an upgrade"

    what = {
        "converted": "converted with `internvlx convert` from",
        "fine-tuned": "fine-tuned with `internvlx train` from",
        "merged": "fine-tuned with LoRA (merged into the weights) from",
        "adapter": "a LoRA adapter for",
        "unknown": "",
    }[line.kind]
    base = f" {what} [{line.base_model}](https://huggingface.co/{line.base_model})" if line.base_model and what else ""
    family = (f"the InternVL2 model family with the paper's visual token compressions ({used})" if router is None else
              "an InternVL3.5-Flash model, whose visual resolution router sends each image tile to the LLM as "
              f"{router[0]} or {router[1]} tokens (see below)"
              + (f"; {used}" if tags else "; it uses none of the InternVL-X paper's visual token compressions"))
    return (
        f"# {name}\n\n"
        f"An [InternVL-X]({CODE_URL}) checkpoint{base}, for Hugging Face Transformers: {family}. The checkpoint "
        "carries its own model and processor code, so it loads with `trust_remote_code=True` without installing "
        "anything besides `transformers`, `torch` and `pillow`."
        + (" The adapter also needs `peft`." if line.kind == "adapter" else "")
    )


def compression_section(config, settings: TilingSettings) -> str:
    from ..modeling.configuration_internvlx import LVTCConfig

    text = config.get_text_config()
    lvtc = LVTCConfig.of(config)
    if config.projector_type == "pvtc":
        projector = (f"PVTC (paper Sec. 3.1): {config.pvtc_num_layers} cross-attention layer(s), "
                     f"{config.pvtc_num_heads} heads; a local (2x2 window) and a global (CLS) query per token")
    else:
        projector = "MLP (InternVL2's pixel shuffle + LayerNorm / Linear / GELU / Linear)"
    # k = depth is a valid LVTC config that never expands (it only injects the extra LR projectors).
    expands = lvtc is not None and lvtc.expand_layer < text.num_hidden_layers
    if lvtc is not None:
        injected = ", ".join(str(i) for i in lvtc.injection_layers) or "none"
        projectors = (f"T = {lvtc.num_lr_projectors} LR projector(s), the extra ones added before layers s = "
                      f"{lvtc.inject_start}, every i = {lvtc.inject_interval} (layers: {injected})")
        if expands:
            lvtc_text = (f"on (paper Sec. 3.2): layers < k = {lvtc.expand_layer} of {text.num_hidden_layers} see "
                         f"{config.image_seq_length} tokens per tile, layers >= k see {config.hr_tokens_per_tile} "
                         f"({lvtc.upsample_mode} upsampling + an HR {lvtc.hr_projector_type} projector); {projectors}")
        else:
            lvtc_text = (f"on, without expansion (paper Sec. 3.2): k = {lvtc.expand_layer} is the LLM's depth, so all "
                         f"{text.num_hidden_layers} layers see {config.image_seq_length} tokens per tile; {projectors}")
    else:
        lvtc_text = "off"
    tiling_names = {"ratio": "ratio (InternVL2's aspect-ratio matching)",
                    "area": "area (RVTC, paper Sec. 3.3: max tiles <= ceil(W*H / 448^2))",
                    "edge": "edge (RVTC, paper Sec. 3.3: max tiles <= ceil(W/448) * ceil(H/448))",
                    "none": "none (one tile)"}
    tiles = (f"{tiling_names.get(settings.tiling, settings.tiling)}; {settings.min_tiles} to {settings.max_tiles} "
             f"tiles of {settings.image_size}px")
    if settings.use_thumbnail:
        tiles += ", plus a thumbnail when there is more than one"
    per_tile = f"{settings.tokens_per_tile}" + (f" (layers >= k: {config.hr_tokens_per_tile})" if expands else "")
    if getattr(config, "vir", None) is not None:
        per_tile += f" (the LLM gets {config.compressed_tokens_per_tile} of a tile the router compresses: below)"
    lines = [
        "## Visual token compression",
        "",
        "| setting | value |",
        "|---|---|",
        f"| projector | {projector} |",
        f"| LVTC | {lvtc_text} |",
        f"| tiling | {tiles} |",
        f"| `<IMG_CONTEXT>` tokens per tile | {per_tile} |",
        f"| LLM | {text.model_type}, {text.num_hidden_layers} layers, hidden size {text.hidden_size} |",
        "",
        f"Tokens per image with the saved settings ({settings.tiling} tiling, at most {settings.max_tiles} tiles):",
        "",
        "| image size | tile grid | tiles | `<IMG_CONTEXT>` tokens"
        + (" | LLM tokens from layer k |" if expands else " |"),
        "|---|---|---|---" + ("|---|" if expands else "|"),
    ]
    for width, height in TYPICAL_IMAGE_SIZES:
        budget = image_budget(width, height, settings.tiling, settings)
        row = f"| {width}x{height} | {budget.grid[0]}x{budget.grid[1]} | {budget.tiles} | {budget.tokens}"
        lines.append(row + (f" | {budget.tiles * config.hr_tokens_per_tile} |" if expands else " |"))
    lines += ["", "`internvlx tokens` (from the `internvlx-hf` package) computes these numbers for any image, and the "
                  "LLM prefill FLOPs."]
    return "\n".join(lines)


def router_section(config, settings: TilingSettings) -> str:
    """InternVL3.5-Flash's router (``config.vir``): what it does, its settings, and what it makes of typical images
    (bounds: the decisions need the pixels)."""
    from ..token_budget import router_compressible

    vir = getattr(config, "vir", None)
    if vir is None:
        return ""
    full, small = config.image_seq_length, config.compressed_tokens_per_tile
    q, floor = vir.relative_threshold, vir.absolute_threshold
    scope = {"sample": "`sample`: the quantile over the tiles of each sample (each row of a batch, each packed "
                       "sequence), so that a sample's answer does not depend on the rest of its batch",
             "call": "`call`: the quantile over every tile of the call, as the reference's `generate_flash`"}
    lines = [
        "## Visual resolution router (InternVL3.5-Flash)",
        "",
        f"Per {settings.image_size}px tile, after the vision tower, the router (ViR) pools the tile's ViT tokens "
        "into one vector (a learned query's cross-attention) and scores it with a gating MLP (a softmax of two: the "
        f"first, `p0`). A tile with a high score enters the LLM compressed, as {small} tokens (a second projector at "
        f"pixel-shuffle ratio {vir.compressed_downsample_ratio:g}); the others as {full} (the MLP projector). The "
        f"processor writes {full} `<IMG_CONTEXT>` per tile, as for every InternVL model; `generate()` and a forward "
        f"given `pixel_values` run the router and delete a compressed tile's placeholders after its first {small}, "
        "so the LLM's prompt is shorter than the processor's.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| router | {'on' if vir.enabled else 'off'} (`config.vir.enabled`, the reference's `flash_mode`) |",
        f"| compressed when | `p0` > the {q:g} quantile of its sample's tiles' scores (`relative_threshold`, "
        f"`torch.quantile`) and `p0` >= {floor:g} (`absolute_threshold`) |",
        f"| quantile scope | {scope.get(vir.scope, vir.scope)} |",
        f"| tokens per tile | {full}, or {small} when compressed |",
        f"| router modules | cross-attention pooling ({vir.pooling_num_heads} heads), gating MLP, the compressed "
        "tiles' projector |",
        "",
        f"What the router keeps depends on the image. Of a sample's n tiles at most n - 1 - floor({q:g} (n - 1)) "
        "are compressed, those strictly above the quantile (when every score differs and reaches the absolute "
        "threshold), so a one-tile image alone in its prompt never is. One image per prompt, with the saved settings "
        f"({settings.tiling} tiling, at most {settings.max_tiles} tiles):",
        "",
        "| image size | tiles | tiles compressed | image tokens the LLM receives | router off |",
        "|---|---|---|---|---|",
    ]
    for width, height in TYPICAL_IMAGE_SIZES:
        tiles = image_budget(width, height, settings.tiling, settings).tiles
        most = router_compressible(tiles, q, floor) if vir.enabled else 0
        fewest = most * small + (tiles - most) * full
        span = f"{fewest} to {tiles * full}" if most else str(tiles * full)
        lines.append(f"| {width}x{height} | {tiles} | {f'0 to {most}' if most else '0'} | {span} | {tiles * full} |")
    lines += [
        "",
        "`internvlx tokens MODEL --image photo.jpg` (from the `internvlx-hf` package) runs the router on your images "
        "and reports what it keeps; `internvlx bench prefill MODEL --image photo.jpg` times the model against its "
        "router off.",
        "",
        f"**The same weights without the router**: `model.config.vir.enabled = False` runs this checkpoint as plain "
        f"InternVL3.5, every tile {full} tokens. `model.model.route(input_ids, pixel_values, attention_mask)` returns "
        "the router's decisions (`compressed`, `scores` per tile) and the shortened prompt.",
        "",
        "**Batches**: the reference (`generate_flash` in the official InternVL3.5-Flash code) takes one sample per "
        "call. This package batches: with the scope `sample` (the default) each sample's tiles are ranked among "
        "themselves, so each answer in a batch is the one the sample gets alone; the scope `call` "
        "(`model.config.vir.scope = \"call\"`) ranks every tile of the call together, as the reference does "
        "(the two agree for one sample).",
    ]
    return "\n".join(lines)


def usage_section(load_id: str, line: Lineage, settings: TilingSettings, flash: bool = False) -> str:
    if line.kind == "adapter":
        load = (
            "from peft import PeftModel\n\n"
            f'base_id = "{line.base_model}"\n'
            f'adapter_id = "{load_id}"\n'
            'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            'model = AutoModel.from_pretrained(base_id, trust_remote_code=True, dtype="auto")\n'
            "model = PeftModel.from_pretrained(model, adapter_id).to(device).eval()\n"
            "processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=True)\n"
        )
    else:
        load = (
            f'model_id = "{load_id}"\n'
            'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            'model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype="auto").to(device).eval()\n'
            "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)\n"
        )
    code = (
        "import torch\n"
        "from PIL import Image\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "\n"
        + load
        + ("# model.config.vir.enabled = False  # the router off: plain InternVL3.5, every tile 256 tokens\n"
           if flash else "")
        + 'image = Image.open("image.jpg")  # your image\n'
        "\n"
        f"# generate(): the processor tiles the image ({settings.tiling} tiling, at most {settings.max_tiles} tiles) "
        "and expands <image>\n"
        'messages = [{"role": "user", "content": [{"type": "image"}, '
        '{"type": "text", "text": "Describe this image."}]}]\n'
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        'inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(device, dtype=model.dtype)\n'
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
        "print(processor.post_process_image_text_to_text(output)[0])\n"
        "\n"
        "# chat(): InternVL2's API; the follow-up question keeps the conversation (history)\n"
        'pixel_values = processor.image_processor(images=[image], return_tensors="pt").pixel_values\n'
        "pixel_values = pixel_values.to(device, model.dtype)\n"
        "config = dict(max_new_tokens=64, do_sample=False)\n"
        'answer, history = model.chat(processor, pixel_values, "Describe this image.", config, return_history=True)\n'
        "print(answer)\n"
        'print(model.chat(processor, pixel_values, "What stands out?", config, history=history))\n'
    )
    return (
        "## Usage\n\n"
        "Needs `transformers>=5`, `torch` and `pillow`" + (" and `peft`" if line.kind == "adapter" else "")
        + "; this code runs as is (put an image at `image.jpg`).\n\n"
        f"```python\n{code}```\n\n"
        "The `tiling` and `max_tiles` options of the processor call change the tile budget per image, e.g. "
        '`processor(..., tiling="edge", max_tiles=6)`.'
    )


def made_section(record: dict[str, Any], line: Lineage) -> str:
    conversion = record.get("conversion")
    runs = [run for run in record.get("training") or [] if isinstance(run, dict)]
    if not conversion and not runs:
        return ("## How this model was made\n\nThis folder has no `internvlx_provenance.json`, so its origin is not "
                "recorded here.")
    parts = ["## How this model was made"]
    if conversion:
        source = record.get("base_model") or _short(conversion.get("source"))
        parts.append(f"**Conversion** (`internvlx convert`) from `{source}`:\n\n"
                     + _bullets(conversion, skip=("source",)))
    for index, run in enumerate(runs, start=1):
        output = run.get("output")
        what = {"adapter": "LoRA adapter", "merged": "LoRA merged into the weights", "full": "full weights"}
        title = f"**Training run {index}** (`internvlx train`" + (f", output: {what.get(output, output)}" if output
                                                                  else "") + "):"
        parts.append(title + "\n\n" + _bullets(run, skip=("output", "evaluation")))
    return "\n\n".join(parts)


_FIRST_KEYS = ("date", "internvlx_hf_version", "preset", "started_from", "data", "datasets", "steps", "max_steps",
               "epochs", "learning_rate", "lora")


def _bullets(details: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    keys = [k for k in _FIRST_KEYS if k in details] + [k for k in details if k not in _FIRST_KEYS]
    lines = []
    for key in keys:
        if key in skip or details[key] in (None, "", [], {}):
            continue
        value = details[key]
        if key in ("started_from", "source"):
            value = _short(value)
        lines.append(f"- {key.replace('_', ' ')}: {_render(value)}")
    return "\n".join(lines) if lines else "- (no details recorded)"


def _short(value: Any) -> str:
    # Local paths are the publisher's machine's; the folder name is what identifies the checkpoint.
    text = str(value)
    return text if looks_like_repo_id(text) and not Path(text).is_absolute() else Path(text).name or text


def _render(value: Any, limit: int = 400) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_render(v, limit)}" for k, v in value.items() if v not in ({}, [], "")) or "none"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_render(v, limit) for v in value) or "none"
    elif value is None:
        text = "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
        if "<" in text or "|" in text:  # e.g. <|im_end|>: code, not HTML or a table cell
            text = f"`{text}`"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def results_section(rows: list[ResultRow]) -> str:
    if not rows:
        return ""
    has_split = any(row.split for row in rows)
    has_notes = any(row.notes for row in rows)
    header = "| benchmark | metric | value |" + (" split |" if has_split else "") + (" notes |" if has_notes else "")
    lines = ["## Results", "", "Measured by the publisher of this checkpoint (from the results file given to "
             "`internvlx card --results`).", "", header, "|" + "---|" * header.count(" |")]
    for row in rows:
        cells = [row.benchmark, row.metric, f"{row.value:g}" if isinstance(row.value, float) else str(row.value)]
        cells += [row.split or ""] if has_split else []
        cells += [row.notes or ""] if has_notes else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_section(record: dict[str, Any]) -> str:
    """The scores `internvlx train --eval-data` recorded at the last evaluation of the run that made the folder."""
    runs = [run for run in record.get("training") or [] if isinstance(run, dict)]
    evaluation = runs[-1].get("evaluation") if runs else None
    if not isinstance(evaluation, dict) or not evaluation.get("datasets"):
        return ""
    options = evaluation.get("options") or {}
    settings = ", ".join(f"{key.replace('_', ' ')} {_render(options[key])}" for key in options)
    data = f" on `{_short(evaluation['data'])}`" if evaluation.get("data") else ""
    lines = ["## Held-out evaluation", "",
             f"Scored during training by `internvlx train --eval-data`{data} at step {evaluation.get('step')} "
             f"(greedy decoding{', ' + settings if settings else ''}; the score is the mean of the metric over the "
             "samples).", "",
             "| dataset | metric | score | samples | visual tokens / sample |", "|---|---|---|---|---|"]
    for result in evaluation["datasets"]:
        groups = result.get("visual_tokens_per_sample") or {}
        tokens = ", ".join(f"{value:g} ({group})" for group, value in groups.items()) if len(groups) > 1 else \
            ", ".join(f"{value:g}" for value in groups.values())
        lines.append(f"| {_render(result.get('name'))} | {_render(result.get('metric'))} | "
                     f"{result.get('accuracy', 0):.3f} | {_render(result.get('samples'))} | {tokens} |")
    return "\n".join(lines)


__all__ = ["CODE_URL", "compression_section", "evaluation_section", "intro", "made_section", "results_section",
           "router_section", "usage_section"]
