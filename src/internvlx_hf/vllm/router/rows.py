"""What the router keeps on the worker between routing calls and steps, so that the vision tower runs once per image:
the rows a routing call computed, until the step that embeds them (`AdmittedRows`), and each image's scores, for the
next request that sends it again (`SeenScores`: a chat resends its images each turn). Plain torch: tested without
vLLM."""

from __future__ import annotations

from collections import OrderedDict

import torch

#: The most bytes of rows kept at once (per worker). A request whose rows do not fit is not kept: its step runs the
#: vision tower again, as it would without this store. The oldest kept are never pushed out by newer ones (vLLM
#: schedules requests in the order they arrive, so the oldest are embedded first); a request that ends without
#: embedding its rows (an image served from the prefix or encoder cache, an abort) has them dropped with the next
#: routing call, or in the next step where it ended before its prompt was computed (`drop`).
ADMITTED_ROWS_BYTES = 256 * 2**20


class AdmittedRows:
    """Each image's (or video's) rows by the key the scheduler gave it when it routed its request."""

    def __init__(self, capacity: int = ADMITTED_ROWS_BYTES) -> None:
        self.capacity = capacity
        self.rows: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def put(self, keys: list[int], rows: list[torch.Tensor]) -> bool:
        """Keep one request's items' `rows` under `keys`, all or none (whether they fit)."""
        size = sum(row.numel() * row.element_size() for row in rows)
        if self.bytes + size > self.capacity:
            return False
        for key, row in zip(keys, rows, strict=True):
            self.rows[key] = row
        self.bytes += size
        return True

    def take(self, keys: list[int]) -> list[torch.Tensor | None]:
        """The rows of `keys`, in order, None for each one not kept (its step computes it); those found are let go."""
        found = [self.rows.pop(key, None) for key in keys]
        self.bytes -= sum(row.numel() * row.element_size() for row in found if row is not None)
        return found

    def drop(self, keys: list[int]) -> None:
        """Let go of the rows of `keys` (those kept)."""
        self.take(keys)


#: How many items' scores `SeenScores` keeps (a few floats each: one per tile).
SEEN_SCORES_ITEMS = 65536


class SeenScores:
    """The router's scores (`p0`, one per tile) of each image or video by its content key (vLLM's identifier of the
    item, a hash of its pixels and processing options), the least recently used let go past `capacity` items. A
    tile's score depends on its pixels alone (the vision tower and the router take each tile by itself), so a request
    that sends an item again is routed from these, with the other items' scores, as transformers routes it."""

    def __init__(self, capacity: int = SEEN_SCORES_ITEMS) -> None:
        self.capacity = capacity
        self.scores: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str | None) -> torch.Tensor | None:
        if key is None or key not in self.scores:
            return None
        self.scores.move_to_end(key)
        return self.scores[key]

    def put(self, key: str | None, scores: torch.Tensor) -> None:
        if key is None:
            return
        self.scores[key] = scores
        self.scores.move_to_end(key)
        while len(self.scores) > self.capacity:
            self.scores.popitem(last=False)
