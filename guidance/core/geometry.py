"""Rigid transforms, pinhole intrinsics, projection and back-projection.

Conventions (docs/conventions.md): lengths in mm, angles in degrees at
interfaces, poses are 4x4 homogeneous matrices named ``T_to_from_from`` acting on
column points, ``x_to = T_to_from_from @ [x, y, z, 1]``. The camera frame is
OpenCV's: origin at the X-ray focal spot, +z along the principal ray towards the
detector, +x along image columns u, +y along image rows v.

Rotations are converted to and from axis-angle vectors here in NumPy (Rodrigues'
formula; Shepperd's quaternion method back), not with scipy: importing scipy takes about a
second, and the live pipeline needs these conversions before its first pose. scipy is
imported by the functions that use it.
"""

from __future__ import annotations

import numpy as np

from guidance.core.errors import GuidanceError

__all__ = [
    "GeometryError",
    "make_rigid",
    "invert_rigid",
    "check_rigid",
    "rotation_about_axis",
    "rotation_from_rotvec",
    "rotvec_from_rotation",
    "transform_points",
    "intrinsics",
    "projection_matrix",
    "project",
    "backproject",
    "decompose_projection",
    "rotation_angle_deg",
]


class GeometryError(GuidanceError):
    """A matrix or point array that violates the geometric contract."""


def make_rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 rigid transform from a 3x3 rotation and a translation (mm)."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=float)
    T[:3, 3] = np.asarray(t, dtype=float).reshape(3)
    return T


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Exact inverse of a rigid transform: ``T_b_from_a`` from ``T_a_from_b``."""
    T = np.asarray(T, dtype=float)
    R = T[:3, :3]
    return make_rigid(R.T, -R.T @ T[:3, 3])


_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])
_EYE3 = np.eye(3)


def check_rigid(T: np.ndarray, name: str = "T", tol: float = 1e-6) -> np.ndarray:
    """Return ``T`` as a float 4x4 array; raise GeometryError unless it is a proper rigid
    transform (orthonormal rotation with det +1, last row [0, 0, 0, 1], finite)."""
    T = np.asarray(T, dtype=float)
    if T.shape != (4, 4):
        raise GeometryError(f"{name} must be 4x4, got shape {T.shape}")
    if not np.isfinite(T).all():
        raise GeometryError(f"{name} contains NaN or infinite values")
    # The np.allclose tests (atol + 1e-5 relative), written out: a pose is checked for every
    # message on the live bus, and allclose costs ~10x more.
    if not (np.abs(T[3] - _LAST_ROW) <= tol + 1e-5 * _LAST_ROW).all():
        raise GeometryError(f"{name} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    if not (np.abs(R @ R.T - _EYE3) <= 1e-5 + 1e-5 * _EYE3).all() or np.linalg.det(R) < 0:
        raise GeometryError(f"{name} rotation part is not a proper rotation (R R^T != I or det < 0)")
    return T


def rotation_about_axis(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` (right hand) about a unit ``axis``."""
    axis = np.asarray(axis, dtype=float)
    return rotation_from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(angle_deg))


