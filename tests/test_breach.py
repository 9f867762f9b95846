"""Breach model: grades, sides and protrusions against hand-computed boxes, and against the
phantom's analytic geometry (the bench's ground truth)."""

from __future__ import annotations

import numpy as np
import pytest

from guidance.core.geometry import make_rigid
from guidance.core.volume import Volume
from guidance.navigation.breach import (
    BreachError,
    breach_side,
    build_corridor,
    gertzbein_robbins_grade,
    guidance_metrics,
    predict_breach,
    signed_distance_from_mask,
)
from guidance.tools.bench_breach import path_truth, warned_in_time
from sim.phantom import make_phantom

SPACING = 0.5
# A "pedicle": a bone box x in [-5, 5], y in [-20, 20], z in [-8, 8] mm; the vertebra's
# midline lies at x = -30 (so +x is lateral), its frame has the world's axes.
BOX_HALF = np.array([5.0, 20.0, 8.0])
MIDLINE = make_rigid(np.eye(3), [-30.0, 0.0, 0.0])
TRAJECTORY = {"level": "L3", "label": 29, "side": "left", "entry_world": [0.0, 20.0, 0.0],
              "target_world": [0.0, -15.0, 0.0], "screw_diameter_mm": 6.0}


@pytest.fixture(scope="module")
def box_volumes():
    n = np.array([64, 112, 64])  # x, y, z voxels of 0.5 mm, centred on the origin
    origin = -(n - 1) / 2 * SPACING
    T = make_rigid(np.eye(3) * SPACING, origin)
    k, j, i = np.meshgrid(*(np.arange(m) for m in n[::-1]), indexing="ij")
    xyz = [origin[a] + SPACING * idx for a, idx in enumerate((i, j, k))]
    inside = np.all([np.abs(c) <= h for c, h in zip(xyz, BOX_HALF)], axis=0)
    labels = Volume(np.where(inside, 29, 0).astype(np.uint8), T, "label")
    ct = Volume(np.where(inside, 1200.0, 40.0).astype(np.float32), T, "HU")
    return ct, labels


@pytest.mark.parametrize("breach_mm, grade", [(0.0, "A"), (-3.0, "A"), (0.5, "B"), (1.99, "B"), (2.0, "C"),
                                              (3.9, "C"), (4.0, "D"), (6.0, "D"), (6.01, "E"), (12.0, "E")])
def test_gertzbein_robbins_grades(breach_mm, grade):
    assert gertzbein_robbins_grade(breach_mm) == grade


def test_grade_rejects_nan():
    with pytest.raises(BreachError):
        gertzbein_robbins_grade(float("nan"))


@pytest.mark.parametrize("normal, point, side", [
    ((1, 0, 0), (10, 0, 0), "lateral"), ((-1, 0, 0), (10, 0, 0), "medial"),
    ((-1, 0, 0), (-10, 0, 0), "lateral"), ((1, 0.2, 0), (-10, 0, 0), "medial"),
    ((0.1, 0, 1), (10, 0, 0), "superior"), ((0, 0.3, -0.9), (10, 0, 0), "inferior"),
    ((0, -1, 0), (10, 0, 0), "anterior"), ((0.2, 0.9, 0), (10, 0, 0), "posterior"),
])
def test_breach_side_in_the_vertebra_frame(normal, point, side):
    assert breach_side(np.array(normal, float), np.array(point, float)) == side


def test_signed_distance_of_a_slab_is_exact_to_half_a_voxel():
    mask = np.zeros((9, 9, 40), bool)
    mask[:, :, 10:20] = True  # inside voxel centres i = 10..19: surfaces at 9.5 and 19.5
    sd = signed_distance_from_mask(mask, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(sd[4, 4, [5, 9, 10, 14, 19, 25]], [4.5, 0.5, -0.5, -4.5, -0.5, 5.5])
    with pytest.raises(BreachError):
        signed_distance_from_mask(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0))


