"""LVTC on vLLM, one file per job:

- `geometry.py`: the tile geometry of an LVTC checkpoint (short and long tokens per tile, ``k``), no vLLM needed;
- `positions.py`: each token's layout in vLLM's per-request position rows (both paths), no vLLM needed;
- `layers.py`: the layer loop both paths run (Algorithm 1: layers below ``k``, the expansion, the injections, layers
  from ``k``) and the projectors' rows;
- `saving/`: the default ("saving") path: the layers below ``k`` hold and compute the short layout only, in a
  KV-cache group of their own (one file each: its KV cache, scheduler, attention backend, layers, and the vLLM
  internals it uses);
- `short_layout.py`: that path's per-step short layout (plain torch, no vLLM needed);
- `masked.py`: the fallback: the long layout with the HR-only slots masked out of the layers below ``k``;
- `path.py`: every LVTC decision on the engine's settings, made once at start (`configure_lvtc`, called by the config
  hook): the refusals, the path, and what that path needs of the scheduler.

Nothing here is imported by the package's `vllm` entry point: `model.py` and `config_hook.py` import what they use
(the hook only `geometry.py` and `path.py`, both free of torch and vLLM at import).
"""
