"""Images of InternVL data: sizes from file headers, decoding for training, and InternVL's tile budget."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..processing.image_processing_internvlx import load_rgb_image
from .formats import SampleError


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image from its header; raises `SampleError` if it is missing or unreadable."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):  # an undecoded datasets.Image
        if image.get("bytes"):
            image = io.BytesIO(image["bytes"])
        elif image.get("path"):
            image = image["path"]
    if isinstance(image, (str, os.PathLike)) and os.path.isdir(image):
        raise SampleError("image is a folder", f"image {os.fspath(image)!r} is a folder, not an image file; give "
                                               "the path of the image file")
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise SampleError("image not found", f"image {os.fspath(image)!r} not found")
    if isinstance(image, (str, os.PathLike, io.BytesIO)):
        try:
            with Image.open(image) as opened:
                return opened.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            name = os.fspath(image) if not isinstance(image, io.BytesIO) else "<bytes>"
            raise SampleError("unreadable image", f"image {name!r} is not a readable image ({error})") from None
    if hasattr(image, "shape"):  # uint8 array / tensor: the processor takes HWC or CHW
        shape = tuple(image.shape)
        height, width = (shape[1], shape[2]) if len(shape) == 3 and shape[0] in (1, 3, 4) else shape[:2]
        return int(width), int(height)
    raise SampleError("unreadable image", f"unsupported image of type {type(image).__name__}")


def load_image(image: Any, index: int = 0) -> Image.Image:
    """Decode an image for training (file path, PIL image, array, or undecoded datasets.Image dict) as RGB."""
    if isinstance(image, dict):
        if image.get("bytes"):
            image = Image.open(io.BytesIO(image["bytes"]))
        else:
            image = image.get("path")
    return load_rgb_image(image, index)


class TileBudget:
    """Tiles per image under the processor's RVTC settings (``tiling``, ``max_tiles``), with InternVL's rules.

    A sample's budget is its dataset's ``max_dynamic_patch`` or else the processor's ``max_tiles``; a sample with N
    images gives each image ``max(1, budget // N)`` tiles, as InternVL's training does. The processor's settings are
    the single source: the dataset's length estimates and the collator's tiling always agree, and the saved
    processor tiles at inference as training did.
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def options(self, sample_max_tiles: int | None, num_images: int) -> dict[str, Any]:
        budget = sample_max_tiles or self.image_processor.max_tiles
        max_tiles = max(1, budget // max(1, num_images))
        return {"max_tiles": max_tiles, "min_tiles": min(self.image_processor.min_tiles, max_tiles)}

    def tiles(self, sizes: list[tuple[int, int]], sample_max_tiles: int | None) -> list[int]:
        options = self.options(sample_max_tiles, len(sizes))
        return [self.image_processor.get_number_of_image_patches(h, w, options) for w, h in sizes]


def apply_tile_precedence(sources: list, image_processor, max_tiles: int | None, saves: bool = True,
                          save_budget: bool = False) -> str:
    """One precedence for the tile budget in training: --max_tiles, when given, is every dataset's; else a dataset's
    max_dynamic_patch is its own; else the processor's max_tiles. Each dataset's budget is pinned on its source, so
    that training tiles by it whatever the processor's max_tiles. The processor (what a training run saves) keeps the
    source checkpoint's max_tiles, so that the trained model tiles at inference as the source did; with `save_budget`
    it gets the largest budget training used (--save_max_tiles). Returns the line that says which applies and what
    is saved (``saves`` False: for a command that saves nothing, `data check`, the line says what training would
    save)."""
    source_tiles = image_processor.max_tiles
    own = {s.name: s.max_dynamic_patch for s in sources if s.max_dynamic_patch is not None}
    if max_tiles is not None:
        for source in sources:
            source.max_dynamic_patch = max_tiles
        overridden = ", ".join(f"{name} {value}" for name, value in own.items() if value != max_tiles)
        line = (f"Tiles: --max_tiles {max_tiles} for every dataset"
                + (f" (it overrides max_dynamic_patch of {overridden})" if overridden else ""))
    elif not own:  # (nothing to say of the saved processor: it is the source's, and training tiles by it)
        for source in sources:
            source.max_dynamic_patch = source_tiles
        return f"Tiles: the processor's max_tiles {source_tiles} for every dataset"
    else:
        others = [s.name for s in sources if s.max_dynamic_patch is None]
        for source in sources:
            if source.max_dynamic_patch is None:
                source.max_dynamic_patch = source_tiles
        used = ", ".join(f"{name} {value}" for name, value in own.items())
        rest = f", the processor's {source_tiles} for {', '.join(others)}" if others else ""
        line = f"Tiles: each dataset's max_dynamic_patch ({used}){rest} (--max_tiles N sets one budget for all)"
    budget = max(source.max_dynamic_patch for source in sources) if sources else source_tiles
    saved = "the saved processor" if saves else "training would save the processor with"
    if budget == source_tiles:
        return f"{line}; {saved} {'keeps ' if saves else ''}max_tiles {source_tiles}"
    if save_budget:
        image_processor.max_tiles = budget
        return (f"{line}; the saved processor gets max_tiles {budget} (--save_max_tiles; the source's was "
                f"{source_tiles}): the model then tiles images at up to {budget} at inference")
    return (f"{line}; {saved} {'keeps ' if saves else ''}the source's max_tiles {source_tiles} (training tiles at "
            f"up to {budget}; --save_max_tiles saves that instead)")


__all__ = ["TileBudget", "apply_tile_precedence", "image_size", "load_image"]
