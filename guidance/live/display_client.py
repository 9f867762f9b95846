"""The display client's loop: SUB frames (from the C-arm / simulator) and results (from
the pipeline), keep the navigation state and draw the screen at a fixed refresh rate.

The screen logic (STALE after 0.5 s without a pose, INVALID when registration failed)
lives in guidance.live.display; this module only moves messages into it.
"""

from __future__ import annotations

import logging
import threading
import time

from guidance.live.display import NavigationState, compose_screen
from guidance.live.transport import HeartbeatMonitor, Subscriber
from guidance.core.volume import Volume
from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult, TargetPose

__all__ = ["run_display"]

log = logging.getLogger(__name__)


def run_display(
    *,
    frame_endpoint: str,
    result_endpoint: str,
    ct: Volume,
    plan: list | dict | None,
    sink,
    stop: threading.Event,
    labels: Volume | None = None,
    refresh_hz: float = 10.0,
    size: tuple[int, int] = (1280, 720),
    stale_after_s: float = 0.5,
) -> dict:
    """Show screens on ``sink`` (``HeadlessWriter`` or ``WindowSink``) until ``stop`` is set
    or the sink asks to quit; returns counts of screens and of each status shown."""
    state = NavigationState(stale_after_s=stale_after_s)
    heartbeats = HeartbeatMonitor(timeout_s=2.0)
    sub = Subscriber([frame_endpoint, result_endpoint],
                     topics=("frame", "pose_result", "instrument_state", "target_pose", "heartbeat"))
    shown: dict[str, int] = {}
    period_s = 1.0 / refresh_hz
    next_screen = time.monotonic()
    try:
        while not stop.is_set() and not getattr(sink, "quit_requested", False):
            msg = sub.recv(max(0.0, next_screen - time.monotonic()))
            now_s = time.time()
            if isinstance(msg, Frame):
                state.on_frame(msg, now_s)
            elif isinstance(msg, PoseResult):
                state.on_pose(msg, now_s)
            elif isinstance(msg, InstrumentState):
                state.on_instrument(msg, now_s)
            elif isinstance(msg, TargetPose):
                state.on_target(msg, now_s)
            elif isinstance(msg, Heartbeat):
                heartbeats.update(msg)
            if time.monotonic() >= next_screen:
                status = state.status(now_s)
                shown[status] = shown.get(status, 0) + 1
                sink.show(compose_screen(state, ct, plan, now_s, size=size, labels=labels))
                next_screen += period_s
                if next_screen < time.monotonic():
                    next_screen = time.monotonic() + period_s
    finally:
        sub.close()
        sink.close()
    return {"screens": sum(shown.values()), "status_counts": shown, "malformed": sub.malformed}
