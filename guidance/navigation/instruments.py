"""Tracked instruments in the CT: tracker -> CT mapping and deviation from the plan.

Frames (docs/conventions.md): world = LPS mm of the pre-operative CT; a tracked tool has its
own frame ("tool", the frame the tracker reports for its marker array); the patient
reference array has the frame "reference". Poses are 4x4 ``T_to_from_from``.

Direction convention: an ``InstrumentModel.axis_tool`` points from the tip towards the
handle (as pivot calibration gives it), while every ``axis_world`` in this module (and in
``guidance.live.wire.InstrumentState``) points the other way, from the handle towards the tip,
the direction in which the instrument advances.

Instrument models live in ``guidance.core.instrument_models``, plans in
``guidance.core.plan``; this module never reads plan files.
"""

from __future__ import annotations

import math
import numpy as np

from guidance.core.geometry import check_rigid, invert_rigid, transform_points
from guidance.core.instrument_models import InstrumentModel, _vector3
from guidance.core.plan import PlanError, plan_trajectories, trajectory_endpoints

__all__ = [
    "tool_in_world",
    "tip_and_axis",
    "deviation_from_plan",
    "nearest_trajectory",
]


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
        raise PlanError("the plan has no trajectories")
    tip = _vector3(tip_world, "tip_world")
    best = min(trajectories, key=lambda t: _distance_to_segment(tip, t))
    return best, deviation_from_plan(tip, axis_world, best)
