"""The navigation screen: registered fluoroscopy with overlays and CT reslices at the tip.

A library module without sockets: the pipeline or CLI feeds ``NavigationState`` the
decoded messages (``guidance.live.wire`` Frame, PoseResult, InstrumentState) with their
arrival times, ``compose_screen`` draws a BGR uint8 screen from it, and a sink shows it
(``WindowSink``) or writes it as PNG files (``HeadlessWriter``).

Safety rule: a pose is current only while the data behind it is fresh. When the frame
the latest pose was computed from was acquired more than ``stale_after_s`` ago (data
age, not arrival time: a late or replayed pose is old however recently it arrived) the
screen says STALE, after a failed registration INVALID, and in either case (and before
the first pose) nothing that depends on the pose is drawn: no overlay on the
fluoroscopy and no instrument. Poses and instruments from any publisher other than
``expected_source`` are ignored (counted). A pose is drawn over the frame it was
computed from (the caption says so when a newer frame exists); the status bar shows the
frame rate (decaying when frames stop), NO FRAMES, and the pipeline's heartbeat state
or its loss. The plan and the CT, both in CT coordinates, stay on screen.

CT reslices use radiological display orientation (world = LPS mm): axial seen from the
feet (patient's left on screen right, anterior up), sagittal with anterior on the left
and the head up, coronal seen from the front (patient's left on screen right, head up).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy.ndimage import map_coordinates

from guidance.core.geometry import invert_rigid
from guidance.core.instrument_models import INSTRUMENTS
from guidance.core.plan import plan_trajectories, trajectory_endpoints
from guidance.navigation.instruments import deviation_from_plan, nearest_trajectory
from guidance.navigation.overlay import (
    COLOURS,
    draw_instrument,
    draw_outline,
    draw_status,
    draw_trajectories,
    put_text,
    status_bar_height,
    to_display_bgr,
)
from guidance.core.views import View
from guidance.core.volume import Volume

if TYPE_CHECKING:
    from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult

__all__ = [
    "STALE_AFTER_S",
    "RESLICE_AXES",
    "FrameRecord",
    "PoseRecord",
    "InstrumentRecord",
    "NavigationState",
    "reslice",
    "screen_layout",
    "compose_screen",
    "HeadlessWriter",
    "WindowSink",
]

log = logging.getLogger(__name__)

STALE_AFTER_S = 0.5
HEARTBEAT_TIMEOUT_S = 1.5
"""The pipeline counts as lost after this long without a heartbeat (it beats every 0.5 s)."""
NO_FRAMES_AFTER_S = 1.0
FUTURE_TOLERANCE_S = 1.0
"""Data stamped further in the future than this (clock error or forgery) is not current."""
DEFAULT_SHAFT_MM = 100.0
# Screen direction of +u (right) and +v (down) of each reslice, in world LPS.
RESLICE_AXES = {
    "axial": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    "sagittal": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "coronal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
}
# Patient direction at the left, right, top and bottom edge of each reslice.
_EDGE_LETTERS = {"axial": "RLAP", "sagittal": "APSI", "coronal": "RLSI"}
# (good, acceptable) limits of the distance (mm) and angle (deg) to the plan.
_DISTANCE_LIMITS_MM = (2.0, 4.0)
_ANGLE_LIMITS_DEG = (5.0, 10.0)
_STATUS_LINES = 2
_GRID = (70, 70, 70)


@dataclass(frozen=True)
class FrameRecord:
    """An X-ray frame: pixels [v, u], its calibrated (unregistered) view, acquisition
    and arrival times (s, epoch)."""

    frame_id: int
    pixels: np.ndarray
    view: View
    received_s: float
    acquired_s: float = 0.0


@dataclass(frozen=True)
class PoseRecord:
    """The latest registration result. ``latency_ms``: the pipeline's "total" stage (or
    the sum of its stages); ``end_to_end_ms``: receipt time minus frame acquisition."""

    frame_id: int
    status: str
    reason: str
    confidence: float
    levels: tuple[str, ...]
    T_world_corrected_from_world: np.ndarray | None
    latency_ms: float | None
    end_to_end_ms: float | None
    received_s: float
    acquired_s: float = 0.0
    """Acquisition time of the frame behind the pose (s, epoch; 0: unknown)."""
    source: str = ""


@dataclass(frozen=True)
class InstrumentRecord:
    """The latest instrument state in CT coordinates; ``axis_world`` points to the tip."""

    tool_id: str
    tip_world: np.ndarray
    axis_world: np.ndarray
    status: str
    plan_level: str | None
    plan_side: str | None
    received_s: float
    acquired_s: float = 0.0

    @property
    def length_mm(self) -> float:
        """Shaft length to draw: the registered model's, else a nominal 100 mm."""
        model = INSTRUMENTS.get(self.tool_id)
        return model.length_mm if model is not None else DEFAULT_SHAFT_MM


