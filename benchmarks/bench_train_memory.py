"""Training-step memory with the LM head on every position (before) and on the labelled positions only (after).

One training step (forward + backward, no optimizer step) of one sample: a 32-token prompt, one image of
``--tiles`` 448px tiles, a 16-token question and an ``--answer-tokens`` answer, the only labelled tokens (as
`InternVLXDataCollator` labels a reply). The model has InternVL2-2B or InternVL2-8B widths with their real
vocabularies (random weights, bfloat16), gradient (activation) checkpointing on, the ViT frozen (as preset
stage2-frozen-vit) or trained (stage2):

  before   `model(..., labels=labels, skip_logits=False)`: the logits of every position, upcast to float32 by the
           loss (what the model's forward did by default before issue 51)
  after    `model(..., labels=labels, skip_logits=True)`: the LM head on the labelled positions only (what
           `InternVLXTrainer` and `internvlx train` ask for)
  trainer  a plain `transformers.Trainer`'s `training_step` on the batch with no option: the model's own default
           (``skip_logits=None``: lean in training with labels), as TRL, ms-swift, LLaMA-Factory and hand-written
           loops get it

Families: ``2b`` (InternViT-300M + InternLM2-1.8B widths: hidden 2048, 24 layers, vocabulary 92,553), ``8b``
(InternViT-300M + InternLM2.5-7B: hidden 4096, 32 layers, 92,553), ``2b-qwen2-vocab`` (``2b`` with Qwen2's
151,655-entry vocabulary, InternVL2-1B's / InternVL2.5-1B's LLM vocabulary), ``tiny`` (seconds, for trying it).
Layouts: ``plain-256`` (256 tokens per tile), ``plain-1024`` (1024), ``lvtc`` (256 -> 1024 from layer k = 3/4 of
the depth; its LM head reads the short layout).

How memory is measured. Every configuration runs in a fresh subprocess (glibc told to serve every block above
64 KiB by mmap, ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave the resident set at once):

  tensor peak   the peak of the bytes of tensor storages allocated during the step and alive at once (a
                TorchDispatchMode that follows every storage an op creates until it is freed: activations,
                gradients, temporaries; not the weights, which exist before the step) - what
                ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step counts on a GPU
  RSS peak      the process's peak resident set during the step (``VmHWM`` of /proc/self/status, reset just before
                the step by writing 5 to /proc/self/clear_refs) minus the resident set before it

On a CPU (`--device cpu`) the model keeps ``--llm-layers`` LLM layers and ``--vit-layers`` ViT layers (widths and
vocabularies stay real), and with ``--arithmetic skip`` the matrix products, convolutions and SDPA attention are
not computed: each such op's output is allocated at the shape, strides and dtype torch's meta kernel gives and
filled with zeros, so the step allocates, keeps and frees the same tensors as when it computes, minus the hours
bfloat16 products take on a CPU without bfloat16 instructions. ``--arithmetic real`` computes them: the step-time
study (`benchmarks/results/train-steptime.json`, float32, whose products a CPU computes at speed) compares the two
on the same configurations and times the steps. A step with a predicted peak above ``--max-gib`` is not run on a CPU
(recorded as skipped with the prediction).

From these runs the report derives, per family / layout / tiles / ViT mode and path, the memory one more sample
adds at the model's full depth (`per_sample_full`):

  per sample at the measured depth   the batch-1 step's activation peak (the tensor peak with the parameters'
                                     gradients left out), each path; where the step with every logit exceeds
                                     ``--max-gib``, before = after + the bytes per extra logit entry measured on the
                                     runs that fit (median per family and plain / LVTC) x its extra logit entries.
                                     The 6-tile runs at batch 2 check that this is per sample (2x batch 1's)
  per extra LLM layer                activation peak with one layer more minus the step's, ViT frozen (LVTC: one
                                     short layer and one long layer more, separately)
  per extra ViT layer (ViT trained)  the same with one ViT layer more

and the largest batch that fits a budget: floor((budget - ``--reserve-gib`` - model states) / per sample at full
depth), with model states = bfloat16 weights (2 bytes per parameter) + bfloat16 gradients and AdamW moments of the
trained parameters (2 + 4 bytes: torch's AdamW keeps its moments in the parameters' dtype, as for ``internvlx train
--model_dtype bfloat16``), counted from the full-depth configuration.

On a GPU (`--device cuda`, real arithmetic, full depth by default) the same steps are measured directly with
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_train_memory.py --families tiny --tiles 1 --arithmetic real      # a quick try
    python benchmarks/bench_train_memory.py --json benchmarks/results/train-memory.json \\
        --plot benchmarks/results/train-memory.png --markdown benchmarks/results/train-memory.md    # the CPU study
    python benchmarks/bench_train_memory.py --device cuda --families 2b,8b --json gpu-train-memory.json  # a GPU

Step time (``--arithmetic real``, float32): the measured step before and after, and the full depth's estimated from
one more LLM layer and one more ViT layer (see `step_times`); the study's runs, one thread each:

    S="python benchmarks/bench_train_memory.py --vit frozen --dtype float32 --threads 1 --no-derive --max-gib 16 \\
       --json benchmarks/results/train-steptime.json"
    P="--families 2b --layouts plain-1024,plain-256 --tiles 1,6"; B="--families 8b --layouts plain-1024 --tiles 1,6"
    $S $P --arithmetic real; $S $P --arithmetic real --llm-layers 2 --paths after
    $S $P --arithmetic real --vit-layers 2 --paths after; $S $P --arithmetic skip
    L="--families 2b --layouts lvtc --tiles 6"; $S $L --arithmetic real; $S $L --arithmetic skip
    $S $B --arithmetic real; $S $B --arithmetic real --llm-layers 2 --paths after
    $S $B --arithmetic real --vit-layers 2 --paths after; $S $B --arithmetic skip \\
       --markdown benchmarks/results/train-steptime.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = ("2b", "8b", "2b-qwen2-vocab", "tiny")
LAYOUTS = ("plain-256", "plain-1024", "lvtc")
PATHS = ("before", "after", "trainer")
GiB = 2**30

_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_INTERNLM2_1_8B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=92553, rope_theta=1000000.0)
SPECS = {
    "2b": dict(vision=_INTERNVIT_300M, text=_INTERNLM2_1_8B,
               name="InternVL2-2B widths (InternLM2 vocabulary, 92,553)"),
    "8b": dict(vision=_INTERNVIT_300M,
               text=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=92553, rope_theta=1000000.0),
               name="InternVL2-8B widths (InternLM2 vocabulary, 92,553)"),
    "2b-qwen2-vocab": dict(vision=_INTERNVIT_300M, text={**_INTERNLM2_1_8B, "vocab_size": 151655},
                           name="InternVL2-2B widths with Qwen2's vocabulary (151,655)"),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
                 name="tiny"),
}
PROMPT_TOKENS, QUESTION_TOKENS = 32, 16


# ------------------------------------------------------------------------------------------------ configurations


def full_depth(family: str) -> tuple[int, int]:
    """(LLM layers, ViT layers) of the real model."""
    spec = SPECS[family]
    return spec["text"]["num_hidden_layers"], spec["vision"]["num_hidden_layers"]


def build_config(run: dict):
    """The InternVLXConfig of one run: its family's widths, its layout, its depths."""
    from internvlx_hf import InternVLXConfig

    spec = SPECS[run["family"]]
    text = {**spec["text"], "num_hidden_layers": run["llm_layers"]}
    vision = {**spec["vision"], "num_hidden_layers": run["vit_layers"]}
    if run["family"] == "tiny":
        vision.update(image_size=448, patch_size=14)
    common = dict(vision_config=vision, text_config=text, image_token_id=text["vocab_size"] - 7,
                  attn_implementation="sdpa")
    if run["layout"] == "plain-1024":
        return InternVLXConfig(**common, downsample_ratio=1.0)
    if run["layout"] == "lvtc":
        return InternVLXConfig(**common, lvtc={"expand_layer": run["expand_layer"]})
    return InternVLXConfig(**common)


