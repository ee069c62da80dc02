"""Files and folders that appear whole or not at all: written under a temporary name next to the target, renamed
into place at the end, removed on any error.

Durable: before the rename, what was written is flushed to the disk (``fsync`` of every file, and of every folder of a
staged tree), and after it the folder holding the new name, so that a power loss or a crashed machine never leaves
the target's name on empty or partial content (a rename is recorded in the folder, which is a file of its own).
Permissions follow the umask, as for a plain ``open()`` / ``mkdir()``: the temporaries are created with mode 0o666 /
0o777 and the kernel applies the umask (``mkstemp`` / ``mkdtemp`` would leave them private; reading the umask needs
``os.umask``, which sets it for every thread of the process for a moment).

A process killed while writing (SIGKILL, out of memory, a pre-empted node) cannot remove its temporary file or folder:
the target never appears, and the temporary one stays. Its name (`temp_prefix`) carries the writer's host and
process id, so the next writer of the same target removes it once that process is gone (`remove_stale_temporaries`);
a conversion killed halfway leaves no hidden copy of the weights behind for good.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
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


def _temporary(target: Path, make) -> Path:
    """A new temporary next to ``target`` (`temp_prefix`), created by ``make(path)``; another name if it exists."""
    prefix = temp_prefix(target)
    while True:
        path = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask


def temporary_folder(target: str | os.PathLike) -> Path:
    """A new empty folder next to ``target``, named by `temp_prefix` (so `remove_stale_temporaries` finds it if its
    writer is killed), with the permissions of a plain ``mkdir`` (mode 0o777 less the umask)."""
    return _temporary(Path(target), lambda path: os.mkdir(path, 0o777))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk; Windows has no such call (its
    renames are durable once done)."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """`fsync_file` for every file under ``folder`` and `fsync_folder` for every folder, the deepest first (symbolic
    links are not followed)."""
    for root, folders, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_folder(root)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it inside the ``with`` block, and it replaces ``path``, flushed
    to the disk first (`fsync_file`), its folder after (`fsync_folder`)."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _temporary(path, _new_file)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _temporary_beside(dst: str | os.PathLike) -> tuple[Path, Path]:
    """``(dst, a new empty temporary folder next to it)``, its parent made and stale temporaries of earlier runs
    removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    return dst, temporary_folder(dst)


@contextmanager
def staged_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dst``; fill it inside the ``with`` block, and it replaces ``dst``
    (`replace_folder`: flushed to the disk first; an existing ``dst`` is moved aside first and put back if the
    rename fails)."""
    dst, tmp = _temporary_beside(dst)
    try:
        yield tmp
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_cache_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """`staged_folder` for a folder whose name says what it holds (a cache entry): yield an empty temporary folder
    next to ``dst``; fill it inside the ``with`` block, and it becomes ``dst``, unless another process put ``dst``
    there first, in which case it is removed and that one stays (a folder in use is never moved aside)."""
    dst, tmp = _temporary_beside(dst)
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.rename(tmp, dst)  # fails where dst is a folder with files in it
        except OSError:
            if not dst.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            fsync_folder(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` to ``dst``, its files and folders flushed to the disk first (`fsync_tree`) and the
    parent folder after; an existing ``dst`` is moved aside first, put back if the rename fails, and removed once it
    succeeded."""
    fsync_tree(src)
    if not dst.exists():
        os.replace(src, dst)
        fsync_folder(dst.parent)
        return
    backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    fsync_folder(dst.parent)
    shutil.rmtree(backup, ignore_errors=True)
