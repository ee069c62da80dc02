"""InternVLXImageProcessor: RVTC tile grids, pixel parity with the reference preprocessing, input handling, errors."""

import hashlib
import io
import json
import math
import re
import struct
import zlib

import numpy as np
import pytest
import torch
import golden
from conftest import require_fixture
from PIL import Image, ImageFile

from internvlx_hf.processing import InternVLXImageProcessor, TilingMode, get_tile_grid

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def reference_float(tiles_u8: torch.Tensor) -> torch.Tensor:
    """The fixture README's formula: ((u8 / 255) - mean) / std in float32, in that order."""
    return ((tiles_u8.to(torch.float32) / 255) - MEAN) / STD


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
    return Image.frombytes(mode, (width, height), pixels.numpy().tobytes())


def chw_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def recover_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """Invert the normalization (exact for these values) to read back the uint8 RGB pixels that were fed in."""
    return ((pixel_values * STD + MEAN) * 255).round().to(torch.uint8)


# --- tile grids ------------------------------------------------------------------------------------------------


@pytest.mark.fixtures
def test_tile_grids_match_reference_for_every_fixture_size():
    table = golden.read_json("rvtc_tiling.json")
    processor = InternVLXImageProcessor()
    checked = 0
    for case in table["cases"]:
        for key in ("ratio_max6", "ratio_max12", "edge_max6", "edge_max12"):
            mode, max_tiles = key.split("_max")
            expected = case[key]
            grid = get_tile_grid(case["w"], case["h"], mode, min_tiles=1, max_tiles=int(max_tiles), image_size=448)
            assert grid == (expected["cols"], expected["rows"]), (case["w"], case["h"], key)
            patches = processor.get_number_of_image_patches(
                case["h"], case["w"], {"tiling": mode, "max_tiles": int(max_tiles)}
            )
            assert patches == expected["total_tiles"], (case["w"], case["h"], key)
            checked += 1
    assert checked == 4 * 300


def test_area_matching_paper_examples():
    # Paper Sec. 3.3 with R = 6: an 80x20 image gets 4 tiles (4:1) by ratio matching, a 345x372 image stays whole.
    assert get_tile_grid(80, 20, "ratio", max_tiles=6) == (4, 1)
    assert get_tile_grid(345, 372, "ratio", max_tiles=6) == (1, 1)
    # Area matching: R = min(6, ceil(W*H / 448^2)) = 1 for both, so one tile each.
    assert math.ceil(80 * 20 / 448**2) == 1 and math.ceil(345 * 372 / 448**2) == 1
    assert get_tile_grid(80, 20, "area", max_tiles=6) == (1, 1)
    assert get_tile_grid(345, 372, "area", max_tiles=6) == (1, 1)
    # 900x300: R_area = ceil(270000 / 200704) = 2 -> 2x1; R_edge = ceil(900/448) * ceil(300/448) = 3 -> 3x1.
    assert get_tile_grid(900, 300, "area", max_tiles=6) == (2, 1)
    assert get_tile_grid(900, 300, "edge", max_tiles=6) == (3, 1)
    assert get_tile_grid(900, 300, "ratio", max_tiles=6) == (3, 1)
    # 1000x747: R_area = ceil(747000 / 200704) = 4; 1x1 and 2x2 tie on aspect ratio and the area
    # (747000 > 0.5 * 448^2 * 4) favours 2x2 -> 4 + thumbnail = 5 tiles instead of ratio matching's 3x2 + 1 = 7.
    assert get_tile_grid(1000, 747, "area", max_tiles=6) == (2, 2)
    assert get_tile_grid(1000, 747, "ratio", max_tiles=6) == (3, 2)
    processor = InternVLXImageProcessor(tiling="area", max_tiles=6)
    assert processor.get_number_of_image_patches(747, 1000) == 5
    assert processor.get_number_of_image_patches(20, 80) == 1


@pytest.mark.fixtures
def test_area_matching_is_ratio_matching_under_the_area_cap():
    table = golden.read_json("rvtc_tiling.json")
    for case in table["cases"]:
        w, h = case["w"], case["h"]
        for max_tiles in (6, 12):
            cap = min(max_tiles, math.ceil(w * h / 448**2))
            assert get_tile_grid(w, h, "area", max_tiles=max_tiles) == get_tile_grid(w, h, "ratio", max_tiles=cap)
            if cap == max_tiles:
                expected = case[f"ratio_max{max_tiles}"]
                assert get_tile_grid(w, h, "area", max_tiles=max_tiles) == (expected["cols"], expected["rows"])


