"""Measurements on a user's own checkpoint and hardware (`internvlx bench`), and the harness the benchmarks share.

- `harness`: timing (warm-up, repeats, median), the results JSON with the environment it ran in, tables, plots.
- `variants`: a checkpoint folder and its plain-256 / plain-1024 variants built from the same weights.
- `checkpoint_runs`: prefill, train-step and peak-memory measurements over those variants.
- `server_load`: requests/s and latency of a running OpenAI-compatible server.

Nothing here imports torch at import time of the package, so `internvlx bench --help` stays instant.
"""