def sample_shape(run: dict) -> dict:
    """Positions (the LM head's rows before) and labelled positions (after) of one sample."""
    per_tile = 1024 if run["layout"] == "plain-1024" else 256
    positions = 1 + PROMPT_TOKENS + per_tile * run["tiles"] + QUESTION_TOKENS + run["answer_tokens"]
    return {"positions": positions, "labelled": run["answer_tokens"]}


def parameter_counts(run: dict) -> dict:
    """Parameters of a run's model (meta device, nothing allocated): all, trained (ViT frozen or not), per LLM layer
    and per ViT layer."""
    import torch

    from internvlx_hf import InternVLXForConditionalGeneration

    with torch.device("meta"):
        model = InternVLXForConditionalGeneration(build_config(run))
    total = sum(p.numel() for p in model.parameters())
    vit = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    vit_layer = sum(p.numel() for p in model.model.vision_tower.encoder.layer[0].parameters())
    return {"total": total, "trained": total - (vit if run["vit"] == "frozen" else 0), "llm_layer": llm_layer,
            "vit_layer": vit_layer}


def predicted_peak(run: dict, counts: dict) -> float:
    """A generous prediction of the process's peak (bytes) to keep the CPU runs within --max-gib: the interpreter
    and libraries, the weights, their gradients, 12 bytes per logit entry the LM head computes (11-12 were measured
    at 2b widths: bfloat16 logits, float32 log-probabilities and their gradient), and ~60 bytes per position and
    hidden unit plus 4 per layer for the rest of the step."""
    shape = sample_shape(run)
    text = SPECS[run["family"]]["text"]
    rows = shape["positions"] if run["path"] == "before" else shape["labelled"]
    per_sample = 12 * rows * text["vocab_size"] + 60 * shape["positions"] * text["hidden_size"] \
        + 4 * shape["positions"] * text["hidden_size"] * run["llm_layers"]
    return 2 * counts["total"] + 2 * counts["trained"] + run["batch"] * per_sample + 0.6 * GiB


# -------------------------------------------------------------------------------------------------- the worker


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _dispatch_modes():
    """TorchDispatchModes of the worker (defined here so that the parent process needs no torch import)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import PeakMemory

    class PeakTensors(PeakMemory):
        """bench_models' `PeakMemory` (the peak bytes of the storages allocated while the mode is on and alive at
        once), with every allocation and free logged, so that `peak_without` can replay the step without some
        storages (the parameters' gradients)."""

        def __init__(self):
            super().__init__()
            self._ids, self.events = {}, []

        def _allocated(self, key, nbytes):
            super()._allocated(key, nbytes)
            self._ids[key] = len(self.events)
            self.events.append((nbytes, len(self.events)))

        def _free(self, key):
            size = self._sizes.get(key, 0)
            super()._free(key)
            if key in self._ids:
                self.events.append((-size, self._ids.pop(key)))

        def peak_without(self, keys) -> int:
            """The peak with the storages alive now at data pointers ``keys`` left out all along."""
            left_out = {self._ids[key] for key in keys if key in self._ids}
            live = peak = 0
            for delta, ident in self.events:
                if ident not in left_out:
                    live += delta
                    peak = max(peak, live)
            return peak

    aten = torch.ops.aten
    skipped_ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                   aten.convolution.default, aten.convolution_backward.default,
                   aten._scaled_dot_product_flash_attention_for_cpu.default,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward.default}

    class SkipArithmetic(TorchDispatchMode):
        """Matrix products, convolutions and SDPA attention return zero-filled tensors of the shape, strides and
        dtype their meta kernels give, without computing them; every other op runs as usual."""

        def __init__(self):
            super().__init__()
            self.skipped = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in skipped_ops:
                return func(*args, **kwargs)
            self.skipped += 1

            def to_meta(value):
                if isinstance(value, torch.Tensor):
                    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
                return value

            meta = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
            device = next(t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor))
            return tree_map(lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device).zero_()
                            if isinstance(m, torch.Tensor) else m, meta)

    return PeakTensors, SkipArithmetic


