"""`internvlx export native`: a plain internvlx-hf checkpoint -> a transformers-native InternVL folder.

A checkpoint with the MLP projector and no LVTC is InternVL2's network, which transformers ships as
`InternVLForConditionalGeneration`; the parameter names are the same, so the tensors are streamed over unchanged
(same dtypes and bytes, under the names transformers' own save_pretrained writes) and only the configs and the
processor files are rewritten. The output loads with `AutoModelForImageTextToText.from_pretrained(DST)` without
remote code. PVTC and LVTC have no native counterpart and are refused. RVTC's area / edge caps cannot be written
into `GotOcr2ImageProcessor` (aspect-ratio tiling over ``min_patches..max_patches``, thumbnail always on): what maps
is written, the rest is reported in the summary. Like `internvlx convert`, DST appears whole (a staged folder
renamed at the end) or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import staged_folder
from ..checkpoints import CONFIG_NAME, read_checkpoint_config
from ..processing.chat_templates import for_tokenizer, starts_with_bos
from .errors import ConversionError
from .native import NATIVE_TOKENIZER_TOKENS, native_saved_name, read_chat_template, to_native_template
from .options import parse_size
from .shards import OutputTensor, StreamingSafetensorsWriter, find_weight_files
from .source import read_json_file
from .tokenizer import _LOADING_KEYS

EXPORT_TARGETS = ("native",)


@dataclass
class ExportReport:
    """What `export_native` did; ``str(report)`` is the summary the CLI prints."""

    src: Path
    dst: Path
    text_model_type: str
    num_tensors: int
    total_bytes: int
    files: list[str]
    image_processor: dict[str, Any]
    dropped: dict[str, str] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ip = self.image_processor
        lines = [
            f"Exported {self.src} -> {self.dst} (transformers-native InternVL)",
            f"  model           InternVLForConditionalGeneration ({self.text_model_type} LLM), {self.num_tensors} "
            f"tensors copied unchanged, {len(self.files)} file(s), {self.total_bytes / 1e9:.3f} GB",
            f"  processor       InternVLProcessor + GotOcr2ImageProcessor (size {ip['size']['height']}, patches "
            f"{ip['min_patches']}..{ip['max_patches']}, crop_to_patches={ip['crop_to_patches']})",
        ]
        lines += [
            "  needs           AutoProcessor / InternVLProcessor need torchvision (transformers checks the video "
            "processor slot); without it, AutoModelForImageTextToText, AutoTokenizer and AutoImageProcessor "
            "(GotOcr2ImageProcessorPil) load, and <IMG_CONTEXT> is expanded by hand (docs/export.md, \"Without "
            "torchvision\")",
        ]
        lines += [f"  dropped         {key}: {reason}" for key, reason in self.dropped.items()]
        lines += [f"  not carried     {item}" for item in self.lost] or ["  not carried     nothing"]
        return "\n".join(lines)


def _read_config(src: Path):
    from ..modeling.configuration_internvlx import InternVLXConfig

    read_checkpoint_config(src, f"SRC {src}", error=ConversionError)
    try:
        return InternVLXConfig.from_pretrained(str(src))
    except (ValueError, TypeError, KeyError) as error:
        raise ConversionError(f"{src / CONFIG_NAME} is not a valid InternVLXConfig: {error}") from None


def _check_exportable(config, src: Path) -> None:
    if config.projector_type != "mlp":
        raise ConversionError(f"{src} uses the {config.projector_type.upper()} projector; native InternVL has only "
                              "InternVL2's MLP projector, so this checkpoint cannot be exported.")
    if config.lvtc is not None:
        raise ConversionError(f"{src} uses LVTC (layer-wise visual token compression); native InternVL has no LVTC, "
                              "so this checkpoint cannot be exported.")


def native_config(config):
    """The `InternVLConfig` of an internvlx-hf MLP checkpoint without LVTC."""
    from transformers import InternVLConfig

    native = InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )
    native.architectures = ["InternVLForConditionalGeneration"]
    native.dtype = config.dtype
    # InternVL's template name (OpenGVLab's config key). Several names share one chat template text (Hermes-2 and
    # internlm2-chat are both ChatML), so `internvlx convert` reads the name back from here.
    native.template = config.template
    return native


def _expected_names(native) -> set[str]:
    """Parameter and persistent-buffer names of the native model, tied ones once (as save_pretrained writes)."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native)
    names = set(model.state_dict())
    if native.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def _plan_tensors(src: Path, native) -> tuple[list, list[OutputTensor], dict[str, str]]:
    shards = find_weight_files(src, allow_pickle=False)
    infos = [shard.tensor_infos() for shard in shards]
    expected = _expected_names(native)
    dropped: dict[str, str] = {}
    outputs: list[OutputTensor] = []
    for shard_infos in infos:
        for key, info in shard_infos.items():
            if key == "lm_head.weight" and native.tie_word_embeddings:
                dropped[key] = "tie_word_embeddings=True: the LM head is the input embedding matrix"
                continue
            outputs.append(OutputTensor(key, tuple(info.shape), info.dtype))
    names = {o.name for o in outputs}
    outputs = [OutputTensor(native_saved_name(o.name), o.shape, o.dtype) for o in outputs]
    unknown, missing = sorted(names - expected), sorted(expected - names)
    if unknown or missing:
        raise ConversionError(
            f"the weights of {src} do not fit InternVLForConditionalGeneration: "
            + (f"not in the native model: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}; "
               if unknown else "")
            + (f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + "export reads checkpoints saved by internvlx-hf (config.json and weights must belong together)."
        )
    return list(zip(shards, infos)), outputs, dropped


# The class of converted sentencepiece LlamaTokenizer checkpoints (Phi-3, Yi): remote code on top of a tokenizer.json.
_LLAMA_TOKENIZER = "InternVLXLlamaTokenizerFast"


def _tokenizer(src: Path, lost: list[str], vocab_size: int) -> tuple[Any, bool]:
    """The tokenizer the native folder gets, and whether it was a converted Llama tokenizer (`_check_native_ids`)."""
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    settings = read_json_file(src / "tokenizer_config.json", "tokenizer config") \
        if (src / "tokenizer_config.json").is_file() else {}
    name = settings.get("tokenizer_class")
    # InternVLXLlamaTokenizerFast is remote code; natively its tokenizer.json is read as it is, by transformers'
    # TokenizersBackend (as transformers' own InternVL conversion ships sentencepiece LLMs: a fast tokenizer).
    # Whether that gives the same ids on this checkpoint's prompts is checked by `_check_native_ids`.
    tokenizer_class = TokenizersBackend if name == _LLAMA_TOKENIZER else (
        tokenizer_class_from_name(name) if name else None)
    if tokenizer_class is None or not tokenizer_class.__module__.startswith("transformers."):
        raise ConversionError(
            f"{src}/tokenizer_config.json names the tokenizer class {name!r}, which transformers does not ship; a "
            "native checkpoint must load without remote code, so this tokenizer cannot be exported."
        )
    # The named tokens InternVLProcessor reads go in besides the additional special tokens, which stay as they are.
    additional = settings.get("extra_special_tokens", settings.get("additional_special_tokens"))
    kwargs = {"additional_special_tokens": list(additional)} if isinstance(additional, list) else {}
    tokenizer = tokenizer_class.from_pretrained(str(src), extra_special_tokens=dict(NATIVE_TOKENIZER_TOKENS), **kwargs)
    for key in ("auto_map", "processor_class", "legacy", "sentencepiece", *_LOADING_KEYS):
        tokenizer.init_kwargs.pop(key, None)
    if name == _LLAMA_TOKENIZER:
        lost.append(f"{_LLAMA_TOKENIZER}'s decode() (the slow LlamaTokenizer's spaces around added tokens, broken "
                    "UTF-8 byte by byte): the native tokenizer decodes with its tokenizer.json's decoder")
        if settings.get("legacy") is False:
            lost.append("the slow LlamaTokenizer's legacy=False text start: a text that starts with whitespace or "
                        "with an added token outside the special tokens gets no '▁' in front natively (the chat "
                        "template's prompts were checked: the same ids)")
    video_id = tokenizer.convert_tokens_to_ids(NATIVE_TOKENIZER_TOKENS["video_token"])
    if video_id is not None and video_id >= vocab_size:
        lost.append(f"{NATIVE_TOKENIZER_TOKENS['video_token']} (InternVLProcessor's video placeholder) was added as "
                    f"token {video_id}, past the {vocab_size} embeddings: the processor replaces it for videos, but "
                    "the literal text <video> cannot be fed to the model")
    return tokenizer, name == _LLAMA_TOKENIZER


# Conversations whose prompts (rendered by the checkpoint's chat template) the native tokenizer must read as ours.
_PROBE_CONVERSATIONS = (
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}], True),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now, 2 more?"}], True),
    ([{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": " A cat."}], False),
)


def _check_native_ids(src: Path, native, template: str) -> None:
    """Refuse a converted Llama tokenizer whose tokenizer.json, read natively, gives other ids on the chat template's
    prompts than `InternVLXLlamaTokenizerFast` (the slow LlamaTokenizer's ids, which the model was trained on).

    With ``legacy=True`` the tokenizer.json alone gives the slow tokenizer's ids on every text. ``legacy=False``
    puts one "▁" in front of a text unless it starts with a token of ``all_special_tokens``: no tokenizers
    pipeline can express that, so a prompt that starts with another added token (phi3-chat's ``<|system|>``) loses
    its first token natively.
    """
    from ..processing.tokenization_internvlx import InternVLXLlamaTokenizerFast

    ours = InternVLXLlamaTokenizerFast.from_pretrained(str(src))
    for messages, generation in _PROBE_CONVERSATIONS:
        text = ours.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=generation)
        text = text.replace("<image>", "<img><IMG_CONTEXT></img>")  # as the processors expand an image
        # (a template that writes the BOS is tokenized without adding another, as `apply_chat_template` does)
        special = not starts_with_bos(ours, [text])
        expected = ours(text, add_special_tokens=special)["input_ids"]
        got = native(text, add_special_tokens=special)["input_ids"]
        if expected == got:
            continue
        if ours.legacy:  # not expected: legacy=True pipelines are the tokenizer.json's alone
            raise ConversionError(
                f"{src}: read natively, its tokenizer.json gives other ids than {_LLAMA_TOKENIZER} on the chat "
                f"template's prompt {text[:40]!r}... ({expected[:6]}... natively {got[:6]}...), so this tokenizer "
                "cannot be exported."
            )
        start = next((token for token in sorted(ours.added_tokens_encoder, key=len, reverse=True)
                      if text.startswith(token)), text[:12])
        raise ConversionError(
            f"{src}: its tokenizer ({_LLAMA_TOKENIZER}, legacy={ours.legacy}) encodes as the slow LlamaTokenizer, "
            f"which puts a '▁' in front of a text that starts with an added token outside the special tokens; no "
            f"tokenizer transformers ships does that, and this checkpoint's chat template starts its prompts with "
            f"{start!r}, so the native checkpoint would read them differently (ids {expected[:4]}... natively "
            f"{got[:4]}...). Llama tokenizers with legacy=True, or whose prompts start with a special token, export."
        )


def _image_processor(src: Path, lost: list[str]):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..processing import InternVLXImageProcessor

    ours = InternVLXImageProcessor.from_pretrained(str(src))
    tiling = str(getattr(ours.tiling, "value", ours.tiling))
    if tiling in ("area", "edge"):
        lost.append(f"RVTC tiling={tiling!r}: the {tiling} cap on the tile count (paper Sec. 3.3) has no native "
                    "setting; the native processor matches aspect ratios over all grids of "
                    f"{ours.min_tiles}..{ours.max_tiles} tiles ('ratio' tiling)")
    if not ours.use_thumbnail and tiling != "none":
        lost.append("use_thumbnail=False: GotOcr2ImageProcessor always appends the thumbnail tile")
    if ours.apply_exif_orientation:
        lost.append("apply_exif_orientation=True: transformers' image loading applies EXIF orientation to files it "
                    "opens, not to PIL images or arrays")
    single = tiling == "none"
    return GotOcr2ImageProcessorPil(
        size={"height": ours.image_size, "width": ours.image_size},
        crop_to_patches=not single,
        min_patches=1 if single else ours.min_tiles,
        max_patches=1 if single else ours.max_tiles,  # InternVLProcessor tiles whenever max_patches > 1
        resample=ours.resample,
        do_resize=True,
        do_rescale=ours.do_rescale,
        rescale_factor=ours.rescale_factor,
        do_normalize=ours.do_normalize,
        image_mean=list(ours.image_mean),
        image_std=list(ours.image_std),
        do_convert_rgb=True,
    )


def export_native(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                  max_shard_size: str | int = "5GB", progress: bool = True) -> ExportReport:
    """Write the internvlx-hf checkpoint ``src`` (MLP projector, no LVTC) as a transformers-native InternVL folder.

    Raises:
        ConversionError: ``src`` cannot be exported (PVTC, LVTC, a tokenizer transformers does not ship or, for a
            converted Llama tokenizer, one whose tokenizer.json reads the chat template's prompts differently, weights
            that do not fit) or ``dst`` is not a valid destination. Nothing is written.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from .destination import check_destination

    src, dst = Path(src), Path(dst)
    max_shard_bytes = parse_size(max_shard_size)
    check_destination(src, dst, overwrite)
    config = _read_config(src)
    _check_exportable(config, src)
    native = native_config(config)
    reads, outputs, dropped = _plan_tensors(src, native)
    lost: list[str] = []
    tokenizer, llama = _tokenizer(src, lost, config.get_text_config().vocab_size)
    template = read_chat_template(src, tokenizer)
    if template is None:
        raise ConversionError(f"{src} has no chat template (chat_template.jinja or the tokenizer's); save the "
                              "processor with one (see internvlx_hf.processing.CHAT_TEMPLATES).")
    # a template written before templates carried their tokenizer's BOS text gets it (as our processor does at load),
    # computed with the tokenizer the model was trained with (for Llama tokenizers, the slow tokenizer's rules)
    if llama:
        from ..processing.tokenization_internvlx import InternVLXLlamaTokenizerFast

        template = for_tokenizer(template, InternVLXLlamaTokenizerFast.from_pretrained(str(src)))[0]
        _check_native_ids(src, tokenizer, template)
    else:
        template = for_tokenizer(template, tokenizer)[0]
    tokenizer.chat_template = to_native_template(template)
    image_processor = _image_processor(src, lost)

    with staged_folder(dst) as tmp:
        writer = StreamingSafetensorsWriter(tmp, outputs, max_shard_bytes)
        try:
            with tqdm(total=len(reads), unit="shard", desc="Exporting", disable=not progress) as bar:
                for shard, infos in reads:
                    wanted = [key for key in infos if key not in dropped]
                    for key, tensor in shard.iter_tensors(wanted):
                        writer.write(native_saved_name(key), tensor)
                    bar.update(1)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        native.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(src)).save_pretrained(tmp)
        tokenizer._set_processor_class("InternVLProcessor")
        tokenizer.save_pretrained(str(tmp))
        image_processor.save_pretrained(str(tmp))
        # InternVLProcessor.save_pretrained's processor_config.json, written directly: the processor cannot be built
        # without its video processor, which needs torchvision (AutoVideoProcessor finds InternVLVideoProcessor from
        # config.json's model_type when the file names none).
        processor_config = {"image_processor": image_processor.to_dict(), "image_seq_length": config.image_seq_length,
                            "processor_class": "InternVLProcessor"}
        with open(tmp / "processor_config.json", "w", encoding="utf-8") as handle:
            json.dump(processor_config, handle, indent=2, sort_keys=True)
            handle.write("\n")
    return ExportReport(src=src, dst=dst, text_model_type=config.get_text_config().model_type,
                        num_tensors=len(outputs), total_bytes=writer.total_bytes, files=files,
                        image_processor=image_processor.to_dict(), dropped=dropped, lost=lost)
