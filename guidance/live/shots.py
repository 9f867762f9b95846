"""Multi-shot registration in fluoro navigation: the last shot of each distinct C-arm
orientation, registered jointly, and tracking between shots that keeps the depth the
joint registration fixed.

One view observes the anatomy's depth along its beam only through magnification; an
AP and a lateral shot together fix it. ``ShotBook`` keeps the newest shot of each
orientation (how many, how far apart, how old: ``ShotSettings``); ``joint_views``
expresses every kept shot for one shared correction ``T_world_corrected_from_world``
(CONVENTIONS.md) valid at the newest shot: the shots' relative C-arm poses come from
the tracker (C-arm array and patient reference array, which also cancels the patient's
motion between shots) or, without tracker samples, from the nominal views (the C-arm's
encoders). ``ShotRegistrar`` decides per frame: a joint registration when a frame
brings an orientation the book lacks, else a tracking update started from the
tracker's prediction (the reference array's motion since the last registration) and
held at the joint solution's depth by a tight prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid
from guidance.core.images import PreparedImage
from guidance.core.views import View
from guidance.registration.register import LeastSquaresJacobian, RegistrationResult, Registrator
from guidance.registration.tracking import TrackingSettings, track

__all__ = ["ShotSettings", "Shot", "ShotBook", "ShotOutcome", "ShotRegistrar", "beam_direction_world",
           "angle_between_deg", "joint_views", "predicted_correction"]

NS_PER_S = 1_000_000_000


class ShotError(GuidanceError):
    """Shot settings that cannot work (no room for a shot, negative angles or ages)."""


@dataclass(frozen=True)
class ShotSettings:
    """``max_shots``: orientations kept (the oldest goes first); ``min_separation_deg``:
    beams closer than this are one orientation (the newer shot replaces the older);
    ``max_age_s``: shots older than this (acquisition time) are forgotten;
    ``depth_sd_mm`` / ``tilt_sd_deg``: prior standard deviation of tracking updates on
    depth (mm along the beam) and on the out-of-plane tilts (deg) while a joint
    registration anchors them."""

    max_shots: int = 2
    min_separation_deg: float = 30.0
    max_age_s: float = 600.0
    depth_sd_mm: float = 0.3
    tilt_sd_deg: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_shots, bool) or not isinstance(self.max_shots, int) or self.max_shots < 1:
            raise ShotError(f"max_shots must be an integer >= 1; got {self.max_shots!r}")
        for name in ("min_separation_deg", "max_age_s", "depth_sd_mm", "tilt_sd_deg"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ShotError(f"{name} must be a positive number; got {value!r}")


@dataclass(frozen=True)
class Shot:
    """One preprocessed image with its nominal view and, when tracked, the C-arm and the
    patient reference array in the tracker frame at its acquisition."""

    frame_id: int
    acquired_ns: int
    image: PreparedImage
    view: View
    T_tracker_from_cam: np.ndarray | None = None
    T_tracker_from_reference: np.ndarray | None = None

    @property
    def tracked(self) -> bool:
        return self.T_tracker_from_cam is not None and self.T_tracker_from_reference is not None


def beam_direction_world(view: View) -> np.ndarray:
    """Unit direction (world) of the principal ray, source towards detector: the camera's
    +z axis, the third row of the rotation of ``T_cam_from_world``."""
    return np.asarray(view.T_cam_from_world, dtype=float)[2, :3].copy()


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (deg, 0..180) between two directions."""
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


