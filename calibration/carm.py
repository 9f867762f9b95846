"""C-arm geometry calibration with a BB phantom, and the per-orientation angle table.

One exposure of the phantom (calibration.phantom_bb) gives the projection matrix
``P = K @ T_cam_from_phantom[:3]`` of the C-arm (docs/conventions.md: K in pixels, pose in mm,
OpenCV camera axes). The pipeline:

1. detect BBs (calibration.blobs) and sort them into the phantom's size classes by the
   attenuation they integrate (proportional to ball volume x magnification^2), setting
   aside blobs that fit no class;
2. correspondences from a nominal geometry: a search over image scale (+-8 %) and
   translation (one-point hypotheses from same-class pairs), Hungarian matching
   (``scipy.optimize.linear_sum_assignment``) with a distance gate, a pose from
   ``cv2.solvePnPRansac`` with the nominal K (refined from the nominal pose), then
   matching again under shrinking gates;
3. normalised DLT, split by ``guidance.core.geometry.decompose_projection``, then
   ``scipy.optimize.least_squares`` over fx, fy, u0, v0 (skew fixed at 0) and the pose,
   robust loss first, then outliers (> max(0.75 px, 4 x median residual)) dropped and a
   plain least-squares pass; the reprojection RMS and parameter standard deviations are
   reported.

Missing BBs (occluded, lost) and spurious blobs (other metal, noise) are tolerated: up to
about 10 % missing and 5 % spurious is the tested range. The nominal geometry should be
right to within about 10 % in SDD, 3 degrees in phantom tilt and 20 mm in phantom
position (the shadow may shift anywhere in the image, but the phantom should stay mostly
in view). Results implausibly far from the nominal K are refused rather than returned.

Calibrations at several (lao_deg, cranial_deg) orientations form a ``CarmAngleTable``.
Between entries, K is interpolated bilinearly and the pose as a correction of the ideal
isocentric C-arm (``guidance.core.views.carm_view``): ``C = T_cam_from_world @ inv(T_ideal)``
per entry, rotations blended with ``scipy.spatial.transform.Slerp``, translations and K
bilinearly, giving ``T = C(angles) @ T_ideal(angles)``.

scipy is imported by the functions that use it: the live pipeline imports this module (through
``calibration.files``) and should not spend a second of its start-up on scipy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from calibration.blobs import Blobs, attenuation_image, detect_blobs
from calibration.errors import CalibrationError, matrix_field
from calibration.phantom_bb import BBPhantom
from guidance.core.geometry import (
    GeometryError,
    decompose_projection,
    invert_rigid,
    make_rigid,
    project,
    transform_points,
)
from guidance.core.views import View, carm_view

__all__ = [
    "CarmCalibrationResult",
    "CarmAngleEntry",
    "CarmAngleTable",
    "detect_bbs",
    "classify_blobs",
    "match_bbs",
    "dlt_projection",
    "refine_camera",
    "calibrate_from_blobs",
    "calibrate_carm_image",
    "build_angle_table",
    "sagging_carm_view",
    "interpolate_view",
    "angle_table_to_dict",
    "angle_table_from_dict",
]

_BIG = 1e12
MIN_MATCHES = 12


@dataclass(frozen=True)
class CarmCalibrationResult:
    """One calibrated exposure.

    ``K`` (3x3, px), ``T_cam_from_phantom`` (4x4, mm); ``bb_index`` (M,) phantom BBs used,
    ``uv`` (M, 2) their detected centres (px), ``residuals_px`` (M, 2) reprojection minus
    detection; ``rms_px`` the RMS of the residual vector lengths; ``std`` one-sigma
    uncertainties of fx, fy, u0, v0 (px) from the final Jacobian; ``detections`` every
    detected blob; ``outlier_uv`` matched detections rejected as outliers.
    """

    K: np.ndarray
    T_cam_from_phantom: np.ndarray
    image_size: tuple[int, int]
    bb_index: np.ndarray
    uv: np.ndarray
    residuals_px: np.ndarray
    rms_px: float
    std: dict
    detections: Blobs
    outlier_uv: np.ndarray

    @property
    def P(self) -> np.ndarray:
        """3x4 projection matrix from phantom (mm) to pixels."""
        return self.K @ self.T_cam_from_phantom[:3]

    def source_to_detector_mm(self, pixel_spacing_mm: tuple[float, float]) -> float:
        """SDD (mm) = mean of fx * du and fy * dv for the detector pitch (du, dv) in mm."""
        return float(0.5 * (self.K[0, 0] * pixel_spacing_mm[0]
                            + self.K[1, 1] * pixel_spacing_mm[1]))


def detect_bbs(image: np.ndarray, *, intensity: str = "raw", I0: float | None = None,
               max_radius_px: float = 12.0, mask: np.ndarray | None = None) -> Blobs:
    """Detect BB shadows in an exposure (see calibration.blobs for intensity kinds)."""
    att = attenuation_image(image, intensity=intensity, I0=I0)
    return detect_blobs(att, min_radius_px=1.0, max_radius_px=max_radius_px, mask=mask)


def classify_blobs(blobs: Blobs, phantom: BBPhantom, K: np.ndarray,
                   T_cam_from_phantom: np.ndarray, *, tolerance: float = 0.35) -> np.ndarray:
    """Size class (index into ``phantom.size_classes_mm``) of each detected blob (N,), -1
    for blobs that fit no class (noise, foreign objects).

    The integrated attenuation of a ball's shadow is proportional to its volume x
    magnification^2, known per BB under the nominal geometry (K, T_cam_from_phantom) up
    to one unknown factor (the attenuation coefficient). That factor is the offset, in
    log integral, that puts the most blobs within ``tolerance`` of a class's predicted
    range; each blob then takes the nearest class within ``tolerance``.
    """
    z = transform_points(T_cam_from_phantom, phantom.positions_mm)[:, 2]
    level = np.log(phantom.diameters_mm ** 3 * (K[0, 0] / z) ** 2)
    cls = phantom.size_class
    lo = np.array([level[cls == c].min() for c in range(len(phantom.size_classes_mm))])
    hi = np.array([level[cls == c].max() for c in range(len(phantom.size_classes_mm))])
    x = np.log(np.clip(blobs.integral, 1e-9, None))
    if len(x) == 0:
        return np.zeros(0, int)

    def distance(offset: float) -> np.ndarray:
        y = x[:, None] - offset
        return np.maximum(lo[None, :] - y, 0.0) + np.maximum(y - hi[None, :], 0.0)

    candidates = (x[:, None] - 0.5 * (lo + hi)[None, :]).ravel()
    score = [(distance(o).min(axis=1) < tolerance).sum() for o in candidates]
    d = distance(float(candidates[int(np.argmax(score))]))
    return np.where(d.min(axis=1) < tolerance, d.argmin(axis=1), -1)


def _coarse_alignment(det_uv: np.ndarray, det_cls: np.ndarray, pred_uv: np.ndarray,
                      pred_cls: np.ndarray, anchor_cls: int, centre_px: np.ndarray,
                      gate_px: float, scales: tuple[float, ...] = (0.92, 0.96, 1.0, 1.04, 1.08),
                      n_seeds: int = 8) -> np.ndarray:
    """Predicted positions (N, 2) moved by the scale about ``centre_px`` and translation
    that explain the most detections (a detection is explained when a same-class moved
    prediction lies within ``gate_px``). Translation hypotheses pair each of the
    ``n_seeds`` anchor-class detections nearest the detections' median with every
    anchor-class prediction; the scales cover magnification errors."""
    from scipy.spatial import cKDTree

    centre = np.median(det_uv, axis=0)
    cand = np.flatnonzero(det_cls == anchor_cls)
    seeds = cand[np.argsort(np.linalg.norm(det_uv[cand] - centre, axis=1))[:n_seeds]]
    best, best_score = pred_uv, -1.0
    for scale in scales:
        scaled = centre_px + scale * (pred_uv - centre_px)
        anchors = scaled[pred_cls == anchor_cls]
        shifts = np.vstack([np.zeros((1, 2))] + [det_uv[s] - anchors for s in seeds])
        score = np.zeros(len(shifts))
        for c in np.unique(pred_cls):
            d_uv = det_uv[det_cls == c]
            if len(d_uv) == 0:
                continue
            q = (d_uv[None, :, :] - shifts[:, None, :]).reshape(-1, 2)
            dist, _ = cKDTree(scaled[pred_cls == c]).query(q, distance_upper_bound=gate_px)
            score += np.isfinite(dist).reshape(len(shifts), len(d_uv)).sum(axis=1)
        top = np.flatnonzero(score == score.max())
        k = top[np.argmin(np.linalg.norm(shifts[top], axis=1))]
        if score[k] > best_score or (score[k] == best_score and scale == 1.0):
            best, best_score = scaled + shifts[k], score[k]
    return best


def match_bbs(det_uv: np.ndarray, det_cls: np.ndarray, pred_uv: np.ndarray,
              pred_cls: np.ndarray, gate_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted BB positions to same-class detections minimising
    the summed squared distance (Hungarian); pairs further apart than ``gate_px`` are
    left unmatched. Returns (predicted indices, detection indices)."""
    from scipy.optimize import linear_sum_assignment

    d2 = ((pred_uv[:, None, :] - det_uv[None, :, :]) ** 2).sum(axis=2)
    cost = np.where((d2 <= gate_px ** 2) & (pred_cls[:, None] == det_cls[None, :]), d2, _BIG)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < _BIG
    return rows[ok], cols[ok]


