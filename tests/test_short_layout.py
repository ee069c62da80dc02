"""LVTC's saving path on vLLM: the short layout of a step and its per-step check (`vllm/short_layout.py`), fed the
inputs each vLLM model runner gives its attention metadata builders, simulated here from vLLM 0.32's source:

- the V1 runner, unpadded (vLLM's CPU platform, eager mode) and padded to a CUDA-graph capture size (token and request
  counts padded, stale M-RoPE columns past the step's tokens, padded requests repeating the last query offset);
- the V2 runner's order (it builds attention metadata before it writes the step's M-RoPE rows, so the buffer holds the
  previous step's rows when the builder runs);
- async scheduling's consecutive steps, where the buffer keeps a longer step's columns past a shorter one's;
- wrong inputs the check must stop: rows of another request, shifted rows, a request with no live token, tokens the
  short group holds no block for.

Plain torch: no vLLM needed, so these run in the main environment and, on a CUDA machine, on the GPU
(`benchmarks/gpu/check.sh`). The expected layout is written out token by token from the tiles' geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from internvlx_hf.vllm.lvtc.geometry import LVTCGeometry
from internvlx_hf.vllm.lvtc.positions import saving_positions
from internvlx_hf.vllm.lvtc.short_layout import ShortLayoutMismatch, short_layout

LAYOUT = LVTCGeometry(expand_layer=2, short_side=2, long_side=4, upsample_mode="nearest", hr_scale="scale_1",
                    injection_layers=())
SHORT, LONG = LAYOUT.short_per_tile, LAYOUT.long_per_tile  # 4, 16
BLOCK = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def feature(offset: int, tiles: int):
    return SimpleNamespace(mm_position=SimpleNamespace(offset=offset, length=tiles * LONG, is_embed=None))


@dataclass
class Request:
    """A request as the runner holds it: its prompt's rows (computed once), its delta, its computed tokens."""

    prompt: int
    images: list[tuple[int, int]]  # (offset, tiles)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.features = [feature(offset, tiles) for offset, tiles in self.images]
        self.rows, self.delta = saving_positions(LAYOUT, self.prompt, self.features)

    def hr_only(self, index: int) -> bool:
        return any(offset <= index < offset + tiles * LONG and (index - offset) % LONG >= SHORT
                   for offset, tiles in self.images)

    def short_position(self, index: int) -> int:
        return index - sum(self.hr_only(i) for i in range(min(index, self.prompt)))

    def step_rows(self, count: int) -> torch.Tensor:
        """What V1's `_calc_mrope_positions` writes: prompt columns, then decoded tokens at ``p + delta`` in every
        row."""
        columns = []
        for index in range(self.computed, self.computed + count):
            if index < self.prompt:
                columns.append(self.rows[:, index])
            else:
                columns.append(torch.full((3,), index + self.delta, dtype=torch.int64))
        return torch.stack(columns, 1)


