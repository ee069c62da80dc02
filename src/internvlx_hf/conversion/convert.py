"""`internvlx convert`: an OpenGVLab InternVL2 / InternVL-X folder -> a self-contained internvlx-hf checkpoint.

Order of work: read the source config and tensor headers; build the target config, tokenizer and a complete
conversion plan (names and shapes only, so every mapping problem surfaces before any data is read); then stream
the tensors source shard by source shard into output shards inside a temporary folder beside DST, add the config,
generation config, tokenizer, processor, remote code and the provenance record (`internvlx_provenance.json`, which
`internvlx card` reads), and rename the folder to DST as the very last step. Any error (or Ctrl-C) removes the
temporary folder, so DST is either complete or untouched. Source files are validated before the temporary folder
exists: JSON files must parse, safetensors headers must describe the files exactly (a truncated or corrupt shard is
found there), pickles need ``allow_pickle``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import remove_stale_temporaries, replace_folder, temporary_folder
from ..modeling.configuration_internvlx import InternVLXConfig, LVTCConfig
from ..provenance import record_conversion
from ..remote_code import save_remote_code
from ..vllm.lvtc.geometry import lvtc_geometry_of
from ..vllm_compat import cpu_head_size_problem
from .config import build_config, read_source_config
from .destination import check_destination
from .errors import ConversionError
from .llm import LLMSpec, internlm2_qkv_rows
from .new_modules import describe_init, group_new_parameters, initialise_new_parameters
from .options import check_projector, parse_dtype, parse_lvtc_spec, parse_size
from .plan import ConversionPlan, PlanInputs, build_plan, fused_parts_needed
from .report import IMAGE_CONTEXT_TOKEN, ConversionReport, hub_id_or_none, provenance_details
from .shards import OutputTensor, StreamingSafetensorsWriter
from .source import TOKENIZER_FILES, SourceCheckpoint, read_source
from .tokenizer import choose_pad_token, convert_tokenizer
from .vision import internvit_qkv_rows

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _is_internvlx_folder(src: Path) -> bool:
    from ..checkpoints import read_source_config

    try:
        return read_source_config(src).get("model_type") == "internvlx"
    except Exception:  # noqa: BLE001 - read_source reports an unreadable SRC with its reason
        return False


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished folder into place: a rename, so DST is never half-written."""
    if dst.is_dir():
        if not any(dst.iterdir()):
            dst.rmdir()
        elif overwrite:
            replace_folder(tmp, dst)
            return
        else:
            raise ConversionError(f"DST {dst} appeared while converting; pass --overwrite to replace it.")
    replace_folder(tmp, dst)  # flushed to the disk, then renamed


def _template_separator(tokenizer: Any, template: str) -> tuple[str, int]:
    """The end-of-turn token of the chat template (InternVL2 stops generation there, not at the tokenizer eos)."""
    from ..processing.chat_templates import turn_end_text

    separator = turn_end_text(tokenizer.apply_chat_template)
    ids = tokenizer.convert_tokens_to_ids([separator]) if separator else []
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ConversionError(f"the chat template {template!r} ends a turn with {separator!r}, which is not one token "
                              "of this tokenizer; the checkpoint's template does not fit its tokenizer.")
    return separator, int(ids[0])


def expected_parameters(config: InternVLXConfig) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
    """The target model on the meta device (no memory) and its parameter names/shapes (tied ones once)."""
    from ..modeling.modeling_internvlx import InternVLXForConditionalGeneration

    with torch.device("meta"):
        model = InternVLXForConditionalGeneration(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state = model.state_dict()
    expected.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in state})
    return model, expected


def _native_image_processor_kwargs(source: SourceCheckpoint, config: InternVLXConfig) -> dict[str, Any]:
    from .native import image_processor_kwargs

    image_size = config.vision_config.image_size
    return image_processor_kwargs(source.path, int(image_size[0] if isinstance(image_size, (list, tuple))
                                                   else image_size))