# Instrument along y (towards -y) shifted by `offset` from the plan: the 6 mm screw's
# protrusion is |offset| + 3 - half size of the box across it (5 in x, 8 in z).
@pytest.mark.parametrize("offset, breach, grade, side", [
    ((0.0, 0.0), 0.0, "A", None),
    ((1.5, 0.0), 0.0, "A", None),
    ((3.0, 0.0), 1.0, "B", "lateral"),
    ((-5.0, 0.0), 3.0, "C", "medial"),
    ((7.0, 0.0), 5.0, "D", "lateral"),
    ((10.0, 0.0), 8.0, "E", "lateral"),
    ((0.0, 8.0), 3.0, "C", "superior"),
    ((0.0, -10.0), 5.0, "D", "inferior"),
])
def test_box_breach_against_hand_computed_cases(box_volumes, offset, breach, grade, side):
    ct, labels = box_volumes
    corridor = build_corridor(ct, labels, TRAJECTORY, T_world_from_vertebra=MIDLINE, margin_mm=12.0)
    tip = np.array([offset[0], 30.0, offset[1]])
    p = predict_breach(corridor, tip, np.array([0.0, -1.0, 0.0]))
    assert p.breach_mm == pytest.approx(breach, abs=0.3)
    assert p.grade == grade
    assert p.side == side
    if breach != 1.0:  # at the warning threshold either answer is right
        assert p.warning == (breach > 1.0)
    if breach > 0:
        assert p.travel_to_breach_mm == pytest.approx(10.0 + corridor.corridor_start_mm, abs=1.0)


def test_box_clearance_and_travel(box_volumes):
    ct, labels = box_volumes
    corridor = build_corridor(ct, labels, TRAJECTORY, T_world_from_vertebra=MIDLINE, margin_mm=12.0)
    # On the plan the planned screw lies inside from about 3 mm (its radius) past the entry.
    assert corridor.corridor_start_mm == pytest.approx(3.0, abs=0.5)
    p = predict_breach(corridor, np.array([1.0, 10.0, 0.0]), np.array([0.0, -1.0, 0.0]))
    assert p.clearance_mm == pytest.approx(1.0, abs=0.3)  # 5 - 1 - 3
    assert p.travel_to_breach_mm is None
    # Converging 10 deg laterally from the entry: the screw leaves the box ahead of the tip.
    a = np.radians(10.0)
    axis = np.array([np.sin(a), -np.cos(a), 0.0])
    tip = np.array([0.0, 20.0, 0.0]) + 5.0 * axis
    p = predict_breach(corridor, tip, axis)
    # Protrusion = x + 3 - 5 with x = sin(a) * s: starts at s = 2 / sin(a), 11.5 mm, 6.5 mm ahead.
    assert p.travel_to_breach_mm == pytest.approx(2.0 / np.sin(a) - 5.0, abs=1.0)
    assert p.side == "lateral" and p.clearance_mm < 0
    assert predict_breach(corridor, tip, np.array([1.0, 0.0, 0.0])) is None  # 90 deg off the plan


def test_guidance_metrics_numbers(box_volumes):
    ct, labels = box_volumes
    corridor = build_corridor(ct, labels, TRAJECTORY, T_world_from_vertebra=MIDLINE, margin_mm=12.0)
    a = np.radians(5.0)
    m = guidance_metrics(np.array([2.0, 10.0, 0.0]), np.array([0.0, -np.cos(a), np.sin(a)]), TRAJECTORY, corridor)
    assert m["depth_beyond_entry_mm"] == pytest.approx(10.0)
    assert m["to_target_along_plan_mm"] == pytest.approx(25.0)
    assert m["offset_at_tip_mm"] == pytest.approx(2.0)
    assert m["angle_to_plan_deg"] == pytest.approx(5.0)
    assert m["breach_grade"] in "ABCDE" and isinstance(m["breach_warning"], bool)
    assert "breach_mm" not in guidance_metrics(np.zeros(3), np.array([0.0, -1.0, 0.0]), TRAJECTORY)