class Runner:
    """Block allocation as the short group's manager does it (short-layout tokens only), and a step's inputs as a V1
    runner builds them."""

    def __init__(self, width: int = 16):
        self.next_block = 1  # block 0 is vLLM's null block
        self.width = width

    def allocate(self, request: Request, count: int) -> None:
        end = request.computed + count
        live = sum(not request.hr_only(i) for i in range(end)) if end <= request.prompt else \
            request.short_position(request.prompt) + end - request.prompt
        while len(request.blocks) * BLOCK < live:
            request.blocks.append(self.next_block)
            self.next_block += 1

    def step(self, batch: list[tuple[Request, int]], *, pad_tokens: int = 0, pad_requests: int = 0,
             stale: torch.Tensor | None = None, dtype=torch.int64):
        """`(rows buffer, long positions, query_start_loc, block table, num_tokens)` of one step; `stale`: the buffer's
        previous content, left past the step's columns."""
        for request, count in batch:
            self.allocate(request, count)
        columns = torch.cat([request.step_rows(count) for request, count in batch], 1)
        tokens = columns.shape[1]
        size = tokens + pad_tokens
        rows = torch.zeros(3, max(size, stale.shape[1] if stale is not None else 0), dtype=torch.int64)
        if stale is not None:
            rows[:, : stale.shape[1]] = stale
        rows[:, :tokens] = columns
        positions = torch.cat([torch.arange(r.computed, r.computed + c) for r, c in batch] +
                              [torch.zeros(pad_tokens, dtype=torch.int64)])
        qsl = [0]
        for _, count in batch:
            qsl.append(qsl[-1] + count)
        qsl += [qsl[-1]] * pad_requests
        table = torch.zeros(len(batch) + pad_requests, self.width, dtype=torch.int32)
        for row, (request, _) in enumerate(batch):
            table[row, : len(request.blocks)] = torch.tensor(request.blocks, dtype=torch.int32)
        for row in range(len(batch), len(batch) + pad_requests):
            table[row] = 99  # stale rows of earlier requests
        return rows.to(dtype), positions, torch.tensor(qsl, dtype=torch.int32), table, tokens

    @staticmethod
    def finish(batch):
        for request, count in batch:
            request.computed += count


