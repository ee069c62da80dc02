"""How the training loss runs the LM head (`InternVLXTrainer(lm_head_loss=...)`, ``internvlx train --lm_head_loss``).

A fine-tuning sample is mostly image and prompt tokens, none of which carries a label, yet a causal LM's forward
computes the logits of every position, the loss upcasts them to float32, and the backward holds their gradient: at
InternVL2-2B dimensions one 6-tile sample of 6,208 positions has 6,208 x 92,553 logits (1.15 GB in bfloat16). The
loss reads only the labelled rows.

  labelled           the model's forward with ``skip_logits=True``: the LM head on the labelled positions only, then
                     the float32 cross-entropy as before. Same loss and gradients (to float32 rounding); the default.
  cut_cross_entropy  the same positions through cut-cross-entropy's ``linear_cross_entropy`` (``pip install
                     cut-cross-entropy``; Apple's Cut Cross-Entropy), which never materialises the logits of those
                     positions either: its Triton kernel on CUDA, its torch.compile implementation elsewhere (the
                     first step compiles, about a minute on a 2-core CPU).
  liger              the same positions through Liger-Kernel's fused linear cross-entropy (``pip install
                     liger-kernel``; CUDA only, its kernels are Triton), chunked over the rows.
  full               the logits of every position (the model's plain forward), e.g. for a custom loss that needs them.

`resolve` turns a name into the ``linear_cross_entropy`` callable the model's forward takes (None for ``labelled``:
the model's own LM head and cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LM_HEAD_LOSSES = ("labelled", "cut_cross_entropy", "liger", "full")


def cut_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets`` by cut-cross-entropy: its Triton kernel
    (``impl="cce"``, with the library's default gradient filtering) on CUDA, its torch.compile implementation on other
    devices."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    return linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)


def liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets`` by Liger-Kernel's fused linear
    cross-entropy (CUDA)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if not hidden.is_cuda:
        raise ValueError("lm_head_loss='liger' runs Liger-Kernel's Triton kernels, which need a CUDA device; this "
                         f"model is on {hidden.device.type}: use lm_head_loss='labelled' (or 'cut_cross_entropy')")
    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The ``linear_cross_entropy`` callable of an ``lm_head_loss`` name (None for ``labelled`` and ``full``); a clear
    ValueError for an unknown name or a missing package."""
    if name not in LM_HEAD_LOSSES:
        raise ValueError(f"lm_head_loss must be one of {list(LM_HEAD_LOSSES)}, got {name!r}")
    if name == "cut_cross_entropy":
        if not _installed("cut_cross_entropy"):
            raise ValueError("lm_head_loss='cut_cross_entropy' needs the cut-cross-entropy package: pip install "
                             "cut-cross-entropy (or pip install 'internvlx-hf[cce]'), or use lm_head_loss='labelled'")
        return cut_cross_entropy
    if name == "liger":
        if not _installed("liger_kernel"):
            raise ValueError("lm_head_loss='liger' needs Liger-Kernel on a CUDA machine: pip install liger-kernel, "
                             "or use lm_head_loss='labelled'")
        return liger_cross_entropy
    return None


__all__ = ["LM_HEAD_LOSSES", "cut_cross_entropy", "liger_cross_entropy", "resolve"]
