"""Where a conversion, an export or `--add-router` may write: the check all three make before any work."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is SRC, contains it, lies inside it, is a file, or is a non-empty folder without
    ``overwrite`` (convert and export both write through this check)."""
    if dst.resolve() == src.resolve():
        raise ConversionError(f"DST {dst} is SRC; write the converted checkpoint to a new folder.")
    # Replacing DST removes it, so a DST that holds SRC would delete the source (and one inside SRC pollutes it).
    if src.resolve().is_relative_to(dst.resolve()):
        raise ConversionError(f"DST {dst} contains SRC {src}; write the converted checkpoint to a folder outside it.")
    if dst.resolve().is_relative_to(src.resolve()):
        raise ConversionError(f"DST {dst} is inside SRC {src}; write the converted checkpoint to a folder outside it.")
    if dst.is_file() or (dst.is_symlink() and not dst.is_dir()):
        raise ConversionError(f"DST {dst} is a file; pass a folder path.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"DST {dst} exists and is not empty; pass --overwrite (overwrite=True) to replace it.")
