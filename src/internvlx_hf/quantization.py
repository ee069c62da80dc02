"""4-bit / 8-bit loading through bitsandbytes (transformers' `BitsAndBytesConfig`), with the parts of InternVL-X
that must stay in full precision kept out of quantization.

bitsandbytes is optional (the ``quantization`` extra): `require_bitsandbytes` turns its absence into one line that
names the extra. What is kept out, by full module prefix (transformers matches a skip entry from the start of a
module name or as its suffix, so a bare ``multi_modal_projector`` matches nothing and is silently ignored):

- ``model.multi_modal_projector``, ``model.lvtc_lr_projectors``, ``model.lvtc_hr_projector``: the MLP / PVTC
  projectors. PVTC runs its Linears on 4-D windows, and bitsandbytes' 8-bit matmul (`MatMul8bitLt`) flattens only
  3-D inputs, so an 8-bit PVTC model fails inside bitsandbytes ("size of tensor a (4) must match ... (256)"). They
  are also the parts that fine-tuning retrains in full (the `lora` / `qlora` presets' ``modules_to_save``).
- ``model.vir``: InternVL3.5-Flash's router (pooling, gate, 64-token projector). Its decisions compare scores with
  thresholds, so rounding flips them (a 4-bit gate moved scores by 0.13); its projector is trained in full beside
  adapters, which peft cannot do on a 4-bit layer.
- ``lm_head``: as transformers' default skip list does (the output logits are where rounding shows most).
- ``model.vision_tower`` only on request (``keep_vision_tower=True``): its Linears take 3-D inputs and quantize
  fine in both modes (docs/quantization.md has the measured effect).
- 4-bit on CPU: each Linear whose shape bitsandbytes' CPU 4-bit inference path cannot take (`cpu_4bit_misfits`:
  out_features not a multiple of 32 or in_features not a multiple of the 64-value quantization block), with one
  log line naming them. Quantized, such a layer stops the first forward with an `AssertionError` or a reshape
  error inside bitsandbytes.

    from transformers import AutoModel
    from internvlx_hf.quantization import bitsandbytes_config, check_kept_modules

    quantization = bitsandbytes_config(4, config)         # config: the checkpoint's InternVLXConfig
    model = AutoModel.from_pretrained(path, trust_remote_code=True, quantization_config=quantization)
    check_kept_modules(model, quantization.llm_int8_skip_modules)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

QUANTIZATION_EXTRA = "quantization"
INSTALL_HINT = f'pip install "internvlx-hf[{QUANTIZATION_EXTRA}]"'
BITS = (4, 8)


class QuantizationUnavailable(ImportError):
    """bitsandbytes is not installed (or cannot be imported); the message names the extra that installs it."""


def hide_optional_kernel_note() -> None:
    """Keep bitsandbytes' import-time note about an optional CPU kernel from the Hub ("kernels-community", needs the
    `kernels` package) out of the output: the kernel is only a speed-up (bitsandbytes falls back to its built-in CPU
    path) and cannot be fetched offline anyway, yet the note reads like a failure. It is logged while bitsandbytes is
    imported, which peft does on its own import, so the `internvlx` CLI calls this first (nothing is imported)."""
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(existing, _DropMessages) for existing in cpu_logger.filters):
        cpu_logger.addFilter(_DropMessages("kernels-community"))


def require_bitsandbytes(what: str = "4-bit / 8-bit loading") -> None:
    """Import bitsandbytes, or raise `QuantizationUnavailable` saying that ``what`` needs the ``quantization`` extra."""
    hide_optional_kernel_note()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise QuantizationUnavailable(f"{what} needs bitsandbytes, which is not installed here ({error}); install "
                                      f"the extra: {INSTALL_HINT}") from None
    # MatMul8bitLt logs its float32 -> float16 cast on every call; once is enough.
    matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _Once) for existing in matmul_logger.filters):
        matmul_logger.addFilter(_Once())


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


class _Once(logging.Filter):
    """Lets each distinct message through once (bitsandbytes logs some notes on every forward)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def skip_modules(config: Any, *, keep_vision_tower: bool = False) -> list[str]:
    """Full prefixes of the modules of an `InternVLXForConditionalGeneration` with ``config`` that stay in full
    precision: the projectors the model has (the LVTC ones exist only when the config builds them), the Flash
    router, ``lm_head``, and the vision tower when ``keep_vision_tower``."""
    from .modeling.configuration_internvlx import LVTCConfig

    names = ["model.multi_modal_projector"]
    lvtc = LVTCConfig.of(config)
    if lvtc is not None:
        if lvtc.num_lr_projectors > 1:  # the first LR projector is multi_modal_projector itself
            names.append("model.lvtc_lr_projectors")
        if lvtc.expand_layer < config.get_text_config().num_hidden_layers:
            names.append("model.lvtc_hr_projector")
    if getattr(config, "vir", None) is not None:  # InternVL3.5-Flash's router: its decisions and 64-token projector
        names.append("model.vir")
    if keep_vision_tower:
        names.append("model.vision_tower")
    names.append("lm_head")
    return names


# bitsandbytes' CPU 4-bit inference (`Linear4bit.forward` -> `_convert_weight_packed_for_cpu`, taken on CPUs with
# AVX512-BF16) repacks a weight in blocks of 32 output rows and reshapes its scales to one per 64 inputs (the
# default `Params4bit` blocksize, which `BitsAndBytesConfig` does not change), so both must divide the shape.
CPU_4BIT_OUT_MULTIPLE = 32
CPU_4BIT_IN_MULTIPLE = 64


