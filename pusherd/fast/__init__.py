"""Every place pusherd reaches into Tornado's internals, fenced in one package, and the switches.

Everything outside this package uses Tornado's public API only (pusherd/transports/). In here:

- the optional speed-ups, on by default, off with ``PUSHERD_FAST=0`` (the bytes on the wire are
  the same either way; tests/transport/test_transport_contract.py runs both):
  `direct` (fan-out and replies written straight to the sockets, a bounded coalescing outbox),
  `websocket` (the WebSocket handler that uses them, reads the frames clients send its own way,
  and trims an open socket's memory: `lean`), `front` (publisher connections answered outside
  Tornado's HTTP server, parsed by `http1`), `upgrade` (the WebSocket upgrades pusherd accepts,
  completed on the front) and `frontsocket` (the sockets they become: pusherd's own, no Tornado
  handler or stream), `gc` (the garbage collector kept off the long-lived sockets);
- `listener`: the HTTP server's own limits that Tornado's public API cannot express (the
  ``max_http_connections`` cap, held by pausing its accept in a storm, a 431 for an oversized head, nothing executed after
  ``Connection: close``, one header timeout across the front's hand-over). Always on.

Each module names the Tornado releases it was checked against: `CHECKED_TORNADO`, the range
setup.cfg pins and .ci/run tests at both ends. tests/unit/fast/test_tornado_internals.py fails
when an internal these modules rely on is not where they expect it.
"""

import asyncio
import logging
import os
from typing import Callable, Mapping, Optional

log = logging.getLogger("pusherd")

#: The lowest and the highest Tornado release every module here was checked against.
CHECKED_TORNADO = ("6.5.3", "6.6.1")


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``PUSHERD_FAST``: ``1`` (default) turns the speed-ups on, ``0`` leaves Tornado's own paths."""
    return environ.get("PUSHERD_FAST", "1").strip().lower() not in ("0", "false", "no", "off")


def loop_factory(environ: Mapping[str, str] = os.environ) -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """``PUSHERD_LOOP``: ``auto`` (default: uvloop when the ``fast`` extra installed it),
    ``uvloop``, ``asyncio``. The event loop to run on, or None for asyncio's default."""
    choice = environ.get("PUSHERD_LOOP", "auto").strip().lower() or "auto"
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            log.warning("PUSHERD_LOOP=uvloop but uvloop is not installed; using asyncio")
        return None
    return uvloop.new_event_loop
