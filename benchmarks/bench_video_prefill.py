"""What a video's prefill costs at InternVL2-2B dimensions, measured: plain 256, PVTC 256, LVTC 256->1024, plain 1024.

The models are InternVL-X's own classes, built from the public InternVL2-2B config.json
(`tests/fixtures/real_configs/InternVL2-2B.json`: InternViT-300M, 24 layers, width 1024 at 448 px; InternLM2-1.8B,
24 layers, width 2048) through the config half of `internvlx convert` (`read_source_config`, `build_config`), with
random weights (nothing is downloaded):

  plain-256    InternVL2-2B as it is (pixel shuffle 0.5 + MLP projector): 256 tokens per frame
  pvtc-256     the PVTC projector: 256 tokens per frame
  lvtc         LVTC 256->1024: layers < k on 256 tokens per frame, layers >= k on 1024 (k = 18, as the FLOP table
               of docs/processing.md)
  plain-1024   downsample_ratio 1.0: 1024 tokens per frame in every layer

A video of F frames is F tiles of 448 px (InternVL2's video path: one tile per frame, no thumbnail). The prompt is
``--text-tokens`` text tokens with, per frame, ``<img>`` + its visual tokens + ``</img>`` (the ``FrameN: `` text is
left out, as in the FLOP table), so the LLM sees 64 + F x 258 tokens (256 per frame) or 64 + F x 1026 (1024).

What is timed (median of ``--repeats`` rounds after a warm-up; every round runs each model once, interleaved):

  ViT + projector   the 24-layer InternViT on the frames, plus the configuration's projector(s) (LVTC: the LR and
                    the HR projector). The ViT is timed on 1 and on ``--vit-check-frames`` frames; when the time per
                    frame of the two agrees within 10% (the ViT encodes every frame on its own, so on a CPU its cost
                    is linear in the frames), the ViT of F frames is F x the measured time per frame, otherwise it
                    is timed on every frame count (what a GPU, which a single frame does not fill, needs).
                    The projectors are timed inside the prefill forward on all F frames.
  LLM prefill       the first forward of `generate()` over the whole prompt: attention mask of ones, an empty
                    DynamicCache filled on the way (``use_cache=True``), logits of the last position only. The ViT's
                    output is recorded once and replayed there (it is timed above); the projectors' time is taken
                    out of it.

A 24-layer 2B LLM over 32 frames x 1024 tokens (32,896 tokens) is ~8 TFLOP per layer: on a 2-core CPU one such
layer takes minutes. So the LLM is run with ``--layers N`` decoder layers per layer group (N layers for the plain
models, 2N with k = N for LVTC: N on the short layout, N on the long one), every decoder layer is timed through
forward hooks, and the 24-layer prefill is *composed*:

    composed = (reduced forward - its decoder layers) + sum over groups of (layers in the group at 24 layers, k = 18)
               x (median time of that group's decoder layers)

which holds because all decoder layers of one width on one token count do the same work (same shapes, same
unmasked causal SDPA, the same KV-cache append). ``--validate F`` checks it: the full 24-layer plain-256 model is
run on F frames and its measured LLM prefill is set against the composed one.

``--shared-layers-at F,...`` (a cut for slow machines): at these frame counts only LVTC runs with decoder layers;
the other models run with a 0-layer LLM (everything but the decoder layers: embeddings, projectors, the masks, the
final norm, the LM head) and take their per-layer time from the LVTC forward's layers on the same token count
(plain-256 / PVTC: LVTC's layers < k, plain-1024: LVTC's layers >= k; the same module shapes, the same token count,
the same unmasked SDPA call).

Attention memory: the script records the attention mask every decoder layer receives. With SDPA, a prompt without
padding passes none (the causal flag alone: the flash kernels never form the n x n score matrix); a case whose
estimated memory (activations, KV cache and, if the model passed one, a dense mask) exceeds the available memory is
skipped with a printed reason. The peak resident memory of every case is recorded (CUDA: the allocator's peak).

FLOPs next to the times: `internvlx_hf.token_budget.prefill_flops` (LLM matmuls only, the full attention square),
and the same with half the square ("causal FLOPs": what a causal kernel that skips masked blocks computes).

    python benchmarks/bench_video_prefill.py --smoke                      # tiny widths, seconds: a check, not a result
    python benchmarks/bench_video_prefill.py --threads 1 --clock cpu --layers 1 --repeats 1 --warmup small \\
        --shared-layers-at 16,32 --validate 8 --vit-if-not-linear stop   # the CPU run in benchmarks/results/
    python benchmarks/bench_video_prefill.py --device cuda --dtype bfloat16 --layers 2 --repeats 5 \\
        --out benchmarks/results/gpu/video-prefill                      # on a GPU, every case measured (not run yet)
    python benchmarks/bench_video_prefill.py --from-json benchmarks/results/video-prefill.json   # report only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf import InternVLXForConditionalGeneration  # noqa: E402
from internvlx_hf.bench.harness import write_text  # noqa: E402
from internvlx_hf.conversion.convert import build_config, expected_parameters, read_source_config  # noqa: E402
from internvlx_hf.conversion.source import SourceCheckpoint  # noqa: E402
from internvlx_hf.modeling.projectors import build_projector  # noqa: E402
from internvlx_hf.token_budget import LLMShape, prefill_flops  # noqa: E402

CONFIGS = ("plain-256", "pvtc-256", "lvtc", "plain-1024")
REAL_CONFIG = ROOT / "tests" / "fixtures" / "real_configs" / "InternVL2-2B.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINEAR_TOLERANCE = 0.10

# --smoke: the same conversion path with tiny widths (a check of the script, not a measurement)
SMOKE_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=56)
SMOKE_LLM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=8, vocab_size=1000)


# --------------------------------------------------------------------------------------------------------- configs


def source_config(path: Path, smoke: bool) -> dict:
    config = json.loads(path.read_text())
    if smoke:
        config["vision_config"].update(SMOKE_VISION)
        config["force_image_size"] = SMOKE_VISION["image_size"]
        config["llm_config"].update(SMOKE_LLM)
    return config


def convert_config(source: dict, name: str, depth: int, expand_layer: int):
    """The InternVLXConfig `internvlx convert` would write for configuration ``name`` with a ``depth``-layer LLM."""
    source = copy.deepcopy(source)
    source["llm_config"]["num_hidden_layers"] = depth
    if name == "plain-1024":
        source["downsample_ratio"] = 1.0
    notes: list[str] = []
    parts = read_source_config(SourceCheckpoint(path=Path(name), config=source, shards=[], infos=[]), notes)
    projector = "pvtc" if name == "pvtc-256" else "mlp"
    lvtc = {"expand_layer": expand_layer} if name == "lvtc" else None
    # InternVL2's <IMG_CONTEXT> is 7 ids below the end of the vocabulary (92546 of 92553)
    ids = {"image_token_id": parts.text_config.vocab_size - 7}
    config = build_config(parts.config_kwargs, parts.text_config, projector, lvtc, ids)
    config._attn_implementation = "sdpa"
    return config


# ---------------------------------------------------------------------------------------------------------- models


class RecordedVision(nn.Module):
    """Stands in for the ViT inside the LLM timing: the ViT's output for one frame, recorded once, repeated for
    every frame. The ViT is timed on its own; replaying it keeps a 32-frame LLM forward from paying 32 ViT passes
    again. Everything after the ViT (projectors, LVTC's layout, the LLM) runs as in a real prefill."""

    def __init__(self, frame_output: torch.Tensor):
        super().__init__()
        self.register_buffer("frame", frame_output, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.frame.dtype

    def forward(self, pixel_values, return_dict=True, **kwargs):
        return BaseModelOutputWithPooling(last_hidden_state=self.frame.expand(pixel_values.shape[0], -1, -1))


def build_base(source: dict, depth: int, device: str, dtype: torch.dtype):
    """The plain-256 model with a ``depth``-layer LLM (random weights) and the PVTC and HR projectors: the parts
    every model of the run shares."""
    torch.manual_seed(0)
    configs = {name: convert_config(source, name, depth, 1) for name in ("plain-256", "pvtc-256", "plain-1024")}
    with torch.device(device):
        base = InternVLXForConditionalGeneration(configs["plain-256"])
        pvtc = build_projector(configs["pvtc-256"], "pvtc", configs["pvtc-256"].downsample_ratio)
        hr = build_projector(configs["plain-1024"], "mlp", 1.0)
    return base.to(dtype).eval(), pvtc.to(dtype).eval(), hr.to(dtype).eval()


def derived_model(name: str, config, base, pvtc, hr, vision: nn.Module):
    """A model of ``config`` (configuration ``name``) made of the base model's parts (its first decoder layers,
    embeddings, norm, LM head) and the shared projectors, with ``vision`` as its vision tower: no weights of its
    own."""
    depth = config.get_text_config().num_hidden_layers
    with torch.device("meta"):
        model = InternVLXForConditionalGeneration(config)
    lm, base_lm = model.model.language_model, base.model.language_model
    lm.embed_tokens, lm.norm, lm.rotary_emb = base_lm.embed_tokens, base_lm.norm, base_lm.rotary_emb
    lm.layers = nn.ModuleList(list(base_lm.layers[:depth]))
    model.lm_head = base.lm_head
    model.model.vision_tower = vision
    model.model.multi_modal_projector = {"pvtc-256": pvtc, "plain-1024": hr}.get(name,
                                                                                 base.model.multi_modal_projector)
    if name == "lvtc":
        model.model.lvtc_hr_projector = hr
    left = [key for key, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"{name}: tensors left on the meta device: {left[:5]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- inputs


def prompt(config, frames: int, text_tokens: int, device: str) -> torch.Tensor:
    """``text_tokens`` text ids around ``frames`` blocks of ``<img>`` + tokens per tile + ``</img>``."""
    text = torch.randint(3, 900, (text_tokens,), generator=torch.Generator().manual_seed(0))
    start, end = 900, 901  # any text ids: only <IMG_CONTEXT> is special to the forward
    block = [start] + [config.image_token_id] * config.image_seq_length + [end]
    ids = text[:8].tolist() + block * frames + text[8:].tolist()
    return torch.tensor([ids], device=device)


def tile_size(config) -> int:
    size = config.vision_config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def token_counts(config, frames: int, text_tokens: int) -> dict:
    """LLM tokens per layer group at the full depth (as the FLOP table counts them)."""
    short = text_tokens + frames * (2 + config.image_seq_length)
    if config.lvtc is None:
        return {"short": short, "long": None}
    return {"short": short, "long": text_tokens + frames * (2 + config.hr_tokens_per_tile)}


# ---------------------------------------------------------------------------------------------------------- timing


class Clock:
    """CUDA events on a GPU (read after a synchronisation); on a CPU wall time, or with ``--clock cpu`` the
    process's CPU time. On a machine shared with other jobs a single-threaded process is descheduled now and
    then, which stretches its wall time by however much the others ran; its CPU time counts only its own work."""

    def __init__(self, device: str, kind: str = "wall"):
        self.cuda = device.startswith("cuda")
        self.read = time.process_time if kind == "cpu" else time.perf_counter

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.read()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class Probe:
    """Times modules inside one forward through hooks (every decoder layer, the replayed vision tower, the
    projectors) and records the attention mask each decoder layer receives."""

    def __init__(self, model, clock: Clock):
        self.clock, self.model = clock, model
        self.marks: dict[str, list] = {}
        self.masks: set[str] = set()
        self.handles = []

    def __enter__(self):
        inner = self.model.model
        watched = [(f"layer{i}", layer) for i, layer in enumerate(inner.language_model.layers)]
        watched += [("vision", inner.vision_tower), ("projector", inner.multi_modal_projector)]
        if getattr(inner, "lvtc_hr_projector", None) is not None:
            watched.append(("hr_projector", inner.lvtc_hr_projector))
        watched += [(f"lr_projector{j}", p) for j, p in enumerate(getattr(inner, "lvtc_lr_projectors", []))]
        for name, module in watched:
            self.handles.append(module.register_forward_pre_hook(self._start(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._end(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _start(self, name):
        def hook(_module, args, kwargs):
            if name.startswith("layer"):
                mask = kwargs.get("attention_mask")
                self.masks.add("none" if mask is None else f"{tuple(mask.shape)} {mask.dtype}")
            self.marks.setdefault(name, []).append([self.clock.now(), None])
        return hook

    def _end(self, name):
        def hook(_module, _args, _output):
            self.marks[name][-1][1] = self.clock.now()
        return hook

    def seconds(self) -> dict[str, float]:
        self.clock.sync()
        return {name: sum(self.clock.seconds(a, b) for a, b in spans) for name, spans in self.marks.items()}


def prefill(model, ids, pixel_values):
    """The first forward of generate(): mask of ones, an empty cache it fills, the last position's logits."""
    cache = DynamicCache(config=model.config.get_text_config())
    return model(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids),
                 past_key_values=cache, use_cache=True, logits_to_keep=1)


def timed_prefill(model, ids, pixel_values, clock: Clock) -> dict:
    """One prefill: wall time, the LLM part (wall minus vision and projectors) and every decoder layer's time."""
    with Probe(model, clock) as probe, torch.inference_mode():
        wall = time.perf_counter()
        start = clock.now()
        out = prefill(model, ids, pixel_values)
        end = clock.now()
    clock.sync()
    wall = time.perf_counter() - wall
    if not torch.isfinite(out.logits).all():
        raise RuntimeError("the prefill produced non-finite logits: the timing would not be representative")
    del out
    parts = probe.seconds()
    total = clock.seconds(start, end)
    projectors = sum(value for key, value in parts.items() if "projector" in key)
    layers = [parts[f"layer{i}"] for i in range(len(model.model.language_model.layers))]
    llm = total - parts.get("vision", 0.0) - projectors
    return {"total_s": total, "wall_s": wall, "projector_s": projectors, "replay_s": parts.get("vision", 0.0),
            "llm_s": llm,
            "layer_s": layers, "non_layer_s": llm - sum(layers), "masks": sorted(probe.masks),
            "load_average": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------------------- memory


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def estimated_bytes(text_config, tokens: int, layers: int, itemsize: int, dense_mask: bool) -> int:
    """What one prefill holds at its peak besides the weights: a layer's activations (hidden states, q/k/v, the
    MLP's gate, up and product), the KV cache of ``layers`` layers and, if the model passes one, a dense mask."""
    shape = LLMShape.from_text_config(text_config)
    activations = tokens * (6 * shape.hidden_size + 3 * shape.intermediate_size) * itemsize
    cache = layers * 2 * tokens * shape.num_kv_heads * shape.head_dim * itemsize
    mask = tokens * tokens * itemsize if dense_mask else 0
    return activations + cache + mask


class PeakMemory:
    """Peak resident memory of the process during a block (Linux: VmHWM after resetting it; CUDA: the caching
    allocator's peak). None where neither is available."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak: int | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.resettable = True
            except OSError:
                self.resettable = False
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
            return
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -------------------------------------------------------------------------------------------------------------- ViT


def time_vit(vit, size: int, frames: list[int], args, clock: Clock, dtype) -> dict:
    """Seconds of the ViT on F frames for every F: F x the time per frame when 1 and ``--vit-check-frames`` frames
    agree per frame within 10%, else timed on each F."""
    def pixels(count):
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)

    walls = []

    def run(count):
        px = pixels(count)
        with torch.inference_mode():
            wall = time.perf_counter()
            start = clock.now()
            out = vit(pixel_values=px).last_hidden_state
            end = clock.now()
        clock.sync()
        walls.append((count, time.perf_counter() - wall))
        return clock.seconds(start, end), out

    check = args.vit_check_frames
    log(f"ViT: warm-up on 1 frame, then {args.repeats} x (1 frame, {check} frames)")
    _, recorded = run(1)
    one, many = [], []
    for _ in range(args.repeats):
        one.append(run(1)[0])
        many.append(run(check)[0])
    per_frame_1, per_frame_b = median(one), median(many) / check
    linearity = per_frame_b / per_frame_1
    result = {"frame_output": recorded[:1].detach().clone(), "per_frame_s_at_1": per_frame_1, "wall_s": walls,
              f"per_frame_s_at_{check}": per_frame_b, "linearity": linearity, "check_frames": check}
    if abs(linearity - 1) <= LINEAR_TOLERANCE:
        result.update(mode="scaled", seconds={f: f * per_frame_b for f in frames})
        log(f"ViT: {per_frame_1:.3f} s/frame at 1 frame, {per_frame_b:.3f} at {check} (ratio {linearity:.3f}): "
            "linear, scaled by the frame count")
        return result
    if args.vit_if_not_linear == "stop":
        raise SystemExit(f"ViT: {per_frame_1:.3f} s/frame at 1 frame, {per_frame_b:.3f} at {check} (ratio "
                         f"{linearity:.3f}): not linear within {LINEAR_TOLERANCE:.0%}, and --vit-if-not-linear stop.")
    log(f"ViT: {per_frame_1:.3f} s/frame at 1 frame, {per_frame_b:.3f} at {check} (ratio {linearity:.3f}): not "
        "linear, timed on every frame count")
    seconds = {}
    for f in frames:
        run(f)
        seconds[f] = median([run(f)[0] for _ in range(args.repeats)])
        log(f"ViT: {f} frames {seconds[f]:.3f} s")
    result.update(mode="measured", seconds=seconds)
    return result


# ------------------------------------------------------------------------------------------------------------ cases


def compose(runs: list[dict], groups: list[tuple[int, int, int]], borrowed: dict | None = None) -> dict:
    """Median over the rounds of the composed 24-layer LLM prefill. ``groups``: (first run layer, end, layers at
    full depth); ``borrowed``: per-layer seconds of each group taken from another forward (0-layer runs)."""
    composed, per_group = [], {}
    for run in runs:
        value = run["non_layer_s"]  # the reduced forward's LLM part minus its decoder layers
        for index, (first, end, count) in enumerate(groups):
            layer = borrowed[index] if borrowed is not None else median(run["layer_s"][first:end])
            per_group.setdefault(index, []).append(layer)
            value += count * layer
        composed.append(value)
    return {"llm_s": median(composed), "layer_s_per_group": [median(per_group[i]) for i in range(len(groups))]}


def summarise_runs(runs: list[dict]) -> dict:
    keys = ("total_s", "wall_s", "projector_s", "replay_s", "llm_s", "non_layer_s")
    summary = {f"reduced_{key}": median([run[key] for run in runs]) for key in keys}
    summary["layer_s_runs"] = [run["layer_s"] for run in runs]
    summary["masks"] = sorted({mask for run in runs for mask in run["masks"]})
    return summary


def median(values):
    return statistics.median(values) if values else None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(args) -> dict:
    began = time.perf_counter()
    dtype = DTYPES[args.dtype]
    clock = Clock(args.device, args.clock)
    source = source_config(args.config, args.smoke)
    full_depth = source["llm_config"]["num_hidden_layers"]
    k = args.expand_layer
    if not 1 <= k < full_depth:
        raise SystemExit(f"--expand-layer {k}: the LLM has {full_depth} layers; pass 1..{full_depth - 1}.")
    full = {name: convert_config(source, name, full_depth, k) for name in CONFIGS}
    frames = args.frames
    shared_at = [f for f in args.shared_layers_at if f in frames]
    n = args.layers
    depth = {name: (2 * n if name == "lvtc" else n) for name in args.configs}
    base_depth = full_depth if args.validate else max(depth.values())
    weights_estimate = 2.3e9 * (base_depth / full_depth) * dtype.itemsize if not args.smoke else 0
    if weights_estimate > 0.9 * available_bytes(args.device):
        raise SystemExit(f"the {base_depth}-layer model needs about {weights_estimate / 2**30:.1f} GiB and "
                         f"{available_bytes(args.device) / 2**30:.1f} GiB are available; drop --validate.")

    log(f"building the models ({base_depth}-layer base LLM, random weights, {args.dtype} on {args.device})")
    base, pvtc, hr = build_base(source, base_depth, args.device, dtype)
    size = tile_size(full["plain-256"])
    vit = time_vit(base.model.vision_tower, size, frames, args, clock, dtype)
    replay = RecordedVision(vit.pop("frame_output"))
    base.model.vision_tower = replay  # frees the real ViT: only its timing is needed from here on
    models, zero = {}, {}
    for name in args.configs:
        models[name] = derived_model(name, convert_config(source, name, depth[name], n), base, pvtc, hr, replay)
        if shared_at and name != "lvtc":
            zero[name] = derived_model(name, convert_config(source, name, 0, n), base, pvtc, hr, replay)

    def pixels(count):
        return torch.zeros(count, 3, size, size, device=args.device, dtype=dtype)  # the replayed ViT ignores them

    # A 1-frame prefill per model: the warm-up of --warmup small, and which attention masks the layers receive
    dense_mask = False
    for name, model in [*models.items(), *zero.items()]:
        log(f"warm-up and mask check: {name} ({len(model.model.language_model.layers)} layers), 1 frame")
        result = timed_prefill(model, prompt(model.config, 1, args.text_tokens, args.device), pixels(1), clock)
        dense_mask |= any(mask != "none" for mask in result["masks"])

    cases, skipped = {}, []
    for f in frames:
        lineup = {name: (zero[name] if f in shared_at and name in zero else models[name]) for name in args.configs}
        inputs = {name: prompt(model.config, f, args.text_tokens, args.device) for name, model in lineup.items()}
        runnable = {}
        for name, model in lineup.items():
            tokens = token_counts(full[name], f, args.text_tokens)
            longest = inputs[name].shape[1] if name != "lvtc" else tokens["long"]
            need = estimated_bytes(model.config.get_text_config(), longest, len(model.model.language_model.layers),
                                   dtype.itemsize, dense_mask)
            if need > 0.9 * available_bytes(args.device):
                reason = (f"{name}, {f} frames: about {need / 2**30:.1f} GiB needed for activations, KV cache and "
                          f"mask at {longest} tokens, {available_bytes(args.device) / 2**30:.1f} GiB available")
                log(f"skipped: {reason}")
                skipped.append(reason)
                continue
            runnable[name] = model
        runs = {name: [] for name in runnable}
        peaks = {name: None for name in runnable}
        rounds = args.repeats + (1 if args.warmup == "full" else 0)
        for round_ in range(rounds):
            warm = args.warmup == "full" and round_ == 0
            label = "warm-up" if warm else f"round {round_ + (0 if args.warmup == 'full' else 1)}"
            for name, model in runnable.items():
                layers = len(model.model.language_model.layers)
                log(f"{f} frames, {name}: {inputs[name].shape[1]} input ids, {layers}-layer LLM, {label}")
                with PeakMemory(args.device) as peak:
                    result = timed_prefill(model, inputs[name], pixels(f), clock)
                if not warm:
                    runs[name].append(result)
                    peaks[name] = max(peaks[name] or 0, peak.peak or 0) or None
                    log(f"  LLM part {result['llm_s']:.3f} s, layers "
                        + ", ".join(f"{s:.3f}" for s in result["layer_s"]) + f" s, masks {result['masks']}")
        for name in runnable:
            cases[(name, f)] = {"runs": runs[name], "peak_bytes": peaks[name],
                                "layers_run": len(runnable[name].model.language_model.layers)}
        if args.validate == f and "plain-256" in runnable:
            cases[("validation", f)] = validate(base, f, args, clock, pixels, full_depth)
            # only the reduced models' layers are used from here on: free the others
            del base.model.language_model.layers[max(depth.values()):]
    base = models = zero = None

    results = assemble(cases, full, vit, frames, args, k, full_depth)
    results["skipped"] = skipped
    results["dense_mask_seen"] = dense_mask
    results["seconds"] = time.perf_counter() - began
    return results


def validate(base, frames: int, args, clock: Clock, pixels, full_depth: int) -> dict:
    """The full-depth plain-256 prefill, measured (its composed value comes from the reduced plain-256 run)."""
    ids = prompt(base.config, frames, args.text_tokens, args.device)
    runs = []
    for round_ in range(args.repeats + (1 if args.warmup == "full" else 0)):
        warm = args.warmup == "full" and round_ == 0
        log(f"validation: plain-256 with all {full_depth} layers, {frames} frames ({ids.shape[1]} input ids)"
            + (", warm-up" if warm else ""))
        with PeakMemory(args.device) as peak:
            result = timed_prefill(base, ids, pixels(frames), clock)
        if not warm:
            result["peak_bytes"] = peak.peak
            runs.append(result)
            log(f"  LLM part {result['llm_s']:.3f} s (layers {min(result['layer_s']):.3f} .. "
                f"{max(result['layer_s']):.3f} s)")
    return {"runs": runs}


# ----------------------------------------------------------------------------------------------------------- report


def assemble(cases, full, vit, frames, args, k, full_depth) -> dict:
    """One row per (configuration, frames) from the timed forwards: composed LLM prefill, ViT + projectors."""
    rows = []
    n = args.layers
    for f in frames:
        for name in args.configs:
            case = cases.get((name, f))
            if case is None:
                continue
            tokens = token_counts(full[name], f, args.text_tokens)
            groups = [(0, n, k), (n, 2 * n, full_depth - k)] if name == "lvtc" else [(0, n, full_depth)]
            borrowed, source = None, "own decoder layers"
            if case["layers_run"] == 0:
                lvtc = cases.get(("lvtc", f))
                if lvtc is None:
                    raise SystemExit(f"--shared-layers-at {f} needs the lvtc model in the run (--configs).")
                lvtc_groups = compose(lvtc["runs"], [(0, n, k), (n, 2 * n, full_depth - k)])["layer_s_per_group"]
                borrowed = [lvtc_groups[1] if name == "plain-1024" else lvtc_groups[0]]
                groups = [(0, 0, full_depth)]
                source = "lvtc's decoder layers " + ("(>= k)" if name == "plain-1024" else "(< k)")
            composed = compose(case["runs"], groups, borrowed)
            summary = summarise_runs(case["runs"])
            vision = vit["seconds"][f] + summary["reduced_projector_s"]
            rows.append({
                "config": name, "frames": f, "tokens_short": tokens["short"], "tokens_long": tokens["long"],
                "layers_run": case["layers_run"], "layer_time_from": source,
                "vit_s": vit["seconds"][f], "projector_s": summary["reduced_projector_s"], "vision_s": vision,
                "llm_s": composed["llm_s"], "layer_s_per_group": composed["layer_s_per_group"],
                "total_s": vision + composed["llm_s"], "peak_bytes": case["peak_bytes"], **summary,
            })
    by_key = {(row["config"], row["frames"]): row for row in rows}
    validation = None
    for (name, f), case in cases.items():
        if name == "validation" and (reduced := by_key.get(("plain-256", f))) is not None:
            measured = median([run["llm_s"] for run in case["runs"]])
            layer_s = case["runs"][-1]["layer_s"]
            validation = {"frames": f, "config": "plain-256", "layers": full_depth, "measured_llm_s": measured,
                          "composed_llm_s": reduced["llm_s"], "measured_over_composed": measured / reduced["llm_s"],
                          "full_layer_s_median": median(layer_s), "full_layer_s_min": min(layer_s),
                          "full_layer_s_max": max(layer_s), "peak_bytes": case["runs"][-1]["peak_bytes"],
                          "masks": sorted({m for run in case["runs"] for m in run["masks"]}), "runs": case["runs"]}
    return {"rows": rows, "vit": vit, "validation": validation}


def derive(results: dict, full: dict, itemsize: int) -> None:
    """FLOPs, ratios and the full-depth memory estimate of every row (from token counts: also re-run on a saved
    JSON by ``--from-json``)."""
    k, depth = results["args"]["expand_layer"], results["depth"]
    for row in results["rows"]:
        name, short, long = row["config"], row["tokens_short"], row["tokens_long"]
        text_config = full[name].get_text_config()
        shape = LLMShape.from_text_config(text_config)
        groups = [(short, k), (long, depth - k)] if long else [(short, depth)]
        flops = prefill_flops(shape, short, long, k) if long else prefill_flops(shape, short)
        # token_budget counts the whole n x n attention square; a causal kernel computes about half of it
        half_square = sum(count * 2 * n * n * shape.num_heads * shape.head_dim for n, count in groups)
        row["llm_tflops"], row["llm_tflops_causal"] = flops / 1e12, (flops - half_square) / 1e12
        cache = sum(count * 2 * n * shape.num_kv_heads * shape.head_dim * itemsize for n, count in groups)
        row["full_depth_kv_cache_bytes"] = cache
        weights = sum(p.numel() for p in expected_parameters(full[name])[0].parameters()) * itemsize
        row["full_depth_memory_estimate_bytes"] = weights + cache + estimated_bytes(
            text_config, max(short, long or 0), 0, itemsize, results["dense_mask_seen"])
    by_key = {(row["config"], row["frames"]): row for row in results["rows"]}
    validation = results.get("validation")
    if validation:
        layer_s = validation["runs"][-1]["layer_s"]
        validation["full_layer_s_mean"] = statistics.fmean(layer_s)
        validation["measured_non_layer_s"] = median([run["non_layer_s"] for run in validation["runs"]])
        validation["composed_from_layer_s"] = by_key[("plain-256", validation["frames"])]["layer_s_per_group"][0]
    for row in results["rows"]:
        for ref in ("plain-1024", "plain-256"):
            other = by_key.get((ref, row["frames"]))
            if other is not None:
                row[f"total_vs_{ref}"] = row["total_s"] / other["total_s"]
                row[f"llm_vs_{ref}"] = row["llm_s"] / other["llm_s"]
                row[f"flops_vs_{ref}"] = row["llm_tflops"] / other["llm_tflops"]
                row[f"flops_causal_vs_{ref}"] = row["llm_tflops_causal"] / other["llm_tflops_causal"]


def machine(args) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": args.device,
            "dtype": args.dtype}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(results: dict) -> str:
    rows, k = results["rows"], results["args"]["expand_layer"]
    depth = results["depth"]
    what = "tiny widths (--smoke: a check of the script, not a result)" if results["args"]["smoke"] else (
        "InternVL2-2B dimensions")
    lines = [
        f"Prefill of F frames (one tile each) + {results['args']['text_tokens']} text tokens at {what}, "
        f"{results['machine']['dtype']} on {results['machine']['device']} "
        f"({results['machine']['cpu'] or results['machine'].get('gpu')}, {results['machine']['threads']} thread(s)), "
        f"{'process CPU time' if results['args']['clock'] == 'cpu' else 'wall time'}, "
        f"{results['date']}. Times in ms; LLM prefill composed for {depth} layers from per-layer times "
        f"(see 'LLM from').", "",
        f"| frames | config | LLM tokens (layers < {k} / >= {k}) | ViT + projector ms | LLM prefill ms | total ms "
        "| total vs plain-1024 | total vs plain-256 | LLM vs plain-1024: time (FLOPs; causal FLOPs) | LLM TFLOPs "
        "| LLM from |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        tokens = f"{row['tokens_short']:,}" + (f" / {row['tokens_long']:,}" if row["tokens_long"] else "")
        source = (f"{row['layers_run']} measured layer(s) per group" if row["layers_run"]
                  else f"0-layer forward + {row['layer_time_from']}")
        lines.append(
            f"| {row['frames']} | {row['config']} | {tokens} | {ms(row['vision_s'])} | {ms(row['llm_s'])}"
            f" | {ms(row['total_s'])} | {_ratio(row, 'total_vs_plain-1024')}"
            f" | {_ratio(row, 'total_vs_plain-256')}"
            f" | {_ratio(row, 'llm_vs_plain-1024')} ({_ratio(row, 'flops_vs_plain-1024')}; "
            f"{_ratio(row, 'flops_causal_vs_plain-1024')}) | {row['llm_tflops']:.2f}"
            f" | {source} |")
    vit = results["vit"]
    at_check = vit["per_frame_s_at_{}".format(vit["check_frames"])]
    lines += ["", f"ViT: {ms(vit['per_frame_s_at_1'])} ms per frame on 1 frame, "
              f"{ms(at_check)} on {vit['check_frames']} (ratio "
              f"{vit['linearity']:.3f}): "
              + ("F x the time per frame." if vit["mode"] == "scaled" else "timed on every frame count.")]
    lines += ["", "Per decoder layer (median ms) by token count and the forward that measured it:", "",
              "| tokens | config | ms per layer |", "|--:|---|--:|"]
    for row in rows:
        if not row["layers_run"]:
            continue
        counts = [row["tokens_short"]] + ([row["tokens_long"]] if row["tokens_long"] else [])
        for tokens, seconds in zip(counts, row["layer_s_per_group"]):
            lines.append(f"| {tokens:,} | {row['config']} | {ms(seconds)} |")
    validation = results["validation"]
    if validation:
        lines += ["", f"Validation: {validation['config']} with all {validation['layers']} layers on "
                  f"{validation['frames']} frames: LLM prefill measured {ms(validation['measured_llm_s'])} ms, "
                  f"composed {ms(validation['composed_llm_s'])} ms (measured / composed "
                  f"{validation['measured_over_composed']:.3f}); its {validation['layers']} layers took "
                  f"{ms(validation['full_layer_s_min'])} .. {ms(validation['full_layer_s_max'])} ms "
                  f"(mean {ms(validation['full_layer_s_mean'])}), the one layer the composition used "
                  f"{ms(validation['composed_from_layer_s'])} ms."]
    masks = sorted({mask for row in rows for mask in row["masks"]})
    lines += ["", f"Attention masks the decoder layers received: {', '.join(masks)} (none = SDPA's causal flag, no "
              "n x n matrix)."]
    peaks = [(row["config"], row["frames"], row["peak_bytes"]) for row in rows if row["peak_bytes"]]
    if peaks:
        name, f, peak = max(peaks, key=lambda item: item[2])
        lines.append(f"Largest peak memory of a timed forward: {peak / 2**30:.1f} GiB ({name}, {f} frames).")
    if rows:
        row = max(rows, key=lambda item: item["full_depth_memory_estimate_bytes"])
        lines.append(
            f"Largest full-depth prefill (estimate: weights, KV cache, one layer's activations): "
            f"{row['full_depth_memory_estimate_bytes'] / 2**30:.1f} GiB ({row['config']}, {row['frames']} frames; "
            f"KV cache {row['full_depth_kv_cache_bytes'] / 2**30:.1f} GiB).")
    for reason in results["skipped"]:
        lines.append(f"Skipped: {reason}.")
    lines += ["", f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(row, key) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def plot(results: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    with figure(path, 1, 2, figsize=(11, 4.2), dpi=120) as (fig, (left, right)):
        for name in CONFIGS:
            rows = [row for row in results["rows"] if row["config"] == name]
            if not rows:
                continue
            frames = [row["frames"] for row in rows]
            left.plot(frames, [row["total_s"] for row in rows], marker="o", label=name)
            right.plot(frames, [row["llm_s"] for row in rows], marker="o", label=name)
        for axis, title in ((left, "prefill total (ViT + projector + LLM)"), (right, "LLM prefill")):
            axis.set_yscale("log")
            axis.set_xscale("log", base=2)
            axis.set_xticks(results["args"]["frames"], [str(f) for f in results["args"]["frames"]])
            axis.set_xlabel("frames (one 448 px tile each)")
            axis.set_ylabel("seconds")
            axis.set_title(title)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
        m = results["machine"]
        what = "tiny widths (--smoke)" if results["args"]["smoke"] else "InternVL2-2B dimensions"
        clock = "process CPU time" if results["args"]["clock"] == "cpu" else "wall time"
        fig.suptitle(f"Video prefill at {what} ({m['dtype']}, {m['device']}, {m['threads']} thread(s), {clock}; "
                     f"LLM composed from per-layer times)", fontsize=10)


# ------------------------------------------------------------------------------------------------------------- main


def frame_list(value: str) -> list[int]:
    try:
        frames = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give frame counts as integers, e.g. 8,16,32") from None
    if any(f < 1 for f in frames):
        raise argparse.ArgumentTypeError(f"{value!r}: frame counts must be >= 1")
    return frames


def config_list(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return [name for name in CONFIGS if name in names]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REAL_CONFIG, help="an OpenGVLab InternVL2 config.json")
    parser.add_argument("--frames", type=frame_list, default=[8, 16, 32])
    parser.add_argument("--configs", type=config_list, default=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers per layer group in the timed LLM (LVTC runs 2N with k = N)")
    parser.add_argument("--expand-layer", type=int, default=18, help="LVTC's k at full depth (the composition)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", choices=("full", "small"), default="full",
                        help="full: an untimed round at every measured shape; small: one 1-frame prefill per model")
    parser.add_argument("--validate", type=int, default=8,
                        help="frames of the full-depth plain-256 run that checks the composition (0: none)")
    parser.add_argument("--shared-layers-at", type=frame_list, default=[],
                        help="frame counts at which only LVTC runs decoder layers (see the module docstring)")
    parser.add_argument("--vit-check-frames", type=int, default=2)
    parser.add_argument("--vit-if-not-linear", choices=("measure", "stop"), default="measure",
                        help="when the ViT's time per frame is not linear: time it on every frame count, or stop")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU only: wall time, or the process's CPU time (--threads 1 only; see Clock)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "video-prefill",
                        help="writes OUT.json, OUT.md and OUT.png")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and 1-2 frames: checks the script")
    parser.add_argument("--from-json", type=Path,
                        help="measure nothing: rewrite the table, FLOP columns and plot of a saved run's JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.layers = [1, 2], 1
        args.validate = 1 if args.validate else 0
        args.expand_layer = min(args.expand_layer, SMOKE_LLM["num_hidden_layers"] - 2)
        args.shared_layers_at = [2] if args.shared_layers_at else []
        args.text_tokens = min(args.text_tokens, 16)
        if args.out == parser.get_default("out"):
            args.out = Path("/tmp/video-prefill-smoke")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: at least 1 decoder layer per group")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1 timed round")
    if args.text_tokens < 8:
        parser.error(f"--text-tokens {args.text_tokens}: at least 8 (the frames follow the first 8)")
    if args.vit_check_frames < 2:
        parser.error(f"--vit-check-frames {args.vit_check_frames}: at least 2 (it is compared with 1 frame)")
    if args.validate and args.validate not in args.frames:
        parser.error(f"--validate {args.validate}: must be one of --frames {args.frames} (or 0)")
    if args.validate and "plain-256" not in args.configs:
        parser.error("--validate needs plain-256 in --configs (its reduced run gives the composed value)")
    if args.shared_layers_at and "lvtc" not in args.configs:
        parser.error("--shared-layers-at takes the per-layer times from the lvtc model: add lvtc to --configs")
    if args.validate in args.shared_layers_at:
        parser.error(f"--validate {args.validate} needs plain-256's own decoder layers: not in --shared-layers-at")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu counts the CPU time of all threads: use it with --threads 1 on --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def write(results: dict, out: Path) -> None:
    full = {name: convert_config(source_config(Path(results["args"]["config"]), results["args"]["smoke"]), name,
                                 results["depth"], results["args"]["expand_layer"]) for name in CONFIGS}
    derive(results, full, DTYPES[results["args"]["dtype"]].itemsize)
    table = markdown(results)
    print(table)
    write_text(out.with_suffix(".json"), json.dumps(results, indent=2, default=str) + "\n")
    write_text(out.with_suffix(".md"), table)
    plot(results, out.with_suffix(".png"))
    log(f"wrote {out}.json, .md, .png")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        try:
            results = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--from-json {args.from_json}: not a readable JSON of this script ({error})") from None
        write(results, args.from_json.with_suffix(""))
        return
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = run_benchmark(args)
    results.update(
        date=datetime.date.today().isoformat(), machine=machine(args),
        depth=source_config(args.config, args.smoke)["llm_config"]["num_hidden_layers"],
        load_average_before=load_before, load_average_after=os.getloadavg()[0],
        command="python benchmarks/bench_video_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv),
        args={key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
    )
    write(results, args.out)


if __name__ == "__main__":
    main()
