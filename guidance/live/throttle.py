"""Rate-limited logging: one line per kind of event at most every ``period_s``, with the
count of the events it stands for, so that a burst of bad messages cannot flood the log.

    limiter = ThrottledLog(logger, period_s=5.0)
    limiter.warning("malformed frame from 'sim'", reason)
    # first one: "malformed frame from 'sim': <reason>"
    # then, at most every 5 s: "malformed frame from 'sim': 9,999 more in the last 5.0 s (last: <reason>)"
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from guidance.core.errors import GuidanceError

__all__ = ["ThrottledLog"]

MAX_KEYS = 256
"""Distinct event keys remembered; beyond it the oldest key is forgotten (memory bounded)."""


@dataclass
class _Pending:
    window_start_s: float
    count: int = 0
    last_detail: str = ""


class ThrottledLog:
    """Logs the first event of each ``key`` at once, then a summary with counts at most
    every ``period_s`` seconds (monotonic clock; ``now_s`` may be given for tests)."""

    def __init__(self, logger: logging.Logger, period_s: float = 5.0) -> None:
        if not period_s > 0:
            raise GuidanceError(f"period_s must be positive, got {period_s!r}")
        self._logger = logger
        self.period_s = float(period_s)
        self._pending: dict[tuple[int, str], _Pending] = {}
        self.lines = 0
        """Lines written so far."""

    def warning(self, key: str, detail: str, now_s: float | None = None) -> None:
        self.log(logging.WARNING, key, detail, now_s)

    def log(self, level: int, key: str, detail: str, now_s: float | None = None) -> None:
        """Count one event ``key`` (e.g. "malformed frame from 'sim'") with its ``detail``."""
        now_s = time.monotonic() if now_s is None else now_s
        pending = self._pending.get((level, key))
        if pending is None:
            if len(self._pending) >= MAX_KEYS:
                self._pending.pop(next(iter(self._pending)))
            self._pending[(level, key)] = _Pending(now_s)
            self._emit(level, "%s: %s", key, detail)
            return
        pending.count += 1
        pending.last_detail = detail
        self.flush(now_s)

    def flush(self, now_s: float | None = None) -> None:
        """Write the summaries whose period has ended."""
        now_s = time.monotonic() if now_s is None else now_s
        for (level, key), pending in self._pending.items():
            elapsed_s = now_s - pending.window_start_s
            if pending.count and elapsed_s >= self.period_s:
                self._emit(level, "%s: %s more in the last %.1f s (last: %s)", key, f"{pending.count:,}",
                           elapsed_s, pending.last_detail)
                pending.count = 0
                pending.window_start_s = now_s

    def _emit(self, level: int, fmt: str, *args: object) -> None:
        self._logger.log(level, fmt, *args)
        self.lines += 1