def test_none_mode_and_edge_cases_of_the_tiling_rule():
    assert get_tile_grid(5000, 100, "none") == (1, 1)
    # The edge cap (1) is below min_tiles: no grid qualifies and, like the reference, a single tile is used.
    assert get_tile_grid(300, 300, "edge", min_tiles=2, max_tiles=6) == (1, 1)
    # min_tiles forces a split of a square image.
    assert get_tile_grid(448, 448, "ratio", min_tiles=4, max_tiles=4) == (2, 2)
    assert get_tile_grid(2000, 10, "ratio", max_tiles=12) == (12, 1)
    assert get_tile_grid(10, 2000, TilingMode.RATIO, max_tiles=6) == (1, 6)


def test_tiling_mode_values_and_validation():
    assert [mode.value for mode in TilingMode] == ["ratio", "area", "edge", "none"]
    assert TilingMode("edge") is TilingMode.EDGE and TilingMode.EDGE == "edge"
    assert InternVLXImageProcessor(tiling="area").tiling is TilingMode.AREA
    with pytest.raises(ValueError, match=r"tiling must be one of 'ratio', 'area', 'edge', 'none', got 'pixels'"):
        get_tile_grid(10, 10, "pixels")
    with pytest.raises(ValueError, match=r"min_tiles \(7\) must not exceed max_tiles \(6\)"):
        InternVLXImageProcessor(min_tiles=7, max_tiles=6)
    with pytest.raises(ValueError, match="max_tiles must be an integer >= 1, got 0"):
        get_tile_grid(10, 10, "ratio", max_tiles=0)
    with pytest.raises(ValueError, match="image width must be an integer >= 1, got 0"):
        get_tile_grid(0, 10)


# --- pixels ------------------------------------------------------------------------------------------------------


@pytest.mark.fixtures
def test_pixel_values_match_reference_bit_for_bit():
    """Six (image, max_num) cases of the reference preprocessing: every tile's float32 bytes, the grid, the count."""
    processor = InternVLXImageProcessor()
    entries = golden.preprocess_entries()
    assert len(entries) == 6
    for entry in entries:
        out = processor(str(entry.image), max_tiles=entry.max_tiles, tiling="ratio", return_tensors="pt")
        entry.pixels.assert_equal(out["pixel_values"], what=f"pixel_values of {entry.key}")
        assert hashlib.sha256(out["pixel_values"].numpy().tobytes()).hexdigest() == entry.pixel_values_sha256
        grid = entry.tile_grid
        assert out["num_patches"].tolist() == [grid["num_tiles"]]
        assert out["tile_grid"].tolist() == [[grid["cols"], grid["rows"]]]


@pytest.mark.fixtures
def test_edge_tiling_pixels_match_internvlx_reference():
    reference = golden.model_reference("internvlx_pvtc")
    image = require_fixture("images", "image2.jpg")
    assert image == reference.image
    out = InternVLXImageProcessor(tiling="edge", max_tiles=6)(image, return_tensors="pt")
    reference.pixels.assert_equal(out["pixel_values"])
    assert hashlib.sha256(out["pixel_values"].numpy().tobytes()).hexdigest() == reference.meta["preprocess"][
        "pixel_values_sha256"
    ]
    assert out["tile_grid"].tolist() == [[2, 2]] and out["num_patches"].tolist() == [5]


def test_a_pixel_mismatch_names_the_tile_and_how_much():
    """The parity check itself: one changed value is found, and the message says where and by how much, from the
    compact digests (per-tile stats, block means) as well as from full tensors."""
    reference = golden.model_reference("internvl2_qwen2")
    pixel_values = reference.pixel_values().clone()
    pixel_values[1, 2, 100, 300] += 0.5
    full = golden.TileDigests.from_tensor(reference.pixel_values())
    compact = golden.TileDigests.from_compact(*full.compact_record())
    with pytest.raises(AssertionError, match=r"1 of 3 tiles differ .*tiles \[1\]\n  tile 1: sha256 .*sum .*"
                                             r"\(diff \+0\.5\).*block mean difference .* at channel 2, rows 56-111, "
                                             r"cols 280-335"):
        compact.assert_equal(pixel_values)
    with pytest.raises(AssertionError, match=r"tile 1: 1 of 602112 values differ, max \|diff\| 0\.5 at channel 2, "
                                             r"row 100, col 300"):
        full.assert_equal(pixel_values)
    with pytest.raises(AssertionError, match=r"shape \(2, 3, 448, 448\), the reference \(3, 3, 448, 448\)"):
        compact.assert_equal(pixel_values[:2])


