"""A scheduler class of a user's own (`scheduler_cls="vllm_user_scheduler.UserScheduler"`), for
tests/test_vllm_lvtc_savings.py: vLLM's scheduler, unchanged, for the engine's `async_scheduling`."""

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler


def UserScheduler(*, vllm_config, **kwargs):  # noqa: N802 - named as the class it stands for
    scheduler = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
    return scheduler(vllm_config=vllm_config, **kwargs)