def worker(run: dict) -> dict:
    """One training step of one configuration, in this (fresh) process."""
    import contextlib

    import torch

    from internvlx_hf import InternVLXForConditionalGeneration

    torch.set_num_threads(run["threads"])
    device, dtype = torch.device(run["device"]), getattr(torch, run["dtype"])
    cuda = device.type == "cuda"
    config = build_config(run)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLXForConditionalGeneration._from_config(config, dtype=dtype)
    model.train()
    model.model.vision_tower.requires_grad_(run["vit"] == "full")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    shape = sample_shape(run)
    g = torch.Generator().manual_seed(0)
    per_tile = config.image_seq_length
    text = lambda n: torch.randint(3, 900, (n,), generator=g)  # noqa: E731
    ids = torch.cat([torch.tensor([1]), text(PROMPT_TOKENS), torch.full((per_tile * run["tiles"],),
                     config.image_token_id), text(QUESTION_TOKENS), text(run["answer_tokens"])])
    assert ids.numel() == shape["positions"]
    labels = torch.full_like(ids, -100)
    labels[-run["answer_tokens"]:] = ids[-run["answer_tokens"]:]
    pixel_values = torch.randn(run["tiles"], 3, 448, 448, generator=g)
    batch = {"input_ids": ids.repeat(run["batch"], 1).to(device), "labels": labels.repeat(run["batch"], 1).to(device),
             "pixel_values": pixel_values.repeat(run["batch"], 1, 1, 1).to(device, dtype), "use_cache": False}
    if run["path"] in ("before", "after"):
        batch["skip_logits"] = run["path"] == "after"
    weights = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    gradients = sum(p.nbytes for p in model.parameters() if p.requires_grad)

    PeakTensors, SkipArithmetic = _dispatch_modes()

    trainer = None
    if run["path"] == "trainer":
        import tempfile

        from transformers import Trainer, TrainingArguments

        folder = tempfile.mkdtemp(prefix="bench-train-memory-")
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=folder, use_cpu=not cuda, report_to="none",
                                                              save_strategy="no"))
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step
        batch.pop("use_cache")  # as a collator's batch

    def step():
        model.zero_grad(set_to_none=True)
        if trainer is not None:
            loss = trainer.training_step(model, dict(batch))  # forward + backward, as Trainer.train() runs them
        else:
            loss = model(**batch).loss
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return loss

    tracker = PeakTensors()
    skip = SkipArithmetic() if run["arithmetic"] == "skip" else None
    gc.collect()
    rss = not cuda and run.get("measure_rss", True)  # resetting the peak RSS resets the process's ru_maxrss too
    rss_before = _status_bytes("VmRSS") if rss else None
    rss_reset = _reset_peak_rss() if rss else False
    with contextlib.ExitStack() as stack:
        stack.enter_context(tracker)
        if skip is not None:
            stack.enter_context(skip)
        begin = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - begin
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    result = {**run, **shape, "loss": float(loss.detach().float()), "weights_bytes": weights,
              "gradient_bytes": gradients, "skipped_ops": skip.skipped if skip else 0,
              "tensor_peak_bytes": tracker.peak, "activation_peak_bytes": tracker.peak_without(grads)}
    if cuda:  # a second step, untracked: its time and the caching allocator's count
        del loss
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
        begin = time.perf_counter()
        step()
        result["step_s"] = time.perf_counter() - begin
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - allocated_before
        result["measured_by"] = ("tensor storages alive at once (TorchDispatchMode), with and without the gradients; "
                                 "torch.cuda.max_memory_allocated - memory_allocated before a second, untracked step")
    else:
        result["step_s"] = seconds
        result["rss_before_bytes"] = rss_before
        if rss_reset:
            result["rss_peak_bytes"] = _status_bytes("VmHWM") - rss_before
        result["measured_by"] = ("tensor storages alive at once (TorchDispatchMode), with and without the gradients; "
                                 "VmHWM - VmRSS before the step")
    return result


# -------------------------------------------------------------------------------------------------- the parent


run_key_fields = ("family", "layout", "tiles", "vit", "path", "llm_layers", "expand_layer", "vit_layers", "batch",
                  "arithmetic", "device", "dtype", "answer_tokens")


def run_key(run: dict) -> tuple:
    return tuple(run[k] for k in run_key_fields)


def base_depth(family: str, layout: str, args) -> tuple[int, int, int | None]:
    """(LLM layers, ViT layers, LVTC expand layer) a configuration is measured at: the real depth on a GPU (or with
    ``--llm-layers 0``), else the reduced one (LVTC: at least 2 layers, the last one long)."""
    full_llm, full_vit = full_depth(family)
    if args.device == "cuda" or not args.llm_layers:
        return full_llm, full_vit, full_llm * 3 // 4 if layout == "lvtc" else None
    llm = max(args.llm_layers, 2) if layout == "lvtc" else args.llm_layers
    return llm, args.vit_layers, llm - 1 if layout == "lvtc" else None


def plan_runs(args) -> list[dict]:
    """The runs of the study: every configuration at batch 1 on both paths; at batch 2 after (per-sample memory);
    one LLM layer more (LVTC: a short and a long one) and, ViT trained, one ViT layer more (per-layer memory; the
    Qwen2-vocabulary family shares the 2b trunk, so it takes 2b's)."""
    cuda = args.device == "cuda"
    runs = []
    for family in args.families:
        for layout in args.layouts:
            for tiles in args.tiles:
                for vit in args.vit:
                    llm, vit_layers, expand = base_depth(family, layout, args)
                    base = dict(family=family, layout=layout, tiles=tiles, vit=vit, path="after", llm_layers=llm,
                                expand_layer=expand, vit_layers=vit_layers, batch=1, arithmetic=args.arithmetic,
                                device=args.device, dtype=args.dtype, answer_tokens=args.answer_tokens,
                                threads=args.threads)
                    for path in args.paths:
                        runs.append({**base, "path": path})
                    if cuda or not args.derive:
                        continue
                    if tiles == 6:  # per-sample memory is linear in the batch: checked once per configuration
                        runs.append({**base, "batch": 2})
                    if family == "2b-qwen2-vocab":
                        continue
                    if layout == "lvtc":
                        runs.append({**base, "llm_layers": llm + 1, "expand_layer": base["expand_layer"] + 1})
                        runs.append({**base, "llm_layers": llm + 1})
                    else:
                        runs.append({**base, "llm_layers": llm + 1})
                    if vit == "full":
                        runs.append({**base, "vit_layers": vit_layers + 1})
    return runs


