# Copyright 2025 The internvlx-hf developers. Licensed under the Apache License, Version 2.0.
"""Image processor for InternVL2 / InternVL-X: dynamic 448px tiling with the paper's RVTC tile-count rules.

This file is copied next to checkpoints as remote code: it imports only the standard library, torch, PIL and
transformers (PIL because the reference resizes and converts with PIL and its behaviour must be matched exactly).

Images are accepted in every form transformers' `load_image` accepts (a file path, an http(s) URL, a
`data:image/...;base64,...` URI or bare base64 text, a PIL image) plus uint8 numpy arrays and torch tensors; see
`load_image_input`.
"""

import base64
import io
import math
import os
import re
import struct
import urllib.parse
import zlib
from enum import Enum
from functools import lru_cache
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    is_pil_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_numpy_array, is_torch_tensor


class TilingMode(str, Enum):
    """How many 448px tiles an image gets (paper Sec. 3.3, "RVTC").

    - ``"ratio"``: InternVL2's aspect-ratio matching over every grid with ``min_tiles <= cols*rows <= max_tiles``.
    - ``"area"``: RVTC area matching, ``max_tiles = min(max_tiles, ceil(W*H / image_size**2))``, then ratio matching.
    - ``"edge"``: RVTC edge matching (the InternVL-X release),
      ``max_tiles = min(max_tiles, ceil(W/image_size) * ceil(H/image_size))``, then ratio matching.
    - ``"none"``: a single tile, the whole image resized to ``image_size x image_size``.
    """

    RATIO = "ratio"
    AREA = "area"
    EDGE = "edge"
    NONE = "none"


def _tiling_mode(tiling: "TilingMode | str") -> TilingMode:
    try:
        return TilingMode(tiling)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in TilingMode)
        raise ValueError(f"tiling must be one of {valid}, got {tiling!r}") from None


def _check_tiling_options(min_tiles: Any, max_tiles: Any, image_size: Any) -> None:
    for name, value in (("min_tiles", min_tiles), ("max_tiles", max_tiles), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles ({min_tiles}) must not exceed max_tiles ({max_tiles})")


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # The reference collects the grids in a Python set and then sorts them by tile count with a stable sort, so grids
    # with the same count keep the set's iteration order. That order decides exact ties (e.g. 2x3 vs 3x2 when
    # min_tiles is 6), so the set is built with the same insertion sequence to reproduce it.
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def get_tile_grid(
    width: int,
    height: int,
    tiling: "TilingMode | str" = TilingMode.RATIO,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
) -> tuple[int, int]:
    """Tile grid ``(cols, rows)`` an image of ``width x height`` pixels is cut into (thumbnail not included).

    Ratio matching picks the grid whose ``cols/rows`` is closest to ``width/height``; on an exact tie a later
    (larger) grid wins only while the image area exceeds half of that grid's pixel area, as in InternVL2. When the
    RVTC cap falls below ``min_tiles`` no grid qualifies and, like the reference, a single tile is used.
    """
    mode = _tiling_mode(tiling)
    _check_tiling_options(min_tiles, max_tiles, image_size)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"image {name} must be an integer >= 1, got {value!r}")

    if mode is TilingMode.NONE:
        return (1, 1)
    if mode is TilingMode.AREA:
        # Paper Sec. 3.3: R = min(R, ceil(W * H / 448^2)); integer ceil avoids float rounding on huge images.
        max_tiles = min(max_tiles, -(-(width * height) // (image_size * image_size)))
    elif mode is TilingMode.EDGE:
        # Paper Sec. 3.3 / InternVL-X release: R = min(R, ceil(W / 448) * ceil(H / 448)).
        max_tiles = min(max_tiles, math.ceil(width / image_size) * math.ceil(height / image_size))

    aspect_ratio = width / height
    area = width * height
    best_grid, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_grid, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


class InternVLXImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    image_size (`int`, *optional*, defaults to `self.image_size`):
        Side of the square tiles fed to the vision tower (448 for InternViT-300M-448px).
    min_tiles (`int`, *optional*, defaults to `self.min_tiles`):
        Smallest grid (cols*rows) considered by the tiling.
    max_tiles (`int`, *optional*, defaults to `self.max_tiles`):
        Largest grid (cols*rows); InternVL2 and InternVL-X use 6 or 12.
    use_thumbnail (`bool`, *optional*, defaults to `self.use_thumbnail`):
        Append a whole-image thumbnail tile after the grid when the grid has more than one tile.
    tiling (`str` or `TilingMode`, *optional*, defaults to `self.tiling`):
        `"ratio"`, `"area"`, `"edge"` or `"none"`, see [`TilingMode`].
    apply_exif_orientation (`bool`, *optional*, defaults to `self.apply_exif_orientation`):
        Rotate/flip images as their EXIF orientation tag says before tiling. Off by default because the reference
        preprocessing (`Image.open(f).convert("RGB")`) ignores EXIF.
    crop_to_patches (`bool`, *optional*, defaults to `True`):
        transformers' InternVL name for tiling: `False` makes every image one tile (the whole image resized, as
        ``max_tiles=1``). TRL's trainers pass it to count an InternVL batch's tiles.
    """

    image_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tiling: str
    apply_exif_orientation: bool
    crop_to_patches: bool


def _shorten(text: str, limit: int = 120) -> str:
    """``repr`` of ``text``, cut to its first characters when long (a data URI can be megabytes of base64)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:48]!r}... ({len(text)} characters)"


