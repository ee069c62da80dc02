"""Golden reference data for the parity tests: one API over the compact copy and the full fixture folders.

Where the data comes from (first folder that has the requested item wins):

1. ``$INTERNVLX_FIXTURES`` when set (e.g. the full ``../shared/fixtures``; it must exist),
2. the Phi-3 fixtures: ``$INTERNVLX_FIXTURES_PHI3`` when set, else ``fixtures_phi3`` beside ``$INTERNVLX_FIXTURES``,
3. ``tests/fixtures/``, the compact copy that ships with the project (made by ``scripts/compact_fixtures.py``).

So with no variable set every test reads ``tests/fixtures/``; with ``INTERNVLX_FIXTURES=../shared/fixtures`` the same
tests read the full data (and anything the full folders lack, e.g. ``tokenizer_cases/``, still comes from
``tests/fixtures/``). Whether a model fixture is full or compact is decided per folder: a ``reference.safetensors``
means full, a ``reference.compact.safetensors`` means compact.

What the compact copy keeps (the rules live in this module, the compaction script uses the same functions):

- checkpoints, tokenizer files, ``config.json``, ``reference.json``, ``pvtc_projector.safetensors``, the images,
  ``rvtc_tiling.json`` and ``preprocess_pixels.json``: verbatim (``fixture_path`` returns their real paths);
- ids (``input_ids``, ``attention_mask``, ``image_flags``, ``generated_ids``), ``generation_scores``: whole;
- logits at a subset of positions (``logit_positions``): every text position, the last 16 positions and every
  37th visual (``<IMG_CONTEXT>``) position; for the rope checks (random text ids only) every 4th position and the
  last 16;
- pixels: instead of the uint8 tiles, per tile the sha256 of its float32 ``pixel_values`` (C order), its exact
  sum and absolute sum (``math.fsum``), min, max, and the means of its 8 x 8 blocks (56 x 56 px at 448) per
  channel, so a mismatch says which tile differs, by how much and where;
- dropped: ``vision_last_hidden_state_tile0`` and ``vit_embeds`` (no test uses them).

Reading the full folders gives the same objects with every logit position and the exact pixel tensors.

API (``import golden`` from a test; ``conftest.require_fixture`` wraps ``fixture_path``)::

    ref = golden.model_reference("internvl2_qwen2")   # also internvl2_internlm2, internvlx_pvtc, internvl2_phi3,
                                                      # and V25_FIXTURES (InternVL2.5 / InternVL3)
    ref.folder              # checkpoint folder (config.json, model.safetensors, tokenizer files): give it to convert()
    ref.meta                # reference.json: prompt, prompt_with_image_tag, question, template, generation, ...
    ref.prompt, ref.question, ref.chat_response, ref.image (path), ref.tiling ("ratio"/"edge"), ref.max_tiles
    ref.input_ids, ref.attention_mask        # int64 (1, L)
    ref.image_flags                          # int64 (tiles,)
    ref.generated_ids, ref.generation_scores # int64 (1, 8), float32 (8, vocab)
    ref.logits.assert_close(logits)          # ours (1, L, V) or (L, V) vs the reference, atol 1e-4
    ref.pixels.assert_equal(pixel_values)    # bit-exact, per tile; says which tile differs and how much
    ref.pixel_values()                       # the float32 model input, bit-identical to the reference's

    rope = golden.rope_check("internvl2_internlm2", "rope_dynamic_ntk")   # or ("internvl2_phi3", "rope_su_check")
    rope.tensors["input_ids"], rope.tensors["generated_ids"], rope.tensors["generation_scores"], rope.info
    rope.logits["logits"].assert_close(...), rope.logits["logits_long"]   # LogitsRef, as above

    for entry in golden.preprocess_entries(): entry.image, entry.max_tiles, entry.tile_grid, entry.pixels
    golden.fixture_path("images", "img6.jpg")   # a verbatim file (FileNotFoundError if no root has it)
    golden.describe_sources()                   # which folder each item comes from (shown in pytest's header)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

COMPACT_ROOT = Path(__file__).resolve().parent / "fixtures"
ROOT_ENV = "INTERNVLX_FIXTURES"
PHI3_ENV = "INTERNVLX_FIXTURES_PHI3"

MODEL_FIXTURES = ("internvl2_internlm2", "internvl2_qwen2", "internvlx_pvtc", "internvl2_phi3")
# InternVL2.5 / InternVL3 fixtures: made by scripts/make_internvl25_fixtures.py straight into the compact form (their
# full folders are not kept), so scripts/compact_fixtures.py leaves them alone.
V25_FIXTURES = ("internvl2_5_internlm2_5", "internvl3_qwen2_5", "internvl2_5_vit6b_qwen2_5")
# InternVL3.5-Flash's router (../shared/fixtures_flash): checkpoint, reference.json and the compared tensors.
FLASH_FIXTURE = "internvl3_5_flash"
ROPE_CHECKS = {"internvl2_internlm2": "rope_dynamic_ntk", "internvl2_phi3": "rope_su_check",
               "internvl3_qwen2_5": "rope_scaling_check"}

# Logit positions kept by the compact copy (see `logit_positions`).
LAST_POSITIONS = 16
VISUAL_STRIDE = 37  # prime, so the samples walk across rows, columns and tiles of the 16x16 token grids
ROPE_TEXT_STRIDE = 4
POOL_BLOCKS = 8  # per-tile block means: 8 x 8 blocks per channel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COMPACT_SUFFIX = ".compact"
DROPPED_TENSORS = ("vision_last_hidden_state_tile0", "vit_embeds")


# ---------------------------------------------------------------------------------------------------------- roots


def roots() -> list[Path]:
    """Folders searched for golden data, in order (see the module docstring)."""
    found: list[Path] = []
    primary = os.environ.get(ROOT_ENV)
    if primary:
        path = Path(primary).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{ROOT_ENV}={primary} is not a folder; point it at the full fixtures (e.g. ../shared/fixtures) "
                f"or unset it to use the compact copy in {COMPACT_ROOT}"
            )
        found.append(path)
    phi3 = os.environ.get(PHI3_ENV)
    if phi3:
        path = Path(phi3).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"{PHI3_ENV}={phi3} is not a folder; point it at fixtures_phi3 or unset it")
        found.append(path)
    elif primary:
        sibling = found[0].parent / "fixtures_phi3"
        if sibling.is_dir():
            found.append(sibling)
    found.append(COMPACT_ROOT)
    return list(dict.fromkeys(found))


def fixture_path(*parts: str) -> Path:
    """Real path of a fixture file or folder: the first root that has it (FileNotFoundError if none does)."""
    searched = roots()
    for root in searched:
        path = root.joinpath(*parts)
        if path.exists():
            return path
    raise FileNotFoundError(
        f"golden fixture {'/'.join(parts)} is in none of {[str(r) for r in searched]}; the project ships it in "
        f"{COMPACT_ROOT} (rebuild with `python scripts/compact_fixtures.py`)"
    )


def is_compact(folder: Path) -> bool:
    return not (folder / "reference.safetensors").exists() and (folder / "reference.compact.safetensors").exists()


def describe_sources() -> str:
    """One line per item: where it is read from and whether that copy is full or compact."""
    lines = []
    for name in MODEL_FIXTURES + V25_FIXTURES:
        try:
            folder = fixture_path(name)
        except FileNotFoundError as error:
            lines.append(f"{name}: MISSING ({error})")
            continue
        lines.append(f"{name}: {folder} ({'compact' if is_compact(folder) else 'full'})")
    try:
        pixels = fixture_path("preprocess_pixels.json").parent
        full = (pixels / "preprocess_pixels.safetensors").exists()
        lines.append(f"preprocess_pixels: {pixels} ({'full' if full else 'compact'})")
    except FileNotFoundError as error:
        lines.append(f"preprocess_pixels: MISSING ({error})")
    return "\n".join(lines)


def read_json(*parts: str) -> Any:
    return json.loads(fixture_path(*parts).read_text(encoding="utf-8"))


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


# ------------------------------------------------------------------------------------------------- logits subsets


def logit_positions(input_ids: torch.Tensor, image_token_id: int | None = None, *, text_stride: int = 1,
                    visual_stride: int = VISUAL_STRIDE, last: int = LAST_POSITIONS) -> torch.Tensor:
    """Positions whose logits the compact copy keeps: every ``text_stride``-th text position (1 = all of them),
    every ``visual_stride``-th ``image_token_id`` position (counted over the visual positions only) and the last
    ``last`` positions. Sorted int64 tensor."""
    ids = input_ids.reshape(-1)
    length = ids.numel()
    visual = ids == image_token_id if image_token_id is not None else torch.zeros(length, dtype=torch.bool)
    keep = torch.zeros(length, dtype=torch.bool)
    text_positions = torch.nonzero(~visual).reshape(-1)
    keep[text_positions[::text_stride]] = True
    keep[torch.nonzero(visual).reshape(-1)[::visual_stride]] = True
    keep[max(0, length - last):] = True
    return torch.nonzero(keep).reshape(-1).to(torch.int64)


@dataclass
class LogitsRef:
    """Reference logits at ``positions`` of a sequence of ``length`` tokens (all positions when read in full)."""

    positions: torch.Tensor  # int64 (P,)
    values: torch.Tensor  # float32 (P, vocab)
    length: int

    @property
    def complete(self) -> bool:
        return self.positions.numel() == self.length

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float().cpu()
        if logits.dim() == 3:
            if logits.shape[0] != 1:
                raise AssertionError(f"expected logits of one sequence, got shape {tuple(logits.shape)}")
            logits = logits[0]
        if tuple(logits.shape) != (self.length, self.values.shape[-1]):
            raise AssertionError(
                f"logits shape {tuple(logits.shape)} != reference ({self.length}, {self.values.shape[-1]})"
            )
        return logits[self.positions]

    def assert_close(self, logits: torch.Tensor, atol: float = 1e-4) -> float:
        """Max |ours - reference| over the kept positions; AssertionError (naming the worst position) above atol."""
        diff = (self._select(logits) - self.values).abs()
        worst = diff.max().item()
        if not worst <= atol:  # also catches NaN
            row, col = divmod(int(torch.nan_to_num(diff, nan=float("inf")).argmax()), diff.shape[1])
            raise AssertionError(
                f"logits differ from the reference by {worst:.3g} > {atol:g} (at position "
                f"{int(self.positions[row])}, token id {col}; {self.positions.numel()} of {self.length} positions "
                "compared)"
            )
        return worst


# ------------------------------------------------------------------------------------------------------- pixels


def pixels_from_uint8(tiles_u8: torch.Tensor) -> torch.Tensor:
    """The fixture README's formula: ``((u8 / 255) - mean) / std`` in float32, in that order."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((tiles_u8.to(torch.float32) / 255) - mean) / std