def test_tiles_are_row_major_crops_then_thumbnail():
    image = random_image(500, 300, seed=1)
    out = InternVLXImageProcessor(max_tiles=6)(image, return_tensors="pt")
    cols, rows = get_tile_grid(500, 300, "ratio", max_tiles=6)
    assert (cols, rows) == (3, 2)  # aspect 5:3 is closest to 3:2
    resized = image.resize((cols * 448, rows * 448), Image.BICUBIC)
    crops = [resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448)) for r in range(rows) for c in range(cols)]
    thumbnail = image.resize((448, 448), Image.BICUBIC)
    expected = torch.stack([chw_uint8(tile) for tile in [*crops, thumbnail]])
    assert torch.equal(out["pixel_values"], reference_float(expected))
    assert out["num_patches"].tolist() == [7] and out["tile_grid"].tolist() == [[3, 2]]


def test_single_tile_without_thumbnail_and_options():
    image = random_image(300, 200, seed=2)
    expected = reference_float(chw_uint8(image.resize((448, 448), Image.BICUBIC))[None])
    for kwargs in ({"tiling": "none"}, {"max_tiles": 1}, {"tiling": "edge"}):
        out = InternVLXImageProcessor(**kwargs)(image, return_tensors="pt")
        assert torch.equal(out["pixel_values"], expected), kwargs
        assert out["num_patches"].tolist() == [1] and out["tile_grid"].tolist() == [[1, 1]]
    no_thumb = InternVLXImageProcessor(use_thumbnail=False, max_tiles=6)(random_image(900, 400), return_tensors="pt")
    assert no_thumb["num_patches"].tolist() == [2] and no_thumb["pixel_values"].shape == (2, 3, 448, 448)
    small = InternVLXImageProcessor(image_size=224, tiling="none")(image, return_tensors="pt")
    assert small["pixel_values"].shape == (1, 3, 224, 224)


