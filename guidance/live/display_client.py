"""The display client's loop: SUB frames (from the C-arm / simulator) and results (from
the pipeline), keep the navigation state and draw the screen at a fixed refresh rate.

Each endpoint has its own subscriber with only the kinds that belong there: frames and
the source's heartbeats from the frame endpoint, poses, instruments and the pipeline's
heartbeats from the result endpoint, so a process squatting on the frame port cannot
inject poses. With CURVE keys each subscriber talks only to the holder of the expected
role's key ("sim", "pipeline"); poses and instruments must also name ``expected_source``.
The screen logic (STALE by data age, INVALID when registration failed, heartbeat loss)
lives in guidance.live.display; this module only moves messages into it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from guidance.live.display import NavigationState, compose_screen
from guidance.live.keys import CurveKeys
from guidance.live.transport import DEFAULT_MAX_FRAME_PX, Subscriber, max_message_bytes
from guidance.core.stop import Stop
from guidance.core.volume import Volume
from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult, TargetPose

__all__ = ["run_display"]

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_SCREEN = 256
"""Messages read between two screens at most (bounded work per loop)."""


def run_display(
    *,
    frame_endpoint: str,
    result_endpoint: str,
    ct: Volume,
    plan: list | dict | None,
    sink,
    stop: Stop,
    labels: Volume | None = None,
    refresh_hz: float = 10.0,
    size: tuple[int, int] = (1280, 720),
    stale_after_s: float = 0.5,
    keys: CurveKeys | None = None,
    expected_source: str = "pipeline",
    max_frame_px: int = DEFAULT_MAX_FRAME_PX,
    on_screen: Callable[[str, float], None] | None = None,
) -> dict:
    """Show screens on ``sink`` (``HeadlessWriter`` or ``WindowSink``) until ``stop`` is set
    or the sink asks to quit; returns counts of screens and of each status shown, and of
    the messages dropped (malformed, replayed) or ignored (another publisher).
    ``on_screen(status, now_s)`` observes each screen shown (benchmarks)."""
    state = NavigationState(stale_after_s=stale_after_s, expected_source=expected_source)
    frames = results = None
    shown: dict[str, int] = {}
    try:
        frames = Subscriber(frame_endpoint, topics=("frame", "heartbeat"), keys=keys, server_role="sim",
                            max_message_bytes=max_message_bytes(max_frame_px))
        results = Subscriber(result_endpoint, topics=("pose_result", "instrument_state", "target_pose", "heartbeat"),
                             rcvhwm=64, keys=keys, server_role="pipeline")
        period_s = 1.0 / refresh_hz
        next_screen = time.monotonic()
        while not stop.is_set() and not getattr(sink, "quit_requested", False):
            msg = results.recv(max(0.0, next_screen - time.monotonic()))
            count = 0
            while msg is not None and count < MAX_MESSAGES_PER_SCREEN:
                _take(state, msg, time.time())
                msg, count = results.recv(0.0), count + 1
            for msg in frames.recv_latest(0.0).values():
                _take(state, msg, time.time())
            if time.monotonic() >= next_screen:
                now_s = time.time()
                status = state.status(now_s)
                shown[status] = shown.get(status, 0) + 1
                sink.show(compose_screen(state, ct, plan, now_s, size=size, labels=labels))
                if on_screen is not None:
                    on_screen(status, now_s)
                next_screen += period_s
                if next_screen < time.monotonic():
                    next_screen = time.monotonic() + period_s
    finally:
        for sub in (frames, results):
            if sub is not None:
                sub.close()
        sink.close()
    subs = [s for s in (frames, results) if s is not None]
    return {"screens": sum(shown.values()), "status_counts": shown,
            "malformed": sum(s.malformed for s in subs), "replayed": sum(s.replayed for s in subs),
            "ignored": state.ignored}


def _take(state: NavigationState, msg, now_s: float) -> None:
    if isinstance(msg, Frame):
        state.on_frame(msg, now_s)
    elif isinstance(msg, PoseResult):
        state.on_pose(msg, now_s)
    elif isinstance(msg, InstrumentState):
        state.on_instrument(msg, now_s)
    elif isinstance(msg, TargetPose):
        state.on_target(msg, now_s)
    elif isinstance(msg, Heartbeat):
        state.on_heartbeat(msg, now_s)
