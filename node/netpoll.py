"""pynetdicom's reactor threads, made to rest when their association is quiet.

pynetdicom 3.0 runs every association as polling threads: the DUL thread wakes every
1 ms (``DULServiceProvider._run_loop_delay``) to look at the socket and its queues,
and an acceptor's association thread wakes every 1 ms (a literal ``time.sleep(0.001)``
in ``Association._run_reactor``) to look for a decoded DIMSE message.  An association
that stays open with nothing on it, as a PACS keeps its associations open between
studies (Orthanc for 5 s after each send, ``DicomAssociationCloseDelay``), cost the node
~7 % of a core each, and ten of them more than half a core, beside the models
(``bench/idle.py``; DCMTK's ``storescp`` holding the same associations: ~0 %).  That
delay is pynetdicom's trade-off between idle CPU and latency (pydicom/pynetdicom#650).

:func:`install` keeps pynetdicom's 1 ms while an association has traffic.  Once it
has received nothing for a while, a reactor thread waits instead of sleeping, for what
its poll looks for — the DUL thread for a PDU on its socket (in data transfer), the
acceptor's association thread for a decoded DIMSE message on its queue — for at most a
tenth of the quiet spell so far and never more than :data:`MAX_SLEEP`.  A quiet
association then wakes each thread ~50 times a second instead of 1000, and the next
PDU is still read as it arrives (a C-ECHO on a quiet association takes as long as
before).  What the waits do not watch (a local request to send on a quiet
association, a release, the timers) is seen within 20 ms.  Only those two 1 ms sleeps
of the reactor threads change; every other sleep of pynetdicom, and every other
thread, is untouched.  ``tests/test_node.py`` checks that the pinned pynetdicom still
sleeps where this expects it to.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul

REACTOR_SLEEP = 0.001
"""The reactor sleep pynetdicom 3.0 uses between polls, seconds."""

MAX_SLEEP = 0.020
"""Longest poll interval of a quiet association, seconds."""

QUIET_FRACTION = 0.1
"""A reactor sleeps this share of the time its association has been quiet."""


def reactor_sleep(quiet_seconds: float) -> float:
    """The poll interval of a reactor whose association has been quiet that long."""
    return min(MAX_SLEEP, max(REACTOR_SLEEP, QUIET_FRACTION * quiet_seconds))


def _dul(thread: threading.Thread) -> Any:
    return thread if isinstance(thread, pynetdicom.dul.DULServiceProvider) else getattr(thread, "dul", None)


def _quiet_seconds(thread: threading.Thread) -> float | None:
    """Seconds since the association of a reactor thread last received a PDU."""
    start = getattr(getattr(_dul(thread), "_idle_timer", None), "_start_time", None)
    return None if start is None else max(0.0, time.time() - start)


def _wait_for_socket(dul: Any, seconds: float) -> None:
    """What a DUL thread polls for in data transfer (Sta6) is a PDU on its socket: wait
    for one, or ``seconds``.  In any other state (connecting, negotiating, releasing,
    closed) it sleeps ``seconds``: a socket there may read as ready with nothing the
    reactor will take off it, and waiting on it would spin."""
    assoc_socket = getattr(dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    state = getattr(getattr(dul, "state_machine", None), "current_state", None)
    if sock is None or state != "Sta6" or not getattr(assoc_socket, "_is_connected", False):
        time.sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes already buffered: the reactor reads them now
    try:
        select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed under us: the reactor finds out on its next poll
        pass


def _wait_for_message(assoc: Any, seconds: float) -> None:
    """What an acceptor's association thread polls for is a decoded DIMSE message: wait
    for one on the DIMSE queue (the DUL thread puts it there), or ``seconds``."""
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if q is None:
        time.sleep(seconds)
        return
    with q.not_empty:
        if not q.queue:
            q.not_empty.wait(seconds)
        if q.queue:
            # A put wakes one waiter.  A requestor's own thread may be waiting in
            # ``Queue.get`` for its response on the same condition (``send_c_store``
            # while the reactor slipped past its pause): hand the wake-up on, or that
            # thread would sleep until its DIMSE timeout.
            q.not_empty.notify()


class _ReactorTime(ModuleType):
    """The ``time`` module as one pynetdicom module sees it: the same, except that the
    1 ms poll of that module's reactor thread, once its association is quiet, becomes
    a wait of up to :func:`reactor_sleep` for what the poll looks for."""

    def __init__(self, reactor: type[threading.Thread], wait: Callable[[Any, float], None]) -> None:
        super().__init__("time", f"time, with the polls of {reactor.__name__} made adaptive")
        self._reactor = reactor
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if seconds == REACTOR_SLEEP and isinstance(thread, self._reactor):
            quiet = _quiet_seconds(thread)
            wait = REACTOR_SLEEP if quiet is None else reactor_sleep(quiet)
            if wait > REACTOR_SLEEP:
                self._wait(thread, wait)
                return
        time.sleep(seconds)


_REACTORS: tuple[tuple[ModuleType, type[threading.Thread], Callable[[Any, float], None]], ...] = (
    (pynetdicom.dul, pynetdicom.dul.DULServiceProvider, _wait_for_socket),
    (pynetdicom.association, pynetdicom.association.Association, _wait_for_message),
)


def install() -> None:
    """Make pynetdicom's reactor polls adaptive in this process (idempotent)."""
    for module, reactor, wait in _REACTORS:
        if not isinstance(module.time, _ReactorTime):  # type: ignore[attr-defined]
            module.time = _ReactorTime(reactor, wait)  # type: ignore[attr-defined]


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return all(isinstance(m.time, _ReactorTime) for m, _, _ in _REACTORS)  # type: ignore[attr-defined]
