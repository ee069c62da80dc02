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
from internvlx_hf.vllm.lvtc.short_layout import (ShortLayoutMismatch, _rows_from_tiles, _step_tokens, graph_step_inputs,
                                                 short_layout)
from internvlx_hf.vllm.lvtc.tiles import RequestTiles, whole_tiles_end

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
        """`(rows buffer, seq_lens, query_start_loc, block table, num_tokens)` of one step, on the host as the runner
        holds them (seq_lens: each request's tokens after the step, zero for padded requests); `stale`: the buffer's
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
        seq_lens = torch.tensor([r.computed + c for r, c in batch] + [0] * pad_requests, dtype=torch.int32)
        qsl = [0]
        for _, count in batch:
            qsl.append(qsl[-1] + count)
        qsl += [qsl[-1]] * pad_requests
        table = torch.zeros(len(batch) + pad_requests, self.width, dtype=torch.int32)
        for row, (request, _) in enumerate(batch):
            table[row, : len(request.blocks)] = torch.tensor(request.blocks, dtype=torch.int32)
        for row in range(len(batch), len(batch) + pad_requests):
            table[row] = 99  # stale rows of earlier requests
        return rows.to(dtype), seq_lens, torch.tensor(qsl, dtype=torch.int32), table, tokens

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


def layout_of(step, device, warm_up=False, tiles=None, rows=True):
    """The layout as a runner's builder gets it: rows, offsets and lengths on the host, the block table on `device`;
    with `tiles` (each request's, `tiles_of`) the branch both runners take: V1 gives its rows too (checked against the
    tiles), V2 (``rows=False``) none."""
    step_rows_, seq_lens, qsl, table, tokens = step
    return short_layout(step_rows_ if rows else None, qsl, seq_lens, table.to(device), num_tokens=tokens,
                        short_per_tile=SHORT, long_per_tile=LONG, block_size=BLOCK, warm_up=warm_up, tiles=tiles)


#: How the builder gets the step (`layout_of`): the runner's rows alone; V1 as it runs, rows and each request's tiles;
#: V2 as it runs, the tiles alone (its rows are written after the metadata is built)
BRANCHES = ["rows", "v1-rows-and-tiles", "v2-tiles"]


def branch_layout(step, batch, device, branch: str):
    if branch == "rows":
        return layout_of(step, device)
    return layout_of(step, device, tiles=[tiles_of(request) for request, _ in batch], rows=branch != "v2-tiles")


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
    assert layout.seq_lens_cpu.device.type == "cpu" and layout.seq_lens_cpu.dtype == torch.int32
    assert layout.seq_lens_cpu.tolist() == seq_lens + [0] * pad
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
@pytest.mark.parametrize("branch", BRANCHES)
def test_v1_step_unpadded(device, dtype, branch):
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    layout = branch_layout(runner.step(batch, dtype=dtype), batch, device, branch)
    assert_layout(layout, batch, device)
    assert layout.gather.numel() == 5 + 3 * SHORT + 2 + SHORT + 3 + 1  # the HR-only slots are not run below k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("branch", BRANCHES)
def test_v1_step_padded_to_a_capture_size_with_stale_columns(device, branch):
    """CUDA graphs pad the token and request counts; the columns past the step's tokens hold an earlier step's rows
    (here: live-looking text rows, which would get gather entries and slots if they were read)."""
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    stale = torch.arange(3 * 512, dtype=torch.int64).reshape(3, 512) % 50
    step = runner.step(batch, pad_tokens=512 - 5 - 4 * LONG - 5 - 1, pad_requests=6, stale=stale)
    assert step[0].shape[1] == 512 and step[2].shape[0] == len(batch) + 6 + 1
    assert_layout(branch_layout(step, batch, device, branch), batch, device, requests=len(batch) + 6)


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


def step_rows(tiles, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The rows `short_layout` computes from each request's tiles when given ``tiles``, ``(3, num_tokens)`` as a V1
    runner's buffer holds them (`short_layout._rows_from_tiles`, rows 1 and 2; row 0 as row 1): what these tests
    compare with the model's rows (`positions.saving_positions`)."""
    qsl = query_start_loc.to(torch.int64)
    seq_lens = seq_lens.to(torch.int64)[: qsl.shape[0] - 1]
    request, _, _, _, p = _step_tokens(qsl, seq_lens, num_tokens)
    short, code = _rows_from_tiles(tiles, qsl, seq_lens, p, request, SHORT, LONG)
    return torch.stack([short, short, code])


