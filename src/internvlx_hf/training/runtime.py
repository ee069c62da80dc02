"""The process a training run lives in: its CPU threads (`cpu_threads`), its peak memory (`peak_memory`), FSDP and
DeepSpeed set-up checks, the rows every rank read, and the teardown of torch.distributed after training
(`end_distributed`, `exit_if_gloo_threads_remain`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from transformers import TrainingArguments

from ..data import InternVLXDataset
from .trainer import InternVLXTrainer


logger = logging.getLogger(__name__)


def fsdp_request(training_args: TrainingArguments) -> str | None:
    """Where FSDP was asked for: the ``--fsdp`` flag, or an accelerate config with ``distributed_type: FSDP``
    (`accelerate launch` passes it on as ACCELERATE_USE_FSDP); None when it was not."""
    from accelerate.utils import parse_flag_from_env

    if training_args.fsdp:
        return "--fsdp"
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "The accelerate config (distributed_type: FSDP, ACCELERATE_USE_FSDP=true)"
    return None


def join_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Let DeepSpeed's communication layer use the process group that is already there.

    On accelerators accelerate starts torch.distributed through `deepspeed.init_distributed`; a CPU run (``use_cpu``)
    starts it with torch alone, and DeepSpeed's own layer then reports one process: ZeRO-3's `zero.Init` (in
    `from_pretrained`) checks the Trainer's ``train_batch_size`` (micro batch x accumulation x processes) against a
    world of 1 and stops.
    """
    import torch.distributed as dist

    if not training_args.deepspeed or not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def set_cpu_threads(requested: int | None, say: Callable[[str], None]) -> None:
    import torch

    threads, why = cpu_threads(requested)
    torch.set_num_threads(threads)
    say(f"CPU threads: {threads} ({why})")


def warn_if_fsdp_is_off(trainer: InternVLXTrainer, training_args: TrainingArguments, is_main: bool) -> None:
    requested = fsdp_request(training_args)
    if requested and not trainer.is_fsdp_enabled and is_main:
        logger.warning("%s asks for FSDP, but it is not in effect: accelerate applies FSDP only to GPU (and other "
                       "accelerator) runs, so this run trains without sharding (%s).", requested,
                       "DDP" if training_args.world_size > 1 else "one process")


def cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """The torch threads of a CPU run and why: ``requested`` (``--threads``); else, with ``OMP_NUM_THREADS`` set,
    torch's count (which follows it); else torch's count (one per core) lowered to the cores that are free now, the
    cores this process may use minus the machine's 1-minute load average, at least 1.

    Measured (experiments/cpu-threads/README.md): on a 2-core machine with another job on one core, torch's default of 2
    threads made every parallel region wait for a core the other job held, and the same steps took several times as
    long as with 1."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, int(cores - load + 0.5))
    threads = max(1, min(torch.get_num_threads(), free))
    return threads, (f"{cores} cores, load average {load:.1f}; --threads N or OMP_NUM_THREADS sets another "
                     "count")


def peak_memory(device) -> str:
    """The run's peak memory so far, as the summary prints it: on a CUDA device what torch allocated at most
    (``torch.cuda.max_memory_allocated``: tensors, not the caching allocator's reserve), elsewhere the peak resident
    set size of this process (``ru_maxrss``: weights, data, activations, Python and libraries)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device)
        return f"Peak memory: {used / 2**30:.2f} GiB allocated on {device} (torch.cuda.max_memory_allocated)"
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return f"Peak memory: not measured on {sys.platform} ({device.type})"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss *= 1 if sys.platform == "darwin" else 1024
    return f"Peak memory: {rss / 2**30:.2f} GiB resident (peak RSS of this process, {device.type})"


def status_of_all_ranks(dataset: InternVLXDataset, trainer: InternVLXTrainer):
    """The per-row status of every process combined (elementwise max: a row any rank loaded counts once)."""
    import torch
    import torch.distributed as dist

    status = dataset._status
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    combined = status.to(trainer.accelerator.device, torch.int32)
    dist.all_reduce(combined, op=dist.ReduceOp.MAX)
    return combined.cpu().numpy()


def end_distributed() -> None:
    """Destroy torch.distributed's default process group after training (a no-op in a single process).

    Call it at the end of a torchrun script once nothing refers to the `TrainResult` any more, as `internvlx train`
    does. The DDP-wrapped model holds the group, so while it lives `destroy_process_group()` leaves the group's
    gloo worker threads running, and in interpreter teardown they can abort the process (SIGABRT, "terminate called
    without an active exception") after training has succeeded; accelerate's `end_training()` has the same gap.
    Default arguments hold groups too (`_release_default_arguments`). A DeepSpeed run's engine keeps its groups alive
    beyond this call (see `exit_if_gloo_threads_remain`).
    """
    import gc

    import torch.distributed as dist

    gc.collect()  # in case only reference cycles still hold the wrapped model
    if dist.is_available() and dist.is_initialized():
        _release_default_arguments(list(dist.distributed_c10d._world.pg_map))
        dist.destroy_process_group()


def _release_default_arguments(groups: list) -> None:
    """Point default arguments that hold one of ``groups`` at None.

    A default argument is evaluated when its module is imported: ``def barrier(self, group=GroupMember.WORLD)``
    (deepspeed.comm.torch's ``TorchBackend.barrier`` / ``monitored_barrier``; torch.distributed.nn.functional's
    collectives, imported with torch._dynamo) holds the default process group when the module is first imported
    while one exists, and keeps it, with its gloo threads, after `destroy_process_group()`. Where deepspeed is
    installed, a plain DDP run imports it during training, after the group is made. None is what those defaults
    hold when imported before any group exists (the default group, whichever it is then)."""
    import sys
    import types

    ids = {id(group) for group in groups}
    if not ids:
        return

    def release(function) -> None:  # only plain attribute reads: a module's __getattr__ can have side effects
        if isinstance(function, (classmethod, staticmethod)):
            function = function.__func__
        if not isinstance(function, types.FunctionType):
            return
        defaults = function.__defaults__
        if defaults and any(id(value) in ids for value in defaults):
            function.__defaults__ = tuple(None if id(value) in ids else value for value in defaults)
        keywords = function.__kwdefaults__
        if keywords and any(id(value) in ids for value in keywords.values()):
            function.__kwdefaults__ = {key: None if id(value) in ids else value for key, value in keywords.items()}

    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        for value in list(module.__dict__.values()):
            if isinstance(value, type):
                for member in list(value.__dict__.values()):
                    release(member)
            else:
                release(value)


def gloo_threads() -> list[str] | None:
    """Names of this process's gloo worker threads (Linux: /proc/self/task); None where they cannot be listed."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/comm", encoding="utf-8") as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [name for name in names if "gloo" in name]


def exit_if_gloo_threads_remain() -> None:
    """Leave the process now, status 0, when it is one of several launched ones (WORLD_SIZE > 1) and gloo worker
    threads outlived `end_distributed()`.

    After a DeepSpeed run, gloo threads outlive `end_distributed()` (DeepSpeed keeps its own process groups, e.g.
    ``deepspeed.utils.groups._WORLD_GROUP``, and clearing that one did not stop them), and they can abort the
    interpreter's teardown (SIGABRT after "Saved ...", seen in 1 of 8 ZeRO-3 runs here). Call it only when the
    work is done and written: logging is shut down and the standard streams flushed, then the process exits
    without that teardown.
    """
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not gloo_threads():  # launched by torchrun / accelerate only
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
