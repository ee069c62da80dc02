"""Per-row status codes of a dataset (usable, truncated, skipped for a reason): written by `dataset`, `lengths`
and `check`, counted by `status_counts`."""

from __future__ import annotations

from collections import Counter

import numpy as np

# Per-row status codes (uint8): 0 not loaded yet, 1 usable, 2 usable after truncation, 3 + i skipped for REASONS[i].
UNSEEN, USABLE, TRUNCATED = 0, 1, 2
REASONS = ("invalid JSON", "bad format", "unknown role", "video sample", "remote image", "misplaced system turn",
           "no human turn", "no user turn", "image not found", "image is a folder", "unreadable image",
           "undecodable image", "refused by the chat template", "image count mismatch", "image tokens in text",
           "reply boundary inside a token", "no assistant reply", "too long", "remote video", "video count mismatch",
           "video not found", "unreadable video", "other")


def reason_code(reason: str) -> int:
    return 3 + (REASONS.index(reason) if reason in REASONS else len(REASONS) - 1)


def status_counts(status: np.ndarray) -> tuple[int, int, Counter]:
    """(rows read, truncated, skipped per reason) of a status array."""
    counts = np.bincount(np.asarray(status, dtype=np.int64), minlength=3 + len(REASONS))
    skipped = Counter({reason: int(counts[3 + i]) for i, reason in enumerate(REASONS) if counts[3 + i]})
    return int(counts[1:].sum()), int(counts[TRUNCATED]), skipped
