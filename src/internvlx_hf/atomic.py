"""Files and folders that appear whole or not at all: written under a temporary name next to the target, renamed
into place at the end, removed on any error. Permissions follow the umask, as for a plain ``open()`` / ``mkdir()``
(``mkstemp`` / ``mkdtemp`` would leave them private).

A process killed while writing (SIGKILL, out of memory, a pre-empted node) cannot remove its temporary file or folder:
the target never appears, and the temporary one stays. Its name (`temp_prefix`) carries the writer's host and
process id, so the next writer of the same target removes it once that process is gone (`remove_stale_temporaries`);
a conversion killed halfway leaves no hidden copy of the weights behind for good.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def temp_prefix(target: str | os.PathLike) -> str:
    """``.NAME.tmp-HOST-PID.``: the name's start of a temporary file or folder that is to become ``target``."""
    return f".{Path(target).name}.tmp-{_host()}-{os.getpid()}."


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never take a writer for gone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that writers of ``target`` (named by `temp_prefix`) left next to it
    when they were killed: those of processes of this host that no longer run. Returns what was removed."""
    target = Path(target)
    prefix = f".{target.name}.tmp-"
    host, removed = _host(), []
    try:
        entries = [entry for entry in os.scandir(target.parent) if entry.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        owner = entry.name[len(prefix):].rsplit(".", 1)[0]
        writer_host, _, pid = owner.rpartition("-")
        if writer_host != host or not pid.isdigit() or _running(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by a writer of %s that was stopped (process %s)", path, target, pid)
        removed.append(path)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it inside the ``with`` block, and it replaces ``path``."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
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
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dst), dir=dst.parent))
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
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dst), dir=dst.parent))
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