class ShotBook:
    """The newest shot of each distinct orientation, oldest first."""

    def __init__(self, settings: ShotSettings | None = None) -> None:
        self.settings = settings or ShotSettings()
        self._shots: list[Shot] = []

    @property
    def shots(self) -> tuple[Shot, ...]:
        return tuple(self._shots)

    @property
    def frame_ids(self) -> tuple[int, ...]:
        return tuple(s.frame_id for s in self._shots)

    def expire(self, now_ns: int) -> None:
        """Forget shots acquired more than ``max_age_s`` before ``now_ns``."""
        oldest_ns = now_ns - int(self.settings.max_age_s * NS_PER_S)
        self._shots = [s for s in self._shots if s.acquired_ns >= oldest_ns]

    def is_new_orientation(self, view: View) -> bool:
        """Whether no kept shot looks along (within ``min_separation_deg``) this view's beam."""
        beam = beam_direction_world(view)
        return all(angle_between_deg(beam_direction_world(s.view), beam) >= self.settings.min_separation_deg
                   for s in self._shots)

    def add(self, shot: Shot) -> bool:
        """Keep ``shot`` as the newest of its orientation; True when the book had no shot
        of that orientation (expired ones do not count)."""
        self.expire(shot.acquired_ns)
        beam = beam_direction_world(shot.view)
        same = [s for s in self._shots
                if angle_between_deg(beam_direction_world(s.view), beam) < self.settings.min_separation_deg]
        self._shots = [s for s in self._shots if s not in same] + [shot]
        del self._shots[:-self.settings.max_shots]
        return not same


def joint_views(shots: list[Shot] | tuple[Shot, ...], anchor: Shot) -> list[View]:
    """The views of ``shots`` for one correction shared with ``anchor`` (valid at the
    anchor's acquisition): a tracked shot's pose is the anchor's nominal pose moved by
    the C-arm's motion relative to the patient between the two,
    ``T_cam_i_from_cam_a = inv(T_tracker_from_cam_i) @ T_tracker_from_ref_i @
    inv(T_tracker_from_ref_a) @ T_tracker_from_cam_a``; an untracked shot keeps its
    nominal (encoder) view."""
    out = []
    for shot in shots:
        if shot is anchor or not (shot.tracked and anchor.tracked):
            out.append(shot.view)
            continue
        T_cam_i_from_cam_a = (invert_rigid(shot.T_tracker_from_cam) @ shot.T_tracker_from_reference
                              @ invert_rigid(anchor.T_tracker_from_reference) @ anchor.T_tracker_from_cam)
        out.append(shot.view.with_pose(T_cam_i_from_cam_a @ anchor.view.T_cam_from_world))
    return out


def predicted_correction(shot: Shot, T_reference_from_world: np.ndarray) -> np.ndarray | None:
    """The correction the tracker predicts for a tracked shot from an earlier
    registration's ``T_reference_from_world`` (the CT in the patient reference array):
    ``T_cam_from_world = inv(T_tracker_from_cam) @ T_tracker_from_reference @
    T_reference_from_world`` and ``T_corr = inv(T_cam_from_world) @ T_cam_from_world_nominal``.
    None for an untracked shot."""
    if not shot.tracked:
        return None
    T_cam_from_world = invert_rigid(shot.T_tracker_from_cam) @ shot.T_tracker_from_reference @ T_reference_from_world
    return invert_rigid(T_cam_from_world) @ shot.view.T_cam_from_world


@dataclass
class ShotOutcome:
    """The registration of one frame: ``mode`` "global" (joint or single) or "tracking";
    ``shot_frame_ids``: the frames whose (joint) registration fixes this pose's depth;
    counts of the registrations run."""

    result: RegistrationResult
    mode: str
    shot_frame_ids: list[int] = field(default_factory=list)
    global_runs: int = 0
    tracking_runs: int = 0
    fallbacks: int = 0


