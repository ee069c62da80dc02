"""What the plugin's schedulers share: requests a plugin scheduler cannot run, finished with an error when they arrive
(the reason in the log), as vLLM reports the requests it finishes with an error (their output goes out with the next
step's); and the factory step that picks a scheduler class for the engine's final `async_scheduling`."""

from __future__ import annotations


def _refusal_internals() -> dict:
    """The vLLM internals (not public API) a refusal uses, as in vLLM 0.32: name -> (check, what breaks)."""
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import Request

    from internvlx_hf.vllm_compat import source_has

    return {
        "EngineCoreOutput(request_id, new_token_ids, finish_reason, events, trace_headers), EngineCoreOutputs(outputs)"
        " and Scheduler.update_from_output returning them by client index": (
            lambda: {"request_id", "new_token_ids", "finish_reason", "events", "trace_headers"}
            <= set(EngineCoreOutput.__struct_fields__) and "outputs" in EngineCoreOutputs.__struct_fields__
            and source_has(Scheduler.update_from_output, "client_index: EngineCoreOutputs(outputs=outs)",
                           "return engine_core_outputs"),
            "a refused request's error could not be sent to its client (it would wait forever)"),
        "Request.client_index, trace_headers, take_events(), get_finished_reason(); Scheduler.finish_requests("
        "request_ids, finished_status)": (
            lambda: source_has(Request.__init__, "self.client_index = client_index",
                               "self.trace_headers = trace_headers")
            and callable(getattr(Request, "take_events", None)) and callable(getattr(Request, "get_finished_reason",
                                                                                   None))
            and [name for name in inspect.signature(Scheduler.finish_requests).parameters][1:] == [
                "request_ids", "finished_status"],
            "a request the plugin cannot run could not be finished with an error"),
    }


def check_refusal_internals() -> None:
    """Raise naming each internal a refusal uses that this vLLM lacks: checked when a plugin scheduler starts, so that
    a later vLLM stops the start with the reason, not a request's refusal with an engine error."""
    from internvlx_hf.vllm.lvtc.saving.internals import missing_internals

    table = _refusal_internals()
    missing = missing_internals(table)
    if missing:
        import vllm

        raise RuntimeError(
            f"InternVL-X on vLLM: vLLM {vllm.__version__} differs from 0.32 in how the plugin's scheduler refuses a "
            "request it cannot run: " + "; ".join(f"{name} ({table[name][1]})" for name in missing)
            + ". Serve with vLLM 0.32 (the `vllm` extra's pin).")


class RequestRefusalsMixin:
    """Before vLLM's `Scheduler` in a scheduler class's bases (`lvtc/saving/scheduler.py`, `router/scheduler.py`)."""

    def __init__(self, *args, **kwargs) -> None:
        check_refusal_internals()
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
