"""Imported first by the child processes of tests/test_faults.py: stops the child at a known point, for the test to
kill it there with SIGKILL.

``FAULT_PAUSE`` names the point: ``write:REGEX`` (a file whose path matches REGEX is opened for writing),
``read:REGEX`` (opened for reading) or ``rename:REGEX`` (a file or folder is renamed to a path matching REGEX). There
the child writes the matched path into the file ``FAULT_MARKER`` and sleeps until it is killed. Only the standard
library's ``open`` / ``os.replace`` / ``os.rename`` are wrapped: the code under test runs unchanged up to that point
(files written by C/C++/Rust code, e.g. torch.save or safetensors, are not seen, but the Python writes around them
are). Without ``FAULT_PAUSE`` nothing is wrapped.
"""

from __future__ import annotations

import builtins
import io
import os
import re
import time

_SPEC = os.environ.get("FAULT_PAUSE")
_open, _replace, _rename = builtins.open, os.replace, os.rename


def _pause(path) -> None:
    marker = os.environ["FAULT_MARKER"]
    with _open(marker + ".part", "w", encoding="utf-8") as handle:
        handle.write(os.fspath(path))
    _replace(marker + ".part", marker)
    while True:
        time.sleep(60)


if _SPEC:
    _KIND, _, _PATTERN = _SPEC.partition(":")
    _REGEX = re.compile(_PATTERN)
    if _KIND not in ("write", "read", "rename"):
        raise ValueError(f"FAULT_PAUSE={_SPEC!r}: the point is write:REGEX, read:REGEX or rename:REGEX")

    def _paused_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and _REGEX.search(os.fspath(file)):
            writes = any(flag in mode for flag in "wax+")
            if writes == (_KIND == "write") and _KIND != "rename":
                _pause(file)
        return _open(file, mode, *args, **kwargs)

    def _paused_replace(src, dst, *args, **kwargs):
        if _KIND == "rename" and _REGEX.search(os.fspath(dst)):
            _pause(dst)
        return _replace(src, dst, *args, **kwargs)

    def _paused_rename(src, dst, *args, **kwargs):
        if _KIND == "rename" and _REGEX.search(os.fspath(dst)):
            _pause(dst)
        return _rename(src, dst, *args, **kwargs)

    builtins.open = io.open = _paused_open
    os.replace, os.rename = _paused_replace, _paused_rename
