"""Files and folders that appear whole or not at all: written under a temporary name next to the target, renamed
into place at the end, removed on any error. Permissions follow the umask, as for a plain ``open()`` / ``mkdir()``
(``mkstemp`` / ``mkdtemp`` would leave them private)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it inside the ``with`` block, and it replaces ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dst``; fill it inside the ``with`` block, and it replaces ``dst``
    (an existing ``dst`` is moved aside first and put back if the rename fails)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # only the folder: what is written into it already follows the umask
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_cache_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """`staged_folder` for a folder whose name says what it holds (a cache entry): yield an empty temporary folder
    next to ``dst``; fill it inside the ``with`` block, and it becomes ``dst``, unless another process put ``dst``
    there first, in which case it is removed and that one stays (a folder in use is never moved aside)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, dst)  # fails where dst is a folder with files in it
        except OSError:
            if not dst.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` to ``dst``; an existing ``dst`` is moved aside first, put back if the rename fails,
    and removed once it succeeded."""
    if not dst.exists():
        os.replace(src, dst)
        return
    backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)