def _image_processor(source: SourceCheckpoint, config: InternVLXConfig):
    from ..processing import InternVLXImageProcessor

    if source.layout == "native":
        return InternVLXImageProcessor(**_native_image_processor_kwargs(source, config))
    c = source.config
    # InternVL-X's reference preprocessing is the RVTC "edge" tiling; InternVL2's is aspect-ratio matching.
    tiling = "edge" if source.projector_type == "pvtc" else "ratio"
    if not c.get("dynamic_image_size", True):
        tiling = "none"
    image_size = config.vision_config.image_size
    return InternVLXImageProcessor(
        image_size=int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
        min_tiles=int(c.get("min_dynamic_patch", 1)),
        max_tiles=int(c.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(c.get("use_thumbnail", True)),
        tiling=tiling,
    )


@dataclass
class _Job:
    """Everything decided before the first tensor is read."""

    source: SourceCheckpoint
    llm_architecture: str
    config: InternVLXConfig
    tokenizer: Any
    tokenizer_kind: str
    separator: str
    separator_id: int
    plan: ConversionPlan
    meta_model: torch.nn.Module
    expected: dict[str, tuple[int, ...]]
    outputs: list[OutputTensor]
    new_names: list[str]
    model_dtype: torch.dtype
    keep_dtypes: bool
    notes: list[str]

    def out_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        if self.keep_dtypes or not source_dtype.is_floating_point:
            return source_dtype
        return self.model_dtype

    def projector_types(self) -> dict[str, str]:
        """Owning module of every projector -> its type (for the initialisation of new ones)."""
        types = {"model.multi_modal_projector": self.config.projector_type}
        lvtc = self.config.lvtc
        if lvtc is not None:
            types["model.lvtc_hr_projector"] = lvtc.hr_projector_type
            types.update({f"model.lvtc_lr_projectors.{j}": lvtc.lr_projector_type
                          for j in range(lvtc.num_lr_projectors - 1)})
        return types


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    projector: str = "keep",
    lvtc: str | dict | LVTCConfig | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    add_router: bool = False,
) -> ConversionReport:
    """Convert an OpenGVLab InternVL2 / InternVL-X checkpoint folder into an internvlx-hf checkpoint.

    Args:
        src: local folder in the OpenGVLab layout (config.json with llm_config/vision_config, weights, tokenizer).
        dst: output folder; created atomically (it must not exist or be empty, unless ``overwrite``).
        projector: "keep" (the source's projector), "mlp" or "pvtc" (a new projector, initialised; see
            `conversion/new_modules.py`).
        lvtc: None (off), "default", a spec such as "k=18,T=2" (aliases k, T, s, i and the LVTCConfig field names,
            plus the flag ``init_lr_from_mlp1``), a dict or an `LVTCConfig`.
        dtype: "auto" (keep each tensor's dtype), "bfloat16", "float16" or "float32".
        max_shard_size: largest output shard, e.g. "5GB" (a bigger tensor gets a shard of its own).
        allow_pickle: read ``pytorch_model*.bin`` files (with ``torch.load(weights_only=True)``) when there are no
            safetensors.
        overwrite: replace a non-empty ``dst``.
        seed: seed of the initialisation of new modules.
        progress: show a progress bar over the source shards.
        add_router: give a checkpoint without InternVL3.5-Flash's router one (the 64-token projector, pooling and
            gate), untrained and off (``config.vir.enabled = False``) until `--preset vico` trains it.

    Returns:
        A `ConversionReport`; ``print(report)`` gives the summary. (None where ``add_router`` added a router to an
        internvlx-hf checkpoint: `add_router.add_router`.)

    Raises:
        ConversionError: (a `ValueError`) the source or the options cannot be converted; the message names the file,
            key or option and the fix. Nothing is written.
    """
    src, dst = Path(src), Path(dst)
    if add_router and _is_internvlx_folder(src):  # a checkpoint of this package: the router alone is added
        if projector != "keep" or lvtc is not None or dtype != "auto":
            raise ConversionError(f"{src} is an internvlx-hf checkpoint already: --add-router adds the router to it "
                                  "as it is; --projector, --lvtc and --dtype convert OpenGVLab or native folders.")
        from .add_router import add_router as add_to_checkpoint

        add_to_checkpoint(src, dst, seed=seed, overwrite=overwrite)
        return None
    projector = check_projector(projector)
    dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    lvtc_options, init_lr_from_mlp1 = parse_lvtc_spec(lvtc)
    check_destination(src, dst, overwrite)

    job = _prepare(read_source(src, allow_pickle), projector, lvtc_options, init_lr_from_mlp1, dtype, add_router)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dst)  # what a conversion to DST that was killed left
        tmp = temporary_folder(dst)  # the permissions of a plain mkdir, as DST's
    except OSError as error:
        raise ConversionError(f"cannot create DST {dst} ({error.strerror}); choose a writable folder.") from None
    writer = StreamingSafetensorsWriter(tmp, job.outputs, max_shard_bytes)
    try:
        _stream_tensors(job, writer, progress)
        for name, tensor in initialise_new_parameters(job.meta_model, job.new_names, job.projector_types(),
                                                       {name: job.model_dtype for name in job.new_names}, seed):
            writer.write(name, tensor)
        files = writer.close()
        image_processor = _write_companion_files(job, tmp)
        report = _report(job, src, dst, files, writer.total_bytes)
        # The record the model card is built from (`internvlx card`), written before DST appears.
        record_conversion(tmp, source=str(src),
                          base_model=hub_id_or_none(job.source.config.get("_name_or_path")),
                          details=provenance_details(report, image_processor))
        _publish(tmp, dst, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    logger.info("%s", report)
    return report


def _prepare(source: SourceCheckpoint, projector: str, lvtc_options: dict | None, init_lr_from_mlp1: bool,
             dtype: str, add_router: bool = False) -> _Job:
    """Configs, tokenizer and the full conversion plan: every problem surfaces here, before any data is read."""
    notes: list[str] = []
    if source.layout == "native":
        parts = _native_parts(source, notes)
    else:
        parts = _opengvlab_parts(source, notes)
    if add_router:
        if "vir" in parts.config_kwargs:
            raise ConversionError(f"{source.path} has InternVL3.5-Flash's router already; convert it without "
                                  "--add-router (train its router again with --preset vico-router).")
        # the published thresholds, for when it is trained; a quarter of the tile's tokens, as Flash's 64 of 256
        parts.config_kwargs["vir"] = {"enabled": False,
                                      "compressed_downsample_ratio": parts.config_kwargs["downsample_ratio"] / 2}
    llm, text_config, tokenizer, template = parts.llm, parts.text_config, parts.tokenizer, parts.template
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConversionError(f"the tokenizer of {source.path} has no {IMAGE_CONTEXT_TOKEN} token; it is not an "
                              "InternVL2 tokenizer")
    past_embeddings = _video_token_past_embeddings(source, tokenizer, text_config.vocab_size)
    if len(tokenizer) - past_embeddings > text_config.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the LLM embeds only "
                              f"{text_config.vocab_size}; tokenizer and weights do not belong together.")
    separator, separator_id = _template_separator(tokenizer, template)
    # `<img>` / `</img>` frame every image; the model's loss ignores them (and `<IMG_CONTEXT>`) as labels.
    frame_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
                 (("image_start_token_id", "<img>"), ("image_end_token_id", "</img>"))}
    image_token_ids = {"image_token_id": image_token_id,
                       **{name: i for name, i in frame_ids.items() if i is not None and i != tokenizer.unk_token_id}}

    _align_special_tokens(text_config, tokenizer)
    source_projector = source.projector_type
    projector_type = source_projector if projector == "keep" else projector
    config = build_config(parts.config_kwargs, text_config, projector_type, lvtc_options, image_token_ids)
    lvtc = config.lvtc
    num_extra_lr = lvtc.num_lr_projectors - 1 if lvtc is not None else 0
    if init_lr_from_mlp1:
        if lvtc is None or num_extra_lr == 0:
            raise ConversionError("init_lr_from_mlp1 initialises the extra LVTC LR projectors, but there are none: "
                                  "set T>=2 in --lvtc (e.g. --lvtc T=2,init_lr_from_mlp1).")
        if source_projector != "mlp" or lvtc.lr_projector_type != "mlp":
            raise ConversionError("init_lr_from_mlp1 needs an InternVL2 source (with mlp1) and mlp LR projectors "
                                  f"(the projector type is {projector_type!r}); drop the flag or use --projector mlp.")

    model_dtype = source.dominant_dtype() if dtype == "auto" else _DTYPES[dtype]
    config.dtype = model_dtype
    meta_model, expected = expected_parameters(config)
    text = config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    inputs = PlanInputs(
        llm_key_mapping=llm.key_mapping,
        vision_qkv_rows={part: internvit_qkv_rows(part, config.vision_config.hidden_size) for part in "qkv"},
        llm_qkv_rows=(
            {part: internlm2_qkv_rows(part, text.num_attention_heads, text.num_key_value_heads, head_dim)
             for part in "qkv"} if llm.packed_qkv else None
        ),
        source_projector=source_projector,
        target_projector=projector_type,
        num_extra_lr_projectors=num_extra_lr,
        init_lr_from_mlp1=init_lr_from_mlp1,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        source_layout=source.layout,
        vir=config.vir is not None,
        add_router=add_router,
    )
    plan = build_plan(source.infos, expected, inputs)

    job = _Job(source=source, llm_architecture=llm.architecture, config=config, tokenizer=tokenizer,
               tokenizer_kind=parts.tokenizer_kind, separator=separator, separator_id=separator_id, plan=plan,
               meta_model=meta_model, expected=expected, outputs=[], new_names=[], model_dtype=model_dtype,
               keep_dtypes=dtype == "auto", notes=notes)
    # The write order: source shards in order, each tensor's targets together; then the new parameters.
    source_dtypes = {key: info.dtype for infos in source.infos for key, info in infos.items()}
    parts_left = {}  # a fused target is written when its last part has been read
    for _, entries in plan.reads:
        for key, targets in entries:
            for t in targets:
                dtype = job.out_dtype(source_dtypes[key])
                if t.slot is None:
                    job.outputs.append(OutputTensor(t.name, t.shape(plan.source_shapes[key]), dtype))
                    continue
                left = parts_left.setdefault(t.name, fused_parts_needed(t.name, expected[t.name])) - 1
                parts_left[t.name] = left
                if left == 0:
                    job.outputs.append(OutputTensor(t.name, tuple(expected[t.name]), dtype))
    job.new_names = [name for name in expected if name in plan.new]
    job.outputs += [OutputTensor(name, plan.new[name], model_dtype) for name in job.new_names]
    return job


