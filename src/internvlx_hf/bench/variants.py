"""A checkpoint folder and its plain-256 / plain-1024 (or, for InternVL3.5-Flash, router-off) variants, built from
the same weights.

- ``this``: the folder's model as saved.
- ``plain-256``: the same vision tower, LLM, LM head and (LR: MLP or PVTC) projector with LVTC off: every layer
  sees the short layout (``image_seq_length`` tokens per tile; 256 for a 448 px tile).
- ``plain-1024``: the same weights with an MLP projector at downsample ratio 1.0 (4x the tokens per tile; 1024 for a
  448 px tile): an LVTC model's own HR projector, else a new seeded one (its weights do not change the cost).
- ``router-off``: an InternVL3.5-Flash folder's weights with its router off (``config.vir.enabled = False``): plain
  InternVL3.5, every tile at ``image_seq_length`` tokens, what ``this`` saves against. The plain variants measure
  LVTC, which a Flash model has not (its projector is InternVL3.5's MLP, so plain-256 is router-off), so a Flash
  folder has only ``this`` and ``router-off``, and other folders no ``router-off``.

The variants share modules with ``this`` (no copy of the weights), as ``benchmarks/bench_models.py`` builds them.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import read_checkpoint_config

DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("this", "plain-256", "plain-1024", "router-off")
PLAIN_VARIANTS = ("this", "plain-256", "plain-1024")
FLASH_VARIANTS = ("this", "router-off")


# `internvlx bench` words the checkpoint check its own way (FOLDER is its argument).
_WORDING = {
    "folder": "{name}: no such folder; give a checkpoint folder (config.json + weights), e.g. one written by "
              "`internvlx convert` or `internvlx demo`.",
    "config": "{name} has no config.json: it is not a checkpoint folder.",
    "model_type": "{name} holds a {model_type!r} checkpoint, not an InternVL-X one; convert an InternVL checkpoint "
                  "first: internvlx convert SRC DST.",
}


def check_folder(folder: str | Path) -> Path:
    """The folder, if it holds an InternVL-X checkpoint; else a `FileNotFoundError` / `ValueError` saying why."""
    path = Path(folder)
    read_checkpoint_config(path, f"FOLDER {folder}", wording=_WORDING)
    return path


def has_router(folder: str | Path) -> bool:
    """Whether the folder holds an InternVL3.5-Flash checkpoint (config.json's ``vir`` set): read as JSON, so that
    the command line can choose the variants before torch loads."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vir"), dict)


def default_variants(folder: str | Path) -> tuple[str, ...]:
    """The variants measured when none are named: this, plain-256 and plain-1024; a Flash folder's this and
    router-off."""
    return FLASH_VARIANTS if has_router(folder) else PLAIN_VARIANTS


def check_variants(folder: str | Path, names) -> list[str]:
    """``names`` without repeats, if they are variants of this folder; else a `ValueError` saying which fits."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"--variants {','.join(names)}: choose from {', '.join(VARIANTS)} (comma-separated).")
    flash = has_router(folder)
    wrong = [n for n in names if n not in (FLASH_VARIANTS if flash else PLAIN_VARIANTS)]
    if wrong and flash:
        raise ValueError(f"--variants {wrong[0]}: {folder} is an InternVL3.5-Flash folder, whose variants are this and "
                         "router-off (the same weights, config.vir.enabled = False: every tile 256); plain-256 and "
                         "plain-1024 measure LVTC, which it has not.")
    if wrong:
        raise ValueError(f"--variants router-off: {folder} has no router (config.json's vir is null); router-off is "
                         "an InternVL3.5-Flash folder's router turned off; choose from this, plain-256, plain-1024.")
    return names


def _processor_settings(path: Path) -> tuple[dict | None, str | None]:
    """The image processor's saved settings and the file they came from: processor_config.json's nested
    ``image_processor`` (transformers 5), else preprocessor_config.json; ``(None, None)`` when the folder has none."""
    import json

    for name, nested in (("processor_config.json", True), ("preprocessor_config.json", False)):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except ValueError:
                continue
            data = data.get("image_processor") if nested else data
            if isinstance(data, dict):
                return data, name
    return None, None


def default_tiles(folder: str | Path) -> tuple[int, str]:
    """``(tiles, why)``: the tiles of one large image at the folder's own budget, the processor's ``max_tiles`` plus
    the thumbnail it adds to every image of more than one tile (``use_thumbnail``): what an image costs this
    checkpoint at most, so what its token compression is for. Read from the saved processor settings, else from
    config.json's ``max_dynamic_patch`` (an InternVL-style config), else the image processor's defaults."""
    import json

    path = Path(folder)
    settings, source = _processor_settings(path)
    if settings is None:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if isinstance(config.get("max_dynamic_patch"), int):
            settings = {"max_tiles": config["max_dynamic_patch"], "use_thumbnail": config.get("use_thumbnail", True)}
            source = "config.json max_dynamic_patch"
    if settings is None or not isinstance(settings.get("max_tiles"), int) or settings["max_tiles"] < 1:
        from ..processing.image_processing_internvlx import InternVLXImageProcessor

        settings = {"max_tiles": InternVLXImageProcessor.max_tiles,
                    "use_thumbnail": InternVLXImageProcessor.use_thumbnail}
        source = "no processor settings saved in the folder: the image processor's defaults"
    budget = settings["max_tiles"]
    thumbnail = bool(settings.get("use_thumbnail", True)) and budget > 1
    tiles = budget + (1 if thumbnail else 0)
    why = f"the folder's tile budget: max_tiles {budget}" + (" + the thumbnail" if thumbnail else "")
    return tiles, f"{why}, from {source}; --tiles N to change"


def _config_variant(config, **changes):
    data = config.to_dict()
    data.pop("image_seq_length", None)  # derived again from the new downsample ratio
    data.update(changes)
    return type(config).from_dict(data)


def build_variants(folder: str | Path, names=None, device: str = "cpu", dtype: str = "float32") -> dict:
    """``{name: model}`` for ``names`` (the folder's `default_variants` when None; `check_variants`), in eval mode
    on ``device`` in ``dtype``."""
    import torch

    from .. import InternVLXForConditionalGeneration
    from ..modeling.projectors import build_projector

    folder = check_folder(folder)
    names = check_variants(folder, default_variants(folder) if names is None else names)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}.")
    base = InternVLXForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    models = {}
    for name in names:
        if name == "this":
            models[name] = base
            continue
        if name == "router-off":
            config = _config_variant(base.config, vir={**base.config.vir.to_dict(), "enabled": False})
            projector = base.model.multi_modal_projector
        elif name == "plain-256":
            config = _config_variant(base.config, lvtc=None)
            projector = base.model.multi_modal_projector
        else:
            config = _config_variant(base.config, lvtc=None, downsample_ratio=1.0, projector_type="mlp")
            projector = getattr(base.model, "lvtc_hr_projector", None)
            if projector is None:
                torch.manual_seed(0)
                with torch.device(device):
                    projector = build_projector(config, "mlp", 1.0).to(getattr(torch, dtype))
        models[name] = assemble(config, base, projector).eval()
    return models


def assemble(config, base, projector, hr_projector=None, model_class=None):
    """A model of ``config`` (built on the meta device: no memory) whose vision tower, LLM and LM head are
    ``base``'s very modules, with ``projector`` (and, for LVTC, ``hr_projector``): variants of one set of weights
    that fit in memory together. ``model_class``: InternVL-X by default; transformers' native InternVL works too."""
    import torch

    if model_class is None:
        from .. import InternVLXForConditionalGeneration as model_class
    with torch.device("meta"):
        model = model_class(config)
    model.model.vision_tower = base.model.vision_tower
    model.model.language_model = base.model.language_model
    model.model.multi_modal_projector = projector
    if hr_projector is not None:
        model.model.lvtc_hr_projector = hr_projector
    if getattr(model.model, "vir", None) is not None:  # InternVL3.5-Flash: the same router, on or off
        model.model.vir = base.model.vir
    model.lm_head = base.lm_head
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"parameters left on the meta device: {meta[:5]}; give every module that differs")
    return model