class NavigationState:
    """The latest frames, pose, instrument state and pipeline heartbeat, with their
    arrival times (seconds, ``time.time()`` epoch, given by the caller so that tests need
    no sleeping).

    ``expected_source``: the publisher id whose poses and instruments are taken (None:
    any); ``frames_kept``: recent frames kept so that a pose is drawn over its own frame.
    """

    def __init__(self, *, stale_after_s: float = STALE_AFTER_S, fps_window_s: float = 2.0,
                 expected_source: str | None = None, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
                 no_frames_after_s: float = NO_FRAMES_AFTER_S, frames_kept: int = 8) -> None:
        if stale_after_s <= 0 or fps_window_s <= 0 or heartbeat_timeout_s <= 0:
            raise ValueError("stale_after_s, fps_window_s and heartbeat_timeout_s must be positive")
        self.stale_after_s = float(stale_after_s)
        self.fps_window_s = float(fps_window_s)
        self.expected_source = expected_source
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.no_frames_after_s = float(no_frames_after_s)
        self.frame: FrameRecord | None = None
        self.pose: PoseRecord | None = None
        self.instrument: InstrumentRecord | None = None
        self.pipeline_state: str | None = None
        self.pipeline_seen_s: float | None = None
        self.ignored = 0
        """Poses, instruments and heartbeats ignored: not from ``expected_source``."""
        self._frames: deque[FrameRecord] = deque(maxlen=max(1, frames_kept))
        self._frame_times: deque[float] = deque(maxlen=1024)
        self._first_frame_s: float | None = None

    def _expected(self, source: str) -> bool:
        if self.expected_source is None or source == self.expected_source:
            return True
        self.ignored += 1
        return False

    def on_frame(self, frame: Frame, now_s: float) -> None:
        """Take a frame (``guidance.live.wire.Frame`` or anything with frame_id, pixels, view)."""
        acquired_ns = getattr(frame, "acquired_ns", 0)
        self.frame = FrameRecord(int(frame.frame_id), frame.pixels, frame.view, float(now_s), acquired_ns * 1e-9)
        self._frames.append(self.frame)
        self._frame_times.append(float(now_s))
        if self._first_frame_s is None:
            self._first_frame_s = float(now_s)

    def on_pose(self, pose: PoseResult, now_s: float) -> bool:
        """Take a registration result (``guidance.live.wire.PoseResult``); False when it
        was ignored (another publisher)."""
        if not self._expected(pose.source):
            return False
        stages = dict(pose.latency_ms)
        latency = stages.get("total", sum(stages.values())) if stages else None
        e2e = None
        if pose.frame_acquired_ns > 0:
            e2e = (float(now_s) - pose.frame_acquired_ns * 1e-9) * 1e3
        self.pose = PoseRecord(
            frame_id=int(pose.frame_id), status=pose.status, reason=pose.reason,
            confidence=float(pose.confidence), levels=tuple(sorted(pose.level_poses)),
            T_world_corrected_from_world=pose.T_world_corrected_from_world,
            latency_ms=latency, end_to_end_ms=e2e, received_s=float(now_s),
            acquired_s=pose.frame_acquired_ns * 1e-9, source=pose.source)
        return True

    def on_instrument(self, instrument: InstrumentState, now_s: float) -> bool:
        """Take an instrument state (``guidance.live.wire.InstrumentState``); False when
        it was ignored (another publisher)."""
        if not self._expected(instrument.source):
            return False
        self.instrument = InstrumentRecord(
            tool_id=instrument.tool_id,
            tip_world=None if instrument.tip_world is None else np.asarray(instrument.tip_world, dtype=float),
            axis_world=None if instrument.axis_world is None else np.asarray(instrument.axis_world, dtype=float),
            status=instrument.status, plan_level=instrument.plan_level,
            plan_side=instrument.plan_side, received_s=float(now_s),
            acquired_s=getattr(instrument, "acquired_ns", 0) * 1e-9)
        return True

    def on_heartbeat(self, heartbeat: Heartbeat, now_s: float) -> None:
        """Take a heartbeat; the pipeline's (role "pipeline", from ``expected_source``)
        state and time are kept."""
        if heartbeat.role == "pipeline" and self._expected(heartbeat.source):
            self.pipeline_state = heartbeat.state
            self.pipeline_seen_s = float(now_s)

    @staticmethod
    def _age_s(record: PoseRecord | InstrumentRecord, now_s: float) -> float:
        """Data age: since acquisition when known, else since arrival."""
        return now_s - (record.acquired_s if record.acquired_s > 0 else record.received_s)

    def data_age_s(self, now_s: float) -> float | None:
        """Seconds since the frame behind the latest pose was acquired; None without a pose."""
        return None if self.pose is None else self._age_s(self.pose, now_s)

    def _fresh(self, record: PoseRecord | InstrumentRecord, now_s: float) -> bool:
        return -FUTURE_TOLERANCE_S <= self._age_s(record, now_s) <= self.stale_after_s

    def status(self, now_s: float) -> str:
        """The screen state: "waiting" before any pose; "stale" when the data behind the
        latest pose is older than ``stale_after_s``; "invalid" when it says the
        registration failed; else "ok"."""
        if self.pose is None:
            return "waiting"
        if not self._fresh(self.pose, now_s):
            return "stale"
        return "invalid" if self.pose.status != "ok" else "ok"

    def fps(self, now_s: float | None = None) -> float | None:
        """Frame rate (Hz). With ``now_s``: frames arrived in the last ``fps_window_s``
        per second (decays to 0 when frames stop); without: over the kept arrival times.
        None before two frames."""
        times = self._frame_times
        if len(times) < 2:
            return None
        if now_s is None:
            return (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None
        window_s = min(self.fps_window_s, now_s - self._first_frame_s)
        if window_s <= 0:
            return None
        return sum(1 for t in times if t > now_s - window_s) / window_s

    def no_frames(self, now_s: float) -> bool:
        """True when no frame arrived within ``no_frames_after_s`` (or none ever)."""
        return self.frame is None or now_s - self.frame.received_s > self.no_frames_after_s

    def pipeline_alive(self, now_s: float) -> bool:
        return self.pipeline_seen_s is not None and now_s - self.pipeline_seen_s <= self.heartbeat_timeout_s

    def pipeline_text(self, now_s: float) -> str:
        """The pipeline indicator: its heartbeat state, or how long its heartbeat is lost."""
        if self.pipeline_seen_s is None:
            return "pipeline: no heartbeat"
        if not self.pipeline_alive(now_s):
            return f"PIPELINE LOST {now_s - self.pipeline_seen_s:.1f} s"
        return f"pipeline: {self.pipeline_state}"

    def pose_frame(self) -> FrameRecord | None:
        """The kept frame the latest pose was computed from; None if not (or no longer) here."""
        if self.pose is None:
            return None
        return next((f for f in reversed(self._frames) if f.frame_id == self.pose.frame_id), None)

    def registered_view(self) -> View | None:
        """The view of the pose's own frame corrected by the pose (None unless the pose is
        ok and its frame is here):
        ``T_cam_from_world = T_cam_from_world_init @ inv(T_world_corrected_from_world)``."""
        frame = self.pose_frame()
        if frame is None or self.pose.status != "ok":
            return None
        T = frame.view.T_cam_from_world @ invert_rigid(self.pose.T_world_corrected_from_world)
        return frame.view.with_pose(T)

    def visible_instrument(self, now_s: float) -> InstrumentRecord | None:
        """The instrument if it may be drawn as valid: the pose is ok, the instrument says
        "ok" and its data (tracker acquisition) is at most ``stale_after_s`` old; else None."""
        inst = self.instrument
        if self.status(now_s) != "ok" or inst is None or inst.status != "ok":
            return None
        return inst if self._fresh(inst, now_s) else None


def reslice(ct: Volume, centre_world: np.ndarray, orientation: str, size_wh: tuple[int, int],
            pixel_mm: float, *, fill: float = -1000.0) -> tuple[np.ndarray, np.ndarray]:
    """A planar CT reslice through ``centre_world`` (LPS mm) in display orientation.

    Returns the (h, w) float32 image, trilinearly sampled (``fill`` outside the CT), and
    the affine 3x4 camera P mapping world points to its pixels (orthographic projection
    onto the plane), whose centre ((w - 1) / 2, (h - 1) / 2) is ``centre_world``.
    """
    if orientation not in RESLICE_AXES:
        raise ValueError(f"orientation must be one of {', '.join(RESLICE_AXES)}; "
                         f"got {orientation!r}")
    ex, ey = RESLICE_AXES[orientation]
    centre = np.asarray(centre_world, dtype=float).reshape(3)
    w, h = size_wh
    cu, cv = (w - 1) / 2.0, (h - 1) / 2.0
    uu, vv = np.meshgrid((np.arange(w) - cu) * pixel_mm, (np.arange(h) - cv) * pixel_mm)
    points = centre + uu.reshape(-1, 1) * ex + vv.reshape(-1, 1) * ey
    ijk = ct.world_to_index(points)
    image = map_coordinates(ct.data, ijk[:, ::-1].T, order=1, mode="constant", cval=fill)
    P = np.zeros((3, 4))
    P[0, :3], P[0, 3] = ex / pixel_mm, cu - ex @ centre / pixel_mm
    P[1, :3], P[1, 3] = ey / pixel_mm, cv - ey @ centre / pixel_mm
    P[2, 3] = 1.0
    return image.reshape(h, w).astype(np.float32), P


def screen_layout(size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """Pane rectangles (x, y, w, h) in pixels of a (W, H) screen: a large square-ish
    fluoroscopy pane on the left, a 2x2 grid of axial, sagittal, coronal and numbers panes
    on the right, and the status bar along the bottom."""
    W, H = (int(x) for x in size)
    if W < 480 or H < 320:
        raise ValueError(f"screen size must be at least (480, 320), got {size!r}")
    bar = status_bar_height(_STATUS_LINES)
    main_h = H - bar
    big_w = min(main_h, W * 11 // 20)
    cell_w, cell_h = (W - big_w) // 2, main_h // 2
    return {
        "fluoro": (0, 0, big_w, main_h),
        "axial": (big_w, 0, cell_w, cell_h),
        "sagittal": (big_w + cell_w, 0, W - big_w - cell_w, cell_h),
        "coronal": (big_w, cell_h, cell_w, main_h - cell_h),
        "numbers": (big_w + cell_w, cell_h, W - big_w - cell_w, main_h - cell_h),
        "status": (0, main_h, W, bar),
    }


def _active_trajectory(state: NavigationState, trajectories: list[dict],
                       instrument: InstrumentRecord | None) -> dict | None:
    """The trajectory being worked on: the one the instrument state names, else the one
    nearest the visible tip, else the first of a registered level."""
    if not trajectories:
        return None
    inst = state.instrument
    if inst is not None and inst.plan_level is not None:
        for t in trajectories:
            if t.get("level") == inst.plan_level and t.get("side") == inst.plan_side:
                return t
    if instrument is not None:
        return nearest_trajectory(instrument.tip_world, instrument.axis_world, trajectories)[0]
    levels = state.pose.levels if state.pose is not None else ()
    return next((t for t in trajectories if t.get("level") in levels), None)


def _letterbox(img: np.ndarray, w: int, h: int) -> np.ndarray:
    pane = np.zeros((h, w, 3), np.uint8)
    ih, iw = img.shape[:2]
    y, x = (h - ih) // 2, (w - iw) // 2
    pane[y: y + ih, x: x + iw] = img[: h, : w]
    return pane


def _fluoro_pane(state: NavigationState, status: str, trajectories: list[dict],
                 labels: Volume | None, active: dict | None,
                 instrument: InstrumentRecord | None, w: int, h: int,
                 extension_mm: float) -> np.ndarray:
    latest = state.frame
    if latest is None:
        pane = np.zeros((h, w, 3), np.uint8)
        put_text(pane, "NO IMAGE", (w / 2 - 60, h / 2), COLOURS["waiting"], scale=0.9, thickness=2)
        return pane
    registered = state.registered_view() if status == "ok" else None
    frame = state.pose_frame() if registered is not None else latest  # a pose only over its own frame
    factor = max(frame.view.width / w, frame.view.height / h)
    view = (registered or frame.view).downsampled(factor)
    bgr = to_display_bgr(frame.pixels, intensity=frame.view.intensity)
    img = cv2.resize(bgr, view.image_size,
                     interpolation=cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR)
    if registered is not None:
        if labels is not None and active is not None and "label" in active:
            img = draw_outline(img, view, labels, int(active["label"]))
        img = draw_trajectories(img, view, trajectories,
                                highlight_level=active.get("level") if active else None)
        if instrument is not None:
            img = draw_instrument(img, view, instrument.tip_world, instrument.axis_world,
                                  instrument.length_mm, extension_mm=extension_mm)
    pane = _letterbox(img, w, h)
    caption = f"FLUORO #{frame.frame_id}" + ("" if registered is not None else "  (no overlay)")
    if frame is not latest:
        caption += f"  frame of the pose; newest #{latest.frame_id}"
    elif registered is None and status == "ok":
        caption += f": the pose's frame #{state.pose.frame_id} is not here"
    put_text(pane, caption, (8, 20), COLOURS["text"])
    return pane


def _window_hu(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    grey = np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0)
    return cv2.cvtColor(np.round(grey * 255.0).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def _reslice_pane(ct: Volume, orientation: str, centre: np.ndarray, centre_name: str,
                  w: int, h: int, *, fov_mm: float, ct_window: tuple[float, float],
                  active: dict | None, instrument: InstrumentRecord | None,
                  extension_mm: float) -> np.ndarray:
    hu, P = reslice(ct, centre, orientation, (w, h), fov_mm / min(w, h))
    pane = _window_hu(hu, *ct_window)
    if active is not None:
        pane = draw_trajectories(pane, P, [active])
    if instrument is not None:
        pane = draw_instrument(pane, P, instrument.tip_world, instrument.axis_world,
                               instrument.length_mm, extension_mm=extension_mm)
    left, right, top, bottom = _EDGE_LETTERS[orientation]
    grey = COLOURS["waiting"]
    put_text(pane, left, (4, h / 2 + 6), grey)
    put_text(pane, right, (w - 16, h / 2 + 6), grey)
    put_text(pane, top, (w / 2 - 6, 40), grey)
    put_text(pane, bottom, (w / 2 - 6, h - 8), grey)
    put_text(pane, f"{orientation.upper()}  {centre_name}", (8, 20), COLOURS["text"])
    return pane


def _graded(value: float, limits: tuple[float, float]) -> tuple[int, int, int]:
    if value <= limits[0]:
        return COLOURS["ok"]
    return COLOURS["stale"] if value <= limits[1] else COLOURS["invalid"]


def _instrument_note(state: NavigationState, status: str, now_s: float) -> str:
    """Why no instrument is drawn."""
    inst = state.instrument
    if status != "ok":
        return f"pose {status}: instrument hidden"
    if inst is None:
        return "no instrument"
    if inst.status != "ok":
        return f"instrument {inst.status}"
    return f"instrument stale ({NavigationState._age_s(inst, now_s):.1f} s)"


def _numbers_pane(w: int, h: int, active: dict | None, deviation: dict | None,
                  note: str) -> np.ndarray:
    pane = np.full((h, w, 3), 24, np.uint8)
    title = "PLAN  " + (f"{active.get('level', '?')} {active.get('side', '')}" if active
                        else "none")
    put_text(pane, title, (12, 34), COLOURS["text"], scale=0.8, thickness=2)
    if deviation is None:
        put_text(pane, note, (12, 74), COLOURS["waiting"], scale=0.6)
        return pane
    rows = [
        ("dist", deviation["distance_to_trajectory_mm"], "mm", _DISTANCE_LIMITS_MM),
        ("angle", deviation["angle_to_trajectory_deg"], "deg", _ANGLE_LIMITS_DEG),
        ("depth", deviation["depth_along_trajectory_mm"], "mm", None),
        ("to target", deviation["tip_to_target_mm"], "mm", None),
        ("at entry", deviation["lateral_offset_at_entry_mm"], "mm", _DISTANCE_LIMITS_MM),
    ]
    step = min(44, (h - 50) // len(rows))
    for n, (name, value, unit, limits) in enumerate(rows):
        colour = COLOURS["text"] if limits is None else _graded(value, limits)
        y = 50 + step * (n + 1) - 10
        put_text(pane, name, (12, y), COLOURS["waiting"], scale=0.7)
        put_text(pane, f"{value:7.1f} {unit}", (w * 0.42, y), colour, scale=0.9, thickness=2)
    return pane


def _status_lines(state: NavigationState, status: str, now_s: float,
                  active: dict | None, deviation: dict | None, note: str) -> list[str]:
    pose = state.pose
    fps = state.fps(now_s)
    fps_text = f"{fps:.1f} fps" if fps is not None else "-- fps"
    if state.no_frames(now_s) and state.frame is not None:
        fps_text += f"  NO FRAMES {now_s - state.frame.received_s:.1f} s"
    fps_text += f"  {state.pipeline_text(now_s)}"
    if pose is None:
        first = "REGISTRATION waiting for the first pose"
    else:
        head = {
            "ok": "REGISTRATION OK",
            "invalid": f"REGISTRATION FAILED: {pose.reason}",
            "stale": f"REGISTRATION STALE: data {state.data_age_s(now_s):.2f} s old",
        }[status]
        conf = "last conf" if status == "stale" else "conf"
        first = f"{head}  {conf} {pose.confidence:.2f}  level {','.join(pose.levels) or '-'}"
        if pose.latency_ms is not None:
            first += f"  reg {pose.latency_ms:.0f} ms"
        if pose.end_to_end_ms is not None:
            first += f"  e2e {pose.end_to_end_ms:.0f} ms"
    first += f"  {fps_text}"
    if deviation is None:
        return [first, note]
    d = deviation
    second = (f"{active.get('level', '?')} {active.get('side', '')}: "
              f"dist {d['distance_to_trajectory_mm']:.1f} mm  "
              f"angle {d['angle_to_trajectory_deg']:.1f} deg  "
              f"depth {d['depth_along_trajectory_mm']:.1f} mm  "
              f"to target {d['tip_to_target_mm']:.1f} mm")
    return [first, second]


def _reslice_centre(ct: Volume, active: dict | None,
                    instrument: InstrumentRecord | None) -> tuple[np.ndarray, str]:
    if instrument is not None:
        return instrument.tip_world, "tip"
    if active is not None:
        return trajectory_endpoints(active)[1], "plan target"
    return ct.center_world(), "CT centre"


def compose_screen(
    state: NavigationState,
    ct: Volume,
    plan: dict | list | None,
    now_s: float,
    *,
    size: tuple[int, int] = (1280, 720),
    labels: Volume | None = None,
    ct_window: tuple[float, float] = (300.0, 1800.0),
    reslice_fov_mm: float = 100.0,
    extension_mm: float = 40.0,
) -> np.ndarray:
    """The navigation screen, (H, W, 3) BGR uint8 for ``size`` = (W, H).

    Panes (``screen_layout``): the latest fluoroscopy frame with, while the status is ok,
    the plan, the vertebra outline (when ``labels``, a label volume on any grid, is given)
    and the instrument projected with the registered view; axial, sagittal and coronal CT
    reslices (``ct`` in HU, window ``ct_window`` = (level, width) HU, ``reslice_fov_mm``
    across the shorter pane side) through the instrument tip, or the active trajectory's
    target when no instrument may be drawn; the deviation from the plan in large numbers;
    a status bar. ``now_s`` is the current time (``time.time()`` epoch).
    """
    if ct.units != "HU":
        raise ValueError(f"compose_screen needs the CT in HU, got units {ct.units!r}")
    layout = screen_layout(size)
    status = state.status(now_s)
    trajectories = plan_trajectories(plan)
    instrument = state.visible_instrument(now_s)
    active = _active_trajectory(state, trajectories, instrument)
    deviation = None
    if instrument is not None and active is not None:
        deviation = deviation_from_plan(instrument.tip_world, instrument.axis_world, active)
    note = _instrument_note(state, status, now_s)
    screen = np.zeros((size[1], size[0], 3), np.uint8)

    def paste(name: str, pane: np.ndarray) -> None:
        x, y, w, h = layout[name]
        screen[y: y + h, x: x + w] = pane
        cv2.rectangle(screen, (x, y), (x + w - 1, y + h - 1), _GRID, 1)

    _, _, w, h = layout["fluoro"]
    paste("fluoro", _fluoro_pane(state, status, trajectories, labels, active, instrument,
                                 w, h, extension_mm))
    centre, centre_name = _reslice_centre(ct, active, instrument)
    for name in RESLICE_AXES:
        _, _, w, h = layout[name]
        paste(name, _reslice_pane(ct, name, centre, centre_name, w, h, fov_mm=reslice_fov_mm,
                                  ct_window=ct_window, active=active, instrument=instrument,
                                  extension_mm=extension_mm))
    _, _, w, h = layout["numbers"]
    paste("numbers", _numbers_pane(w, h, active, deviation, note))
    lines = _status_lines(state, status, now_s, active, deviation, note)
    return draw_status(screen, lines, state=status)


class HeadlessWriter:
    """Writes every ``every_n``-th screen given to ``show`` as
    ``out_dir/screen_000123.png``, numbered by the count of screens shown."""

    def __init__(self, out_dir: str | Path, every_n: int = 1) -> None:
        if every_n < 1:
            raise ValueError("every_n must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.every_n = int(every_n)
        self.count = 0

    def show(self, screen: np.ndarray) -> Path | None:
        """Write the screen if it is due; returns the file written, else None."""
        index = self.count
        self.count += 1
        if index % self.every_n:
            return None
        path = self.out_dir / f"screen_{index:06d}.png"
        if not cv2.imwrite(str(path), screen):
            raise OSError(f"cannot write {path}")
        return path

    def close(self) -> None:
        """Nothing to release; present so that both sinks close alike."""


class WindowSink:
    """Shows screens in an OpenCV window when a display exists (``$DISPLAY``); without one,
    or if the window cannot open, logs a warning and writes PNGs with a ``HeadlessWriter``
    into ``fallback_dir``. ``quit_requested`` turns true when Esc or q is pressed."""

    def __init__(self, title: str = "Spine guidance", *, fallback_dir: str | Path = "screens",
                 every_n: int = 1) -> None:
        self.title = title
        self.fallback_dir = Path(fallback_dir)
        self.every_n = every_n
        self.quit_requested = False
        self.fallback: HeadlessWriter | None = None
        if not os.environ.get("DISPLAY"):
            self._fall_back("no DISPLAY")

    def _fall_back(self, why: str) -> None:
        log.warning("%s: writing screens as PNG files to %s instead of a window", why,
                    self.fallback_dir)
        self.fallback = HeadlessWriter(self.fallback_dir, self.every_n)

    def show(self, screen: np.ndarray) -> None:
        """Show one screen (and pump the window's events for 1 ms)."""
        if self.fallback is None:
            try:
                cv2.imshow(self.title, screen)
                key = cv2.waitKey(1) & 0xFF
            except cv2.error as exc:
                self._fall_back(f"cannot open a window ({exc})")
            else:
                self.quit_requested |= key in (27, ord("q"))
                return
        self.fallback.show(screen)

    def close(self) -> None:
        """Close the window, if one was opened."""
        if self.fallback is None:
            cv2.destroyWindow(self.title)
