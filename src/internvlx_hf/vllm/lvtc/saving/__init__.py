"""LVTC's saving path on vLLM (the default for LVTC checkpoints with expansion): the layers below `k` hold and compute
the short layout only (docs/serving-vllm-lvtc.md, "The saving path: how it works"). One file per job:

- `kv_cache.py`: the short layers' KV-cache group (`LVTCShortSpec`, `LVTCShortManager`): blocks for each request's
  short-layout tokens only (the long count less the HR-only slots before it, from the request's `mm_features`), cached
  under the long layout's block hashes (`tiles.short_block_keys`), a hit ending at a tile's start or where a step
  resumes a tile (`tiles.RequestTiles.longest_hit`);
- `scheduler.py`: the engine's `scheduler_cls` (`lvtc_scheduler`): hands the scheduler's requests to that group's
  managers, ends prefill chunks at tile starts, and puts off a step a request whose hit would copy a block the same
  step fills;
- `attention.py`: the short layers' attention backend, a subclass of the platform's, whose builder builds the step's
  short layout before the forward pass (`short_layout.short_layout`, plain torch) from the runner's M-RoPE rows, and
  whose KV write takes that layout's slot mapping;
- `layers.py`: the short layers' attention put in place of vLLM's (`SavingFront`, not compiled) and the layer loop
  both paths share, compiled by vLLM (`SavingLayers`), run on the live tokens below k;
- `internals.py`: the vLLM internals (not public API) all this uses, each checked where the config hook chooses the
  path (`missing_internals`): a vLLM that differs gets the masked path (`../masked.py`) with one log line.

The request is scheduled in its long layout (vLLM keeps one token count per request); the layers from `k` run on it as
on any model. The plugin's `register()` registers the KV-cache group's spec in every vLLM process
(`kv_cache.register_spec`).
"""
