"""Planned trajectories as target poses for a robot arm or a tracked aiming guide.

A trajectory's target frame has its origin at the planned entry point and +z along the
planned axis (entry -> target); x is the world x axis (patient left) made perpendicular
to z (the world y axis when z is nearly along x), y = z x x. The rotation about the axis
is a convention only: a robot or guide aligns the axis and the entry point.

Frames: world = LPS mm of the pre-op CT; reference = the patient reference array;
tracker = the optical tracker. ``T_tracker_from_target = T_tracker_from_reference @
T_reference_from_world @ T_world_from_target``.
"""

from __future__ import annotations

import math

import numpy as np

from guidance.core.geometry import check_rigid, invert_rigid, make_rigid, transform_points
from guidance.core.plan import trajectory_endpoints

__all__ = [
    "ALIGNED_MM",
    "ALIGNED_DEG",
    "target_pose_world",
    "target_pose_tracker",
    "trajectory_from_target_pose",
    "guide_alignment",
]

ALIGNED_MM = 1.0
"""A guide is aligned when its axis passes within this of the entry point (mm) ..."""
ALIGNED_DEG = 1.0
"""... and its axis is within this of the planned axis (degrees)."""


def target_pose_world(trajectory: dict) -> np.ndarray:
    """``T_world_from_target`` of a planned trajectory (module docstring)."""
    entry, target = trajectory_endpoints(trajectory)
    z = (target - entry) / np.linalg.norm(target - entry)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = helper - (helper @ z) * z
    x /= np.linalg.norm(x)
    return make_rigid(np.column_stack([x, np.cross(z, x), z]), entry)


def target_pose_tracker(trajectory: dict, T_tracker_from_reference: np.ndarray,
                        T_reference_from_world: np.ndarray) -> np.ndarray:
    """``T_tracker_from_target``: the trajectory's target frame where the tracker sees it,
    through the reference array's pose and the registration."""
    T_ref = check_rigid(T_tracker_from_reference, "T_tracker_from_reference")
    T_reg = check_rigid(T_reference_from_world, "T_reference_from_world")
    return T_ref @ T_reg @ target_pose_world(trajectory)


def trajectory_from_target_pose(T_tracker_from_target: np.ndarray, length_mm: float,
                                T_tracker_from_reference: np.ndarray,
                                T_reference_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entry_world, target_world) (LPS mm) of a target pose in the tracker frame: the
    inverse of ``target_pose_tracker``."""
    T_world_from_tracker = invert_rigid(check_rigid(T_reference_from_world, "T_reference_from_world")) @ invert_rigid(
        check_rigid(T_tracker_from_reference, "T_tracker_from_reference"))
    T_world_from_target = T_world_from_tracker @ check_rigid(T_tracker_from_target, "T_tracker_from_target")
    points = transform_points(T_world_from_target, np.array([[0.0, 0.0, 0.0], [0.0, 0.0, float(length_mm)]]))
    return points[0], points[1]


def guide_alignment(tip: np.ndarray, axis: np.ndarray, T_frame_from_target: np.ndarray) -> tuple[float, float, bool]:
    """(entry error mm, angle error deg, aligned) of a guide whose tip and unit axis
    (pointing where it aims) are given in the same frame as the target pose: the distance
    from the planned entry point to the guide's axis line, the angle between the guide's
    axis and the planned one, and whether both are within ``ALIGNED_MM`` / ``ALIGNED_DEG``."""
    T = check_rigid(T_frame_from_target, "T_frame_from_target")
    tip = np.asarray(tip, dtype=float).reshape(3)
    axis = np.asarray(axis, dtype=float).reshape(3)
    axis = axis / np.linalg.norm(axis)
    entry, planned = T[:3, 3], T[:3, 2]
    offset = entry - tip
    entry_error = float(np.linalg.norm(offset - (offset @ axis) * axis))
    angle = math.degrees(math.acos(min(1.0, max(-1.0, float(axis @ planned)))))
    return entry_error, angle, entry_error <= ALIGNED_MM and angle <= ALIGNED_DEG