def _video_token_past_embeddings(source: SourceCheckpoint, tokenizer, vocab_size: int) -> int:
    """1 when a native tokenizer's last token is the `<video>` placeholder `internvlx export native` adds past the
    embeddings (InternVLProcessor needs the attribute; it replaces the placeholder before the model sees it)."""
    if source.layout != "native":
        return 0
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    return int(video_id is not None and video_id == len(tokenizer) - 1 and video_id >= vocab_size)


@dataclass
class _SourceParts:
    """The source-specific half of `_prepare`: LLM, tokenizer and the config values that do not depend on the
    options."""

    llm: LLMSpec
    text_config: Any
    tokenizer: Any
    tokenizer_kind: str
    template: str | None
    config_kwargs: dict[str, Any]


def _opengvlab_parts(source: SourceCheckpoint, notes: list[str]) -> _SourceParts:
    parts = read_source_config(source, notes)
    try:
        converted_tokenizer = convert_tokenizer(source.path, parts.chat_template)
    except ConversionError:
        raise
    except Exception as error:  # tokenizers / sentencepiece reject a corrupt file with plain exceptions
        files = ", ".join(name for name in TOKENIZER_FILES if (source.path / name).exists()) or "none found"
        raise ConversionError(
            f"cannot load the tokenizer of {source.path} (files: {files}): {type(error).__name__}: {error}. The "
            "tokenizer files are corrupt or do not belong together; copy them again from the original checkpoint."
        ) from error
    return _SourceParts(llm=parts.llm, text_config=parts.text_config, tokenizer=converted_tokenizer.tokenizer,
                        tokenizer_kind=converted_tokenizer.kind, template=parts.template,
                        config_kwargs=parts.config_kwargs)


