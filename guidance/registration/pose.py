"""Pose parameterisations of the rigid CT correction searched by registration.

Registration estimates ``T_world_corrected_from_world`` (docs/conventions.md), shared by
all views: ``T_cam_i_from_world_est = T_cam_i_from_world_init @ inv(T_corr)``.
The optimiser sees six numbers x = (rx, ry, rz in degrees as a rotation vector,
tx, ty, tz in mm) describing a motion ``D`` of the anatomy about a centre point
(the target / ROI centre), so rotations turn the anatomy in place instead of
swinging it about the world origin:

- "camera": D is expressed in the reference camera's axes: tx, ty move the anatomy
  across the image, tz along the principal ray (depth, weakly observed in one view),
  rz spins it in the image plane.
- "world": D is expressed in the world (LPS) axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guidance.core.geometry import invert_rigid, make_rigid, rotation_from_rotvec, rotvec_from_rotation
from guidance.registration.errors import RegistrationError

__all__ = ["PARAMETERIZATIONS", "PoseParameterization", "point_displacement_mm"]


def point_displacement_mm(T_a: np.ndarray, T_b: np.ndarray, point: np.ndarray) -> float:
    """Distance (mm) between where two rigid transforms put one point."""
    p = np.asarray(point, dtype=float)
    return float(np.linalg.norm((T_a[:3, :3] - T_b[:3, :3]) @ p + T_a[:3, 3] - T_b[:3, 3]))


def _motion(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Rigid motion: rotate by the rotation vector x[:3] (deg) about ``centre``, then
    translate by x[3:] (mm)."""
    R = rotation_from_rotvec(np.deg2rad(np.asarray(x[:3], dtype=float)))
    return make_rigid(R, centre + np.asarray(x[3:], dtype=float) - R @ centre)


def _params(D: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Inverse of ``_motion``."""
    R = D[:3, :3]
    return np.concatenate([np.rad2deg(rotvec_from_rotation(R)), D[:3, 3] - centre + R @ centre])


PARAMETERIZATIONS = ("camera", "world")


@dataclass(frozen=True)
class PoseParameterization:
    """Maps parameter vectors to ``T_world_corrected_from_world`` and back.

    ``centre_world`` is the rotation centre (mm, world); ``T_cam_from_world_ref`` the
    initial pose of the reference view (used by the "camera" kind).
    """

    kind: str
    centre_world: np.ndarray
    T_cam_from_world_ref: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in PARAMETERIZATIONS:
            raise RegistrationError(
                f"unknown pose parameterisation {self.kind!r}; choose one of {', '.join(PARAMETERIZATIONS)}"
            )

    def _to_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """(T_frame_from_world, centre in that frame) for the parameter axes."""
        T = self.T_cam_from_world_ref if self.kind == "camera" else np.eye(4)
        centre = T[:3, :3] @ np.asarray(self.centre_world, dtype=float) + T[:3, 3]
        return T, centre

    def correction(self, x: np.ndarray) -> np.ndarray:
        """``T_world_corrected_from_world`` for parameters x (deg, mm)."""
        T, centre = self._to_frame()
        D_frame = _motion(x, centre)
        # The anatomy moved by D: T_cam_est = T_cam_init @ M with M = T^-1 D T, T_corr = M^-1.
        M = invert_rigid(T) @ D_frame @ T
        return invert_rigid(M)

    def depth_step(self) -> np.ndarray:
        """The parameter change (deg, mm) that moves the anatomy 1 mm along the
        reference view's principal ray (its camera z axis), turning nothing."""
        step = np.zeros(6)
        if self.kind == "camera":
            step[5] = 1.0
        else:
            step[3:] = self.T_cam_from_world_ref[2, :3]
        return step

    def ray_step(self) -> np.ndarray:
        """The parameter change (deg, mm) that moves the anatomy 1 mm along the reference
        view's ray through the rotation centre, away from the source, turning nothing: the
        centre's image stays where it is and only its depth changes."""
        R, t = self.T_cam_from_world_ref[:3, :3], self.T_cam_from_world_ref[:3, 3]
        ray_cam = R @ np.asarray(self.centre_world, dtype=float) + t
        ray_cam = ray_cam / np.linalg.norm(ray_cam)
        return np.r_[0.0, 0.0, 0.0, ray_cam if self.kind == "camera" else R.T @ ray_cam]

    def params(self, T_world_corrected_from_world: np.ndarray) -> np.ndarray:
        """Parameters (deg, mm) of a correction; ``params(correction(x)) == x``."""
        T, centre = self._to_frame()
        M = invert_rigid(T_world_corrected_from_world)
        return _params(T @ M @ invert_rigid(T), centre)
