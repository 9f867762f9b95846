"""A stop request that a signal handler may set: how the CLI's SIGINT/SIGTERM end the live loops.

Why not ``threading.Event``: a Python signal handler runs in the main thread between two
bytecodes. When it interrupts that thread inside ``Event.wait`` (which holds the Event's
lock), its ``Event.set`` waits for that lock forever: a supervisor hung so after SIGTERM.
``StopFlag`` takes no lock; ``set`` assigns a bool and ``wait`` polls it.
"""

from __future__ import annotations

import threading
import time

__all__ = ["POLL_S", "Stop", "StopFlag"]

POLL_S = 0.02
"""How often a waiting thread looks at the flag: the longest delay between ``set`` and a
waiter's return."""


class StopFlag:
    """``threading.Event``'s ``set`` / ``is_set`` / ``wait``, safe to ``set`` from a signal handler."""

    def __init__(self) -> None:
        self._requested = False

    def set(self) -> None:
        """Request the stop (no lock: callable from a signal handler)."""
        self._requested = True

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the stop is requested or ``timeout`` seconds have passed (None: no
        limit); whether it was requested. Returns within ``POLL_S`` of the request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._requested:
            remaining_s = POLL_S if deadline is None else deadline - time.monotonic()
            if remaining_s <= 0:
                break
            time.sleep(min(POLL_S, remaining_s))
        return self._requested


Stop = threading.Event | StopFlag
"""What the live loops accept as their stop request."""
