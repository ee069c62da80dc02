"""transformers-native InternVL (`InternVLForConditionalGeneration`, `InternVLProcessor`) <-> internvlx-hf settings.

The two models are the same network: transformers' InternViT (`InternVLVisionModel`), InternVL2's pixel shuffle
("v2") and LayerNorm/Linear/GELU/Linear projector, and an `AutoModel` LLM, under the same parameter names. What
differs is configuration and processing:

* config: native ``vision_feature_layer`` is our ``select_layer``; native ``vision_feature_select_strategy`` must be
  "default" (the CLS token is dropped before the pixel shuffle, as InternVL2 does) and ``projector_hidden_act``
  "gelu" (our projector is `nn.GELU`); the top-level ``tie_word_embeddings`` decides the tying in both.
* image placeholder: the native processor expands each ``<IMG_CONTEXT>`` of the text (the tokenizer's
  ``context_image_token``) and its chat template writes ``<IMG_CONTEXT>\\n`` for an image; ours expands ``<image>``.
  Chat templates are translated by replacing that one string.
* image processing: native `GotOcr2ImageProcessor` tiles by aspect-ratio matching over ``min_patches..max_patches``
  and always appends a thumbnail (InternVL2's "ratio" tiling with ``use_thumbnail=True``); the processor turns
  ``crop_to_patches`` on, so ``max_patches == 1`` is the only way to get one tile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .source import SourceCheckpoint, read_json_file

NATIVE_IMAGE_TOKEN = "<IMG_CONTEXT>"  # native placeholder (tokenizer.context_image_token) = our context token
OUR_IMAGE_PLACEHOLDER = "<image>"
# The attributes InternVLProcessor reads from its tokenizer (transformers' `extra_special_tokens`).
NATIVE_TOKENIZER_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": NATIVE_IMAGE_TOKEN, "video_token": "<video>"}


# transformers' save_pretrained writes InternVL weights under their pre-5.0 names (the "llava" entry of its
# conversion mapping, reversed), and from_pretrained maps them back; export writes that layout too, so that a native
# checkpoint exported back is the file transformers itself would have written.
_SAVED_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def native_saved_name(name: str) -> str:
    """The name under which transformers saves the `InternVLForConditionalGeneration` parameter ``name``."""
    for ours, saved in _SAVED_NAMES:
        if name.startswith(ours):
            return saved + name[len(ours):]
    return name


@dataclass
class NativeSource:
    """What `internvlx convert` takes from a native folder, before building the internvlx-hf config."""

    text_config: Any
    config_kwargs: dict[str, Any]  # InternVLXConfig values: vision_config, downsample_ratio, select_layer, ...
    tokenizer: Any
    tokenizer_kind: str
    chat_template: str
    template: str
    image_processor_kwargs: dict[str, Any]
    architecture: str
    notes: list[str] = field(default_factory=list)


def _native_config(source: SourceCheckpoint):
    from transformers import InternVLConfig

    try:
        return InternVLConfig.from_pretrained(str(source.path))
    except (ValueError, TypeError, KeyError) as error:
        raise ConversionError(f"{source.path}/config.json does not make a valid InternVLConfig: {error}") from None


def _check_native_config(config, where: Path) -> None:
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConversionError(f"{where}: vision_feature_layer={layer!r} selects several ViT layers; internvlx-hf "
                              "feeds one layer to the projector (select_layer), so set one integer.")
    if config.vision_feature_select_strategy != "default":
        raise ConversionError(f"{where}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} "
                              "keeps the CLS token; internvlx-hf drops it as InternVL2 does ('default') only.")
    if config.projector_hidden_act != "gelu":
        raise ConversionError(f"{where}: projector_hidden_act={config.projector_hidden_act!r}; the internvlx-hf MLP "
                              "projector uses the exact GELU ('gelu') of InternVL2 only.")


def read_chat_template(path: Path, tokenizer) -> str | None:
    """The processor's chat template (chat_template.jinja, else chat_template.json), else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        template = read_json_file(path / "chat_template.json", "chat template").get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def to_our_template(native_template: str) -> str:
    return native_template.replace(NATIVE_IMAGE_TOKEN, OUR_IMAGE_PLACEHOLDER)


