"""Quality gate: decide ``ok`` or ``failed`` (with a reason) and a confidence in [0, 1].

A pose is only ``ok`` when the final similarity is high enough in every view, the
model's edges agree with the image's patch by patch, the last optimisation stage
converged, and the correction stayed inside the search bounds. Anything else is
``failed`` with the first reason found, so the display never shows a silent wrong pose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from guidance.core.geometry import rotation_angle_deg
from guidance.registration.pose import point_displacement_mm

__all__ = ["QualityLimits", "Verdict", "assess"]


@dataclass(frozen=True)
class QualityLimits:
    """Thresholds of the gate. Similarities are gradient correlations in [-1, 1].

    Measured with the bone and soft-tissue model (clinical grids; docs/benchmarks.md, session
    17, each level's image blurred from its valid pixels only): right single views score
    0.85-0.97 (raw) and 0.78-0.92 (display) on the real abdominal CTs, near-lateral ones
    included, 0.88-0.90 (mean of the two views) in the full CT's biplane pairs, 0.93-0.96 on
    the phantom, and 0.94-0.95 when tracking the phantom's fluoroscopy (session 16); pure
    noise 0.02 and another patient's CT 0.08 at their best pose; wrong poses of one view
    0.39-0.75. Below ``min_similarity`` nothing matches; above it the similarity alone proves
    nothing (a phantom view 48 mm off scored 0.75). ``min_patch_agreement`` bounds the worst
    view's ``similarity.patch_agreement`` (where the model has edges, the median patch's
    gradient correlation): right poses gave 0.69-0.94 on the real CTs and 0.89-0.96 on the
    phantom, wrong ones (14-81 mm off, half a vertebra or more) 0.18-0.43 (948 results of
    session 17's sets; session 16's, 0.09-0.43). It is what tells right from wrong, except a
    depth bias of the model's own, which agrees like a right pose (one display view of the
    30-slice CT, 2.5 mm off in depth: 0.84). ``min_similarity`` stays at 0.4, where
    near-lateral views, whose masked borders once held them at 0.44-0.73, were ok. Noise
    lowers both measures: at a twentieth of the exposure control's dose right phantom views
    still agreed 0.53-0.60 (similarity 0.61-0.79). With several views none may score below
    ``min_view_similarity`` (such a view pulls the joint pose off while the others keep the
    mean high). The reported confidence rises from 0 at ``min_similarity`` to 1
    at ``good_similarity``. A single vertebra's registration compares its model with an
    image box that also shows its neighbours: correct ones scored from 0.42 on the phantom,
    so it is held to ``min_vertebra_similarity`` instead, and its few patches, some of them
    over a neighbour's edges, to ``min_vertebra_patch_agreement`` (a right one agreed 0.49).

    ``max_depth_sd_mm``: one view fixes its projection (what an overlay needs) but sees
    depth only through magnification, so its result is ``ok`` with its depth uncertainty
    published beside it, as long as that depth can still guide (1 sigma 2.5 mm: +-5 mm at
    2 sigma). The right single-view results of session 17's clinical-grid sets reported
    0.46-1.34 mm on the full real CT (median 0.67), 0.66-1.43 mm on the 30-slice CT and
    0.39-0.68 mm on the phantom (870 right ok results); a phantom view ended 45 mm off in
    depth at a reported 3.1 mm (docs/benchmarks.md, session 15). A model biased in depth by
    more than its reported uncertainty passes: one display view of the 30-slice CT ends 2.5
    mm off at 1.22-1.32 mm (session 17).
    """

    min_similarity: float = 0.4
    good_similarity: float = 0.8
    min_patch_agreement: float = 0.5
    min_view_similarity: float = 0.2
    max_translation_mm: float = 80.0
    max_rotation_deg: float = 25.0
    max_in_plane_sd_mm: float = 1.0
    max_depth_sd_mm: float = 2.5
    min_vertebra_similarity: float = 0.3
    min_vertebra_patch_agreement: float = 0.4

    def for_one_vertebra(self) -> "QualityLimits":
        """The limits of a single vertebra's registration."""
        return replace(self, min_similarity=self.min_vertebra_similarity,
                       min_patch_agreement=self.min_vertebra_patch_agreement)


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str
    confidence: float


def assess(
    similarity: float,
    per_view_similarity: list[float],
    converged: bool,
    T_world_corrected_from_world: np.ndarray,
    centre_world: np.ndarray,
    limits: QualityLimits,
    *,
    in_plane_sd_mm: float = 0.0,
    depth_sd_mm: float = 0.0,
    patch_agreement: float = 1.0,
) -> Verdict:
    """Judge a registration result; ``centre_world`` is the anatomy centre (mm) used to
    measure how far the correction moved it; ``in_plane_sd_mm`` / ``depth_sd_mm`` its
    1-sigma uncertainty in the image plane and along the ray (NaN counts as unknown);
    ``patch_agreement`` the worst view's (NaN: no patch to judge, failed)."""
    moved_mm = point_displacement_mm(T_world_corrected_from_world, np.eye(4), centre_world)
    turned_deg = rotation_angle_deg(T_world_corrected_from_world)
    span = max(limits.good_similarity - limits.min_similarity, 1e-6)
    confidence = float(np.clip((similarity - limits.min_similarity) / span, 0.0, 1.0))
    if per_view_similarity:
        worst = min(per_view_similarity)
        confidence *= float(np.clip((worst - limits.min_view_similarity) / span, 0.0, 1.0)) ** 0.5
    if not np.isfinite(similarity):
        return Verdict("failed", "similarity is not a number", 0.0)
    if similarity < limits.min_similarity:
        return Verdict(
            "failed", f"similarity {similarity:.3f} below {limits.min_similarity:.3f}: no match", confidence
        )
    if not patch_agreement >= limits.min_patch_agreement:
        return Verdict(
            "failed", f"patch agreement {patch_agreement:.2f} below {limits.min_patch_agreement:.2f}: the model's "
            "edges do not lie on the image's", confidence
        )
    for i, s in enumerate(per_view_similarity):
        if s < limits.min_view_similarity:
            return Verdict(
                "failed", f"view {i} similarity {s:.3f} below {limits.min_view_similarity:.3f}", confidence
            )
    if moved_mm > limits.max_translation_mm or turned_deg > limits.max_rotation_deg:
        return Verdict(
            "failed",
            f"correction of {moved_mm:.1f} mm / {turned_deg:.1f} deg exceeds the plausible "
            f"{limits.max_translation_mm:.0f} mm / {limits.max_rotation_deg:.0f} deg",
            confidence,
        )
    if not in_plane_sd_mm <= limits.max_in_plane_sd_mm or not depth_sd_mm <= limits.max_depth_sd_mm:
        return Verdict(
            "failed",
            f"pose uncertain: {in_plane_sd_mm:.2f} mm in-plane / {depth_sd_mm:.1f} mm in depth (1 sigma) "
            f"exceeds {limits.max_in_plane_sd_mm:g} / {limits.max_depth_sd_mm:g} mm",
            confidence,
        )
    if not converged:
        return Verdict("failed", "optimiser did not converge", confidence)
    return Verdict("ok", "converged", confidence)
