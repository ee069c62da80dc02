"""The short layout of one vLLM step, for LVTC's saving path (`saving/`): which of the step's tokens the layers
below ``k`` run on, at which short positions, into which KV slots; and the per-step check that the rows read belong
to this step.

Plain torch, no vLLM: the inputs are the tensors vLLM's model runners hand an attention metadata builder, so the
function runs (and is tested, `tests/test_short_layout.py`) with the inputs each runner gives, on CPU and on CUDA.
It is built on the host, from host data only (each request's tiles, the rows computed from them, and,
on V1, the rows the runner wrote on the host, checked against those; the step's query offsets and sequence lengths):
nothing is read back from a GPU per step. The device receives the layout in one copy and gathers the slot mapping
from its own block table. Where CUDA graphs replay the layers, `graph_step_inputs` pads the layers' inputs to the
step's padded token count.

The rows (``positions.saving_positions``): row 1 holds each token's short position ``s``; row 2 ``-1 - j`` for slot
``j`` of a tile and ``s`` for every other token; a decoded token's rows are all ``s``. Each token's long position
``p`` (its index in its request) follows from the runner's query offsets and sequence lengths. What holds for every
token of a right step, and is checked:

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

A warm-up step (a dummy run that builds attention metadata before any request reached the runner, its rows all
zeros: the caller says which, ``warm_up``) runs every token below ``k`` at its index in its request and writes no K/V.

Given each request's tiles as well (V1: the builder finds them from the runner's requests), the rows are computed
from them and the rows the runner wrote must be those, token for token: rows of the previous step, of another
request (even one with as many tiles, placed elsewhere in a prompt as long, whose rows the checks above pass), or of
another batch order are refused. Given the rows alone, rows left from the previous step (V2's M-RoPE buffer when
the metadata is built: V2 writes the step's rows after) give a decoded token ``p - s`` one more than a multiple:
caught. Padded counts (CUDA graphs, data parallelism) and the stale columns past the step's tokens are ignored by
construction: only the first ``num_tokens`` columns are read, and padded requests schedule none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .geometry import recomputed_lr_slots
from .tiles import RequestTiles

#: vLLM's null block: block tables hold it where a request has no block.
NULL_BLOCK = 0


class ShortLayoutMismatch(RuntimeError):
    """The step's position rows do not describe the tokens vLLM scheduled: the saving path stops rather than write K/V
    to wrong slots. Raised in a step (V1's builder) or where V2's runner adds a request, where vLLM ends its engine
    process on any error: every request then fails, so the message says the engine stops. No tested input reaches it;
    it is the guard that K/V are never written to slots that are not theirs."""

    def __init__(self, what: str):
        super().__init__(
            f"InternVL-X LVTC saving path: {what}, so the layers below k would write K/V to the wrong slots; the engine "
            "stops here rather than write them (vLLM ends its engine process on an error in a step or where its runner "
            "adds a request, and every request in flight fails with it). Serve the checkpoint on the masked path, "
            "hf_overrides={\"lvtc_vllm_path\": \"masked\"} "
            "(vllm serve --hf-overrides '{\"lvtc_vllm_path\": \"masked\"}'), and report this vLLM version "
            "(docs/serving-vllm-lvtc.md, \"Where each path has run\").")


@dataclass
class ShortLayout:
    """One step's short layout: tensors on the device of the short group's block table, and the host copies the
    attention backends read (`query_start_loc_cpu`, `seq_lens_cpu`)."""

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
        `short_layout` checked); `block_size` is the one the table's entries are in (the kernel block size where
        the backend splits blocks)."""
        blocks = _blocks(block_table, self.live_request, self.live_short, block_size)
        return dataclasses.replace(self, slot_mapping=_slot_mapping(blocks, self.live_short, self.unwritten,
                                                                    block_size))


def _blocks(block_table, request, short, block_size) -> torch.Tensor:
    """Each live token's block in a short group's table (gathered on the table's device)."""
    return block_table[request, (short // block_size).clamp(max=block_table.shape[1] - 1)]


def _slot_mapping(blocks, short, unwritten, block_size) -> torch.Tensor:
    return torch.where(unwritten, -1, blocks.to(torch.int64) * block_size + short % block_size)


def short_layout(rows: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                 *, num_tokens: int, short_per_tile: int, long_per_tile: int, block_size: int,
                 kernel_block_size: int | None = None, warm_up: bool = False,
                 tiles: Sequence[RequestTiles | None] | None = None) -> ShortLayout:
    """The step's short layout (see the module docstring), built on the host: the device is only written to.

    Host tensors, as vLLM's runners hold them before they build attention metadata: `rows` ``(3, >= num_tokens)``, the
    step's M-RoPE columns first (V1 writes them to its buffer's host side in ``_prepare_inputs``);
    `query_start_loc` ``(requests + 1,)`` (``query_start_loc_cpu``, padded requests repeating the last offset);
    `seq_lens` ``(requests,)``, each request's long-layout tokens after the step (``seq_lens_cpu_upper_bound``: exact
    without speculative decoding, which the saving path refuses). `block_table` ``(>= requests, blocks)``: the short
    group's, on the device the layout is for (read there only: the slot mapping is gathered from it, and whether each
    live token has a block is asserted there without waiting for it, `torch._assert_async`). `num_tokens`: the step's
    scheduled tokens without padding; `warm_up`: no request has reached the runner yet (a dummy run, see the module
    docstring). Raises `ShortLayoutMismatch` when the rows do not belong to this step.

    `tiles` (each request's, in the batch's order, `tiles.RequestTiles`: the arithmetic of the scheduler's KV manager):
    the rows are computed from them (`_rows_from_tiles`); `rows`, if given too, must be those (V1, whose rows
    are its runner's, checked), or None (V2, which builds attention metadata before it writes the step's rows: through
    the model's runner state, `saving/model_state.py`).

    `block_size` is the short group's as vLLM's KV manager allocates and caches it (which slots of a resumed tile the
    cache holds follows from it); `kernel_block_size`, where the backend takes smaller blocks (vLLM's
    ``AttentionGroup.kernel_block_size``: the block table then lists ``block_size / kernel_block_size`` kernel blocks
    per manager block, vLLM's null block as kernel blocks ``0`` to that count less one), the size the block table's
    entries and the slot mapping are in.
    """
    kernel_block_size = kernel_block_size or block_size
    if block_size % kernel_block_size:
        raise ValueError(f"kernel_block_size {kernel_block_size} does not divide the short group's block size "
                         f"{block_size}")
    requests = query_start_loc.shape[0] - 1
    qsl = query_start_loc.to("cpu", torch.int64)
    seq_lens = seq_lens.to("cpu", torch.int64)[:requests]
    request, query_lens, start, index, p = _step_tokens(qsl, seq_lens, num_tokens)
    written, code, warm_up = _step_rows(rows, tiles, qsl, seq_lens, p, request, num_tokens, short_per_tile,
                                        long_per_tile, warm_up)
    step = _live_tokens(written, code, qsl, request, query_lens, start, index, short_per_tile, long_per_tile,
                        block_size, warm_up)
    _check_rows(step, written, p, request, num_tokens, short_per_tile, long_per_tile, checked=tiles is None,
                warm_up=warm_up)
    return _on_device(step, block_table, requests, num_tokens, block_size, kernel_block_size, warm_up)


def _step_rows(rows, tiles, qsl, seq_lens, p, request, num_tokens: int, short_per_tile: int, long_per_tile: int,
               warm_up: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Rows 1 and 2 of the step on the host (`written`, `code`): the runner's (V1) or its requests' tiles' (checked
    against the runner's where both are given), and whether the step is a warm-up (no request's tokens)."""
    if tiles is None:
        rows = rows[:, :num_tokens].to("cpu", torch.int64)
        return rows[1], rows[2], bool(warm_up) and not bool(rows.any())
    if len(tiles) > qsl.shape[0] - 1:
        raise ShortLayoutMismatch(f"the runner's batch holds {len(tiles)} requests and the step {qsl.shape[0] - 1}")
    written, code = _rows_from_tiles(tiles, qsl, seq_lens, p, request, short_per_tile, long_per_tile)
    if rows is not None:  # the rows the runner wrote: the ones its requests' tiles give
        rows = rows[1:, :num_tokens].to("cpu", torch.int64)
        if not (torch.equal(rows[0], written) and torch.equal(rows[1], code)):
            bad = int(((rows[0] != written) | (rows[1] != code)).sum())
            raise ShortLayoutMismatch(
                f"{bad} of the step's {num_tokens} tokens have position rows other than their requests' tiles give "
                "(rows written by another step or for another request, or read before the runner wrote them)")
    return written, code, False


def _live_tokens(written, code, qsl, request, query_lens, start, index, short_per_tile: int, long_per_tile: int,
                 block_size: int, warm_up: bool) -> SimpleNamespace:
    """The step's live tokens (those the layers below k run on) and their short positions, on the host: a request
    resumed inside a tile recomputes the LR slots layer k reads there (`geometry.lr_slots_to_recompute`, the same
    arithmetic), whose K/V the cache may hold already (`unwritten`); a warm-up puts every token at its index."""
    requests = qsl.shape[0] - 1

    def each(per_request: torch.Tensor) -> torch.Tensor:  # (each token's request's value)
        return per_request.index_select(0, request)

    scheduled = query_lens > 0
    short = written.clone()
    slot = torch.where(code < 0, -1 - code, -1)
    first_slot = torch.cat([slot, slot.new_full((1,), -1)]).index_select(0, start)
    short_end = torch.cat([short, short.new_zeros(1)]).index_select(0, start)
    resumed = scheduled & (first_slot >= short_per_tile)
    count = recomputed_lr_slots(first_slot, short_end, short_per_tile, long_per_tile, block_size)
    bad_resume = resumed & ((count > short_per_tile) | (first_slot > long_per_tile - count)
                            | (long_per_tile - short_per_tile < short_per_tile)
                            | (qsl[1:] - start < long_per_tile - first_slot))
    bad_resume |= scheduled & (first_slot > 0) & (first_slot < short_per_tile)
    in_resumed = each(resumed) & (index < long_per_tile - each(first_slot))
    recomputed = in_resumed & (slot >= long_per_tile - each(count))
    short = torch.where(recomputed, short - (long_per_tile - slot), short)
    unwritten = recomputed & (short < each(short_end - short_end % block_size))
    live = (slot < short_per_tile) | recomputed
    if warm_up:  # every token below k at its index in its request, no K/V written
        bad_resume[:] = False
        in_resumed[:] = False
        short = index
        live[:] = True
        unwritten[:] = True
    lens = torch.zeros(requests, dtype=torch.int64).index_add_(0, request, live.to(torch.int64))
    short_qsl = torch.zeros(requests + 1, dtype=torch.int64)
    short_qsl[1:] = torch.cumsum(lens, 0)
    held = torch.zeros(requests, dtype=torch.int64).scatter_reduce_(
        0, request, torch.where(live, short + 1, 0), "amax")
    return SimpleNamespace(request=request, slot=slot, short=short, live=live, unwritten=unwritten,
                           in_resumed=in_resumed, bad_resume=bad_resume, scheduled=scheduled, lens=lens,
                           short_qsl=short_qsl, held=held, gather=live.nonzero().squeeze(1),
                           unused=long_per_tile - short_per_tile)


def _check_rows(step, written, p, request, num_tokens: int, short_per_tile: int, long_per_tile: int, *,
                checked: bool, warm_up: bool) -> None:
    """`ShortLayoutMismatch` where the rows do not belong to this step (`checked`: rows as a runner wrote them, a
    recomputed slot's row 1 its tile's LR end; rows computed from the tiles hold this by construction), a scheduled
    request has no live token, or a request starts inside a tile where the step cannot resume it."""
    if checked:
        own_tile = torch.where(step.slot >= short_per_tile, step.slot - short_per_tile, 0)
        earlier = p - written - own_tile
        bad_rows = ((earlier < 0) | (earlier % (long_per_tile - short_per_tile) != 0)) & (not warm_up)
    else:
        bad_rows = torch.zeros(num_tokens, dtype=torch.bool)
    # consecutive: a live token's short position is its request's first plus its rank within the request
    rank = torch.cumsum(step.live.to(torch.int64), 0) - 1
    first = (step.held - step.lens - step.short_qsl[:-1]).index_select(0, request)
    bad_rows |= step.live & (step.short != first + rank)
    if bad := int(bad_rows.sum()):
        raise ShortLayoutMismatch(
            f"{bad} of the step's {num_tokens} tokens have position rows that do not belong to this "
            "step (their short position does not follow from their long one and their request's tiles: rows written "
            "by another step, or read before the runner wrote them)")
    if bad := int((step.scheduled & (step.lens == 0)).sum()):
        raise ShortLayoutMismatch(
            f"{bad} scheduled request(s) of the step have no short-layout token in "
            "their rows (a step must hold whole images, and a decoded token is always one)")
    if bad := int(step.bad_resume.sum()):
        raise ShortLayoutMismatch(
            f"{bad} request(s) of the step start inside a tile where the step cannot resume it "
            "(inside its LR slots, without the rest of the tile, or without the HR-only slots that carry the LR "
            "inputs to recompute)")


def _on_device(step, block_table, requests: int, num_tokens: int, block_size: int, kernel_block_size: int,
               warm_up: bool) -> ShortLayout:
    """The layout on the block table's device, in one copy (from pinned memory on a GPU, so that it does not wait for
    the device's queue), with the slot mapping gathered from the block table and each live token's block checked to
    be one the scheduler gave the short group (on a GPU without waiting for it: `torch._assert_async`)."""
    device = block_table.device
    null_blocks = block_size // kernel_block_size  # (vLLM's null block, in the table's blocks)
    gather, short_qsl, held, lens = step.gather, step.short_qsl, step.held, step.lens
    live_request, live_short, live_unwritten = (x.index_select(0, gather)
                                                for x in (step.request, step.short, step.unwritten))
    beyond = (live_short // kernel_block_size >= block_table.shape[1]) & (not warm_up)
    if bad := int(beyond.sum()):
        raise ShortLayoutMismatch(_unheld(bad))
    host = torch.cat([gather, short_qsl, held, torch.where(step.in_resumed, step.unused, 0),
                      live_request, live_short, live_unwritten.to(torch.int64)])
    if device.type == "cuda":
        host = torch.empty(host.shape, dtype=torch.int64, pin_memory=True).copy_(host)
    moved = host.to(device, non_blocking=True)
    live_count = gather.shape[0]
    d_gather, d_qsl, d_held, d_shift, d_request, d_short, d_unwritten = moved.split(
        [live_count, requests + 1, requests, num_tokens, live_count, live_count, live_count])
    d_unwritten = d_unwritten.bool()
    blocks = _blocks(block_table, d_request, d_short, kernel_block_size)
    if not warm_up:
        if device.type == "cpu":
            if bad := int((blocks < NULL_BLOCK + null_blocks).sum()):
                raise ShortLayoutMismatch(_unheld(bad))
        else:
            torch._assert_async((blocks >= NULL_BLOCK + null_blocks).all(), UNHELD_ON_DEVICE)
    return ShortLayout(
        gather=d_gather, query_start_loc=d_qsl.to(torch.int32), query_start_loc_cpu=short_qsl.to(torch.int32),
        seq_lens=d_held, seq_lens_cpu=held.to(torch.int32),
        slot_mapping=_slot_mapping(blocks, d_short, d_unwritten, kernel_block_size),
        shift=d_shift, max_query_len=int(lens.max()) if requests else 0,
        max_seq_len=int(held.max()) if requests else 0,
        live_request=d_request, live_short=d_short, unwritten=d_unwritten)


def _step_tokens(qsl: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int):
    """`(request, query_lens, start, index, p)` of a step's tokens, from its host offsets and lengths (int64):
    each token's request, its index among its request's tokens of the step, and its long position ``p``, its
    request's tokens computed before the step plus that index. (Per-request values are spread to the tokens with
    `index_select`, several times faster on the host than indexing with a tensor.)"""
    requests = qsl.shape[0] - 1
    token = torch.arange(num_tokens)
    request = torch.bucketize(token, qsl[1:], right=True).clamp_(max=max(requests - 1, 0))
    query_lens = qsl[1:] - qsl[:-1]
    start = qsl[:-1].clamp(max=num_tokens)  # (a sentinel column for requests with no token)
    index = token - start.index_select(0, request)
    p = (seq_lens - query_lens).index_select(0, request) + index
    return request, query_lens, start, index, p


def _rows_from_tiles(tiles, qsl, seq_lens, p, request, short_per_tile: int, long_per_tile: int):
    """Rows 1 and 2 of the step from each request's tiles (`tiles` may be shorter than the requests: padded requests
    hold no tokens). For long index ``p`` of a request, row 1 holds ``RequestTiles.short(p)``, the short-layout tokens
    before it (a live token's short position, an HR-only slot's tile LR end), and row 2 ``-1 - j`` for slot ``j`` of a
    tile, the same count for any other token: the rows `positions.saving_positions` gives a prompt (without LongRoPE's
    flags, which the layout does not read) and its decoded tokens, V1's runner in rows 0 and 1. A request whose step's
    tokens meet no tile (a decode, a chunk of text) is one offset, the HR-only slots before them; for a request whose
    step holds tiles, the HR-only slots are marked tile by tile and counted."""
    unused = long_per_tile - short_per_tile
    bounds, lens = qsl.tolist(), seq_lens.tolist()
    offsets, spanned = [0] * (len(bounds) - 1), []
    for index, request_tiles in enumerate(tiles):
        first, last = bounds[index], bounds[index + 1]
        if request_tiles is None or not request_tiles.starts or first == last:
            continue
        computed = lens[index] - (last - first)
        meeting = request_tiles.meeting(computed, computed + last - first)
        if meeting:
            spanned.append((first, last, computed, request_tiles, meeting))
        else:  # every tile wholly before the step's tokens (those before `meeting.start`) or after them
            offsets[index] = meeting.start * unused
    short = p - torch.tensor(offsets, dtype=torch.int64).index_select(0, request) if any(offsets) else p.clone()
    code = short.clone()
    if spanned:
        slot_codes = -1 - torch.arange(long_per_tile)  # (row 2 of a tile's slots)
    for first, last, computed, request_tiles, meeting in spanned:
        end = computed + last - first
        hr_only = torch.zeros(last - first, dtype=torch.int64)
        in_tiles = []
        for tile in meeting:
            start = request_tiles.starts[tile]
            low, high = max(start, computed), min(start + long_per_tile, end)
            hr_only[max(start + short_per_tile, low) - computed: max(high - computed, 0)] = 1
            in_tiles.append((low - computed, high - computed, low - start, high - start))
        hidden = (computed - request_tiles.short(computed)) + torch.cumsum(hr_only, 0) - hr_only
        short[first:last] = p[first:last] - hidden
        code[first:last] = short[first:last]
        for low, high, first_slot, end_slot in in_tiles:
            code[first + low: first + high] = slot_codes[first_slot:end_slot]
    return short, code


def check_prompt_rows(rows: Sequence[Sequence[int]], tiles: RequestTiles, short_per_tile: int, long_per_tile: int
                      ) -> None:
    """Rows 1 and 2 of a whole prompt as a runner holds them for a request (V2's `RopeState` at `add_request`, from
    `positions.saving_positions`) against those its tiles give (`_rows_from_tiles`, the short layout's arithmetic);
    raises `ShortLayoutMismatch` where they differ. V2 builds each step's layout from the tiles alone (it writes a
    step's rows after the metadata), so its rows are checked here, once per request, rather than per step as V1's."""
    length = len(rows[0])
    step = torch.tensor([0, length])
    request = torch.zeros(length, dtype=torch.int64)
    written, code = _rows_from_tiles([tiles], step, step[1:], torch.arange(length), request, short_per_tile,
                                     long_per_tile)
    held = torch.tensor([list(rows[0]), list(rows[1])], dtype=torch.int64)
    if not (torch.equal(held[0], written) and torch.equal(held[1], code)):
        bad = int(((held[0] != written) | (held[1] != code)).sum())
        raise ShortLayoutMismatch(f"{bad} of a new request's {length} prompt tokens have position rows other than "
                                  "its tiles give (the rows vLLM's runner holds for it, against the scheduler's "
                                  "arithmetic)")


#: the device assertion's message (at most 254 characters, PyTorch's limit)
UNHELD_ON_DEVICE = ("InternVL-X LVTC saving path: a short-layout token of the step has no block in the short KV group; "
                    "the engine stops (docs/serving-vllm-lvtc.md, lvtc_vllm_path masked)")


def _unheld(count) -> str:
    return (f"{count} short-layout token(s) of the step have no block in the short group (the scheduler gave that "
            "group fewer tokens than the rows place)")


def graph_step_inputs(buffers: torch.Tensor, gather: torch.Tensor, long_positions: torch.Tensor, shift: torch.Tensor,
                      num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layers' per-step inputs for a forward pass that CUDA graphs replay (piecewise: the layers are captured per
    padded token count, attention runs between the pieces): `(gather, long_positions, shift)`, each `num_tokens` long
    (the step's padded count, the graph's), written into `buffers` ``(3, >= num_tokens)`` (persistent: a replayed
    graph reads the addresses it was captured with, so the inputs of one count always lie at the same place).

    `gather` (the layout's live tokens) is padded with ``num_tokens``, the index of a scratch row past the step's
    tokens (`LVTCLayers.run_layers` with ``scratch``): the layers below k run on ``num_tokens`` rows, the live ones
    and padding that attention skips (past the short query ends, ``num_actual_tokens``), that writes no K/V (the slot
    mapping holds the live tokens only) and that scatters back to the scratch row only. `long_positions` and `shift`
    are the layout's, zeros past their ends (the runner's padded columns hold stale rows, whose row 0 may carry
    LongRoPE's flags: no RoPE index). Device copies only: no host read; the sizes are host values (tensor shapes)."""
    gather_out, long_out, shift_out = buffers[0, :num_tokens], buffers[1, :num_tokens], buffers[2, :num_tokens]
    live = gather.shape[0]
    gather_out[:live].copy_(gather)
    gather_out[live:].fill_(num_tokens)
    long_out.zero_()
    long_out[: long_positions.shape[0]].copy_(long_positions)
    shift_out.zero_()
    shift_out[: shift.shape[0]].copy_(shift)
    return gather_out, long_out, shift_out
