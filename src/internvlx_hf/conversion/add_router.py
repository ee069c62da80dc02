"""`internvlx convert SRC DST --add-router` where SRC is an internvlx-hf checkpoint already (one this package wrote:
converted, trained, the demo model's kind): the same folder with InternVL3.5-Flash's router added, untrained and off.
(An OpenGVLab or native SRC gains it during its conversion: `convert(add_router=True)`.)

The router is the 64-token projector (a quarter of the tile's tokens: pixel shuffle at half the model's
``downsample_ratio``, as InternVL3.5-Flash's 0.25 beside 0.5), the pooling and the gate (`modeling.vir.ViRRouter`),
drawn as their constructors draw them (`ViRRouter.reset_parameters`, with ``seed``); ``config.vir`` is on the MLP
projector without LVTC (what the router's tiles need), ``enabled`` false until `internvlx train --preset vico` trains
it. Every other tensor is copied as it is; DST appears whole or not at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..atomic import remove_stale_temporaries, replace_folder, temporary_folder
from ..provenance import PROVENANCE_FILE, read_provenance, write_provenance
from .destination import check_destination
from .errors import ConversionError

#: Files of SRC that DST gets as they are (the weights and config are written anew)
_SKIPPED = ("config.json", "model.safetensors", "model.safetensors.index.json", PROVENANCE_FILE)


def add_router(src: str | os.PathLike, dst: str | os.PathLike, *, seed: int = 0, overwrite: bool = False):
    """Write ``dst``: the internvlx-hf checkpoint ``src`` with an untrained router, off. Returns the model's
    router parameter count."""
    from ..modeling import InternVLXConfig, InternVLXForConditionalGeneration
    from ..modeling.configuration_internvlx import ViRConfig

    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    config = InternVLXConfig.from_pretrained(src)
    if config.vir is not None:
        raise ConversionError(f"{src} has a router already (config.vir); train it again with --preset vico-router "
                              "instead of adding one.")
    try:
        config.vir = ViRConfig(enabled=False, compressed_downsample_ratio=config.downsample_ratio / 2).resolve(config)
    except ValueError as error:
        raise ConversionError(f"{src} cannot take InternVL3.5-Flash's router: {error}") from None
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # (its load report lists the router's weights as missing: they are)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = InternVLXForConditionalGeneration.from_pretrained(src, config=config, dtype="auto",
                                                                            output_loading_info=True)
            model.model.vir.reset_parameters()
    finally:
        transformers_logging.set_verbosity(verbosity)
    unexpected = [key for key in info["missing_keys"] if not key.startswith("model.vir.")] + \
        list(info["unexpected_keys"])
    if unexpected:
        raise ConversionError(f"{src}'s weights do not fit its config beyond the router: {sorted(unexpected)[:5]}; "
                              "check that the folder loads with from_pretrained.")
    model.model.vir.freeze()
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = temporary_folder(dst)
    try:
        for path in src.iterdir():
            if path.is_file() and path.name not in _SKIPPED and not path.name.startswith("model-"):
                shutil.copy2(path, tmp / path.name)
        model.save_pretrained(tmp)
        record = read_provenance(src)
        record.setdefault("router", {}).update(added={"seed": seed, "parameters": count(model)})
        write_provenance(tmp, record)
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count(model)


def count(model) -> int:
    return sum(parameter.numel() for parameter in model.model.vir.parameters())


__all__ = ["add_router"]
