"""The model's input checks, run before the vision tower: every tile, flag, count and grid consistent with the prompt,
each error naming the input and its fix (an inconsistent input would otherwise fail deep in a dependency, or worse,
silently pair features with the wrong tokens).

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import torch

from .configuration_internvlx import image_and_patch
from .lvtc import check_whole_tiles, image_token_runs


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id inside the vocabulary (else an index error deep in the embedding, a device assert on GPU)."""
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if torch.compiler.is_compiling():
        # Reading the answer in Python (`bool(...)`) would break a compiled graph: check inside it instead.
        torch._assert_async(~outside.any(), f"input_ids contains ids outside the vocabulary of {vocab_size} "
                            "tokens; run the model without torch.compile to see which.")
        return
    if bool(outside.any()):
        bad = input_ids[outside]
        raise ValueError(
            f"input_ids contains id {int(bad[0])} ({bad.numel()} id(s) in all) outside the vocabulary of "
            f"{vocab_size} tokens (valid ids: 0..{vocab_size - 1}). Tokenize with this model's tokenizer; ids "
            "added to the tokenizer need model.resize_token_embeddings(len(tokenizer))."
        )


def check_pixel_values(config, pixel_values) -> None:
    """``pixel_values`` is a tensor of tiles the vision tower takes: ``(tiles, channels, image_size, image_size)``."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor (tiles, 3, H, W), got {type(pixel_values).__name__}"
                        "; the processor returns it with return_tensors='pt'.")
    image_size, _ = image_and_patch(config.vision_config)
    channels = getattr(config.vision_config, "num_channels", 3)
    expected = f"(tiles, {channels}, {image_size}, {image_size})"
    if pixel_values.ndim != 4:
        hint = " (one image: add the tile dimension with pixel_values[None])" if pixel_values.ndim == 3 else ""
        raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}{hint}; "
                         "the processor's output has this layout.")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds 0 tiles; for text-only inputs pass pixel_values=None (and no "
                         "<IMG_CONTEXT> tokens).")
    if pixel_values.shape[1] != channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels (shape {tuple(pixel_values.shape)})"
                         f" but the vision tower takes {channels} (RGB) in {expected}; convert images with the "
                         "processor (it makes RGB).")
    if tuple(pixel_values.shape[2:]) != (image_size, image_size):
        raise ValueError(f"pixel_values tiles are {pixel_values.shape[2]}x{pixel_values.shape[3]} but this "
                         f"model takes {image_size}x{image_size} tiles {expected}; the processor resizes and "
                         f"tiles images (its image_size must be {image_size}).")


def check_image_flags(image_flags, tiles: int) -> None:
    if image_flags.numel() != tiles:
        raise ValueError(f"image_flags has {image_flags.numel()} entries but pixel_values holds {tiles} tiles; "
                         "give one flag per tile (1 = real tile, 0 = dummy tile).")


def check_image_inputs(config, pixel_values, image_mask, image_flags, num_patches, tile_grid) -> None:
    """Every consistency check between the tiles and the prompt, before the vision tower runs.

    Under ``torch.compile`` only the checks that need no tensor values run (shapes), plus the token count as an
    assert inside the graph: the others read tensors in Python (runs of image tokens, ``num_patches``), which
    breaks the graph. The eager forward gives the full, explained errors.
    """
    check_pixel_values(config, pixel_values)
    tiles = pixel_values.shape[0]
    if torch.compiler.is_compiling() and image_flags is None:
        per_tile = config.image_seq_length
        torch._assert_async(image_mask.sum() == tiles * per_tile,
                            f"the number of image tokens is not {per_tile} x the {tiles} tiles of pixel_values; "
                            "run the model without torch.compile for the details.")
        return
    kept = tiles
    if image_flags is not None:
        check_image_flags(image_flags, tiles)
        kept = int((image_flags.reshape(-1) == 1).sum())
    per_tile = config.image_seq_length
    n_tokens = int(image_mask.sum())
    if n_tokens != kept * per_tile:
        raise ValueError(
            f"Image features and image tokens do not match: the input has {n_tokens} image tokens "
            f"(id {config.image_token_id}) but the {kept} tiles give {kept * per_tile} features "
            f"({per_tile} per tile). Build the prompt with the processor so that every image's tiles get their "
            "<IMG_CONTEXT> tokens."
        )
    check_whole_tiles(image_mask, per_tile)
    if num_patches is not None:
        num_patches = torch.as_tensor(num_patches).reshape(-1).tolist()
        if sum(num_patches) != tiles:
            raise ValueError(f"num_patches sums to {sum(num_patches)} tiles but pixel_values holds {tiles}; "
                             "pass the processor's outputs together.")
        runs = [length for _, _, length in image_token_runs(image_mask)]
        if image_flags is None and [n * per_tile for n in num_patches] != runs:
            raise ValueError(
                f"num_patches {num_patches} (tiles per image) does not match the prompt's <IMG_CONTEXT> runs of "
                f"{runs} tokens ({per_tile} per tile, one run per image); pass the processor's outputs together."
            )
    if tile_grid is not None:
        grid = torch.as_tensor(tile_grid).reshape(-1, 2).tolist()
        grid_tiles = [cols * rows for cols, rows in grid]
        if num_patches is not None:
            ok = len(grid) == len(num_patches) and all(
                n == g or (g > 1 and n == g + 1) for n, g in zip(num_patches, grid_tiles))
            detail = f"num_patches {num_patches}"
        else:
            ok = sum(grid_tiles) <= tiles <= sum(g + (g > 1) for g in grid_tiles)
            detail = f"{tiles} tiles in pixel_values"
        if not ok:
            raise ValueError(
                f"tile_grid {grid} ((cols, rows) per image; each grid gives cols*rows tiles, plus a thumbnail when "
                f"it has more than one) does not match {detail}; pass the processor's outputs together."
            )
