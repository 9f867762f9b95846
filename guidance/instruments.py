"""Surgical instruments: models, tracker -> CT mapping and deviation from the screw plan.

Frames (CONVENTIONS.md): world = LPS mm of the pre-operative CT; a tracked tool has its
own frame ("tool", the frame the tracker reports for its marker array); the patient
reference array has the frame "reference". Poses are 4x4 ``T_to_from_from``.

Direction convention: an ``InstrumentModel.axis_tool`` points from the tip towards the
handle (as pivot calibration gives it), while every ``axis_world`` in this module (and in
``guidance.wire.InstrumentState``) points the other way, from the handle towards the tip,
the direction in which the instrument advances.

A plan is a list of trajectory dicts (guidance.plan/1: ``level``, ``label``, ``side``,
``entry_world``, ``target_world``, ``screw_diameter_mm``), or the plan object holding
them under ``"trajectories"``; this module never reads plan files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from guidance.geometry import check_rigid, invert_rigid, transform_points

__all__ = [
    "INSTRUMENT_KINDS",
    "InstrumentModel",
    "INSTRUMENTS",
    "get_instrument",
    "tool_in_world",
    "tip_and_axis",
    "plan_trajectories",
    "trajectory_endpoints",
    "deviation_from_plan",
    "nearest_trajectory",
]

INSTRUMENT_KINDS = ("kwire", "jamshidi", "screw")
PLAN_SCHEMA = "guidance.plan/1"


def _vector3(value: object, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=float)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return v


@dataclass(frozen=True)
class InstrumentModel:
    """A straight instrument tracked by a marker array.

    ``length_mm``: length of the working part drawn back from the tip (wire, needle
    cannula, screw); ``diameter_mm``: its diameter; ``tip_offset_tool``: tip position
    in the tool frame (mm, from pivot calibration); ``axis_tool``: unit vector in the
    tool frame from the tip towards the handle (normalised on construction).
    """

    name: str
    kind: str
    length_mm: float
    diameter_mm: float
    tip_offset_tool: np.ndarray
    axis_tool: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in INSTRUMENT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(INSTRUMENT_KINDS)}; "
                             f"got {self.kind!r}")
        if not (self.length_mm > 0 and self.diameter_mm > 0):
            raise ValueError("length_mm and diameter_mm must be positive")
        axis = _vector3(self.axis_tool, "axis_tool")
        norm = float(np.linalg.norm(axis))
        if norm < 1e-9:
            raise ValueError("axis_tool must not be the zero vector")
        object.__setattr__(self, "tip_offset_tool", _vector3(self.tip_offset_tool,
                                                             "tip_offset_tool"))
        object.__setattr__(self, "axis_tool", axis / norm)


def _nominal(name: str, kind: str, length_mm: float, diameter_mm: float,
             tip_depth_mm: float) -> InstrumentModel:
    """A model whose tool frame has +z from the tip towards the handle and its origin on
    the axis, ``tip_depth_mm`` behind the tip (nominal; real values come from pivot
    calibration)."""
    return InstrumentModel(name, kind, length_mm, diameter_mm,
                           np.array([0.0, 0.0, -tip_depth_mm]), np.array([0.0, 0.0, 1.0]))


INSTRUMENTS: dict[str, InstrumentModel] = {
    m.name: m
    for m in (
        _nominal("kwire", "kwire", 150.0, 1.6, 150.0),
        _nominal("jamshidi", "jamshidi", 120.0, 3.0, 120.0),
        # 6.5 x 45 mm pedicle screw on a 200 mm driver: the array sits on the driver.
        _nominal("pedicle_screw_6.5x45", "screw", 45.0, 6.5, 245.0),
    )
}


def get_instrument(name: str) -> InstrumentModel:
    """The registered model called ``name``; ValueError lists the known names."""
    try:
        return INSTRUMENTS[name]
    except KeyError:
        raise ValueError(f"unknown instrument {name!r}; known instruments: "
                         f"{', '.join(INSTRUMENTS)}") from None


def tool_in_world(
    T_tracker_from_tool: np.ndarray,
    T_tracker_from_reference: np.ndarray,
    T_reference_from_world: np.ndarray,
) -> np.ndarray:
    """``T_world_from_tool``: the tracked tool in CT coordinates (LPS mm).

    ``T_tracker_from_tool`` and ``T_tracker_from_reference`` are the tool and patient
    reference array poses as the tracker reports them; ``T_reference_from_world`` maps CT
    points into the reference array frame (from the 2D/3D registration). The result is
    ``inv(T_reference_from_world) @ inv(T_tracker_from_reference) @ T_tracker_from_tool``.
    """
    T_tool = check_rigid(T_tracker_from_tool, "T_tracker_from_tool")
    T_ref = check_rigid(T_tracker_from_reference, "T_tracker_from_reference")
    T_reg = check_rigid(T_reference_from_world, "T_reference_from_world")
    return invert_rigid(T_reg) @ invert_rigid(T_ref) @ T_tool


def tip_and_axis(T_world_from_tool: np.ndarray,
                 model: InstrumentModel) -> tuple[np.ndarray, np.ndarray]:
    """(tip_world (3,) mm, axis_world (3,) unit) of an instrument at ``T_world_from_tool``.

    ``axis_world`` points from the handle towards the tip (``-R @ model.axis_tool``).
    """
    T = check_rigid(T_world_from_tool, "T_world_from_tool")
    tip = transform_points(T, model.tip_offset_tool)
    return tip, -(T[:3, :3] @ model.axis_tool)


def plan_trajectories(plan: dict | list | tuple | None) -> list[dict]:
    """The trajectory dicts of a plan given as a list of them, a guidance.plan/1 object
    or None (no plan: an empty list)."""
    if plan is None:
        return []
    if isinstance(plan, dict):
        if plan.get("schema", PLAN_SCHEMA) != PLAN_SCHEMA:
            raise ValueError(f"unsupported plan schema {plan.get('schema')!r}; "
                             f"expected {PLAN_SCHEMA!r}")
        plan = plan.get("trajectories")
    if not isinstance(plan, (list, tuple)) or not all(isinstance(t, dict) for t in plan):
        raise ValueError("a plan must be a list of trajectory objects or a guidance.plan/1 "
                         "object with a 'trajectories' list")
    return list(plan)


def trajectory_endpoints(trajectory: dict) -> tuple[np.ndarray, np.ndarray]:
    """(entry_world, target_world) of a planned trajectory (LPS mm), validated."""
    points = []
    for key in ("entry_world", "target_world"):
        if key not in trajectory:
            raise ValueError(f"trajectory {trajectory.get('level', '?')} is missing '{key}'")
        points.append(_vector3(trajectory[key], key))
    if np.linalg.norm(points[1] - points[0]) < 1e-6:
        raise ValueError("trajectory entry_world and target_world coincide")
    return points[0], points[1]


def deviation_from_plan(tip_world: np.ndarray, axis_world: np.ndarray,
                        trajectory: dict) -> dict[str, float]:
    """How far an instrument is from a planned trajectory (mm, degrees).

    ``axis_world`` points towards the tip. Returns:

    - ``distance_to_trajectory_mm``: tip to the infinite line through entry and target;
    - ``angle_to_trajectory_deg``: between the instrument axis and the entry -> target
      direction, in [0, 180] (0 = advancing along the plan);
    - ``depth_along_trajectory_mm``: signed position of the tip projected on the line,
      from the entry (0) towards the target (positive), negative before the entry;
    - ``tip_to_target_mm``: straight distance from the tip to the target;
    - ``lateral_offset_at_entry_mm``: distance from the entry point to where the
      instrument's axis line crosses the plane through the entry perpendicular to the
      trajectory (``inf`` when the instrument lies parallel to that plane).
    """
    tip = _vector3(tip_world, "tip_world")
    axis = _vector3(axis_world, "axis_world")
    axis = axis / np.linalg.norm(axis)
    entry, target = trajectory_endpoints(trajectory)
    direction = (target - entry) / np.linalg.norm(target - entry)
    depth = float(np.dot(tip - entry, direction))
    cos = float(np.dot(axis, direction))
    if abs(cos) < 1e-9:
        lateral = math.inf
    else:
        crossing = tip - axis * depth / cos
        lateral = float(np.linalg.norm(crossing - entry))
    return {
        "distance_to_trajectory_mm": float(np.linalg.norm(tip - entry - depth * direction)),
        "angle_to_trajectory_deg": math.degrees(math.acos(min(1.0, max(-1.0, cos)))),
        "depth_along_trajectory_mm": depth,
        "tip_to_target_mm": float(np.linalg.norm(target - tip)),
        "lateral_offset_at_entry_mm": lateral,
    }


def _distance_to_segment(point: np.ndarray, trajectory: dict) -> float:
    entry, target = trajectory_endpoints(trajectory)
    d = target - entry
    s = float(np.clip(np.dot(point - entry, d) / np.dot(d, d), 0.0, 1.0))
    return float(np.linalg.norm(point - entry - s * d))


def nearest_trajectory(tip_world: np.ndarray, axis_world: np.ndarray,
                       plan: dict | list) -> tuple[dict, dict[str, float]]:
    """The planned trajectory closest to the tip and the instrument's deviation from it.

    Closest means the smallest distance from the tip to the entry -> target segment (not
    the infinite line, on which the converging left and right trajectories meet).
    """
    trajectories = plan_trajectories(plan)
    if not trajectories:
        raise ValueError("the plan has no trajectories")
    tip = _vector3(tip_world, "tip_world")
    best = min(trajectories, key=lambda t: _distance_to_segment(tip, t))
    return best, deviation_from_plan(tip, axis_world, best)
