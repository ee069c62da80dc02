"""Token-level time slicing: the generations admitted at once take turns on the model, a few tokens each.

transformers' server runs every ``generate`` to its end on one inference thread, so a 2-token request behind a
3,800-token one waits for all 3,800 tokens however the waiting requests are ordered (`queue.GenerationQueue` only
picks who goes next). Here each generation the queue admits (at most ``--max-active-generations``) runs
``generate`` on its own thread, and the threads share a `RoundRobinLock`: only its holder runs the model (the prefill
included); once it made ``--generation-slice`` new tokens and goes on to the next (`SliceTurns`, a logits processor,
which ``generate`` calls once per step, after the model's forward) the holder hands the lock to the next generation
waiting for it, round robin, and waits for its next turn. A short request admitted beside long ones so waits at most
one slice of each per token slice of its own, not for their whole answers, and not once more after its last token.
A generation keeps its KV cache while it waits for its turn: that memory is what ``--max-active-generations``
bounds.

Only the holder runs the model, so the model is never used by two threads at once; nothing a generation keeps
between its steps may live on the model object, and nothing does: InternVL-X's LVTC state lives in the
generation's cache (`modeling.lvtc`), transformers' ``generate`` keeps its own in locals (its reuse of a static
cache on the model, ``model._cache``, needs ``cache_implementation="static"``, which the server does not set), and
the server does not compile the model (``torch.compile``'s CUDA graphs keep per-thread state: transformers runs
every generation on one thread for them). A request whose client disconnects from its stream, or whose task is
cancelled (a non-streaming one's), cancels its turn: waiting for the lock, it leaves at once; holding it, its
generation stops at its next token (`SliceCriteria`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from concurrent.futures import Future

from transformers.cli.serving.utils import GenerateManager


class Turn:
    """One generation's place at the `RoundRobinLock`; ``cancelled`` once its client went away."""

    _names = itertools.count(1)

    def __init__(self):
        self.name = f"internvlx-generate-{next(self._names)}"
        self.cancelled = False


class RoundRobinLock:
    """Who runs the model now: one `Turn` holds the lock, the others wait for it in arrival order (round robin)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._holder: Turn | None = None
        self._waiting: collections.deque[Turn] = collections.deque()

    def take(self, turn: Turn) -> bool:
        """Block until ``turn`` holds the lock (True), or until it is cancelled while waiting (False)."""
        with self._changed:
            self._waiting.append(turn)
            if self._holder is None:
                self._hand_on()
            return self._wait_for(turn)

    def pass_if_waited_for(self, turn: Turn) -> bool:
        """The holder's slice ended: if another generation waits, hand it the lock and block until ``turn``'s next
        turn. True while ``turn`` should go on, False once it was cancelled."""
        with self._changed:
            if turn.cancelled:
                return False
            if not self._waiting or self._holder is not turn:
                return True
            self._waiting.append(turn)
            self._hand_on()
            return self._wait_for(turn)

    def give_back(self, turn: Turn) -> None:
        """``turn``'s generation ended (or never started): the lock goes to the next one waiting."""
        with self._changed:
            if self._holder is turn:
                self._hand_on()
            elif turn in self._waiting:
                self._waiting.remove(turn)

    def cancel(self, turn: Turn) -> None:
        """``turn``'s client went away: stop waiting for the lock (its generation then ends at once)."""
        with self._changed:
            turn.cancelled = True
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _hand_on(self) -> None:
        self._holder = self._waiting.popleft() if self._waiting else None
        self._changed.notify_all()

    def _wait_for(self, turn: Turn) -> bool:
        self._changed.wait_for(lambda: self._holder is turn or turn.cancelled)
        if self._holder is turn:
            return True
        self._waiting.remove(turn)
        return False


class SliceTurns:
    """A ``generate`` logits processor that leaves the scores as they are: every ``tokens`` new tokens, as the
    generation goes on to the next one, it hands the lock on (`RoundRobinLock.pass_if_waited_for`) and returns when the
    generation's turn comes back.

    Not a stopping criterion: those run at the end of a step, beside the ones that end the generation there
    (``max_new_tokens``, EOS, stop strings, the deadline), and cannot know whether it goes on; one that handed the
    lock on at a generation's last token would make it wait one more round of every running generation for nothing.
    ``generate`` calls logits processors only on a step that runs, after its forward (there is no hook before it):
    the holder runs that forward with the lock, then hands it on before choosing the token."""

    def __init__(self, model_lock: RoundRobinLock, turn: Turn, tokens: int):
        self.model_lock, self.turn, self.tokens = model_lock, turn, tokens
        self.steps = 0

    def __call__(self, input_ids, scores):
        if self.steps and self.steps % self.tokens == 0:
            self.model_lock.pass_if_waited_for(self.turn)  # cancelled while waiting: `SliceCriteria` stops this step
        self.steps += 1
        return scores


class SliceCriteria:
    """A ``generate`` stopping criterion: it stops the generation once its client went away (its turn cancelled)."""

    def __init__(self, turn: Turn):
        self.turn = turn

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.turn.cancelled, dtype=torch.bool, device=input_ids.device)


class SlicedGeneration(GenerateManager):
    """One request's generation on a thread of its own, run while it holds the `RoundRobinLock`: transformers'
    ``generate_streaming`` / ``generate_non_streaming`` (inherited, unchanged) hand their work to ``submit`` /
    ``async_submit``, which run it here instead of on transformers' one inference thread. ``on_end`` is called on
    that thread once the generation ended (or was cancelled before it started), after the lock was passed on."""

    def __init__(self, model_lock: RoundRobinLock, turn: Turn, on_end):
        # No GenerateManager.__init__: its one shared inference thread is what this replaces.
        self.model_lock, self.turn, self.on_end = model_lock, turn, on_end
        self.started = False

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self.started = True

        def run() -> None:
            try:
                if not self.model_lock.take(self.turn):
                    future.cancel()
                elif future.set_running_or_notify_cancel():  # (once running, the caller can no longer cancel it)
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as error:  # handed to the caller, as transformers' inference thread does
                        future.set_exception(error)
            finally:
                self.model_lock.give_back(self.turn)
                self.on_end()

        threading.Thread(target=run, name=self.turn.name, daemon=True).start()
        return future

    def async_submit(self, fn, *args, **kwargs) -> asyncio.Future:
        future = asyncio.wrap_future(self.submit(fn, *args, **kwargs), loop=asyncio.get_running_loop())
        # A non-streaming request awaits this. Cancelling it cancels the thread's future, which the thread, blocked
        # in `RoundRobinLock.take`, would see only once its turn came (its running slot held until then), and a running
        # generation not at all.
        future.add_done_callback(lambda done: done.cancelled() and self.model_lock.cancel(self.turn))
        return future

    def generate_streaming(self, *args, **kwargs):
        queue, streamer = super().generate_streaming(*args, **kwargs)
        cancel = streamer.cancel

        def cancel_and_leave() -> None:  # transformers calls it when the client of the stream went away
            cancel()
            self.model_lock.cancel(self.turn)

        streamer.cancel = cancel_and_leave
        return queue, streamer

    def stop(self) -> None:
        pass


__all__ = ["RoundRobinLock", "SliceCriteria", "SliceTurns", "SlicedGeneration", "Turn"]
