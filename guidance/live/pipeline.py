"""The live guidance loop: frames and tracker poses in, poses, instruments and overlays out.

``Pipeline`` holds the logic and no sockets: the first frame (or any frame after
tracking failed) gets a global registration, the following ones a fast tracking
update; instruments are mapped into the CT through the patient reference array.
``run_pipeline`` is the thin socket loop around it: latest-frame policy (every queued
frame is read and recorded, only the newest is processed, the rest counted as
skipped), heartbeats, and an append-only recording of everything in and out.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from calibration.distortion import undistort_image, undistort_maps
from calibration.errors import CalibrationError
from calibration.files import Calibration, check_matches, distortion_model
from guidance.core.geometry import invert_rigid, project
from guidance.core.images import ImageError, preprocess
from guidance.core.instrument_models import INSTRUMENTS
from guidance.core.plan import plan_trajectories
from guidance.navigation.instruments import nearest_trajectory, tip_and_axis, tool_in_world
from guidance.navigation.overlay import draw_instrument, draw_outline, draw_trajectories, to_display_bgr
from guidance.live.recording import Recorder
from guidance.registration.register import RegistrationResult, Registrator
from guidance.registration.tracking import TrackingSettings, track
from guidance.live.transport import Publisher, Subscriber
from guidance.core.volume import Volume
from guidance.core.views import ViewError
from guidance.live.wire import Frame, Heartbeat, InstrumentState, Message, Overlay, PoseResult, TrackerSample, encode

__all__ = ["PipelineSettings", "PipelineStats", "Pipeline", "run_pipeline"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    """``level``: label id of the vertebra to register alone (None: the whole spine);
    ``overlay``: also publish an encoded overlay picture per frame; tool ids of the
    C-arm's tracker calibration and of the patient reference array; ``distortion``: an
    image-intensifier calibration applied to every frame before registration (frames
    whose size or device, their ``source`` id, do not match it are refused)."""

    level: int | None = None
    distortion: Calibration | None = None
    overlay: bool = False
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    carm_tool: str = "carm"
    reference_tool: str = "reference"
    source: str = "pipeline"


LATENCY_WINDOW = 1800
"""Latencies kept for the reported percentiles: the last 2 minutes at 15 fps (a session
runs for hours; an unbounded list would grow and slow every heartbeat)."""


@dataclass
class PipelineStats:
    """Counters and the latest ``LATENCY_WINDOW`` latencies (ms, frame acquisition ->
    pose published)."""

    frames_received: int = 0
    frames_processed: int = 0
    frames_skipped: int = 0
    frames_rejected: int = 0
    global_registrations: int = 0
    tracking_updates: int = 0
    tracking_fallbacks: int = 0
    failed: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def as_dict(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {k: v for k, v in self.__dict__.items() if k != "latencies_ms"} | {
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
        }


class Pipeline:
    """Registration, tracking and instrument mapping for a stream of frames (no sockets)."""

    def __init__(self, registrator: Registrator, *, plan: list | dict | None = None, labels: Volume | None = None,
                 settings: PipelineSettings | None = None) -> None:
        self.registrator = registrator
        self.plan = plan_trajectories(plan)
        self.labels = labels
        self.settings = settings or PipelineSettings()
        self.stats = PipelineStats()
        self.last_good: RegistrationResult | None = None
        self.last_ok = False
        self.T_reference_from_world: np.ndarray | None = None
        self.poses: dict[str, TrackerSample] = {}
        self.frame_id = 0
        self._undistort = None
        if self.settings.distortion is not None:
            model = distortion_model(self.settings.distortion)
            self._undistort = (model, undistort_maps(model))

    # -- frames --------------------------------------------------------------------------

    def on_frame(self, frame: Frame, received_ns: int | None = None) -> list[Message]:
        """Register one frame; returns the PoseResult (and an Overlay when enabled)."""
        received_ns = time.time_ns() if received_ns is None else received_ns
        t0 = time.perf_counter()
        self.stats.frames_processed += 1
        self.frame_id = frame.frame_id
        try:
            pixels = frame.pixels
            if self._undistort is not None:
                check_matches(self.settings.distortion, image_size=frame.view.image_size, device_id=frame.source)
                model, maps = self._undistort
                pixels = undistort_image(pixels, model, maps=maps)
            image = preprocess(pixels, frame.view)
            self._check_geometry(frame)
        except (ImageError, ViewError, CalibrationError) as exc:
            self.stats.frames_rejected += 1
            log.warning("frame %d rejected: %s", frame.frame_id, exc)
            return [self._failed(frame, f"bad frame: {exc}", t0, received_ns)]
        t1 = time.perf_counter()
        level = self.settings.level
        mode = "global"
        if self.last_good is not None:
            result = track(self.registrator, [image], [frame.view], self.last_good.T_world_corrected_from_world,
                           level=level, settings=self.settings.tracking)
            mode = "tracking"
            self.stats.tracking_updates += 1
            if not result.ok:
                log.info("frame %d: tracking failed (%s); global registration", frame.frame_id, result.reason)
                self.stats.tracking_fallbacks += 1
                mode = "global"
        if mode == "global":
            self.stats.global_registrations += 1
            result = self.registrator.register([image], [frame.view], level=level)
        t2 = time.perf_counter()
        self.last_ok = result.ok
        if result.ok:
            self.last_good = result
            self._register_reference(result)
        else:
            self.stats.failed += 1
        latency = {
            "queue": max(0.0, (received_ns - frame.acquired_ns) / 1e6),
            "preprocess": (t1 - t0) * 1e3,
            "registration": (t2 - t1) * 1e3,
        }
        latency["total"] = max(0.0, (time.time_ns() - frame.acquired_ns) / 1e6)
        self.stats.latencies_ms.append(latency["total"])
        level_name = None if level is None else str(level)
        pose = PoseResult(
            frame_id=frame.frame_id,
            status=result.status,
            reason=result.reason,
            T_world_corrected_from_world=result.T_world_corrected_from_world if result.ok else None,
            views=[{"T_cam_from_world": v.T_cam_from_world} for v in result.views] if result.ok else [],
            level_poses={level_name: result.T_world_corrected_from_world} if result.ok and level_name else {},
            similarity=result.similarity,
            confidence=result.confidence,
            mode=mode,
            latency_ms=latency,
            frame_acquired_ns=frame.acquired_ns,
            source=self.settings.source,
            uncertainty_in_plane_mm=_finite_or_none(result.uncertainty_in_plane_mm),
            uncertainty_depth_mm=_finite_or_none(result.uncertainty_depth_mm),
        )
        out: list[Message] = [pose]
        if self.settings.overlay:
            out.append(self._overlay(frame, result))
        return out

    def _check_geometry(self, frame: Frame) -> None:
        """Reject a frame whose view cannot see the CT (wrong or corrupted geometry)."""
        centre = self.registrator.centre(self.settings.level)
        depth = frame.view.T_cam_from_world[2, :3] @ centre + frame.view.T_cam_from_world[2, 3]
        if depth <= 0:
            raise ViewError("wrong geometry: the CT lies behind the X-ray source in this view")
        u, v = project(frame.view.P, centre[None])[0]
        if not (0 <= u < frame.view.width and 0 <= v < frame.view.height):
            raise ViewError(f"wrong geometry: the CT centre projects to ({u:.0f}, {v:.0f}), outside the "
                            f"{frame.view.width}x{frame.view.height} image")

    def _failed(self, frame: Frame, reason: str, t0: float, received_ns: int) -> PoseResult:
        self.stats.failed += 1
        self.last_ok = False
        return PoseResult(frame_id=frame.frame_id, status="failed", reason=reason, confidence=0.0, mode="global",
                          latency_ms={"queue": max(0.0, (received_ns - frame.acquired_ns) / 1e6),
                                      "preprocess": (time.perf_counter() - t0) * 1e3},
                          frame_acquired_ns=frame.acquired_ns, source=self.settings.source)

    def _overlay(self, frame: Frame, result: RegistrationResult) -> Overlay:
        """The frame with the plan, vertebra outline and instrument drawn at the registered pose."""
        bgr = to_display_bgr(frame.pixels, intensity=frame.view.intensity)
        if result.ok:
            view = result.views[0]
            bgr = draw_trajectories(bgr, view, self.plan)
            if self.labels is not None and self.settings.level is not None:
                bgr = draw_outline(bgr, view, self.labels, self.settings.level)
            for tool_id, sample in self.poses.items():
                if tool_id in INSTRUMENTS and self.T_reference_from_world is not None:
                    tip, axis = self._tip_and_axis(sample)
                    bgr = draw_instrument(bgr, view, tip, axis, INSTRUMENTS[tool_id].length_mm)
        ok, data = cv2.imencode(".png", bgr)
        if not ok:
            raise RuntimeError(f"PNG encoding of the overlay of frame {frame.frame_id} failed")
        return Overlay(frame_id=frame.frame_id, encoding="png", data=data.tobytes(), source=self.settings.source)

    # -- tracker -------------------------------------------------------------------------

    def _register_reference(self, result: RegistrationResult) -> None:
        """Pose of the CT in the patient reference array from this registration:
        ``T_reference_from_world = inv(T_tracker_from_reference) @ T_tracker_from_cam @ T_cam_from_world``."""
        carm = self.poses.get(self.settings.carm_tool)
        reference = self.poses.get(self.settings.reference_tool)
        if carm is None or reference is None:
            return
        T_tracker_from_world = carm.T_tracker_from_tool @ result.views[0].T_cam_from_world
        self.T_reference_from_world = invert_rigid(reference.T_tracker_from_tool) @ T_tracker_from_world

    def _tip_and_axis(self, sample: TrackerSample) -> tuple[np.ndarray, np.ndarray]:
        reference = self.poses[self.settings.reference_tool]
        T_world_from_tool = tool_in_world(sample.T_tracker_from_tool, reference.T_tracker_from_tool,
                                          self.T_reference_from_world)
        return tip_and_axis(T_world_from_tool, INSTRUMENTS[sample.tool_id])

    def on_tracker(self, sample: TrackerSample) -> list[Message]:
        """Store a tracker pose; for a known instrument, return its state in the CT."""
        self.poses[sample.tool_id] = sample
        if sample.tool_id not in INSTRUMENTS:
            return []
        if self.T_reference_from_world is None or self.settings.reference_tool not in self.poses:
            return []
        tip, axis = self._tip_and_axis(sample)
        fields = {}
        if self.plan:
            trajectory, deviation = nearest_trajectory(tip, axis, self.plan)
            fields = {
                "plan_level": trajectory.get("level"),
                "plan_side": trajectory.get("side"),
                "distance_to_trajectory_mm": deviation["distance_to_trajectory_mm"],
                "angle_to_trajectory_deg": deviation["angle_to_trajectory_deg"],
                "depth_along_trajectory_mm": deviation["depth_along_trajectory_mm"],
                "tip_to_target_mm": deviation["tip_to_target_mm"],
            }
        return [InstrumentState(frame_id=self.frame_id, tool_id=sample.tool_id, tip_world=tip, axis_world=axis,
                                status="ok" if self.last_ok else "registration_failed",
                                source=self.settings.source, **fields)]


def run_pipeline(
    pipeline: Pipeline,
    *,
    frame_endpoints: list[str],
    result_endpoint: str,
    stop: threading.Event,
    record_dir: str | Path | None = None,
    heartbeat_s: float = 0.5,
    sink=None,
) -> PipelineStats:
    """Serve until ``stop`` is set: SUB frames/tracker samples, PUB results (bound).

    ``sink``: also hands every result to ``sink.publish(message, frame)`` (e.g. the
    OpenIGTLink bridge, ``guidance.live.igtl.IgtlBridge``); ``frame`` is the frame a
    PoseResult came from, else None."""
    recorder = Recorder(record_dir, source="pipeline") if record_dir is not None else None

    def record_in(parts: list[bytes]) -> None:
        recorder.write("in", parts, time.time_ns())

    sub = Subscriber(frame_endpoints, topics=("frame", "tracker_sample", "heartbeat"), rcvhwm=256,
                     tap=record_in if recorder is not None else None)
    pub = Publisher(result_endpoint, bind=True)

    def send(msg: Message, frame: Frame | None = None) -> None:
        sent = pub.send(msg)
        if sink is not None:
            sink.publish(sent, frame)
        if recorder is not None:
            recorder.write("out", encode(sent), time.time_ns())

    next_heartbeat = 0.0
    try:
        while not stop.is_set():
            messages = _drain(sub, timeout_s=0.05)
            frames = [m for m in messages if isinstance(m, Frame)]
            pipeline.stats.frames_received += len(frames)
            pipeline.stats.frames_skipped += max(0, len(frames) - 1)
            for msg in messages:
                if isinstance(msg, TrackerSample):
                    for out in pipeline.on_tracker(msg):
                        send(out)
            if frames:
                for out in pipeline.on_frame(frames[-1]):
                    send(out, frames[-1])
            now = time.monotonic()
            if now >= next_heartbeat:
                stats = pipeline.stats.as_dict() | {"lost": sub.lost, "malformed": sub.malformed}
                send(Heartbeat(role="pipeline", state="tracking" if pipeline.last_ok else "searching",
                               stats=stats, source=pipeline.settings.source))
                next_heartbeat = now + heartbeat_s
    finally:
        sub.close()
        pub.close()
        if recorder is not None:
            recorder.close()
    return pipeline.stats


def _drain(sub: Subscriber, *, timeout_s: float) -> list[Message]:
    """Every message queued now (waiting up to ``timeout_s`` for the first), in order."""
    first = sub.recv(timeout_s)
    if first is None:
        return []
    messages = [first]
    while (msg := sub.recv(0.0)) is not None:
        messages.append(msg)
    return messages


def _finite_or_none(value: float) -> float | None:
    """A finite number for the wire, None for an unknown (infinite or NaN) one."""
    return float(value) if np.isfinite(value) else None
