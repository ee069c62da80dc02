"""InternVL3.5-Flash's router (ViR) on vLLM: each request routed before vLLM's scheduler admits it.

vLLM fixes a request's token count before its vision encoder runs, and the router decides each tile's count (256 or
64 tokens per 448px tile) only after it. Here the decision is made first: before the scheduler admits a request, the
router runs on all of the request's tiles (its quantile over them, as transformers' scope "sample"), and the request is
rewritten to the prompt transformers' `generate` runs, each compressed tile's placeholders after its first quarter
deleted. From there vLLM's own machinery runs unchanged on that prompt: KV blocks, chunked prefill, prefix
caching (each item's cache identifier names its tiles' decisions), preemption, batching, CUDA graphs.
(experiments/vllm-flash-router/README.md: the alternatives and what each would cost.)

One file per job:

- `config.py`: the engine settings the router needs and what it refuses, at start (torch-free: the config hook);
- `admission.py`: the request's shortened prompt and placeholder ranges from its tiles' decisions (no vLLM needed);
- `scheduler.py`: the scheduler that routes the waiting requests it is about to admit, one call per step (the
  engine's `scheduler_cls`);
- `worker.py`: that call on the worker (`route_requests`: one vision-tower run for the batch's new images);
- `rows.py`: what the worker keeps between calls and steps (each image's scores and rows).

The model (`..model`) holds the router's modules; the scheduler calls it on the engine's worker through the engine's
executor (vLLM's `collective_rpc`, as the engine calls its workers), without waiting for the answer while requests
run.
"""

