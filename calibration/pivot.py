"""Pivot calibration of tracked instruments.

A tool tracked as ``T_tracker_from_tool`` (4x4, mm) pivots about its tip resting in a
divot: for every pose i, ``R_i @ t_tip + t_i = p_pivot`` with ``t_tip`` the tip offset
in the tool frame and ``p_pivot`` the pivot point in the tracker frame. Two solvers:

- ``linear``: least squares on the stacked system ``[R_i | -I] [t_tip; p_pivot] = -t_i``;
- ``sphere``: the tool origins lie on a sphere about the pivot point; fit the sphere
  (algebraic fit refined geometrically with ``scipy.optimize.least_squares``), then the
  tip offset is the mean of ``R_i^T (p_pivot - t_i)``.

The RMS residual is the RMS distance between the per-pose tip positions
``R_i t_tip + t_i`` and the pivot point (mm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.errors import CalibrationError
from guidance.core.geometry import make_rigid
from guidance.core.jsonfile import read_json

__all__ = [
    "PIVOT_METHODS",
    "PivotResult",
    "SimulatedPivot",
    "pivot_calibration",
    "pivot_linear",
    "pivot_sphere",
    "pose_from_markers",
    "simulate_pivot_poses",
    "read_poses",
    "write_poses",
]

PIVOT_METHODS = ("linear", "sphere")
_MARKERS = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 80.0, 0.0], [-35.0, 45.0, 0.0]])
DEFAULT_MARKERS_MM = _MARKERS - _MARKERS.mean(axis=0)


@dataclass(frozen=True)
class PivotResult:
    """``tip_offset_mm`` (3,) in the tool frame, ``pivot_point_mm`` (3,) in the tracker
    frame, ``residuals_mm`` (N, 3) per-pose tip position minus pivot point, ``rms_mm`` their
    RMS length, ``method`` the solver."""

    tip_offset_mm: np.ndarray
    pivot_point_mm: np.ndarray
    residuals_mm: np.ndarray
    rms_mm: float
    method: str


def _check_poses(T_tracker_from_tool: np.ndarray) -> np.ndarray:
    T = np.asarray(T_tracker_from_tool, dtype=float)
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise CalibrationError(f"poses must have shape (N, 4, 4), got {T.shape}")
    if len(T) < 4:
        raise CalibrationError(f"pivot calibration needs at least 4 poses, got {len(T)}")
    if not np.all(np.isfinite(T)):
        raise CalibrationError("poses contain NaN or infinite values")
    R = T[:, :3, :3]
    err = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max()
    if err > 1e-4 or np.any(np.linalg.det(R) < 0):
        raise CalibrationError("pose rotations must be proper rotations (R R^T = I, det +1)")
    return T


def _result(T: np.ndarray, tip: np.ndarray, pivot: np.ndarray, method: str) -> PivotResult:
    res = np.einsum("nij,j->ni", T[:, :3, :3], tip) + T[:, :3, 3] - pivot
    return PivotResult(tip, pivot, res, float(np.sqrt((res ** 2).sum(axis=1).mean())), method)


def _stacked_system(R: np.ndarray) -> np.ndarray:
    """The (3N, 6) matrix [R_i | -I] of the pivot equations, after checking that the
    rotations span enough directions to fix the tip (a tool that only spins about one
    axis leaves the tip offset along that axis undetermined)."""
    A = np.concatenate([R, -np.broadcast_to(np.eye(3), R.shape)], axis=2).reshape(-1, 6)
    s = np.linalg.svd(A, compute_uv=False)
    if s[-1] < 1e-3 * s[0]:
        raise CalibrationError("poses do not pivot enough: tilt the tool in two directions")
    return A


def pivot_linear(T_tracker_from_tool: np.ndarray) -> PivotResult:
    """Tip offset and pivot point by linear least squares (see module docstring)."""
    T = _check_poses(T_tracker_from_tool)
    A = _stacked_system(T[:, :3, :3])
    x = np.linalg.lstsq(A, -T[:, :3, 3].reshape(-1), rcond=None)[0]
    return _result(T, x[:3], x[3:], "linear")


def pivot_sphere(T_tracker_from_tool: np.ndarray) -> PivotResult:
    """Tip offset and pivot point from a sphere fitted to the tool origins."""
    from scipy.optimize import least_squares

    T = _check_poses(T_tracker_from_tool)
    R, t = T[:, :3, :3], T[:, :3, 3]
    _stacked_system(R)
    # Algebraic fit |t|^2 = 2 c.t + (r^2 - |c|^2), then geometric refinement.
    A = np.column_stack([2.0 * t, np.ones(len(t))])
    sol = np.linalg.lstsq(A, (t ** 2).sum(axis=1), rcond=None)[0]
    centre = sol[:3]
    radius = np.sqrt(max(sol[3] + centre @ centre, 1e-12))
    fit = least_squares(lambda p: np.linalg.norm(t - p[:3], axis=1) - p[3],
                        np.concatenate([centre, [radius]]))
    pivot = fit.x[:3]
    tip = np.einsum("nji,nj->i", R, pivot - t) / len(t)
    return _result(T, tip, pivot, "sphere")


def pivot_calibration(T_tracker_from_tool: np.ndarray, *, method: str = "linear") -> PivotResult:
    """Pivot calibration by ``method`` ("linear" or "sphere")."""
    if method not in PIVOT_METHODS:
        raise CalibrationError(f"method must be one of {', '.join(PIVOT_METHODS)}; got {method!r}")
    return pivot_linear(T_tracker_from_tool) if method == "linear" else \
        pivot_sphere(T_tracker_from_tool)


def pose_from_markers(markers_tool_mm: np.ndarray, markers_tracker_mm: np.ndarray) -> np.ndarray:
    """``T_tracker_from_tool`` best aligning marker positions (M, 3) known in the tool frame
    with their measured tracker positions (M, 3): least-squares rigid fit (Kabsch, via
    ``scipy.spatial.transform.Rotation.align_vectors``)."""
    from scipy.spatial.transform import Rotation

    a = np.asarray(markers_tool_mm, dtype=float)
    b = np.asarray(markers_tracker_mm, dtype=float)
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    rot, _ = Rotation.align_vectors(b - cb, a - ca)
    R = rot.as_matrix()
    return make_rigid(R, cb - R @ ca)


@dataclass(frozen=True)
class SimulatedPivot:
    """Simulated pivoting: measured ``T_tracker_from_tool`` (N, 4, 4) and the truth."""

    T_tracker_from_tool: np.ndarray
    tip_offset_mm: np.ndarray
    pivot_point_mm: np.ndarray


def simulate_pivot_poses(*, n_poses: int = 100,
                         tip_offset_mm: tuple[float, float, float] = (10.0, 30.0, -160.0),
                         pivot_point_mm: tuple[float, float, float] = (40.0, -60.0, -1300.0),
                         cone_deg: float = 30.0,
                         spin_deg: float = 45.0, marker_noise_mm: float = 0.25,
                         markers_tool_mm: np.ndarray | None = None,
                         seed: int | None = 0) -> SimulatedPivot:
    """Noisy tracked poses of a tool pivoting about its tip.

    The tool axis (tip to origin) swings up to ``cone_deg`` about a mean direction facing
    the tracker and spins up to ``spin_deg`` about itself. Each marker (tool frame,
    default a planar 4-marker pointer array) is measured with isotropic Gaussian noise of
    ``marker_noise_mm`` per axis and the pose is fitted to the noisy markers, so position
    and rotation noise are coupled as with a real optical tracker.
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    tip = np.asarray(tip_offset_mm, dtype=float)
    pivot = np.asarray(pivot_point_mm, dtype=float)
    markers = DEFAULT_MARKERS_MM if markers_tool_mm is None else np.asarray(markers_tool_mm,
                                                                            dtype=float)
    # Base orientation: the tool axis (-tip direction) points from the pivot to the tracker.
    axis_tool = -tip / np.linalg.norm(tip)
    to_tracker = -pivot / np.linalg.norm(pivot)
    base, _ = Rotation.align_vectors(to_tracker[None], axis_tool[None])
    poses = []
    for _ in range(n_poses):
        tilt_axis = np.cross(to_tracker, rng.standard_normal(3))
        tilt = Rotation.from_rotvec(tilt_axis / np.linalg.norm(tilt_axis)
                                    * np.deg2rad(cone_deg) * np.sqrt(rng.uniform()))
        spin = Rotation.from_rotvec(axis_tool * np.deg2rad(rng.uniform(-spin_deg, spin_deg)))
        R = (tilt * base * spin).as_matrix()
        t = pivot - R @ tip
        measured = markers @ R.T + t + rng.normal(0.0, marker_noise_mm, markers.shape)
        poses.append(pose_from_markers(markers, measured))
    return SimulatedPivot(np.stack(poses), tip, pivot)


def read_poses(path: str | Path) -> np.ndarray:
    """Tool poses (N, 4, 4) from ``.npy`` (N x 4 x 4), ``.json`` (a list of 4x4 matrices or
    an object with a ``T_tracker_from_tool`` list) or text/CSV (16 numbers a row,
    row-major)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"poses file not found: {path}")
    try:
        if path.suffix == ".npy":
            T = np.load(path)
        elif path.suffix == ".json":
            d = read_json(path, what="poses", error=CalibrationError)
            T = np.array(d["T_tracker_from_tool"] if isinstance(d, dict) else d, dtype=float)
        else:
            T = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
            T = T.reshape(-1, 4, 4)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"cannot read poses from {path}: {exc}") from None
    return _check_poses(T)


def write_poses(T_tracker_from_tool: np.ndarray, path: str | Path) -> None:
    """Write poses (N, 4, 4) as JSON ``{"T_tracker_from_tool": [...]}`` or ``.npy``."""
    path = Path(path)
    T = np.asarray(T_tracker_from_tool, dtype=float)
    if path.suffix == ".npy":
        np.save(path, T)
    else:
        path.write_text(json.dumps({"T_tracker_from_tool": T.tolist()}) + "\n")
