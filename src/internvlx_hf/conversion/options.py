"""Parsing of the user-facing options of `internvlx convert` (shared by the CLI and the Python API)."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from ..modeling.configuration_internvlx import LVTCConfig
from .errors import ConversionError

PROJECTOR_CHOICES = ("keep", "mlp", "pvtc")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

# Short names for the LVTC options people change most (paper notation: k, T, s, i).
LVTC_ALIASES = {
    "k": "expand_layer",
    "T": "num_lr_projectors",
    "s": "inject_start",
    "i": "inject_interval",
}
# Not an LVTCConfig field: copy InternVL2's trained `mlp1` into the extra LR projectors instead of a fresh init.
LVTC_INIT_FROM_MLP1 = "init_lr_from_mlp1"

_LVTC_FIELD_TYPES = {
    "lr_downsample_ratio": float,
    "hr_downsample_ratio": float,
    "expand_layer": int,
    "num_lr_projectors": int,
    "inject_start": int,
    "inject_interval": int,
    "upsample_mode": str,
    "lr_projector_type": str,
    "hr_projector_type": str,
    "hr_scale": str,
}
assert set(_LVTC_FIELD_TYPES) == {f.name for f in fields(LVTCConfig)}, "keep the LVTC option table in sync"

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 bytes (decimal units as in transformers; ``GiB`` etc. are binary)."""
    if isinstance(value, int):
        if value <= 0:
            raise ConversionError(f"--max-shard-size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConversionError(
            f"--max-shard-size {value!r} is not a size; write a number with an optional unit, e.g. 5GB, 500MB, 2GiB."
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConversionError(f"--max-shard-size must be positive, got {value!r}")
    return size


# An LVTC upgrade's hr_scale when --lvtc does not name one. LVTCConfig's own default stays the paper's "none" (what
# trained InternVL-X checkpoints and configs saved before the option existed mean); a model upgraded by `convert` has
# a new, untrained HR projector, and with "none" it left it unused after fine-tuning while "rms" read through it
# within 0.05 of 1024 tokens (issue 44: docs/lvtc.md, "Which compression").
UPGRADE_HR_SCALE = "rms"


def _parse_value(name: str, raw: str) -> Any:
    if name == "hr_scale":  # "none" is one of its values, not "automatic"
        return raw.strip().lower()
    if raw.lower() in ("none", "null", "auto"):
        return None
    kind = _LVTC_FIELD_TYPES[name]
    try:
        return kind(raw)
    except ValueError:
        expected = {int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConversionError(f"--lvtc {name}={raw!r}: expected {expected}") from None


def parse_lvtc_spec(spec: str | dict | LVTCConfig | None) -> tuple[dict | None, bool]:
    """Parse ``--lvtc``: returns ``(lvtc options for LVTCConfig or None, init_lr_from_mlp1)``.

    Accepted: None (LVTC off); ``"default"`` or ``""`` (every LVTCConfig default but ``hr_scale``); comma-separated
    ``key=value`` pairs with the aliases ``k`` (expand_layer), ``T`` (num_lr_projectors), ``s`` (inject_start), ``i``
    (inject_interval) or any LVTCConfig field name, plus the bare flag ``init_lr_from_mlp1``. ``none`` as a value
    keeps the config's automatic choice (for ``hr_scale`` it is the paper's formulation). A string or dict without
    ``hr_scale`` gets `UPGRADE_HR_SCALE` ("rms"); an LVTCConfig passes through as it is (a dict may hold
    ``init_lr_from_mlp1``).
    """
    if spec is None:
        return None, False
    if isinstance(spec, LVTCConfig):
        return spec.to_dict(), False
    if isinstance(spec, dict):
        options = dict(spec)
        init_from_mlp1 = bool(options.pop(LVTC_INIT_FROM_MLP1, False))
        options = {LVTC_ALIASES.get(key, key): value for key, value in options.items()}
        _check_names(options)
        options.setdefault("hr_scale", UPGRADE_HR_SCALE)
        return options, init_from_mlp1
    options: dict[str, Any] = {}
    init_from_mlp1 = False
    for item in (part.strip() for part in str(spec).split(",")):
        if not item or item == "default":
            continue
        if "=" not in item:
            if item == LVTC_INIT_FROM_MLP1:
                init_from_mlp1 = True
                continue
            raise ConversionError(
                f"--lvtc item {item!r} is not key=value; e.g. --lvtc k=18,T=2 (see --help for the keys)."
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        if key == LVTC_INIT_FROM_MLP1:
            init_from_mlp1 = raw.lower() in ("1", "true", "yes", "on")
            continue
        name = LVTC_ALIASES.get(key, key)
        _check_names({name: raw})
        if name in options:
            raise ConversionError(f"--lvtc sets {name!r} twice ({key}={raw}); give each option once.")
        options[name] = _parse_value(name, raw)
    options.setdefault("hr_scale", UPGRADE_HR_SCALE)
    return options, init_from_mlp1


def _check_names(options: dict) -> None:
    unknown = sorted(set(options) - set(_LVTC_FIELD_TYPES))
    if unknown:
        aliases = ", ".join(f"{a}={n}" for a, n in LVTC_ALIASES.items())
        raise ConversionError(
            f"unknown --lvtc option(s) {unknown}; use the aliases ({aliases}), the LVTCConfig fields "
            f"{sorted(_LVTC_FIELD_TYPES)} or the flag {LVTC_INIT_FROM_MLP1}."
        )


def parse_dtype(value: str | None) -> str:
    value = "auto" if value is None else str(value).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = aliases.get(value, value)
    if value not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype {value!r} is not one of {DTYPE_CHOICES}")
    return value


def check_projector(value: str | None) -> str:
    value = "keep" if value is None else value
    if value not in PROJECTOR_CHOICES:
        raise ConversionError(f"--projector {value!r} is not one of {PROJECTOR_CHOICES}")
    return value