def expected(batch):
    """The short layout written out token by token."""
    gather, qsl, seq_lens, slots, offset = [], [0], [], [], 0
    for request, count in batch:
        last = None
        for index in range(request.computed, request.computed + count):
            if index >= request.prompt or not request.hr_only(index):
                s = request.short_position(index) if index < request.prompt else \
                    request.short_position(request.prompt) + index - request.prompt
                gather.append(offset + index - request.computed)
                slots.append(request.blocks[s // BLOCK] * BLOCK + s % BLOCK)
                last = s
        qsl.append(len(gather))
        seq_lens.append(last + 1)
        offset += count
    return gather, qsl, seq_lens, slots


def layout_of(step, device):
    rows, positions, qsl, table, tokens = step
    return short_layout(rows.to(device), positions.to(device), qsl.to(device), table.to(device), num_tokens=tokens,
                        short_per_tile=SHORT, long_per_tile=LONG, block_size=BLOCK)


def assert_layout(layout, batch, device, requests=None):
    gather, qsl, seq_lens, slots = expected(batch)
    pad = (requests or len(batch)) - len(batch)
    assert layout.gather.device.type == device and layout.slot_mapping.device.type == device
    assert layout.seq_lens.device.type == device and layout.query_start_loc.device.type == device
    assert layout.query_start_loc_cpu.device.type == "cpu"
    assert layout.gather.tolist() == gather
    assert layout.query_start_loc.tolist() == qsl + [qsl[-1]] * pad
    assert layout.query_start_loc_cpu.tolist() == qsl + [qsl[-1]] * pad
    assert layout.seq_lens.tolist() == seq_lens + [0] * pad
    assert layout.slot_mapping.tolist() == slots
    assert layout.max_query_len == max(b - a for a, b in zip(qsl, qsl[1:]))
    assert layout.max_seq_len == max(seq_lens)


def prefill_and_decode():
    """A request prefilling two images (3 and 1 tiles) between text, and one decoding after a 2-tile prompt."""
    runner = Runner()
    first = Request(prompt=5 + 3 * LONG + 2 + LONG + 3, images=[(5, 3), (5 + 3 * LONG + 2, 1)])
    second = Request(prompt=2 + 2 * LONG + 4, images=[(2, 2)])
    runner.allocate(second, second.prompt + 1)
    second.computed = second.prompt + 1  # prefilled, one token decoded
    return runner, first, second


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["v1-int64", "v2-int32"])
def test_v1_step_unpadded(device, dtype):
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    layout = layout_of(runner.step(batch, dtype=dtype), device)
    assert_layout(layout, batch, device)
    assert layout.gather.numel() == 5 + 3 * SHORT + 2 + SHORT + 3 + 1  # the HR-only slots are not run below k


@pytest.mark.parametrize("device", DEVICES)
def test_v1_step_padded_to_a_capture_size_with_stale_columns(device):
    """CUDA graphs pad the token and request counts; the columns past the step's tokens hold an earlier step's rows
    (here: live-looking text rows, which would get gather entries and slots if they were read)."""
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    stale = torch.arange(3 * 512, dtype=torch.int64).reshape(3, 512) % 50
    step = runner.step(batch, pad_tokens=512 - 5 - 4 * LONG - 5 - 1, pad_requests=6, stale=stale)
    assert step[0].shape[1] == 512 and step[2].shape[0] == len(batch) + 6 + 1
    assert_layout(layout_of(step, device), batch, device, requests=len(batch) + 6)


@pytest.mark.parametrize("device", DEVICES)
def test_async_steps_reusing_the_buffer(device):
    """Consecutive steps as async scheduling runs them: a long prefill step, then decode steps with a changed batch;
    the buffer keeps the longer step's columns past each shorter step's."""
    runner, first, second = prefill_and_decode()
    batches = [[(first, first.prompt), (second, 1)], [(first, 1), (second, 1)], [(second, 1)],
               [(first, 1), (second, 1)]]
    buffer = None
    for batch in batches:
        step = runner.step(batch, stale=buffer)
        assert_layout(layout_of(step, device), batch, device)
        buffer = step[0]
        runner.finish(batch)


@pytest.mark.parametrize("device", DEVICES)
def test_v2_order_rows_of_the_previous_step_are_refused(device):
    """vLLM's second model runner builds the metadata before it writes the step's rows: the builder would read the
    previous step's. Decoding: each token's short position is one behind its long one's."""
    runner, first, second = prefill_and_decode()
    prefill = [(first, first.prompt), (second, 1)]
    previous = runner.step(prefill)[0]
    runner.finish(prefill)
    decode = [(first, 1), (second, 1)]
    for _ in range(2):
        rows, positions, qsl, table, tokens = runner.step(decode)
        with pytest.raises(ShortLayoutMismatch, match="do not belong to this step.*lvtc_vllm_path.*masked"):
            layout_of((previous, positions, qsl, table, tokens), device)
        assert_layout(layout_of((rows, positions, qsl, table, tokens), device), decode, device)
        previous = rows
        runner.finish(decode)


@pytest.mark.parametrize("device", DEVICES)
def test_each_wrong_input_is_refused(device):
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    rows, positions, qsl, table, tokens = runner.step(batch)

    def refused(match, rows=rows, positions=positions, qsl=qsl, table=table):
        with pytest.raises(ShortLayoutMismatch, match=match):
            layout_of((rows, positions, qsl, table, tokens), device)

    refused("do not belong", rows=torch.roll(rows, 1, 1))  # rows shifted by a column
    other = Request(prompt=first.prompt, images=[(5, 3)])  # rows of another request, with fewer tiles
    swapped = rows.clone()
    swapped[:, : first.prompt] = other.rows
    refused("no block in the short group", rows=swapped)
    hidden = rows.clone()
    hidden[:, -1] = -1 - SHORT  # the decoded token read as an HR-only slot
    refused("do not belong|no short-layout token", rows=hidden)
    short_table = table.clone()
    short_table[0, len(first.blocks) - 1] = 0  # the scheduler gave the short group one block fewer
    refused("no block in the short group", table=short_table)
    refused("no block in the short group", table=table[:, :2])  # a table narrower than the rows' positions
    assert_layout(layout_of((rows, positions, qsl, table, tokens), device), batch, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_without_a_live_token_is_refused(device):
    """A step that ends inside a tile's HR-only slots gives its request no token below k: refused (whole images per
    step)."""
    runner = Runner()
    request = Request(prompt=2 + LONG, images=[(2, 1)])
    first_part = [(request, 2 + SHORT)]
    runner.step(first_part)
    runner.finish(first_part)
    rows, positions, qsl, table, tokens = runner.step([(request, LONG - SHORT)])
    with pytest.raises(ShortLayoutMismatch, match="no short-layout token"):
        layout_of((rows, positions, qsl, table, tokens), device)