def tile_sha256(tile: torch.Tensor) -> str:
    """sha256 of one float32 tile's bytes in C order (little-endian), as the fixtures hash pixel tensors."""
    return hashlib.sha256(tile.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_sha256(pixel_values: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tile in pixel_values:
        digest.update(tile.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tile_stats(tile: torch.Tensor) -> dict[str, float]:
    """Exactly rounded sum and absolute sum (order-independent, hence reproducible), min and max of one tile."""
    values = tile.detach().cpu().double().reshape(-1).tolist()
    return {
        "sum": math.fsum(values),
        "abs_sum": math.fsum(map(abs, values)),  # |x| of a float64 is exact: the same sum
        "min": float(tile.min()),
        "max": float(tile.max()),
    }


def block_means(tile: torch.Tensor, blocks: int = POOL_BLOCKS) -> torch.Tensor:
    """float64 (channels, blocks, blocks): exactly rounded mean of each block of a (C, H, W) tile."""
    channels, height, width = tile.shape
    bh, bw = height // blocks, width // blocks
    if bh * blocks != height or bw * blocks != width:
        raise ValueError(f"tile of {height}x{width} px does not split into {blocks}x{blocks} blocks")
    grouped = tile.detach().cpu().double().reshape(channels, blocks, bh, blocks, bw).permute(0, 1, 3, 2, 4)
    rows = grouped.reshape(channels * blocks * blocks, bh * bw).tolist()
    return torch.tensor([math.fsum(row) / (bh * bw) for row in rows], dtype=torch.float64).reshape(
        channels, blocks, blocks)


@dataclass
class TileDigests:
    """Per-tile digests of a reference ``pixel_values`` tensor (N, C, H, W) and, when read in full, the tensor."""

    sha256: list[str]
    tile_shape: tuple[int, ...]
    whole_sha256: str | None = None
    stats: list[dict[str, float]] | None = None  # compact: per tile sum / abs_sum / min / max
    block_means: torch.Tensor | None = None  # compact: (N, C, 8, 8) float64
    expected: torch.Tensor | None = None  # full: the reference tensor itself

    @classmethod
    def from_tensor(cls, pixel_values: torch.Tensor) -> "TileDigests":
        return cls(sha256=[tile_sha256(t) for t in pixel_values], tile_shape=tuple(pixel_values.shape[1:]),
                   whole_sha256=tensor_sha256(pixel_values), expected=pixel_values)

    @property
    def num_tiles(self) -> int:
        return len(self.sha256)

    def compact_record(self) -> tuple[dict[str, Any], torch.Tensor]:
        """JSON part (digests and stats) and tensor part (block means) of the compact copy."""
        source = self.expected
        assert source is not None, "compact_record needs the full tensor"
        record = {"tile_shape": list(self.tile_shape), "sha256": self.whole_sha256,
                  "tiles": [{"sha256": sha, **tile_stats(tile)} for sha, tile in zip(self.sha256, source)]}
        return record, torch.stack([block_means(tile) for tile in source])

    @classmethod
    def from_compact(cls, record: dict[str, Any], means: torch.Tensor | None) -> "TileDigests":
        tiles = record["tiles"]
        return cls(sha256=[t["sha256"] for t in tiles], tile_shape=tuple(record["tile_shape"]),
                   whole_sha256=record.get("sha256"),
                   stats=[{k: t[k] for k in ("sum", "abs_sum", "min", "max")} for t in tiles], block_means=means)

    def mismatches(self, pixel_values: torch.Tensor) -> list[int]:
        return [i for i, tile in enumerate(pixel_values) if tile_sha256(tile) != self.sha256[i]]

    def assert_equal(self, pixel_values: torch.Tensor, what: str = "pixel_values") -> None:
        """Bit-exact comparison tile by tile; the AssertionError says which tiles differ, by how much and where."""
        pixel_values = pixel_values.detach().cpu()
        if pixel_values.dtype != torch.float32:
            raise AssertionError(f"{what} is {pixel_values.dtype}, the reference is float32")
        expected_shape = (self.num_tiles, *self.tile_shape)
        if tuple(pixel_values.shape) != expected_shape:
            raise AssertionError(f"{what} has shape {tuple(pixel_values.shape)}, the reference {expected_shape}")
        bad = self.mismatches(pixel_values)
        if not bad:
            return
        lines = [f"{what}: {len(bad)} of {self.num_tiles} tiles differ from the reference (bit-exact): tiles {bad}"]
        lines += [self.describe_difference(i, pixel_values[i]) for i in bad[:4]]
        raise AssertionError("\n".join(lines))

    def describe_difference(self, index: int, tile: torch.Tensor) -> str:
        """How tile ``index`` of ours differs from the reference (exactly when read in full, by its stats if not)."""
        if self.expected is not None:
            diff = (tile.double() - self.expected[index].double()).abs()
            worst = int(diff.argmax())
            c, rest = divmod(worst, diff.shape[1] * diff.shape[2])
            y, x = divmod(rest, diff.shape[2])
            return (f"  tile {index}: {int(torch.count_nonzero(diff))} of {diff.numel()} values differ, max |diff| "
                    f"{diff.max().item():.6g} at channel {c}, row {y}, col {x}")
        ours, ref = tile_stats(tile), self.stats[index]
        parts = [f"{key} {ours[key]:.9g} vs {ref[key]:.9g} (diff {ours[key] - ref[key]:+.3g})"
                 for key in ("sum", "abs_sum", "min", "max")]
        text = f"  tile {index}: sha256 {tile_sha256(tile)[:12]}.. != {self.sha256[index][:12]}..; " + ", ".join(parts)
        if self.block_means is not None:
            ref_means = self.block_means[index]
            blocks = ref_means.shape[-1]
            diff = (block_means(tile, blocks) - ref_means).abs()
            c, rest = divmod(int(diff.argmax()), blocks * blocks)
            by, bx = divmod(rest, blocks)
            bh, bw = tile.shape[1] // blocks, tile.shape[2] // blocks
            text += (f"; largest {bh}x{bw}-block mean difference {diff.max().item():.3g} at channel {c}, rows "
                     f"{by * bh}-{(by + 1) * bh - 1}, cols {bx * bw}-{(bx + 1) * bw - 1}")
        return text


# ------------------------------------------------------------------------------------------------ model fixtures


def _tiling_of(meta: dict[str, Any]) -> str:
    return "edge" if "RVTC edge" in meta["preprocess"]["function"] else "ratio"


@dataclass
class ModelReference:
    """The reference run of one model fixture (see the module docstring)."""

    name: str
    folder: Path
    meta: dict[str, Any]
    compact: bool
    tensors: dict[str, torch.Tensor]
    logits: LogitsRef
    pixels: TileDigests

    @property
    def image(self) -> Path:
        return (self.folder / self.meta["image"]["file"]).resolve()

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]

    @property
    def question(self) -> str:
        return self.meta["question"]

    @property
    def chat_response(self) -> str:
        return self.meta["generation"]["chat_response"]

    @property
    def tiling(self) -> str:
        """"edge" for the InternVL-X reference (RVTC), "ratio" for InternVL2."""
        return _tiling_of(self.meta)

    @property
    def max_tiles(self) -> int:
        return int(self.meta["preprocess"]["max_num"])

    @property
    def image_token_id(self) -> int:
        return int(self.meta["img_context_token_id"])

    input_ids = property(lambda self: self.tensors["input_ids"])
    attention_mask = property(lambda self: self.tensors["attention_mask"])
    image_flags = property(lambda self: self.tensors["image_flags"])
    generated_ids = property(lambda self: self.tensors["generated_ids"])
    generation_scores = property(lambda self: self.tensors["generation_scores"])

    def pixel_values(self) -> torch.Tensor:
        """The float32 model input of the reference run, bit for bit.

        Full: rebuilt from the stored uint8 tiles. Compact: recomputed from the image with `InternVLXImageProcessor`
        (the reference's tiling and max_num) and checked against the per-tile digests, so it is the same tensor.
        """
        if self.pixels.expected is not None:
            return self.pixels.expected
        from internvlx_hf.processing import InternVLXImageProcessor

        processor = InternVLXImageProcessor(tiling=self.tiling, max_tiles=self.max_tiles,
                                            min_tiles=int(self.meta["preprocess"]["min_num"]))
        pixel_values = processor(str(self.image), return_tensors="pt")["pixel_values"]
        self.pixels.assert_equal(pixel_values, what=f"{self.name}: pixel_values recomputed from {self.image.name}")
        return pixel_values


@lru_cache(maxsize=None)
def model_reference(name: str) -> ModelReference:
    """The reference run of model fixture ``name`` (cached: treat the tensors as read-only)."""
    folder = fixture_path(name)
    meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    if is_compact(folder):
        tensors, _ = load_safetensors(folder / "reference.compact.safetensors")
        record = json.loads((folder / "reference.compact.json").read_text(encoding="utf-8"))
        logits = LogitsRef(tensors.pop("logits.positions"), tensors.pop("logits.values"), record["logits"]["length"])
        pixels = TileDigests.from_compact(record["pixel_values"], tensors.pop("pixel_values.block_means", None))
        return ModelReference(name, folder, meta, True, tensors, logits, pixels)
    tensors, _ = load_safetensors(folder / "reference.safetensors")
    for key in DROPPED_TENSORS:  # the same tensors as the compact copy, so a test cannot depend on them
        tensors.pop(key, None)
    full_logits = tensors.pop("logits")[0]
    logits = LogitsRef(torch.arange(full_logits.shape[0]), full_logits, full_logits.shape[0])
    pixels = TileDigests.from_tensor(pixels_from_uint8(tensors.pop("pixel_values_u8")))
    return ModelReference(name, folder, meta, False, tensors, logits, pixels)


# ---------------------------------------------------------------------------------------------------- rope checks


@dataclass
class RopeCheck:
    """A text-only rope check of a model fixture (``rope_dynamic_ntk`` of InternLM2, ``rope_su_check`` of Phi-3).

    ``tensors``: ids, masks, ``generated_ids`` and ``generation_scores`` (whole); ``logits``: name -> LogitsRef for
    each logits tensor (``logits``, and ``logits_long`` for Phi-3); ``info``: the file's ``info`` metadata (JSON).
    """

    name: str
    compact: bool
    tensors: dict[str, torch.Tensor]
    logits: dict[str, LogitsRef]
    info: dict[str, Any] = field(default_factory=dict)


def rope_input_of(logits_name: str) -> str:
    """The ids each rope-check logits tensor was computed from (``logits_long`` <- ``input_ids_long``)."""
    return "input_ids" + logits_name[len("logits"):]


@lru_cache(maxsize=None)
def rope_check(fixture: str, check: str) -> RopeCheck:
    folder = fixture_path(fixture)
    full = folder / f"{check}.safetensors"
    if full.exists():
        tensors, metadata = load_safetensors(full)
        logits = {key: LogitsRef(torch.arange(t.shape[1]), t[0], t.shape[1])
                  for key, t in list(tensors.items()) if key.startswith("logits")}
        for key in logits:
            del tensors[key]
        compact = False
    else:
        tensors, metadata = load_safetensors(fixture_path(fixture, f"{check}{COMPACT_SUFFIX}.safetensors"))
        names = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith(".positions")})
        logits = {key: LogitsRef(tensors.pop(f"{key}.positions"), tensors.pop(f"{key}.values"),
                                 tensors[rope_input_of(key)].shape[1]) for key in names}
        compact = True
    info = json.loads(metadata["info"]) if "info" in metadata else {}
    return RopeCheck(check, compact, tensors, logits, info)


