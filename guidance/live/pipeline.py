"""The live guidance loop: frames and tracker poses in, poses, instruments and overlays out.

``Pipeline`` holds the logic and no sockets: the first frame (or any frame after
tracking failed) gets a global registration, the following ones a fast tracking
update; instruments are mapped into the CT through the patient reference array.

Time consistency: tracker samples are kept per tool for ``TRACKER_HISTORY_S`` and
paired by acquisition time. A frame (and the multi-shot registration's shot made of it)
is registered against the C-arm and reference samples acquired nearest to it, an
intra-op volume's scanner pose is mapped through the reference acquired nearest to the
volume, an instrument reading (and an aiming guide's alignment) against the reference acquired
with it (its own ``T_tracker_from_reference``) or nearest to it, each within
``pair_tolerance_ms``; otherwise the instrument is "not_tracked" (never paired with an
old reference) and the reference array is not re-registered from that frame.

``guidance.live.serve.run_pipeline`` is the thin socket loop around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

from calibration.errors import CalibrationError
from guidance.core.geometry import invert_rigid, project
from guidance.core.images import ImageError, PreparedImage, preprocess
from guidance.core.errors import GuidanceError
from guidance.core.instrument_models import InstrumentError
from guidance.core.plan import plan_trajectories, trajectory_approach
from guidance.navigation.breach import BreachError, CorridorModel, build_corridor, guidance_metrics
from guidance.navigation.instruments import nearest_trajectory, tip_and_axis, tool_in_world
from guidance.navigation.targets import guide_alignment, target_pose_tracker, target_pose_world
from guidance.live.throttle import ThrottledLog
from guidance.registration.register import RegistrationResult, Registrator
from guidance.registration.tracking import TrackingSettings
from guidance.live.shots import Shot, ShotRegistrar, ShotSettings, angle_between_deg, beam_direction_world
from guidance.live.calibrations import calibrated_instruments, calibrated_view
from guidance.live.intraop import IntraopError, IntraopSettings, register_intraop, volume_from_message
from guidance.live.serve import PIPELINE_SOURCE
from guidance.live.transport import DEFAULT_MAX_FRAME_PX
from guidance.core.volume import Volume
from guidance.core.views import View, ViewError, carm_view
from guidance.live.wire import (Frame, InstrumentState, Message, Overlay, PoseResult, TargetPose, TrackerSample,
                                VolumeFrame)

if TYPE_CHECKING:  # imported where used: a (re)started pipeline needs none of them before its first pose
    from calibration.files import Calibration
    from guidance.navigation.detection import InstrumentEstimate, ViewDetection

__all__ = ["PipelineSettings", "PipelineStats", "TrackerHistory", "Pipeline"]

log = logging.getLogger(__name__)

TRACKER_HISTORY_S = 2.0
"""Seconds of tracker samples kept per tool for pairing by acquisition time."""
TRACKER_HISTORY_MAX = 512
"""Samples kept per tool at most (memory bound for fast trackers and floods)."""
MAX_TOOLS = 64
"""Tools tracked at most; samples of further tool ids are dropped (memory bound)."""


@dataclass(frozen=True)
class PipelineSettings:
    """``level``: label id of the vertebra to register alone (None: the whole spine);
    ``overlay``: also publish an encoded overlay picture per frame; tool ids of the
    C-arm's tracker calibration and of the patient reference array; ``distortion``: an
    image-intensifier calibration applied to every frame before registration (frames
    whose size or device, their ``source`` id, do not match it are refused); ``carm``: a
    C-arm calibration whose K (per orientation from its angle table) replaces each
    frame's; ``pivots``: pivot calibrations by tool id, whose tips replace the instrument
    models' (``guidance.live.calibrations``); ``shots``:
    which shots multi-shot registration keeps (``guidance.live.shots``); ``intraop``: the
    registration of intra-op CT / CBCT volumes (``guidance.live.intraop``);
    ``detect_instruments``: instrument models (names) looked for in each registered frame
    while no tracker sample of an instrument has arrived, published as image-derived
    instrument states (empty: off)."""

    level: int | None = None
    distortion: Calibration | None = None
    carm: Calibration | None = None
    pivots: dict[str, Calibration] = field(default_factory=dict)
    overlay: bool = False
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    shots: ShotSettings = field(default_factory=ShotSettings)
    intraop: IntraopSettings = field(default_factory=IntraopSettings)
    carm_tool: str = "carm"
    reference_tool: str = "reference"
    source: str = PIPELINE_SOURCE
    pair_tolerance_ms: float = 20.0
    """Largest acquisition-time difference of tracker samples paired with a frame or an
    instrument reading."""
    max_frame_px: int = DEFAULT_MAX_FRAME_PX
    """Largest frame side accepted (pixels): sets the subscriber's ZMQ_MAXMSGSIZE."""
    no_frames_after_s: float = 1.0
    """Heartbeat state "no_frames" when the last frame arrived longer ago than this."""
    target_period_s: float = 1.0
    """Planned trajectories are published as target poses at most this often (s)."""
    detect_instruments: tuple[str, ...] = ()


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
    instruments_not_tracked: int = 0
    tracker_samples: int = 0
    tracker_coalesced: int = 0
    volumes_received: int = 0
    volumes_rejected: int = 0
    volumes_skipped: int = 0
    instruments_refused: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def as_dict(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {k: v for k, v in self.__dict__.items() if k != "latencies_ms"} | {
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
        }


class TrackerHistory:
    """Recent tracker samples per tool, for pairing by acquisition time (bounded)."""

    def __init__(self, keep_s: float = TRACKER_HISTORY_S, max_per_tool: int = TRACKER_HISTORY_MAX) -> None:
        self.keep_ns = int(keep_s * 1e9)
        self._max = max_per_tool
        self._samples: dict[str, deque[TrackerSample]] = {}

    def add(self, sample: TrackerSample) -> bool:
        """Keep ``sample``; False (dropped) for a new tool beyond ``MAX_TOOLS``."""
        history = self._samples.get(sample.tool_id)
        if history is None:
            if len(self._samples) >= MAX_TOOLS:
                return False
            history = self._samples[sample.tool_id] = deque(maxlen=self._max)
        history.append(sample)
        while history[0].acquired_ns < sample.acquired_ns - self.keep_ns:
            history.popleft()
        return True

    def latest(self, tool_id: str) -> TrackerSample | None:
        history = self._samples.get(tool_id)
        return history[-1] if history else None

    def latest_per_tool(self) -> dict[str, TrackerSample]:
        return {tool: h[-1] for tool, h in self._samples.items() if h}

    def nearest(self, tool_id: str, acquired_ns: int, tolerance_ns: int) -> TrackerSample | None:
        """The sample of ``tool_id`` acquired nearest to ``acquired_ns``, if within
        ``tolerance_ns``; else None."""
        history = self._samples.get(tool_id)
        if not history:
            return None
        best = min(history, key=lambda s: abs(s.acquired_ns - acquired_ns))
        return best if abs(best.acquired_ns - acquired_ns) <= tolerance_ns else None


class Pipeline:
    """Registration, tracking and instrument mapping for a stream of frames (no sockets).

    ``on_frame`` may run in another thread than ``on_tracker``/``on_tracker_samples``:
    the shared state (tracker history, reference registration) is guarded by a lock."""

    def __init__(self, registrator: Registrator, *, plan: list | dict | None = None, labels: Volume | None = None,
                 settings: PipelineSettings | None = None, ct: Volume | None = None) -> None:
        """``ct``: the pre-operative CT (HU); with ``labels`` it also gives the instruments'
        breach prediction (corridor models built on first use, one per planned trajectory)."""
        self.registrator = registrator
        self.ct = ct
        self.plan = plan_trajectories(plan)
        self.labels = labels
        self._corridors: dict[int, CorridorModel | None] = {}
        self._targets_sent_ns: int | None = None
        self.settings = settings or PipelineSettings()
        self.stats = PipelineStats()
        self.last_good: RegistrationResult | None = None
        self.last_ok = False
        self.T_reference_from_world: np.ndarray | None = None
        self.tracker = TrackerHistory()
        self.frame_id = 0
        self.registering = False
        """True while a global registration runs (heartbeat state "registering")."""
        self.warming_up = False
        """True while ``warm_up`` runs (heartbeat state "warming_up")."""
        self.results = 0
        """Poses produced so far."""
        self.last_frame_ns: int | None = None
        """Local time (``time.time_ns()``) the last frame was handed to ``on_frame``."""
        self._lock = threading.Lock()
        self._log = ThrottledLog(log)
        self.shots = ShotRegistrar(registrator, level=self.settings.level, tracking=self.settings.tracking,
                                   settings=self.settings.shots)
        self.instruments, self.instrument_refusals = calibrated_instruments(self.settings.pivots)
        self._shot_detections: dict[int, tuple[View, tuple[ViewDetection, ...]]] = {}
        """Per kept shot (frame id): its registered view and the instruments found in it."""
        self._before_shot: dict[int, dict[int, tuple[View, tuple[ViewDetection, ...]]]] = {}
        """Per kept shot (frame id): ``_shot_detections`` as it was when that shot arrived."""
        for name in self.settings.detect_instruments:
            if name not in self.instruments:
                raise InstrumentError(f"unknown instrument {name!r} to detect; known instruments: "
                                      f"{', '.join(self.instruments)}")
        self._undistort = None
        if self.settings.distortion is not None:
            from calibration.distortion import undistort_maps
            from calibration.files import distortion_model

            model = distortion_model(self.settings.distortion)
            self._undistort = (model, undistort_maps(model))

    # -- start-up ------------------------------------------------------------------------

    def warm_up(self, *, parallel: bool = True) -> float:
        """Load now what the first registration would otherwise load on its first calls,
        while no frame is being registered; returns the seconds it took.

        That is numba's DRR kernels, one-thread and parallel (read from numba's disk cache,
        compiled only when the cache is missing or stale) with numba's thread pool, and the
        rendering volumes of ``settings.level`` (built once, then kept by the registrator).
        It renders a 16 x 16 px DRR of the anatomy (bone and soft tissue) of every pyramid
        level with each kernel, in a view of the registration's rotation centre: the same
        argument types as the registration's renders, so the same compiled code. Nothing is
        registered or published. ``parallel=False``: the one-thread kernel only, no thread
        started (what a supervisor does before it forks workers, ``guidance.live.supervisor``)."""
        t0 = time.perf_counter()
        self.warming_up = True
        try:
            level = self.settings.level
            view = carm_view(isocenter_world=self.registrator.centre(level)).downsampled(32)
            for spacing_mm in self.registrator.prepared.spacings_mm:
                anatomy = self.registrator.anatomy(level, spacing_mm)
                for kernel_parallel in (False, True) if parallel else (False,):
                    anatomy.render(view, parallel=kernel_parallel)
        finally:
            self.warming_up = False
        return time.perf_counter() - t0

    # -- frames --------------------------------------------------------------------------

    def on_frame(self, frame: Frame, received_ns: int | None = None) -> list[Message]:
        """Register one frame with the C-arm and reference samples acquired nearest to it
        (``paired_with``, now); returns the PoseResult (and an Overlay when enabled)."""
        return self.on_paired_frame(frame, self.paired_with(frame), received_ns)

    def on_paired_frame(self, frame: Frame, paired: tuple[TrackerSample, TrackerSample] | None,
                        received_ns: int | None = None) -> list[Message]:
        """``on_frame`` with the frame's samples paired already, when it arrived: a frame that
        waits while a long registration runs must not outlive the samples' history."""
        received_ns = time.time_ns() if received_ns is None else received_ns
        t0 = time.perf_counter()
        self.stats.frames_processed += 1
        self.frame_id = frame.frame_id
        self.last_frame_ns = received_ns
        try:
            frame, image = self._prepare(frame)
        except (ImageError, ViewError, CalibrationError) as exc:
            self.stats.frames_rejected += 1
            self._log.warning(f"rejected frames from {frame.source!r}", f"frame {frame.frame_id}: {exc}")
            return [self._failed(frame, f"bad frame: {exc}", t0, received_ns)]
        t1 = time.perf_counter()
        level = self.settings.level
        self.registering = self.last_good is None  # a global registration (tracking otherwise)
        try:
            outcome = self.shots.register(self._shot(frame, image, paired), self.last_good,
                                          self.T_reference_from_world)
        finally:
            self.registering = False
        result, mode = outcome.result, outcome.mode
        self.stats.tracking_updates += outcome.tracking_runs
        self.stats.tracking_fallbacks += outcome.fallbacks
        self.stats.global_registrations += outcome.global_runs
        if outcome.fallbacks:
            log.info("frame %d: tracking failed; global registration", frame.frame_id)
        t2 = time.perf_counter()
        self.last_ok = result.ok
        if result.ok:
            self.last_good = result
            self._register_reference(result, frame, paired)
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
            shots=outcome.shot_frame_ids if result.ok else [],
            uncertainty_in_plane_mm=_finite_or_none(result.uncertainty_in_plane_mm),
            uncertainty_depth_mm=_finite_or_none(result.uncertainty_depth_mm),
        )
        self.results += 1
        out: list[Message] = [pose]
        if result.ok and self.settings.detect_instruments and not self._instrument_tracked():
            if len(result.views) == len(outcome.shot_frame_ids) > 1:  # a joint registration re-placed the shots
                for frame_id, view in zip(outcome.shot_frame_ids[1:], result.views[1:]):
                    if frame_id in self._shot_detections:
                        self._shot_detections[frame_id] = (view, self._shot_detections[frame_id][1])
            out += self._detected_instruments(image.image, result.views[0],  # views[0]: this frame
                                              _finite_or_none(result.uncertainty_in_plane_mm) or 0.0)
        if self.settings.overlay:
            out.append(self._overlay(frame, result))
        return out

    def _prepare(self, frame: Frame) -> tuple[Frame, PreparedImage]:
        """The frame with its calibrated view and its image undistorted and preprocessed, its
        geometry checked (raises ImageError, ViewError or CalibrationError naming what is wrong)."""
        if self.settings.carm is not None:
            frame = replace(frame, view=calibrated_view(self.settings.carm, frame.view, frame.source))
        pixels = frame.pixels
        if self._undistort is not None:
            from calibration.distortion import undistort_image
            from calibration.files import check_matches

            check_matches(self.settings.distortion, image_size=frame.view.image_size, device_id=frame.source)
            model, maps = self._undistort
            pixels = undistort_image(pixels, model, maps=maps)
        image = preprocess(pixels, frame.view)
        self._check_geometry(frame)
        return frame, image

    def _instrument_tracked(self) -> bool:
        """Whether a tracker sample of a known instrument has arrived."""
        with self._lock:
            return any(t in self.instruments for t in self.tracker.latest_per_tool())

    def _shot(self, frame: Frame, image: PreparedImage, paired: tuple[TrackerSample, TrackerSample] | None) -> Shot:
        """The frame as a shot, with the C-arm and reference array samples acquired with it
        (``paired``, see ``paired_with``; None: untracked shot)."""
        carm, reference = (None, None) if paired is None else paired
        return Shot(frame_id=frame.frame_id, acquired_ns=frame.acquired_ns, image=image, view=frame.view,
                    T_tracker_from_cam=None if carm is None else carm.T_tracker_from_tool,
                    T_tracker_from_reference=None if reference is None else reference.T_tracker_from_tool)

    def wants_shot(self, frame: Frame) -> bool:
        """Whether ``frame`` brings an orientation the shot book lacks (worth keeping when skipped)."""
        return self.shots.book.is_new_orientation(frame.view)

    def on_skipped_frame(self, frame: Frame, paired: tuple[TrackerSample, TrackerSample] | None = None) -> None:
        """A frame not registered because a newer one waited: kept as a shot when it brings
        an orientation the shot book lacks (e.g. a lateral shot taken during a registration).
        ``paired``: its C-arm and reference samples, paired when it arrived (default: now)."""
        if not self.wants_shot(frame):
            return
        paired = self.paired_with(frame) if paired is None else paired
        try:
            self.shots.note(self._shot(*self._prepare(frame), paired))
        except (ImageError, ViewError, CalibrationError) as exc:
            log.warning("skipped frame %d not kept as a shot: %s", frame.frame_id, exc)

    def _detected_instruments(self, image: np.ndarray, view: View, view_sigma_mm: float) -> list[InstrumentState]:
        """Instruments found in the registered frame itself (no tracker; ``view``: its
        registered geometry, ``view_sigma_mm`` its in-plane uncertainty), as image-derived
        states; the depth along the viewing ray comes from another kept shot where the
        instrument was found too (``_with_other_shots``), else from the bone (labels or the CT),
        and then the axis is the one of the view's two mirror poses nearer a planned trajectory
        (``mirrored_about_ray``)."""
        from guidance.navigation.detection import detect_instruments, mirrored_about_ray

        models = [self.instruments[name] for name in self.settings.detect_instruments]
        bone = self.labels if self.labels is not None else self.registrator.mu
        try:
            estimates = detect_instruments([image], [view], models,
                                           focus_world=self.registrator.centre(self.settings.level), bone=bone)
        except GuidanceError as exc:
            log.warning("frame %d: instrument detection failed: %s", self.frame_id, exc)
            return []
        kept = set(self.shots.book.frame_ids)
        self._shot_detections = {k: v for k, v in self._shot_detections.items() if k in kept}
        self._before_shot = {k: v for k, v in self._before_shot.items() if k in kept}
        if self.frame_id in kept:
            self._before_shot[self.frame_id] = dict(self._shot_detections)
            self._shot_detections[self.frame_id] = (view, tuple(e.detections[0] for e in estimates))
        states = []
        for estimate in estimates:
            estimate = self._with_other_shots(estimate, view, view_sigma_mm)
            fields = {}
            if self.plan:  # one view's two mirror poses: the one along a plan
                poses = (estimate, mirrored_about_ray(estimate, view)) if estimate.n_views == 1 else (estimate,)
                estimate, trajectory, deviation = min(
                    ((e, *nearest_trajectory(e.tip_world, e.axis_world, self.plan)) for e in poses),
                    key=lambda placed: placed[2]["angle_to_trajectory_deg"])
                fields = {"plan_level": trajectory.get("level"), "plan_side": trajectory.get("side"),
                          **{k: deviation[k] for k in ("distance_to_trajectory_mm", "angle_to_trajectory_deg",
                                                       "depth_along_trajectory_mm", "tip_to_target_mm")}}
            states.append(InstrumentState(frame_id=self.frame_id, tool_id=estimate.model.name,
                                          tip_world=estimate.tip_world, axis_world=estimate.axis_world, status="ok",
                                          image_derived=True, source=self.settings.source,
                                          uncertainty_in_plane_mm=_finite_or_none(estimate.tip_sigma_mm),
                                          uncertainty_depth_mm=_finite_or_none(estimate.depth_sigma_mm),
                                          uncertainty_axis_deg=_finite_or_none(estimate.axis_sigma_deg), **fields))
        return states

    def _with_other_shots(self, estimate: InstrumentEstimate, view: View, view_sigma_mm: float) -> InstrumentEstimate:
        """A single-view estimate made full 3D with the same instrument found in a kept shot
        of another orientation (``combine_with_earlier_view``: the shaft planes of the two
        registered views, the tip on this frame's ray, so the instrument may have moved along
        its axis since that shot; or, where the planes nearly coincide, the two tip rays,
        when a kept shot of this frame's orientation taken no later than that shot shows
        how far it can have moved since: ``_still_since``); the one with the smallest depth
        uncertainty, the estimate as it was (depth from the anatomy) included where the
        combinations do not refute it (``most_certain``)."""
        from guidance.navigation.detection import combine_with_earlier_view, most_certain

        if estimate.n_views != 1:
            return estimate
        options = []
        for frame_id, (shot_view, detections) in self._shot_detections.items():
            if frame_id == self.frame_id:
                continue
            for earlier in detections:
                combined = combine_with_earlier_view(
                    estimate.detections[0], view, earlier, shot_view, view_sigma_mm=view_sigma_mm,
                    still_since=self._still_since(estimate.detections[0], view, frame_id))
                if combined is not None:
                    options.append(combined)
        return most_certain(estimate, options)

    def _still_since(self, detection: ViewDetection, view: View, other_frame_id: int
                     ) -> tuple[ViewDetection, View] | None:
        """The instrument of ``detection`` as found in a shot of ``view``'s orientation kept
        when shot ``other_frame_id`` arrived (so acquired before it): its detection and
        registered view, or None. How far the tip has moved in this orientation since then
        bounds its travel since the other shot."""
        beam = beam_direction_world(view)
        for shot_view, detections in self._before_shot.get(other_frame_id, {}).values():
            if angle_between_deg(beam_direction_world(shot_view), beam) >= self.shots.book.settings.min_separation_deg:
                continue
            for found in detections:
                if found.model.name == detection.model.name:
                    return found, shot_view
        return None

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

    def failed_pose(self, frame: Frame, reason: str) -> PoseResult:
        """A "failed" PoseResult for ``frame`` (e.g. after an unexpected error)."""
        return self._failed(frame, reason, time.perf_counter(), time.time_ns())

    def _failed(self, frame: Frame, reason: str, t0: float, received_ns: int) -> PoseResult:
        self.stats.failed += 1
        self.last_ok = False
        self.results += 1
        return PoseResult(frame_id=frame.frame_id, status="failed", reason=reason, confidence=0.0, mode="global",
                          latency_ms={"queue": max(0.0, (received_ns - frame.acquired_ns) / 1e6),
                                      "preprocess": (time.perf_counter() - t0) * 1e3},
                          frame_acquired_ns=frame.acquired_ns, source=self.settings.source)

    def _overlay(self, frame: Frame, result: RegistrationResult) -> Overlay:
        """The frame with the plan, vertebra outline and instrument drawn at the registered pose."""
        from guidance.navigation.overlay import draw_instrument, draw_outline, draw_trajectories, to_display_bgr

        bgr = to_display_bgr(frame.pixels, intensity=frame.view.intensity)
        if result.ok:
            view = result.views[0]
            bgr = draw_trajectories(bgr, view, self.plan)
            if self.labels is not None and self.settings.level is not None:
                bgr = draw_outline(bgr, view, self.labels, self.settings.level)
            with self._lock:
                samples = self.tracker.latest_per_tool()
            for tool_id, sample in samples.items():
                if tool_id in self.instruments and self.T_reference_from_world is not None:
                    T_tracker_from_reference = self._reference_for(sample)
                    if T_tracker_from_reference is not None:
                        tip, axis = self._tip_and_axis(sample, T_tracker_from_reference)
                        bgr = draw_instrument(bgr, view, tip, axis, self.instruments[tool_id].length_mm)
        ok, data = cv2.imencode(".png", bgr)
        if not ok:
            raise RuntimeError(f"PNG encoding of the overlay of frame {frame.frame_id} failed")
        return Overlay(frame_id=frame.frame_id, encoding="png", data=data.tobytes(), source=self.settings.source)

    # -- intra-op volumes -----------------------------------------------------------------

    def reference_at(self, acquired_ns: int) -> TrackerSample | None:
        """The reference array sample acquired nearest to ``acquired_ns`` (within the
        pairing tolerance), or None."""
        with self._lock:
            return self.tracker.nearest(self.settings.reference_tool, acquired_ns, self.tolerance_ns)

    def on_volume(self, volume: Volume, *, acquired_ns: int, volume_id: int = 0,
                  T_tracker_from_scanner: np.ndarray | None = None, received_ns: int | None = None,
                  reference: TrackerSample | None = None) -> list[Message]:
        """Register an intra-op CT / CBCT (HU, scanner LPS frame) to the pre-op CT; returns its
        PoseResult (mode "volume", ``frame_id`` = ``volume_id``). With the scanner's pose in the
        tracker frame and a reference array sample, instruments are mapped through it from now on.
        ``reference``: that sample when it was paired on arrival (``reference_at``), else it is
        paired now, before the registration, which outlasts the tracker history.
        The entry point for any volume receiver (wire, DICOM)."""
        received_ns = time.time_ns() if received_ns is None else received_ns
        t0 = time.perf_counter()
        self.stats.volumes_received += 1
        reference = self.reference_at(acquired_ns) if reference is None else reference
        try:
            if self.ct is None:
                raise IntraopError("this pipeline was built without the pre-op CT: it cannot register volumes")
            result = register_intraop(self.ct, volume, labels=self.labels, level=self.settings.level,
                                      settings=self.settings.intraop)
        except IntraopError as exc:
            self.stats.volumes_rejected += 1
            log.warning("volume %d rejected: %s", volume_id, exc)
            return [PoseResult(frame_id=volume_id, status="failed", reason=f"bad volume: {exc}", confidence=0.0,
                               mode="volume", frame_acquired_ns=acquired_ns, source=self.settings.source,
                               latency_ms={"queue": max(0.0, (received_ns - acquired_ns) / 1e6)})]
        self.last_ok = result.ok
        if result.ok and T_tracker_from_scanner is not None and reference is not None:
            self.T_reference_from_world = (invert_rigid(reference.T_tracker_from_tool) @ T_tracker_from_scanner
                                           @ result.T_scanner_from_world)
        elif result.ok:
            log.info("volume %d registered; instruments not mapped through it (scanner pose in the tracker "
                     "or reference array sample within the pairing tolerance unknown)", volume_id)
        T = result.T_world_corrected_from_world if result.ok else None
        level = self.settings.level
        return [PoseResult(frame_id=volume_id, status=result.status, reason=result.reason,
                           T_world_corrected_from_world=T, mode="volume", similarity=result.ncc,
                           confidence=result.confidence, level_poses={str(level): T} if T is not None and level
                           is not None else {}, frame_acquired_ns=acquired_ns, source=self.settings.source,
                           latency_ms={"queue": max(0.0, (received_ns - acquired_ns) / 1e6),
                                       "registration": (time.perf_counter() - t0) * 1e3,
                                       "total": max(0.0, (time.time_ns() - acquired_ns) / 1e6)})]

    def on_volume_frame(self, msg: VolumeFrame, reference: TrackerSample | None = None) -> list[Message]:
        """``on_volume`` for a volume received on the bus."""
        return self.on_volume(volume_from_message(msg), acquired_ns=msg.acquired_ns, volume_id=msg.volume_id,
                              T_tracker_from_scanner=msg.T_tracker_from_scanner, reference=reference)

    # -- tracker -------------------------------------------------------------------------

    @property
    def tolerance_ns(self) -> int:
        return int(self.settings.pair_tolerance_ms * 1e6)

    def paired_with(self, frame: Frame) -> tuple[TrackerSample, TrackerSample] | None:
        """The C-arm and reference samples acquired nearest to ``frame`` (within the
        tolerance), or None when either is missing."""
        with self._lock:
            carm = self.tracker.nearest(self.settings.carm_tool, frame.acquired_ns, self.tolerance_ns)
            reference = self.tracker.nearest(self.settings.reference_tool, frame.acquired_ns, self.tolerance_ns)
            if carm is None or reference is None:
                if self.tracker.latest(self.settings.reference_tool) is not None:
                    self._log.warning("reference array not registered",
                                      f"no C-arm and reference samples within {self.settings.pair_tolerance_ms:g} ms "
                                      f"of frame {frame.frame_id}")
                return None
        return carm, reference

    def _register_reference(self, result: RegistrationResult, frame: Frame,
                            paired: tuple[TrackerSample, TrackerSample] | None) -> None:
        """Pose of the CT in the patient reference array from this registration and the
        C-arm and reference samples acquired with the frame (``paired``):
        ``T_reference_from_world = inv(T_tracker_from_reference) @ T_tracker_from_cam @ T_cam_from_world``."""
        if paired is None:
            return
        carm, reference = paired
        T_tracker_from_world = carm.T_tracker_from_tool @ result.views[0].T_cam_from_world
        self.T_reference_from_world = invert_rigid(reference.T_tracker_from_tool) @ T_tracker_from_world

    def _reference_for(self, sample: TrackerSample) -> np.ndarray | None:
        """``T_tracker_from_reference`` for an instrument reading: the reference acquired with
        it (its own), or the reference sample nearest to it within the tolerance; None otherwise."""
        if sample.T_tracker_from_reference is not None:
            return sample.T_tracker_from_reference
        with self._lock:
            reference = self.tracker.nearest(self.settings.reference_tool, sample.acquired_ns, self.tolerance_ns)
        return None if reference is None else reference.T_tracker_from_tool

    def _tip_and_axis(self, sample: TrackerSample,
                      T_tracker_from_reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tip and axis in the CT of an instrument reading, through the reference paired with it."""
        T_world_from_tool = tool_in_world(sample.T_tracker_from_tool, T_tracker_from_reference,
                                          self.T_reference_from_world)
        return tip_and_axis(T_world_from_tool, self.instruments[sample.tool_id])

    def _corridor(self, trajectory: dict) -> CorridorModel | None:
        """The corridor model of a planned trajectory (built once), None without CT and labels
        or when it cannot be modelled (logged once)."""
        key = self.plan.index(trajectory)
        if key not in self._corridors:
            model = None
            if self.ct is not None and self.labels is not None:
                try:
                    model = build_corridor(self.ct, self.labels, trajectory)
                except BreachError as exc:
                    log.warning("no breach prediction for %s %s: %s", trajectory.get("level"),
                                trajectory.get("side"), exc)
            self._corridors[key] = model
        return self._corridors[key]

    def _targets(self, sample: TrackerSample) -> list[Message]:
        """Every planned trajectory as a target pose in the tracker frame (throttled)."""
        due = self._targets_sent_ns is None or (
            sample.acquired_ns - self._targets_sent_ns >= self.settings.target_period_s * 1e9)
        if not self.plan or self.T_reference_from_world is None or not due:
            return []
        self._targets_sent_ns = sample.acquired_ns
        return [TargetPose(level=t["level"], side=t["side"], approach=trajectory_approach(t),
                           T_tracker_from_target=target_pose_tracker(t, sample.T_tracker_from_tool,
                                                                     self.T_reference_from_world),
                           length_mm=float(np.linalg.norm(np.subtract(t["target_world"], t["entry_world"]))),
                           source=self.settings.source)
                for t in self.plan]

    def _guide(self, sample: TrackerSample, tip: np.ndarray, axis: np.ndarray,
               T_tracker_from_reference: np.ndarray) -> list[Message]:
        """The alignment of a tracked aiming guide to its nearest planned trajectory
        (``T_tracker_from_reference``: the reference acquired with the guide's sample)."""
        if not self.plan:
            return []
        trajectory, _ = nearest_trajectory(tip, axis, self.plan)
        T_world_from_target = target_pose_world(trajectory)
        entry_error, angle, aligned = guide_alignment(tip, axis, T_world_from_target)
        return [TargetPose(level=trajectory["level"], side=trajectory["side"], approach=trajectory_approach(trajectory),
                           T_tracker_from_target=target_pose_tracker(trajectory, T_tracker_from_reference,
                                                                     self.T_reference_from_world),
                           length_mm=float(np.linalg.norm(np.subtract(trajectory["target_world"],
                                                                      trajectory["entry_world"]))),
                           guide_tool_id=sample.tool_id, guide_entry_error_mm=entry_error,
                           guide_angle_error_deg=angle, guide_aligned=aligned, source=self.settings.source)]

    def on_tracker(self, sample: TrackerSample) -> list[Message]:
        """Store a tracker sample; see ``on_tracker_samples``."""
        return self.on_tracker_samples([sample])

    def on_tracker_samples(self, samples: Sequence[TrackerSample]) -> list[Message]:
        """Store tracker samples (any number); for the latest reading of each tool among them
        (older readings are coalesced): a known instrument's state in the CT (with the breach
        prediction when the pipeline has the CT and labels; for an aiming guide also its
        alignment), for the reference array the planned target poses (throttled)."""
        latest: dict[str, TrackerSample] = {}
        with self._lock:
            for sample in samples:
                if self.tracker.add(sample):
                    latest[sample.tool_id] = sample
        self.stats.tracker_samples += len(samples)
        self.stats.tracker_coalesced += len(samples) - len(latest)
        out: list[Message] = []
        for sample in latest.values():
            if sample.tool_id in self.instrument_refusals:
                self.stats.instruments_refused += 1
                if self.stats.instruments_refused == 1:
                    log.warning("instrument %s refused: %s", sample.tool_id, self.instrument_refusals[sample.tool_id])
            elif sample.tool_id == self.settings.reference_tool:
                out += self._targets(sample)
            elif sample.tool_id in self.instruments and self.T_reference_from_world is not None:
                out += self._instrument_state(sample)
        return out

    def _instrument_state(self, sample: TrackerSample) -> list[Message]:
        """The instrument's state in the CT (and a guide's alignment); "not_tracked" without a
        reference sample acquired with it."""
        common = {"frame_id": self.frame_id, "tool_id": sample.tool_id, "acquired_ns": sample.acquired_ns,
                  "source": self.settings.source}
        T_tracker_from_reference = self._reference_for(sample)
        if T_tracker_from_reference is None:
            self.stats.instruments_not_tracked += 1
            return [InstrumentState(tip_world=None, axis_world=None, status="not_tracked", **common)]
        tip, axis = self._tip_and_axis(sample, T_tracker_from_reference)
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
            metrics = guidance_metrics(tip, axis, trajectory, self._corridor(trajectory))
            fields["to_target_along_plan_mm"] = metrics["to_target_along_plan_mm"]
            for key in ("breach_mm", "breach_grade", "breach_side", "breach_warning", "clearance_mm",
                        "travel_to_breach_mm"):
                fields[key] = metrics.get(key)
        out: list[Message] = [InstrumentState(tip_world=tip, axis_world=axis,
                                              status="ok" if self.last_ok else "registration_failed",
                                              **common, **fields)]
        if self.instruments[sample.tool_id].kind == "guide":
            out += self._guide(sample, tip, axis, T_tracker_from_reference)
        return out

    def heartbeat_state(self, now_ns: int | None = None) -> str:
        """What the pipeline is doing: "warming_up" (``warm_up`` runs), "registering" (a
        global registration runs, or frames came and no pose yet), "no_frames" (none within
        ``no_frames_after_s``), "tracking" (last pose ok) or "failed" (last pose failed)."""
        if self.warming_up:
            return "warming_up"
        now_ns = time.time_ns() if now_ns is None else now_ns
        no_frames = self.last_frame_ns is None or now_ns - self.last_frame_ns > self.settings.no_frames_after_s * 1e9
        if self.registering or (self.results == 0 and not no_frames):
            return "registering"
        if no_frames:
            return "no_frames"
        return "tracking" if self.last_ok else "failed"


def _finite_or_none(value: float) -> float | None:
    """A finite number for the wire, None for an unknown (infinite or NaN) one."""
    return float(value) if np.isfinite(value) else None
