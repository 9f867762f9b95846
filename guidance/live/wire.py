"""Message schemas of the guidance bus: encode, decode, validate. The one place that knows
the byte layout of a message.

A message is a list of byte strings (a ZeroMQ multipart message without the topic frame
that ``guidance.live.transport`` puts in front):

- part 0: UTF-8 JSON header, one object::

      {"schema": "guidance.msg", "version": 1, "kind": "frame",
       "seq": 12, "stamp_ns": 1700000000000000000, "source": "sim",
       "buffers": [{"dtype": "uint16", "shape": [H, W], "nbytes": n, "crc32": c}],
       ...kind-specific fields...}

- parts 1..: the raw little-endian bytes of each binary buffer (C order), described in
  the same order by ``buffers``; ``crc32`` is ``zlib.crc32`` of the part and is verified on
  decode.

Poses travel as 4x4 row-major nested lists (docs/conventions.md), times as integer
nanoseconds (``_ns``, ``time.time_ns()`` epoch), lengths in mm, angles in degrees. Every
JSON number must be finite, every integer fit an int64, every string at most
``MAX_STRING`` characters, every buffer at most ``MAX_NDIM`` dimensions of at most
``MAX_DIM`` elements each. The header is written with sorted keys and no whitespace, so
``encode(decode(parts)) == parts`` for anything ``encode`` produced.

One frozen dataclass per kind; its constructor validates and normalises its fields
(raising ``WireError``), so a message that exists is a valid message, whether it was
built locally or decoded. ``KINDS`` maps each kind name to its class.

``decode`` turns any sequence of byte strings into a message or a ``WireError`` whose
text names the kind, the sender (the header's ``source``, as claimed) and the field:
nothing else escapes it, so one bad message can never stop a process.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import GeometryError, check_rigid
from guidance.core.plan import APPROACHES
from guidance.core.views import View, ViewError, view_from_dict, view_to_dict
from guidance.navigation.breach import BREACH_SIDES, GRADES

__all__ = [
    "SCHEMA",
    "VERSION",
    "DTYPES",
    "WireError",
    "Message",
    "Frame",
    "TrackerSample",
    "PoseResult",
    "InstrumentState",
    "TargetPose",
    "Overlay",
    "Heartbeat",
    "VolumeFrame",
    "KINDS",
    "encode",
    "decode",
]

SCHEMA = "guidance.msg"
VERSION = 1
DTYPES = ("uint8", "uint16", "float32")
POSE_STATUSES = ("ok", "failed")
POSE_MODES = ("global", "tracking", "volume")
OVERLAY_SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
_ENVELOPE = ("schema", "version", "kind", "buffers")
_DESCRIPTOR_KEYS = {"dtype", "shape", "nbytes", "crc32"}
_UNIT_TOL = 1e-6
INT64_MAX = 2**63 - 1
MAX_STRING = 4096
"""Characters in any header string (ids, reasons, stats)."""
MAX_HEADER_BYTES = 1 << 20
"""Bytes of the JSON header (part 0); checked before parsing."""
MAX_NDIM = 4
MAX_DIM = 1 << 20
"""Elements along one buffer dimension; the total size is capped by the transport."""
UNKNOWN_SENDER = "?"


class WireError(GuidanceError):
    """A message that violates the guidance.msg contract (on encode, decode or construction).

    ``kind`` and ``sender`` name the message kind and its claimed ``source`` ("message"
    and "?" when unknown; decode always fills them in), ``detail`` the problem alone."""

    def __init__(self, message: str, *, kind: str | None = None, sender: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.sender = sender
        self.detail = message if detail is None else detail


# ---------------------------------------------------------------------------------------
# Field validators: each returns the normalised value or raises WireError naming the field.


def _int(value: Any, name: str, *, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(f"'{name}' must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise WireError(f"'{name}' must be >= {minimum}, got {value}")
    if value > maximum:
        raise WireError(f"'{name}' must be <= {maximum}, got {_clip(str(value))}")
    return value


def _clip(text: str, n: int = 60) -> str:
    """``text`` shortened for an error message."""
    return text if len(text) <= n else f"{text[:n]}...({len(text)} chars)"


def _float(value: Any, name: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise WireError(f"'{name}' must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise WireError(f"'{name}' is too large for a float") from None
    if not math.isfinite(value):
        raise WireError(f"'{name}' must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise WireError(f"'{name}' must lie in [{lo}, {hi}], got {value}")
    return value


def _opt_float(value: Any, name: str, **limits: float) -> float | None:
    return None if value is None else _float(value, name, **limits)


def _str(value: Any, name: str, *, choices: tuple[str, ...] | None = None,
         nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise WireError(f"'{name}' must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise WireError(f"'{name}' is longer than {MAX_STRING} characters ({len(value)})")
    if choices is not None and value not in choices:
        raise WireError(f"'{name}' must be one of {', '.join(choices)}; got {_clip(repr(value))}")
    if nonempty and not value:
        raise WireError(f"'{name}' must not be empty")
    return value


def _opt_str(value: Any, name: str, *, choices: tuple[str, ...] | None = None) -> str | None:
    return None if value is None else _str(value, name, choices=choices)


def _opt_bool(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise WireError(f"'{name}' must be true, false or null, got {type(value).__name__}")
    return None if value is None else bool(value)


def _numbers(value: Any, name: str, what: str) -> np.ndarray:
    """``value`` as a float64 array; WireError (naming ``what`` was expected) otherwise."""
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise WireError(f"'{name}' must be {what}") from None


def _pose(value: Any, name: str) -> np.ndarray:
    """A rigid 4x4 float64 pose (finite, orthonormal rotation, last row [0, 0, 0, 1])."""
    T = _numbers(value, name, "a 4x4 numeric matrix")
    try:
        return check_rigid(T, f"'{name}'")
    except GeometryError as exc:
        raise WireError(str(exc)) from None


def _opt_pose(value: Any, name: str) -> np.ndarray | None:
    return None if value is None else _pose(value, name)


def _pose_map(value: Any, name: str, *, required: tuple[str, ...] = ()) -> dict:
    """A dict of name -> rigid 4x4 pose."""
    if not isinstance(value, dict):
        raise WireError(f"'{name}' must be an object of name -> 4x4 pose")
    out = {}
    for key, pose in value.items():
        out[_str(key, f"{name} key")] = _pose(pose, f"{name}.{key}")
    for key in required:
        if key not in out:
            raise WireError(f"'{name}' is missing '{key}'")
    return out


def _vec3(value: Any, name: str, *, unit: bool = False) -> np.ndarray:
    v = _numbers(value, name, "3 numbers")
    if v.shape != (3,):
        raise WireError(f"'{name}' must have shape (3,), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise WireError(f"'{name}' contains NaN or infinite values")
    if unit and abs(float(np.linalg.norm(v)) - 1.0) > _UNIT_TOL:
        raise WireError(f"'{name}' must be a unit vector, its norm is {np.linalg.norm(v):.9g}")
    return v


def _pixels(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise WireError(f"'{name}' must be a numpy array, got {type(value).__name__}")
    if value.ndim != 2 or value.size == 0:
        raise WireError(f"'{name}' must be a non-empty 2-D image, got shape {value.shape}")
    if value.dtype.name not in DTYPES:
        raise WireError(f"'{name}' dtype {value.dtype.name} not allowed; use {', '.join(DTYPES)}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise WireError(f"'{name}' contains NaN or infinite pixels")
    return value


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------------
# Message kinds


@dataclass(frozen=True, kw_only=True, eq=False)
class Message:
    """Fields every message carries.

    ``seq``: per-publisher, per-kind sequence number (>= 0); ``stamp_ns``: send time
    (``time.time_ns()``); ``source``: id of the sending process. ``guidance.live.transport``
    Publisher sets ``seq`` and ``stamp_ns`` when it sends.
    """

    kind: ClassVar[str] = ""
    buffer_fields: ClassVar[tuple[str, ...]] = ()

    seq: int = 0
    stamp_ns: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        _set(self, "seq", _int(self.seq, "seq", minimum=0))
        _set(self, "stamp_ns", _int(self.stamp_ns, "stamp_ns", minimum=0))
        _set(self, "source", _str(self.source, "source"))


@dataclass(frozen=True, kw_only=True, eq=False)
class Frame(Message):
    """One X-ray image with its calibrated geometry.

    ``pixels``: 2-D (H, W) uint8, uint16 or float32 array indexed ``[v, u]``, finite;
    ``view``: a ``View`` (or its guidance.view/1 dict) whose ``image_size`` is (W, H);
    ``acquired_ns``: acquisition time; ``ground_truth``: optional name -> 4x4 pose
    (e.g. ``T_cam_from_world``, ``T_world_corrected_from_world``) for bench testing.
    """

    kind: ClassVar[str] = "frame"
    buffer_fields: ClassVar[tuple[str, ...]] = ("pixels",)

    frame_id: int
    acquired_ns: int
    view: View
    pixels: np.ndarray
    ground_truth: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        _set(self, "acquired_ns", _int(self.acquired_ns, "acquired_ns", minimum=0))
        view = self.view
        if isinstance(view, dict):
            try:
                view = view_from_dict(view)
            except (ViewError, TypeError, ValueError, ArithmeticError) as exc:
                # The view parser raises plain TypeError/ValueError on some ill-typed fields
                # (e.g. "pixel_spacing_mm": ["a", "b"]): all of them are a bad view here.
                raise WireError(f"bad view geometry: 'view': {_clip(str(exc), 200)}") from None
        elif not isinstance(view, View):
            raise WireError(f"'view' must be a View or a guidance.view/1 object, "
                            f"got {type(view).__name__}")
        pixels = _pixels(self.pixels, "pixels")
        H, W = pixels.shape
        if view.image_size != (W, H):
            raise WireError(f"bad view geometry: view image_size {list(view.image_size)} does "
                            f"not match the pixels [W, H] = [{W}, {H}]")
        _set(self, "view", view)
        if self.ground_truth is not None:
            _set(self, "ground_truth", _pose_map(self.ground_truth, "ground_truth"))


@dataclass(frozen=True, kw_only=True, eq=False)
class TrackerSample(Message):
    """One instrument pose from a tracking system, in the tracker's own frame (mm).

    ``quality``: the tracker's figure of merit (e.g. RMS marker fit error, mm);
    ``T_tracker_from_reference``: optional pose of the patient reference array.
    """

    kind: ClassVar[str] = "tracker_sample"

    tool_id: str
    T_tracker_from_tool: np.ndarray
    quality: float
    acquired_ns: int
    T_tracker_from_reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "tool_id", _str(self.tool_id, "tool_id", nonempty=True))
        _set(self, "T_tracker_from_tool", _pose(self.T_tracker_from_tool, "T_tracker_from_tool"))
        _set(self, "quality", _float(self.quality, "quality"))
        _set(self, "acquired_ns", _int(self.acquired_ns, "acquired_ns", minimum=0))
        _set(self, "T_tracker_from_reference",
             _opt_pose(self.T_tracker_from_reference, "T_tracker_from_reference"))


@dataclass(frozen=True, kw_only=True, eq=False)
class PoseResult(Message):
    """A registration result for one frame.

    ``status`` "ok" requires ``T_world_corrected_from_world`` (the rigid CT correction,
    docs/conventions.md); "failed" requires it to be None and a non-empty ``reason``.
    ``views``: per view, a dict with at least ``T_cam_from_world``; ``level_poses``:
    vertebral level (e.g. "L4") -> 4x4 pose; ``similarity``: final similarity value;
    ``confidence`` in [0, 1]; ``mode``: "global" or "tracking"; ``latency_ms``: stage ->
    duration in ms (>= 0); ``frame_acquired_ns``: acquisition time of the frame;
    ``shots``: ids of the frames whose (joint) registration fixes this pose's depth
    (multi-shot fluoro navigation, ``guidance.live.shots``).
    ``uncertainty_in_plane_mm`` / ``uncertainty_depth_mm``: 1-sigma pose uncertainty at
    the target centre in the first view's image plane and along its ray (>= 0, or None).
    """

    kind: ClassVar[str] = "pose_result"

    frame_id: int
    status: str
    reason: str
    T_world_corrected_from_world: np.ndarray | None = None
    views: list[dict[str, np.ndarray]] = field(default_factory=list)
    level_poses: dict[str, np.ndarray] = field(default_factory=dict)
    similarity: float | None = None
    confidence: float
    mode: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    frame_acquired_ns: int
    shots: list[int] = field(default_factory=list)
    uncertainty_in_plane_mm: float | None = None
    uncertainty_depth_mm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        _set(self, "status", _str(self.status, "status", choices=POSE_STATUSES))
        _set(self, "reason", _str(self.reason, "reason", nonempty=self.status == "failed"))
        T = _opt_pose(self.T_world_corrected_from_world, "T_world_corrected_from_world")
        if (T is None) != (self.status == "failed"):
            raise WireError("'T_world_corrected_from_world' must be given when status is 'ok' "
                            "and null when it is 'failed'")
        _set(self, "T_world_corrected_from_world", T)
        if not isinstance(self.views, (list, tuple)):
            raise WireError("'views' must be a list")
        _set(self, "views", [_pose_map(v, f"views[{i}]", required=("T_cam_from_world",))
                             for i, v in enumerate(self.views)])
        _set(self, "level_poses", _pose_map(self.level_poses, "level_poses"))
        _set(self, "similarity", _opt_float(self.similarity, "similarity"))
        _set(self, "confidence", _float(self.confidence, "confidence", lo=0.0, hi=1.0))
        _set(self, "mode", _str(self.mode, "mode", choices=POSE_MODES))
        if not isinstance(self.latency_ms, dict):
            raise WireError("'latency_ms' must be an object of stage -> ms")
        _set(self, "latency_ms", {_str(k, "latency_ms key"): _float(v, f"latency_ms.{k}", lo=0.0)
                                  for k, v in self.latency_ms.items()})
        _set(self, "frame_acquired_ns",
             _int(self.frame_acquired_ns, "frame_acquired_ns", minimum=0))
        if not isinstance(self.shots, (list, tuple)):
            raise WireError("'shots' must be a list of frame ids")
        _set(self, "shots", [_int(i, f"shots[{n}]", minimum=0) for n, i in enumerate(self.shots)])
        for name in ("uncertainty_in_plane_mm", "uncertainty_depth_mm"):
            _set(self, name, _opt_float(getattr(self, name), name, lo=0.0))


@dataclass(frozen=True, kw_only=True, eq=False)
class InstrumentState(Message):
    """An instrument in world (CT, LPS mm) coordinates and its deviation from the plan.

    ``tip_world``: tip position (mm); ``axis_world``: unit direction of the instrument axis
    (towards the tip); both required when ``status`` is "ok", null allowed otherwise;
    ``status``: e.g. "ok", "registration_failed", "not_tracked". Deviation from the
    planned trajectory of ``plan_level`` / ``plan_side`` (all optional):
    ``distance_to_trajectory_mm`` and ``tip_to_target_mm`` (>= 0),
    ``angle_to_trajectory_deg`` in [0, 180], ``depth_along_trajectory_mm`` (signed, from
    the entry point along the planned direction), ``to_target_along_plan_mm`` (planned
    depth left). Predicted breach of the planned implant along the instrument's line
    (``guidance.navigation.breach``, all optional): ``breach_mm`` (>= 0), ``breach_grade``
    (Gertzbein-Robbins A-E), ``breach_side``, ``breach_warning``, ``clearance_mm`` (implant
    surface to the corridor wall ahead, negative when protruding) and
    ``travel_to_breach_mm`` (>= 0).
    ``image_derived``: True when the pose was found in the X-ray image itself (no tracker
    sample), False when tracked; then its 1-sigma uncertainties (optional, >= 0):
    ``uncertainty_in_plane_mm`` (tip, across the viewing ray), ``uncertainty_depth_mm``
    (tip, along the ray: large from one view, small when two shots were combined) and
    ``uncertainty_axis_deg``.
    """

    kind: ClassVar[str] = "instrument_state"

    frame_id: int
    tool_id: str
    tip_world: np.ndarray | None
    axis_world: np.ndarray | None
    status: str
    plan_level: str | None = None
    plan_side: str | None = None
    distance_to_trajectory_mm: float | None = None
    angle_to_trajectory_deg: float | None = None
    depth_along_trajectory_mm: float | None = None
    tip_to_target_mm: float | None = None
    to_target_along_plan_mm: float | None = None
    breach_mm: float | None = None
    breach_grade: str | None = None
    breach_side: str | None = None
    breach_warning: bool | None = None
    clearance_mm: float | None = None
    travel_to_breach_mm: float | None = None
    image_derived: bool = False
    acquired_ns: int = 0
    uncertainty_in_plane_mm: float | None = None
    uncertainty_depth_mm: float | None = None
    uncertainty_axis_deg: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        _set(self, "tool_id", _str(self.tool_id, "tool_id", nonempty=True))
        for name in ("uncertainty_in_plane_mm", "uncertainty_depth_mm", "uncertainty_axis_deg"):
            _set(self, name, _opt_float(getattr(self, name), name, lo=0.0))
        _set(self, "acquired_ns", _int(self.acquired_ns, "acquired_ns", minimum=0))
        _set(self, "to_target_along_plan_mm", _opt_float(self.to_target_along_plan_mm, "to_target_along_plan_mm"))
        _set(self, "breach_mm", _opt_float(self.breach_mm, "breach_mm", lo=0.0))
        _set(self, "breach_grade", _opt_str(self.breach_grade, "breach_grade", choices=GRADES))
        _set(self, "breach_side", _opt_str(self.breach_side, "breach_side", choices=BREACH_SIDES))
        _set(self, "breach_warning", _opt_bool(self.breach_warning, "breach_warning"))
        _set(self, "clearance_mm", _opt_float(self.clearance_mm, "clearance_mm"))
        _set(self, "travel_to_breach_mm", _opt_float(self.travel_to_breach_mm, "travel_to_breach_mm", lo=0.0))
        _set(self, "status", _str(self.status, "status", nonempty=True))
        for name, unit in (("tip_world", False), ("axis_world", True)):
            value = getattr(self, name)
            if value is None and self.status == "ok":
                raise WireError(f"'{name}' must be given when status is 'ok'")
            _set(self, name, None if value is None else _vec3(value, name, unit=unit))
        _set(self, "plan_level", _opt_str(self.plan_level, "plan_level"))
        _set(self, "plan_side", _opt_str(self.plan_side, "plan_side"))
        _set(self, "distance_to_trajectory_mm",
             _opt_float(self.distance_to_trajectory_mm, "distance_to_trajectory_mm", lo=0.0))
        _set(self, "angle_to_trajectory_deg",
             _opt_float(self.angle_to_trajectory_deg, "angle_to_trajectory_deg",
                        lo=0.0, hi=180.0))
        _set(self, "depth_along_trajectory_mm",
             _opt_float(self.depth_along_trajectory_mm, "depth_along_trajectory_mm"))
        _set(self, "tip_to_target_mm",
             _opt_float(self.tip_to_target_mm, "tip_to_target_mm", lo=0.0))
        if not isinstance(self.image_derived, (bool, np.bool_)):
            raise WireError(f"'image_derived' must be true or false, got {type(self.image_derived).__name__}")
        _set(self, "image_derived", bool(self.image_derived))


@dataclass(frozen=True, kw_only=True, eq=False)
class TargetPose(Message):
    """A planned trajectory as a target pose for a robot arm or a tracked aiming guide.

    ``T_tracker_from_target``: the target frame in the tracker's frame (mm): origin at the
    planned entry point, +z along the planned axis (entry -> target), x and y any
    perpendicular pair (``guidance.navigation.targets``); ``length_mm``: entry to target.
    With a tracked guide (``guide_tool_id``): its alignment error, ``guide_entry_error_mm``
    (entry point to the guide's axis line) and ``guide_angle_error_deg``, and
    ``guide_aligned`` (within the tolerances).
    """

    kind: ClassVar[str] = "target_pose"

    level: str
    side: str
    approach: str
    T_tracker_from_target: np.ndarray
    length_mm: float
    guide_tool_id: str | None = None
    guide_entry_error_mm: float | None = None
    guide_angle_error_deg: float | None = None
    guide_aligned: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "level", _str(self.level, "level", nonempty=True))
        _set(self, "side", _str(self.side, "side", nonempty=True))
        _set(self, "approach", _str(self.approach, "approach", choices=APPROACHES))
        _set(self, "T_tracker_from_target", _pose(self.T_tracker_from_target, "T_tracker_from_target"))
        _set(self, "length_mm", _float(self.length_mm, "length_mm", lo=0.0))
        _set(self, "guide_tool_id", _opt_str(self.guide_tool_id, "guide_tool_id"))
        _set(self, "guide_entry_error_mm", _opt_float(self.guide_entry_error_mm, "guide_entry_error_mm", lo=0.0))
        _set(self, "guide_angle_error_deg",
             _opt_float(self.guide_angle_error_deg, "guide_angle_error_deg", lo=0.0, hi=180.0))
        _set(self, "guide_aligned", _opt_bool(self.guide_aligned, "guide_aligned"))
        given = [v is not None for v in (self.guide_tool_id, self.guide_entry_error_mm,
                                         self.guide_angle_error_deg, self.guide_aligned)]
        if any(given) and not all(given):
            raise WireError("guide_tool_id, guide_entry_error_mm, guide_angle_error_deg and guide_aligned "
                            "go together")


@dataclass(frozen=True, kw_only=True, eq=False)
class Overlay(Message):
    """An encoded picture for the display: ``data`` holds the PNG or JPEG file bytes."""

    kind: ClassVar[str] = "overlay"
    buffer_fields: ClassVar[tuple[str, ...]] = ("data",)

    frame_id: int
    encoding: str
    data: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        encoding = _str(self.encoding, "encoding", choices=tuple(OVERLAY_SIGNATURES))
        data = self.data
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 1:
                raise WireError(f"'data' must be a 1-D uint8 buffer, got {data.dtype.name} "
                                f"shape {data.shape}")
            data = data.tobytes()
        elif isinstance(data, bytearray):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise WireError(f"'data' must be bytes, got {type(data).__name__}")
        if not data.startswith(OVERLAY_SIGNATURES[encoding]):
            raise WireError(f"'data' does not start with the {encoding} file signature")
        _set(self, "data", data)


@dataclass(frozen=True, kw_only=True, eq=False)
class Heartbeat(Message):
    """Liveness of a process: ``role`` (e.g. "sim", "pipeline", "display"), ``state`` (e.g.
    "running", "waiting_for_frames"), optional flat ``stats`` of name -> number, string,
    bool or null."""

    kind: ClassVar[str] = "heartbeat"

    role: str
    state: str
    stats: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "role", _str(self.role, "role", nonempty=True))
        _set(self, "state", _str(self.state, "state", nonempty=True))
        if self.stats is not None:
            if not isinstance(self.stats, dict):
                raise WireError("'stats' must be an object")
            _set(self, "stats", {_str(k, "stats key"): _stat(v, f"stats.{k}")
                                 for k, v in self.stats.items()})


@dataclass(frozen=True, kw_only=True, eq=False)
class VolumeFrame(Message):
    """An intra-operative CT / CBCT volume with its grid, as ITK describes it.

    ``voxels``: (K, J, I) float32 CT numbers (HU), indexed [k, j, i], finite, at least 2
    voxels along each axis; ``spacing_mm``: (i, j, k) voxel size (> 0); ``origin_mm``:
    world position of voxel (0, 0, 0) in the scanner's LPS frame; ``direction``: 3x3
    orthonormal direction cosines (columns = index axes); ``T_tracker_from_scanner``:
    the scanner's LPS frame in the tracker frame when the scanner is tracked or
    calibrated to the tracker (lets instruments be mapped through the volume);
    ``acquired_ns``: acquisition time; ``volume_id``: the scanner's running number;
    ``modality``: e.g. "CT", "CBCT"; ``ground_truth``: optional name -> 4x4 pose for
    bench testing (e.g. ``T_world_corrected_from_world``).
    """

    kind: ClassVar[str] = "volume"
    buffer_fields: ClassVar[tuple[str, ...]] = ("voxels",)

    volume_id: int
    acquired_ns: int
    voxels: np.ndarray
    spacing_mm: np.ndarray
    origin_mm: np.ndarray
    direction: np.ndarray
    modality: str = "CBCT"
    T_tracker_from_scanner: np.ndarray | None = None
    ground_truth: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "volume_id", _int(self.volume_id, "volume_id", minimum=0))
        _set(self, "acquired_ns", _int(self.acquired_ns, "acquired_ns", minimum=0))
        voxels = self.voxels
        if not isinstance(voxels, np.ndarray):
            raise WireError(f"'voxels' must be a numpy array, got {type(voxels).__name__}")
        if voxels.ndim != 3 or min(voxels.shape) < 2:
            raise WireError(f"'voxels' must be a 3-D array with at least 2 voxels per axis, got shape "
                            f"{voxels.shape}")
        if voxels.dtype.name != "float32":
            raise WireError(f"'voxels' must be float32 (HU), got {voxels.dtype.name}")
        if not np.all(np.isfinite(voxels)):
            raise WireError("'voxels' contains NaN or infinite values")
        spacing = _vec3(self.spacing_mm, "spacing_mm")
        if np.any(spacing <= 0):
            raise WireError(f"'spacing_mm' must be positive, got {spacing.tolist()}")
        _set(self, "spacing_mm", spacing)
        _set(self, "origin_mm", _vec3(self.origin_mm, "origin_mm"))
        try:
            direction = np.asarray(self.direction, dtype=float)
        except (TypeError, ValueError):
            raise WireError("'direction' must be a 3x3 numeric matrix") from None
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise WireError(f"'direction' must be a finite 3x3 matrix, got shape {direction.shape}")
        if np.abs(direction.T @ direction - np.eye(3)).max() > _UNIT_TOL * 100:
            raise WireError("'direction' must be orthonormal (direction cosines), got "
                            f"{np.round(direction, 6).tolist()}")
        _set(self, "direction", direction)
        _set(self, "modality", _str(self.modality, "modality", nonempty=True))
        _set(self, "T_tracker_from_scanner", _opt_pose(self.T_tracker_from_scanner, "T_tracker_from_scanner"))
        if self.ground_truth is not None:
            _set(self, "ground_truth", _pose_map(self.ground_truth, "ground_truth"))


def _stat(value: Any, name: str) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _float(value, name)
    raise WireError(f"'{name}' must be a number, string, bool or null, "
                    f"got {type(value).__name__}")


KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Frame, TrackerSample, PoseResult, InstrumentState, TargetPose,
                              Overlay, Heartbeat, VolumeFrame)
}


# ---------------------------------------------------------------------------------------
# Encode / decode


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, View):
        return view_to_dict(value)
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _buffer_array(value: np.ndarray | bytes) -> np.ndarray:
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype=np.uint8)
    return value.astype(value.dtype.newbyteorder("<"), copy=False)


def encode(msg: Message) -> list[bytes]:
    """The multipart frames of a message: [JSON header, buffer bytes, ...]."""
    if type(msg) not in KINDS.values():
        raise WireError(f"cannot encode {type(msg).__name__}: not a registered message kind")
    header: dict[str, Any] = {"schema": SCHEMA, "version": VERSION, "kind": msg.kind}
    payloads = []
    descriptors = []
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name not in msg.buffer_fields:
            header[f.name] = _to_json(value)
            continue
        array = _buffer_array(value)
        payload = array.tobytes()
        payloads.append(payload)
        descriptors.append({"dtype": array.dtype.name, "shape": list(array.shape),
                            "nbytes": len(payload), "crc32": zlib.crc32(payload)})
    header["buffers"] = descriptors
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{msg.kind} header cannot be written as finite JSON: {exc}") from None
    return [text.encode("utf-8"), *payloads]


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"header contains a non-finite number {text}")
    return value


def _reject_constant(text: str) -> None:
    raise WireError(f"header contains a non-finite number {text}")


def _parse_header(part: bytes) -> dict:
    if not isinstance(part, (bytes, bytearray, memoryview)):
        raise WireError(f"part 0 must be bytes, got {type(part).__name__}")
    if len(part) > MAX_HEADER_BYTES:
        raise WireError(f"header (part 0) has {len(part)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        text = bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("header (part 0) is not UTF-8 text") from None
    try:
        header = json.loads(text, parse_float=_parse_finite_float, parse_constant=_reject_constant)
    except WireError:
        raise
    except (ValueError, RecursionError) as exc:
        raise WireError(f"header (part 0) is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header (part 0) must be a JSON object, got {type(header).__name__}")
    return header


def _unpack_buffer(descriptor: Any, part: bytes, index: int) -> np.ndarray:
    name = f"buffer {index}"
    if not isinstance(descriptor, dict) or set(descriptor) != _DESCRIPTOR_KEYS:
        raise WireError(f"{name}: descriptor must be an object with exactly "
                        f"{', '.join(sorted(_DESCRIPTOR_KEYS))}")
    dtype = descriptor["dtype"]
    if dtype not in DTYPES:
        raise WireError(f"{name}: dtype {_clip(repr(dtype))} not allowed; allowed: {', '.join(DTYPES)}")
    shape = descriptor["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"{name}: shape must be a list of at most {MAX_NDIM} integers")
    shape = [_int(n, f"{name} shape", minimum=0, maximum=MAX_DIM) for n in shape]
    nbytes = _int(descriptor["nbytes"], f"{name} nbytes", minimum=0)
    crc = _int(descriptor["crc32"], f"{name} crc32", minimum=0, maximum=0xFFFFFFFF)
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes != expected:
        raise WireError(f"{name}: nbytes {nbytes} != {dtype} x shape {shape} = {expected} bytes")
    if not isinstance(part, (bytes, bytearray, memoryview)):
        raise WireError(f"{name}: part must be bytes, got {type(part).__name__}")
    if len(part) != nbytes:
        raise WireError(f"{name}: part has {len(part)} bytes, its descriptor says {nbytes}")
    actual = zlib.crc32(part)
    if actual != crc:
        raise WireError(f"{name}: CRC32 mismatch (header {crc:#010x}, data {actual:#010x})")
    return np.frombuffer(part, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _sender(header: dict) -> str:
    """The claimed ``source`` of a header, shortened, for error messages."""
    source = header.get("source")
    return _clip(source, 64) if isinstance(source, str) else UNKNOWN_SENDER


def decode(parts: list[bytes]) -> Message:
    """Validate multipart frames and build their message.

    Raises WireError naming the kind, the claimed sender and the problem, and nothing
    else, whatever the bytes. Buffer arrays are read-only views of ``parts``.
    """
    if not isinstance(parts, (list, tuple)) or not parts:
        raise _named(WireError("too few parts: a message needs at least the header part"), "message",
                     UNKNOWN_SENDER)
    try:
        header = _parse_header(parts[0])
    except WireError as exc:
        raise _named(exc, "message", UNKNOWN_SENDER) from None
    sender = _sender(header)
    kind = header.get("kind")
    label = kind if isinstance(kind, str) and kind in KINDS else "message"
    try:
        with np.errstate(all="ignore"):  # huge numbers overflow in the checks, which then refuse them
            return _decode(header, parts, kind)
    except WireError as exc:
        raise _named(exc, label, sender) from None
    except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
        # A check this module is missing: still a rejected message, never a crash.
        raise _named(WireError(f"invalid content ({type(exc).__name__}: {_clip(str(exc), 200)})"),
                     label, sender) from None


def _named(exc: WireError, kind: str, sender: str) -> WireError:
    """``exc`` with the kind and sender in front of its text and as attributes."""
    return WireError(f"{kind} from {sender!r}: {exc}", kind=kind, sender=sender, detail=str(exc))


def _decode(header: dict, parts: list[bytes], kind: Any) -> Message:
    schema = header.get("schema")
    if schema != SCHEMA:
        raise WireError(f"unknown schema {_clip(repr(schema))}; expected {SCHEMA!r}")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
        raise WireError(f"unsupported version {_clip(repr(version))}; this side speaks version {VERSION}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown kind {_clip(repr(kind))}; known kinds: {', '.join(KINDS)}")
    cls = KINDS[kind]
    descriptors = header.get("buffers")
    if not isinstance(descriptors, list):
        raise WireError("'buffers' must be a list of buffer descriptors")
    if len(descriptors) != len(cls.buffer_fields):
        raise WireError(f"header lists {len(descriptors)} buffers, a {kind} has "
                        f"{len(cls.buffer_fields)}")
    if len(parts) != 1 + len(descriptors):
        few_many = "too few" if len(parts) < 1 + len(descriptors) else "too many"
        raise WireError(f"{few_many} parts: got {len(parts)}, expected header + "
                        f"{len(descriptors)} buffers")
    arrays = [_unpack_buffer(d, p, i) for i, (d, p) in enumerate(zip(descriptors, parts[1:]))]
    content = {k: v for k, v in header.items() if k not in _ENVELOPE}
    names = {f.name for f in fields(cls)} - set(cls.buffer_fields)
    unknown = sorted(set(content) - names)
    if unknown:
        raise WireError(f"unexpected field(s) {_clip(', '.join(unknown))}")
    missing = sorted(f.name for f in fields(cls) if f.name in names and f.name not in content
                     and _is_required(f))
    if missing:
        raise WireError(f"missing field(s) {', '.join(missing)}")
    return cls(**content, **dict(zip(cls.buffer_fields, arrays)))


def _is_required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING
