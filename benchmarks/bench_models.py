"""InternVL-X next to transformers' native InternVL: FLOPs, prefill, decoding, a training step, memory, RVTC tokens.

Every model of a preset has the same dimensions and random weights; models that have a part in common share the very
module (one ViT, one LLM, one LM head, one HR projector), so they fit in memory together and are timed round-robin.

  native-256    transformers' InternVLForConditionalGeneration (pixel shuffle 0.5 + MLP: 256 tokens per tile)
  native-1024   the same at downsample ratio 1.0 (1024 tokens per tile)
  plain-256     InternVL-X with the MLP projector (the projector weights of native-256: same logits)
  plain-1024    InternVL-X, MLP projector at 1.0 (the HR projector below; same logits as native-1024)
  pvtc-256      InternVL-X with the PVTC projector (256 tokens per tile)
  lvtc          InternVL-X LVTC 256->1024: layers < k on 256 tokens per tile, from k = 3/4 of the depth on 1024
  lvtc-rms      the same with hr_scale="rms" (each HR token rescaled to its upsampled LR state's RMS)
  pvtc+lvtc     PVTC LR projector + LVTC (MLP HR projector)

Presets: `tiny` (seconds, for trying the script), `1b` (InternViT-300M + a 24-layer, 896-wide Qwen2 = InternVL2-1B),
`2b` (InternViT-300M + a 24-layer, 2048-wide LLM, vocab 92553 = InternVL2-2B), `8b` (InternViT-300M + a 32-layer,
4096-wide LLM = InternVL2-8B; GPU only). The input is one image of `--tiles` 448px tiles (default 1) between 8 and
`--text-tokens - 8` text tokens, with a label at every position (the harness's `variants.sample`, `labels="all"`);
`--tiles 1,6,12` repeats prefill and decode for each count.

Workloads, each timed as the median of `--runs` rounds after one warm-up round, every round running each model once
(interleaved, so drifting machine load hits all models alike); each call is timed by the harness's `time_call`
(on a GPU it synchronizes before and after the call):

  prefill   forward with a KV cache, logits of the last position only (what generate() runs first)
  decode    `--decode-tokens` greedy steps after that prefill, one token each with the KV cache: seconds per token
  train     forward + backward (no optimizer step) of one `--train-tiles` sample with labels on every position, ViT
            frozen (as preset stage2-frozen-vit: projectors + LLM learn) or trained too (`--train-vit full`, as
            stage2), `--gradient-checkpointing` as `--activation_checkpointing`; `--train-layers N` builds the
            models with an N-layer LLM for it (k = 3/4 of N)

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` in the warm-up round. It does not know CPU SDPA's fused
kernels nor grouped-query shapes on CUDA, so it is given their formulas (`SDPA_FLOPS`): the attention square counted
as eager attention's matmuls count it (a test checks the two counts are equal), so FLOPs include attention while
times use SDPA. Peak memory (`PeakMemory` on a CPU, the caching allocator's peak on a GPU; in the warm-up round) is
the weights plus the peak of what one call allocates and holds at once: activations, the KV cache, gradients,
temporaries. On a GPU the warm-up round also records, through torch.profiler, the time the call's kernels kept the
GPU busy and which SDPA kernels ran (`--sdpa-backend flash` forces FlashAttention); `benchmarks/gpu/speed.sh` runs
the GPU presets and `benchmarks/gpu/report.py` makes tables and a plot of them.

    python benchmarks/bench_models.py --preset tiny                        # a quick try
    python benchmarks/bench_models.py --preset 1b --workloads prefill,decode
    python benchmarks/bench_models.py --preset 2b --train-layers 6 --json out.json --plot out.png
    python benchmarks/bench_models.py --device cuda --dtype bfloat16 --preset 8b --tiles 1,6,12 --train-tiles 6 \
        --train-vit frozen,full --gradient-checkpointing --sdpa-backend flash      # on a GPU (benchmarks/gpu/speed.sh)
    python benchmarks/bench_models.py --rvtc-only                          # visual tokens per image only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import weakref
from pathlib import Path

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count
from tqdm.auto import tqdm
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration
from internvlx_hf.bench.harness import time_call, write_text
from internvlx_hf.bench.variants import assemble, sample
from internvlx_hf.token_budget import TilingSettings, image_budget
from internvlx_hf.modeling.projectors import build_projector

MODELS = ("native-256", "native-1024", "plain-256", "plain-1024", "pvtc-256", "lvtc", "lvtc-rms", "pvtc+lvtc")
WORKLOADS = ("prefill", "decode", "train")

_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        text=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    ),
    "1b": dict(  # InternVL2-1B: InternViT-300M + Qwen2-0.5B-Instruct
        vision=_INTERNVIT_300M,
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151655, tie_word_embeddings=True,
                  rope_theta=1000000.0),
    ),
    "2b": dict(vision=_INTERNVIT_300M, text=None),  # InternVLXConfig's defaults: InternVL2-2B (InternLM2-1.8B dims)
    "8b": dict(  # InternVL2-8B: InternViT-300M + InternLM2.5-7B dimensions
        vision=_INTERNVIT_300M,
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=92553, rope_theta=1000000.0),
    ),
}

# RVTC (paper Sec. 3.3): a realistic mix of image sizes.
IMAGE_MIX = (("photo", 640, 480), ("photo", 4032, 3024), ("page", 1700, 2200), ("chart", 800, 600),
             ("banner", 80, 20))

_aten = torch.ops.aten

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

#: 1-minute load average after every round of every workload (a busy machine shows here).
LOAD_AFTER_ROUNDS: list[tuple[str, int, float]] = []


def _all_heads(query, key):
    """Grouped-query attention hands SDPA fewer key/value heads than query heads (``enable_gqa``); every query head
    still forms its own scores, so the count takes as many key/value heads as query heads (torch's own formulas
    refuse such shapes)."""
    return (*key[:-3], query[-3], *key[-2:])


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, _all_heads(query, key), _all_heads(query, value))


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, _all_heads(query, key), _all_heads(query, value))


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's formula includes the fused kernel's recomputation of the scores; eager attention has none
    recompute = bmm_flop((query[0] * query[1], query[2], query[3]), (query[0] * query[1], query[3], key[2]))
    return _sdpa_backward_flops(grad_out, query, key, value) - recompute


#: FlopCounterMode formulas for SDPA's fused kernels: CPU's (torch registers the CUDA ones only) and CUDA's with
#: grouped-query shapes.
SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    _aten._scaled_dot_product_flash_attention: _sdpa_flops,
    _aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_flops,
    _aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    _aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_flops,
    _aten._scaled_dot_product_cudnn_attention: _sdpa_flops,
    _aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_flops,
}


def count_flops(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        result = fn()
    return counter.get_total_flops(), result


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated while the mode is on and still alive: activations, the KV cache,
    gradients and temporaries (views and in-place results share a storage and count once, views of memory that
    existed before, such as the weights, not at all). `MemTracker` of
    torch.distributed._tools would do this too, but it hooks the gradient of every parameter, frozen ones included,
    which a frozen ViT refuses."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._sizes = 0, 0, {}

    def _allocated(self, key: int, nbytes: int) -> None:
        self._sizes[key] = nbytes
        self.live += nbytes

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output that shares an input's storage is a view or an in-place result: no new memory
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._sizes and key not in given:
                    self._allocated(key, storage.nbytes())
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def flops_and_peak_memory(model, fn) -> tuple[int, dict, object]:
    """FLOPs and peak memory of one call (the warm-up): the weights plus the peak of what the call allocates."""
    weights = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    tracker = PeakMemory()
    with tracker:
        flops, result = count_flops(fn)
    memory = {"peak_bytes": weights + tracker.peak, "weights_bytes": weights, "working_bytes": tracker.peak}
    return flops, memory, result


# ------------------------------------------------------------------------------------------------------- models


def configs(preset: str, layers: int | None, attn: str) -> dict:
    spec = PRESETS[preset]
    text = dict(spec["text"] or InternVLXConfig().text_config.to_dict())
    text.pop("architectures", None)
    if layers is not None:
        text["num_hidden_layers"] = layers
    depth = text["num_hidden_layers"]
    image_token = 999 if preset == "tiny" else text["vocab_size"] - 7
    common = dict(vision_config=dict(spec["vision"]), text_config=text, image_token_id=image_token,
                  attn_implementation=attn)
    lvtc = {"expand_layer": depth * 3 // 4}
    ours = {
        "plain-256": InternVLXConfig(**common),
        "plain-1024": InternVLXConfig(**common, downsample_ratio=1.0),
        "pvtc-256": InternVLXConfig(**common, projector_type="pvtc", pvtc_num_heads=16 if preset != "tiny" else 4),
        "lvtc": InternVLXConfig(**common, lvtc=lvtc),
        "lvtc-rms": InternVLXConfig(**common, lvtc={**lvtc, "hr_scale": "rms"}),
    }
    ours["pvtc+lvtc"] = InternVLXConfig(**{**ours["pvtc-256"].to_dict(), "lvtc": lvtc})
    native = {
        name: InternVLConfig(vision_config=dict(spec["vision"]), text_config=dict(text), image_token_id=image_token,
                             downsample_ratio=ours[same].downsample_ratio, image_seq_length=ours[same].image_seq_length,
                             projector_hidden_act="gelu", attn_implementation=attn)
        for name, same in (("native-256", "plain-256"), ("native-1024", "plain-1024"))
    }
    return {**native, **ours}


def build_models(preset: str, names, layers: int | None, device: str, dtype: torch.dtype, attn: str) -> dict:
    """The requested models, sharing one ViT, LLM and LM head (and one HR / PVTC projector where they have one)."""
    cfgs = configs(preset, layers, attn)
    torch.manual_seed(0)
    with torch.device(device):
        base = InternVLXForConditionalGeneration(cfgs["plain-256"])
        hr = build_projector(cfgs["plain-1024"], "mlp", 1.0)
        pvtc = build_projector(cfgs["pvtc-256"], "pvtc", 0.5) if {"pvtc-256", "pvtc+lvtc"} & set(names) else None
    models = {}
    for name in names:
        if name == "plain-256":
            models[name] = base
        elif name.startswith("native"):
            # same weights as our MLP projector: native and ours then compute the same logits
            source = base.model.multi_modal_projector if name == "native-256" else hr
            with torch.device(device):
                projector = InternVLMultiModalProjector(cfgs[name])
            projector.load_state_dict(source.state_dict())
            models[name] = assemble(cfgs[name], base, projector, model_class=InternVLForConditionalGeneration)
        else:
            projectors = {"plain-1024": hr, "pvtc-256": pvtc, "lvtc": base.model.multi_modal_projector,
                          "lvtc-rms": base.model.multi_modal_projector, "pvtc+lvtc": pvtc}
            models[name] = assemble(cfgs[name], base, projectors[name], hr if "lvtc" in name else None)
    return {name: model.to(dtype).eval() for name, model in models.items()}


# ---------------------------------------------------------------------------------------------------- workloads


def timed(fn, device: str) -> tuple[float, object]:
    """One call of ``fn`` timed by the harness's `time_call` (no warm-up of its own: round 0 of every workload is the
    warm-up; on a GPU it synchronizes before and after the call), and the call's result."""
    result = []
    seconds = time_call(lambda: result.append(fn()), warmup=0, repeats=1, device=device)["median_s"]
    return seconds, result[0]


def bench_sample(model, args, tiles: int = 1) -> dict:
    """The harness's `variants.sample` with a label at every position (`labels="all"`), so that InternVL-X's training
    forward runs its LM head on every position, as transformers' native InternVL does whatever the labels."""
    return sample(model, tiles, args.text_tokens, args.device, labels="all")


def cuda_flops_and_peak_memory(model, fn) -> tuple[int, dict, object]:
    """On a GPU the caching allocator counts: the peak of what one call allocates on top of what was allocated before
    it (shared modules, other models' parts), plus this model's own weights."""
    weights = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flops, result = count_flops(fn)
    torch.cuda.synchronize()
    working = torch.cuda.max_memory_allocated() - before
    return flops, {"peak_bytes": weights + working, "weights_bytes": weights, "working_bytes": working}, result


def profile_call(fn, device: str) -> tuple[dict[str, int], float | None]:
    """One call under torch.profiler: which SDPA kernels ran (aten op names and calls: flash, memory-efficient,
    cuDNN or math on a GPU, the CPU's own fused kernel on a CPU) and, on a GPU, the seconds its kernels kept the
    device busy. Device time against wall time tells a GPU-bound call from one that waits for the host to launch
    kernels (Python, small kernels, host-device synchronisations)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = {event.key.replace("aten::", ""): event.count for event in events
               if "scaled_dot_product" in event.key and event.key != "aten::scaled_dot_product_attention"}
    # the kernels' own time, as the profiler's "Self CUDA time total" counts it (the aten op that launched a kernel
    # carries its time too: summing every event would count each kernel twice)
    device_s = sum(event.self_device_time_total for event in events
                   if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e6 if cuda else None
    return kernels, device_s


@torch.no_grad()
def prefill(model, batch):
    return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], logits_to_keep=1, use_cache=True)


@torch.no_grad()
def decode_step(model, token, cache):
    return model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)


def train_step(model, batch):
    model.train()
    loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                 use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return loss.detach()


def cache_bytes(cache, expand_layer: int | None) -> list[dict]:
    """KV cache size per layer group: layers before / from the LVTC expand layer (all layers for a plain model)."""
    sizes = [(layer.keys.nbytes + layer.values.nbytes, layer.keys.shape[-2]) for layer in cache.layers]
    groups = [(0, len(sizes))] if expand_layer is None else [(0, expand_layer), (expand_layer, len(sizes))]
    return [{"layers": f"{a}-{b - 1}", "tokens_per_layer": sizes[a][1], "bytes": sum(s for s, _ in sizes[a:b])}
            for a, b in groups if b > a]


def expand_layer(model) -> int | None:
    lvtc = getattr(model.config, "lvtc", None)
    return lvtc.expand_layer if lvtc else None


def decode(model, prefill_out, tokens: int, timer, count: bool) -> tuple[int | None, float, object]:
    """Greedy decoding of ``tokens`` tokens from a prefill's cache: FLOPs of the first step (when ``count``), mean
    seconds per token of the timed steps (all of them, or all after the counted one), the final cache."""
    cache, token = prefill_out.past_key_values, prefill_out.logits[:, -1:].argmax(-1)
    flops, steps = None, []
    for index in range(tokens):
        if count and index == 0:
            flops, out = count_flops(lambda: decode_step(model, token, cache))
        else:
            seconds, out = timer(lambda: decode_step(model, token, cache))
            steps.append(seconds)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return flops, sum(steps) / len(steps), cache


def _measure(model, args, fn):
    return (cuda_flops_and_peak_memory if args.device.startswith("cuda") else flops_and_peak_memory)(model, fn)


def run_inference(models: dict, args, timer, dtype, tiles: int = 1) -> dict:
    """Prefill + decode, round-robin over the models; round 0 is the warm-up (FLOPs and memory are taken there)."""
    results = {name: {"prefill_s": [], "decode_s_per_token": [], "tiles": tiles} for name in models}
    batches = {name: bench_sample(model, args, tiles) for name, model in models.items()}
    logits = {}
    progress = tqdm(total=(args.runs + 1) * len(models), desc=f"prefill + decode, {tiles} tile(s)"
                    if "decode" in args.workloads else f"prefill, {tiles} tile(s)", unit="run", file=sys.stderr)
    for round_ in range(args.runs + 1):
        for name, model in models.items():
            progress.set_postfix_str(f"round {round_} {name}")
            batch, result = batches[name], results[name]
            if round_ == 0:
                result["input_ids"] = batch["input_ids"].shape[1]
                result["prefill_attention_kernels"], result["prefill_device_s"] = profile_call(
                    lambda: prefill(model, batch), args.device)
                result["prefill_flops"], result["prefill_memory"], out = _measure(
                    model, args, lambda: prefill(model, batch))
                logits[name] = out.logits[0, -1].float()
            else:
                seconds, out = timer(lambda: prefill(model, batch))
                result["prefill_s"].append(seconds)
            if "decode" not in args.workloads:
                del out
                progress.update()
                continue
            warmup = round_ == 0
            flops, seconds, cache = decode(model, out, args.decode_tokens, timer, count=warmup)
            if warmup:
                result["decode_flops_per_token"] = flops
                result["kv_cache"] = cache_bytes(cache, expand_layer(model))
                result["kv_cache_tokens_decoded"] = args.decode_tokens
            else:
                result["decode_s_per_token"].append(seconds)
            del out, cache
            progress.update()
        LOAD_AFTER_ROUNDS.append((f"inference {tiles} tiles", round_, os.getloadavg()[0]))
    progress.close()
    for pair in (("native-256", "plain-256"), ("native-1024", "plain-1024")):
        if all(name in logits for name in pair):
            results[pair[1]][f"max_logit_diff_vs_{pair[0]}"] = float((logits[pair[0]] - logits[pair[1]]).abs().max())
    return results


def run_training(models: dict, args, timer, dtype, vit: str = "frozen") -> dict:
    """Forward + backward of one sample (``--train-tiles`` tiles), ViT frozen (preset stage2-frozen-vit: projectors
    + LLM learn) or trained too (``vit="full"``, preset stage2); no optimizer step."""
    results = {name: {"train_s": [], "train_vit": vit, "train_tiles": args.train_tiles} for name in models}
    batches = {name: bench_sample(model, args, args.train_tiles) for name, model in models.items()}
    for model in models.values():
        model.model.vision_tower.requires_grad_(vit == "full")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    progress = tqdm(total=(args.runs + 1) * len(models), desc=f"train step, ViT {vit}", unit="run", file=sys.stderr)
    for round_ in range(args.runs + 1):
        for name, model in models.items():
            progress.set_postfix_str(f"round {round_} {name}")
            batch, result = batches[name], results[name]
            if round_ == 0:
                result["train_attention_kernels"], result["train_device_s"] = profile_call(
                    lambda: train_step(model, batch), args.device)
                result["train_flops"], result["train_memory"], _ = _measure(
                    model, args, lambda: train_step(model, batch))
                result["input_ids"] = batch["input_ids"].shape[1]
                result["train_layers"] = model.config.get_text_config().num_hidden_layers
                result["train_expand_layer"] = expand_layer(model)
                result["gradient_checkpointing"] = args.gradient_checkpointing
            else:
                seconds, _ = timer(lambda: train_step(model, batch))
                result["train_s"].append(seconds)
            progress.update()
        LOAD_AFTER_ROUNDS.append((f"train ViT {vit}", round_, os.getloadavg()[0]))
    progress.close()
    return results


def record_profiles(meta: dict, models: dict, args, dtype, workload: str, tiles: int, vit: str | None = None) -> None:
    """`--profile`: profiler tables of lvtc and plain-1024 for one workload, into ``meta["profiles"]``."""
    for name in ("lvtc", "plain-1024"):
        if name in models:
            model = models[name]
            batch = bench_sample(model, args, tiles)
            if workload == "prefill":
                title, call = f"prefill {name}, {tiles} tiles", lambda: prefill(model, batch)
            else:
                title, call = f"train step {name}, ViT {vit}", lambda: train_step(model, batch)
            meta.setdefault("profiles", {})[title] = profile_table(model, call, args.device)


def profile_table(model, fn, device: str, rows: int = 15) -> str:
    """torch.profiler's table of the ops that took the most device (or CPU) time in one call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=rows)


def diagnose(model, args, timer, dtype) -> dict:
    """What FLOPs do not see, measured on the shared LLM: one decoder layer's throughput (GFLOP/s) on the short and
    the long layout's token counts, forward and forward + backward, and the input embedding's backward (its dense
    ``vocab x hidden`` gradient is filled every training step, whatever the token count)."""
    lm = model.model.language_model
    layer, hidden_size = lm.layers[0], lm.config.hidden_size
    short = bench_sample(model, args)["input_ids"].shape[1]
    lengths = {"short": short, "long": short + 3 * model.config.image_seq_length}
    layer.requires_grad_(True)
    runs = {f"{kind}_{n}": [] for kind in ("forward", "train") for n in lengths}
    flops = {}

    def call(n, backward):
        hidden = torch.randn(1, n, hidden_size, device=args.device, dtype=dtype, requires_grad=backward)
        positions = torch.arange(n, device=args.device)[None]
        with torch.set_grad_enabled(backward):
            out = layer(hidden, attention_mask=None, position_ids=positions,
                        position_embeddings=lm.rotary_emb(hidden, position_ids=positions))
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.sum().backward()
                layer.zero_grad(set_to_none=True)

    for round_ in range(args.runs + 1):
        for name, n in lengths.items():
            for kind in ("forward", "train"):
                if round_ == 0:
                    flops[f"{kind}_{name}"], _ = count_flops(lambda: call(n, kind == "train"))
                else:
                    runs[f"{kind}_{name}"].append(timer(lambda: call(n, kind == "train"))[0])
    embedding = lm.get_input_embeddings()
    ids = torch.arange(short, device=args.device)[None]
    embed_s = []
    for round_ in range(args.runs + 1):
        def embed_backward():
            embedding(ids).sum().backward()
            embedding.zero_grad(set_to_none=True)
        seconds, _ = timer(embed_backward)
        if round_:
            embed_s.append(seconds)
    result = {"tokens": lengths, "embedding_backward_s": median(embed_s),
              "embedding_gradient_bytes": embedding.weight.nbytes}
    for key, values in runs.items():
        result[f"layer_{key}_s"] = median(values)
        result[f"layer_{key}_gflops_per_s"] = flops[key] / median(values) / 1e9
    return result


# -------------------------------------------------------------------------------------------------------- report


def rvtc_tokens(max_tiles: int) -> list[dict]:
    settings = TilingSettings(max_tiles=max_tiles)
    rows = []
    for kind, width, height in IMAGE_MIX:
        row = {"image": f"{kind} {width}x{height}", "width": width, "height": height}
        for tiling in ("ratio", "area", "edge"):
            budget = image_budget(width, height, tiling, settings)
            row[tiling] = {"grid": list(budget.grid), "tiles": budget.tiles, "tokens": budget.tokens}
        rows.append(row)
    return rows


def median(values):
    return statistics.median(values) if values else None


def summarize(results: dict) -> dict:
    summary = {}
    for name, result in results.items():
        row = {key: value for key, value in result.items() if not isinstance(value, list) or key == "kv_cache"}
        for key in ("prefill_s", "decode_s_per_token", "train_s"):
            if result.get(key):
                row[key] = median(result[key])
        summary[name] = row
    return summary


def ratios(summary: dict, preset: str) -> dict:
    """The required ratios (issue 14), as measured in this run. The absolute LVTC bars (prefill <= 0.60x plain-1024,
    training speed-up >= 1.6x, <= 1.4x plain-256) are set at InternVL2-2B widths; at other presets the fixed cost of
    the 300M ViT weighs differently against the LLM, so there they are reported without a verdict ("ok": None)."""
    checks = {}
    at_2b = preset == "2b"
    lvtc, p1024, p256 = summary.get("lvtc", {}), summary.get("plain-1024", {}), summary.get("plain-256", {})
    native = summary.get("native-256", {})

    def ratio(a, b, key):
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    def check(name, value, required, ok, flop_ratio=None, applies=True):
        if value is not None:
            checks[name] = {"value": value, "required": required if applies else f"{required} at 2b",
                            "ok": bool(ok(value)) if applies else None, "flop_ratio": flop_ratio}

    for key, what in (("prefill_s", "prefill time"), ("decode_s_per_token", "decode time per token")):
        check(f"plain-256 / native-256 {what}", ratio(p256, native, key), "within 5% (0.95 .. 1.05)",
              lambda v: abs(v - 1) <= 0.05)
    flops = ratio(lvtc, p1024, "prefill_flops")
    time_ratio = ratio(lvtc, p1024, "prefill_s")
    check("lvtc / plain-1024 prefill time", time_ratio, "<= 0.60", lambda v: v <= 0.60, flops, applies=at_2b)
    check("lvtc / plain-1024 prefill time, deviation from the FLOP ratio",
          time_ratio / flops - 1 if time_ratio else None, "within 10%", lambda v: abs(v) <= 0.10)
    check("lvtc / plain-1024 decode time per token", ratio(lvtc, p1024, "decode_s_per_token"), "<= 1.10",
          lambda v: v <= 1.10)
    speedup, predicted = ratio(p1024, lvtc, "train_s"), ratio(p1024, lvtc, "train_flops")
    check("plain-1024 / lvtc train step time (speed-up)", speedup, ">= 1.6", lambda v: v >= 1.6, predicted,
          applies=at_2b)
    check("lvtc train speed-up, deviation from the FLOP prediction", speedup / predicted - 1 if speedup else None,
          "within 5%", lambda v: abs(v) <= 0.05)
    check("lvtc / plain-256 train step time", ratio(lvtc, p256, "train_s"), "<= 1.4", lambda v: v <= 1.4,
          ratio(lvtc, p256, "train_flops"), applies=at_2b)
    return checks


def sweep_checks(sweep: dict, preset: str, device: str) -> dict:
    """The GPU targets (issue 34), per tile count and per ViT mode: LVTC's prefill <= 0.65x plain-1024's and its
    training step >= 1.6x faster, each within 10% of what the FLOP ratio predicts; our plain model within 5% of
    transformers' native InternVL. Judged on a GPU at the 2b and 8b presets; elsewhere reported only."""
    judged = device.startswith("cuda") and preset in ("2b", "8b")
    checks = {}

    def check(name, value, required, ok, flop_ratio=None, applies=judged):
        if value is not None:
            checks[name] = {"value": value, "required": required, "ok": bool(ok(value)) if applies else None,
                            "flop_ratio": flop_ratio}

    def ratio(a, b, key):
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    for tiles, summary in sweep.get("prefill", {}).items():
        p1024, p256, native = summary.get("plain-1024", {}), summary.get("plain-256", {}), summary.get("native-256", {})
        for name in ("lvtc", "lvtc-rms", "pvtc+lvtc"):
            row = summary.get(name, {})
            value, flops = ratio(row, p1024, "prefill_s"), ratio(row, p1024, "prefill_flops")
            check(f"{name} / plain-1024 prefill time, {tiles} tile(s)", value, "<= 0.65", lambda v: v <= 0.65,
                  flops, applies=judged and name == "lvtc")
            if value is not None and name == "lvtc":
                check(f"{name} prefill, {tiles} tile(s): deviation from the FLOP ratio", value / flops - 1,
                      "within 10% (or a profile explains it)", lambda v: abs(v) <= 0.10)
                busy = ratio(row, p1024, "prefill_device_s")
                check(f"{name} prefill, {tiles} tile(s): GPU-busy ratio's deviation from the FLOP ratio",
                      busy / flops - 1 if busy else None, "within 10%", lambda v: abs(v) <= 0.10)
        for key, what in (("prefill_s", "prefill"), ("prefill_device_s", "prefill GPU-busy time"),
                          ("decode_s_per_token", "decode per token")):
            check(f"plain-256 / native-256 {what}, {tiles} tile(s)", ratio(p256, native, key),
                  "within 5% (0.95 .. 1.05)", lambda v: abs(v - 1) <= 0.05)
    for vit, summary in sweep.get("train", {}).items():
        p1024, p256, native = summary.get("plain-1024", {}), summary.get("plain-256", {}), summary.get("native-256", {})
        for name in ("lvtc", "lvtc-rms", "pvtc+lvtc"):
            row = summary.get(name, {})
            speedup, predicted = ratio(p1024, row, "train_s"), ratio(p1024, row, "train_flops")
            check(f"plain-1024 / {name} train step (speed-up), ViT {vit}", speedup, ">= 1.6", lambda v: v >= 1.6,
                  predicted, applies=judged and name == "lvtc")
            if speedup is not None and name == "lvtc":
                check(f"{name} train speed-up, ViT {vit}: deviation from the FLOP prediction",
                      speedup / predicted - 1, "within 10% (or a profile explains it)", lambda v: abs(v) <= 0.10)
                busy = ratio(p1024, row, "train_device_s")
                check(f"{name} train speed-up in GPU-busy time, ViT {vit}: deviation from the FLOP prediction",
                      busy / predicted - 1 if busy else None, "within 10%", lambda v: abs(v) <= 0.10)
        check(f"plain-256 / native-256 train step, ViT {vit}", ratio(p256, native, "train_s"),
              "within 5% (0.95 .. 1.05)", lambda v: abs(v - 1) <= 0.05)
        check(f"plain-256 / native-256 train step GPU-busy time, ViT {vit}", ratio(p256, native, "train_device_s"),
              "within 5% (0.95 .. 1.05)", lambda v: abs(v - 1) <= 0.05)
    return checks


def _kernels(row: dict, key: str) -> str:
    kernels = row.get(key) or {}
    return ", ".join(f"{name.replace('_scaled_dot_product_', '')} x{count}" for name, count in kernels.items()) or "-"


def _versus(row: dict, ref: dict, what: str) -> str:
    if not (row.get(f"{what}_s") and ref.get(f"{what}_s")):
        return "-"
    busy = (f"{row[f'{what}_device_s'] / ref[f'{what}_device_s']:.3f}, "
            if row.get(f"{what}_device_s") and ref.get(f"{what}_device_s") else "")
    return (f"{row[f'{what}_s'] / ref[f'{what}_s']:.3f}, {busy}"
            f"({row[f'{what}_flops'] / ref[f'{what}_flops']:.3f})")


def sweep_markdown(sweep: dict, meta: dict) -> str:
    """Prefill / decode per tile count and training steps per ViT mode: times, throughput, memory, SDPA kernels."""
    mib = 1 / 2**20
    lines = []
    for tiles, summary in sweep.get("prefill", {}).items():
        ref = summary.get("plain-1024", {})
        lines += ["", f"Prefill and decoding, one image of {tiles} tile(s) + {meta['text_tokens']} text tokens, "
                  f"batch 1 ({meta['dtype']}, {meta['attn']}, SDPA backend {meta['sdpa_backend']}):", "",
                  "| model | input ids | prefill ms | GPU busy ms | prefill tokens/s | vs plain-1024: time, GPU busy "
                  "(FLOPs) | decode ms/token | prefill peak MiB | attention kernels (prefill) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in summary.items():
            vs = _versus(row, ref, "prefill")
            rate = row["input_ids"] / row["prefill_s"] if row.get("prefill_s") else None
            lines.append(f"| {name} | {row.get('input_ids', '-')} | {_fmt(row.get('prefill_s'), 1e3, 1)} | "
                         f"{_fmt(row.get('prefill_device_s'), 1e3, 1)} | {_fmt(rate, 1, 0)} | {vs} | "
                         f"{_fmt(row.get('decode_s_per_token'), 1e3, 2)} | "
                         f"{_fmt(row.get('prefill_memory', {}).get('peak_bytes'), mib, 0)} | "
                         f"{_kernels(row, 'prefill_attention_kernels')} |")
    for vit, summary in sweep.get("train", {}).items():
        ref = summary.get("plain-1024", {})
        first = next(iter(summary.values()), {})
        lines += ["", f"Training step (forward + backward, no optimizer), one sample of {first.get('train_tiles')} "
                  f"tile(s), ViT {vit}, gradient checkpointing {'on' if first.get('gradient_checkpointing') else 'off'}"
                  f", {first.get('train_layers')}-layer LLM:", "",
                  "| model | input ids | step ms | GPU busy ms | samples/s | tokens/s | vs plain-1024: time, GPU busy "
                  "(FLOPs) | peak MiB | attention kernels (step) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in summary.items():
            vs = _versus(row, ref, "train")
            samples = 1 / row["train_s"] if row.get("train_s") else None
            tokens = row["input_ids"] / row["train_s"] if row.get("train_s") else None
            lines.append(f"| {name} | {row.get('input_ids', '-')} | {_fmt(row.get('train_s'), 1e3, 1)} | "
                         f"{_fmt(row.get('train_device_s'), 1e3, 1)} | {_fmt(samples, 1, 2)} | "
                         f"{_fmt(tokens, 1, 0)} | {vs} | "
                         f"{_fmt(row.get('train_memory', {}).get('peak_bytes'), mib, 0)} | "
                         f"{_kernels(row, 'train_attention_kernels')} |")
    return "\n".join(lines)


def _fmt(value, scale=1.0, digits=3):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown(summary: dict, meta: dict) -> str:
    ref = summary.get("plain-1024", {})
    lines = [
        f"preset={meta['preset']} device={meta['device']} dtype={meta['dtype']} attn={meta['attn']} "
        f"threads={meta['threads']} runs={meta['runs']} text_tokens={meta['text_tokens']} "
        f"decode_tokens={meta['decode_tokens']} train_layers={meta['train_layers']} "
        f"torch={meta['torch']} transformers={meta['transformers']} {meta['date']}",
        "",
        "| model | input ids | prefill GFLOPs | prefill s | vs plain-1024 (FLOPs) | decode ms/token | "
        "train GFLOPs | train s | vs plain-1024 (FLOPs) | prefill peak MiB (working) | train peak MiB (working) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1 / 2**20
    for name, row in summary.items():
        vs_prefill = vs_train = "-"
        if row.get("prefill_s") and ref.get("prefill_s"):
            vs_prefill = (f"{row['prefill_s'] / ref['prefill_s']:.3f} "
                          f"({row['prefill_flops'] / ref['prefill_flops']:.3f})")
        if row.get("train_s") and ref.get("train_s"):
            vs_train = f"{row['train_s'] / ref['train_s']:.3f} ({row['train_flops'] / ref['train_flops']:.3f})"
        pm, tm = row.get("prefill_memory", {}), row.get("train_memory", {})
        lines.append(
            f"| {name} | {row.get('input_ids', '-')} | {_fmt(row.get('prefill_flops'), 1e-9, 1)} | "
            f"{_fmt(row.get('prefill_s'))} | {vs_prefill} | {_fmt(row.get('decode_s_per_token'), 1e3, 1)} | "
            f"{_fmt(row.get('train_flops'), 1e-9, 1)} | {_fmt(row.get('train_s'))} | {vs_train} | "
            f"{_fmt(pm.get('peak_bytes'), mib, 0)} ({_fmt(pm.get('working_bytes'), mib, 0)}) | "
            f"{_fmt(tm.get('peak_bytes'), mib, 0)} ({_fmt(tm.get('working_bytes'), mib, 0)}) |"
        )
    caches = [(name, row["kv_cache"]) for name, row in summary.items() if row.get("kv_cache")]
    if caches:
        lines += ["", f"KV cache after the prefill and {meta['decode_tokens']} decoded tokens, per layer group:"]
        for name, groups in caches:
            parts = [f"layers {g['layers']}: {g['bytes'] * mib:.1f} MiB ({g['tokens_per_layer']} tokens each)"
                     for g in groups]
            lines.append(f"- {name}: " + "; ".join(parts))
    diffs = [(name, key, value) for name, row in summary.items() for key, value in row.items()
             if key.startswith("max_logit_diff")]
    for name, key, value in diffs:
        lines.append(f"- {name}: {key.replace('_', ' ')} = {value:.2e} (same weights, same computation)")
    return "\n".join(lines)


def rvtc_markdown(rows: list[dict], max_tiles: int) -> str:
    lines = [f"RVTC: tiles (thumbnail included) and <IMG_CONTEXT> tokens per image, max_tiles={max_tiles}, "
             "256 tokens per tile (LVTC: x4 from layer k on)", "",
             "| image | ratio | area | edge |", "|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[t]['grid'][0]}x{row[t]['grid'][1]} -> {row[t]['tiles']} tiles, {row[t]['tokens']} tokens"
                 for t in ("ratio", "area", "edge")]
        lines.append(f"| {row['image']} | " + " | ".join(cells) + " |")
    means = [statistics.mean(row[t]["tokens"] for row in rows) for t in ("ratio", "area", "edge")]
    lines.append("| mean | " + " | ".join(f"{m:.0f} tokens" for m in means) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, meta: dict) -> None:
    from internvlx_hf.bench.harness import figure

    ref = summary["plain-1024"]
    panels = [(key, flops, title) for key, flops, title in (
        ("prefill_s", "prefill_flops", "prefill"), ("decode_s_per_token", "decode_flops_per_token", "decode / token"),
        ("train_s", "train_flops", "training step")) if ref.get(key)]
    with figure(path, 1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, dpi=100) as (fig, axes):
        for ax, (key, flops, title) in zip(axes[0], panels):
            names = [name for name, row in summary.items() if row.get(key)]
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], [summary[n][key] / ref[key] for n in names], 0.4, label="time")
            ax.bar([i + 0.2 for i in x], [summary[n][flops] / ref[flops] for n in names], 0.4, label="FLOPs")
            ax.set_xticks(list(x), names, rotation=45, ha="right")
            ax.set_title(f"{title} (relative to plain-1024)")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend()
        fig.suptitle(f"{meta['preset']} on {meta['device']} ({meta['dtype']}, {meta['threads']} threads), "
                     f"{meta['date']}")


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--workloads", default="prefill,decode,train",
                        help="comma-separated subset of prefill, decode, train (decode needs prefill)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after the warm-up round (default 3)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--tiles", default="1",
                        help="comma-separated tile counts of the prefill/decode input (e.g. 1,6,12; default 1); the "
                             "first also fills the main table")
    parser.add_argument("--train-tiles", type=int, default=1, help="tiles of the training-step sample (default 1)")
    parser.add_argument("--train-vit", default="frozen",
                        help="comma-separated: frozen (preset stage2-frozen-vit), full (preset stage2: the ViT "
                             "trains too); the first also fills the main table (default frozen)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="training step with activation checkpointing (non-reentrant), as "
                             "--activation_checkpointing")
    parser.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                        help="force one SDPA kernel for every call (torch.nn.attention.sdpa_kernel); auto: torch "
                             "chooses. The kernels that ran are recorded either way")
    parser.add_argument("--profile", action="store_true",
                        help="also record torch.profiler tables of lvtc and plain-1024 (prefill at the largest tile "
                             "count, the training step)")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--train-layers", type=int, default=None,
                        help="LLM depth of the training-step models (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="attention backend for the timed runs (default sdpa)")
    parser.add_argument("--max-tiles", type=int, default=6, help="RVTC table: tile budget (paper Sec. 4.4: 6)")
    parser.add_argument("--rvtc-only", action="store_true", help="print the RVTC token table and stop")
    parser.add_argument("--diagnose", action="store_true",
                        help="with train: also time one decoder layer on the short and long token counts and the "
                             "embedding's backward (what FLOPs do not predict)")
    parser.add_argument("--json", type=Path, help="write every number and setting to this JSON file")
    parser.add_argument("--plot", type=Path, help="save a PNG of times and FLOPs relative to plain-1024")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.tiles = [int(t) for t in args.tiles.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--tiles takes comma-separated integers, got {args.tiles!r}")
    if not args.tiles or min(args.tiles) < 1 or args.train_tiles < 1:
        parser.error("--tiles and --train-tiles must be >= 1")
    args.train_vit = [v.strip() for v in args.train_vit.split(",") if v.strip()]
    if not args.train_vit or set(args.train_vit) - {"frozen", "full"}:
        parser.error(f"--train-vit takes frozen and/or full, got {args.train_vit}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(args.models) - set(MODELS)) + sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown model(s)/workload(s) {unknown}; models: {', '.join(MODELS)}; "
                     f"workloads: {', '.join(WORKLOADS)}")
    if "decode" in args.workloads and "prefill" not in args.workloads:
        parser.error("--workloads decode needs prefill too (decoding continues each prefill's cache)")
    if args.preset == "8b" and not args.device.startswith("cuda"):
        parser.error("--preset 8b runs on a GPU only (--device cuda): its float32 weights alone take ~34 GB")
    if args.runs < 1 or args.decode_tokens < 2 or args.text_tokens < 9:
        parser.error("--runs must be >= 1, --decode-tokens >= 2 and --text-tokens >= 9")
    if args.plot is not None and "plain-1024" not in args.models:
        parser.error("--plot draws everything relative to plain-1024: include it in --models")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rvtc = rvtc_tokens(args.max_tiles)
    print(rvtc_markdown(rvtc, args.max_tiles))
    if args.rvtc_only:
        return {"rvtc": rvtc}
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    timer = functools.partial(timed, device=args.device)
    meta = dict(preset=args.preset, device=args.device, dtype=args.dtype, attn=args.attn,
                threads=torch.get_num_threads(), runs=args.runs, text_tokens=args.text_tokens,
                decode_tokens=args.decode_tokens, train_layers=args.train_layers, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(), cpu=platform.processor() or platform.machine(),
                load_average_start=os.getloadavg(), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    meta.update(sdpa_backend=args.sdpa_backend, tiles=args.tiles, train_tiles=args.train_tiles,
                train_vit=args.train_vit, gradient_checkpointing=args.gradient_checkpointing)
    results = {name: {} for name in args.models}
    sweep: dict[str, dict] = {"prefill": {}, "train": {}}

    def keep(workload: str, setting, measured: dict, first: bool) -> None:
        """A setting's results go to the sweep; the first setting's also fill the main table."""
        sweep[workload][setting] = summarize(measured)
        if first:
            for name, result in measured.items():
                results[name].update(result)

    backend = (contextlib.nullcontext() if args.sdpa_backend == "auto"
               else sdpa_kernel([SDPA_BACKENDS[args.sdpa_backend]]))
    with backend:
        models = None
        if "prefill" in args.workloads:
            models = build_models(args.preset, args.models, None, args.device, dtype, args.attn)
            for tiles in args.tiles:
                keep("prefill", tiles, run_inference(models, args, timer, dtype, tiles), tiles == args.tiles[0])
            if args.profile:
                record_profiles(meta, models, args, dtype, "prefill", max(args.tiles))
            if "train" in args.workloads and args.train_layers is not None:
                del models
                models = None
        if "train" in args.workloads:
            if models is None:
                models = build_models(args.preset, args.models, args.train_layers, args.device, dtype, args.attn)
            for vit in args.train_vit:
                keep("train", vit, run_training(models, args, timer, dtype, vit), vit == args.train_vit[0])
                if args.profile:
                    record_profiles(meta, models, args, dtype, "train", args.train_tiles, vit)
            if args.diagnose:
                meta["diagnosis"] = diagnose(next(iter(models.values())), args, timer, dtype)
        del models
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    meta["load_average_end"] = os.getloadavg()
    meta["load_average_after_rounds"] = LOAD_AFTER_ROUNDS
    summary = summarize(results)
    checks = ratios(summary, args.preset)
    checks.update(sweep_checks(sweep, args.preset, args.device))
    print()
    print(markdown(summary, meta))
    if len(args.tiles) > 1 or len(args.train_vit) > 1 or args.device.startswith("cuda"):
        print(sweep_markdown(sweep, meta))
    for title, table in meta.get("profiles", {}).items():
        print(f"\nprofile: {title}\n{table}")
    if "diagnosis" in meta:
        d = meta["diagnosis"]
        print(f"\ndiagnosis (one decoder layer of the train-step LLM; {d['tokens']} tokens):")
        for kind in ("forward", "train"):
            print(f"- {kind}: " + "; ".join(
                f"{name} {d['tokens'][name]} tokens {d[f'layer_{kind}_{name}_s']:.3f} s = "
                f"{d[f'layer_{kind}_{name}_gflops_per_s']:.1f} GFLOP/s" for name in ("short", "long")))
        print(f"- embedding backward (dense {d['embedding_gradient_bytes'] / 2**20:.0f} MiB gradient, every step, "
              f"any token count): {d['embedding_backward_s']:.3f} s")
    if checks:
        print()
        for name, check in checks.items():
            extra = f" (FLOPs predict {check['flop_ratio']:.3f})" if check.get("flop_ratio") else ""
            verdict = {True: "met", False: "NOT met", None: "not judged here"}[check["ok"]]
            print(f"{name}: {check['value']:.3f}{extra}; required {check['required']}: {verdict}")
    data = {"meta": meta, "results": results, "summary": summary, "sweep": sweep, "checks": checks, "rvtc": rvtc}
    if args.json:
        write_text(args.json, json.dumps(data, indent=1) + "\n")
    if args.plot:
        plot(summary, args.plot, meta)
    return data


if __name__ == "__main__":
    main()