def rope_logit_positions(input_ids: torch.Tensor) -> torch.Tensor:
    return logit_positions(input_ids, None, text_stride=ROPE_TEXT_STRIDE)


# ------------------------------------------------------------------------------------------ preprocess_pixels


@dataclass
class PreprocessEntry:
    """One (image, max_num) case of ``preprocess_pixels``: the reference `dynamic_preprocess` + transform."""

    key: str  # e.g. "image1/max6"
    image: Path
    max_tiles: int
    min_tiles: int
    tile_grid: dict[str, Any]
    pixel_values_sha256: str
    pixels: TileDigests
    meta: dict[str, Any]


def preprocess_entries() -> list[PreprocessEntry]:
    """Every ``preprocess_pixels`` entry (ratio matching, image_size 448, thumbnail on)."""
    meta_path = fixture_path("preprocess_pixels.json")
    root = meta_path.parent
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    full = root / "preprocess_pixels.safetensors"
    if full.exists():
        tiles, _ = load_safetensors(full)
        digests = {entry["key"]: TileDigests.from_tensor(pixels_from_uint8(tiles[entry["key"]]))
                   for entry in meta["entries"]}
    else:
        record = json.loads((root / f"preprocess_pixels{COMPACT_SUFFIX}.json").read_text(encoding="utf-8"))
        means, _ = load_safetensors(root / f"preprocess_pixels{COMPACT_SUFFIX}.safetensors")
        digests = {key: TileDigests.from_compact(value, means.get(f"{key}.block_means"))
                   for key, value in record["entries"].items()}
    return [
        PreprocessEntry(
            key=entry["key"].removesuffix("/tiles_u8"), image=root / entry["image"], max_tiles=int(entry["max_num"]),
            min_tiles=int(entry["min_num"]), tile_grid=entry["tile_grid"],
            pixel_values_sha256=entry["pixel_values_sha256"], pixels=digests[entry["key"]], meta=entry)
        for entry in meta["entries"]
    ]


__all__ = [
    "COMPACT_ROOT", "V25_FIXTURES", "LogitsRef", "ModelReference", "PreprocessEntry", "RopeCheck", "TileDigests",
    "block_means",
    "describe_sources", "fixture_path", "is_compact", "logit_positions", "model_reference", "pixels_from_uint8",
    "preprocess_entries", "read_json", "rope_check", "rope_logit_positions", "roots", "tensor_sha256",
    "tile_sha256", "tile_stats",
]