class ShotRegistrar:
    """Per frame, the registration multi-shot fluoro navigation calls for (no sockets)."""

    def __init__(self, registrator: Registrator, *, level: int | None = None,
                 tracking: TrackingSettings | None = None, settings: ShotSettings | None = None) -> None:
        self.registrator = registrator
        self.level = level
        self.tracking = tracking or TrackingSettings()
        self.book = ShotBook(settings)
        self.anchor_ids: list[int] = []
        """Frame ids of the last joint registration (empty: none, or it failed or aged out)."""
        self._anchor_ns = 0
        self._pending = False
        self._jacobian: tuple[View, TrackingSettings, LeastSquaresJacobian | None] | None = None
        """The last tracking update's view, settings and least-squares Jacobian."""
        self._anchor_reference: np.ndarray | None = None
        """``T_reference_from_world`` registered from the last joint registration."""

    @property
    def settings(self) -> ShotSettings:
        return self.book.settings

    def note(self, shot: Shot) -> None:
        """Keep a frame the pipeline skips (a newer one was waiting) as a shot; a new
        orientation makes the next frame's registration a joint one."""
        self._pending |= self.book.add(shot)

    def register(self, shot: Shot, previous: RegistrationResult | None,
                 T_reference_from_world: np.ndarray | None) -> ShotOutcome:
        """Register ``shot``: jointly with the other kept shots when it brings a new
        orientation, else by tracking from ``previous`` (a good result; None: global),
        started at the tracker's prediction when ``T_reference_from_world`` is known."""
        new_orientation = self.book.add(shot)
        if shot.acquired_ns - self._anchor_ns > self.settings.max_age_s * NS_PER_S:
            self.anchor_ids = []
        initial = None if previous is None else previous.T_world_corrected_from_world
        if T_reference_from_world is not None and previous is not None:
            predicted = predicted_correction(shot, self._reference_to_predict_from(T_reference_from_world))
            initial = initial if predicted is None else predicted
        others = [s for s in self.book.shots if s is not shot]
        if (new_orientation or self._pending) and others:
            return self._joint(shot, others, initial)
        if initial is not None:
            settings = self._tracking_settings()
            result = track(self.registrator, [shot.image], [shot.view], initial, level=self.level,
                           settings=settings, jacobian=self._previous_jacobian(shot.view, settings))
            self._jacobian = (shot.view, settings, result.jacobian) if result.ok else None
            if result.ok:
                ids = self.anchor_ids if self.anchor_ids else [shot.frame_id]
                return ShotOutcome(result, "tracking", list(ids), tracking_runs=1)
            outcome = self._joint(shot, others, None) if others else self._single(shot)
            outcome.tracking_runs, outcome.fallbacks = 1, 1
            return outcome
        return self._joint(shot, others, None) if others else self._single(shot)

    def _reference_to_predict_from(self, T_reference_from_world: np.ndarray) -> np.ndarray:
        """While a joint registration anchors the depth: the CT's pose in the reference array
        registered from it (the first one given after it), so that tracking noise does not
        random-walk the depth and tilts through a re-registration every frame (measured: the
        median pose error grew from 0.26 to 1.08 mm over 2 minutes); otherwise the latest."""
        if not self.anchor_ids:
            return T_reference_from_world
        if self._anchor_reference is None:
            self._anchor_reference = np.array(T_reference_from_world, dtype=float)
        return self._anchor_reference

    def _previous_jacobian(self, view: View, settings: TrackingSettings) -> LeastSquaresJacobian | None:
        """The last tracking update's Jacobian when it was made with this view geometry
        (same C-arm pose, intrinsics and image size) and these settings; else None."""
        if self._jacobian is None:
            return None
        previous_view, previous_settings, jacobian = self._jacobian
        same_view = (previous_view.image_size == view.image_size and np.array_equal(previous_view.K, view.K)
                     and np.array_equal(previous_view.T_cam_from_world, view.T_cam_from_world))
        return jacobian if same_view and previous_settings == settings else None

    def _tracking_settings(self) -> TrackingSettings:
        """Tracking with the depth and tilts held near the start while a joint
        registration anchors them."""
        if not self.anchor_ids:
            return self.tracking
        sd = list(self.tracking.motion_sd)
        sd[0] = sd[1] = self.settings.tilt_sd_deg
        sd[5] = self.settings.depth_sd_mm
        return replace(self.tracking, motion_sd=tuple(sd))

    def _single(self, shot: Shot) -> ShotOutcome:
        self.anchor_ids = []
        self._jacobian = None
        result = self.registrator.register([shot.image], [shot.view], level=self.level)
        return ShotOutcome(result, "global", [shot.frame_id], global_runs=1)

    def _joint(self, shot: Shot, others: list[Shot], initial: np.ndarray | None) -> ShotOutcome:
        """All kept shots at once, ``shot`` first (its view is the result's views[0])."""
        shots = [shot, *others]
        self._pending = False
        self._jacobian = None
        self._anchor_reference = None
        views = joint_views(shots, shot)
        result = self.registrator.register([s.image for s in shots], views, level=self.level,
                                           initial_T_world_corrected_from_world=initial)
        ids = [s.frame_id for s in shots]
        self.anchor_ids = ids if result.ok else []
        self._anchor_ns = min(s.acquired_ns for s in shots)
        return ShotOutcome(result, "global", ids, global_runs=1)
