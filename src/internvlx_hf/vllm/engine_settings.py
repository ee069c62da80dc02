"""What the plugin tells vLLM and the user at start: its refusal (`UnsupportedCheckpoint`), the settings it makes with
their reasons (`EngineSettings`, said in one block), and what the platform's attention can run. Free of torch and of
the model code, as `config_hook.py` (vLLM imports both in every process, for every model); vLLM is imported only
inside the functions that ask it."""

from __future__ import annotations


class UnsupportedCheckpoint(RuntimeError, SystemExit):
    """A checkpoint or setting the plugin cannot serve, raised while vLLM reads its configuration, with one line that
    names the reason and the fix.

    An `Exception` (a `RuntimeError`), so that a program (a notebook, a service trying settings) catches it around
    ``vllm.LLM(...)`` with ``except Exception`` (or ``except UnsupportedCheckpoint``) and goes on; not a `ValueError`,
    which pydantic's validation of vLLM's config would wrap in a `ValidationError` of its own. Also a `SystemExit`, so
    that where nothing catches it (``vllm serve``) Python ends the process with the message as its one line and exit
    status 1, without the traceback of vLLM's configuration code."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.code = message  # (what Python prints and exits 1 with: `RuntimeError.__init__` does not set it)

    def __str__(self) -> str:
        return self.message


def cpu_head_sizes() -> list[int] | None:
    """The head sizes of vLLM's CPU attention where this is the CPU platform, else None (a GPU backend checks its own
    sizes when vLLM selects it, at start-up)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


#: The last line of the start-up block (`EngineSettings.report`).
END_OF_BLOCK = "InternVL-X on vLLM: end of what the plugin set"


class EngineSettings:
    """What the config hook sets on vLLM's engine, and why: said at start in one block of lines (`report`), with the
    LVTC path and the prompt length vLLM counts, so a user reads in one place what the plugin changed."""

    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] = []

    def set(self, owner, name: str, value, why: str) -> None:
        """``owner.name = value``, recorded with the value it replaces (nothing when it already was ``value``)."""
        old = getattr(owner, name)
        if old == value:
            return
        setattr(owner, name, value)
        self.lines.append(f"{name}: {old!r} -> {value!r} ({why})")

    def note(self, line: str) -> None:
        self.lines.append(line)

    def report(self) -> None:
        if not self.lines:
            return
        from vllm.logger import init_logger

        # one record, its first and last lines marked, among vLLM's own start-up warnings
        init_logger("internvlx_hf.vllm").warning(
            "InternVL-X on vLLM, %s: what the plugin set and why (docs/serving-vllm.md)\n%s\n%s", self.where,
            "\n".join(f"  - {line}" for line in self.lines), END_OF_BLOCK)


#: Why a model whose position rows carry LongRoPE's choice of factors (Phi-3) serves without prefix caching.
LONGROPE_ROWS = "each request's position rows carry LongRoPE's choice of factors, made on its whole prompt"


def prefix_caching_off(vllm_config, settings: EngineSettings, why: str) -> None:
    """Prefix caching off where a cached prefix could come from a prompt whose position rows differ (`why`)."""
    settings.set(vllm_config.cache_config, "enable_prefix_caching", False,
                 f"{why}: a cached prefix could come from a prompt with other rows")


def cuda_graph_mode(vllm_config) -> str | None:
    """The engine's CUDA-graph mode by name (vLLM's `CUDAGraphMode`: ``NONE``, ``PIECEWISE``, ``FULL_AND_PIECEWISE``,
    ...): ``NONE`` with ``--enforce-eager``; None where it is unset, which vLLM settles after the config hook (on a GPU
    its default, full and piecewise graphs)."""
    if vllm_config.model_config.enforce_eager:
        return "NONE"
    graphs = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if graphs is None and getattr(getattr(vllm_config, "optimization_level", None), "name", None) == "O0":
        return "NONE"  # (-O0: vLLM's defaults for that level, no CUDA graphs and no compilation)
    return getattr(graphs, "name", graphs)


#: vLLM's CUDA-graph modes with full graphs for decode steps only (its GPU default among them), which it lowers where a
#: metadata builder captures no full graphs (`graph_mode_with_short_layers`).
FULL_DECODE_MODES = ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY")