def run_one(run: dict, args, counts: dict) -> dict:
    if run["device"] == "cpu":
        predicted = predicted_peak(run, counts)
        if predicted > args.max_gib * GiB:
            return {**run, **sample_shape(run), "skipped": f"predicted peak {predicted / GiB:.1f} GiB > --max-gib "
                                                           f"{args.max_gib} (not run on this machine)",
                    "predicted_peak_bytes": predicted}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(run["threads"]),
           "PYTHONUNBUFFERED": "1"}
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(run)], env=env, capture_output=True,
                          text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {**run, **sample_shape(run), "failed": proc.stderr[-2000:], "returncode": proc.returncode}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - begin
    result["load_average_after"] = os.getloadavg()[0]
    return result


def _find(results, **match):
    for r in results:
        if all(r.get(k) == v for k, v in match.items()) and "tensor_peak_bytes" in r:
            return r
    return None


def _activation(run):
    return None if run is None else run["activation_peak_bytes"]


def logit_entry_bytes(results: list[dict]) -> dict:
    """Per family and layout kind (plain / lvtc): the activation memory the full logits add per logit entry,
    (before - after) / ((positions - labelled) x vocabulary), median over the batch-1 configurations where both paths
    ran with at least 1,000 positions (below that, the rest of the step still shapes the peak)."""
    ratios = {}
    for c in comparisons(results):
        if c["batch"] != 1 or c["positions"] < 1000:
            continue
        vocab = SPECS[c["family"]]["text"]["vocab_size"]
        entries = (c["positions"] - c["labelled"]) * vocab
        kind = "lvtc" if c["layout"] == "lvtc" else "plain"
        ratios.setdefault((c["family"], kind), []).append(
            (c["activation_before_bytes"] - c["activation_after_bytes"]) / entries)
    return {key: sorted(values)[len(values) // 2] for key, values in ratios.items()}


def derive(results: list[dict], args) -> list[dict]:
    """Per family / layout / tiles / ViT mode: memory per sample at full depth, before and after, and the largest
    batch that fits each budget (see the module docstring)."""
    rows = []
    alpha = logit_entry_bytes(results)
    for base in results:
        if base.get("batch") != 1 or base.get("path") != "after" or "activation_peak_bytes" not in base \
                or (base["arithmetic"], base["device"], base["dtype"], base["answer_tokens"]) != \
                (args.arithmetic, args.device, args.dtype, args.answer_tokens) \
                or (base["llm_layers"], base["vit_layers"], base["expand_layer"]) != \
                base_depth(base["family"], base["layout"], args):
            continue
        family, layout, tiles, vit = base["family"], base["layout"], base["tiles"], base["vit"]
        llm, vit_layers, expand = base["llm_layers"], base["vit_layers"], base["expand_layer"]
        same = dict(family=family, layout=layout, tiles=tiles, vit=vit, arithmetic=base["arithmetic"],
                    device=base["device"], dtype=base["dtype"], answer_tokens=base["answer_tokens"], batch=1)
        vocab = SPECS[family]["text"]["vocab_size"]
        notes = []
        after = base["activation_peak_bytes"]
        before = _activation(_find(results, **same, path="before", llm_layers=llm, vit_layers=vit_layers,
                                   expand_layer=expand))
        before_measured = before is not None
        kind = (family, "lvtc" if layout == "lvtc" else "plain")
        if before is None and kind in alpha:
            before = after + alpha[kind] * (base["positions"] - base["labelled"]) * vocab
            notes.append(f"before extrapolated: after + {alpha[kind]:.2f} bytes per extra logit entry (the median "
                         f"measured on this family's {kind[1]} configurations that fit)")
        # memory per added layer and sample: the trunk's (for the Qwen2 vocabulary, the 2b trunk's)
        # Memory per added layer and sample: an LLM layer's from the ViT-frozen configuration (with the ViT trained,
        # the peak can fall in the ViT's backward, after the LLM's checkpoints are freed, which would hide it), a ViT
        # layer's from the ViT-trained one; adding both phases' growth bounds the full-depth peak from above. The
        # Qwen2-vocabulary family takes the 2b trunk's.
        trunk = dict(same, family="2b" if family == "2b-qwen2-vocab" else family, path="after")
        frozen = dict(trunk, vit="frozen")
        slopes = {}
        at = _activation(_find(results, **frozen, llm_layers=llm, vit_layers=vit_layers, expand_layer=expand))
        if at is not None:
            if layout == "lvtc":
                short = _activation(_find(results, **frozen, llm_layers=llm + 1, vit_layers=vit_layers,
                                          expand_layer=expand + 1))
                long = _activation(_find(results, **frozen, llm_layers=llm + 1, vit_layers=vit_layers,
                                         expand_layer=expand))
                if short is not None and long is not None:
                    slopes.update(short=short - at, long=long - at)
            else:
                deeper = _activation(_find(results, **frozen, llm_layers=llm + 1, vit_layers=vit_layers,
                                           expand_layer=None))
                if deeper is not None:
                    slopes["llm"] = deeper - at
        at = _activation(_find(results, **trunk, llm_layers=llm, vit_layers=vit_layers, expand_layer=expand))
        deeper_vit = _activation(_find(results, **trunk, llm_layers=llm, vit_layers=vit_layers + 1,
                                       expand_layer=expand))
        if vit == "full" and at is not None and deeper_vit is not None:
            slopes["vit"] = deeper_vit - at
        full_llm, full_vit = full_depth(family)
        k = full_llm * 3 // 4
        extra, complete = 0, True
        if (llm, vit_layers) != (full_llm, full_vit):
            if layout == "lvtc" and {"short", "long"} <= set(slopes):
                extra += (k - expand) * slopes["short"] + ((full_llm - k) - (llm - expand)) * slopes["long"]
            elif layout != "lvtc" and "llm" in slopes:
                extra += (full_llm - llm) * slopes["llm"]
            else:
                complete = False
            if "vit" in slopes:
                extra += (full_vit - vit_layers) * slopes["vit"]
            elif vit == "full":
                complete = False
            else:
                notes.append("frozen ViT: no per-layer memory (its activations are not kept)")
        full_counts = parameter_counts({**base, "llm_layers": full_llm, "vit_layers": full_vit,
                                        "expand_layer": k if layout == "lvtc" else None})
        states = 2 * full_counts["total"] + 6 * full_counts["trained"]
        row = {"family": family, "layout": layout, "tiles": tiles, "vit": vit, "positions": base["positions"],
               "labelled": base["labelled"], "vocab": vocab, "measured_llm_layers": llm,
               "measured_vit_layers": vit_layers, "full_llm_layers": full_llm, "full_vit_layers": full_vit,
               "per_layer_bytes": slopes, "per_sample_after_bytes": after, "per_sample_before_bytes": before,
               "before_measured": before_measured,
               "per_sample_full_after_bytes": after + extra if complete else None,
               "per_sample_full_before_bytes": before + extra if complete and before is not None else None,
               "model_states_bytes": states, "parameters": full_counts["total"],
               "trained_parameters": full_counts["trained"], "notes": notes,
               "logits_bf16_bytes": 2 * base["positions"] * vocab}
        for budget in args.budgets_gib:
            room = (budget - args.reserve_gib) * GiB - states
            for path in ("after", "before"):
                per_sample = row[f"per_sample_full_{path}_bytes"]
                row[f"max_batch_{path}_{budget:g}gib"] = None if per_sample is None else \
                    max(0, math.floor(room / per_sample))
        rows.append(row)
    order = {name: i for i, name in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (order[r["family"]], LAYOUTS.index(r["layout"]), r["tiles"], r["vit"]))
    return rows


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def runs_table(results: list[dict]) -> str:
    lines = ["| family | layout | tiles | ViT | path | layers (LLM/ViT) | batch | positions | arithmetic | tensor peak "
             "GiB | RSS peak GiB | step s | loss |", "|" + "---|" * 13]
    for r in results:
        if "tensor_peak_bytes" not in r:
            peak = r.get("skipped") or ("failed" if "failed" in r else "")
            lines.append(f"| {r['family']} | {r['layout']} | {r['tiles']} | {r['vit']} | {r['path']} | "
                         f"{r['llm_layers']}/{r['vit_layers']} | {r['batch']} | {r['positions']} | {r['arithmetic']} "
                         f"| {peak} | | | |")
            continue
        lines.append(f"| {r['family']} | {r['layout']} | {r['tiles']} | {r['vit']} | {r['path']} | "
                     f"{r['llm_layers']}/{r['vit_layers']}{' k=' + str(r['expand_layer']) if r['expand_layer'] else ''}"
                     f" | {r['batch']} | {r['positions']} | {r['arithmetic']} | {_gib(r['tensor_peak_bytes'])} | "
                     f"{_gib(r.get('rss_peak_bytes'))} | {r['step_s']:.1f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def plan_table(rows: list[dict], budgets) -> str:
    head = ["family", "layout", "tiles", "ViT", "positions", "per sample GiB before -> after (measured depth)",
            "per sample GiB at full depth before -> after", "model states GiB"]
    head += [f"largest batch {b:g} GiB before -> after" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["family"], r["layout"], str(r["tiles"]), r["vit"], str(r["positions"]),
                 f"{_gib(r['per_sample_before_bytes'])} -> {_gib(r['per_sample_after_bytes'])}",
                 f"{_gib(r['per_sample_full_before_bytes'])} -> {_gib(r['per_sample_full_after_bytes'])}",
                 _gib(r["model_states_bytes"])]
        for b in budgets:
            before, after = r[f"max_batch_before_{b:g}gib"], r[f"max_batch_after_{b:g}gib"]
            cells.append(f"{'-' if before is None else before} -> {'-' if after is None else after}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "fine-tuning-scale.md"
DOCS_BEGIN = "<!-- planning-table: generated by benchmarks/bench_train_memory.py --docs -->"
DOCS_END = "<!-- /planning-table -->"
DOC_FAMILIES = {"2b": "2B", "8b": "8B", "2b-qwen2-vocab": "2B, Qwen2 vocab"}


def docs_planning_table(rows: list[dict], budgets=(24.0, 80.0), reserve_gib: float = 2.0) -> str:
    """docs/fine-tuning-scale.md's planning table: per sample at full depth and the largest batches, ViT frozen and trained
    side by side; ``*`` marks a "before" estimated from the memory per logit entry (its step was not run)."""
    by_key = {(r["family"], r["layout"], r["tiles"], r["vit"]): r for r in rows}

    def cells(r):
        out = [f"{r['per_sample_full_before_bytes'] / GiB:.2f}{'' if r['before_measured'] else '*'} -> "
               f"{r['per_sample_full_after_bytes'] / GiB:.2f}"]
        for budget in budgets:
            if r["model_states_bytes"] + reserve_gib * GiB > budget * GiB:
                out.append(f"states > {budget:g} GB")
            else:
                out.append(f"{r[f'max_batch_before_{budget:g}gib']} -> {r[f'max_batch_after_{budget:g}gib']}")
        return out

    head = ["model", "layout", "tiles", "positions", "ViT frozen: GiB per sample"]
    head += [f"batch in {b:g} GB" for b in budgets] + ["ViT trained: GiB per sample"]
    head += [f"batch in {b:g} GB" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in DOC_FAMILIES:
        for layout in LAYOUTS:
            for tiles in sorted({r["tiles"] for r in rows}):
                frozen = by_key.get((family, layout, tiles, "frozen"))
                trained = by_key.get((family, layout, tiles, "full"))
                if frozen is None or trained is None:
                    continue
                lines.append("| " + " | ".join([DOC_FAMILIES[family], layout, str(tiles), f"{frozen['positions']:,}",
                                                *cells(frozen), *cells(trained)]) + " |")
    return "\n".join(lines)


def write_docs_table(rows: list[dict], budgets, reserve_gib: float, path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8")
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"{path}: the markers {DOCS_BEGIN!r} ... {DOCS_END!r} are missing")
    before, rest = text.split(DOCS_BEGIN, 1)
    after = rest.split(DOCS_END, 1)[1]
    table = docs_planning_table(rows, budgets, reserve_gib)
    path.write_text(f"{before}{DOCS_BEGIN}\n{table}\n{DOCS_END}{after}", encoding="utf-8")


def comparisons(results: list[dict]) -> list[dict]:
    """Before/after pairs measured at the same depth and batch: the drop of the step's peak against the bfloat16
    logits' size, the loss of both, the step time ratio; and skip-arithmetic runs against real ones."""
    out = []
    for after in results:
        if after.get("path") != "after" or "tensor_peak_bytes" not in after:
            continue
        match = {k: after[k] for k in ("family", "layout", "tiles", "vit", "llm_layers", "vit_layers", "expand_layer",
                                       "batch", "arithmetic", "device", "answer_tokens")}
        before = _find(results, **match, path="before")
        if before is None:
            continue
        vocab = SPECS[after["family"]]["text"]["vocab_size"]
        logits = 2 * after["batch"] * after["positions"] * vocab
        drop = before["tensor_peak_bytes"] - after["tensor_peak_bytes"]
        row = {**match, "positions": after["positions"], "labelled": after["labelled"],
               "peak_before_bytes": before["tensor_peak_bytes"], "peak_after_bytes": after["tensor_peak_bytes"],
               "activation_before_bytes": before["activation_peak_bytes"],
               "activation_after_bytes": after["activation_peak_bytes"], "drop_bytes": drop,
               "logits_bf16_bytes": logits, "drop_over_logits": drop / logits, "loss_before": before["loss"],
               "loss_after": after["loss"],
               "time_ratio_after_over_before": after["step_s"] / before["step_s"]}
        if "rss_peak_bytes" in before and "rss_peak_bytes" in after:
            row["rss_drop_bytes"] = before["rss_peak_bytes"] - after["rss_peak_bytes"]
        out.append(row)
    return out


def trainer_comparisons(results: list[dict]) -> list[dict]:
    """The plain `transformers.Trainer` step (no option) against the model called with every logit (before) and
    with ``skip_logits=True`` (after), same configuration: the step's extra peak above the weights, each path."""
    out = []
    for trainer in results:
        if trainer.get("path") != "trainer" or "tensor_peak_bytes" not in trainer:
            continue
        match = {k: trainer[k] for k in ("family", "layout", "tiles", "vit", "llm_layers", "vit_layers",
                                         "expand_layer", "batch", "arithmetic", "device", "answer_tokens")}
        before, after = _find(results, **match, path="before"), _find(results, **match, path="after")
        vocab = SPECS[trainer["family"]]["text"]["vocab_size"]
        row = {**match, "positions": trainer["positions"], "labelled": trainer["labelled"], "vocab": vocab,
               "logits_float32_bytes": 4 * trainer["batch"] * trainer["positions"] * vocab,
               "peak_trainer_bytes": trainer["tensor_peak_bytes"], "loss_trainer": trainer["loss"]}
        for name, other in (("before", before), ("after", after)):
            if other is not None:
                row[f"peak_{name}_bytes"] = other["tensor_peak_bytes"]
                row[f"loss_{name}"] = other["loss"]
        out.append(row)
    return out


def trainer_table(rows: list[dict]) -> str:
    lines = ["| family (vocabulary) | layout | tiles | ViT | layers | positions | labelled | step peak GiB: every "
             "logit (before) | `skip_logits=True` (after) | plain `transformers.Trainer`, no option | "
             "float32 logits GiB | "
             "loss before / after / Trainer |", "|" + "---|" * 11]
    for r in rows:
        losses = " / ".join(f"{r[k]:.4f}" if k in r else "-" for k in ("loss_before", "loss_after", "loss_trainer"))
        lines.append(f"| {r['family']} ({r['vocab']:,}) | {r['layout']} | {r['tiles']} | {r['vit']} | "
                     f"{r['llm_layers']}/{r['vit_layers']} | {r['positions']:,} | {r['labelled']} | "
                     f"{_gib(r.get('peak_before_bytes'))} | {_gib(r.get('peak_after_bytes'))} | "
                     f"{_gib(r['peak_trainer_bytes'])} | {_gib(r['logits_float32_bytes'])} | {losses} |")
    return "\n".join(lines)


def skip_vs_real(results: list[dict]) -> list[dict]:
    out = []
    for real in results:
        if real.get("arithmetic") != "real" or "tensor_peak_bytes" not in real:
            continue
        match = {k: real[k] for k in ("family", "layout", "tiles", "vit", "path", "llm_layers", "vit_layers",
                                      "expand_layer", "batch", "device", "dtype", "answer_tokens")}
        skip = _find(results, **match, arithmetic="skip")
        if skip is not None:
            out.append({**match, "tensor_real": real["tensor_peak_bytes"], "tensor_skip": skip["tensor_peak_bytes"],
                        "rss_real": real.get("rss_peak_bytes"), "rss_skip": skip.get("rss_peak_bytes"),
                        "step_s_real": real["step_s"], "step_s_skip": skip["step_s"]})
    return out


def step_times(results: list[dict]) -> list[dict]:
    """Step times with the arithmetic computed: before and after at the measured depth, and at the model's full
    depth estimated as the measured step plus the measured time of one more LLM layer and of one more ViT layer
    (runs at ``llm_layers + 1`` and ``vit_layers + 1``, path after: a layer's time does not depend on the LM head)
    times the layers left out (plain layouts; LVTC's short and long layers differ, so it gets the measured depth
    only)."""
    out = []
    for before in results:
        if (before.get("arithmetic") != "real" or before.get("path") != "before" or before.get("batch") != 1
                or "step_s" not in before):
            continue
        match = {k: before[k] for k in ("family", "layout", "tiles", "vit", "batch", "arithmetic", "device", "dtype",
                                        "answer_tokens", "expand_layer")}
        llm, vit = before["llm_layers"], before["vit_layers"]
        after = _find(results, **match, path="after", llm_layers=llm, vit_layers=vit)
        if after is None:
            continue
        row = {**match, "llm_layers": llm, "vit_layers": vit, "positions": before["positions"],
               "step_s_before": before["step_s"], "step_s_after": after["step_s"],
               "ratio_after_over_before": after["step_s"] / before["step_s"]}
        more_llm = _find(results, **match, path="after", llm_layers=llm + 1, vit_layers=vit)
        more_vit = _find(results, **match, path="after", llm_layers=llm, vit_layers=vit + 1)
        if more_llm is not None and more_vit is not None and before["expand_layer"] is None:
            full_llm, full_vit = full_depth(before["family"])
            per_llm = more_llm["step_s"] - after["step_s"]
            per_vit = more_vit["step_s"] - after["step_s"]
            rest = (full_llm - llm) * per_llm + (full_vit - vit) * per_vit
            row.update({"s_per_llm_layer": per_llm, "s_per_vit_layer": per_vit, "full_llm_layers": full_llm,
                        "full_vit_layers": full_vit, "full_step_s_before": before["step_s"] + rest,
                        "full_step_s_after": after["step_s"] + rest,
                        "full_ratio_after_over_before": (after["step_s"] + rest) / (before["step_s"] + rest)})
        out.append(row)
    return out


def step_times_table(rows: list[dict]) -> str:
    lines = ["| family | layout | tiles | ViT | dtype | positions | measured layers (LLM/ViT) | step s before -> "
             "after | after / before | s per LLM / ViT layer | full depth (estimated) s before -> after | after / "
             "before |",
             "|" + "---|" * 12]
    for r in rows:
        full = ("-", "-", "-")
        if "full_step_s_before" in r:
            full = (f"{r['s_per_llm_layer']:.1f} / {r['s_per_vit_layer']:.1f}",
                    f"{r['full_step_s_before']:.0f} -> {r['full_step_s_after']:.0f} "
                    f"({r['full_llm_layers']}/{r['full_vit_layers']} layers)",
                    f"{r['full_ratio_after_over_before']:.2f}")
        lines.append(f"| {r['family']} | {r['layout']} | {r['tiles']} | {r['vit']} | {r['dtype']} | {r['positions']} | "
                     f"{r['llm_layers']}/{r['vit_layers']} | {r['step_s_before']:.1f} -> {r['step_s_after']:.1f} | "
                     f"{r['ratio_after_over_before']:.2f} | {full[0]} | {full[1]} | {full[2]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, budgets) -> None:
    from internvlx_hf.bench.harness import figure

    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    with figure(path, len(families), 2, figsize=(12, 3.6 * len(families)), squeeze=False, dpi=110) as (fig, axes):
        for i, family in enumerate(families):
            for j, vit in enumerate(("frozen", "full")):
                ax = axes[i][j]
                for layout, colour in zip(LAYOUTS, ("tab:blue", "tab:orange", "tab:green")):
                    sel = [r for r in rows if r["family"] == family and r["vit"] == vit and r["layout"] == layout]
                    sel.sort(key=lambda r: r["tiles"])
                    for which, style in (("before", "--"), ("after", "-")):
                        pts = [(r["tiles"], r[f"per_sample_full_{which}_bytes"] / GiB) for r in sel
                               if r[f"per_sample_full_{which}_bytes"] is not None]
                        if pts:
                            ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{layout} {which}")
                ax.set_title(f"{SPECS[family]['name']}, ViT {vit}", fontsize=9)
                ax.set_xlabel("tiles per sample")
                ax.set_ylabel("GiB per sample, full depth")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle("Training-step memory per sample: LM head on every position (before, dashed) vs on the labelled "
                     "positions only (after)", fontsize=10)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--families", default="2b,8b,2b-qwen2-vocab", type=lambda s: s.split(","))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), type=lambda s: s.split(","))
    parser.add_argument("--tiles", default="1,6,12", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--vit", default="frozen,full", type=lambda s: s.split(","),
                        help="frozen (preset stage2-frozen-vit) and/or full (stage2)")
    parser.add_argument("--paths", default="before,after", type=lambda s: s.split(","))
    parser.add_argument("--llm-layers", type=int, default=1,
                        help="LLM layers on a CPU (LVTC: at least 2, k one below; 0: the real depth); on a GPU "
                             "the real depth")
    parser.add_argument("--vit-layers", type=int, default=1, help="ViT layers on a CPU; on a GPU the real depth")
    parser.add_argument("--arithmetic", default=None, choices=["real", "skip"],
                        help="compute the matrix products (real; the GPU default) or allocate their outputs only "
                             "(skip; the CPU default)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="labelled tokens per sample")
    parser.add_argument("--no-derive", dest="derive", action="store_false",
                        help="only the batch-1 runs (no batch-2 / deeper runs, no planning table)")
    parser.add_argument("--max-gib", type=float, default=7.0, help="CPU: do not run a step predicted above this")
    parser.add_argument("--budgets-gib", default="24,80", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--reserve-gib", type=float, default=2.0,
                        help="kept out of each budget for the CUDA context, the allocator's fragmentation, buffers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--json", type=Path, help="results (appended run by run; existing runs are not repeated)")
    parser.add_argument("--markdown", type=Path, help="tables as markdown")
    parser.add_argument("--plot", type=Path, help="PNG of per-sample memory at full depth")
    parser.add_argument("--docs", action="store_true",
                        help="rewrite docs/fine-tuning-scale.md's planning table from the derived rows (with --json)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.arithmetic is None:
        args.arithmetic = "real" if args.device == "cuda" else "skip"
    for name, values, allowed in (("families", args.families, FAMILIES), ("layouts", args.layouts, LAYOUTS),
                                  ("vit", args.vit, ("frozen", "full")), ("paths", args.paths, PATHS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")

    previous = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    results = previous.get("runs", [])
    done = {run_key(r) for r in results if "tensor_peak_bytes" in r}  # skipped ones: predicted again
    runs = plan_runs(args)
    todo = [r for r in runs if run_key(r) not in done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already in {args.json}", file=sys.stderr)
    counts_cache = {}
    meta = previous.get("meta") or {}
    meta.update({"date": datetime.date.today().isoformat(), "device": args.device, "cpu": platform.processor()
                 or platform.machine(), "python": platform.python_version(), "threads": args.threads,
                 "command": " ".join(sys.argv[1:]) if argv is None else " ".join(argv)})
    try:
        import torch
        import transformers

        meta.update({"torch": torch.__version__, "transformers": transformers.__version__})
    except ImportError:
        pass

    def save():
        from internvlx_hf.bench.harness import write_text

        if args.json:
            data = {"meta": meta, "runs": results, "derived": derived, "comparisons": comparisons(results),
                    "logit_entry_bytes": {f"{family} {kind}": value
                                          for (family, kind), value in logit_entry_bytes(results).items()},
                    "skip_vs_real": skip_vs_real(results), "trainer": trainer_comparisons(results),
                    "step_times": step_times(results)}
            write_text(args.json, json.dumps(data, indent=1) + "\n")

    derived = previous.get("derived", [])
    for index, run in enumerate(todo, 1):
        key = (run["family"], run["layout"], run["llm_layers"], run["vit_layers"], run["expand_layer"], run["vit"])
        if key not in counts_cache:
            counts_cache[key] = parameter_counts(run)
        label = (f"[{index}/{len(todo)}] {run['family']} {run['layout']} {run['tiles']}t ViT {run['vit']} "
                 f"{run['path']} L={run['llm_layers']}/{run['vit_layers']} b={run['batch']} {run['arithmetic']}")
        print(label, end=" ", file=sys.stderr, flush=True)
        result = run_one(run, args, counts_cache[key])
        said = result.get("skipped") or ("FAILED " + result["failed"][-300:] if "failed" in result else
                                         f"tensor {_gib(result['tensor_peak_bytes'])} GiB, RSS "
                                         f"{_gib(result.get('rss_peak_bytes'))} GiB, {result['step_s']:.1f} s")
        print(said, file=sys.stderr, flush=True)
        results = [r for r in results if run_key(r) != run_key(run)] + [result]
        save()
    derived = derive(results, args) if args.derive or args.device == "cuda" else []
    save()
    text = ["## Runs", runs_table(results), "", "## Before / after at the same depth", ""]
    comp = comparisons(results)
    text += ["| family | layout | tiles | ViT | layers | batch | arithmetic | positions | step peak GiB before -> "
             "after | activations GiB before -> after | drop of the peak GiB | bf16 logits GiB | drop / logits | "
             "loss before | loss after | time after/before |", "|" + "---|" * 16]
    for c in comp:
        text.append(f"| {c['family']} | {c['layout']} | {c['tiles']} | {c['vit']} | {c['llm_layers']}/"
                    f"{c['vit_layers']} | {c['batch']} | {c['arithmetic']} | {c['positions']} | "
                    f"{_gib(c['peak_before_bytes'])} -> {_gib(c['peak_after_bytes'])} | "
                    f"{_gib(c['activation_before_bytes'])} -> {_gib(c['activation_after_bytes'])} | "
                    f"{_gib(c['drop_bytes'])} | {_gib(c['logits_bf16_bytes'])} | {c['drop_over_logits']:.2f} | "
                    f"{c['loss_before']:.4f} | {c['loss_after']:.4f} | {c['time_ratio_after_over_before']:.3f} |")
    pairs = [(one, _find(results, **{k: one[k] for k in run_key_fields if k != "batch"}, batch=2))
             for one in results if one.get("batch") == 1 and "activation_peak_bytes" in one]
    pairs = [(one, two) for one, two in pairs if two is not None]
    if pairs:
        text += ["", "## Batch 2 against batch 1 (activation peak, gradients left out)", "",
                 "| family | layout | tiles | ViT | path | batch 1 GiB | batch 2 GiB | ratio |", "|" + "---|" * 8]
        for one, two in pairs:
            text.append(f"| {one['family']} | {one['layout']} | {one['tiles']} | {one['vit']} | {one['path']} | "
                        f"{_gib(one['activation_peak_bytes'])} | {_gib(two['activation_peak_bytes'])} | "
                        f"{two['activation_peak_bytes'] / one['activation_peak_bytes']:.3f} |")
    plain = trainer_comparisons(results)
    if plain:
        text += ["", "## A plain transformers.Trainer step (no option) against both paths", "",
                 trainer_table(plain)]
    svr = skip_vs_real(results)
    if svr:
        text += ["", "## Skipped arithmetic against computed (same configuration)", "",
                 "| family | layout | tiles | ViT | path | tensor peak GiB real / skip | RSS peak GiB real / skip |",
                 "|" + "---|" * 7]
        for s in svr:
            text.append(f"| {s['family']} | {s['layout']} | {s['tiles']} | {s['vit']} | {s['path']} | "
                        f"{_gib(s['tensor_real'])} / {_gib(s['tensor_skip'])} | {_gib(s['rss_real'])} / "
                        f"{_gib(s['rss_skip'])} |")
    times = step_times(results)
    if times:
        text += ["", "## Step time, arithmetic computed", "", step_times_table(times)]
    if derived:
        text += ["", "## Per sample at full depth and the largest batch", "", plan_table(derived, args.budgets_gib)]
    report = "\n".join(text)
    print(report)
    if args.markdown:
        from internvlx_hf.bench.harness import write_text

        write_text(args.markdown, f"# Training-step memory ({meta['date']}, {args.device})\n\n"
                   f"Command: `python benchmarks/bench_train_memory.py {meta['command']}`\n\n" + report + "\n")
    if args.plot and derived:
        plot(derived, args.plot, args.budgets_gib)
    if args.docs and derived:
        write_docs_table(derived, args.budgets_gib, args.reserve_gib)
    return {"runs": results, "derived": derived}


if __name__ == "__main__":
    main()
