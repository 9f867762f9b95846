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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy.ndimage import map_coordinates

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid
from guidance.core.instrument_models import INSTRUMENTS
from guidance.core.plan import plan_trajectories, trajectory_endpoints
from guidance.navigation.instruments import deviation_from_plan, nearest_trajectory
from guidance.navigation.overlay import (
    COLOURS,
    camera_matrix,
    draw_instrument,
    draw_legend,
    draw_orientation_markers,
    draw_outline,
    draw_scale_bar,
    draw_screw_path,
    draw_status,
    draw_trajectories,
    put_text,
    status_bar_height,
    to_display_bgr,
    trajectory_label,
)
from guidance.core.views import View
from guidance.core.volume import Volume

if TYPE_CHECKING:
    from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult, TargetPose

__all__ = [
    "STALE_AFTER_S",
    "DisplayError",
    "RESLICE_AXES",
    "RESLICE_FOV_MM",
    "TRAJECTORY_FOV_MM",
    "INSTRUMENT_METRICS",
    "GuideRecord",
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
RESLICE_FOV_MM = 80.0
"""Default field of view of the axial and sagittal reslices across the shorter pane side."""
TRAJECTORY_FOV_MM = 60.0
"""Field of view along the instrument in the zoomed trajectory view (pane width)."""
PROBE_EYE_FOV_MM = 24.0
"""Field of view of the probe's-eye inset, across the instrument."""
_CAPTION_H = 28
_STATE_WORDS = {"ok": "registration OK", "stale": "no recent registration", "invalid": "registration failed",
                "waiting": "waiting for the first registration"}
FONT = cv2.FONT_HERSHEY_SIMPLEX
# (good, acceptable) limits of the distance (mm) and angle (deg) to the plan.
_DISTANCE_LIMITS_MM = (2.0, 4.0)
_ANGLE_LIMITS_DEG = (5.0, 10.0)
_STATUS_LINES = 2
_GRID = (70, 70, 70)


class DisplayError(GuidanceError):
    """A display option that cannot work (screen too small, CT not in HU, bad timing or orientation)."""


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
    uncertainty_mm: tuple[float, float] | None = None  # 1 sigma at the target: (in-plane, depth)


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
    metrics: dict = field(default_factory=dict)
    """The deviation, breach and (image-derived) uncertainty fields the message carried
    (``INSTRUMENT_METRICS``; absent when not given)."""
    image_derived: bool = False
    """Found in the X-ray image itself (no tracker): its depth along the view is uncertain."""

    @property
    def length_mm(self) -> float:
        """Shaft length to draw: the registered model's, else a nominal 100 mm."""
        model = INSTRUMENTS.get(self.tool_id)
        return model.length_mm if model is not None else DEFAULT_SHAFT_MM


INSTRUMENT_METRICS = ("distance_to_trajectory_mm", "angle_to_trajectory_deg", "depth_along_trajectory_mm",
                      "tip_to_target_mm", "to_target_along_plan_mm", "breach_mm", "breach_grade", "breach_side",
                      "breach_warning", "clearance_mm", "travel_to_breach_mm", "uncertainty_in_plane_mm",
                      "uncertainty_depth_mm", "uncertainty_axis_deg")


@dataclass(frozen=True)
class GuideRecord:
    """The latest alignment of a tracked aiming guide to a planned trajectory (mm, deg)."""

    tool_id: str
    level: str
    side: str
    entry_error_mm: float
    angle_error_deg: float
    aligned: bool
    received_s: float


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
            raise DisplayError("stale_after_s, fps_window_s and heartbeat_timeout_s must be positive")
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
        self.guide: GuideRecord | None = None
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
            uncertainty_mm=None if pose.uncertainty_in_plane_mm is None or pose.uncertainty_depth_mm is None
            else (pose.uncertainty_in_plane_mm, pose.uncertainty_depth_mm),
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
            metrics={k: getattr(instrument, k) for k in INSTRUMENT_METRICS
                     if getattr(instrument, k, None) is not None},
            acquired_s=getattr(instrument, "acquired_ns", 0) * 1e-9, image_derived=bool(instrument.image_derived))
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

    def on_target(self, target: TargetPose, now_s: float) -> None:
        """Take a target pose (``guidance.live.wire.TargetPose``); one carrying a guide's
        alignment becomes the shown guide state (only from ``expected_source``)."""
        if target.guide_tool_id is not None and self._expected(target.source):
            self.guide = GuideRecord(target.guide_tool_id, target.level, target.side, target.guide_entry_error_mm,
                                     target.guide_angle_error_deg, bool(target.guide_aligned), float(now_s))

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
        raise DisplayError(f"orientation must be one of {', '.join(RESLICE_AXES)}; "
                           f"got {orientation!r}")
    ex, ey = RESLICE_AXES[orientation]
    return _plane_reslice(ct, np.asarray(centre_world, dtype=float).reshape(3), ex, ey, size_wh, pixel_mm,
                          fill=fill)


