"""The router's work on the engine's worker: one call routes a batch of waiting requests (`route_requests`, what the
scheduler sends once per step through vLLM's `collective_rpc`), the vision tower run once over every image of the
batch that has no kept scores, each request's quantile over its own tiles."""

from __future__ import annotations

import torch
from vllm.distributed import get_pp_group

from ...modeling.configuration_internvlx import ViRConfig
from ...modeling.vir import vir_decisions

#: One request of a batch: each image's (or video's) tiles in prompt order, the key the scheduler gives each item's
#: rows (or None: keep none), and each item's content key (vLLM's identifier, or None).
RequestTiles = tuple[list[torch.Tensor], list[int] | None, list[str | None] | None]


@torch.inference_mode()
def route_requests(model, requests: list[RequestTiles], dropped: list[int] | None = None) -> list[list[list[bool]]]:
    """The router's decisions for each request's tiles (True: compressed), by item in prompt order: the quantile over
    the request's tiles, as transformers' scope "sample" (one request is one sample). An item seen before is routed
    from its kept scores (`model.seen_scores`: by its content key and tile count), without the vision tower; the
    batch's other items go through the tower in one call (an item sent by two requests of the batch, once), and their
    rows are kept under their keys for the step that embeds them (`model.admitted`). `dropped`: keys of requests that
    ended (their rows let go first). None on a pipeline stage after the first, which holds no vision side's work
    (vLLM runs the encoder on the first): the first stage's answer is the engine's."""
    if not get_pp_group().is_first_rank:
        return None
    model.admitted.drop(dropped or [])
    counts = [[tiles.shape[0] for tiles in pixels] for pixels, _, _ in requests]
    # (an item's scores are kept by what decides them: its identifier and its tile count; a client's reused
    # `multi_modal_uuids` for another image of other tiles is then routed as new)
    names = [[None if item is None else f"{item}#tiles={count}" for item, count in zip(items or [None] * len(n), n)]
             for (_, _, items), n in zip(requests, counts)]
    scores: list[list[torch.Tensor | None]] = [[model.seen_scores.get(name) for name in row] for row in names]
    new: list[tuple[int, int]] = []  # (request, item) of each item the tower runs on, in batch order
    first: dict[str, tuple[int, int]] = {}  # an item's content key -> where the batch computes it
    for r, row in enumerate(scores):
        for i, known in enumerate(row):
            name = names[r][i]
            if known is None and (name is None or name not in first):
                new.append((r, i))
                if name is not None:
                    first[name] = (r, i)
    vit = None
    if new:
        device = next(model.vir.parameters()).device
        vit = model._vit(torch.cat([requests[r][0][i] for r, i in new]).to(device=device, dtype=model.model_dtype))
        # (kept and decided on the host: a few floats per tile, no device memory held between calls)
        for (r, i), part in zip(new, model.vir.scores(vit).float().cpu().split([counts[r][i] for r, i in new])):
            scores[r][i] = part
            model.seen_scores.put(names[r][i], part)
    for r, row in enumerate(scores):  # (items the batch sent twice: the first's scores)
        for i, known in enumerate(row):
            if known is None:
                row[i] = scores[first[names[r][i]][0]][first[names[r][i]][1]]
    vir = ViRConfig.from_any(model.config.vir)
    decisions = [vir_decisions(torch.cat(row), [sum(n)], vir.relative_threshold, vir.absolute_threshold).split(n)
                 for row, n in zip(scores, counts)]
    if vit is not None:
        compressed = torch.cat([decisions[r][i] for r, i in new]).to(vit.device)
        rows = model._item_rows(vit, [counts[r][i] for r, i in new], compressed)
        kept: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for (r, i), item_rows in zip(new, rows):
            keys = requests[r][1]
            if keys is not None:
                kept.setdefault(r, ([], []))
                kept[r][0].append(keys[i])
                kept[r][1].append(item_rows)
        for keys, item_rows in kept.values():  # (a request's rows all kept, or none)
            model.admitted.put(keys, item_rows)
    return [[part.tolist() for part in request] for request in decisions]