def _normaliser(x: np.ndarray) -> np.ndarray:
    """Similarity moving points (N, d) to zero mean and RMS distance sqrt(d)."""
    d = x.shape[1]
    mean = x.mean(axis=0)
    scale = np.sqrt(d) / np.sqrt(((x - mean) ** 2).sum(axis=1).mean())
    N = np.eye(d + 1)
    N[:d, :d] *= scale
    N[:d, d] = -scale * mean
    return N


def dlt_projection(points_mm: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """3x4 projection matrix from >= 6 non-coplanar 3D points (N, 3) and their pixels
    (N, 2) by the normalised (Hartley) direct linear transform, scaled so that its third
    row's rotation part has unit norm (P = +-K [R | t])."""
    X = np.asarray(points_mm, dtype=float)
    x = np.asarray(uv, dtype=float)
    if len(X) < 6:
        raise CalibrationError(f"DLT needs at least 6 correspondences, got {len(X)}")
    spread = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    if spread[2] < 1e-3 * spread[0]:
        raise CalibrationError("the matched BBs are (nearly) coplanar; the DLT needs BBs "
                               "from both plates")
    N3, N2 = _normaliser(X), _normaliser(x)
    Xn = np.column_stack([X, np.ones(len(X))]) @ N3.T
    xn = np.column_stack([x, np.ones(len(x))]) @ N2.T
    A = np.zeros((2 * len(X), 12))
    A[0::2, 0:4] = Xn
    A[0::2, 8:12] = -xn[:, 0:1] * Xn
    A[1::2, 4:8] = Xn
    A[1::2, 8:12] = -xn[:, 1:2] * Xn
    P_n = np.linalg.svd(A)[2][-1].reshape(3, 4)
    P = np.linalg.solve(N2, P_n @ N3)
    return P / np.linalg.norm(P[2, :3])


def _unpack(x: np.ndarray, aspect: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(K, T) from parameters [fx, (fy), u0, v0, rotvec(3), t(3)]."""
    from scipy.spatial.transform import Rotation

    if aspect is None:
        fx, fy, u0, v0 = x[:4]
        rest = x[4:]
    else:
        fx, u0, v0 = x[:3]
        fy = fx * aspect
        rest = x[3:]
    K = np.array([[fx, 0.0, u0], [0.0, fy, v0], [0.0, 0.0, 1.0]])
    return K, make_rigid(Rotation.from_rotvec(rest[:3]).as_matrix(), rest[3:6])


def refine_camera(points_mm: np.ndarray, uv: np.ndarray, K0: np.ndarray,
                  T0_cam_from_phantom: np.ndarray, *, fix_aspect: bool = False,
                  loss: str = "linear", f_scale_px: float = 1.0) -> tuple[np.ndarray,
                                                                          np.ndarray, dict]:
    """Least-squares refinement of K (fx, fy, u0, v0; skew 0) and ``T_cam_from_phantom``
    minimising reprojection error (px) of points (N, 3, mm) against pixels (N, 2).

    ``fix_aspect`` keeps fy / fx at its value in K0 (known pixel aspect). ``loss`` and
    ``f_scale_px`` go to ``scipy.optimize.least_squares``. Returns (K, T, std) with std
    the one-sigma uncertainties of fx, fy, u0, v0 (px).
    """
    from scipy.optimize import least_squares
    from scipy.spatial.transform import Rotation

    X = np.asarray(points_mm, dtype=float)
    x_obs = np.asarray(uv, dtype=float)
    aspect = K0[1, 1] / K0[0, 0] if fix_aspect else None
    rot = Rotation.from_matrix(T0_cam_from_phantom[:3, :3]).as_rotvec()
    focal = [K0[0, 0]] if fix_aspect else [K0[0, 0], K0[1, 1]]
    p0 = np.concatenate([focal, K0[:2, 2], rot, T0_cam_from_phantom[:3, 3]])

    def residuals(p: np.ndarray) -> np.ndarray:
        K, T = _unpack(p, aspect)
        return (project(K @ T[:3], X) - x_obs).ravel()

    sol = least_squares(residuals, p0, loss=loss, f_scale=f_scale_px, x_scale="jac",
                        method="trf")
    K, T = _unpack(sol.x, aspect)
    dof = max(len(sol.fun) - len(p0), 1)
    sigma2 = float(sol.fun @ sol.fun) / dof
    cov = np.linalg.pinv(sol.jac.T @ sol.jac) * sigma2
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    if fix_aspect:
        std = {"fx": sd[0], "fy": sd[0] * aspect, "u0": sd[1], "v0": sd[2]}
    else:
        std = {"fx": sd[0], "fy": sd[1], "u0": sd[2], "v0": sd[3]}
    return K, T, {k: float(v) for k, v in std.items()}


def _solve(X: np.ndarray, uv: np.ndarray, fix_aspect: bool) -> tuple[np.ndarray, np.ndarray]:
    """DLT + decomposition + robust refinement (soft L1, 0.5 px) on tentative pairs."""
    try:
        K, T = decompose_projection(dlt_projection(X, uv))
    except GeometryError as exc:
        raise CalibrationError(f"DLT failed: {exc}") from None
    K = K.copy()
    K[0, 1] = 0.0
    K, T, _ = refine_camera(X, uv, K, T, fix_aspect=fix_aspect, loss="soft_l1",
                            f_scale_px=0.5)
    return K, T


def _pnp_pose(X: np.ndarray, uv: np.ndarray, K: np.ndarray, T_guess: np.ndarray,
              threshold_px: float, seed: int) -> np.ndarray:
    """Pose from tentative pairs with the nominal K: RANSAC PnP (OpenCV), each hypothesis
    refined iteratively from ``T_guess`` so that a planar subset cannot flip to the mirror
    solution."""
    cv2.setRNGSeed(seed)
    rvec0 = cv2.Rodrigues(T_guess[:3, :3])[0]
    tvec0 = T_guess[:3, 3].reshape(3, 1).copy()
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(
        X.reshape(-1, 1, 3).astype(np.float64), uv.reshape(-1, 1, 2).astype(np.float64),
        K, None, rvec0, tvec0, useExtrinsicGuess=True, iterationsCount=200,
        reprojectionError=threshold_px, confidence=0.999, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or inliers is None or len(inliers) < 6:
        raise CalibrationError("could not find a phantom pose consistent with the detected "
                               "BBs (is the nominal geometry right?)")
    return make_rigid(cv2.Rodrigues(rvec)[0], tvec.reshape(3))


def _check_plausible(K: np.ndarray, K0: np.ndarray, max_pp_shift_px: float,
                     max_focal_change: float) -> None:
    """Raise CalibrationError when K is implausibly far from the nominal K0."""
    shift = float(np.linalg.norm(K[:2, 2] - K0[:2, 2]))
    if shift > max_pp_shift_px:
        raise CalibrationError(f"the principal point moved {shift:.1f} px from the nominal one "
                               f"(limit {max_pp_shift_px:.1f} px): the BB correspondences are "
                               f"probably wrong; check the nominal geometry")
    change = np.abs(np.diag(K)[:2] / np.diag(K0)[:2] - 1.0).max()
    if change > max_focal_change:
        raise CalibrationError(f"the focal length changed {change:.1%} from the nominal one "
                               f"(limit {max_focal_change:.0%}): check the nominal SDD and "
                               f"pixel spacing")


def calibrate_from_blobs(blobs: Blobs, phantom: BBPhantom, K_nominal: np.ndarray,
                         T_nominal_cam_from_phantom: np.ndarray,
                         image_size: tuple[int, int], *, gate_px: float | None = None,
                         fix_aspect: bool = False, min_match_fraction: float = 0.5,
                         max_principal_point_shift_px: float | None = None,
                         max_focal_change: float = 0.15,
                         seed: int = 0) -> CarmCalibrationResult:
    """Calibrate from detected blobs given a nominal geometry (see module docstring).

    ``gate_px`` bounds the distance of a first-pass match (default: 0.4 x the smallest
    predicted same-class BB spacing). Raises CalibrationError with fewer than
    ``MIN_MATCHES`` matched BBs, fewer than ``min_match_fraction`` of the BBs that the
    result projects into the image, or a result implausibly far from the nominal K (the
    principal point moved by more than ``max_principal_point_shift_px``, default 6 % of
    the image size, or a focal length changed by more than ``max_focal_change``): such
    results come from wrong correspondences (a plate's grid matched one cell off).
    """
    from scipy.spatial import cKDTree

    W, H = image_size
    X_all = phantom.positions_mm
    cls_all = phantom.size_class
    K0 = np.asarray(K_nominal, dtype=float)
    T0 = np.asarray(T_nominal_cam_from_phantom, dtype=float)
    pred = project(K0 @ T0[:3], X_all)
    inside = (pred[:, 0] > -0.5) & (pred[:, 0] < W - 0.5) & (pred[:, 1] > -0.5) & (
        pred[:, 1] < H - 0.5)
    if len(blobs) < MIN_MATCHES or inside.sum() < MIN_MATCHES:
        raise CalibrationError(f"too few BBs: {len(blobs)} detected, {inside.sum()} expected "
                               f"in the image; need at least {MIN_MATCHES}")
    det_cls = classify_blobs(blobs, phantom, K0, T0)
    if gate_px is None:
        spacing = [cKDTree(pred[cls_all == c]).query(pred[cls_all == c], k=2)[0][:, 1].min()
                   for c in np.unique(cls_all) if (cls_all == c).sum() > 1]
        gate_px = 0.4 * float(min(spacing))
    # Anchor on the largest balls: scale / translation search, matching and a PnP pose
    # with the nominal K; then match every class under that pose and solve it again.
    z = transform_points(T0, X_all)[:, 2]
    anchor_cls = cls_all[np.argmax(phantom.diameters_mm / z)]
    anchor = cls_all == anchor_cls
    moved = _coarse_alignment(blobs.uv, det_cls, pred, cls_all, anchor_cls, K0[:2, 2], gate_px)
    T = T0
    for stage in ("anchor", "all"):
        idx = np.flatnonzero(anchor) if stage == "anchor" else np.arange(len(X_all))
        guess = moved[idx] if stage == "anchor" else project(K0 @ T[:3], X_all)
        bb, det = match_bbs(blobs.uv, det_cls, guess, cls_all[idx], gate_px)
        if len(bb) < MIN_MATCHES:
            raise CalibrationError(f"only {len(bb)} BBs could be matched to the phantom; "
                                   f"need at least {MIN_MATCHES}")
        T = _pnp_pose(X_all[idx[bb]], blobs.uv[det], K0, T, max(2.0, gate_px / 3.0), seed)
    K = K0
    for gate in (max(2.0, gate_px / 2.0), max(1.5, gate_px / 4.0), 1.5):
        bb, det = match_bbs(blobs.uv, det_cls, project(K @ T[:3], X_all), cls_all, gate)
        if len(bb) < MIN_MATCHES:
            raise CalibrationError(f"only {len(bb)} BBs matched after pose refinement; need "
                                   f"at least {MIN_MATCHES}")
        K, T = _solve(X_all[bb], blobs.uv[det], fix_aspect)
    err = np.linalg.norm(project(K @ T[:3], X_all[bb]) - blobs.uv[det], axis=1)
    good = err <= max(0.75, 4.0 * float(np.median(err)))
    if good.sum() < MIN_MATCHES:
        raise CalibrationError(f"only {good.sum()} BBs remain after outlier rejection")
    K, T, std = refine_camera(X_all[bb[good]], blobs.uv[det[good]], K, T, fix_aspect=fix_aspect)
    res = project(K @ T[:3], X_all[bb[good]]) - blobs.uv[det[good]]
    pred = project(K @ T[:3], X_all)
    n_in = int(((pred >= 0) & (pred <= [W - 1, H - 1])).all(axis=1).sum())
    if good.sum() < min_match_fraction * n_in:
        raise CalibrationError(f"only {good.sum()} of the {n_in} BBs in the field of view "
                               f"were matched (need {min_match_fraction:.0%}); check the "
                               f"image and the nominal geometry")
    _check_plausible(K, K0, max_principal_point_shift_px or 0.06 * max(W, H),
                     max_focal_change)
    return CarmCalibrationResult(
        K=K, T_cam_from_phantom=T, image_size=(int(W), int(H)), bb_index=bb[good],
        uv=blobs.uv[det[good]], residuals_px=res,
        rms_px=float(np.sqrt(np.mean((res ** 2).sum(axis=1)))), std=std, detections=blobs,
        outlier_uv=blobs.uv[det[~good]])


def calibrate_carm_image(image: np.ndarray, phantom: BBPhantom, nominal_view: View,
                         T_nominal_cam_from_phantom: np.ndarray | None = None, *,
                         intensity: str | None = None, I0: float | None = None,
                         fix_aspect: bool = False,
                         undistort: Callable[[np.ndarray], np.ndarray] | None = None,
                         seed: int = 0) -> CarmCalibrationResult:
    """Calibrate one exposure of the phantom.

    ``nominal_view`` supplies the nominal K and image size (and, unless given, the
    intensity kind, I0 and, as ``T_cam_from_world``, the nominal phantom pose).
    ``undistort`` (callable (N, 2) -> (N, 2), e.g. a DistortionModel's
    ``undistort_points``) corrects detected centres before calibration.
    """
    H, W = np.asarray(image).shape[:2]
    if (W, H) != nominal_view.image_size:
        raise CalibrationError(f"image is {W}x{H} but the nominal view is "
                               f"{nominal_view.width}x{nominal_view.height}")
    kind = intensity or nominal_view.intensity
    level = I0 if I0 is not None else nominal_view.I0
    blobs = detect_bbs(image, intensity=kind, I0=level)
    if undistort is not None and len(blobs):
        blobs = Blobs(undistort(blobs.uv), blobs.radius_px, blobs.integral, blobs.elongation)
    T0 = nominal_view.T_cam_from_world if T_nominal_cam_from_phantom is None else \
        T_nominal_cam_from_phantom
    return calibrate_from_blobs(blobs, phantom, nominal_view.K, T0, nominal_view.image_size,
                                fix_aspect=fix_aspect, seed=seed)


@dataclass(frozen=True)
class CarmAngleEntry:
    """A calibration at one C-arm orientation (degrees as the C-arm displays them)."""

    lao_deg: float
    cranial_deg: float
    K: np.ndarray
    T_cam_from_world: np.ndarray
    rms_px: float | None = None


@dataclass(frozen=True)
class CarmAngleTable:
    """Calibrations on a full grid of (lao_deg, cranial_deg) orientations.

    ``nominal`` holds the ideal isocentric model used as the interpolation backbone:
    ``source_to_detector_mm``, ``source_to_isocenter_mm``, ``isocenter_world`` (mm) and
    ``patient_position`` (arguments of ``guidance.core.views.carm_view``).
    """

    entries: tuple[CarmAngleEntry, ...]
    image_size: tuple[int, int]
    pixel_spacing_mm: tuple[float, float]
    nominal: dict

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        if not entries:
            raise CalibrationError("an angle table needs at least one entry")
        keys = [(float(e.lao_deg), float(e.cranial_deg)) for e in entries]
        if len(set(keys)) != len(keys):
            raise CalibrationError("angle table has duplicate (lao, cranial) entries")
        laos = sorted({k[0] for k in keys})
        crans = sorted({k[1] for k in keys})
        if len(keys) != len(laos) * len(crans):
            raise CalibrationError(f"angle table must be a full grid: {len(laos)} LAO x "
                                   f"{len(crans)} cranial angles need {len(laos) * len(crans)}"
                                   f" entries, got {len(keys)}")
        missing = {"source_to_detector_mm", "source_to_isocenter_mm"} - set(self.nominal)
        if missing:
            raise CalibrationError(f"angle table nominal model is missing {sorted(missing)}")
        object.__setattr__(self, "entries", entries)

    @property
    def lao_values(self) -> list[float]:
        return sorted({float(e.lao_deg) for e in self.entries})

    @property
    def cranial_values(self) -> list[float]:
        return sorted({float(e.cranial_deg) for e in self.entries})

    def entry(self, lao_deg: float, cranial_deg: float) -> CarmAngleEntry:
        for e in self.entries:
            if float(e.lao_deg) == lao_deg and float(e.cranial_deg) == cranial_deg:
                return e
        raise CalibrationError(f"no angle table entry at LAO {lao_deg}, cranial {cranial_deg}")

    def ideal_T_cam_from_world(self, lao_deg: float, cranial_deg: float) -> np.ndarray:
        """Pose of the ideal isocentric C-arm at the given orientation."""
        n = self.nominal
        return carm_view(lao_deg=lao_deg, cranial_deg=cranial_deg,
                         source_to_detector_mm=float(n["source_to_detector_mm"]),
                         source_to_isocenter_mm=float(n["source_to_isocenter_mm"]),
                         isocenter_world=tuple(n.get("isocenter_world", (0.0, 0.0, 0.0))),
                         patient_position=n.get("patient_position", "supine"),
                         detector_size_px=self.image_size,
                         pixel_spacing_mm=self.pixel_spacing_mm).T_cam_from_world


def build_angle_table(results: list[tuple[float, float, CarmCalibrationResult]], *,
                      pixel_spacing_mm: tuple[float, float], source_to_isocenter_mm: float,
                      T_world_from_phantom: np.ndarray | None = None,
                      isocenter_world: tuple[float, float, float] = (0.0, 0.0, 0.0),
                      patient_position: str = "supine") -> CarmAngleTable:
    """Angle table from per-orientation calibrations ``(lao_deg, cranial_deg, result)`` of
    one phantom fixed in the room at ``T_world_from_phantom`` (default: world = phantom)."""
    if not results:
        raise CalibrationError("no calibrations to build an angle table from")
    T_pw = np.eye(4) if T_world_from_phantom is None else invert_rigid(T_world_from_phantom)
    entries = tuple(CarmAngleEntry(float(a), float(b), r.K, r.T_cam_from_phantom @ T_pw,
                                   r.rms_px) for a, b, r in results)
    sdd = float(np.mean([r.source_to_detector_mm(pixel_spacing_mm) for _, _, r in results]))
    nominal = {"source_to_detector_mm": sdd,
               "source_to_isocenter_mm": float(source_to_isocenter_mm),
               "isocenter_world": [float(x) for x in isocenter_world],
               "patient_position": patient_position}
    return CarmAngleTable(entries, results[0][2].image_size,
                          (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])), nominal)


def sagging_carm_view(lao_deg: float, cranial_deg: float, *, sag_mm: float = 2.0,
                      sag_deg: float = 0.3, pp_shift_px: float = 3.0, sdd_change_mm: float = 3.0,
                      **kwargs) -> View:
    """Simulation helper: a C-arm that departs smoothly from the ideal isocentric model
    (gravity sag of the source and detector). Relative to ``carm_view(...)`` the camera is
    displaced by about ``sag_mm`` and turned by ``sag_deg``, the principal point moves by
    about ``pp_shift_px`` and the SDD by ``sdd_change_mm``, each varying as the sine or
    cosine of the angles. ``kwargs`` go to ``guidance.core.views.carm_view``."""
    from scipy.spatial.transform import Rotation

    a, b = np.deg2rad(lao_deg), np.deg2rad(cranial_deg)
    ideal = carm_view(lao_deg=lao_deg, cranial_deg=cranial_deg, **kwargs)
    W, H = ideal.image_size
    sdd = ideal.source_to_detector_mm + sdd_change_mm * (np.cos(a) * np.cos(b) - 1.0 + np.sin(a))
    pp = ideal.K[:2, 2] + pp_shift_px * np.array([np.sin(a), np.sin(b)])
    R = Rotation.from_rotvec(np.deg2rad(sag_deg) * np.array([np.sin(b), np.sin(a), 0.0]))
    t = sag_mm * np.array([np.sin(a), np.sin(b), np.cos(a) - 1.0])
    du, dv = ideal.pixel_spacing_mm
    K = np.array([[sdd / du, 0.0, pp[0]], [0.0, sdd / dv, pp[1]], [0.0, 0.0, 1.0]])
    return View(K=K, T_cam_from_world=make_rigid(R.as_matrix(), t) @ ideal.T_cam_from_world,
                image_size=(W, H), intensity=ideal.intensity, I0=ideal.I0,
                pixel_spacing_mm=ideal.pixel_spacing_mm, source_to_detector_mm=float(sdd))


def _bracket(values: list[float], x: float, name: str) -> tuple[float, float, float]:
    """(lower knot, upper knot, fraction) of ``x`` in sorted ``values``."""
    if not values[0] - 1e-9 <= x <= values[-1] + 1e-9:
        raise CalibrationError(f"{name} {x:g} deg is outside the calibrated range "
                               f"[{values[0]:g}, {values[-1]:g}] deg")
    if len(values) == 1:
        return values[0], values[0], 0.0
    i = int(np.clip(np.searchsorted(values, x) - 1, 0, len(values) - 2))
    lo, hi = values[i], values[i + 1]
    return lo, hi, float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def _slerp(R0: np.ndarray, R1: np.ndarray, t: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation, Slerp

    rots = Rotation.from_matrix(np.stack([R0, R1]))
    return Slerp([0.0, 1.0], rots)([t]).as_matrix()[0]


def interpolate_view(table: CarmAngleTable, lao_deg: float, cranial_deg: float, *,
                     intensity: str = "line_integral", I0: float | None = None) -> View:
    """The calibrated View at an orientation inside the table's range (see module
    docstring for the interpolation). Raises CalibrationError outside the range."""
    a0, a1, fa = _bracket(table.lao_values, float(lao_deg), "LAO")
    c0, c1, fc = _bracket(table.cranial_values, float(cranial_deg), "cranial")
    corners = {}
    for a in (a0, a1):
        for c in (c0, c1):
            e = table.entry(a, c)
            corners[a, c] = (e.K, e.T_cam_from_world @ invert_rigid(
                table.ideal_T_cam_from_world(a, c)))
    w: dict = {}
    for a, wa in ((a0, 1.0 - fa), (a1, fa)):
        for c, wc in ((c0, 1.0 - fc), (c1, fc)):
            w[a, c] = w.get((a, c), 0.0) + wa * wc
    K = sum(w[k] * corners[k][0] for k in w)
    t = sum(w[k] * corners[k][1][:3, 3] for k in w)
    R_c0 = _slerp(corners[a0, c0][1][:3, :3], corners[a1, c0][1][:3, :3], fa)
    R_c1 = _slerp(corners[a0, c1][1][:3, :3], corners[a1, c1][1][:3, :3], fa)
    C = make_rigid(_slerp(R_c0, R_c1, fc), t)
    K = K / K[2, 2]
    K[1, 0] = K[2, 0] = K[2, 1] = 0.0
    T = C @ table.ideal_T_cam_from_world(float(lao_deg), float(cranial_deg))
    return View(K=K, T_cam_from_world=T, image_size=table.image_size, intensity=intensity,
                I0=I0, pixel_spacing_mm=table.pixel_spacing_mm,
                source_to_detector_mm=float(0.5 * (K[0, 0] * table.pixel_spacing_mm[0]
                                                   + K[1, 1] * table.pixel_spacing_mm[1])),
                extra={"lao_deg": float(lao_deg), "cranial_deg": float(cranial_deg)})


def angle_table_to_dict(table: CarmAngleTable) -> dict:
    """JSON object of an angle table (the ``angle_table`` field of a carm calibration)."""
    return {
        "nominal": dict(table.nominal),
        "entries": [{"lao_deg": e.lao_deg, "cranial_deg": e.cranial_deg, "K": e.K.tolist(),
                     "T_cam_from_world": e.T_cam_from_world.tolist(), "rms_px": e.rms_px}
                    for e in table.entries],
    }


def angle_table_from_dict(d: dict, *, image_size: tuple[int, int],
                          pixel_spacing_mm: tuple[float, float]) -> CarmAngleTable:
    """Validate and build an angle table from its JSON object."""
    if not isinstance(d, dict) or not isinstance(d.get("entries"), list):
        raise CalibrationError("angle_table must be an object with an 'entries' list")
    entries = []
    for i, e in enumerate(d["entries"]):
        where = f"angle_table.entries[{i}]"
        if not isinstance(e, dict):
            raise CalibrationError(f"{where} must be an object")
        try:
            lao, cran = float(e["lao_deg"]), float(e["cranial_deg"])
        except (KeyError, TypeError, ValueError):
            raise CalibrationError(f"{where} needs numeric 'lao_deg' and 'cranial_deg'") from None
        K = matrix_field(e.get("K"), (3, 3), f"{where}.K")
        T = matrix_field(e.get("T_cam_from_world"), (4, 4), f"{where}.T_cam_from_world")
        try:
            View(K=K, T_cam_from_world=T, image_size=image_size)
        except ValueError as exc:
            raise CalibrationError(f"{where}: {exc}") from None
        rms = e.get("rms_px")
        entries.append(CarmAngleEntry(lao, cran, K, T, None if rms is None else float(rms)))
    nominal = d.get("nominal")
    if not isinstance(nominal, dict):
        raise CalibrationError("angle_table needs a 'nominal' object")
    return CarmAngleTable(tuple(entries), image_size, pixel_spacing_mm, nominal)
