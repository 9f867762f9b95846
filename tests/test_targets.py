"""Target poses for a robot or aiming guide: frame, tracker round trip, guide alignment, and
the pipeline publishing them (with breach predictions for instruments)."""

from __future__ import annotations

import numpy as np
import pytest

from guidance.core.geometry import make_rigid, rotation_about_axis, transform_points
from guidance.core.instrument_models import INSTRUMENTS
from guidance.live.pipeline import Pipeline
from guidance.live.wire import InstrumentState, TargetPose, WireError, decode, encode
from guidance.navigation.targets import (
    guide_alignment,
    target_pose_tracker,
    target_pose_world,
    trajectory_from_target_pose,
)
from guidance.registration.register import Registrator
from sim.phantom import make_phantom

TRAJECTORY = {"level": "L3", "label": 29, "side": "left", "entry_world": [20.0, 40.0, 5.0],
              "target_world": [9.0, -8.0, 5.0], "screw_diameter_mm": 6.5}
T_TRACKER_FROM_REFERENCE = make_rigid(rotation_about_axis([0.3, -1.0, 0.4], 131.0), [-420.0, 880.0, -1310.0])
T_REFERENCE_FROM_WORLD = make_rigid(rotation_about_axis([1.0, 0.2, 0.0], -17.0), [3.0, -95.0, -30.0])


def test_target_frame_sits_on_the_entry_along_the_plan():
    T = target_pose_world(TRAJECTORY)
    entry, target = np.array(TRAJECTORY["entry_world"]), np.array(TRAJECTORY["target_world"])
    np.testing.assert_allclose(T[:3, 3], entry)
    np.testing.assert_allclose(T[:3, 2], (target - entry) / np.linalg.norm(target - entry))
    np.testing.assert_allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-12)
    assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0)
    lateral = dict(TRAJECTORY, entry_world=[40.0, 0.0, 0.0], target_world=[0.0, 0.0, 0.0])  # axis along -x
    assert np.linalg.det(target_pose_world(lateral)[:3, :3]) == pytest.approx(1.0)


def test_target_pose_in_the_tracker_maps_back_to_the_plan():
    T = target_pose_tracker(TRAJECTORY, T_TRACKER_FROM_REFERENCE, T_REFERENCE_FROM_WORLD)
    length = float(np.linalg.norm(np.subtract(TRAJECTORY["target_world"], TRAJECTORY["entry_world"])))
    # Independently: the entry point mapped into the tracker by the composed transforms.
    expected_entry = transform_points(T_TRACKER_FROM_REFERENCE @ T_REFERENCE_FROM_WORLD,
                                      np.array([TRAJECTORY["entry_world"]]))[0]
    np.testing.assert_allclose(T[:3, 3], expected_entry, atol=1e-9)
    entry, target = trajectory_from_target_pose(T, length, T_TRACKER_FROM_REFERENCE, T_REFERENCE_FROM_WORLD)
    assert np.linalg.norm(entry - TRAJECTORY["entry_world"]) < 1e-6
    assert np.linalg.norm(target - TRAJECTORY["target_world"]) < 1e-6


@pytest.mark.parametrize("shift_mm, tilt_deg, entry_error, angle, aligned", [
    (0.0, 0.0, 0.0, 0.0, True),
    (0.8, 0.0, 0.8, 0.0, True),
    (1.2, 0.0, 1.2, 0.0, False),
    (0.0, 0.5, 0.0, 0.5, True),
    (0.0, 2.0, 0.0, 2.0, False),
])
def test_guide_alignment_hand_cases(shift_mm, tilt_deg, entry_error, angle, aligned):
    """A guide on the planned axis, shifted sideways (parallel) or tilted about the entry."""
    T = target_pose_world(TRAJECTORY)
    entry, z, x = T[:3, 3], T[:3, 2], T[:3, 0]
    axis = rotation_about_axis(T[:3, 1], tilt_deg) @ z
    tip = entry + shift_mm * x - 30.0 * axis  # the guide's end 30 mm outside the entry
    e, a, ok = guide_alignment(tip, axis, T)
    assert e == pytest.approx(entry_error, abs=1e-9)
    assert a == pytest.approx(angle, abs=1e-6)
    assert ok is aligned


def test_target_pose_message_rejects_half_a_guide():
    with pytest.raises(WireError, match="go together"):
        TargetPose(level="L3", side="left", approach="posterior", T_tracker_from_target=np.eye(4),
                   length_mm=40.0, guide_tool_id="aiming_guide")
    with pytest.raises(WireError, match="approach"):
        TargetPose(level="L3", side="left", approach="oblique", T_tracker_from_target=np.eye(4), length_mm=40.0)
    with pytest.raises(WireError, match="breach_grade"):
        InstrumentState(frame_id=0, tool_id="kwire", tip_world=np.zeros(3), axis_world=[0, 0, 1.0], status="ok",
                        breach_grade="F")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0)


