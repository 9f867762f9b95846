"""Quality gate: each limit fails a result with its own reason, in the gate's order, and the
confidence rises from the lowest trusted similarity to the good one."""

import numpy as np
import pytest

from guidance.core.geometry import make_rigid, rotation_about_axis
from guidance.registration.quality import QualityLimits, assess

CENTRE = np.array([10.0, -20.0, 30.0])
LIMITS = QualityLimits()


def verdict(similarity=0.9, per_view=(), converged=True, T=np.eye(4), **uncertainty):
    return assess(similarity, list(per_view), converged, T, CENTRE, LIMITS, **uncertainty)


def test_a_converged_good_match_within_every_limit_is_ok():
    v = verdict(0.65, in_plane_sd_mm=0.2, depth_sd_mm=LIMITS.max_depth_sd_mm,
                patch_agreement=LIMITS.min_patch_agreement)
    assert (v.status, v.reason) == ("ok", "converged")
    expected = (0.65 - LIMITS.min_similarity) / (LIMITS.good_similarity - LIMITS.min_similarity)
    assert v.confidence == pytest.approx(expected)
    assert verdict(0.95).confidence == 1.0


@pytest.mark.parametrize("kwargs,reason", [
    ({"similarity": 0.39}, "similarity 0.390 below 0.400"),
    ({"similarity": float("nan")}, "similarity is not a number"),
    ({"patch_agreement": 0.49}, "patch agreement 0.49 below 0.50: the model's edges do not lie on the image's"),
    ({"patch_agreement": float("nan")}, "patch agreement nan below"),
    ({"per_view": (0.9, 0.15)}, "view 1 similarity 0.150 below 0.200"),
    ({"T": make_rigid(np.eye(3), np.array([0.0, 0.0, 81.0]))}, "correction of 81.0 mm"),
    ({"T": make_rigid(rotation_about_axis((0, 0, 1), 26.0), CENTRE - rotation_about_axis((0, 0, 1), 26.0) @ CENTRE)},
     "/ 26.0 deg exceeds"),
    ({"in_plane_sd_mm": 1.1}, "pose uncertain: 1.10 mm in-plane"),
    ({"depth_sd_mm": 3.1}, "3.1 mm in depth (1 sigma) exceeds 1 / 2.5 mm"),
    ({"depth_sd_mm": float("nan")}, "nan mm in depth"),
    ({"converged": False}, "optimiser did not converge"),
])
def test_each_limit_fails_the_result_with_its_reason(kwargs, reason):
    v = verdict(**kwargs)
    assert v.status == "failed" and reason in v.reason, v.reason


def test_one_vertebra_is_held_to_its_own_similarity_only():
    one = LIMITS.for_one_vertebra()
    assert one.min_similarity == LIMITS.min_vertebra_similarity < LIMITS.min_similarity
    assert one.max_depth_sd_mm == LIMITS.max_depth_sd_mm and one.max_in_plane_sd_mm == LIMITS.max_in_plane_sd_mm
    assert assess(0.35, [], True, np.eye(4), CENTRE, one).status == "ok"
    assert one.min_patch_agreement == LIMITS.min_vertebra_patch_agreement < LIMITS.min_patch_agreement
    assert assess(0.9, [], True, np.eye(4), CENTRE, one, patch_agreement=0.45).status == "ok"
    assert assess(0.9, [], True, np.eye(4), CENTRE, one, patch_agreement=0.35).status == "failed"
