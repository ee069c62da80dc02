"""`internvlx_hf.atomic`: files and folders that appear whole, durably, with the permissions a plain open() / mkdir()
gives, and without touching the process's umask (which every thread shares).

Durability is checked by what reaches the kernel: `os.fsync` and `os.replace` are wrapped (the standard library's,
called through) to record, by inode, that every file and folder written is flushed before the rename and the folder
holding the new name after it."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from internvlx_hf.atomic import atomic_file, staged_cache_folder, staged_folder, temporary_folder


@pytest.fixture
def umask_027(monkeypatch):
    """The process umask is 027 for the test, and `os.umask` raises: the code under test must not call it (it sets
    the umask of every thread, if only for a moment)."""
    real_umask = os.umask
    previous = real_umask(0o027)

    def forbidden(mask):
        raise AssertionError("os.umask was called: it changes the umask of every thread of the process")

    monkeypatch.setattr(os, "umask", forbidden)
    yield
    monkeypatch.undo()
    real_umask(previous)


def test_permissions_follow_the_umask_which_is_never_changed(tmp_path, umask_027):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with staged_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
    with staged_cache_folder(tmp_path / "cache-entry") as tmp:
        (tmp / "data.bin").write_bytes(b"x")
    folder = temporary_folder(tmp_path / "other")
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in [tmp_path / "a.json", tmp_path / "model", tmp_path / "model" / "config.json",
                          tmp_path / "model" / "sub", tmp_path / "cache-entry", folder]}
    assert modes == {"a.json": 0o640, "model": 0o750, "model/config.json": 0o640, "model/sub": 0o750,
                     "cache-entry": 0o750, folder.name: 0o750}
    assert folder.name.startswith(".other.tmp-")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The fsync and replace calls made, as ``("fsync", inode)`` and ``("replace", inode of what was renamed)``."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        calls.append(("fsync", os.fstat(descriptor).st_ino))
        return fsync(descriptor)

    def recorded_replace(src, dst, **kwargs):
        calls.append(("replace", os.stat(src).st_ino))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return calls


def test_a_file_is_flushed_before_its_rename_and_its_folder_after(tmp_path, kernel_calls):
    (tmp_path / "a.json").write_text("old")
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("new")
    inode, folder = (tmp_path / "a.json").stat().st_ino, tmp_path.stat().st_ino
    assert kernel_calls == [("fsync", inode), ("replace", inode), ("fsync", folder)]
    assert (tmp_path / "a.json").read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_staged_folder_is_flushed_whole_before_its_rename(tmp_path, kernel_calls, existing):
    if existing:
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "old.bin").write_bytes(b"old")
    with staged_folder(tmp_path / "model") as tmp:
        (tmp / "weights").mkdir()
        (tmp / "weights" / "a.bin").write_bytes(b"a")
        (tmp / "config.json").write_text("{}")
    model = tmp_path / "model"
    inodes = {path: (model / path).stat().st_ino for path in ("weights/a.bin", "weights", "config.json", ".")}
    flushed_first = {inode for kind, inode in kernel_calls[:4] if kind == "fsync"}
    assert flushed_first == set(inodes.values()) and len(kernel_calls[:4]) == 4  # every file and folder
    renames = [inode for kind, inode in kernel_calls if kind == "replace"]
    assert inodes["."] in renames and kernel_calls[-1] == ("fsync", tmp_path.stat().st_ino)
    assert sorted(os.listdir(tmp_path)) == ["model"] and sorted(os.listdir(model)) == ["config.json", "weights"]


def test_writers_in_threads_each_get_their_file_whole(tmp_path):
    """Many threads writing at once (the server's workers, a data loader's): every file whole, nothing left over."""
    def write(number):
        for round_ in range(20):
            with atomic_file(tmp_path / f"{number}.txt") as tmp:
                tmp.write_text(f"{number} {round_}\n" * 100)

    threads = [threading.Thread(target=write, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(os.listdir(tmp_path)) == sorted(f"{number}.txt" for number in range(8))
    assert all((tmp_path / f"{n}.txt").read_text() == f"{n} 19\n" * 100 for n in range(8))