def describe_image_input(index: int, source: Any) -> str:
    """How errors name an input: ``image 0 ('photo.jpg')``, ``image 1 (ndarray)``, long strings cut short."""
    if isinstance(source, (str, os.PathLike)):
        return f"image {index} ({_shorten(os.fspath(source))})"
    filename = getattr(source, "filename", None) if is_pil_image(source) else None
    if filename:
        return f"image {index} ({type(source).__name__} from {filename!r})"
    return f"image {index} ({type(source).__name__})"


def flatten_images(images: Any) -> list[Any]:
    """Images in order: one image, a list of images, or a list of lists (one per prompt); 4D arrays are batches."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if (is_torch_tensor(images) or is_numpy_array(images)) and images.ndim == 4:
        return list(images)
    return [images]


def _array_to_pil(image: Any) -> Image.Image:
    """uint8 HW / HWC / CHW numpy array or torch tensor -> PIL image (mode L, LA, RGB or RGBA by channel count)."""
    if is_torch_tensor(image):
        image = image.detach().cpu()
    if str(image.dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(
            f"arrays and tensors must hold uint8 pixels (0-255), got dtype {image.dtype}; convert them first, e.g. "
            "`(x * 255).round().clamp(0, 255).to(torch.uint8)`, or pass a PIL image"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an array of 2 (HW) or 3 (HWC/CHW) dims, got shape {tuple(image.shape)}")
    channels_first, channels_last = image.shape[0] in (1, 2, 3, 4), image.shape[-1] in (1, 2, 3, 4)
    if not (channels_first or channels_last):
        raise ValueError(f"cannot tell the channel axis of an array of shape {tuple(image.shape)}; use HWC or CHW")
    if channels_first and channels_last:
        # Ambiguous (tiny) shapes: tensors are channels-first by convention, numpy arrays channels-last.
        channels_first = is_torch_tensor(image)
    height, width = image.shape[1:] if channels_first else image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"the image is empty (array shape {tuple(image.shape)}); every side must be >= 1 pixel")
    channel_format = ChannelDimension.FIRST if channels_first else ChannelDimension.LAST
    return to_pil_image(image, do_rescale=False, input_data_format=channel_format)


# What PIL's decoders raise on data they cannot parse (a truncated file, garbage after a valid header). Truncated
# files are never decoded partially: PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left off.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError)


def _undecodable(where: str, err: BaseException) -> ValueError:
    return ValueError(
        f"{where}: the image data could not be decoded ({err or type(err).__name__}); the file is probably "
        "truncated or corrupt. Re-download or re-export it."
    )


#: Seconds an http(s) image may take to download (transformers' `load_image` timeout) before a clear error is raised.
IMAGE_URL_TIMEOUT = 10.0

_ACCEPTED = ("pass an existing image file path, an http(s) URL, a data:image/...;base64,... URI, a PIL image, or a "
             "uint8 numpy array / torch tensor (HWC or CHW)")
# Bare base64 text (no data: prefix), as transformers' `load_image` takes it: the base64 alphabets (standard and
# URL-safe) and padding only, long enough that a short file name without a dot is not mistaken for it.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")


def _decode_base64(text: str, where: str) -> bytes:
    """Strict base64 decoding (standard or URL-safe alphabet, line breaks and missing padding tolerated); invalid
    characters are an error naming the input, not silently skipped as `base64.decodebytes` (transformers') does."""
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except ValueError as err:  # binascii.Error, or non-ASCII text
        raise ValueError(
            f"{where}: the base64 data is invalid ({err}); send the image file's bytes base64-encoded, e.g. "
            "`'data:image/png;base64,' + base64.b64encode(open(path, 'rb').read()).decode()`"
        ) from None


def _decode_data_uri(uri: str, where: str) -> bytes:
    """The bytes of an RFC 2397 ``data:[<media type>][;base64],<data>`` URI."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ValueError(f"{where}: a data URI needs a comma before its data, as in 'data:image/png;base64,iVBORw0...'")
    if header.lower().endswith(";base64"):
        return _decode_base64(payload, where)
    return urllib.parse.unquote_to_bytes(payload)


def _open_encoded(source: Any, where: str) -> Image.Image:
    """Open and decode an encoded image (a file path, or a binary file object holding the bytes of a PNG/JPEG/...),
    turning PIL's errors into ones that name the input."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{where}: refused as a possible decompression bomb ({err}). PIL's limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels; if you trust this file, raise it "
            "(e.g. `PIL.Image.MAX_IMAGE_PIXELS = None`) or downscale the image first."
        ) from err
    except UnidentifiedImageError as err:
        raise ValueError(
            f"{where}: not a readable image (PIL cannot identify the format; the file may be corrupt or not an "
            "image). Re-export it as PNG or JPEG."
        ) from err
    except OSError as err:
        if err.errno is not None:  # the file system's error (permissions, I/O), not the image data's
            raise OSError(err.errno, f"{where}: cannot read the file ({err.strerror}); check that it is a "
                                     "readable file") from err
        raise _undecodable(where, err) from err
    except _DECODE_ERRORS as err:  # a recognised header followed by data PIL cannot parse
        raise _undecodable(where, err) from err
    try:
        image.load()
    except _DECODE_ERRORS as err:
        image.close()
        raise _undecodable(where, err) from err
    return image