def _native_parts(source: SourceCheckpoint, notes: list[str]) -> _SourceParts:
    from ..processing.chat_templates import CHAT_TEMPLATES, for_tokenizer
    from .native import read_native

    native = read_native(source, CHAT_TEMPLATES)
    notes += native.notes
    native.tokenizer.chat_template = for_tokenizer(native.chat_template, native.tokenizer)[0]
    if native.tokenizer.pad_token is None:
        native.tokenizer.pad_token = choose_pad_token(native.tokenizer, native.chat_template)
    return _SourceParts(llm=LLMSpec(native.architecture, [], packed_qkv=False), text_config=native.text_config,
                        tokenizer=native.tokenizer, tokenizer_kind=native.tokenizer_kind, template=native.template,
                        config_kwargs=native.config_kwargs)


def _write_companion_files(job: _Job, directory: Path):
    """config.json, remote code, generation config, tokenizer, chat template and processor configs; returns the
    image processor that was saved."""
    job.config.save_pretrained(directory)
    save_remote_code(directory)  # the model's and the processor's files, as their save_pretrained would write them
    _generation_config(job.config.get_text_config(), job.tokenizer, job.separator_id).save_pretrained(directory)
    return _save_processor(job.source, job.config, job.tokenizer, directory)


def _report(job: _Job, src: Path, dst: Path, files: list[str], total_bytes: int) -> ConversionReport:
    config, plan = job.config, job.plan
    source_projector = job.source.projector_type
    return ConversionReport(
        src=src,
        dst=dst,
        llm=job.llm_architecture,
        text_model_type=config.get_text_config().model_type,
        num_parameters=sum(torch.Size(shape).numel() for shape in job.expected.values()),
        dtype=str(job.model_dtype).replace("torch.", "") + (" (source dtypes kept)" if job.keep_dtypes else ""),
        projector_type=config.projector_type,
        projector_source="converted from the source" if config.projector_type == source_projector
        else f"new, replaces the source's {source_projector}",
        lvtc=config.lvtc.to_dict() if config.lvtc is not None else None,
        tokens_per_tile=config.image_seq_length,
        hr_tokens_per_tile=config.hr_tokens_per_tile,
        tokenizer=job.tokenizer_kind,
        template=str(config.template),
        eos_token=job.separator,
        eos_token_id=job.separator_id,
        image_token_id=config.image_token_id,
        files=files,
        total_bytes=total_bytes,
        dropped=dict(plan.dropped),
        new={module: (sum(torch.Size(plan.new[n]).numel() for n in names), describe_init(module))
             for module, names in group_new_parameters(job.new_names).items()},
        copied=dict(plan.copies),
        notes=job.notes,
        vir=({**config.vir.to_dict(), "compressed_tokens": config.compressed_tokens_per_tile}
             if config.vir is not None else None),
        vllm_cpu=cpu_head_size_problem(config.get_text_config(), lvtc_geometry_of(config) is not None,
                                       where=str(dst)),
    )