def tiles_of(request: Request) -> RequestTiles:
    """The request's tiles as the scheduler's KV manager and the V2 runner state hold them (from its features)."""
    return RequestTiles.of(SimpleNamespace(mm_features=request.features), SHORT, LONG)


def rows_from_tiles(batch, step):
    """`step_rows` for a runner's step: what a runner state holding each request's tiles computes."""
    rows, seq_lens, qsl, table, tokens = step
    return step_rows([tiles_of(request) for request, _ in batch], qsl, seq_lens, tokens)


def chunk(request: Request, count: int, whole_tiles: bool) -> int:
    """A prefill chunk of at most `count` tokens (within the prompt and 3 decoded tokens), or, with `whole_tiles`, as
    vLLM's scheduler cuts it on the saving path: ending at a tile's start, or after the tile it would end in where
    that is the chunk's first."""
    end = min(request.computed + count, request.prompt + 3)
    if whole_tiles:
        spans = tiles_of(request).spans
        cut = whole_tiles_end(spans, end)
        end = cut if cut > request.computed else next(last + 1 for first, last in spans if first <= end <= last)
    return end - request.computed


def test_the_rows_from_a_requests_tiles_are_the_rows_the_model_computes():
    """`step_rows` (each request's tiles, `RequestTiles.short`: the scheduler's arithmetic) gives the rows the model's
    `saving_positions` gives (rows 1 and 2, which the layout reads) for every step of random requests: several
    images, text between, chunked prefill at random points (a chunk may end anywhere in even trials, at whole tiles in
    odd ones, as the scheduler cuts them), decoded tokens, several requests in one step, padded requests; and
    `short_layout` given the tiles instead of the rows builds the same layout (or refuses the same step: a chunk
    ending among a tile's HR-only slots has no live token)."""
    generator = torch.Generator().manual_seed(0)

    def draw(high):
        return int(torch.randint(high, (1,), generator=generator))

    for trial in range(60):
        requests = []
        for _ in range(1 + draw(3)):
            images, offset = [], draw(4)
            for _ in range(draw(4)):
                tiles = 1 + draw(3)
                images.append((offset, tiles))
                offset += tiles * LONG + draw(5)
            requests.append(Request(prompt=offset + draw(3) + 1, images=images))
        runner = Runner(width=64)
        while any(r.computed < r.prompt + 3 for r in requests):
            batch = [(r, chunk(r, 1 + draw(2 * LONG), whole_tiles=trial % 2 == 1) if r.computed < r.prompt else 1)
                     for r in requests if r.computed < r.prompt + 3]
            step = runner.step(batch, pad_requests=draw(3))
            tiles = [tiles_of(request) for request, _ in batch]
            got = step_rows(tiles, step[2], step[1], step[4])
            assert got.shape == (3, step[4])
            assert torch.equal(got[1:], step[0][1:, : step[4]]), trial
            assert torch.equal(got[0], got[1])
            # the layout given the tiles (V2's builder) is the one given the model's rows, or both refuse the step
            outcomes = []
            for given in ({"rows": step[0]}, {"rows": None, "tiles": tiles}):
                try:
                    outcomes.append(short_layout(**given, query_start_loc=step[2], seq_lens=step[1],
                                                 block_table=step[3], num_tokens=step[4], short_per_tile=SHORT,
                                                 long_per_tile=LONG, block_size=BLOCK))
                except ShortLayoutMismatch as error:
                    outcomes.append(str(error))
            if isinstance(outcomes[0], str):
                assert outcomes[1] == outcomes[0], trial
            else:
                for name in ("gather", "query_start_loc", "seq_lens", "slot_mapping", "shift", "unwritten"):
                    assert torch.equal(getattr(outcomes[1], name), getattr(outcomes[0], name)), (trial, name)
            runner.finish(batch)