def _download(url: str, where: str, timeout: float) -> Image.Image:
    """An http(s) image through transformers' `load_image` (the loader of its pipelines and `transformers serve`).

    `load_image` applies the EXIF orientation and converts to RGB itself, so `apply_exif_orientation` has no effect
    on URL images (it does on files, data URIs and PIL images)."""
    from transformers.image_utils import load_image

    try:
        return load_image(url, timeout=timeout)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{where}: refused as a possible decompression bomb ({err}); download the image, check "
                         "it and pass the file (raising PIL.Image.MAX_IMAGE_PIXELS if you trust it)") from None
    except UnidentifiedImageError:
        raise ValueError(f"{where}: the server's answer is not an image PIL can read (an error page?); check that "
                         "the URL points at an image file") from None
    except Exception as err:  # noqa: BLE001 - one clear error for whatever the HTTP client or PIL raised
        if not type(err).__module__.startswith("httpx") and not isinstance(err, (ConnectionError, TimeoutError)):
            raise _undecodable(where, err) from None  # PIL decoding the downloaded bytes (e.g. a truncated file)
        # The HTTP client's errors (httpx: connection refused, DNS, TLS, timeouts) carry no OSError errno.
        error_class = TimeoutError if "timeout" in type(err).__name__.lower() else ConnectionError
        raise error_class(_offline(where, timeout, err)) from None


def _offline(where: str, timeout: float, err: BaseException) -> str:
    return (f"{where}: could not download the image ({type(err).__name__}: {str(err) or 'no details'}; timeout "
            f"{timeout:g} s); check the URL and that this machine can reach it (it may be offline), or download the "
            "image and pass its file path or a data: URI")