def _stream_tensors(job: _Job, writer: StreamingSafetensorsWriter, progress: bool) -> None:
    """Read each source shard once, one tensor at a time, and write its targets in plan order."""
    from tqdm.auto import tqdm

    fused: dict[str, list] = {}  # fused target -> [its tensor, parts still to read]
    with tqdm(total=len(job.plan.reads), unit="shard", desc="Converting", disable=not progress) as bar:
        for shard_index, entries in job.plan.reads:
            targets_of = dict(entries)
            shard = job.source.shards[shard_index]
            bar.set_postfix_str(shard.path.name)
            for key, tensor in shard.iter_tensors(list(targets_of)):
                for target in targets_of[key]:
                    if target.slot is not None:
                        _fill_fused(job, writer, fused, target, tensor)
                    else:
                        writer.write(target.name, target.make(tensor).to(job.out_dtype(tensor.dtype)))
                del tensor
            bar.update(1)


def _fill_fused(job: _Job, writer: StreamingSafetensorsWriter, fused: dict[str, list], target, tensor) -> None:
    """Put one expert's projection into its fused tensor (Qwen3-MoE); write that tensor once it is whole (a layer's
    experts are held together, as transformers' own loading conversion holds them)."""
    name = target.name
    if name not in fused:
        shape = tuple(job.expected[name])
        fused[name] = [torch.empty(shape, dtype=job.out_dtype(tensor.dtype)), fused_parts_needed(name, shape)]
    entry = fused[name]
    target.slot.place(entry[0], tensor)
    entry[1] -= 1
    if entry[1] == 0:
        writer.write(name, fused.pop(name)[0])


def _align_special_tokens(text_config, tokenizer) -> None:
    """The LLM config's pad / bos / eos ids become the tokenizer's where it defines one. transformers' Trainer
    aligns them so before every run (warning of "new PAD/BOS/EOS tokens", e.g. when a Qwen2 config has no pad id),
    and the generation config takes them from the tokenizer already."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name)
        current = getattr(text_config, name, None)
        if token_id is None or token_id == current or (isinstance(current, list) and token_id in current):
            continue
        setattr(text_config, name, [token_id, *current] if isinstance(current, list) else token_id)


def _generation_config(text_config, tokenizer, eos_token_id: int):
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text_config.pad_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.bos_token_id
    # InternVL2's chat() stops at the template separator (e.g. <|im_end|>), not at the tokenizer's eos; the eos
    # stops generation too, as transformers' Trainer would add it (with a warning) on the first training run.
    eos = [eos_token_id] + [tokenizer.eos_token_id] * (tokenizer.eos_token_id not in (None, eos_token_id))
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos if len(eos) > 1 else eos_token_id, pad_token_id=pad)


def _save_processor(source: SourceCheckpoint, config: InternVLXConfig, tokenizer, directory: Path):
    """Tokenizer, chat template, image processor and processor configs, with their remote code."""
    from ..processing import InternVLXProcessor

    image_processor = _image_processor(source, config)
    processor = InternVLXProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=config.image_seq_length,
    )
    processor.save_pretrained(str(directory))
    return image_processor
