#!/usr/bin/env python3
"""Derive the compact golden data in ``tests/fixtures/`` from the full reference fixtures.

The full fixtures (``../shared/fixtures``, 59 MB, and ``../shared/fixtures_phi3``, 8 MB) hold the outputs of the
public reference implementations on tiny checkpoints. Most of their bytes are uint8 pixel tiles and full logits
tensors; the parity tests need much less to check the same things at the same tolerances (1e-4 on logits, bit-exact
pixels, exact ids and tokens). This script keeps:

* verbatim: every checkpoint file (``config.json``, ``generation_config.json``, ``model.safetensors``), the tokenizer
  files, ``reference.json``, ``pvtc_projector.safetensors``, the images, ``rvtc_tiling.json`` and
  ``preprocess_pixels.json``: conversion and the tokenizer tests read them as they are;
* ``<fixture>/reference.compact.safetensors``: ``input_ids``, ``attention_mask``, ``image_flags``,
  ``generated_ids`` and ``generation_scores`` whole; ``logits.positions`` / ``logits.values``: the logits at every
  text position, the last 16 positions and every 37th ``<IMG_CONTEXT>`` position (a prime stride, so the samples
  cover every row, column and tile of the 16x16 token grids); ``pixel_values.block_means``;
* ``<fixture>/reference.compact.json``: per tile of the float32 ``pixel_values`` its sha256 (the test compares
  digests: bit-exact parity), exact sum and absolute sum, min and max, with the 8x8 block means per channel (the
  tensor above) so a mismatch can say which tile differs, by how much and where; the logits rule; what was dropped;
* ``<fixture>/<check>.compact.safetensors`` for the rope checks (``rope_dynamic_ntk`` of InternLM2, ``rope_su_check``
  of Phi-3): ids, masks, ``generated_ids`` and ``generation_scores`` whole, ``logits`` (and ``logits_long``) at every
  4th position and the last 16 (random text ids: the rope scaling acts on every position alike); ``info`` metadata;
* ``preprocess_pixels.compact.json`` / ``.safetensors``: the per-tile digests and block means of the six
  ``preprocess_pixels`` entries instead of their 24.7 MB of uint8 tiles;
* dropped: ``vision_last_hidden_state_tile0`` and ``vit_embeds`` (no test uses them);
* ``internvl3_5_flash/`` from ``../shared/fixtures_flash`` (InternVL3.5-Flash's router): the checkpoint and tokenizer
  files and ``reference.json`` verbatim, ``reference.compact.safetensors`` with each case's ``FLASH_KEPT`` tensors
  (ids before and after the router, decisions, scores, quantile, last logits, greedy ids and scores); the tiles are
  rebuilt from ``images/`` by the tests (``reference.json`` holds their digests);
* ``MANIFEST.json``: size and sha256 of every file written, and the sha256 of the sources' own manifests.

``tests/fixtures/tokenizer_cases/`` is not derived from the fixtures (``scripts/make_tokenizer_cases.py`` records
it from the reference slow tokenizers), nor are the InternVL2.5 / InternVL3 fixtures (``golden.V25_FIXTURES``:
``scripts/make_internvl25_fixtures.py`` builds them and writes their compact form with this script's
``_compact_model_fixture``), nor ``real_configs/`` (public ``config.json`` files, see its ``SOURCES.md``): this
script leaves them alone and ``--check`` ignores them.
The rules are implemented in ``tests/golden.py`` (shared with the tests that read the data). The output is
reproducible: running the script again gives byte-identical files, which ``--check`` verifies (it rebuilds into a
temporary folder and compares; `.ci/run` runs it when ``../shared/fixtures`` is present).

Usage::

    python scripts/compact_fixtures.py                       # ../shared/fixtures(+_phi3) -> tests/fixtures
    python scripts/compact_fixtures.py --check               # exit 1 if tests/fixtures differs from a rebuild
    python scripts/compact_fixtures.py --src /data/fixtures --src-phi3 /data/fixtures_phi3 --out /tmp/compact
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import golden  # noqa: E402  (tests/golden.py: the rules, shared with the tests)

# folders of tests/fixtures made otherwise: scripts/make_tokenizer_cases.py, scripts/make_internvl25_fixtures.py
# (which compacts its fixtures with `_compact_model_fixture` as it makes them), and real_configs/ (public config.json
# files copied from their sources, see real_configs/SOURCES.md)
HAND_MADE = ("tokenizer_cases", "real_configs", "video", *golden.V25_FIXTURES)
DROPPED = {
    **dict.fromkeys(golden.DROPPED_TENSORS, "no test uses it"),
    "pixel_values_u8": "replaced by per-tile sha256 digests, stats and block means of the float32 pixel_values",
}
FORMAT = "internvlx-hf compact golden data, format 1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


_ST_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL"}


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with a deterministic header (safetensors' own writer orders the metadata at random).

    Tensors in name order, metadata keys sorted, data 8-byte aligned: the format's spec, read by `safe_open`."""
    header: dict = {"__metadata__": dict(sorted({"format": "pt", **metadata}.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _compact_model_fixture(name: str, src: Path, out: Path, rope: str | None) -> None:
    """One model folder: verbatim files, then the compact reference (and rope check)."""
    out.mkdir(parents=True)
    big = {"reference.safetensors"} | ({f"{rope}.safetensors"} if rope else set())
    for file in sorted(src.iterdir()):
        if file.is_file() and file.name not in big:
            _copy(file, out / file.name)

    tensors, _ = golden.load_safetensors(src / "reference.safetensors")
    meta = json.loads((src / "reference.json").read_text(encoding="utf-8"))
    pixels = golden.TileDigests.from_tensor(golden.pixels_from_uint8(tensors["pixel_values_u8"]))
    if pixels.whole_sha256 != meta["preprocess"]["pixel_values_sha256"]:
        raise SystemExit(f"{src}: the pixel formula does not reproduce reference.json's pixel_values_sha256")
    pixel_record, means = pixels.compact_record()
    positions = golden.logit_positions(tensors["input_ids"], int(meta["img_context_token_id"]))
    logits = tensors["logits"][0]
    kept = {key: tensors[key] for key in ("input_ids", "attention_mask", "image_flags", "generated_ids",
                                          "generation_scores")}
    kept.update({"logits.positions": positions, "logits.values": logits[positions],
                 "pixel_values.block_means": means})
    _save(out / "reference.compact.safetensors", kept, {"source": "reference.safetensors"})
    _write_json(out / "reference.compact.json", {
        "format": FORMAT,
        "source": {"file": "reference.safetensors", "sha256": _sha256(src / "reference.safetensors")},
        "logits": {"length": logits.shape[0], "kept_positions": positions.numel(),
                   "rule": f"every text position, the last {golden.LAST_POSITIONS} positions and every "
                           f"{golden.VISUAL_STRIDE}th <IMG_CONTEXT> position (id {meta['img_context_token_id']})"},
        "pixel_values": pixel_record,
        "dropped": {key: DROPPED[key] for key in sorted(tensors) if key in DROPPED},
    })

    if rope:
        tensors, metadata = golden.load_safetensors(src / f"{rope}.safetensors")
        kept = {}
        for key, tensor in tensors.items():
            if key.startswith("logits"):
                positions = golden.rope_logit_positions(tensors[golden.rope_input_of(key)])
                kept[f"{key}.positions"] = positions
                kept[f"{key}.values"] = tensor[0][positions]
            else:
                kept[key] = tensor
        metadata = {k: v for k, v in metadata.items() if k != "format"}
        metadata["compact"] = (f"logits* at every {golden.ROPE_TEXT_STRIDE}th position and the last "
                               f"{golden.LAST_POSITIONS}; other tensors whole; source {rope}.safetensors sha256 "
                               f"{_sha256(src / f'{rope}.safetensors')}")
        _save(out / f"{rope}.compact.safetensors", kept, metadata)


# InternVL3.5-Flash (../shared/fixtures_flash): what the router's tests compare, per case (main, second, two_image,
# main_abs075; normal = flash_mode off). The tiles are rebuilt from the images by the processor (reference.json's
# preprocess digests check them); the embeddings, ViT and pooling tensors are not compared by any test.
FLASH_KEPT = ("input_ids", "input_ids_compressed", "compress", "gate_probs", "quantile", "logits_last",
              "generation_scores", "generated_ids")


def _compact_flash_fixture(src: Path, out: Path) -> None:
    out.mkdir(parents=True)
    for file in sorted(src.iterdir()):
        if file.is_file() and file.name not in ("reference.safetensors", "MANIFEST.json", "README.md"):
            _copy(file, out / file.name)
    tensors, _ = golden.load_safetensors(src / "reference.safetensors")
    kept = {key: tensor for key, tensor in tensors.items() if key.split(".", 1)[-1] in FLASH_KEPT}
    _save(out / "reference.compact.safetensors", kept, {
        "source": f"reference.safetensors sha256 {_sha256(src / 'reference.safetensors')}",
        "kept": ", ".join(FLASH_KEPT) + " (each case's; normal.* for flash_mode off)",
        "dropped": ", ".join(sorted(key for key in tensors if key not in kept)),
    })


def _compact_preprocess(src: Path, out: Path) -> None:
    _copy(src / "preprocess_pixels.json", out / "preprocess_pixels.json")
    meta = json.loads((src / "preprocess_pixels.json").read_text(encoding="utf-8"))
    tiles, _ = golden.load_safetensors(src / "preprocess_pixels.safetensors")
    entries, means = {}, {}
    for entry in meta["entries"]:
        digests = golden.TileDigests.from_tensor(golden.pixels_from_uint8(tiles[entry["key"]]))
        if digests.whole_sha256 != entry["pixel_values_sha256"]:
            raise SystemExit(f"{entry['key']}: the pixel formula does not reproduce pixel_values_sha256")
        entries[entry["key"]], means[f"{entry['key']}.block_means"] = digests.compact_record()
    _write_json(out / "preprocess_pixels.compact.json", {
        "format": FORMAT,
        "source": {"file": "preprocess_pixels.safetensors", "sha256": _sha256(src / "preprocess_pixels.safetensors")},
        "entries": entries,
    })
    _save(out / "preprocess_pixels.compact.safetensors", means, {"source": "preprocess_pixels.safetensors"})


def build(src: Path, src_phi3: Path, src_flash: Path, out: Path) -> None:
    """Write the compact copy of ``src`` (+ ``src_phi3``, ``src_flash``) into the empty folder ``out``."""
    for folder, fixtures in ((src, ["internvl2_internlm2", "internvl2_qwen2", "internvlx_pvtc"]),
                             (src_phi3, ["internvl2_phi3"])):
        for name in fixtures:
            if not (folder / name / "reference.safetensors").is_file():
                raise SystemExit(f"{folder / name} is not a full fixture folder (no reference.safetensors)")
            _compact_model_fixture(name, folder / name, out / name, golden.ROPE_CHECKS.get(name))
    for folder in (src, src_phi3):  # the two fixture sets share img6.jpg; the copies must be identical
        for image in sorted((folder / "images").iterdir()):
            target = out / "images" / image.name
            if target.exists() and not filecmp.cmp(image, target, shallow=False):
                raise SystemExit(f"{image} differs from the image of the same name in the other fixture folder")
            _copy(image, target)
    _copy(src / "rvtc_tiling.json", out / "rvtc_tiling.json")
    _compact_preprocess(src, out)
    _compact_flash_fixture(src_flash, out / golden.FLASH_FIXTURE)

    files = sorted(p for p in out.rglob("*") if p.is_file())
    _write_json(out / "MANIFEST.json", {
        "format": FORMAT,
        "generator": "scripts/compact_fixtures.py (rules in tests/golden.py)",
        "sources": {"fixtures/MANIFEST.json": _sha256(src / "MANIFEST.json"),
                    "fixtures_phi3/MANIFEST.json": _sha256(src_phi3 / "MANIFEST.json"),
                    "fixtures_flash/MANIFEST.json": _sha256(src_flash / "MANIFEST.json")},
        "total_bytes": sum(p.stat().st_size for p in files),
        "files": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    })


def _derived_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] not in HAND_MADE}


def check(built: Path, out: Path) -> list[str]:
    """Differences between a fresh build and ``out`` (empty when byte-identical)."""
    expected, present = _derived_files(built), _derived_files(out) if out.is_dir() else set()
    problems = [f"missing: {name}" for name in sorted(expected - present)]
    problems += [f"not made by this script: {name}" for name in sorted(present - expected)]
    problems += [f"differs: {name}" for name in sorted(expected & present)
                 if not filecmp.cmp(built / name, out / name, shallow=False)]
    return problems


def install(built: Path, out: Path) -> None:
    """Replace the derived files of ``out`` with ``built``, keeping the folders made otherwise (HAND_MADE)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in out.iterdir():
        if item.name not in HAND_MADE:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for item in built.iterdir():
        shutil.move(str(item), str(out / item.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0], epilog="See the module docstring (or docs/testing.md) for the rules.",
    )
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "fixtures",
                        help="full fixtures folder (default: ../shared/fixtures beside the checkout)")
    parser.add_argument("--src-phi3", type=Path, default=None,
                        help="full Phi-3 fixtures folder (default: fixtures_phi3 beside --src)")
    parser.add_argument("--src-flash", type=Path, default=None,
                        help="full InternVL3.5-Flash fixture folder (default: fixtures_flash beside --src)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures", help="default: tests/fixtures")
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary folder and compare with --out byte for byte; change nothing")
    args = parser.parse_args(argv)
    src = args.src.resolve()
    src_phi3 = (args.src_phi3 or src.parent / "fixtures_phi3").resolve()
    src_flash = (args.src_flash or src.parent / "fixtures_flash").resolve()
    for folder in (src, src_phi3, src_flash):
        if not (folder / "MANIFEST.json").is_file():
            parser.error(f"{folder} is not a full fixtures folder (no MANIFEST.json); pass --src / --src-phi3 / "
                         "--src-flash")
    torch.set_num_threads(1)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix=".compact-fixtures-", dir=out.parent) as tmp:
        built = Path(tmp) / "fixtures"
        built.mkdir()
        build(src, src_phi3, src_flash, built)
        total = json.loads((built / "MANIFEST.json").read_text())["total_bytes"]
        if args.check:
            problems = check(built, out)
            if problems:
                print(f"{out} is not what {Path(__file__).name} makes from {src}:", *problems, sep="\n  ")
                print("rebuild it with `python scripts/compact_fixtures.py`")
                return 1
            print(f"{out}: byte-identical to a rebuild from {src}, {src_phi3} and {src_flash} ({total / 1e6:.2f} MB)")
            return 0
        install(built, out)
    hand = sum(p.stat().st_size for name in HAND_MADE for p in (out / name).rglob("*") if p.is_file())
    print(f"wrote {out}: {total / 1e6:.2f} MB derived + {hand / 1e6:.2f} MB kept ({', '.join(HAND_MADE)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