def load_image_input(image: Any, where: str | None = None, timeout: float = IMAGE_URL_TIMEOUT) -> Image.Image:
    """One image input as a decoded PIL image, with errors that name it (``where``, default ``"image 0 (...)"``).

    Accepts what transformers' `load_image` accepts, and arrays:

    - a file path (`str` or `pathlib.Path`);
    - an ``http://`` / ``https://`` URL, downloaded with transformers' `load_image` within ``timeout`` seconds;
    - a ``data:`` URI (``data:image/png;base64,...``, as OpenAI-style chat clients send images) or bare base64 text;
    - a PIL image (returned as is);
    - a uint8 numpy array or torch tensor (HW, HWC or CHW).

    Files and encoded bytes keep their mode and EXIF orientation as stored (the reference ignores EXIF; the
    processor applies it only with ``apply_exif_orientation``); anything else is one clear error: a `TypeError` for
    an unsupported type, `FileNotFoundError` for a path that does not exist, `ValueError` for data that does not
    decode (bad base64, not an image, a truncated file), `ConnectionError` / `TimeoutError` for a URL that cannot be
    downloaded.
    """
    where = where if where is not None else describe_image_input(0, image)
    if is_pil_image(image):
        return image
    if is_numpy_array(image) or is_torch_tensor(image):
        try:
            return _array_to_pil(image)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"{where}: unsupported image type {type(image).__name__}; {_ACCEPTED}.")

    text = os.fspath(image)
    if isinstance(image, str):
        scheme = text[:8].lower()
        if scheme.startswith(("http://", "https://")):
            return _download(text, where, timeout)
        if scheme.startswith("data:"):
            return _open_encoded(io.BytesIO(_decode_data_uri(text, where)), where)
    # os.path's checks answer False (not OSError) for names too long to be paths, such as base64 text.
    if os.path.isdir(text):
        raise IsADirectoryError(f"{where}: a folder, not an image file. Pass the path of an image file.")
    if os.path.isfile(text):
        return _open_encoded(text, where)
    if isinstance(image, str) and _BASE64_TEXT.fullmatch("".join(text.split())):
        try:
            return _open_encoded(io.BytesIO(_decode_base64(text, where)), where)
        except ValueError:  # not base64 image data after all: most likely a mistyped path
            raise FileNotFoundError(f"{where}: no such file, nor base64-encoded image data; {_ACCEPTED}.") from None
    raise FileNotFoundError(f"{where}: no such file; {_ACCEPTED}.")


def load_rgb_image(image: Any, index: int = 0, apply_exif_orientation: bool = False) -> Image.Image:
    """Open/convert one input the way the reference does (`Image.open(f).convert("RGB")`), with errors that name it.

    Accepts everything `load_image_input` does: paths, http(s) URLs, data URIs / base64, PIL images, uint8 arrays.
    """
    where = describe_image_input(index, image)
    image = load_image_input(image, where)
    try:
        if apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        image.load()
    except _DECODE_ERRORS as err:
        raise _undecodable(where, err) from err
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{where}: the image is empty ({image.width}x{image.height}); every side must be >= 1 pixel")
    if image.mode == "RGB":
        return image
    # The reference's plain `convert("RGB")`: alpha is dropped (not composited), palettes are looked up, CMYK uses
    # PIL's naive formula (no ICC profile) and 16/32-bit integer modes are clipped to 0-255, not rescaled.
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{where}: PIL cannot convert mode {image.mode!r} to RGB ({err}); convert the image to RGB yourself first."
        ) from err


