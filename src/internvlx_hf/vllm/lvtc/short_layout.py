"""The short layout of one vLLM step, for LVTC's saving path (`saving/`): which of the step's tokens the layers
below ``k`` run on, at which short positions, into which KV slots; and the per-step check that the rows read belong
to this step.

Plain torch, no vLLM: the inputs are the tensors vLLM's model runners hand an attention metadata builder, so the
function runs (and is tested, `tests/test_short_layout.py`) with the inputs each runner gives, on CPU and on CUDA.

The rows (``positions.saving_positions``): row 1 holds each token's short position ``s``; row 2 ``-1 - j`` for slot
``j`` of a tile and ``s`` for every other token; a decoded token's rows are all ``s``. The runner also passes each
token's long position ``p`` (its index in the request). What holds for every token of a right step, and is checked:

- ``p - s`` counts the HR-only slots before the token: for a tile slot ``j`` those of earlier tiles (a multiple of the
  tile's ``long - short`` HR-only slots) plus ``max(0, j - short)`` of its own tile; for any other token a multiple;
- a request's live tokens (all but the HR-only slots) have consecutive short positions, and each request the step
  schedules has at least one (a step holds whole tiles, and decoded tokens are live);
- a request whose step starts inside a tile (a prefix-cache hit that ends in the tile's HR-only slots) holds the rest
  of that tile and, in its last HR-only slots, the LR slots it must recompute
  (`geometry.lr_slots_to_recompute`); those slots are live too, at their LR slots' short positions, and their K/V
  is written only after the last full short block before the tile's LR end (the blocks before are the cache's);
- no live token maps past the short group's block table or to vLLM's null block (where a request's row ends when the
  scheduler gave the group fewer tokens than the rows place).

A warm-up step (a dummy run that builds attention metadata before any request: no block in the step's block table
rows, rows all zeros) runs every token below ``k`` at its index in its request and writes no K/V.

Rows left from the previous step (a runner that builds the metadata before it writes the step's rows, as vLLM's second
model runner does) give a decoded token ``p - s`` one more than a multiple: caught. Padded counts (CUDA graphs, data
parallelism) and the stale columns past the step's tokens are ignored by construction: only the first
``num_tokens`` columns are read, and padded requests schedule none. Not caught: rows of another request with as many
tiles, placed elsewhere in a prompt as long (rows that are right for some request; telling them apart takes the
request's own tiles, which the builder is not given).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .geometry import recomputed_lr_slots

#: vLLM's null block: block tables hold it where a request has no block.
NULL_BLOCK = 0


class ShortLayoutMismatch(RuntimeError):
    """The step's position rows do not describe the tokens vLLM scheduled: the saving path stops rather than write K/V
    to wrong slots."""

    def __init__(self, what: str):
        super().__init__(
            f"InternVL-X LVTC saving path: {what}, so the layers below k would write K/V to the wrong slots; the step "
            "was stopped. Serve the checkpoint on the masked path, hf_overrides={\"lvtc_vllm_path\": \"masked\"} "
            "(vllm serve --hf-overrides '{\"lvtc_vllm_path\": \"masked\"}'), and report this vLLM version "
            "(docs/serving-vllm-lvtc.md, \"Where each path has run\").")


@dataclass
class ShortLayout:
    """One step's short layout. Tensors on the device of the rows, except `query_start_loc_cpu`."""

    gather: torch.Tensor  # (live,) index of each live token among the step's tokens
    query_start_loc: torch.Tensor  # (requests + 1,) int32, per request its live tokens' offsets
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor  # (requests,) short-layout tokens each request holds after the step
    seq_lens_cpu: torch.Tensor  # the same, int32 on the host (FlashInfer's builder reads it instead of the device)
    slot_mapping: torch.Tensor  # (live,) int64, each live token's slot in the short group's blocks (-1: not written)
    shift: torch.Tensor  # (num_tokens,) where layer k reads each token's tile's LR states (`UpsampleTable.forward`)
    max_query_len: int
    max_seq_len: int
    live_request: torch.Tensor  # (live,) each live token's request
    live_short: torch.Tensor  # (live,) each live token's short position
    unwritten: torch.Tensor  # (live,) the live tokens whose K/V the cache's blocks hold (recomputed, not written)

    def for_block_table(self, block_table: torch.Tensor, block_size: int) -> "ShortLayout":
        """The same layout for another short KV-cache group: only the slot mapping differs (vLLM may split the layers
        below k into several groups, each with its own blocks, as many per request as the first group's, which
        `short_layout` checked)."""
        return dataclasses.replace(self, slot_mapping=_slot_mapping(
            block_table, self.live_request, self.live_short, self.unwritten, block_size))