def graph_mode_with_short_layers(vllm_config) -> str | None:
    """The CUDA-graph mode vLLM settles on when the saving path's short layers are in the model: their metadata
    builder captures no full graphs (``AttentionCGSupport.NEVER``: their layout is built per step, apart from the
    buffers a full graph replays), and vLLM's ``CompilationConfig.resolve_cudagraph_mode_and_sizes`` then keeps
    ``NONE`` and ``PIECEWISE``, refuses ``FULL`` (mixed steps inside full graphs: returned as ``FULL``), and lowers the
    modes with full graphs for decode steps only (`FULL_DECODE_MODES`) to ``PIECEWISE`` where vLLM compiles the model
    and splits attention out of its graph (its defaults: compilation on, attention ops as splitting ops), else to
    ``NONE``. None where the mode is unset. Read in the config hook, before vLLM sets its compilation mode and
    splitting ops (``set_splitting_ops_for_v1``, which turns piecewise modes into ``NONE`` or ``FULL`` where nothing
    splits the graph), it foresees those; read when the model is built, they are set."""
    mode = cuda_graph_mode(vllm_config)
    if mode is None:
        return None
    compilation = vllm_config.compilation_config
    compiled = getattr(compilation.mode, "name", compilation.mode) in (None, "VLLM_COMPILE")
    splits, partition = compilation.splitting_ops, compilation.use_inductor_graph_partition
    if compiled and not partition:
        if splits is None and compilation.pass_config.fuse_attn_quant:  # (attention fused: nothing splits)
            mode = "FULL" if mode in ("PIECEWISE", "FULL_AND_PIECEWISE") else mode
        elif splits is not None and len(splits) == 0:
            mode = {"PIECEWISE": "NONE", "FULL_AND_PIECEWISE": "FULL"}.get(mode, mode)
    if mode not in FULL_DECODE_MODES:
        return mode
    split = partition or compilation.splitting_ops_contain_attention() or (
        splits is None and not compilation.pass_config.fuse_attn_quant)
    return "PIECEWISE" if compiled and split else "NONE"


#: vLLM's KV-cache update ops, which its default splitting keeps out of the captured pieces of piecewise CUDA graphs
KV_UPDATE_OPS = ("vllm::unified_kv_cache_update",)


def graph_capture_blocker(vllm_config) -> str | None:
    """Why CUDA graphs this engine may replay would capture what the saving path's short layers compute per step, or
    None: breakable CUDA graphs (``VLLM_USE_BREAKABLE_CUDAGRAPH=1``, which ``VLLM_BATCH_INVARIANT=1`` may switch on
    after this hook; vLLM then turns its compilation off and captures the eager forward, the short layers' per-step
    inputs inside the graph), or piecewise graphs whose pieces hold the KV-cache update (Inductor graph partition, or
    ``splitting_ops`` given without ``vllm::unified_kv_cache_update``): a capture keeps one step's short slot mapping
    and live token count, and its replays write through them. Nothing where no graph replays (``--enforce-eager``)."""
    import os

    compilation = vllm_config.compilation_config
    if graph_mode_with_short_layers(vllm_config) == "NONE":
        return None
    breakable = os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH")
    if breakable == "1" or (breakable is None and os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0")):
        return ("breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1, which VLLM_BATCH_INVARIANT=1 switches on for "
                "some models) capture the eager forward, the short layers' per-step layout inside the graph; start "
                "vLLM with --enforce-eager or VLLM_USE_BREAKABLE_CUDAGRAPH=0")
    splits = compilation.splitting_ops
    if compilation.use_inductor_graph_partition or (splits is not None and len(splits) > 0
                                                    and not all(op in splits for op in KV_UPDATE_OPS)):
        made = ("Inductor graph partition" if compilation.use_inductor_graph_partition
                else "splitting_ops without vllm::unified_kv_cache_update")
        return (f"piecewise CUDA graphs with the KV-cache update inside their pieces ({made}) keep one step's short "
                "slot mapping and live token count in the capture; leave splitting_ops to vLLM (or add "
                "vllm::unified_kv_cache_update to it) without graph partition, or start vLLM with --enforce-eager")
    return None