def _tool_pose(model, tip_world, direction):
    """T_world_from_tool of a straight tool with its tip at ``tip_world`` advancing along
    ``direction`` (the model's axis_tool points back to the handle)."""
    z = -direction / np.linalg.norm(direction)
    R = rotation_about_axis(np.cross(model.axis_tool, z), np.degrees(np.arccos(np.clip(model.axis_tool @ z, -1, 1))))
    return make_rigid(R, tip_world - R @ model.tip_offset_tool)


def test_pipeline_publishes_breach_targets_and_guide_alignment(phantom):
    from guidance.live.wire import TrackerSample

    pipeline = Pipeline(Registrator(phantom.ct, labels=phantom.labels), plan=phantom.plan, labels=phantom.labels,
                        ct=phantom.ct)
    # As after a successful registration (the registration itself is tested elsewhere).
    pipeline.T_reference_from_world = T_REFERENCE_FROM_WORLD
    pipeline.last_ok = True
    T_tracker_from_world = T_TRACKER_FROM_REFERENCE @ T_REFERENCE_FROM_WORLD

    def sample(tool, T_world_from_tool, ns):  # with the reference acquired with it (paired by acquisition time)
        return TrackerSample(tool_id=tool, T_tracker_from_tool=T_tracker_from_world @ T_world_from_tool,
                             quality=0.1, acquired_ns=ns, T_tracker_from_reference=T_TRACKER_FROM_REFERENCE)

    targets = pipeline.on_tracker(TrackerSample(tool_id="reference", T_tracker_from_tool=T_TRACKER_FROM_REFERENCE,
                                                quality=0.1, acquired_ns=10**9))
    assert len(targets) == len(phantom.plan) and all(isinstance(t, TargetPose) for t in targets)
    for t, planned in zip(targets, phantom.plan):
        t = decode(encode(t))
        entry, target = trajectory_from_target_pose(t.T_tracker_from_target, t.length_mm, T_TRACKER_FROM_REFERENCE,
                                                    T_REFERENCE_FROM_WORLD)
        assert np.linalg.norm(entry - planned["entry_world"]) < 1e-6
        assert np.linalg.norm(target - planned["target_world"]) < 1e-6
    assert pipeline.on_tracker(TrackerSample(tool_id="reference", T_tracker_from_tool=T_TRACKER_FROM_REFERENCE,
                                             quality=0.1, acquired_ns=10**9 + 10**8)) == []  # throttled

    traj = next(t for t in phantom.plan if t["level"] == "L3" and t["side"] == "left")
    entry, target = np.array(traj["entry_world"]), np.array(traj["target_world"])
    d = (target - entry) / np.linalg.norm(target - entry)
    on_plan = _tool_pose(INSTRUMENTS["kwire"], entry + 5.0 * d, d)
    (state,) = pipeline.on_tracker(sample("kwire", on_plan, 2 * 10**9))
    assert state.plan_level == "L3" and state.breach_grade in ("A", "B") and state.breach_warning is False
    assert state.to_target_along_plan_mm == pytest.approx(np.linalg.norm(target - entry) - 5.0, abs=1e-6)
    medial = np.cross(d, phantom.T_world_from_vertebra["L3"][:3, 2])  # left screw: d x superior points medially
    medial *= -1.0 if medial @ phantom.T_world_from_vertebra["L3"][:3, 0] > 0 else 1.0
    off = _tool_pose(INSTRUMENTS["kwire"], entry + 5.0 * d + 5.0 * medial / np.linalg.norm(medial), d)
    (state,) = pipeline.on_tracker(sample("kwire", off, 3 * 10**9))
    state = decode(encode(state))
    assert state.breach_warning is True and state.breach_side == "medial" and state.breach_grade in "CDE"

    guide = INSTRUMENTS["aiming_guide"]
    (_, aim) = pipeline.on_tracker(sample("aiming_guide", _tool_pose(guide, entry - 20.0 * d, d), 4 * 10**9))
    assert aim.guide_aligned is True and aim.guide_entry_error_mm < 1e-6 and aim.level == "L3"
    tilted = rotation_about_axis(np.cross(d, [0, 0, 1.0]), 3.0) @ d
    (_, aim) = pipeline.on_tracker(sample("aiming_guide", _tool_pose(guide, entry - 20.0 * tilted, tilted),
                                          5 * 10**9))
    assert aim.guide_aligned is False and aim.guide_angle_error_deg == pytest.approx(3.0, abs=1e-6)
    assert aim.guide_entry_error_mm < 1e-6  # pivoting about the entry point
