"""Scripted intra-operative scenarios: a C-arm, a moving patient and a tracked instrument.

Frames (docs/conventions.md): world = LPS mm of the pre-operative CT (the phantom, or a
real CT: ``sim.subject.Subject``); camera =
the C-arm source frame (OpenCV pinhole); tool / reference / tracker = the frames of the
instrument's marker array, the patient reference array and the optical tracker.

What the system believes and what really happens:

- The *nominal* view is the C-arm geometry (``guidance.core.views.carm_view``, patient prone,
  isocentre at the body centre of the target vertebra) as the C-arm and the pre-op plan
  give it: ``T_cam_from_world_nominal``.
- The anatomy really sits moved by a world-frame rigid motion ``M(t)``: a seeded initial
  misplacement (``initial_misalignment_mm`` translation in a random direction and
  ``initial_misalignment_deg`` rotation about a random axis through the isocentre), then
  breathing, a sinusoidal translation along y (anterior-posterior) of
  ``breathing_amplitude_mm`` with period ``breathing_period_s``:
  ``M(t) = Trans(0, A sin(2 pi t / P), 0) @ M0``. A CT point X lies at ``M X``.
- Hence the actual camera pose ``T_cam_from_world = T_cam_from_world_nominal @ M`` and
  the correction a registration should find, ``T_world_corrected_from_world = inv(M)``.
- The optical tracker is fixed in the room and calibrated to the C-arm: for every shot
  ``T_tracker_from_cam`` is known exactly. A tracked pose is
  ``T_tracker_from_tool = T_tracker_from_cam @ T_cam_from_world @ T_world_from_tool``
  (reference array and instrument get seeded tracker noise in their own frame).
- The instrument follows the planned trajectory of ``target_level`` / ``target_side``
  (in CT coordinates: the surgeon follows the anatomy; on a CT without a plan, a straight
  posterior path to the target point, ``scenario_site``): its tip starts
  ``start_depth_mm`` past the entry point (by default ``START_OUTSIDE_MM`` before it, in
  the soft tissue; 0: docked on the bone there) and advances at ``advance_mm_per_s`` to the
  target, where it stops; with ``rest_at_shots_s`` it rests around each change of C-arm
  orientation (``Scenario.rest_intervals_s``), as a surgeon stops advancing to take the AP
  and lateral shots. It is rendered into the X-ray as a steel cylinder.

Images: the anatomy's line integral (``sim.xray.prepare_anatomy``: the full CT, soft
tissue included) plus the instrument's analytic line integral go through
``sim.xray.acquire`` (Poisson noise, detector blur). The same scenario and seed give
identical frames whatever the order in which times are asked for.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import numpy as np

from guidance.core.geometry import (
    invert_rigid,
    make_rigid,
    rotation_about_axis,
    rotation_from_rotvec,
    transform_points,
)
from guidance.core.instrument_models import (
    INSTRUMENTS,
    METAL_MAX_LINE_INTEGRAL,
    STEEL_MU_PER_MM,
    InstrumentModel,
    get_instrument,
)
from guidance.core.plan import SIDES, trajectory_endpoints
from guidance.core.levels import LUMBAR, level_label
from guidance.core.errors import GuidanceError
from guidance.core.views import INTENSITY_KINDS, View, carm_view
from guidance.core.volume import Volume, VolumeError, label_centroid_world
from sim.phantom import Phantom
from sim.subject import Subject
from sim.xray import AEC_PHOTONS, RAW_I0, XrayParams, acquire, auto_exposure, labelled_view, prepare_anatomy

__all__ = [
    "MODES",
    "PATIENT_POSITIONS",
    "ScenarioError",
    "START_OUTSIDE_MM",
    "STEEL_MU_PER_MM",
    "METAL_MAX_LINE_INTEGRAL",
    "Scenario",
    "SimState",
    "SimFrame",
    "ScenarioPlayer",
    "POSTERIOR_PATH_MM",
    "ScenarioSite",
    "scenario_site",
    "tool_pose_on_trajectory",
    "instrument_line_integral",
]

MODES = ("fluoro", "shots")
PATIENT_POSITIONS = ("prone", "supine")
START_OUTSIDE_MM = 20.0
"""The instrument tip starts this far before the entry point, along the trajectory (the
default ``Scenario.start_depth_mm``)."""
ANATOMY_IMAGES_KEPT = 64
"""Anatomy images a ``ScenarioPlayer`` keeps (least recently used go first): breathing is
periodic, so at 15 fps a 4 s breath's 60 poses repeat and each is rendered once."""
_SUPERSAMPLE = 2
"""Instrument rays per pixel side (anti-aliasing of the thin shaft)."""
_TRACKER_OFFSET_WORLD = np.array([-600.0, 1200.0, -900.0])
"""Tracker position relative to the isocentre in the nominal world (mm): patient's right,
above a prone patient's back, towards the feet."""
_REFERENCE_IN_VERTEBRA = np.array([0.0, 90.0, 30.0])
"""Reference array origin in the target vertebra's frame (mm): behind the spinous process."""
POSTERIOR_PATH_MM = 50.0
"""On a CT without a plan, the instrument's entry point lies this far posterior (+y) of the
target point (a pedicle screw's length)."""


