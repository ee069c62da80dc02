"""Byte offsets of the rows of a JSONL file: a file of millions of rows opens in seconds, a row is read when used.

The index keeps, per non-blank line, its start offset, its length and its line number (numpy arrays: 16 bytes a row),
never the text. The file is read once in fixed-size chunks (no memory map, so its pages do not count towards the
process's resident memory), and rows are read back with ``os.pread``, which needs no shared file position: the
index can be copied into DataLoader workers (fork or pickle) and each process opens the file on first use.
"""

from __future__ import annotations

import os

import numpy as np

_CHUNK = 16 << 20
_WHITESPACE = frozenset(b" \t\r\x0b\x0c")


def _scan(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every line of the file (the newline excluded)."""
    starts, ends = [], []
    buffer = bytearray(_CHUNK)
    position, after_newline = 0, True
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            chunk = np.frombuffer(buffer, dtype=np.uint8, count=count)
            newline = chunk == 10
            begins = np.empty(count, dtype=bool)
            begins[0] = after_newline
            begins[1:] = newline[:-1]
            starts.append(np.flatnonzero(begins) + position)
            ends.append(np.flatnonzero(newline) + position)
            after_newline = bool(newline[-1])
            position += count
    starts = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
    ends = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    if len(ends) < len(starts):  # the last line has no newline
        ends = np.append(ends, position)
    return starts.astype(np.int64), ends.astype(np.int64)


class JsonlIndex:
    """The non-blank lines of a JSONL file, by position: ``read(i)`` is the i-th row's text, ``where(i)`` its
    ``"file.jsonl:LINE"``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        starts, ends = _scan(self.path)
        lengths = ends - starts
        keep = lengths > 0
        # A line is blank when only whitespace: look at the few whose first byte is whitespace.
        maybe_blank = np.flatnonzero(keep)
        if len(maybe_blank):
            with open(self.path, "rb") as handle:
                for i in maybe_blank[_first_bytes_whitespace(handle, starts[maybe_blank])]:
                    handle.seek(int(starts[i]))
                    if not handle.read(int(lengths[i])).strip():
                        keep[i] = False
        self.starts = starts[keep]
        self.lengths = lengths[keep].astype(np.int32)
        self.lines = (np.flatnonzero(keep) + 1).astype(np.int32)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, index: int) -> str:
        return f"{self.path}:{int(self.lines[index])}"

    def read(self, index: int) -> str:
        if self._fd is None or self._pid != os.getpid():  # a DataLoader worker / pool process opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, int(self.lengths[index]), int(self.starts[index]))
        return data.decode("utf-8", errors="replace")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def _first_bytes_whitespace(handle, starts: np.ndarray) -> np.ndarray:
    """Mask of the lines (given by start offsets, ascending) whose first byte is whitespace, read chunk by chunk."""
    mask = np.zeros(len(starts), dtype=bool)
    buffer = bytearray(_CHUNK)
    lookup = np.zeros(256, dtype=bool)
    lookup[list(_WHITESPACE)] = True
    handle.seek(0)
    position = 0
    while True:
        count = handle.readinto(buffer)
        if not count:
            break
        chunk = np.frombuffer(buffer, dtype=np.uint8, count=count)
        lo, hi = np.searchsorted(starts, [position, position + count])
        mask[lo:hi] = lookup[chunk[starts[lo:hi] - position]]
        position += count
    return mask


__all__ = ["JsonlIndex"]
