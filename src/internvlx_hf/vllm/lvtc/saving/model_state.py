"""The saving path's runner state on vLLM's second model runner (V2, the CUDA default): each request's tiles, kept
from when the runner adds the request (its `mm_features`, the arithmetic of the scheduler's KV manager:
`tiles.RequestTiles`), handed to the short layers' builder with each step's attention metadata.

V2 builds attention metadata (`ModelState.prepare_attn`) before it writes the step's M-RoPE rows
(`ModelState.prepare_inputs`), so the builder cannot check the rows as it does on V1; it builds the layout from the
tiles alone (`short_layout.short_layout(..., tiles=)`), on the host. The rows V2 stages for each request when it adds
it (the prompt's, from which it computes every step's) are checked against the request's tiles then
(`short_layout.check_prompt_rows`). A model brings its own state through
`get_model_state_cls()` (`vllm/v1/worker/gpu/model_states/__init__.py`), and a state hands builders extra arguments
through `ModelSpecificAttnMetadata.get_extra_attn_kwargs` (read in vLLM 0.32; `tests/test_vllm_lvtc_savings.py` runs
this class through V2's own `prepare_attn` and guards the order on V2's source).
"""

from __future__ import annotations

import re
from typing import Any

from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.model_states.interface import ModelSpecificAttnMetadata

from internvlx_hf.vllm.lvtc.short_layout import check_prompt_rows
from internvlx_hf.vllm.lvtc.tiles import RequestTiles


#: What the short builder is handed for a dummy run (profiling, warm-up, a graph capture). (None, what the builder gets
#: where no tiles were handed over, is not taken for one.)
DUMMY_RUN: tuple = ()

#: The request ids V2 gives the requests of a dummy run (`InputBatch.make_dummy`: ``f"req_{i}_{random_uuid()}"``, 16
#: hex digits; vLLM 0.32, `V2_INTERNALS`): a step is a dummy run when vLLM made its batch so, not because its
#: requests are unknown to the state (a real request unknown to it would have no K/V written).
_DUMMY_REQUEST_ID = re.compile(r"req_\d+_[0-9a-f]{16}")


def is_dummy_batch(req_ids) -> bool:
    """Whether every request of a step has the ids V2's dummy runs are given."""
    return bool(req_ids) and all(_DUMMY_REQUEST_ID.fullmatch(req_id) for req_id in req_ids)


class StepTiles(ModelSpecificAttnMetadata):
    """One step's tiles per request (the batch's order), or `DUMMY_RUN`: given to the short layers' builder only
    (`LVTCShortBuilder.build`'s ``lvtc_tiles``)."""

    def __init__(self, tiles: list[RequestTiles] | tuple) -> None:
        self.tiles = tiles

    def get_extra_attn_kwargs(self, attn_metadata_builder: Any, num_reqs: int) -> dict[str, Any]:
        if getattr(attn_metadata_builder, "lvtc_short", False):
            return {"lvtc_tiles": self.tiles}
        return {}


class LVTCModelState(DefaultModelState):
    """vLLM's default runner state (M-RoPE rows, embeddings) plus each request's tiles, by request id."""

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        layout = model.layout
        self.lvtc_sizes = (layout.short_per_tile, layout.long_per_tile)
        self.lvtc_tiles: dict[str, RequestTiles] = {}
        model.lvtc.channel.runner_state = True  # (the builder then takes the tiles, not the M-RoPE buffer)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        tiles = self.lvtc_tiles[new_req_data.req_id] = RequestTiles.of(new_req_data, *self.lvtc_sizes)
        if self.rope_state is not None:  # the rows V2 just staged for the request: the ones its tiles give
            check_prompt_rows(staged_rows(self.rope_state, req_index)[1:], tiles, *self.lvtc_sizes)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.lvtc_tiles.pop(req_id, None)

    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config,
                     for_capture: bool = False, ubatch_idx: int = 0, model_specific_attn_metadata=None):
        # a dummy run's requests (`InputBatch.make_dummy`, recognised by the ids it gives them) were never added: no
        # tiles, no K/V written. Any other request the state does not know stops the engine (its layout would be a
        # warm-up's: K/V unwritten)
        req_ids = input_batch.req_ids[: input_batch.num_reqs]
        if is_dummy_batch(req_ids):
            tiles = DUMMY_RUN
        else:
            tiles = [self.lvtc_tiles.get(req_id) for req_id in req_ids]
            if None in tiles:
                missing = [req_id for req_id, one in zip(req_ids, tiles) if one is None]
                raise RuntimeError(f"InternVL-X LVTC saving path: V2's runner scheduled request(s) {missing} whose "
                                   "tiles its model state never received (add_request), and vLLM did not make them for "
                                   "a dummy run; the engine stops rather than write no K/V for them. Serve the "
                                   "checkpoint on the masked path: hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
        step = StepTiles(tiles)
        return super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                                    kv_cache_config, for_capture=for_capture, ubatch_idx=ubatch_idx,
                                    model_specific_attn_metadata=step)


def staged_rows(rope_state, req_index: int) -> list[list[int]]:
    """The position rows V2's `RopeState.init_prefill_positions` staged for the request in slot `req_index` (its
    `StagedWriteTensor`'s pending writes on the host, row ``num_dims * req_index + i`` for row ``i``: vLLM 0.32,
    `V2_INTERNALS`), the latest write of each row."""
    staged = rope_state.prefill_positions
    bounds = [0, *staged._staged_write_cu_lens]
    rows = {}
    for write, index in enumerate(staged._staged_write_indices):
        rows[index] = staged._staged_write_contents[bounds[write]: bounds[write + 1]]
    base = rope_state.num_dims * req_index
    return [list(rows[base + i]) for i in range(rope_state.num_dims)]
