"""Accuracy metrics of 2D/3D registration (docs/conventions.md, "Accuracy metrics").

Errors are measured on target points X_k (world LPS mm) inside the anatomy of
interest, which the optimiser never sees:

- mTRE: mean over X_k of ``|| T_est X_k - T_gt X_k ||`` (mm, camera frame);
- mPD: mean distance between the projections of X_k under the estimated and the
  true view, in mm at the detector and scaled to the plane of the target;
- success: mTRE < ``SUCCESS_MM``; success rate per initial-mTRE bin; capture range: the
  largest initial-mTRE bin whose success rate is at least ``CAPTURE_MIN_RATE``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import project, transform_points
from guidance.core.views import View
from guidance.core.volume import Volume, VolumeError

__all__ = [
    "DEFAULT_BINS",
    "SUCCESS_MM",
    "CAPTURE_MIN_RATE",
    "EvaluationError",
    "target_array",
    "mtre",
    "mean_projection_distance",
    "target_points",
    "success_rates",
    "capture_range",
    "capture_range_of_rates",
]

DEFAULT_BINS = ((0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 30.0))
"""Initial-mTRE bins [lo, hi) (mm) of the success rates."""
SUCCESS_MM = 2.0
"""A registration succeeds when its final mTRE is below this (mm)."""
CAPTURE_MIN_RATE = 0.95
"""The capture range is the largest bin with at least this success rate."""


class EvaluationError(GuidanceError):
    """Bad evaluation input: targets, cases, benchmark folders, options."""


def target_array(targets_world: np.ndarray) -> np.ndarray:
    """Target points as a float (N, 3) array (world mm); EvaluationError unless non-empty and finite."""
    X = np.asarray(targets_world, dtype=float).reshape(-1, 3)
    if len(X) == 0 or not np.all(np.isfinite(X)):
        raise EvaluationError("target points must be a non-empty (N, 3) array of finite world points (mm)")
    return X


def mtre(T_est_cam_from_world: np.ndarray, T_gt_cam_from_world: np.ndarray, targets_world: np.ndarray) -> float:
    """Mean target registration error (mm): mean over the targets X_k (world, (N, 3) mm)
    of ``|| T_est X_k - T_gt X_k ||``, both poses ``T_cam_from_world``."""
    X = target_array(targets_world)
    d = transform_points(T_est_cam_from_world, X) - transform_points(T_gt_cam_from_world, X)
    return float(np.mean(np.linalg.norm(d, axis=1)))


def _pixel_pitch(view: View) -> np.ndarray | None:
    """Detector pixel pitch (du, dv) in mm: from the view, or from its SDD and K."""
    if view.pixel_spacing_mm is not None:
        return np.asarray(view.pixel_spacing_mm, dtype=float)
    if view.source_to_detector_mm is not None:
        return view.source_to_detector_mm / np.array([view.K[0, 0], view.K[1, 1]])
    return None


def mean_projection_distance(view_est: View, view_gt: View, targets_world: np.ndarray) -> tuple[float, float]:
    """Mean projection distance of the targets (world, (N, 3) mm) between two views of
    one detector: ``(mpd_detector_mm, mpd_isocenter_mm)``.

    At the detector: pixel distance between ``P_est X_k`` and ``P_gt X_k`` times the pixel
    pitch (NaN when the view gives neither ``pixel_spacing_mm`` nor
    ``source_to_detector_mm``). At the isocentre: that distance scaled by the target's
    depth in the true camera over the source-to-detector distance (computed as the
    offset in normalised image coordinates times depth, so it needs K only).
    """
    X = target_array(targets_world)
    d_px = project(view_est.P, X) - project(view_gt.P, X)
    depth = transform_points(view_gt.T_cam_from_world, X)[:, 2]
    d_norm = np.linalg.solve(view_gt.K[:2, :2], d_px.T).T
    iso = float(np.mean(np.linalg.norm(d_norm, axis=1) * depth))
    pitch = _pixel_pitch(view_gt)
    detector = float("nan") if pitch is None else float(np.mean(np.linalg.norm(d_px * pitch, axis=1)))
    return detector, iso


def target_points(
    ct: Volume,
    *,
    labels: Volume | None = None,
    level: int | None = None,
    max_points: int = 500,
    bone_hu: float = 200.0,
    seed: int = 0,
) -> np.ndarray:
    """Target points (M, 3) world mm: voxel centres inside the anatomy of interest.

    With ``labels``: voxels of label ``level``, or of any label (> 0) when ``level`` is
    None. Without: voxels above ``bone_hu`` HU inside the central half of the grid
    along each axis (the spine of a CT centred on it). At most ``max_points``, drawn
    at random (seeded) without replacement.
    """
    if labels is not None:
        if labels.data.shape != ct.data.shape:
            raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {ct.data.shape}")
        mask = labels.data > 0 if level is None else labels.data == level
    elif level is not None:
        raise EvaluationError("targets of one level need a label map")
    else:
        mask = np.zeros(ct.data.shape, dtype=bool)
        central = tuple(slice(n // 4, n - n // 4) for n in ct.data.shape)
        mask[central] = ct.data[central] > bone_hu
    kk, jj, ii = np.nonzero(mask)
    if len(ii) == 0:
        what = f"label {level}" if level is not None else "bone"
        raise EvaluationError(f"no voxels of {what} to place target points in")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ii), size=min(max_points, len(ii)), replace=False)
    return ct.index_to_world(np.column_stack([ii[pick], jj[pick], kk[pick]]).astype(float))


def _bin_index(value: float, bins: Sequence[tuple[float, float]]) -> int | None:
    """Index of the half-open bin [lo, hi) holding ``value``, None if outside all."""
    for i, (lo, hi) in enumerate(bins):
        if lo <= value < hi:
            return i
    return None


def success_rates(
    initial_mtre: Sequence[float],
    final_mtre: Sequence[float],
    *,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    success_mm: float = SUCCESS_MM,
) -> list[dict]:
    """Success rate per initial-mTRE bin: one dict per bin with ``bin_mm`` [lo, hi)
    (mm), ``n`` starts, ``n_success`` (final mTRE < ``success_mm``) and ``rate``
    (None for an empty bin). Starts outside every bin are ignored."""
    initial = np.asarray(initial_mtre, dtype=float)
    final = np.asarray(final_mtre, dtype=float)
    if initial.shape != final.shape:
        raise EvaluationError(f"initial and final mTRE differ in length: {initial.shape} vs {final.shape}")
    which = np.array([_bin_index(v, bins) for v in initial], dtype=object)
    out = []
    for i, (lo, hi) in enumerate(bins):
        inside = which == i
        n = int(inside.sum())
        k = int(np.sum(final[inside] < success_mm))
        out.append({"bin_mm": [float(lo), float(hi)], "n": n, "n_success": k, "rate": k / n if n else None})
    return out


def capture_range_of_rates(rates: list[dict], min_rate: float) -> float:
    """Upper edge (mm) of the largest non-empty bin with rate >= ``min_rate`` (0 if none)."""
    edges = [r["bin_mm"][1] for r in rates if r["rate"] is not None and r["rate"] >= min_rate]
    return float(max(edges, default=0.0))


def capture_range(
    initial_mtre: Sequence[float],
    final_mtre: Sequence[float],
    *,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    success_mm: float = SUCCESS_MM,
    min_rate: float = CAPTURE_MIN_RATE,
) -> float:
    """Capture range (mm): the upper edge of the largest initial-mTRE bin whose success
    rate is at least ``min_rate`` (docs/conventions.md; empty bins do not count), 0 if none."""
    return capture_range_of_rates(success_rates(initial_mtre, final_mtre, bins=bins, success_mm=success_mm), min_rate)
