"""The saving path's scheduler names as they were before LVTC on vLLM moved to the `lvtc/` sub-package: code that
subclasses `internvlx_hf.vllm.saving.LVTCSchedulerMixin`, or an engine whose `scheduler_cls` names
`internvlx_hf.vllm.saving.lvtc_scheduler`, keeps working. The path itself is `internvlx_hf.vllm.lvtc.short_kv`."""

from .lvtc.short_kv import LVTCAsyncScheduler, LVTCScheduler, LVTCSchedulerMixin, lvtc_scheduler

__all__ = ["LVTCAsyncScheduler", "LVTCScheduler", "LVTCSchedulerMixin", "lvtc_scheduler"]