def cpu_4bit_misfits(config: Any, skip: Sequence[str] = ()) -> list[str]:
    """Names of the Linear layers of an `InternVLXForConditionalGeneration` with ``config`` (outside the ``skip``
    prefixes) that bitsandbytes' CPU 4-bit path cannot run: out_features not a multiple of 32 or in_features not a
    multiple of 64. Found on a model built on the meta device (no memory, no weights), so before loading."""
    import torch
    from torch import nn

    from .modeling import InternVLXForConditionalGeneration

    with torch.device("meta"):
        model = InternVLXForConditionalGeneration(config)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and not any(name == prefix or name.startswith(prefix + ".") for prefix in skip)
            and (module.out_features % CPU_4BIT_OUT_MULTIPLE or module.in_features % CPU_4BIT_IN_MULTIPLE)]


def _loads_on_cpu(device: Any) -> bool:
    if device is None:
        import torch

        return not torch.cuda.is_available()
    return str(device).split(":")[0] == "cpu"


def bitsandbytes_config(bits: int, config: Any, *, compute_dtype: Any = None, keep_vision_tower: bool = False,
                        what: str | None = None, device: Any = None):
    """transformers' `BitsAndBytesConfig` for ``bits`` (4: nf4 with double quantization, QLoRA's setting; 8:
    LLM.int8()) with `skip_modules` of ``config`` as ``llm_int8_skip_modules`` (transformers uses that list for both
    modes).

    ``compute_dtype``: the dtype 4-bit layers compute in (default float32; bfloat16 on GPUs is faster). ``what``:
    how the error names the request when bitsandbytes is missing (e.g. ``"--load-in-4bit"``). ``device``: where
    the model will run (None: CUDA when available, else CPU); in 4-bit on CPU, `cpu_4bit_misfits` are kept in full
    precision too, with one log line naming them.

    Raises:
        ValueError: ``bits`` is not 4 or 8.
        QuantizationUnavailable: bitsandbytes is not installed.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8 (bitsandbytes' 4-bit nf4 or 8-bit LLM.int8()), got {bits!r}")
    require_bitsandbytes(what or f"{bits}-bit loading")
    from transformers import BitsAndBytesConfig

    skip = skip_modules(config, keep_vision_tower=keep_vision_tower)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if _loads_on_cpu(device):
        misfits = cpu_4bit_misfits(config, skip)
        if misfits:
            logger.warning("4-bit on CPU: keeping %d Linear layer(s) in full precision, as bitsandbytes' CPU 4-bit "
                           "path needs out_features a multiple of %d and in_features a multiple of %d: %s",
                           len(misfits), CPU_4BIT_OUT_MULTIPLE, CPU_4BIT_IN_MULTIPLE, ", ".join(misfits))
            skip = skip + misfits
    kwargs = {"bnb_4bit_compute_dtype": compute_dtype} if compute_dtype is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              llm_int8_skip_modules=skip, **kwargs)


def quantized_loading_kwargs(path: Any, bits: int | None, dtype: Any = "auto", *,
                             what: str | None = None, device: Any = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load the checkpoint at ``path`` in ``bits`` (4 or 8; None: ``{}``):
    its ``config`` (read here, because `skip_modules` depends on it; passing it on saves a second read) and the
    `bitsandbytes_config` for it. The one place where `internvlx chat`, `eval` and `serve` build them.

    ``dtype``: the loading dtype, a torch dtype or its name; 4-bit layers compute in it (``"auto"``: float32).
    ``what``: how a missing bitsandbytes is named, ``device``: where the model runs (see `bitsandbytes_config`).

    Raises:
        ValueError: ``bits`` is not 4, 8 or None.
        QuantizationUnavailable: bitsandbytes is not installed.
    """
    if bits is None:
        return {}
    import torch
    from transformers import AutoConfig

    compute_dtype = None if dtype in (None, "auto") else getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    quantization = bitsandbytes_config(bits, config, compute_dtype=compute_dtype, what=what, device=device)
    return {"config": config, "quantization_config": quantization}


def quantized_linear_names(model) -> list[str]:
    """Names of the model's bitsandbytes Linear layers (4-bit or 8-bit)."""
    import bitsandbytes as bnb

    return [name for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def check_kept_modules(model, skip: Sequence[str]) -> None:
    """Check on a loaded model that every ``skip`` prefix names a module and that no Linear under one was quantized.

    transformers ignores a skip entry that matches no module; this turns a list that no longer fits the model
    (renamed modules, changed matching rules) into an error instead of a model that quietly quantizes its
    projectors (and, in 8-bit, fails on PVTC's 4-D windows).

    Raises:
        RuntimeError: a prefix matches no module, or a module under one is quantized.
    """
    names = {name for name, _ in model.named_modules()}
    prefixes = [f"base_model.model.{prefix}" if f"base_model.model.{prefix}" in names else prefix for prefix in skip]
    missing = [prefix for prefix in prefixes if prefix not in names]
    quantized = [name for name in quantized_linear_names(model)
                 if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)]
    if missing or quantized:
        raise RuntimeError(f"the modules kept out of quantization do not fit {type(model).__name__}: prefixes "
                           f"matching no module {missing}, quantized modules under the kept prefixes "
                           f"{quantized[:5]}; this is a bug of internvlx_hf.quantization, please report it")


__all__ = ["BITS", "INSTALL_HINT", "QUANTIZATION_EXTRA", "QuantizationUnavailable", "bitsandbytes_config",
           "check_kept_modules", "cpu_4bit_misfits", "hide_optional_kernel_note", "quantized_linear_names",
           "quantized_loading_kwargs",
           "require_bitsandbytes", "skip_modules"]