def rotation_from_rotvec(rotvec_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation from an axis-angle vector (radians): Rodrigues' formula
    ``I + sin(t)/t K + 2 sin(t/2)^2/t^2 K^2`` with K the cross-product matrix of the vector
    and t its length (the half-angle form has no cancellation at small angles)."""
    v = np.asarray(rotvec_rad, dtype=float).reshape(3)
    angle = float(np.sqrt(v @ v))
    if angle == 0.0:
        return np.eye(3)
    K = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + (np.sin(angle) / angle) * K + (2.0 * np.sin(0.5 * angle) ** 2 / angle**2) * (K @ K)


def rotvec_from_rotation(R: np.ndarray) -> np.ndarray:
    """Axis-angle vector (radians, angle in [0, pi]) of a 3x3 rotation, through its unit
    quaternion (Shepperd's method: built from the largest of the diagonal and the trace,
    so it stays accurate near 180 deg)."""
    R = np.asarray(R, dtype=float)[:3, :3]
    diagonal_and_trace = np.r_[np.diag(R), np.trace(R)]
    i = int(np.argmax(diagonal_and_trace))
    q = np.empty(4)  # x, y, z, w
    if i == 3:
        q[:] = R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1], 1.0 + diagonal_and_trace[3]
    else:
        j, k = (i + 1) % 3, (i + 2) % 3
        q[i] = 1.0 - diagonal_and_trace[3] + 2.0 * R[i, i]
        q[j] = R[j, i] + R[i, j]
        q[k] = R[k, i] + R[i, k]
        q[3] = R[k, j] - R[j, k]
    q /= np.linalg.norm(q)
    if q[3] < 0.0:
        q = -q
    sin_half = float(np.linalg.norm(q[:3]))
    angle = 2.0 * np.arctan2(sin_half, q[3])
    scale = 2.0 + angle**2 / 12.0 + 7.0 * angle**4 / 2880.0 if angle < 1e-3 else angle / sin_half
    return scale * q[:3]


def rotation_angle_deg(T_or_R: np.ndarray) -> float:
    """Rotation angle (degrees) of a rotation or rigid transform."""
    R = np.asarray(T_or_R, dtype=float)[:3, :3]
    return float(np.rad2deg(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points of shape (N, 3) (or (3,)); returns the same shape."""
    p = np.asarray(points, dtype=float)
    flat = p.reshape(-1, 3)
    out = flat @ np.asarray(T, dtype=float)[:3, :3].T + np.asarray(T, dtype=float)[:3, 3]
    return out.reshape(p.shape)


def intrinsics(
    source_to_detector_mm: float,
    pixel_spacing_mm: tuple[float, float],
    principal_point_px: tuple[float, float],
    skew: float = 0.0,
) -> np.ndarray:
    """K from the source-to-detector distance, pixel pitch (du, dv) and principal point."""
    du, dv = pixel_spacing_mm
    if source_to_detector_mm <= 0 or du <= 0 or dv <= 0:
        raise GeometryError("source_to_detector_mm and pixel spacing must be positive")
    u0, v0 = principal_point_px
    return np.array(
        [
            [source_to_detector_mm / du, skew, u0],
            [0.0, source_to_detector_mm / dv, v0],
            [0.0, 0.0, 1.0],
        ]
    )


def projection_matrix(K: np.ndarray, T_cam_from_world: np.ndarray) -> np.ndarray:
    """3x4 ``P = K @ T_cam_from_world[:3, :]``."""
    return np.asarray(K, dtype=float) @ np.asarray(T_cam_from_world, dtype=float)[:3, :]


def project(P: np.ndarray, points_world: np.ndarray) -> np.ndarray:
    """Pixels (N, 2) = (u, v) of world points (N, 3) under the 3x4 projection ``P``."""
    X = np.asarray(points_world, dtype=float).reshape(-1, 3)
    x = X @ P[:, :3].T + P[:, 3]
    return x[:, :2] / x[:, 2:3]


def backproject(
    K: np.ndarray, T_cam_from_world: np.ndarray, pixels_uv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """World rays through pixels (N, 2): returns (source point (3,), unit directions (N, 3)).

    Every ray starts at the focal spot; a point at depth z (camera frame, mm) along the
    ray through (u, v) is ``source + direction * z / direction_cam_z``.
    """
    uv = np.asarray(pixels_uv, dtype=float).reshape(-1, 2)
    homog = np.column_stack([uv, np.ones(len(uv))])
    d_cam = np.linalg.solve(np.asarray(K, dtype=float), homog.T).T
    T_world_from_cam = invert_rigid(T_cam_from_world)
    d_world = d_cam @ T_world_from_cam[:3, :3].T
    d_world /= np.linalg.norm(d_world, axis=1, keepdims=True)
    return T_world_from_cam[:3, 3].copy(), d_world


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 3x4 projection matrix into (K with K[2,2] = 1 and positive focal lengths,
    rigid ``T_cam_from_world``) by RQ decomposition. The overall scale and sign of P are
    irrelevant; the sign is chosen so that points in front of the camera have z > 0."""
    P = np.asarray(P, dtype=float)
    if P.shape != (3, 4) or not np.all(np.isfinite(P)):
        raise GeometryError(f"P must be a finite 3x4 matrix, got shape {P.shape}")
    M = P[:, :3]
    norm = np.linalg.norm(M)
    if norm == 0 or abs(np.linalg.det(M)) < 1e-12 * norm**3:
        raise GeometryError("P is singular: its left 3x3 block has no inverse")
    if np.linalg.det(M) < 0:
        P = -P
        M = -M
    import scipy.linalg

    K, R = scipy.linalg.rq(M)
    signs = np.diag(np.sign(np.diag(K)))
    K = K @ signs
    R = signs @ R
    t = np.linalg.solve(K, P[:, 3])
    K = K / K[2, 2]
    return K, make_rigid(R, t)