def screen_layout(size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """Pane rectangles (x, y, w, h) in pixels of a (W, H) screen: the status bar along the
    top, a large fluoroscopy pane on the left, and on the right the axial and sagittal CT
    reslices (left column), the zoomed view along the instrument and the numbers (right
    column)."""
    W, H = (int(x) for x in size)
    if W < 480 or H < 320:
        raise DisplayError(f"screen size must be at least (480, 320), got {size!r}")
    bar = status_bar_height(_STATUS_LINES)
    main_h = H - bar
    big_w = min(main_h, W * 2 // 5)
    cell_w, cell_h = (W - big_w) // 2, main_h // 2
    return {
        "status": (0, 0, W, bar),
        "fluoro": (0, bar, big_w, main_h),
        "axial": (big_w, bar, cell_w, cell_h),
        "sagittal": (big_w, bar + cell_h, cell_w, main_h - cell_h),
        "trajectory": (big_w + cell_w, bar, W - big_w - cell_w, cell_h),
        "numbers": (big_w + cell_w, bar + cell_h, W - big_w - cell_w, main_h - cell_h),
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


def _caption(pane: np.ndarray, text: str, colour: tuple[int, int, int] = COLOURS["text"]) -> None:
    """A caption on a dark strip along the top of a pane (``_CAPTION_H`` high)."""
    pane[:_CAPTION_H] = pane[:_CAPTION_H] // 3
    put_text(pane, text, (8, 19), colour, scale=0.55)


def _legend_entries(trajectories: list[dict], active: dict | None, labels_drawn: bool,
                    instrument: InstrumentRecord | None) -> list[tuple[str, tuple[int, int, int]]]:
    """What the fluoroscopy overlay's colours mean, for what is drawn."""
    entries = []
    kinds = {(t.get("approach", "posterior"), t.get("side")) for t in trajectories}
    names = {("posterior", "left"): "plan: left pedicle screw", ("posterior", "right"): "plan: right pedicle screw",
             ("lateral", "left"): "plan: lateral access (left)", ("lateral", "right"): "plan: lateral access (right)",
             ("anterior", "midline"): "plan: anterior access"}
    for key, text in names.items():
        if key in kinds:
            entries.append((text, COLOURS.get(key[1], COLOURS["other_side"])))
    if labels_drawn and active is not None:
        entries.append((f"outline of vertebra {active.get('level', '')}", COLOURS["outline"]))
    if instrument is not None:
        entries.append(("instrument", COLOURS["shaft"]))
        entries.append(("path ahead, dashes 2.5 mm", COLOURS["extension"]))
    return entries


def _fluoro_pane(state: NavigationState, status: str, trajectories: list[dict],
                 labels: Volume | None, active: dict | None,
                 instrument: InstrumentRecord | None, w: int, h: int,
                 extension_mm: float) -> np.ndarray:
    latest = state.frame
    if latest is None:
        pane = np.zeros((h, w, 3), np.uint8)
        put_text(pane, "no X-ray image yet", (w / 2 - 90, h / 2), COLOURS["waiting"], scale=0.8, thickness=2)
        return pane
    registered = state.registered_view() if status == "ok" else None
    frame = state.pose_frame() if registered is not None else latest  # a pose only over its own frame
    factor = max(frame.view.width / w, frame.view.height / h)
    view = (registered or frame.view).downsampled(factor)
    bgr = to_display_bgr(frame.pixels, intensity=frame.view.intensity, monitor=True)
    img = cv2.resize(bgr, view.image_size,
                     interpolation=cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR)
    outlined = False
    if registered is not None:
        if labels is not None and active is not None and "label" in active:
            img = draw_outline(img, view, labels, int(active["label"]))
            outlined = True
        img = draw_trajectories(img, view, trajectories,
                                highlight_level=active.get("level") if active else None)
        if instrument is not None:
            img = draw_instrument(img, view, instrument.tip_world, instrument.axis_world,
                                  instrument.length_mm, extension_mm=extension_mm)
    else:
        img = (img * 0.45).astype(np.uint8)  # dimmed: nothing on it may be trusted for navigation
    pane = _letterbox(img, w, h)
    centre = trajectory_endpoints(active)[1] if active is not None else None
    if centre is not None:
        ox, oy = (w - view.width) // 2, (h - view.height) // 2
        shifted = camera_matrix(view).copy()
        shifted[:2] += np.outer([ox, oy], shifted[2])  # the letterboxed pane's pixels
        pane = draw_orientation_markers(pane, shifted, centre, top_margin_px=_CAPTION_H)
    if registered is not None:
        entries = _legend_entries(trajectories, active, outlined, instrument)
        if entries:
            pane = draw_legend(pane, entries)
    caption = f"Fluoroscopy, frame {frame.frame_id}"
    if registered is None:
        caption += f": overlay hidden ({_STATE_WORDS[status]})"
    if frame is not latest:
        caption += f", the pose's frame; newest {latest.frame_id}"
    elif registered is None and status == "ok":
        caption += f"; the pose's frame {state.pose.frame_id} is not here"
    _caption(pane, caption, COLOURS["text"] if registered is not None else COLOURS[status])
    return pane


def _window_hu(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    grey = np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0)
    return cv2.cvtColor(np.round(grey * 255.0).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def _reslice_pane(ct: Volume, orientation: str, centre: np.ndarray, centre_name: str,
                  w: int, h: int, *, fov_mm: float, ct_window: tuple[float, float],
                  active: dict | None, instrument: InstrumentRecord | None,
                  extension_mm: float) -> np.ndarray:
    mm_per_px = fov_mm / min(w, h)
    hu, P = reslice(ct, centre, orientation, (w, h), mm_per_px)
    pane = _window_hu(hu, *ct_window)
    if active is not None:
        pane = draw_trajectories(pane, P, [active], labels=False)
    if instrument is not None:
        pane = draw_instrument(pane, P, instrument.tip_world, instrument.axis_world,
                               instrument.length_mm, extension_mm=extension_mm)
    pane = draw_orientation_markers(pane, P, centre, top_margin_px=_CAPTION_H)
    pane = draw_scale_bar(pane, mm_per_px)
    _caption(pane, f"{orientation.capitalize()} CT through the {centre_name}")
    return pane


def _plane_reslice(ct: Volume, centre: np.ndarray, ex: np.ndarray, ey: np.ndarray, size_wh: tuple[int, int],
                   pixel_mm: float, *, fill: float = -1000.0) -> tuple[np.ndarray, np.ndarray]:
    """A CT reslice on the plane through ``centre`` spanned by the unit vectors ``ex``
    (screen right) and ``ey`` (screen down), and its affine 3x4 camera (as ``reslice``)."""
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


def _breach_colour(metrics: dict) -> tuple[int, int, int]:
    """Red for a breach warning, amber for a screw touching the cortex, else green."""
    if metrics.get("breach_warning"):
        return COLOURS["invalid"]
    if metrics.get("breach_mm", 0.0) > 0.0:
        return COLOURS["stale"]
    return COLOURS["ok"]


def _probe_eye(ct: Volume, point: np.ndarray, axis: np.ndarray, across: np.ndarray, size_px: int, *,
               ct_window: tuple[float, float], active: dict | None, radius_mm: float | None,
               colour: tuple[int, int, int], what: str, fov_mm: float = PROBE_EYE_FOV_MM) -> np.ndarray:
    """The probe's eye: the CT across the instrument at ``point`` (looking along the axis),
    the implant's cross-section (a circle of ``radius_mm``) around it and a cross where the
    planned line crosses the plane."""
    mm_per_px = fov_mm / size_px
    # A camera looking along the instrument (x right, y down, z = axis): for a posterior
    # screw, the patient's left on the left and the head up, as seen from behind the handle.
    right = -across
    hu, P = _plane_reslice(ct, point, right, np.cross(axis, right), (size_px, size_px), mm_per_px)
    inset = _window_hu(hu, *ct_window)
    c = (size_px - 1) / 2.0
    if radius_mm is not None:
        cv2.circle(inset, (int(round(c * 16)), int(round(c * 16))), int(round(radius_mm / mm_per_px * 16)), colour, 2,
                   cv2.LINE_AA, 4)
    if active is not None:
        entry, target = trajectory_endpoints(active)
        d = target - entry
        denom = float(d @ axis)
        if abs(denom) > 1e-9:
            crossing = entry + d * float((point - entry) @ axis) / denom
            u, v = P[:2, :3] @ crossing + P[:2, 3]
            if 0 <= u < size_px and 0 <= v < size_px:
                cv2.drawMarker(inset, (int(round(u)), int(round(v))), COLOURS.get(active.get("side"), COLOURS["text"]),
                               cv2.MARKER_CROSS, 12, 2, cv2.LINE_AA)
    inset = draw_orientation_markers(inset, P, point, top_margin_px=16)
    inset[:18] = inset[:18] // 3
    put_text(inset, f"probe's eye at the {what}", (4, 13), COLOURS["text"], scale=0.4)
    cv2.rectangle(inset, (0, 0), (size_px - 1, size_px - 1), COLOURS["text"], 1)
    return inset


def _trajectory_pane(ct: Volume, w: int, h: int, *, ct_window: tuple[float, float], active: dict | None,
                     instrument: InstrumentRecord | None, extension_mm: float,
                     fov_mm: float = TRAJECTORY_FOV_MM) -> np.ndarray:
    """The zoomed view along the instrument (or the active plan): the CT on the plane that
    holds the instrument's axis and the patient's left-right direction, the tip a fifth of
    the way in from the left, the planned screw's outline along the path ahead coloured by
    the breach prediction, and an inset looking along the instrument (``_probe_eye``) at
    the tip, or where the predicted breach starts."""
    if instrument is None and active is None:
        pane = np.full((h, w, 3), 24, np.uint8)
        _caption(pane, "Along the instrument: no instrument or plan")
        return pane
    if instrument is not None:
        tip, axis = instrument.tip_world, instrument.axis_world / np.linalg.norm(instrument.axis_world)
    else:
        tip, target = trajectory_endpoints(active)
        axis = (target - tip) / np.linalg.norm(target - tip)
    across = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    across = across - (across @ axis) * axis
    across /= np.linalg.norm(across)
    mm_per_px = fov_mm / w
    centre = tip + axis * (0.3 * fov_mm)
    hu, P = _plane_reslice(ct, centre, axis, across, (w, h), mm_per_px)
    pane = _window_hu(hu, *ct_window)
    if active is not None:
        pane = draw_trajectories(pane, P, [active], labels=False)
    if instrument is not None:
        metrics = instrument.metrics
        if active is not None and "to_target_along_plan_mm" in metrics and "screw_diameter_mm" in active:
            entry, target = trajectory_endpoints(active)
            direction = (target - entry) / np.linalg.norm(target - entry)
            cos = float(axis @ direction)
            if cos > 0.5:
                end = tip + axis * max(0.0, metrics["to_target_along_plan_mm"]) / cos
                pane = draw_screw_path(pane, P, tip, end, float(active["screw_diameter_mm"]),
                                       _breach_colour(metrics))
                travel = metrics.get("travel_to_breach_mm")
                if metrics.get("breach_warning") and travel is not None:
                    u, v = P[:2, :3] @ (tip + axis * travel) + P[:2, 3]
                    cv2.drawMarker(pane, (int(round(u)), int(round(v))), COLOURS["invalid"], cv2.MARKER_TILTED_CROSS,
                                   18, 2, cv2.LINE_AA)
                    put_text(pane, f"breach starts, {metrics.get('breach_side', '')}", (u + 8, v - 26),
                             COLOURS["invalid"], scale=0.5)
        pane = draw_instrument(pane, P, tip, axis, instrument.length_mm, extension_mm=extension_mm)
    pane = draw_orientation_markers(pane, P, centre, top_margin_px=_CAPTION_H)
    pane = draw_scale_bar(pane, mm_per_px)
    if instrument is not None:
        metrics = instrument.metrics
        travel = metrics.get("travel_to_breach_mm") if metrics.get("breach_warning") else None
        size = int(min(w, h) * 0.42)
        radius = float(active["screw_diameter_mm"]) / 2 if active is not None and "screw_diameter_mm" in active \
            else None
        inset = _probe_eye(ct, tip + axis * (travel or 0.0), axis, across, size, ct_window=ct_window, active=active,
                           radius_mm=radius, colour=_breach_colour(metrics),
                           what="breach start" if travel else "tip")
        pane[h - size - 6: h - 6, 6: 6 + size] = inset
    _caption(pane, "Along the instrument (zoomed): screw outline ahead"
             if instrument is not None else "Along the plan (zoomed)")
    return pane


def _graded(value: float, limits: tuple[float, float]) -> tuple[int, int, int]:
    if value <= limits[0]:
        return COLOURS["ok"]
    return COLOURS["stale"] if value <= limits[1] else COLOURS["invalid"]


def _instrument_note(state: NavigationState, status: str, now_s: float) -> str:
    """Why no instrument is drawn."""
    inst = state.instrument
    if status != "ok":
        return f"instrument hidden: {_STATE_WORDS[status]}"
    if inst is None:
        return "no instrument tracked"
    if inst.status != "ok":
        return f"instrument not usable ({inst.status})"
    return f"instrument data {NavigationState._age_s(inst, now_s):.1f} s old"


def _banner(metrics: dict, image_derived: bool = False) -> tuple[str, str, tuple[int, int, int]]:
    """(headline, detail, colour) of the breach prediction."""
    if "breach_grade" not in metrics and image_derived:
        depth_sd = metrics.get("uncertainty_depth_mm")
        detail = "depth unknown" if depth_sd is None else f"depth +/-{depth_sd:.1f} mm (1 sigma)"
        return "Found in the X-ray (no tracker)", detail + ": no breach prediction", COLOURS["waiting"]
    if "breach_grade" not in metrics:
        return "No breach prediction", "needs the CT and vertebra labels in the pipeline", COLOURS["waiting"]
    grade, mm = metrics["breach_grade"], metrics.get("breach_mm", 0.0)
    side = metrics.get("breach_side") or ""
    travel = metrics.get("travel_to_breach_mm")
    when = "already breached" if travel == 0.0 else (f"in {travel:.1f} mm of travel" if travel is not None else "")
    if metrics.get("breach_warning"):
        return f"BREACH WARNING: {side}", f"{mm:.1f} mm, grade {grade}, {when}", COLOURS["invalid"]
    if mm > 0.0:
        return f"Touching the cortex: {side}", f"{mm:.1f} mm, grade {grade}, {when}", COLOURS["stale"]
    return "In the corridor", "no breach predicted (grade A)", COLOURS["ok"]


def _give_or_take(metrics: dict) -> str:
    """" +/-N" (1 sigma along the view, mm) for an instrument found in the X-ray, else ""."""
    depth_sd = metrics.get("uncertainty_depth_mm")
    return "" if depth_sd is None else f" +/-{depth_sd:.0f}"


def _numbers_pane(w: int, h: int, active: dict | None, instrument: InstrumentRecord | None,
                  deviation: dict | None, guide: GuideRecord | None, note: str) -> np.ndarray:
    pane = np.full((h, w, 3), 24, np.uint8)
    title = "Plan " + (trajectory_label(active) if active else "none")
    put_text(pane, title, (10, 26), COLOURS["text"], scale=0.7, thickness=2)
    y = 40
    if deviation is None:
        put_text(pane, note, (10, y + 24), COLOURS["waiting"], scale=0.55)
        y += 40
    else:
        metrics = instrument.metrics
        headline, detail, colour = _banner(metrics, instrument.image_derived)
        cv2.rectangle(pane, (6, y), (w - 7, y + 50), colour, -1)
        cv2.putText(pane, headline, (14, y + 21), FONT, 0.62, (0, 0, 0), 2, cv2.LINE_AA)
        cv2.putText(pane, detail, (14, y + 43), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        y += 58
        clearance = metrics.get("clearance_mm")
        rows = [
            ("off plan at the tip", f"{deviation['distance_to_trajectory_mm']:.1f} mm",
             _graded(deviation["distance_to_trajectory_mm"], _DISTANCE_LIMITS_MM)),
            ("angle to the plan", f"{deviation['angle_to_trajectory_deg']:.1f} deg",
             _graded(deviation["angle_to_trajectory_deg"], _ANGLE_LIMITS_DEG)),
            ("tip depth past the entry", f"{deviation['depth_along_trajectory_mm']:.1f}{_give_or_take(metrics)} mm",
             COLOURS["text"]),
            ("left to the target (along plan)",
             f"{metrics.get('to_target_along_plan_mm', deviation['tip_to_target_mm']):.1f} mm", COLOURS["text"]),
        ]
        if clearance is not None:
            rows.append(("screw to cortex, path ahead", f"{clearance:.1f} mm",
                         COLOURS["invalid"] if clearance < 0 else _graded(-clearance, (-0.5, 0.0))))
        step = max(20, min(30, (h - y - 60) // max(1, len(rows))))
        for name, value, colour in rows:
            y += step
            put_text(pane, name, (10, y), COLOURS["waiting"], scale=0.5)
            put_text(pane, value, (w * 0.62, y), colour, scale=0.65, thickness=2)
    if guide is not None:
        y += 30
        verdict = "ALIGNED (within 1 mm and 1 deg)" if guide.aligned else "not aligned (needs 1 mm, 1 deg)"
        put_text(pane, f"aiming guide to {guide.level} {guide.side}: {guide.entry_error_mm:.1f} mm at entry, "
                 f"{guide.angle_error_deg:.1f} deg", (10, y), COLOURS["text"], scale=0.45)
        put_text(pane, verdict, (10, y + 20), COLOURS["ok"] if guide.aligned else COLOURS["stale"], scale=0.5)
    put_text(pane, "Breach grade (Gertzbein-Robbins): A none, B <2 mm,", (10, h - 26), COLOURS["waiting"], scale=0.4)
    put_text(pane, "C 2-4 mm, D 4-6 mm, E >6 mm beyond the cortex", (10, h - 10), COLOURS["waiting"], scale=0.4)
    return pane


def _status_lines(state: NavigationState, status: str, now_s: float,
                  active: dict | None, deviation: dict | None, note: str) -> list[str]:
    pose = state.pose
    fps = state.fps(now_s)
    fps_text = f"{fps:.1f} frames/s" if fps is not None else "no frame rate yet"
    if state.no_frames(now_s) and state.frame is not None:
        fps_text += f", NO FRAMES for {now_s - state.frame.received_s:.1f} s"
    fps_text += f", {state.pipeline_text(now_s)}"
    if pose is None:
        first = "Registration: waiting for the first pose"
    else:
        head = {
            "ok": "Registration OK",
            "invalid": f"Registration FAILED ({pose.reason})",
            "stale": f"Registration STALE: data {state.data_age_s(now_s):.2f} s old",
        }[status]
        conf = "last confidence" if status == "stale" else "confidence"
        first = f"{head}, {conf} {pose.confidence:.2f}, vertebra {','.join(pose.levels) or 'all'}"
        if pose.uncertainty_mm is not None:
            first += f", +-{pose.uncertainty_mm[0]:.1f} mm in-plane, +-{pose.uncertainty_mm[1]:.1f} mm depth"
        if pose.latency_ms is not None:
            first += f", registration {pose.latency_ms:.0f} ms"
        if pose.end_to_end_ms is not None:
            first += f", image to screen {pose.end_to_end_ms:.0f} ms"
    first += f", {fps_text}"
    if status != "ok":
        return [first, f"Overlays and instrument hidden: {_STATE_WORDS[status]}"]
    if deviation is None:
        return [first, note]
    d = deviation
    return [first, f"Instrument on {trajectory_label(active)}: {d['distance_to_trajectory_mm']:.1f} mm off plan, "
                   f"{d['angle_to_trajectory_deg']:.1f} deg, {d['depth_along_trajectory_mm']:.1f} mm past the entry"]


def _reslice_centre(ct: Volume, active: dict | None,
                    instrument: InstrumentRecord | None) -> tuple[np.ndarray, str]:
    if instrument is not None:
        return instrument.tip_world, "instrument tip"
    if active is not None:
        return trajectory_endpoints(active)[1], "planned target"
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
    reslice_fov_mm: float = RESLICE_FOV_MM,
    extension_mm: float = 40.0,
) -> np.ndarray:
    """The navigation screen, (H, W, 3) BGR uint8 for ``size`` = (W, H).

    Panes (``screen_layout``): a status bar along the top (state box, registration, the
    instrument's deviation; when the state is not ok a frame of the state's colour and the
    fluoroscopy dimmed, nothing written over the anatomy); the latest fluoroscopy frame,
    windowed as on a C-arm monitor, with orientation letters and, while the status is ok,
    every planned trajectory labelled, the active vertebra's outline (``labels``, a label
    volume on any grid), the instrument and a colour legend; axial and sagittal CT
    reslices (``ct`` in HU, window ``ct_window`` = (level, width) HU, ``reslice_fov_mm``
    across the shorter pane side) through the instrument tip, or the active trajectory's
    target when no instrument may be drawn; a zoomed view along the instrument with the
    planned screw's outline coloured by the breach prediction; the numbers (breach banner,
    deviation, clearance, aiming-guide alignment). ``now_s`` is the current time
    (``time.time()`` epoch).
    """
    if ct.units != "HU":
        raise DisplayError(f"compose_screen needs the CT in HU, got units {ct.units!r}")
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
    for name in ("axial", "sagittal"):
        _, _, w, h = layout[name]
        paste(name, _reslice_pane(ct, name, centre, centre_name, w, h, fov_mm=reslice_fov_mm,
                                  ct_window=ct_window, active=active, instrument=instrument,
                                  extension_mm=extension_mm))
    _, _, w, h = layout["trajectory"]
    paste("trajectory", _trajectory_pane(ct, w, h, ct_window=ct_window, active=active, instrument=instrument,
                                         extension_mm=extension_mm))
    _, _, w, h = layout["numbers"]
    guide = state.guide if state.guide is not None and now_s - state.guide.received_s <= state.stale_after_s else None
    paste("numbers", _numbers_pane(w, h, active, instrument, deviation, guide if status == "ok" else None, note))
    lines = _status_lines(state, status, now_s, active, deviation, note)
    return draw_status(screen, lines, state=status)


class HeadlessWriter:
    """Writes every ``every_n``-th screen given to ``show`` as
    ``out_dir/screen_000123.png``, numbered by the count of screens shown."""

    def __init__(self, out_dir: str | Path, every_n: int = 1) -> None:
        if every_n < 1:
            raise DisplayError("every_n must be at least 1")
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