class ScenarioError(GuidanceError):
    """A scenario that cannot be played (bad setting, or no planned trajectory to follow)."""


def _allowed(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ScenarioError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _positive(scenario: "Scenario", *names: str) -> None:
    for name in names:
        value = getattr(scenario, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ScenarioError(f"{name} must be a positive number; got {value!r}")


def _non_negative(scenario: "Scenario", *names: str) -> None:
    for name in names:
        value = getattr(scenario, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ScenarioError(f"{name} must be a non-negative number; got {value!r}")


def _point(value: object, name: str) -> tuple[float, float, float] | None:
    """None, or three finite numbers (world mm) as a tuple."""
    if value is None:
        return None
    try:
        point = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        point = ()
    if len(point) != 3 or not all(math.isfinite(x) for x in point):
        raise ScenarioError(f"{name} must be None or three finite numbers (x, y, z world mm); got {value!r}")
    return point


def _angle_pair(value: object, name: str) -> tuple[float, float]:
    try:
        lao, cranial = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ScenarioError(f"{name} must be a (lao_deg, cranial_deg) pair; got {value!r}") from None
    if not (math.isfinite(lao) and math.isfinite(cranial)):
        raise ScenarioError(f"{name} must be finite angles; got {value!r}")
    return lao, cranial


@dataclass(frozen=True)
class Scenario:
    """A scripted session. Lengths in mm, angles in degrees, times in seconds.

    ``mode``: "fluoro" (continuous fluoroscopy at ``fps`` from ``fluoro_angles``, after
    one shot per ``lead_shots`` pair held ``shot_interval_s`` each, e.g. an AP and a
    lateral shot for multi-shot registration) or
    "shots" (one image every ``shot_interval_s``, cycling through ``shots``); angles are
    (LAO, cranial) pairs as the C-arm displays them. The detector is ``detector_px``
    square pixels of ``pixel_spacing_mm``; ``sdd_mm`` / ``sid_mm``: source to detector /
    isocentre. ``intensity``: the pixels' intensity kind ("raw" uint16 counts with
    ``sim.xray.RAW_I0`` unattenuated, "display" uint8, "line_integral" float32), at the dose an exposure
    control sets for the anatomy in view (``sim.xray.auto_exposure``), times ``dose``.
    ``instrument``: a name from ``guidance.core.instrument_models.INSTRUMENTS`` or None (no
    instrument in the images or the tracker); it advances along the planned trajectory,
    turned medially about the entry point by ``instrument_medial_deg`` (negative: laterally),
    so that a breach warning can be watched building up. Tracker noise: RMS 3-D position error
    ``tracker_noise_mm`` and RMS rotation ``tracker_noise_deg`` of each noisy sample.
    ``tracked``: False for fluoroscopy alone, no optical tracker: no tracker sample is sent
    (instrument, reference array and C-arm alike), the instrument is only in the images.
    ``target_world``: on a CT subject (not the phantom), the point (LPS mm) the C-arm's
    isocentre and the instrument aim at (``scenario_site``); None: the label centroid of
    ``target_level``, else the plan's target.
    ``rest_at_shots_s``: the instrument's advance pauses from this long before to this long
    after each change of C-arm orientation (``rest_intervals_s``); 0: it advances throughout.
    ``start_depth_mm``: the tip's depth past the entry point at time 0 (negative: before it).
    """

    duration_s: float = 20.0
    fps: float = 15.0
    mode: str = "fluoro"
    shots: tuple[tuple[float, float], ...] = ((0.0, 0.0), (90.0, 0.0), (20.0, 0.0), (-20.0, 0.0))
    shot_interval_s: float = 2.0
    fluoro_angles: tuple[float, float] = (0.0, 0.0)
    lead_shots: tuple[tuple[float, float], ...] = ()
    detector_px: int = 256
    pixel_spacing_mm: float = 1.2
    sdd_mm: float = 1000.0
    sid_mm: float = 600.0
    patient_position: str = "prone"
    intensity: str = "raw"
    dose: float = 1.0
    initial_misalignment_mm: float = 8.0
    initial_misalignment_deg: float = 3.0
    breathing_amplitude_mm: float = 1.5
    breathing_period_s: float = 4.0
    instrument: str | None = "kwire"
    target_level: str = "L3"
    target_side: str = "left"
    advance_mm_per_s: float = 3.0
    instrument_medial_deg: float = 0.0
    tracker_noise_mm: float = 0.25
    tracker_noise_deg: float = 0.2
    tracked: bool = True
    seed: int = 0
    target_world: tuple[float, float, float] | None = None
    rest_at_shots_s: float = 0.0
    start_depth_mm: float = -START_OUTSIDE_MM

    def __post_init__(self) -> None:
        _allowed("mode", self.mode, MODES)
        _allowed("intensity", self.intensity, INTENSITY_KINDS)
        _allowed("patient_position", self.patient_position, PATIENT_POSITIONS)
        _allowed("instrument", self.instrument, (*INSTRUMENTS, None))
        _allowed("target_level", self.target_level, LUMBAR)
        _allowed("target_side", self.target_side, SIDES)
        _positive(self, "duration_s", "fps", "shot_interval_s", "pixel_spacing_mm", "sdd_mm",
                  "sid_mm", "dose", "breathing_period_s")
        _non_negative(self, "initial_misalignment_mm", "initial_misalignment_deg",
                      "breathing_amplitude_mm", "advance_mm_per_s", "tracker_noise_mm",
                      "tracker_noise_deg", "rest_at_shots_s")
        if not (isinstance(self.instrument_medial_deg, (int, float)) and abs(self.instrument_medial_deg) <= 30.0):
            raise ScenarioError(f"instrument_medial_deg must be a number in [-30, 30]; "
                                f"got {self.instrument_medial_deg!r}")
        if not (isinstance(self.start_depth_mm, (int, float)) and math.isfinite(self.start_depth_mm)):
            raise ScenarioError(f"start_depth_mm must be a finite number; got {self.start_depth_mm!r}")
        if not isinstance(self.tracked, bool):
            raise ScenarioError(f"tracked must be True or False; got {self.tracked!r}")
        if isinstance(self.detector_px, bool) or not isinstance(self.detector_px, int) or self.detector_px < 8:
            raise ScenarioError(f"detector_px must be an integer >= 8; got {self.detector_px!r}")
        if not self.sid_mm < self.sdd_mm:
            raise ScenarioError(f"sid_mm ({self.sid_mm}) must be less than sdd_mm ({self.sdd_mm})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ScenarioError(f"seed must be a non-negative integer; got {self.seed!r}")
        shots = tuple(_angle_pair(s, f"shots[{i}]") for i, s in enumerate(self.shots))
        if not shots:
            raise ScenarioError("shots must hold at least one (lao_deg, cranial_deg) pair")
        object.__setattr__(self, "shots", shots)
        object.__setattr__(self, "target_world", _point(self.target_world, "target_world"))
        object.__setattr__(self, "fluoro_angles", _angle_pair(self.fluoro_angles, "fluoro_angles"))
        object.__setattr__(self, "lead_shots",
                           tuple(_angle_pair(s, f"lead_shots[{i}]") for i, s in enumerate(self.lead_shots)))

    def acquisition_index(self, t_s: float) -> int:
        """Index of the image acquired at scenario time ``t_s``: the fluoroscopy frame
        (round(t * fps), numbered after the lead shots) or the shot number
        (floor(t / shot_interval_s))."""
        shot = int(math.floor(t_s / self.shot_interval_s + 1e-9))
        if self.mode == "shots":
            return shot
        n_lead = len(self.lead_shots)
        if shot < n_lead:
            return shot
        return n_lead + int(round((t_s - n_lead * self.shot_interval_s) * self.fps))

    def angles(self, index: int) -> tuple[float, float]:
        """(LAO, cranial) degrees of acquisition ``index``."""
        if self.mode == "shots":
            return self.shots[index % len(self.shots)]
        return self.lead_shots[index] if index < len(self.lead_shots) else self.fluoro_angles

    def orientation_changes_s(self) -> tuple[float, ...]:
        """Scenario times (s) of the acquisitions whose C-arm angles differ from the one
        before (the first acquisition included): each shot of a new orientation, and in
        "fluoro" mode the first fluoroscopy frame when its angles differ from the last lead shot's."""
        if self.mode == "shots":
            count = int(math.ceil(self.duration_s / self.shot_interval_s - 1e-9))
            times = [k * self.shot_interval_s for k in range(count)]
            angles = [self.angles(k) for k in range(count)]
        else:
            times = [k * self.shot_interval_s for k in range(len(self.lead_shots) + 1)]
            angles = [*self.lead_shots, self.fluoro_angles]
        return tuple(t for k, t in enumerate(times)
                     if t < self.duration_s and (k == 0 or angles[k] != angles[k - 1]))

    def rest_intervals_s(self) -> tuple[tuple[float, float], ...]:
        """(start, end) scenario times (s) during which the instrument rests:
        ``rest_at_shots_s`` either side of each orientation change (from time 0 at the
        earliest), intervals that touch or overlap merged. With ``rest_at_shots_s`` of at
        least half ``shot_interval_s`` the instrument rests from before the first lead shot
        until after the fluoroscopy has started (the AP and lateral shots see it at one place)."""
        margin = self.rest_at_shots_s
        if margin <= 0:
            return ()
        merged: list[list[float]] = []
        for t in self.orientation_changes_s():
            start, end = max(t - margin, 0.0), t + margin
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return tuple((start, end) for start, end in merged)

    def advancing_s(self, t_s: float) -> float:
        """Seconds of scenario time up to ``t_s`` during which the instrument advanced
        (``t_s`` less the rests before it)."""
        resting = sum(max(0.0, min(end, t_s) - start) for start, end in self.rest_intervals_s())
        return t_s - resting


@dataclass(frozen=True)
class SimState:
    """Geometry and tracking at one scenario time ``t_s`` (s), without the image.

    ``frame_id``: the acquisition index (``Scenario.acquisition_index``); ``view``: the
    NOMINAL view (its intensity kind is the scenario's); ``T_cam_from_world``: the
    actual pose (= nominal @ M); ``T_world_corrected_from_world``: inv(M);
    ``T_world_from_tool``: the true instrument pose in CT coordinates (None without an
    instrument); ``T_tracker_from_cam``: the C-arm in the tracker frame (exact);
    ``tracker``: tool id -> ``T_tracker_from_tool`` as the tracker reports it ("carm"
    exact, "reference" and the instrument with noise).
    """

    t_s: float
    frame_id: int
    view: View
    T_cam_from_world: np.ndarray
    T_world_corrected_from_world: np.ndarray
    T_world_from_tool: np.ndarray | None
    T_tracker_from_cam: np.ndarray
    tracker: dict[str, np.ndarray]


@dataclass(frozen=True)
class SimFrame(SimState):
    """A ``SimState`` with its X-ray image: ``pixels`` (H, W) in the view's intensity kind."""

    pixels: np.ndarray


def _rotation_with_z(z: np.ndarray) -> np.ndarray:
    """A rotation whose third column is the unit vector ``z`` (first column chosen freely)."""
    z = np.asarray(z, dtype=float) / np.linalg.norm(z)
    helper = np.eye(3)[int(np.argmin(np.abs(z)))]
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.column_stack([x, np.cross(z, x), z])


def tool_pose_on_trajectory(entry_world: np.ndarray, target_world: np.ndarray, depth_mm: float,
                            model: InstrumentModel) -> np.ndarray:
    """``T_world_from_tool`` of an instrument on the line entry -> target (world mm) whose tip
    lies ``depth_mm`` past the entry (negative: before it) and which points at the target,
    consistent with ``guidance.navigation.instruments.tip_and_axis``."""
    entry = np.asarray(entry_world, dtype=float)
    direction = np.asarray(target_world, dtype=float) - entry
    direction /= np.linalg.norm(direction)
    # tip_and_axis: axis_world = -R @ axis_tool must equal the advancing direction.
    R = _rotation_with_z(-direction) @ _rotation_with_z(model.axis_tool).T
    tip = entry + depth_mm * direction
    return make_rigid(R, tip - R @ model.tip_offset_tool)


# ---------------------------------------------------------------------- instrument image


def _segment_distance_px(uv: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (pixels) of points uv (N, 2) to the 2-D segment a-b."""
    ab = b - a
    s = np.clip(((uv - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(uv - a - s[:, None] * ab, axis=1)


def _cylinder_chords(d: np.ndarray, tip: np.ndarray, w: np.ndarray, length: float,
                     radius: float) -> np.ndarray:
    """Chord lengths (mm) of rays from the origin along unit directions d (..., 3) through the
    finite cylinder of ``radius`` whose axis runs from ``tip`` along unit ``w`` for
    ``length`` (all in one frame, mm)."""
    dw = d @ w
    aw = float(tip @ w)
    d_perp = d - dw[..., None] * w
    a_perp = tip - aw * w
    A = np.einsum("...i,...i->...", d_perp, d_perp)
    B = d_perp @ a_perp
    C = float(a_perp @ a_perp) - radius**2
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.maximum(B * B - A * C, 0.0))
        parallel = A < 1e-12
        hit = (parallel & (C < 0)) | (~parallel & (B * B - A * C > 0))
        s_in = np.where(parallel, -np.inf, (B - root) / A)
        s_out = np.where(parallel, np.inf, (B + root) / A)
        # Between the end caps: aw <= s dw <= aw + length.
        cap_a, cap_b = aw / dw, (aw + length) / dw
        across = np.abs(dw) < 1e-12
        within = (0.0 <= -aw) & (-aw <= length)
        lo = np.where(across, np.where(within, -np.inf, np.inf), np.minimum(cap_a, cap_b))
        hi = np.where(across, np.where(within, np.inf, -np.inf), np.maximum(cap_a, cap_b))
    start = np.maximum(np.maximum(s_in, lo), 0.0)
    stop = np.minimum(s_out, hi)
    return np.where(hit, np.maximum(stop - start, 0.0), 0.0)


def instrument_line_integral(view: View, T_cam_from_tool: np.ndarray, model: InstrumentModel, *,
                             mu_per_mm: float | None = None,
                             max_line_integral: float = METAL_MAX_LINE_INTEGRAL,
                             supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Line integral image (H, W) float32 of the instrument's working part, a cylinder of
    ``model.diameter_mm`` from the tip ``model.length_mm`` back towards the handle, at
    ``T_cam_from_tool`` in ``view`` (only K and the image size are used).

    Per pixel: ``min(mu_per_mm * chord, max_line_integral)`` (``mu_per_mm`` defaults to
    ``model.mu_per_mm``) averaged over
    ``supersample``^2 rays, with the chord computed analytically; only pixels within the
    projected radius (+2 px) of the projected axis are evaluated. Zero everywhere when the
    instrument is not entirely in front of the source.
    """
    H, W = view.shape
    out = np.zeros((H, W), dtype=np.float32)
    R = np.asarray(T_cam_from_tool, dtype=float)[:3, :3]
    tip = transform_points(T_cam_from_tool, model.tip_offset_tool)
    w = R @ model.axis_tool
    ends = np.array([tip, tip + model.length_mm * w])
    if np.any(ends[:, 2] <= 1.0):
        return out
    radius = model.diameter_mm / 2.0
    ends_px = (ends @ view.K.T)[:, :2] / ends[:, 2:3]
    margin = radius * max(view.K[0, 0], view.K[1, 1]) / ends[:, 2].min() + 2.0
    lo = np.maximum(np.floor(ends_px.min(axis=0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(ends_px.max(axis=0) + margin), [W - 1, H - 1]).astype(int)
    if np.any(hi < lo):
        return out
    vv, uu = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    uv = np.column_stack([uu.ravel(), vv.ravel()]).astype(float)
    uv = uv[_segment_distance_px(uv, ends_px[0], ends_px[1]) <= margin]
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    du, dv = (g.ravel() for g in np.meshgrid(offsets, offsets))
    rays = np.stack([uv[:, :1] + du, uv[:, 1:] + dv, np.ones((len(uv), du.size))], axis=-1)
    d = rays @ np.linalg.inv(view.K).T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    chords = _cylinder_chords(d, tip, w, model.length_mm, radius)
    mu = model.mu_per_mm if mu_per_mm is None else mu_per_mm
    values = np.minimum(mu * chords, max_line_integral).mean(axis=1)
    out[uv[:, 1].astype(int), uv[:, 0].astype(int)] = values
    return out


# ---------------------------------------------------------------------------- site


@dataclass(frozen=True)
class ScenarioSite:
    """Where a scenario plays on its anatomy (world LPS mm): ``T_world_from_vertebra``, the
    target vertebra's frame (its origin is the C-arm isocentre; x left, y posterior, z
    superior), and the instrument's path ``entry_world`` -> ``target_world`` as planned
    (before ``instrument_medial_deg`` turns it)."""

    T_world_from_vertebra: np.ndarray
    entry_world: np.ndarray
    target_world: np.ndarray


def _planned(scenario: Scenario, plan: list[dict], whose: str) -> dict:
    """The plan's trajectory of the scenario's target level and side; ScenarioError if none."""
    matches = [t for t in plan if t.get("level") == scenario.target_level and t.get("side") == scenario.target_side]
    if not matches:
        planned = ", ".join(f"{t.get('level')}/{t.get('side')}" for t in plan)
        raise ScenarioError(f"{whose} plan has no {scenario.target_level}/{scenario.target_side} "
                            f"trajectory; planned: {planned}")
    return matches[0]


def _aim_point(scenario: Scenario, labels: Volume | None, trajectory: dict | None) -> np.ndarray:
    """The point a scenario on a CT aims at (world mm): ``target_world``, else the label
    centroid of ``target_level``, else the planned trajectory's target."""
    if scenario.target_world is not None:
        return np.array(scenario.target_world)
    if labels is not None:
        try:
            return label_centroid_world(labels, level_label(scenario.target_level))
        except VolumeError as exc:
            raise ScenarioError(f"no target point for {scenario.target_level}: {exc}; give target_world") from None
    if trajectory is not None:
        return trajectory_endpoints(trajectory)[1]
    raise ScenarioError("a CT without labels or plan needs target_world: the point (LPS mm) that the C-arm "
                        "and the instrument aim at")


def scenario_site(scenario: Scenario, anatomy: Phantom | Subject) -> ScenarioSite:
    """The site of ``scenario`` on the phantom (its planned trajectory of ``target_level`` /
    ``target_side`` and that vertebra's frame) or on a CT subject: a vertebra frame with
    the world's axes at the aim point (``Scenario.target_world``, else the label centroid
    of ``target_level``, else the plan's target), and the plan's trajectory of that level
    and side, or without a plan a straight posterior path from ``POSTERIOR_PATH_MM``
    behind the aim point to it (``target_side`` then plays no part). ScenarioError when
    the plan has no such trajectory or nothing gives an aim point."""
    if isinstance(anatomy, Phantom):
        if scenario.target_world is not None:
            raise ScenarioError("target_world is for a CT subject; on the phantom a scenario aims at its "
                                "planned vertebra")
        entry, target = trajectory_endpoints(_planned(scenario, anatomy.plan, "the phantom's"))
        return ScenarioSite(anatomy.T_world_from_vertebra[scenario.target_level], entry, target)
    trajectory = None if anatomy.plan is None else _planned(scenario, anatomy.plan, "the")
    aim = _aim_point(scenario, anatomy.labels, trajectory)
    if trajectory is not None:
        entry, target = trajectory_endpoints(trajectory)
    else:
        entry, target = aim + np.array([0.0, POSTERIOR_PATH_MM, 0.0]), aim
    return ScenarioSite(make_rigid(np.eye(3), aim), entry, target)


# ---------------------------------------------------------------------------- player


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``T_world_from_frame`` of a frame at ``position`` whose +z looks at ``target``."""
    return make_rigid(_rotation_with_z(np.asarray(target) - position), position)


def _noisy(T: np.ndarray, rng: np.random.Generator, rms_mm: float, rms_deg: float) -> np.ndarray:
    """``T`` perturbed in its own frame by Gaussian noise of RMS 3-D magnitude ``rms_mm``
    (translation) and ``rms_deg`` (rotation vector)."""
    t = rng.normal(0.0, rms_mm / math.sqrt(3.0), 3)
    rotvec = rng.normal(0.0, math.radians(rms_deg) / math.sqrt(3.0), 3)
    return T @ make_rigid(rotation_from_rotvec(rotvec), t)


class ScenarioPlayer:
    """Computes the state and the image of a ``Scenario`` at any time, on a ``Phantom`` or
    a CT ``Subject`` (where: ``scenario_site``).

    The constructor prepares the DRR volumes (the full CT incl. soft tissue, ``self.ct``)
    and the fixed poses; ``state_at(t)`` is cheap, ``frame_at(t)`` renders (the anatomy
    once per pose: ``ANATOMY_IMAGES_KEPT``). Raises ScenarioError when the plan has no
    trajectory for the scenario's target level and side, or a CT has no aim point.
    """

    def __init__(self, scenario: Scenario, phantom: Phantom | Subject) -> None:
        self.scenario = scenario
        site = scenario_site(scenario, phantom)
        self.entry_world, self.target_world = site.entry_world, site.target_world
        if scenario.instrument_medial_deg:
            self.target_world = self._turned_medially(site.T_world_from_vertebra, scenario.instrument_medial_deg)
        self.model = None if scenario.instrument is None else get_instrument(scenario.instrument)
        T_world_from_vertebra = site.T_world_from_vertebra
        self.isocenter_world = T_world_from_vertebra[:3, 3].copy()
        self.T_world_from_reference = T_world_from_vertebra @ make_rigid(np.eye(3), _REFERENCE_IN_VERTEBRA)
        self.T_tracker_from_room = invert_rigid(
            _look_at(self.isocenter_world + _TRACKER_OFFSET_WORLD, self.isocenter_world))
        self.M0 = self._initial_misplacement()
        self.ct = phantom.ct
        self._anatomy = prepare_anatomy(self.ct)
        self._anatomy_images: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._views: dict[tuple[float, float], View] = {}

    def _turned_medially(self, T_world_from_vertebra: np.ndarray, angle_deg: float) -> np.ndarray:
        """The planned target turned about the entry point towards the vertebra's midline."""
        x = T_world_from_vertebra[:3, 0]
        medial = -x if (self.entry_world - T_world_from_vertebra[:3, 3]) @ x > 0 else x
        offset = self.target_world - self.entry_world
        axis = np.cross(offset, medial)
        return self.entry_world + rotation_about_axis(axis / np.linalg.norm(axis), angle_deg) @ offset

    def _initial_misplacement(self) -> np.ndarray:
        """M0: world-frame rigid motion of the anatomy, seeded: a rotation of exactly
        ``initial_misalignment_deg`` about a random axis through the isocentre, then a
        translation of exactly ``initial_misalignment_mm`` in a random direction."""
        s = self.scenario
        rng = np.random.default_rng([s.seed, 0])
        axis, shift = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 3)))
        R = rotation_about_axis(axis, s.initial_misalignment_deg)
        c = self.isocenter_world
        return make_rigid(R, c - R @ c + s.initial_misalignment_mm * shift)

    def patient_motion(self, t_s: float) -> np.ndarray:
        """M(t): where the anatomy really is, as a world-frame rigid motion (CT point X lies
        at M X in the nominal world): breathing (y translation) after the misplacement."""
        s = self.scenario
        y = s.breathing_amplitude_mm * math.sin(2.0 * math.pi * t_s / s.breathing_period_s)
        return make_rigid(np.eye(3), (0.0, y, 0.0)) @ self.M0

    def tip_depth_mm(self, t_s: float) -> float:
        """Depth of the instrument tip past the entry point along the trajectory (mm): starts at
        ``start_depth_mm``, advances at ``advance_mm_per_s`` except while it rests
        (``Scenario.rest_intervals_s``), stops at the target."""
        s = self.scenario
        depth = s.start_depth_mm + s.advance_mm_per_s * s.advancing_s(t_s)
        return min(depth, float(np.linalg.norm(self.target_world - self.entry_world)))

    def nominal_view(self, lao_deg: float, cranial_deg: float) -> View:
        """The C-arm's nominal view at these angles (cached), in the scenario's intensity kind."""
        key = (lao_deg, cranial_deg)
        if key not in self._views:
            s = self.scenario
            self._views[key] = carm_view(
                lao_deg=lao_deg, cranial_deg=cranial_deg, source_to_detector_mm=s.sdd_mm,
                source_to_isocenter_mm=s.sid_mm, detector_size_px=(s.detector_px, s.detector_px),
                pixel_spacing_mm=(s.pixel_spacing_mm, s.pixel_spacing_mm),
                isocenter_world=self.isocenter_world, patient_position=s.patient_position)
            self._views[key] = labelled_view(self._views[key], s.intensity)
            # The C-arm reports its angles with each image (an angle-table calibration uses them).
            self._views[key] = replace(self._views[key], extra={"lao_deg": lao_deg, "cranial_deg": cranial_deg})
        return self._views[key]

    def state_at(self, t_s: float) -> SimState:
        """Geometry and (noisy) tracker samples at scenario time ``t_s`` (s)."""
        s = self.scenario
        frame_id = s.acquisition_index(t_s)
        view = self.nominal_view(*s.angles(frame_id))
        M = self.patient_motion(t_s)
        T_cam_from_world = view.T_cam_from_world @ M
        T_tracker_from_cam = self.T_tracker_from_room @ invert_rigid(view.T_cam_from_world)
        T_tracker_from_world = T_tracker_from_cam @ T_cam_from_world
        rng = np.random.default_rng([s.seed, 1, int(round(t_s * 1e6))])
        tracker = {
            "carm": T_tracker_from_cam,
            "reference": _noisy(T_tracker_from_world @ self.T_world_from_reference, rng,
                                s.tracker_noise_mm, s.tracker_noise_deg),
        }
        T_world_from_tool = None
        if self.model is not None:
            T_world_from_tool = tool_pose_on_trajectory(self.entry_world, self.target_world,
                                                        self.tip_depth_mm(t_s), self.model)
            tracker[self.model.name] = _noisy(T_tracker_from_world @ T_world_from_tool, rng,
                                              s.tracker_noise_mm, s.tracker_noise_deg)
        return SimState(t_s=t_s, frame_id=frame_id, view=view, T_cam_from_world=T_cam_from_world,
                        T_world_corrected_from_world=invert_rigid(M), T_world_from_tool=T_world_from_tool,
                        T_tracker_from_cam=T_tracker_from_cam, tracker=tracker)

    def render(self, state: SimState, *,
               extra_instruments: tuple[tuple[InstrumentModel, np.ndarray], ...] = ()) -> SimFrame:
        """The X-ray image of ``state`` (anatomy and instrument seen from the actual pose,
        Poisson noise seeded by the scenario seed and the acquisition time).
        ``extra_instruments``: further (model, ``T_world_from_tool``) pairs drawn into the
        image only (untracked instruments left in the patient)."""
        s = self.scenario
        actual = state.view.with_pose(state.T_cam_from_world)
        line_integral = self._anatomy_line_integral(actual)
        seed = int(np.random.SeedSequence([s.seed, 2, int(round(state.t_s * 1e6))]).generate_state(1)[0])
        params = auto_exposure(line_integral, XrayParams(I0=RAW_I0, seed=seed), AEC_PHOTONS * s.dose)
        if self.model is not None:
            line_integral += instrument_line_integral(actual, state.T_cam_from_world @ state.T_world_from_tool,
                                                      self.model)
        for model, T_world_from_tool in extra_instruments:
            line_integral += instrument_line_integral(actual, state.T_cam_from_world @ T_world_from_tool, model)
        pixels, _ = acquire(line_integral, actual, params, intensity=s.intensity)
        return SimFrame(**{f.name: getattr(state, f.name) for f in fields(SimState)}, pixels=pixels)

    def _anatomy_line_integral(self, view: View) -> np.ndarray:
        """The anatomy's line integrals in ``view`` (a new array): rendered, or copied from an
        earlier render of the same pose (to 1e-6 mm, the image the same to float32 rounding)."""
        arrays = (view.K, view.T_cam_from_world, np.asarray(view.image_size, float))
        key = b"".join(np.round(a, 6).tobytes() for a in arrays)
        image = self._anatomy_images.get(key)
        if image is None:
            image = self._anatomy_images[key] = self._anatomy.line_integral(view)
            if len(self._anatomy_images) > ANATOMY_IMAGES_KEPT:
                self._anatomy_images.popitem(last=False)
        else:
            self._anatomy_images.move_to_end(key)
        return image.copy()

    def frame_at(self, t_s: float) -> SimFrame:
        """State and X-ray image at scenario time ``t_s`` (s)."""
        return self.render(self.state_at(t_s))

    def shot_at(self, t_s: float, lao_deg: float, cranial_deg: float, *, noise_offset: int = 0,
                extra_instruments: tuple[tuple[InstrumentModel, np.ndarray], ...] = ()) -> tuple[SimFrame, View]:
        """An X-ray at scenario time ``t_s`` (s) from the given C-arm angles, whatever the
        scenario's own acquisition plan, and its registered view (the actual pose);
        ``noise_offset`` changes its noise seed (another exposure of the same moment)."""
        state = self.state_at(t_s)
        nominal = self.nominal_view(lao_deg, cranial_deg)
        T = nominal.T_cam_from_world @ self.patient_motion(t_s)
        state = replace(state, view=nominal, T_cam_from_world=T, t_s=t_s + 1e-3 * noise_offset)
        return self.render(state, extra_instruments=extra_instruments), nominal.with_pose(T)
