"""What the plugin's schedulers share: requests a plugin scheduler cannot run, finished with an error when they arrive
(the reason in the log), as vLLM reports the requests it finishes with an error (their output goes out with the next
step's); and the factory step that picks a scheduler class for the engine's final `async_scheduling`."""

from __future__ import annotations


class RequestRefusalsMixin:
    """Before vLLM's `Scheduler` in a scheduler class's bases (`lvtc/saving/scheduler.py`, `router/scheduler.py`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._refused: list = []  # finished with an error at arrival, not yet reported

    def refuse(self, request, warning: str, *args) -> None:
        """Finish `request` with an error, `warning % args` in vLLM's log."""
        from vllm.logger import init_logger
        from vllm.v1.request import RequestStatus

        init_logger("internvlx_hf.vllm").warning(warning, *args)
        super().add_request(request)  # (vLLM's own: the request is known to the engine, then finished)
        self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)
        self._refused.append(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._refused:
            from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

            for request in self._refused:
                outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(EngineCoreOutput(
                    request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                    events=request.take_events(), trace_headers=request.trace_headers))
            self._refused = []
        return outputs


def for_async_scheduling(synchronous: type, asynchronous: type, vllm_config, **kwargs):
    """A `scheduler_cls` factory's scheduler: `asynchronous` or `synchronous` as the engine's final `async_scheduling`
    says (vLLM settles it after the config hook that named the factory)."""
    chosen = asynchronous if vllm_config.scheduler_config.async_scheduling else synchronous
    return chosen(vllm_config=vllm_config, **kwargs)
