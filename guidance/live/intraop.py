"""Intra-operative CT / CBCT in the live path: a received volume registered to the
pre-operative CT by the 3D/3D registration, its quality judged, and the pose that maps
tracked instruments through it.

Frames: the intra-op volume lives in the scanner's LPS frame ("scanner"); the 3D/3D
registration gives ``T_scanner_from_world`` (pre-op CT point -> where it lies in the
scan), so the correction published like a fluoro registration's (CONVENTIONS.md) is
``T_world_corrected_from_world = inv(T_scanner_from_world)``. With the scanner's pose
in the tracker frame, ``T_tracker_from_scanner``, the CT's pose in the patient
reference array follows: ``T_reference_from_world = inv(T_tracker_from_reference) @
T_tracker_from_scanner @ T_scanner_from_world``.

``volume_from_message`` / ``volume_message`` convert between the wire's ``VolumeFrame``
and ``Volume``; any receiver (the DICOM C-STORE one, the simulator) hands a ``Volume``
to ``guidance.live.pipeline.Pipeline.on_volume``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid
from guidance.core.volume import BODY_HU, Volume, affine_from_geometry, resample, volume_to_sitk
from guidance.live.wire import VolumeFrame
from guidance.registration.register3d import Register3dSettings, register_volumes

__all__ = ["IntraopError", "IntraopSettings", "IntraopResult", "check_volume", "volume_from_message",
           "volume_message", "registration_quality", "register_intraop"]

_ORTHONORMAL_TOL = 1e-4


class IntraopError(GuidanceError):
    """An intra-operative volume that cannot be registered (NaN voxels, bad grid)."""


@dataclass(frozen=True)
class IntraopSettings:
    """The 3D/3D registration's settings, the starts it tries in turn until one passes the
    quality gate (``initialisations``: "identity" trusts the scanner's patient
    coordinates, "geometry" aligns the grid centres, which a small field of view
    misleads; the best is kept), and the quality gate: after registration the
    normalised cross-correlation (NCC) of the two volumes over the body (pre-op voxels
    above ``body_hu``) inside the scan's field of view, sampled on a ``quality_grid_mm``
    grid, must reach ``min_ncc`` and the field of view must cover at least
    ``min_overlap`` of the body."""

    register3d: Register3dSettings = field(default_factory=Register3dSettings)
    initialisations: tuple[str, ...] = ("identity", "geometry")
    min_ncc: float = 0.5
    min_overlap: float = 0.05
    body_hu: float = BODY_HU
    quality_grid_mm: float = 2.0


@dataclass
class IntraopResult:
    """Outcome of one intra-op volume registration (poses as in the module docstring)."""

    status: str
    reason: str
    T_scanner_from_world: np.ndarray
    ncc: float
    overlap: float
    confidence: float
    metric: float
    iterations: int
    time_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def T_world_corrected_from_world(self) -> np.ndarray:
        return invert_rigid(self.T_scanner_from_world)


def check_volume(volume: Volume) -> None:
    """Raise IntraopError unless ``volume`` has finite voxels (at least 2 per axis), a
    positive spacing and orthonormal direction cosines."""
    if min(volume.data.shape) < 2:
        raise IntraopError(f"volume needs at least 2 voxels per axis, got shape {volume.data.shape}")
    if not np.all(np.isfinite(volume.data)):
        raise IntraopError("volume contains NaN or infinite voxels")
    spacing = volume.spacing
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise IntraopError(f"volume spacing must be positive, got {spacing.tolist()}")
    direction = volume.direction
    if np.abs(direction.T @ direction - np.eye(3)).max() > _ORTHONORMAL_TOL:
        raise IntraopError(f"volume direction is not orthonormal: {np.round(direction, 6).tolist()}")


def volume_from_message(msg: VolumeFrame) -> Volume:
    """The Volume (HU, scanner LPS frame) a VolumeFrame carries."""
    T = affine_from_geometry(msg.origin_mm, msg.spacing_mm, msg.direction)
    return Volume(data=np.asarray(msg.voxels, dtype=np.float32), T_world_from_index=T, units="HU")


def volume_message(volume: Volume, *, volume_id: int, acquired_ns: int, source: str,
                   T_tracker_from_scanner: np.ndarray | None = None, modality: str = "CBCT",
                   ground_truth: dict[str, np.ndarray] | None = None) -> VolumeFrame:
    """The VolumeFrame of a Volume (voxels as float32 HU)."""
    return VolumeFrame(volume_id=volume_id, acquired_ns=acquired_ns, source=source,
                       voxels=np.ascontiguousarray(volume.data, dtype=np.float32), spacing_mm=volume.spacing,
                       origin_mm=volume.origin, direction=volume.direction, modality=modality,
                       T_tracker_from_scanner=T_tracker_from_scanner, ground_truth=ground_truth)


def registration_quality(ct: Volume, intraop: Volume, T_scanner_from_world: np.ndarray, *,
                         settings: IntraopSettings | None = None) -> tuple[float, float]:
    """(NCC, overlap) of the pre-op ``ct`` and the ``intraop`` volume mapped onto it by
    ``T_scanner_from_world``: NCC over the body voxels inside the scan's field of view,
    overlap = their fraction of the body, both on a ``quality_grid_mm`` grid."""
    import SimpleITK as sitk  # here: the pipeline imports this module, and starts faster without it

    s = settings or IntraopSettings()
    fixed = resample(ct, spacing=(s.quality_grid_mm,) * 3)
    reference = volume_to_sitk(fixed)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(np.asarray(T_scanner_from_world)[:3, :3].ravel().tolist())
    transform.SetTranslation(np.asarray(T_scanner_from_world)[:3, 3].tolist())
    moving = volume_to_sitk(intraop.with_data(intraop.data.astype(np.float32)))
    mapped = sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0))
    inside = sitk.GetArrayFromImage(sitk.Resample(
        volume_to_sitk(intraop.with_data(np.ones(intraop.data.shape, np.float32))), reference, transform,
        sitk.sitkNearestNeighbor, 0.0)) > 0.5
    body = fixed.data > s.body_hu
    selected = body & inside
    overlap = float(selected.sum() / max(1, body.sum()))
    if selected.sum() < 10:
        return 0.0, overlap
    a = fixed.data[selected].astype(float)
    b = mapped[selected].astype(float)
    a -= a.mean()
    b -= b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return (float((a * b).sum()) / denominator if denominator > 0 else 0.0), overlap


def register_intraop(ct: Volume, intraop: Volume, *, labels: Volume | None = None, level: int | None = None,
                     settings: IntraopSettings | None = None) -> IntraopResult:
    """Register an intra-op volume (HU, scanner frame) to the pre-op ``ct``; with
    ``level`` (a label id of ``labels``, on the CT grid) on that vertebra alone.
    Raises IntraopError for a volume ``check_volume`` refuses, one SimpleITK cannot
    register, or a level without labels."""
    s = settings or IntraopSettings()
    t0 = time.perf_counter()
    check_volume(intraop)
    mask = None
    if level is not None:
        if labels is None:
            raise IntraopError("per-vertebra registration of a volume needs the label map")
        mask = labels.data == level
        if not mask.any():
            raise IntraopError(f"label {level} is not in the label map")
    tried = []
    for initialisation in s.initialisations:
        try:
            result = register_volumes(ct, intraop, fixed_mask=mask,
                                      settings=replace(s.register3d, initialisation=initialisation))
            ncc, overlap = registration_quality(ct, intraop, result.T_moving_from_fixed, settings=s)
        except RuntimeError as exc:  # SimpleITK refuses grids it cannot work on (e.g. too few voxels)
            message = str(exc).strip().splitlines()[-1]
            tried.append((-np.inf, f"{initialisation}: {message}", None, 0.0, 0.0))
            continue
        tried.append((ncc, initialisation, result, ncc, overlap))
        if ncc >= s.min_ncc and overlap >= s.min_overlap:
            break
    best_ncc, label, result, ncc, overlap = max(tried, key=lambda t: t[0])
    if result is None:
        raise IntraopError(f"3D/3D registration impossible: {'; '.join(t[1] for t in tried)}")
    status, reason = "ok", f"ncc {ncc:.2f} over {overlap:.0%} of the body ({label} start)"
    if overlap < s.min_overlap:
        status, reason = "failed", f"the scan covers {overlap:.0%} of the CT's body (< {s.min_overlap:.0%})"
    elif ncc < s.min_ncc:
        status, reason = "failed", f"volumes disagree after registration: ncc {ncc:.2f} < {s.min_ncc}"
    return IntraopResult(status=status, reason=reason, T_scanner_from_world=result.T_moving_from_fixed, ncc=ncc,
                         overlap=overlap, confidence=float(np.clip(ncc, 0.0, 1.0)) if status == "ok" else 0.0,
                         metric=result.metric, iterations=result.iterations, time_s=time.perf_counter() - t0)