@pytest.mark.parametrize("device", DEVICES)
def test_a_layout_from_the_tiles_is_the_layout_from_the_rows(device):
    """The layout a runner state builds from each request's tiles (V2's order: before any row of the step is written)
    is the one the rows give, through consecutive steps (a prefill beside a decode, then decodes), padded requests and
    a step that resumes a tile."""
    runner, first, second = prefill_and_decode()
    batches = [[(first, first.prompt), (second, 1)], [(first, 1), (second, 1)], [(second, 1)]]
    for batch in batches:
        step = runner.step(batch, pad_requests=2)
        rows, seq_lens, qsl, table, tokens = step
        assert_layout(layout_of((rows_from_tiles(batch, step), seq_lens, qsl, table, tokens), device), batch, device,
                      requests=len(batch) + 2)
        runner.finish(batch)
    resumed = Request(prompt=2 + LONG + 3, images=[(2, 1)])
    resumed.computed, resumed.blocks = 2 + 12, [1]
    runner = Runner()
    runner.next_block = 2
    step = runner.step([(resumed, 7)])
    from_rows = layout_of(step, device)
    from_tiles = layout_of((rows_from_tiles([(resumed, 7)], step), *step[1:]), device)
    for name in ("gather", "query_start_loc", "seq_lens", "slot_mapping", "shift", "unwritten"):
        assert torch.equal(getattr(from_tiles, name), getattr(from_rows, name)), name


def test_a_step_without_tiles_is_every_token_at_its_index():
    """A request with no image (or a dummy run's): each token's rows are its long index."""
    qsl, seq_lens = torch.tensor([0, 3, 4]), torch.tensor([3, 9])
    assert step_rows([None, None], qsl, seq_lens, 4).tolist() == [[0, 1, 2, 8]] * 3
    no_image = RequestTiles((), SHORT, LONG)
    one_image = RequestTiles(((1, LONG),), SHORT, LONG)  # one tile at long indices 1..16
    rows = step_rows([no_image, one_image], torch.tensor([0, 2, 2 + 18]), torch.tensor([2, 18]), 20)
    assert rows[1].tolist() == [0, 1] + [0, 1, 2, 3, 4] + [5] * (LONG - SHORT) + [5]
    assert rows[2].tolist() == [0, 1] + [0] + [-1 - j for j in range(LONG)] + [5]


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
        rows, seq_lens, qsl, table, tokens = runner.step(decode)
        with pytest.raises(ShortLayoutMismatch, match="do not belong to this step.*lvtc_vllm_path.*masked"):
            layout_of((previous, seq_lens, qsl, table, tokens), device)
        assert_layout(layout_of((rows, seq_lens, qsl, table, tokens), device), decode, device)
        previous = rows
        runner.finish(decode)


@pytest.mark.parametrize("device", DEVICES)
def test_each_wrong_input_is_refused(device):
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    rows, seq_lens, qsl, table, tokens = runner.step(batch)

    def refused(match, rows=rows, seq_lens=seq_lens, qsl=qsl, table=table):
        with pytest.raises(ShortLayoutMismatch, match=match):
            layout_of((rows, seq_lens, qsl, table, tokens), device)

    refused("do not belong", rows=torch.roll(rows, 1, 1))  # rows shifted by a column
    hidden = rows.clone()
    hidden[:, -1] = -1 - SHORT  # the decoded token read as an HR-only slot
    refused("do not belong|no short-layout token", rows=hidden)
    refused("no block in the short group", table=table[:, :2])  # a table narrower than the rows' positions (host)
    if device == "cpu":  # (on a GPU the block table's values are checked there: the next test)
        for case, (wrong_rows, wrong_table) in unheld_cases(rows, table, first).items():
            refused("no block in the short group", rows=wrong_rows, table=wrong_table)
    assert_layout(layout_of((rows, seq_lens, qsl, table, tokens), device), batch, device)