def tokens_per_tile(model) -> int:
    """LLM tokens one tile costs in the last layer (the HR count for an LVTC model)."""
    config = model.config
    hr = getattr(config, "hr_tokens_per_tile", None)
    return hr if isinstance(hr, int) else config.image_seq_length


def sample(model, tiles: int, text_tokens: int, device: str, labels: str = "text", pixel_values=None) -> dict:
    """One prompt: 8 text tokens, ``tiles`` tiles of one image, the rest of the text; a label at every text position
    (-100 on the image). ``labels="all"``: a label at every position, the image's too, so that a training forward
    runs the LM head on every position (as transformers' native InternVL does whatever the labels;
    ``benchmarks/bench_models.py`` compares the two). ``model`` may be transformers' native InternVL too.

    The tiles are seeded Gaussian noise (normalized pixels), or ``pixel_values`` (``(tiles, 3, H, W)``: a real
    image's, `image_tiles`), which an InternVL3.5-Flash router decides on as on any image."""
    import torch

    if labels not in ("text", "all"):
        raise ValueError(f"labels={labels!r}: choose 'text' or 'all'.")
    if pixel_values is not None:
        tiles = int(pixel_values.shape[0])
    config = model.config
    vocab = config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab, (text_tokens,), generator=generator)
    text[text == config.image_token_id] = 3
    image = torch.full((config.image_seq_length * tiles,), config.image_token_id)
    ids = torch.cat([text[:8], image, text[8:]])[None]
    # Labels as a collator that labels the text writes them: none on the image (-100) and none naming an image
    # placeholder. Random labels there would make the model warn the user about a collator they never wrote (the
    # more tiles, the surer some label hits <IMG_CONTEXT>), and the loss would leave those positions out anyway.
    targets = torch.randint(3, vocab, ids.shape, generator=torch.Generator().manual_seed(2))
    placeholders = [getattr(config, name, None) for name in ("image_token_id", "image_start_token_id",
                                                             "image_end_token_id")]
    targets[torch.isin(targets, torch.tensor([i for i in placeholders if i is not None]))] = 3
    if labels == "text":
        targets[ids == config.image_token_id] = -100
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    dtype = next(model.parameters()).dtype
    if pixel_values is None:
        pixel_values = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids.to(device), pixel_values=pixel_values.to(device, dtype), labels=targets.to(device))


def image_tiles(folder: str | Path, image: str | Path):
    """``(pixel_values, why)``: the tiles the folder's own processor makes of ``image`` (its tiling, its max_tiles,
    the thumbnail), and how many and whence, for the run's notes."""
    from PIL import Image

    from ..processing import InternVLXImageProcessor

    folder = Path(folder)
    settings, _ = _processor_settings(folder)
    processor = InternVLXImageProcessor(**{k: v for k, v in (settings or {}).items()
                                           if k in ("image_size", "min_tiles", "max_tiles", "use_thumbnail",
                                                    "tiling", "image_mean", "image_std")})
    with Image.open(image) as opened:
        size = opened.size
        pixel_values = processor(images=[opened.convert("RGB")], return_tensors="pt")["pixel_values"]
    tiling = getattr(processor.tiling, "value", processor.tiling)
    return pixel_values, (f"{image} ({size[0]}x{size[1]}) through the folder's processor: {tiling} tiling, "
                          f"max_tiles {processor.max_tiles}")
