"""The short layout of one vLLM step, for LVTC's saving path (`short_kv.py`): which of the step's tokens the layers
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
  schedules has at least one (a step holds whole images, and decoded tokens are live);
- no live token maps past the short group's block table or to vLLM's null block (where a request's row ends when the
  scheduler gave the group fewer tokens than the rows place).

Rows left from the previous step (a runner that builds the metadata before it writes the step's rows, as vLLM's second
model runner does) give a decoded token ``p - s`` one more than a multiple: caught. Padded counts (CUDA graphs, data
parallelism) and the stale columns past the step's tokens are ignored by construction: only the first
``num_tokens`` columns are read, and padded requests schedule none. Not caught: rows of another request with as many
tiles, placed elsewhere in a prompt as long (rows that are right for some request; telling them apart takes the
request's own tiles, which the builder is not given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    slot_mapping: torch.Tensor  # (live,) int64, each live token's slot in the short group's blocks
    max_query_len: int
    max_seq_len: int


def short_layout(rows: torch.Tensor, long_positions: torch.Tensor, query_start_loc: torch.Tensor,
                 block_table: torch.Tensor, *, num_tokens: int, short_per_tile: int, long_per_tile: int,
                 block_size: int) -> ShortLayout:
    """The step's short layout (see the module docstring).

    `rows`: ``(3, >= num_tokens)``, the step's columns first; `long_positions`: ``(>= num_tokens,)``; `query_start_loc`:
    ``(requests + 1,)`` with padded requests repeating the last offset; `block_table`: ``(>= requests, blocks)`` of the
    short group; `num_tokens`: the step's scheduled tokens, without padding (vLLM's host-side
    ``query_start_loc_cpu[num_reqs]``). Raises `ShortLayoutMismatch` when the rows do not belong to this step.

    Reads the device once, after everything is queued (the check's three counts and each request's live and held
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
    live = slot < short_per_tile
    token = torch.arange(num_tokens, device=device)
    request = torch.bucketize(token, qsl[1:], right=True).clamp_(max=max(requests - 1, 0))

    # the live tokens, in order, without a host read: each live token's rank is its place in the gather index
    rank = torch.cumsum(live.to(torch.int64), 0) - 1
    gather = torch.full((num_tokens + 1,), num_tokens, dtype=torch.int64, device=device)
    gather.scatter_(0, torch.where(live, rank, num_tokens), token)
    lens = torch.zeros(requests, dtype=torch.int64, device=device).index_add_(0, request, live.to(torch.int64))
    short_qsl = torch.zeros(requests + 1, dtype=torch.int64, device=device)
    short_qsl[1:] = torch.cumsum(lens, 0)
    seq_lens = torch.zeros(requests, dtype=torch.int64, device=device).scatter_reduce_(
        0, request, torch.where(live, short + 1, 0), "amax")

    # the per-step check
    own_tile = torch.where(slot >= short_per_tile, slot - short_per_tile, 0)
    earlier = p - short - own_tile
    bad_rows = (earlier < 0) | (earlier % unused_per_tile != 0)
    # consecutive: a live token's short position is its request's first plus its rank within the request
    first = seq_lens[request] - lens[request]
    bad_rows |= live & (short != first + rank - short_qsl[request])
    scheduled = (qsl[1:] - qsl[:-1]) > 0
    empty = scheduled & (lens == 0)
    index = torch.where(live, short // block_size, 0)
    beyond = live & (index >= block_table.shape[1])
    blocks = block_table[request, index.clamp(max=block_table.shape[1] - 1)].to(torch.int64)
    no_block = live & ~beyond & (blocks == NULL_BLOCK)
    found = torch.cat([torch.stack([bad_rows.sum(), empty.sum(), (beyond | no_block).sum()]), lens,
                       seq_lens]).tolist()  # the one read of the device
    n_bad, n_empty, n_unheld = found[:3]
    per_request, held = found[3: 3 + requests], found[3 + requests:]
    if n_bad:
        raise ShortLayoutMismatch(
            f"{n_bad} of the step's {num_tokens} tokens have position rows that do not belong to this step (their "
            "short position does not follow from their long one and their request's tiles: rows written by another "
            "step, or read before the runner wrote them)")
    if n_empty:
        raise ShortLayoutMismatch(
            f"{n_empty} scheduled request(s) of the step have no short-layout token in their rows (a step must hold "
            "whole images, and a decoded token is always one)")
    if n_unheld:
        raise ShortLayoutMismatch(
            f"{n_unheld} short-layout token(s) of the step have no block in the short group (the scheduler gave that "
            "group fewer tokens than the rows place)")
    short_qsl_cpu = torch.zeros(requests + 1, dtype=torch.int32)
    short_qsl_cpu[1:] = torch.cumsum(torch.tensor(per_request, dtype=torch.int32), 0)
    gather = gather[: int(short_qsl_cpu[-1])]
    return ShortLayout(
        gather=gather, query_start_loc=short_qsl.to(torch.int32), query_start_loc_cpu=short_qsl_cpu,
        seq_lens=seq_lens, slot_mapping=blocks[gather] * block_size + short[gather] % block_size,
        max_query_len=max(per_request, default=0), max_seq_len=max(held, default=0))