@pytest.mark.parametrize("device", DEVICES)
def test_given_its_requests_tiles_a_step_refuses_any_other_rows(device):
    """V1 hands the builder the rows it wrote and the builder checks them against the tiles of the runner's requests
    (`short_layout` given both): the rows the tiles give pass, and the layout is the one from the rows alone; rows of
    another request with as many tiles placed elsewhere in a prompt as long (rows right for some request, which the
    rows alone cannot tell from this one's), rows shifted by a column, the tiles of another batch order and of more
    requests than the step's are refused."""
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    step = rows, seq_lens, qsl, table, tokens = runner.step(batch)
    tiles = [tiles_of(request) for request, _ in batch]

    def layout(given_rows, given_tiles=tiles):
        return short_layout(given_rows, qsl, seq_lens, table.to(device), num_tokens=tokens, short_per_tile=SHORT,
                            long_per_tile=LONG, block_size=BLOCK, tiles=given_tiles)

    checked, alone = layout(rows), layout_of(step, device)
    for name in ("gather", "query_start_loc", "seq_lens", "slot_mapping", "shift", "unwritten"):
        assert torch.equal(getattr(checked, name), getattr(alone, name)), name
    elsewhere = Request(prompt=first.prompt, images=[(9, 3), (9 + 3 * LONG + 1, 1)])  # 4 tiles, 4 slots later
    moved = rows.clone()
    moved[:, : first.prompt] = elsewhere.rows
    layout_of((moved, seq_lens, qsl, table, tokens), device)  # (the rows alone cannot tell)
    with pytest.raises(ShortLayoutMismatch, match="position rows other than their requests' tiles give"):
        layout(moved)
    with pytest.raises(ShortLayoutMismatch, match="other than their requests' tiles give"):
        layout(torch.roll(rows, 1, 1))
    with pytest.raises(ShortLayoutMismatch, match="other than their requests' tiles give"):
        layout(rows, tiles[::-1])
    with pytest.raises(ShortLayoutMismatch, match="the runner's batch holds 3 requests and the step 2"):
        layout(rows, tiles + tiles[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu/check.sh)")
def test_a_gpu_step_never_waits_for_the_device():
    """PyTorch's synchronisation debug mode raises on any operation that waits for the GPU (a read back, a pageable
    copy, a data-dependent shape): a padded V1 step, a decode step and another group's slot mapping build under it."""
    runner, first, second = prefill_and_decode()
    steps, inputs, wanted = [[(first, first.prompt), (second, 1)], [(first, 1), (second, 1)]], [], []
    for batch in steps:
        rows, seq_lens, qsl, table, tokens = runner.step(batch, pad_tokens=5, pad_requests=2)
        inputs.append((rows, seq_lens, qsl, table.to("cuda"), (table + 10).to("cuda"), tokens))  # (the runner's)
        wanted.append(expected(batch))
        runner.finish(batch)
    torch.cuda.synchronize()
    layouts = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows, seq_lens, qsl, table, other, tokens in inputs:
            layout = short_layout(rows, qsl, seq_lens, table, num_tokens=tokens, short_per_tile=SHORT,
                                  long_per_tile=LONG, block_size=BLOCK)
            layouts.append((layout, layout.for_block_table(other, BLOCK)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (gather, qsl, seq_lens, slots), (layout, other) in zip(wanted, layouts):
        assert layout.gather.tolist() == gather and layout.slot_mapping.tolist() == slots
        assert layout.query_start_loc.tolist() == qsl + [qsl[-1]] * 2
        assert layout.seq_lens.tolist() == seq_lens + [0, 0]
        assert other.gather.tolist() == layout.gather.tolist()
        assert other.slot_mapping.tolist() == (layout.slot_mapping + 10 * BLOCK).tolist()


def unheld_cases(rows, table, first):
    """Inputs whose live tokens land on vLLM's null block in the short group's table."""
    other = Request(prompt=first.prompt, images=[(5, 3)])  # rows of another request, with fewer tiles
    swapped = rows.clone()
    swapped[:, : first.prompt] = other.rows
    short_table = table.clone()
    short_table[0, len(first.blocks) - 1] = 0  # the scheduler gave the short group one block fewer
    return {"rows of another request": (swapped, table), "one block fewer": (rows, short_table)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu/check.sh)")
@pytest.mark.parametrize("case", ["rows of another request", "one block fewer"])
def test_a_token_without_a_block_stops_a_gpu_step_without_a_host_read(case):
    """On a GPU, whether each live token has a block is asserted on the device (`torch._assert_async`): the step
    stops at its next synchronisation instead of writing K/V to vLLM's null block. A failed device assertion leaves
    the CUDA context unusable, so the step runs in a process of its own."""
    import subprocess
    import sys

    code = f"""
import sys, torch
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import test_short_layout as t
runner, first, second = t.prefill_and_decode()
batch = [(first, first.prompt), (second, 1)]
rows, seq_lens, qsl, table, tokens = runner.step(batch)
wrong_rows, wrong_table = t.unheld_cases(rows, table, first)[{case!r}]
layout = t.layout_of((wrong_rows, seq_lens, qsl, wrong_table, tokens), "cuda")
print("built", flush=True)
torch.cuda.synchronize()
print("synchronized", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "synchronized" not in done.stdout, (done.stdout, done.stderr[-2000:])
    # (the assertion fails on the device; PyTorch reports it at the next kernel launch, often before "built")
    assert "has no block in the short KV group" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad", [0, 3], ids=["eager", "padded"])
def test_the_v1_runners_mixed_batch_warm_up_writes_no_kv(device, pad):
    """vLLM 0.32's V1 runner warms FlashInfer up with a dummy run that builds attention metadata before any request
    (`_dummy_run(16, force_attention=True, create_mixed_batch=True)`: 8 decodes of one token, seq_lens 1, and a prefill
    of 8, seq_len 9): the M-RoPE buffer as allocated (zeros), the block table zeroed. Before any request reached the
    runner (`warm_up`, which the model's builder knows from the requests whose rows the model computed), the step runs
    every token below k at its index in its request and writes no K/V; the same inputs once a request has reached the
    runner, or with rows written, are a real step's and stop."""
    decodes, prefill = 8, 8
    counts = [1] * decodes + [prefill]
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor(counts), 0).tolist() + [16] * pad, dtype=torch.int32)
    seq_lens = torch.tensor([1] * decodes + [prefill + 1] + [0] * pad, dtype=torch.int32)
    rows = torch.zeros(3, 16 + pad, dtype=torch.int64)
    table = torch.zeros(len(counts) + pad, 16, dtype=torch.int32)
    layout = layout_of((rows, seq_lens, qsl, table, 16), device, warm_up=True)
    assert layout.gather.tolist() == list(range(16))
    assert layout.query_start_loc_cpu.tolist() == qsl.tolist()
    assert layout.seq_lens.tolist() == counts + [0] * pad and layout.seq_lens_cpu.tolist() == counts + [0] * pad
    assert layout.slot_mapping.tolist() == [-1] * 16 and layout.shift.tolist() == [0] * 16
    assert (layout.max_query_len, layout.max_seq_len) == (prefill, prefill)
    with pytest.raises(ShortLayoutMismatch, match="do not belong"):
        layout_of((rows, seq_lens, qsl, table, 16), device, warm_up=False)
    written = rows.clone()
    written[:, 9] = 1  # rows written: a real step's
    with pytest.raises(ShortLayoutMismatch, match="do not belong"):
        layout_of((written, seq_lens, qsl, table, 16), device, warm_up=True)


def test_a_gpu_step_reads_nothing_back_from_the_device():
    """The layout is built from host data: with the block table on PyTorch's meta device (which holds no values, so any
    read of it fails), the step's layout is still built, its device tensors on that device and its host copies right.
    (The layout of today's main read the device once per step: four counts and each request's lengths.)"""
    runner, first, second = prefill_and_decode()
    batch = [(first, first.prompt), (second, 1)]
    rows, seq_lens, qsl, table, tokens = runner.step(batch, pad_tokens=7, pad_requests=2)
    layout = layout_of((rows, seq_lens, qsl, table, tokens), "meta")
    gather, want_qsl, want_lens, _ = expected(batch)
    for name in ("gather", "query_start_loc", "seq_lens", "slot_mapping", "shift", "live_request", "live_short"):
        assert getattr(layout, name).device.type == "meta", name
    assert layout.gather.shape == (len(gather),) and layout.slot_mapping.shape == (len(gather),)
    assert layout.query_start_loc_cpu.tolist() == want_qsl + [want_qsl[-1]] * 2
    assert layout.seq_lens_cpu.tolist() == want_lens + [0, 0]
    assert (layout.max_query_len, layout.max_seq_len) == (max(b - a for a, b in zip(want_qsl, want_qsl[1:])),
                                                          max(want_lens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("branch", BRANCHES)
def test_a_step_resuming_a_tile_recomputes_the_lr_slots_its_hr_only_slots_carry(device, branch):
    """A prefix-cache hit that ends at HR-only slot 12 of a tile: the step holds the rest of the tile (slots 12-15,
    which carry LR slots 0-3's inputs) and the text after it. Those four slots run below k at LR slots 0-3's short
    positions (2-5); the K/V of 2 and 3 is the cache's (a full block before the LR end's block: not written), that of
    4 and 5 is written into the request's new block; layer k reads the tile's LR states 12 slots on (`shift`)."""
    runner = Runner()
    request = Request(prompt=2 + LONG + 3, images=[(2, 1)])
    request.computed = 2 + 12
    request.blocks = [1]  # the cache's block of short positions 0-3
    runner.next_block = 2
    rows, seq_lens, qsl, table, tokens = runner.step([(request, 7)])
    layout = branch_layout((rows, seq_lens, qsl, table, tokens), [(request, 7)], device, branch)
    assert layout.gather.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert layout.query_start_loc_cpu.tolist() == [0, 7] and layout.seq_lens.tolist() == [9]
    assert layout.slot_mapping.tolist() == [-1, -1, 2 * BLOCK, 2 * BLOCK + 1, 2 * BLOCK + 2, 2 * BLOCK + 3,
                                            3 * BLOCK]
    assert layout.shift.tolist() == [LONG - SHORT] * 4 + [0] * 3
    assert (layout.max_query_len, layout.max_seq_len) == (7, 9)
    other = layout.for_block_table((table + 10).to(device), BLOCK)  # another short group's blocks
    assert other.slot_mapping.tolist() == [-1, -1, 12 * BLOCK, 12 * BLOCK + 1, 12 * BLOCK + 2, 12 * BLOCK + 3,
                                           13 * BLOCK]
    assert other.gather.tolist() == layout.gather.tolist()


def in_kernel_blocks(table: torch.Tensor, kernel: int, stride: int = 0) -> torch.Tensor:
    """A block table as vLLM hands it to a backend that takes blocks of `kernel` tokens (`AttentionGroup
    .map_to_kernel_block_table`): kernel block j of block b is ``b * stride + j``, the stride being the kernel blocks
    per block, or a packed cache's page stride."""
    per_block = BLOCK // kernel
    return (table.unsqueeze(-1) * (stride or per_block) + torch.arange(per_block, dtype=table.dtype)).flatten(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [0, 5], ids=["split", "packed"])
def test_a_block_table_in_kernel_blocks_gives_the_same_kv_slots(device, stride):
    """A backend may take smaller blocks than the KV manager's (vLLM's kernel block sizes, e.g. FlashAttention 4 with
    head size 256): its block table and slots are in kernel blocks. The layout then maps each live token to the
    kernel view's slot of the very place the manager's block gives it, the K/V a resumed tile does not write is that of
    the manager's cached blocks (counted in its block size, not the kernel's), and a token in vLLM's null block is
    refused whichever of its kernel blocks it falls in."""
    kernel = BLOCK // 2

    def kernel_slot(slot: int) -> int:
        block, offset = divmod(slot, BLOCK)
        return -1 if slot < 0 else (block * (stride or 2) + offset // kernel) * kernel + offset % kernel

    runner, first, second = prefill_and_decode()
    mixed = runner.step([(first, first.prompt), (second, 1)])
    resumed = Request(prompt=2 + LONG + 3, images=[(2, 1)])  # resumed at HR-only slot 12: its LR end, 6, mid-block
    resumed.computed, resumed.blocks = 2 + 12, [1]
    runner = Runner()
    runner.next_block = 2
    for step in (mixed, runner.step([(resumed, 7)])):
        rows, seq_lens, qsl, table, tokens = step
        whole = layout_of(step, device)
        split = short_layout(rows, qsl, seq_lens, in_kernel_blocks(table, kernel, stride).to(device),
                             num_tokens=tokens, short_per_tile=SHORT, long_per_tile=LONG, block_size=BLOCK,
                             kernel_block_size=kernel)
        assert split.slot_mapping.tolist() == [kernel_slot(slot) for slot in whole.slot_mapping.tolist()]
        assert split.unwritten.tolist() == whole.unwritten.tolist()
        assert split.gather.tolist() == whole.gather.tolist()
        other = split.for_block_table(in_kernel_blocks(table + 10, kernel, stride).to(device), kernel)
        assert other.slot_mapping.tolist() == [-1 if slot < 0 else kernel_slot(slot + 10 * BLOCK)
                                               for slot in whole.slot_mapping.tolist()]
    assert split.slot_mapping.tolist().count(-1) == 2  # (short positions 2-3: the cache's block; 4-5 are written)

    # a full block missing: its 4 tokens are refused, those in the null block's second kernel block as well
    rows, seq_lens, qsl, table, tokens = mixed
    table = table.clone()
    table[0, len(first.blocks) - 2] = 0
    if device == "cpu":
        with pytest.raises(ShortLayoutMismatch, match="4 short-layout token.s. of the step have no block"):
            short_layout(rows, qsl, seq_lens, in_kernel_blocks(table, kernel, stride), num_tokens=tokens,
                         short_per_tile=SHORT, long_per_tile=LONG, block_size=BLOCK, kernel_block_size=kernel)
    with pytest.raises(ValueError, match="kernel_block_size 3 does not divide"):
        short_layout(rows, qsl, seq_lens, table, num_tokens=tokens, short_per_tile=SHORT, long_per_tile=LONG,
                     block_size=BLOCK, kernel_block_size=3)


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_that_cannot_resume_its_first_tile_is_refused(device):
    """A step that starts inside a tile's LR slots, or in its HR-only slots without the rest of the tile, or after the
    slots that carry the LR inputs it must recompute: refused."""
    for computed, count in ((2 + 1, LONG - 1 + 3), (2 + 12, 2), (2 + 13, 6)):
        runner = Runner()
        request = Request(prompt=2 + LONG + 3, images=[(2, 1)])
        request.computed = computed
        with pytest.raises(ShortLayoutMismatch, match="cannot resume"):
            layout_of(runner.step([(request, count)]), device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_without_a_live_token_is_refused(device):
    """Rows that put no short-layout token in a request's step (a decoded token read as an HR-only slot of a tile
    that ends in the step): refused."""
    runner = Runner()
    request = Request(prompt=2 + LONG, images=[(2, 1)])
    rows, seq_lens, qsl, table, tokens = runner.step([(request, 2 + LONG)])
    rows[2, :] = -1 - (LONG - 1)
    with pytest.raises(ShortLayoutMismatch, match="do not belong|no short-layout token"):
        layout_of((rows, seq_lens, qsl, table, tokens), device)


@pytest.mark.parametrize("short_side,long_side", [(2, 4), (16, 32), (8, 32)])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_resumed_tile_recomputes_every_lr_slot_layer_k_reads_and_carries_them_in_the_step(short_side, long_side,
                                                                                         mode):
    """`lr_slots_to_recompute` against layer k's upsampling table: wherever a step may resume a tile, the LR slots
    read (with a non-zero weight) by the long slots from there on, and those after the last full block before the LR
    end, are among the recomputed ones, whose copies (the tile's last HR-only slots) are in the step; and a step may
    resume in the last long row of the tile (the cost of a hit that ends just after an image)."""
    from internvlx_hf.vllm.lvtc.geometry import lr_slots_to_recompute
    from internvlx_hf.vllm.lvtc.layers import UpsampleTable

    geometry = LVTCGeometry(expand_layer=1, short_side=short_side, long_side=long_side, upsample_mode=mode,
                            hr_scale="none", injection_layers=())
    table = UpsampleTable(geometry)
    short, long = geometry.short_per_tile, geometry.long_per_tile
    read = torch.where(table.weight > 0, table.source, short).min(-1).values  # each long slot's first LR slot read
    first_read = torch.flip(torch.cummin(torch.flip(read, [0]), 0).values, [0])  # ... of the slots from it on
    for block in (4, 16, 128):
        for short_end in (short + 3, 5 * short, 5 * short + block - 1):
            resumable = []
            for slot in range(long + 1):
                count = lr_slots_to_recompute(slot, short_end, short, long, block)
                if slot < short or slot >= long:
                    assert count == 0
                    continue
                if count:
                    resumable.append(slot)
                    assert short - count <= int(first_read[slot])  # every LR slot read is recomputed
                    assert count >= short_end % block  # and the LR end's block is rewritten whole
                    assert slot <= long - count  # the copies are in the step
            if short_end % block <= short // 4:
                assert resumable and max(resumable) >= long - long_side, (block, short_end, resumable[-3:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_layer_k_reads_a_resumed_tiles_lr_states_from_the_slots_that_carry_them(device, mode):
    """Layer k's upsampling (`UpsampleTable`) of a tile resumed at an HR-only slot, its LR states recomputed in its
    last HR-only slots (`shift`), behind another request's tokens: exactly the rows of the same tile upsampled whole."""
    from internvlx_hf.vllm.lvtc.geometry import lr_slots_to_recompute
    from internvlx_hf.vllm.lvtc.layers import UpsampleTable

    geometry = LVTCGeometry(expand_layer=1, short_side=16, long_side=32, upsample_mode=mode, hr_scale="none",
                            injection_layers=())
    table = UpsampleTable(geometry).to(device)
    short, long = geometry.short_per_tile, geometry.long_per_tile
    generator = torch.Generator().manual_seed(0)
    lr = torch.randn(short, 8, generator=generator, dtype=torch.float64).to(device)
    whole = torch.zeros(long, 8, dtype=torch.float64, device=device)
    whole[:short] = lr
    want = table(whole, torch.arange(long, device=device))
    for resume in (short, 700, 990, long - 1):
        count = lr_slots_to_recompute(resume, 5 * short, short, long, 16)
        if not count:
            continue
        before = 5  # another request's tokens first in the step
        hidden = torch.randn(before + long - resume, 8, generator=generator, dtype=torch.float64).to(device)
        slots = torch.arange(resume, long, device=device)
        carried = slots >= long - count
        hidden[before:][carried] = lr[slots[carried] - (long - short)]
        slot = torch.cat([torch.full((before,), -1, device=device), slots])
        shift = torch.cat([torch.zeros(before, dtype=torch.int64, device=device),
                           torch.full((long - resume,), long - short, device=device)])
        got = table(hidden, slot, shift)[before:]
        torch.testing.assert_close(got, want[resume:], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_graph_steps_inputs_are_padded_to_its_token_count_at_addresses_that_stay(device):
    """CUDA graphs replay the layers for a padded token count, reading the addresses they were captured with: the
    layers' inputs of two steps with the same padded count (and different live counts) lie in the same memory, the
    gather padded with the scratch row's index (the padded count), long positions and shift past the layout's zero
    (the runner's padded columns hold stale rows)."""
    runner, first, second = prefill_and_decode()
    buffers = torch.full((3, 64), 5, dtype=torch.int64, device=device)
    captured = None
    for batch in ([(first, 2 + SHORT), (second, 1)], [(second, 1)]):
        rows, seq_lens, qsl, table, tokens = step = runner.step(batch)
        layout = layout_of(step, device)
        long_positions = torch.arange(tokens, device=device) + 7
        gather, long_out, shift = graph_step_inputs(buffers, layout.gather, long_positions, layout.shift, 48)
        live = layout.gather.numel()
        assert gather.tolist() == layout.gather.tolist() + [48] * (48 - live)
        assert long_out.tolist() == long_positions.tolist() + [0] * (48 - tokens)
        assert shift.tolist() == layout.shift.tolist() + [0] * (48 - tokens)
        addresses = [t.data_ptr() for t in (gather, long_out, shift)]
        assert captured is None or addresses == captured
        captured = addresses
        runner.finish(batch)