def _slot_mapping(block_table, request, short, unwritten, block_size) -> torch.Tensor:
    blocks = block_table[request, short // block_size].to(torch.int64)
    return torch.where(unwritten, -1, blocks * block_size + short % block_size)


def short_layout(rows: torch.Tensor, long_positions: torch.Tensor, query_start_loc: torch.Tensor,
                 block_table: torch.Tensor, *, num_tokens: int, short_per_tile: int, long_per_tile: int,
                 block_size: int) -> ShortLayout:
    """The step's short layout (see the module docstring).

    `rows`: ``(3, >= num_tokens)``, the step's columns first; `long_positions`: ``(>= num_tokens,)``; `query_start_loc`:
    ``(requests + 1,)`` with padded requests repeating the last offset; `block_table`: ``(>= requests, blocks)`` of the
    short group; `num_tokens`: the step's scheduled tokens, without padding (vLLM's host-side
    ``query_start_loc_cpu[num_reqs]``). Raises `ShortLayoutMismatch` when the rows do not belong to this step.

    Reads the device once, after everything is queued (the check's four counts and each request's live and held
    tokens): the layers below ``k`` take a live-token count of their own, which only the rows know, and attention
    backends take the longest query and sequence as host integers.
    """
    device = rows.device
    requests = query_start_loc.shape[0] - 1
    unused_per_tile = long_per_tile - short_per_tile
    short = rows[1, :num_tokens].to(torch.int64)
    code = rows[2, :num_tokens].to(torch.int64)
    p = long_positions[:num_tokens].to(device=device, dtype=torch.int64)
    qsl = query_start_loc.to(device=device, dtype=torch.int64)
    slot = torch.where(code < 0, -1 - code, -1)
    token = torch.arange(num_tokens, device=device)
    request = torch.bucketize(token, qsl[1:], right=True).clamp_(max=max(requests - 1, 0))
    scheduled = (qsl[1:] - qsl[:-1]) > 0

    # A warm-up step: a dummy run that builds attention metadata (vLLM's V1 runner does for FlashInfer's mixed-batch
    # kernel warm-up, `force_attention=True`, before any request): no request of the step holds a block and nothing
    # has written the rows (zeros). Every token runs below k at its index in its request and writes no K/V. A real
    # step always holds blocks for its tokens, and its rows are never all zeros.
    warm_up = (block_table[:requests] == NULL_BLOCK).all() & (rows[:, :num_tokens] == 0).all()

    # a request resumed inside a tile: its recomputed LR slots (`geometry.lr_slots_to_recompute`, same arithmetic)
    start = qsl[:-1].clamp(max=num_tokens)  # (a sentinel column for requests with no token)
    first_slot = torch.cat([slot, slot.new_full((1,), -1)])[start]
    short_end = torch.cat([short, short.new_zeros(1)])[start]
    resumed = scheduled & (first_slot >= short_per_tile)
    count = recomputed_lr_slots(first_slot, short_end, short_per_tile, long_per_tile, block_size)
    bad_resume = resumed & ((count > short_per_tile) | (first_slot > long_per_tile - count)
                            | (long_per_tile - short_per_tile < short_per_tile)
                            | (qsl[1:] - start < long_per_tile - first_slot))
    bad_resume |= scheduled & (first_slot > 0) & (first_slot < short_per_tile)
    in_resumed = resumed[request] & (token - start[request] < long_per_tile - first_slot[request])
    recomputed = in_resumed & (slot >= long_per_tile - count[request])
    short = torch.where(recomputed, short - (long_per_tile - slot), short)
    unwritten = recomputed & (short < short_end[request] - short_end[request] % block_size)
    live = (slot < short_per_tile) | recomputed
    bad_resume &= ~warm_up
    in_resumed &= ~warm_up
    short = torch.where(warm_up, token - start[request], short)
    live |= warm_up
    unwritten |= warm_up

    # the live tokens, in order, without a host read: each live token's rank is its place in the gather index
    rank = torch.cumsum(live.to(torch.int64), 0) - 1
    gather = torch.full((num_tokens + 1,), num_tokens, dtype=torch.int64, device=device)
    gather.scatter_(0, torch.where(live, rank, num_tokens), token)
    lens = torch.zeros(requests, dtype=torch.int64, device=device).index_add_(0, request, live.to(torch.int64))
    short_qsl = torch.zeros(requests + 1, dtype=torch.int64, device=device)
    short_qsl[1:] = torch.cumsum(lens, 0)
    seq_lens = torch.zeros(requests, dtype=torch.int64, device=device).scatter_reduce_(
        0, request, torch.where(live, short + 1, 0), "amax")

    # the per-step check (on the rows as written: a recomputed slot's row 1 is its tile's LR end)
    short_rows = rows[1, :num_tokens].to(torch.int64)
    own_tile = torch.where(slot >= short_per_tile, slot - short_per_tile, 0)
    earlier = p - short_rows - own_tile
    bad_rows = ((earlier < 0) | (earlier % unused_per_tile != 0)) & ~warm_up
    # consecutive: a live token's short position is its request's first plus its rank within the request
    first = seq_lens[request] - lens[request]
    bad_rows |= live & (short != first + rank - short_qsl[request])
    empty = scheduled & (lens == 0)
    index = torch.where(live, short // block_size, 0)
    beyond = live & (index >= block_table.shape[1]) & ~warm_up
    blocks = block_table[request, index.clamp(max=block_table.shape[1] - 1)].to(torch.int64)
    no_block = live & ~beyond & (blocks == NULL_BLOCK) & ~warm_up
    slots = torch.where(unwritten, -1, blocks * block_size + short % block_size)
    found = torch.cat([torch.stack([bad_rows.sum(), empty.sum(), (beyond | no_block).sum(), bad_resume.sum()]),
                       lens, seq_lens]).tolist()  # the one read of the device
    n_bad, n_empty, n_unheld, n_resume = found[:4]
    per_request, held = found[4: 4 + requests], found[4 + requests:]
    if n_bad:
        raise ShortLayoutMismatch(
            f"{n_bad} of the step's {num_tokens} tokens have position rows that do not belong to this step (their "
            "short position does not follow from their long one and their request's tiles: rows written by another "
            "step, or read before the runner wrote them)")
    if n_empty:
        raise ShortLayoutMismatch(
            f"{n_empty} scheduled request(s) of the step have no short-layout token in their rows (a step must hold "
            "whole images, and a decoded token is always one)")
    if n_resume:
        raise ShortLayoutMismatch(
            f"{n_resume} request(s) of the step start inside a tile where the step cannot resume it (inside its LR "
            "slots, without the rest of the tile, or without the HR-only slots that carry the LR inputs to recompute)")
    if n_unheld:
        raise ShortLayoutMismatch(
            f"{n_unheld} short-layout token(s) of the step have no block in the short group (the scheduler gave that "
            "group fewer tokens than the rows place)")
    short_qsl_cpu = torch.zeros(requests + 1, dtype=torch.int32)
    short_qsl_cpu[1:] = torch.cumsum(torch.tensor(per_request, dtype=torch.int32), 0)
    gather = gather[: int(short_qsl_cpu[-1])]
    return ShortLayout(
        gather=gather, query_start_loc=short_qsl.to(torch.int32), query_start_loc_cpu=short_qsl_cpu,
        seq_lens=seq_lens, seq_lens_cpu=torch.tensor(held, dtype=torch.int32), slot_mapping=slots[gather],
        shift=torch.where(in_resumed, long_per_tile - short_per_tile, 0),
        max_query_len=max(per_request, default=0), max_seq_len=max(held, default=0),
        live_request=request[gather], live_short=short[gather], unwritten=unwritten[gather])