class InternVLXImageProcessor(PilBackend):
    r"""
    Image processor of InternVL2 / InternVL-X checkpoints (PIL backend, no torchvision needed).

    Each image is converted to RGB, resized (bicubic) to `(cols * image_size, rows * image_size)` for the grid chosen
    by [`get_tile_grid`], cut into `cols * rows` row-major tiles, followed by a whole-image thumbnail tile when the grid
    has more than one tile, then scaled to [0, 1] and normalized with the ImageNet mean/std. This reproduces the
    reference `load_image` / `dynamic_preprocess` of OpenGVLab/InternVL (`tiling="ratio"`) and of ludc506/InternVL-X
    (`tiling="edge"`) exactly.

    Returns a [`BatchFeature`] with
    - `pixel_values`: float32 tensor `(total_tiles, 3, image_size, image_size)`, the tiles of all images in order;
    - `num_patches`: tiles per image, thumbnail included;
    - `tile_grid`: `(cols, rows)` per image.
    With `return_tensors="pt"` the last two are `LongTensor`s of shape `(num_images,)` and `(num_images, 2)`.
    """

    valid_kwargs = InternVLXImageProcessorKwargs
    model_input_names = ["pixel_values", "num_patches", "tile_grid"]

    image_size = 448
    min_tiles = 1
    max_tiles = 12
    use_thumbnail = True
    tiling = TilingMode.RATIO
    apply_exif_orientation = False
    resample = PILImageResampling.BICUBIC
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = True

    def __init__(self, **kwargs: Unpack[InternVLXImageProcessorKwargs]):
        super().__init__(**kwargs)
        _check_tiling_options(self.min_tiles, self.max_tiles, self.image_size)

    def _standardize_kwargs(self, tiling: "TilingMode | str | None" = None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        kwargs["tiling"] = _tiling_mode(tiling) if tiling is not None else None
        return kwargs

    def _validate_preprocess_kwargs(self, min_tiles=None, max_tiles=None, image_size=None, **kwargs):
        _check_tiling_options(min_tiles, max_tiles, image_size)
        # Tiles are always resized to `image_size`, so the generic `size`/crop/pad checks do not apply.
        kwargs.update(do_resize=False, do_center_crop=False, do_pad=False)
        super()._validate_preprocess_kwargs(**kwargs)

    def fetch_images(self, image_url_or_urls: Any):
        # Paths, URLs and data URIs are opened in `_prepare_image_like_inputs` (`load_image_input`), where errors can
        # name the image and EXIF is optional (transformers' `load_image` always applies EXIF orientation, which the
        # reference does not).
        return image_url_or_urls

    def _prepare_image_like_inputs(
        self, images: Any, *args, apply_exif_orientation: bool = False, **kwargs
    ) -> list[Image.Image]:
        return [
            load_rgb_image(image, index, apply_exif_orientation=apply_exif_orientation)
            for index, image in enumerate(flatten_images(images))
        ]

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles (thumbnail included) an image of `height x width` becomes under this processor's settings, or with
        `images_kwargs` overriding them; transformers' token-accounting hook."""
        options = {
            "tiling": self.tiling,
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "image_size": self.image_size,
            "use_thumbnail": self.use_thumbnail,
            **{key: value for key, value in (images_kwargs or {}).items() if value is not None},
        }
        cols, rows = get_tile_grid(
            width, height, options["tiling"], options["min_tiles"], options["max_tiles"], options["image_size"]
        )
        return cols * rows + (1 if options["use_thumbnail"] and cols * rows > 1 else 0)

    def _preprocess(
        self,
        images: list[Image.Image],
        image_size: int,
        min_tiles: int,
        max_tiles: int,
        use_thumbnail: bool,
        tiling: TilingMode,
        resample: "PILImageResampling | int",
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        return_tensors: str | TensorType | None = None,
        crop_to_patches: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if crop_to_patches is False:
            min_tiles = max_tiles = 1
        grids = [
            get_tile_grid(image.width, image.height, tiling, min_tiles, max_tiles, image_size) for image in images
        ]
        num_patches = [cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0) for cols, rows in grids]

        # ToTensor in the reference computes `u8 / 255` in float32; dividing (not multiplying by 1/255) keeps the
        # values bit-identical to it. The division is fused with the uint8 -> float32 copy of each tile.
        divisor = None
        if do_rescale and abs(1.0 / rescale_factor - round(1.0 / rescale_factor)) < 1e-6:
            divisor = torch.tensor(float(round(1.0 / rescale_factor)), dtype=torch.float32)  # float32 math always

        def write(dst: torch.Tensor, src: torch.Tensor) -> None:
            if divisor is not None:
                torch.div(src, divisor, out=dst)
            else:
                dst.copy_(src)
                if do_rescale:
                    dst.mul_(rescale_factor)

        # One float32 buffer for every tile of the batch, filled image by image (no per-tile arrays, no concat).
        pixel_values = torch.empty((sum(num_patches), 3, image_size, image_size), dtype=torch.float32)
        start = 0
        for image, (cols, rows), count in zip(images, grids, num_patches):
            resized = image.resize((cols * image_size, rows * image_size), resample=resample)
            tiles = _pil_to_uint8(resized).view(rows, image_size, cols, image_size, 3).permute(0, 2, 4, 1, 3)
            write(pixel_values[start : start + cols * rows].view(rows, cols, 3, image_size, image_size), tiles)
            if count > cols * rows:
                thumbnail = image.resize((image_size, image_size), resample=resample)
                write(pixel_values[start + cols * rows], _pil_to_uint8(thumbnail).permute(2, 0, 1))
            start += count

        if do_normalize:
            # Normalize's `(x - mean) / std`, in float32 and in that order, like torchvision in the reference.
            mean = torch.as_tensor(image_mean, dtype=torch.float32).reshape(-1, 1, 1)
            std = torch.as_tensor(image_std, dtype=torch.float32).reshape(-1, 1, 1)
            pixel_values.sub_(mean).div_(std)

        data = {"pixel_values": pixel_values, "num_patches": num_patches, "tile_grid": [list(g) for g in grids]}
        if return_tensors is not None and TensorType(return_tensors) == TensorType.PYTORCH:
            data["num_patches"] = torch.tensor(num_patches, dtype=torch.long)
            data["tile_grid"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["tiling"] = _tiling_mode(output.get("tiling", self.tiling)).value
        return output


def _pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (H, W, 3) holding a copy of its pixel bytes (no numpy needed)."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


InternVLXImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "IMAGE_URL_TIMEOUT",
    "InternVLXImageProcessor",
    "InternVLXImageProcessorKwargs",
    "TilingMode",
    "describe_image_input",
    "get_tile_grid",
    "load_image_input",
]
