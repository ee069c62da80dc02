"""Connection-level bounds of `internvlx serve`: uvicorn's h11 protocol with a request deadline and a cap on open
connections (`ConnectionLimits`, `bounded_protocol`).

uvicorn holds an idle or slow connection for ever: it has no deadline for a request's headers or body, and no bound
on open connections. 1,100 connections that send nothing, with the open-file limit at 1024, made ``/health`` stop
answering and filled the log with "Too many open files" (issue 58). Here:

- **a request deadline**: a request's headers and body must arrive within ``request_timeout`` seconds of its first
  byte (of the connection, for the first request); a connection still sending then is closed (slowloris);
- **a cap on open connections** (``max_connections``, from the open-file limit): a connection beyond it closes the
  oldest connection that is not being answered (silent, sending a request, or idle between requests), or, when every
  connection is being answered, is closed itself, so that the process never runs out of descriptors and a new
  client (a health check) is served;
- a listen backlog of `limits.ACCEPT_BACKLOG` (uvicorn's is 2048): the event loop accepts a backlog's worth of
  connections at once before the cap sees them, so a burst stays within the descriptors the cap keeps free;
- uvicorn's own keep-alive timeout (``keep_alive_timeout``) closes a connection idle between requests, and h11
  refuses headers over 16 KiB (its ``max_incomplete_event_size``).

This module imports uvicorn and h11: `app.run_app` imports it.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ConnectionLimits


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the request deadline and the connection cap of the module. Its subclasses made by
    `bounded_protocol` carry the limits and the server's open connections (oldest first)."""

    request_timeout: float = 60.0
    max_connections: int = 1024
    open_connections: dict = {}

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self.open_connections[self] = None
        self._start_deadline()
        if len(self.open_connections) > self.max_connections:
            dropped = next((connection for connection in self.open_connections
                            if connection is not self and not connection._answering()), self)
            dropped._close()

    def connection_lost(self, exc) -> None:
        self.open_connections.pop(self, None)
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and not self._answering():  # the first bytes of the next request
            self._start_deadline()
        super().data_received(data)
        if self.conn.their_state is h11.DONE:  # the request is in: its deadline is met
            self._cancel_deadline()

    def _answering(self) -> bool:
        """Whether a request of this connection is in (or being read) and not yet answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.request_timeout, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.conn.their_state is not h11.DONE:
            self._close()

    def _close(self) -> None:
        self.open_connections.pop(self, None)
        self._cancel_deadline()
        if not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """A `BoundedH11Protocol` subclass for one server (uvicorn's ``http=``): its limits, its own open connections."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {
        "request_timeout": limits.request_timeout, "max_connections": limits.max_connections,
        "open_connections": {}})


__all__ = ["BoundedH11Protocol", "bounded_protocol"]