def to_native_template(our_template: str) -> str:
    return our_template.replace(OUR_IMAGE_PLACEHOLDER, NATIVE_IMAGE_TOKEN)


def _image_processor_dict(path: Path) -> dict[str, Any]:
    """The image processor settings: processor_config.json's nested ``image_processor`` (transformers 5), else
    preprocessor_config.json."""
    if (path / "processor_config.json").is_file():
        nested = read_json_file(path / "processor_config.json", "processor config").get("image_processor")
        if isinstance(nested, dict):
            return nested
    if (path / "preprocessor_config.json").is_file():
        return read_json_file(path / "preprocessor_config.json", "image processor config")
    raise ConversionError(f"{path} has no image processor settings (processor_config.json with image_processor, or "
                          "preprocessor_config.json); copy them from the original checkpoint.")


def image_processor_kwargs(path: Path, vision_image_size: int) -> dict[str, Any]:
    """`InternVLXImageProcessor` settings equivalent to the native `GotOcr2ImageProcessor` of ``path``."""
    settings = _image_processor_dict(path)
    kind = str(settings.get("image_processor_type", "GotOcr2ImageProcessor"))
    where = path / "preprocessor_config.json"
    if not kind.startswith("GotOcr2ImageProcessor"):
        raise ConversionError(f"{where}: image_processor_type {kind!r} is not InternVL's GotOcr2ImageProcessor; "
                              "only its tiling can be mapped onto InternVLXImageProcessor.")
    size = settings.get("size") or {"height": 384, "width": 384}
    height, width = size.get("height"), size.get("width")
    if height != width or height != vision_image_size:
        raise ConversionError(f"{where}: size {size} is not the vision tower's square tile "
                              f"{vision_image_size}x{vision_image_size}; InternVLXImageProcessor cuts square tiles "
                              "of the ViT's image_size.")
    for flag in ("do_resize", "do_convert_rgb"):
        if settings.get(flag, True) is False:
            raise ConversionError(f"{where}: {flag}=false is not supported (tiles are always resized and RGB).")
    min_patches, max_patches = int(settings.get("min_patches", 1)), int(settings.get("max_patches", 12))
    # InternVLProcessor calls the image processor with crop_to_patches=True, so tiling depends on max_patches only.
    kwargs = {
        "image_size": int(height),
        "min_tiles": min_patches,
        "max_tiles": max_patches,
        "use_thumbnail": True,
        "tiling": "ratio" if max_patches > 1 else "none",
    }
    for key in ("image_mean", "image_std", "resample", "rescale_factor", "do_rescale", "do_normalize"):
        if key in settings:
            kwargs[key] = settings[key]
    return kwargs


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as error:  # tokenizers / transformers reject corrupt or foreign files with plain exceptions
        raise ConversionError(f"cannot load the tokenizer of {path} without remote code: {type(error).__name__}: "
                              f"{error}. Copy the tokenizer files again from the original checkpoint.") from error
    return tokenizer