def test_batch_outputs_and_per_call_overrides():
    processor = InternVLXImageProcessor()
    images = [random_image(900, 300, seed=3), random_image(100, 100, seed=4), random_image(1000, 747, seed=5)]
    out = processor(images, return_tensors="pt")
    assert out["num_patches"].dtype == torch.long and out["num_patches"].tolist() == [4, 1, 13]
    assert out["tile_grid"].dtype == torch.long and out["tile_grid"].tolist() == [[3, 1], [1, 1], [4, 3]]
    assert out["pixel_values"].shape == (18, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    # Each image's tiles come in input order.
    alone = processor(images[1], return_tensors="pt")["pixel_values"]
    assert torch.equal(out["pixel_values"][4:5], alone)

    edge = processor(images, tiling="edge", max_tiles=6, return_tensors="pt")
    assert edge["num_patches"].tolist() == [4, 1, 7] and edge["tile_grid"].tolist() == [[3, 1], [1, 1], [3, 2]]
    assert processor.tiling is TilingMode.RATIO and processor.max_tiles == 12  # the call did not change defaults

    plain = processor(images[:2])
    assert plain["num_patches"] == [4, 1] and plain["tile_grid"] == [[3, 1], [1, 1]]
    assert isinstance(plain["pixel_values"], torch.Tensor)


# --- inputs ------------------------------------------------------------------------------------------------------


def test_accepts_paths_arrays_and_tensors(tmp_path):
    image = random_image(600, 400, seed=6)
    path = tmp_path / "photo.png"
    image.save(path)
    hwc = np.asarray(image).copy()
    chw_tensor = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    processor = InternVLXImageProcessor(max_tiles=6)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    inputs = [str(path), path, hwc, hwc.transpose(2, 0, 1), chw_tensor, torch.from_numpy(hwc), [image]]
    for candidate in inputs:
        out = processor(candidate, return_tensors="pt")
        assert torch.equal(out["pixel_values"], expected), type(candidate)
    batch = processor(torch.stack([chw_tensor, chw_tensor]), return_tensors="pt")
    assert batch["num_patches"].tolist() == [7, 7] and torch.equal(batch["pixel_values"][7:], expected)
    gray = np.full((50, 60), 77, dtype=np.uint8)
    out = processor(gray, tiling="none", return_tensors="pt")
    assert recover_uint8(out["pixel_values"]).unique().tolist() == [77]


# What `Image.open(f).convert("RGB")` (the reference) makes of each mode, pixel (0, 0) of a uniform image.
MODE_CASES = [
    ("L", 100, (100, 100, 100)),  # grey replicated
    ("LA", (100, 50), (100, 100, 100)),  # alpha dropped
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, not composited onto white
    ("CMYK", (10, 20, 30, 40), (207, 198, 190)),  # PIL's naive formula R = (255 - C) * (255 - K) / 255
    ("I;16", 1000, (255, 255, 255)),  # 16-bit values are clipped to 255, not rescaled
    ("I;16", 200, (200, 200, 200)),
]


@pytest.mark.parametrize("mode,value,rgb", MODE_CASES)
def test_image_modes_convert_like_the_reference(tmp_path, mode, value, rgb):
    image = Image.new(mode, (448, 448), value)
    processor = InternVLXImageProcessor(tiling="none")
    out = processor(image, return_tensors="pt")["pixel_values"]
    assert recover_uint8(out)[0, :, 0, 0].tolist() == list(rgb)
    assert torch.equal(out, processor(image.convert("RGB"), return_tensors="pt")["pixel_values"])
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    image.save(path)
    from_file = processor(path, return_tensors="pt")["pixel_values"]
    assert torch.equal(from_file, processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"])


def test_palette_image_uses_its_palette(tmp_path):
    image = Image.new("P", (448, 448), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    out = InternVLXImageProcessor(tiling="none")(image, return_tensors="pt")["pixel_values"]
    assert recover_uint8(out)[0, :, 0, 0].tolist() == [12, 34, 56]


def test_exif_orientation_is_opt_in(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    random_image(896, 448, seed=7).save(path, exif=exif)
    as_stored = InternVLXImageProcessor(max_tiles=6)(path, return_tensors="pt")
    upright = InternVLXImageProcessor(max_tiles=6, apply_exif_orientation=True)(path, return_tensors="pt")
    assert as_stored["tile_grid"].tolist() == [[2, 1]]
    assert upright["tile_grid"].tolist() == [[1, 2]]
    per_call = InternVLXImageProcessor(max_tiles=6)(path, apply_exif_orientation=True, return_tensors="pt")
    assert per_call["tile_grid"].tolist() == [[1, 2]]


# --- bad input ---------------------------------------------------------------------------------------------------


def test_corrupt_file_error_names_the_image(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    good = random_image(64, 64)
    with pytest.raises(ValueError, match=r"image 1 \('.*notes\.jpg'\): not a readable image .*Re-export it"):
        InternVLXImageProcessor()([good, bad])


def test_truncated_file_error(tmp_path):
    path = tmp_path / "cut.jpg"
    random_image(300, 300, seed=8).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"image 0 \('.*cut\.jpg'\): the image data could not be decoded .*truncated"):
        InternVLXImageProcessor()(str(path))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_broken_pixel_stream(image: Image.Image) -> bytes:
    png = _encoded(image, "PNG")
    return png[:33] + _png_chunk(b"IDAT", b"\x78\x9c" + b"garbage!" * 100) + _png_chunk(b"IEND", b"")


# Files whose header PIL recognises but whose data it cannot decode.
UNDECODABLE = {
    "png-header-then-garbage.png": lambda im: _encoded(im, "PNG")[:8] + b"garbage!" * 100,
    "png-valid-ihdr-then-garbage.png": lambda im: _encoded(im, "PNG")[:33] + b"garbage!" * 100,
    "png-truncated.png": lambda im: _encoded(im, "PNG")[: len(_encoded(im, "PNG")) // 2],
    "png-broken-pixel-stream.png": _png_with_broken_pixel_stream,
    "jpeg-header-then-garbage.jpg": lambda im: _encoded(im, "JPEG")[:4] + b"garbage!" * 100,
    "jpeg-truncated-in-header.jpg": lambda im: _encoded(im, "JPEG")[:100],
    "jpeg-truncated.jpg": lambda im: _encoded(im, "JPEG")[: len(_encoded(im, "JPEG")) // 2],
    "webp-truncated.webp": lambda im: _encoded(im, "WEBP")[: len(_encoded(im, "WEBP")) // 2],
}


OPENED_LAZILY = {"png-truncated.png", "png-broken-pixel-stream.png", "jpeg-truncated.jpg"}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_files_name_the_file_and_the_fix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(UNDECODABLE[name](random_image(300, 200, seed=11)))
    # (depending on where the garbage starts, PIL fails while identifying the format or while decoding)
    expected = rf"image 1 \('{re.escape(str(path))}'\): (the image data could not be decoded \(.+\); the file is " \
               r"probably truncated or corrupt\. Re-download or re-export it\.|not a readable image \(PIL cannot " \
               r"identify the format; the file may be corrupt or not an image\)\. Re-export it as PNG or JPEG\.)$"
    with pytest.raises(ValueError, match=expected):
        InternVLXImageProcessor()([random_image(40, 40), str(path)])
    if name in OPENED_LAZILY:  # PIL's own Image.open accepts these; decoding them in the processor fails
        with pytest.raises(ValueError, match=rf"image 0 \(.*{re.escape(name)}'\): the image data could not be "
                                             "decoded"):
            InternVLXImageProcessor()(Image.open(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files are refused, never decoded partially


def test_decompression_bomb_limit_stays_on_by_default(tmp_path):
    """PIL's default limit (about 89.5 M pixels; refused above twice that) applies: a 20000 x 9000 PNG header is
    refused before any pixel is decoded."""
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # PIL's default, not raised by us
    header = struct.pack(">IIBBBBB", 20000, 9000, 8, 2, 0, 0, 0)
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"image 0 \('.*huge\.png'\): refused as a possible decompression bomb "
                                         r"\(Image size \(180000000 pixels\) exceeds limit"):
        InternVLXImageProcessor()(path)


def test_permission_errors_are_not_reported_as_corrupt_images(tmp_path):
    """A file system error keeps its errno (an OSError naming the file), unlike undecodable image data."""
    import os

    path = tmp_path / "secret.png"
    random_image(8, 8).save(path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a path PIL cannot open as a file instead
        path = tmp_path / "folder.png"
        path.mkdir()
        with pytest.raises(IsADirectoryError, match=r"image 0 \('.*folder\.png'\): a folder, not an image file"):
            InternVLXImageProcessor()(path)
        return
    with pytest.raises(OSError, match=r"image 0 \('.*secret\.png'\): cannot read the file \(Permission denied\)"):
        InternVLXImageProcessor()(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image 0 \('.*missing\.png'\): no such file"):
        InternVLXImageProcessor()(tmp_path / "missing.png")


def test_zero_sized_images_are_rejected():
    with pytest.raises(ValueError, match=r"image 0 \(Image\): the image is empty \(0x10\)"):
        InternVLXImageProcessor()(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match=r"image 1 \(ndarray\): the image is empty \(array shape \(0, 5, 3\)\)"):
        InternVLXImageProcessor()([random_image(8, 8), np.zeros((0, 5, 3), dtype=np.uint8)])


def test_decompression_bomb_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this many pixels
    with pytest.raises(ValueError, match=r"image 0 \('.*bomb\.png'\): refused as a possible decompression bomb") as err:
        InternVLXImageProcessor()(path)
    assert "PIL.Image.MAX_IMAGE_PIXELS = 100" in str(err.value)


def test_bad_array_and_type_errors():
    processor = InternVLXImageProcessor()
    with pytest.raises(ValueError, match=r"image 0 \(Tensor\): arrays and tensors must hold uint8 pixels"):
        processor(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"image 0 \(ndarray\): cannot tell the channel axis"):
        processor(np.zeros((10, 10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"image 2 \(int\): unsupported image type int"):
        processor([random_image(8, 8), random_image(8, 8), 123])


def test_save_and_load_round_trip(tmp_path):
    processor = InternVLXImageProcessor(tiling="edge", max_tiles=6, use_thumbnail=False, apply_exif_orientation=True)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["tiling"] == "edge" and saved["max_tiles"] == 6
    loaded = InternVLXImageProcessor.from_pretrained(tmp_path)
    assert loaded.tiling is TilingMode.EDGE
    assert (loaded.max_tiles, loaded.use_thumbnail, loaded.apply_exif_orientation) == (6, False, True)
    image = random_image(2000, 700, seed=9)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(loaded(image, return_tensors="pt")["pixel_values"], expected)


# --- every source transformers' `load_image` accepts: data URIs, base64, http(s) URLs -------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_uris_and_base64_give_the_same_pixels_as_the_file(tmp_path):
    import base64

    image = random_image(600, 400, seed=9)
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(image))
    encoded = base64.b64encode(path.read_bytes()).decode()
    processor = InternVLXImageProcessor(max_tiles=6)
    expected = processor(str(path), return_tensors="pt")
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME line breaks
    urlsafe = base64.urlsafe_b64encode(path.read_bytes()).decode().rstrip("=")  # URL-safe alphabet, no padding
    sources = [f"data:image/png;base64,{encoded}", f"DATA:image/png;BASE64,{wrapped}", encoded,
               f"data:application/octet-stream;base64,{urlsafe}"]
    for source in sources:
        out = processor(source, return_tensors="pt")
        assert torch.equal(out["pixel_values"], expected["pixel_values"]), source[:40]
        assert out["tile_grid"].tolist() == [[3, 2]]


def test_bad_base64_names_the_input_without_a_dependency_traceback():
    uri = "data:image/png;base64," + "iVBORw0KGgo" * 20 + "$$"
    with pytest.raises(ValueError) as err:
        InternVLXImageProcessor()([random_image(8, 8), uri])
    message = str(err.value)
    assert message.startswith("image 1 ('data:image/png;base64,iVBORw0KGgoiVBORw0KGgoiVBO'... (244 characters)): "
                              "the base64 data is invalid (")
    assert "base64.b64encode(open(path, 'rb').read())" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(ValueError, match=r"image 0 \('data:image/png;base64,aGVsbG8='\): not a readable image"):
        InternVLXImageProcessor()("data:image/png;base64,aGVsbG8=")  # valid base64 of b"hello"
    with pytest.raises(ValueError, match=r"image 0 \('data:image/png'\): a data URI needs a comma before its data"):
        InternVLXImageProcessor()("data:image/png")


def test_a_missing_path_is_not_mistaken_for_base64(tmp_path):
    expected = r"image 0 \('images/cat'\): no such file; pass an existing image file path, an http\(s\) URL, a data:"
    with pytest.raises(FileNotFoundError, match=expected):
        InternVLXImageProcessor()("images/cat")
    expected = r"\('QUJDREVGR0hJSktMTU5PUFFSU1RV'\): no such file, nor base64-encoded image data"
    with pytest.raises(FileNotFoundError, match=expected):
        InternVLXImageProcessor()("QUJDREVGR0hJSktMTU5PUFFSU1RV")  # base64 of b"ABCD...", not an image


def test_http_urls_are_downloaded_with_transformers_load_image(tmp_path, http_server):
    image = random_image(600, 400, seed=10)
    (tmp_path / "photo.png").write_bytes(png_bytes(image))
    processor = InternVLXImageProcessor(max_tiles=6)
    out = processor(f"{http_server}/photo.png", return_tensors="pt")
    assert torch.equal(out["pixel_values"], processor(image, return_tensors="pt")["pixel_values"])
    (tmp_path / "page.html").write_text("<html>not an image</html>")
    with pytest.raises(ValueError, match=r"image 0 \('http://127\.0\.0\.1:\d+/page\.html'\): the server's answer is "
                                         r"not an image PIL can read \(an error page\?\)"):
        processor(f"{http_server}/page.html")


def test_unreachable_urls_fail_with_one_clear_offline_error():
    import socket

    with socket.socket() as sock:  # a local port nothing listens on: the connection is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/photo.png"
    with pytest.raises(ConnectionError) as err:
        InternVLXImageProcessor()([random_image(8, 8), url])
    assert str(err.value).startswith(f"image 1 ('{url}'): could not download the image (ConnectError: ")
    assert str(err.value).endswith("; timeout 10 s); check the URL and that this machine can reach it (it may be "
                                   "offline), or download the image and pass its file path or a data: URI")
    assert err.value.__cause__ is None and err.value.__suppress_context__
