"""Time budgets of calls, so that a slow, stalled or hostile peer cannot hold the server.

* :class:`CallLimits`: every push has a receive budget (``floor`` seconds plus its announced
  bytes at ``min_rate``) and a longest silence (``stall``); a push being received holds no other
  push up (each is received into a buffer set of its own). A gRPC pull reply gets the same kind
  of send budget, and a pull waits for a version at most ``max_wait`` seconds. The bulk
  channel's hello must arrive within ``hello_timeout``.
* :class:`TimedSocket`: a socket whose reads share one deadline (bulk channel pushes, hellos).
* :class:`Watchdog`: one thread that cancels gRPC calls past their budget or silent too long
  (the sync gRPC server has no read timeout; a handler blocked on a stream cannot look at a
  clock, but ``context.cancel()`` from another thread wakes it).

No grpc import here: the watchdog only calls the ``cancel`` it is given.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adamax_server.coordination.policy import ReceiveProgress

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallLimits:
    """Budgets of data calls (see the module docstring); every field is in seconds but ``min_rate``."""

    floor: float = 30.0  # every push (and pull reply) gets this long, whatever its size ...
    min_rate: float = float(1 << 20)  # ... plus its bytes at this many bytes/s
    stall: float = 30.0  # longest silence inside a call
    max_wait: float = 600.0  # longest wait of a pull for a weights version (clients without a deadline)
    hello_timeout: float = 3.0  # a bulk connection must present its ticket this soon

    def __post_init__(self) -> None:
        for name in ("floor", "min_rate", "stall", "max_wait", "hello_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a positive finite number. Received: {name}={value!r}")

    def budget(self, nbytes: int) -> float:
        """Seconds a call moving ``nbytes`` may take in all."""
        return self.floor + max(nbytes, 0) / self.min_rate

    def progress(self, cancel: Callable[[], None] | None = None) -> ReceiveProgress:
        return ReceiveProgress(min_rate=self.min_rate, cancel=cancel)


class TimedSocket:
    """Reads of ``sock`` bounded by one overall ``deadline`` and by ``stall`` per read.

    A peer that sends one byte every few seconds passes any per-read timeout; the deadline
    bounds the whole exchange. Reads past it raise ``TimeoutError`` (an ``OSError``). The bytes
    read are counted into ``progress``. Everything else is the plain socket's.
    """

    def __init__(self, sock: socket.socket, deadline: float, stall: float, progress: ReceiveProgress | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.stall = stall
        self.progress = progress

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the call ran past its time budget")
        want = min(remaining, self.stall)
        if self.sock.gettimeout() != want:  # (settimeout is a system call; a TLS read is one 16 KB record)
            self.sock.settimeout(want)
        got = self.sock.recv_into(buffer, nbytes)
        if self.progress is not None:
            self.progress.add(got)
        return got

    def sendall(self, data: Any) -> None:
        self.sock.settimeout(self.stall)
        self.sock.sendall(data)


class Watch:
    """One watched call: cancelled once past ``deadline`` or silent for ``stall`` seconds."""

    __slots__ = ("start", "deadline", "stall", "last", "cancel", "fired", "announced", "limits", "what")

    def __init__(self, cancel: Callable[[], None], limits: CallLimits, nbytes: int = 0, what: str = "a call") -> None:
        now = time.monotonic()
        self.what = what
        self.start = self.last = now
        self.limits = limits
        self.announced = nbytes
        self.deadline = now + limits.budget(nbytes)
        self.stall = limits.stall
        self.cancel = cancel
        self.fired = ""

    def touch(self) -> None:
        """Something moved (a frame arrived, a reply frame was taken by the transport)."""
        self.last = time.monotonic()

    def announce(self, nbytes: int) -> None:
        """``nbytes`` more are coming: the budget grows by their time at ``min_rate``."""
        self.announced += max(nbytes, 0)
        self.deadline = self.start + self.limits.budget(self.announced)


class Watchdog:
    """Cancels watched calls past their budget; one daemon thread, while there are calls to watch."""

    def __init__(self, tick: float = 0.25) -> None:
        self._tick = tick
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # calls cancelled so far (tests, logs)

    def watch(self, cancel: Callable[[], None], limits: CallLimits, nbytes: int = 0, what: str = "a call") -> Watch:
        """Watch a call; ``what`` names it in the log line when it is cut ("a push from ipv4:...")."""
        watch = Watch(cancel, limits, nbytes, what)
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="adamax-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def done(self, watch: Watch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._watches:
                    self._cond.wait(5.0)
                    if not self._watches:  # idle: the next watch starts a new thread
                        self._thread = None
                        return
                tick = min(self._tick, *(w.stall / 4 for w in self._watches))
                self._cond.wait(max(tick, 0.01))
                now = time.monotonic()
                due = []
                for w in list(self._watches):
                    if now > w.deadline:
                        w.fired = (f"it ran past its budget of {w.deadline - w.start:.3g} s (--call-floor-seconds plus "
                                   "its size at --min-transfer-mib)")  # fmt: skip
                    elif now - w.last > w.stall:
                        w.fired = f"nothing moved for {w.stall:.3g} s (--stall-seconds)"
                    else:
                        continue
                    self._watches.discard(w)
                    due.append(w)
                self.cancelled += len(due)
            for w in due:  # outside the lock: cancel may call back into gRPC
                _log.warning("cut %s: %s", w.what, w.fired)
                try:
                    w.cancel()
                except Exception:  # noqa: BLE001 - the call may have ended meanwhile
                    pass