def _without_tokens_past(path: Path, tokenizer, vocab_size: int, notes: list[str]):
    """``tokenizer`` without the added tokens that have no embedding row (ids >= ``vocab_size``).

    InternVLProcessor needs a `<video>` token, so a native folder whose embeddings have no row for it (one exported
    by `internvlx export native`, whose summary says so) carries it past the embedding matrix: text containing
    "<video>" then becomes an id the model cannot embed. Our processor has no video slot, so the token is left out
    and such text is read as ordinary characters again, as the checkpoint read it before export.
    """
    import tempfile

    past = {index: token for token, index in tokenizer.get_added_vocab().items() if index >= vocab_size}
    if not past or not (path / "tokenizer.json").is_file():
        return tokenizer
    names = {token for token in past.values()}
    with tempfile.TemporaryDirectory(prefix="internvlx-tokenizer-") as tmp:
        for file in path.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")) and file.is_file():
                (Path(tmp) / file.name).write_bytes(file.read_bytes())
        data = read_json_file(path / "tokenizer.json", "tokenizer")
        data["added_tokens"] = [entry for entry in data.get("added_tokens", []) if entry.get("id", 0) < vocab_size]
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        settings_file = Path(tmp) / "tokenizer_config.json"
        if settings_file.is_file():
            settings = read_json_file(settings_file, "tokenizer config")
            decoder = settings.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                settings["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
            for key in ("extra_special_tokens", "model_specific_special_tokens", "additional_special_tokens"):
                value = settings.get(key)
                if isinstance(value, dict):
                    settings[key] = {k: v for k, v in value.items() if v not in names}
                elif isinstance(value, list):
                    settings[key] = [v for v in value if v not in names]
            for key in [k for k, v in settings.items() if isinstance(v, str) and v in names]:
                del settings[key]
            settings_file.write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "added_tokens.json").unlink(missing_ok=True)
        tokenizer = _load_tokenizer(Path(tmp))
    shown = ", ".join(f"{token} ({index})" for index, token in sorted(past.items()))
    notes.append(f"tokenizer: left out {shown}, past the {vocab_size} embeddings (the model cannot read it); text "
                 "containing it is read as ordinary characters")
    return tokenizer


def read_native(source: SourceCheckpoint, template_names: dict[str, str]) -> NativeSource:
    """Config, tokenizer, chat template and processor settings of a native folder. ``template_names``: our chat
    templates by name (a translated native template equal to one of them keeps its name)."""
    config = _native_config(source)
    _check_native_config(config, source.path / "config.json")
    notes: list[str] = []
    tokenizer = _without_tokens_past(source.path, _load_tokenizer(source.path), int(config.text_config.vocab_size),
                                     notes)
    image_token_id = tokenizer.convert_tokens_to_ids(NATIVE_IMAGE_TOKEN)
    if image_token_id != config.image_token_id:
        raise ConversionError(
            f"{source.path}: config.image_token_id={config.image_token_id} but the tokenizer gives "
            f"{NATIVE_IMAGE_TOKEN} the id {image_token_id}; internvlx-hf uses {NATIVE_IMAGE_TOKEN} as the image "
            "context token, so tokenizer and config must agree."
        )
    native_template = read_chat_template(source.path, tokenizer)
    if native_template is None:
        raise ConversionError(f"{source.path} has no chat template (chat_template.jinja, chat_template.json or the "
                              "tokenizer's); copy it from the original checkpoint.")
    chat_template = to_our_template(native_template)
    # The first of our templates with this text, unless the folder names another one with the same text (written by
    # `internvlx export native`: Hermes-2 and internlm2-chat are the same ChatML).
    # (a template exported for a sentencepiece tokenizer starts with its BOS text: `chat_templates.parse_chat_template`)
    from ..processing.chat_templates import parse_chat_template

    named = getattr(config, "template", None)
    parsed = parse_chat_template(chat_template)
    ours = template_names[parsed[0]] if parsed else None
    template = named if ours is not None and template_names.get(named) == ours else \
        next((name for name, text in template_names.items() if text == ours), "native")
    vision = config.vision_config
    image_size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    return NativeSource(
        text_config=config.text_config,
        config_kwargs={
            "vision_config": vision,
            "downsample_ratio": float(config.downsample_ratio),
            "select_layer": int(config.vision_feature_layer),
            "image_seq_length": int(config.image_seq_length),
            "template": template,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
        },
        tokenizer=tokenizer,
        tokenizer_kind=f"{type(tokenizer).__name__} (native tokenizer, unchanged)",
        chat_template=chat_template,
        template=template,
        image_processor_kwargs=image_processor_kwargs(source.path, int(image_size)),
        architecture=f"InternVLForConditionalGeneration ({config.text_config.model_type} LLM)",
        notes=notes,
    )
