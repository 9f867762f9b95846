"""Frame-to-frame tracking: a small, fast local registration from the previous pose.

The live pipeline calls ``track`` for every new frame once a global registration
succeeded. It searches only locally (least squares on a reduced pyramid) starting
from the previous correction, and fails, so the pipeline falls back to a global
registration, when the similarity drops or the pose jumps further than a patient
can move between two frames.

Consecutive frames of one view differ by a small motion, so the least-squares Jacobian
of the previous update is a good start for the next: given it, an update costs about
three DRRs (Broyden updates) instead of seven per iteration (finite differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from guidance.core.geometry import rotation_angle_deg
from guidance.core.images import PreparedImage
from guidance.registration.pose import point_displacement_mm
from guidance.registration.register import LeastSquaresJacobian, RegistrationResult, Registrator
from guidance.core.views import View

__all__ = ["TrackingSettings", "track"]


@dataclass(frozen=True)
class TrackingSettings:
    """The image size of the least-squares updates (``detector_px``: the frame binned by a
    whole factor to at most this many pixels across), their iteration cap and relative
    cost tolerance, the largest motion (mm at the anatomy centre, deg) accepted between
    two frames, and the expected motion per frame (deg x3, mm x3 in the reference camera
    frame) used as a prior; ``reuse_jacobian``: start from the previous update's Jacobian
    (see ``track``).

    64 px (a 256 px frame binned 4x, rendered from the prepared CT's 2 mm volume) took
    less than half the CPU of 128 px (1 mm volume) for a median pose error 0.04 mm larger
    on the demo scenario (docs/benchmarks.md)."""

    detector_px: int = 64
    max_iterations: int = 10
    ftol: float = 1e-3
    max_step_mm: float = 10.0
    max_step_deg: float = 8.0
    motion_sd: tuple[float, ...] = (2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
    reuse_jacobian: bool = True


def track(
    registrator: Registrator,
    images: list[PreparedImage],
    views: list[View],
    previous_T_world_corrected_from_world: np.ndarray,
    *,
    level: int | None = None,
    settings: TrackingSettings | None = None,
    jacobian: LeastSquaresJacobian | None = None,
) -> RegistrationResult:
    """Update the correction for a new frame; ``views`` carry the frame's nominal poses
    (as for ``Registrator.register``), the previous correction is the start.
    ``jacobian``: the ``result.jacobian`` of the previous update with the same views'
    geometry and settings (used when ``settings.reuse_jacobian`` and the ROI is the same)."""
    s = settings or TrackingSettings()
    binning = math.ceil(max(views[0].image_size) / s.detector_px)
    factor = max(1, math.ceil(binning / registrator.detector_binning(views[0])))
    result = registrator.register(
        images,
        views,
        level=level,
        initial_T_world_corrected_from_world=previous_T_world_corrected_from_world,
        global_search=False,
        pyramid=(factor,),
        local_max_fev=s.max_iterations,
        local_ftol=s.ftol,
        prior_sd=np.asarray(s.motion_sd),
        local_jacobian=jacobian if s.reuse_jacobian else None,
    )
    if result.ok:
        centre = registrator.centre(level)
        T_new, T_old = result.T_world_corrected_from_world, previous_T_world_corrected_from_world
        step_mm = point_displacement_mm(T_new, T_old, centre)
        step_deg = rotation_angle_deg(T_new[:3, :3] @ T_old[:3, :3].T)
        if step_mm > s.max_step_mm or step_deg > s.max_step_deg:
            result = replace(result, status="failed",
                             reason=f"tracking jumped {step_mm:.1f} mm / {step_deg:.1f} deg in one frame")
    return result