def test_corridor_errors(box_volumes):
    ct, labels = box_volumes
    with pytest.raises(BreachError, match="HU"):
        build_corridor(ct.with_data(ct.data, units="mu_per_mm"), labels, TRAJECTORY)
    with pytest.raises(BreachError, match="label 28"):
        build_corridor(ct, labels, dict(TRAJECTORY, level="L4", label=28))
    far = dict(TRAJECTORY, entry_world=[500.0, 0.0, 0.0], target_world=[520.0, 0.0, 0.0])
    with pytest.raises(BreachError, match="outside"):
        build_corridor(ct, labels, far)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3)


@pytest.mark.parametrize("index", [0, 5])
@pytest.mark.parametrize("offset_mm", [0.0, -4.0, 5.0])
def test_phantom_paths_agree_with_the_analytic_truth(phantom, index, offset_mm):
    """Parallel medial (-) / lateral (+) shifts of a planned screw: the model's breach is
    within 0.6 mm of the analytic truth and on the same side."""
    t = phantom.plan[index]
    frame = phantom.T_world_from_vertebra[t["level"]]
    corridor = build_corridor(phantom.ct, phantom.labels, t, T_world_from_vertebra=frame)
    entry, target = (np.array(t[k]) for k in ("entry_world", "target_world"))
    d = (target - entry) / np.linalg.norm(target - entry)
    sign = 1.0 if (entry - frame[:3, 3]) @ frame[:3, 0] > 0 else -1.0
    lateral = sign * frame[:3, 0] - (sign * frame[:3, 0] @ d) * d
    lateral /= np.linalg.norm(lateral)
    start = entry + offset_mm * lateral - 5.0 * d
    p = predict_breach(corridor, start, d)
    truth = path_truth(phantom, t, start, d, corridor.implant_radius_mm, corridor.corridor_start_mm)
    assert p.breach_mm == pytest.approx(truth["breach_mm"], abs=0.6)
    if truth["breach_mm"] > 2.0:
        assert p.warning and p.side == truth["side"] == ("lateral" if offset_mm > 0 else "medial")
    if offset_mm == 0.0:  # the plan fits its pedicle with a fraction of a mm to spare
        assert truth["breach_mm"] < 0.5 and p.breach_mm < 0.5 and not p.warning


def test_interbody_corridor_flags_endplates(phantom):
    """A lateral (LLIF) access path on plan stays in the disc; shifted 4 mm cranially its
    cage (modelled by its height) cuts into the upper endplate."""
    t = next(x for x in phantom.interbody_plan if x["approach"] == "lateral" and x["level"] == "L3")
    frame = phantom.T_world_from_vertebra["L3"]
    corridor = build_corridor(phantom.ct, phantom.labels, t, T_world_from_vertebra=frame)
    assert corridor.kind == "disc"
    entry, target = (np.array(t[k]) for k in ("entry_world", "target_world"))
    d = (target - entry) / np.linalg.norm(target - entry)
    on_plan = predict_breach(corridor, entry - 5 * d, d)
    assert on_plan.breach_mm < 1.0 and not on_plan.warning
    up = predict_breach(corridor, entry - 5 * d + 4.0 * frame[:3, 2], d)
    assert up.warning and up.side == "superior" and up.breach_mm > 2.0
    down = predict_breach(corridor, entry - 5 * d - 4.0 * frame[:3, 2], d)
    assert down.warning and down.side == "inferior"


@pytest.mark.parametrize("warned_at, breach_at, seen_at, in_time", [
    (10.0, 15.0, 0.0, True),  # straight path, warned 5 mm ahead
    (16.0, 15.0, 0.0, False),  # straight path, warned after the breach began
    (16.0, 15.2, 16.0, True),  # turned at 15.1 mm, warned at the first pose past the turn
    (17.0, 15.2, 16.0, False),  # ... one pose later
])
def test_bench_breach_counts_a_warning_in_time(warned_at, breach_at, seen_at, in_time):
    """The benchmark's rule: before the breach, or at the first pose along the new direction."""
    assert warned_in_time(warned_at, breach_at, seen_at) is in_time
