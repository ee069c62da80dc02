"""--load-in-4bit / --load-in-8bit: the quantization flags of the commands that load a model for inference
(`chat`, `eval`, `serve`), built on `internvlx_hf.quantization`. Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse

from .command import CLIError


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """--load-in-4bit / --load-in-8bit (bitsandbytes; the ``quantization`` extra), for every command that loads a
    model through `internvlx_hf.loading.load_checkpoint`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-in-4bit", action="store_const", const=4, dest="load_in_bits",
                       help="load the LLM and vision tower in 4-bit nf4 (bitsandbytes; projectors and lm_head stay "
                            "in full precision; needs the 'quantization' extra)")
    group.add_argument("--load-in-8bit", action="store_const", const=8, dest="load_in_bits",
                       help="load them in 8-bit (bitsandbytes LLM.int8(); same modules kept)")


def quantization_flag(bits: int | None) -> str | None:
    """The command-line flag that asked for ``bits`` (for messages), or None."""
    return None if bits is None else f"--load-in-{bits}bit"


def check_quantization_available(bits: int | None) -> None:
    """Fail before any loading when --load-in-Nbit is given and bitsandbytes is not installed."""
    if bits is None:
        return
    from ..quantization import QuantizationUnavailable, require_bitsandbytes

    try:
        require_bitsandbytes(quantization_flag(bits))
    except QuantizationUnavailable as error:
        raise CLIError(str(error)) from None
