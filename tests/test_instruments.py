import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.core.geometry import make_rigid, rotation_about_axis, transform_points
from guidance.core.instrument_models import INSTRUMENTS, InstrumentModel, get_instrument
from guidance.core.plan import plan_trajectories
from guidance.navigation.instruments import deviation_from_plan, nearest_trajectory, tip_and_axis, tool_in_world

# Entry on the back, target 40 mm anteriorly (-y): the planned direction is -y.
TRAJECTORY = {"level": "L3", "label": 29, "side": "left", "entry_world": [20.0, 50.0, 0.0],
              "target_world": [20.0, 10.0, 0.0], "screw_diameter_mm": 6.5}
PLAN_DIR = np.array([0.0, -1.0, 0.0])


def test_registry_names_and_unknown_name_lists_them():
    kinds = {m.kind for m in INSTRUMENTS.values()}
    assert kinds == {"kwire", "jamshidi", "screw", "guide"}
    assert get_instrument("kwire").diameter_mm == pytest.approx(1.6)
    with pytest.raises(ValueError, match="kwire.*jamshidi"):
        get_instrument("scalpel")


def test_model_validates_and_normalises_axis():
    m = InstrumentModel("t", "kwire", 100.0, 1.0, np.zeros(3), np.array([0.0, 0.0, 2.0]))
    assert_allclose(m.axis_tool, [0, 0, 1])
    with pytest.raises(ValueError, match="kwire, jamshidi, screw"):
        InstrumentModel("t", "drill", 100.0, 1.0, np.zeros(3), np.array([0, 0, 1.0]))
    with pytest.raises(ValueError, match="zero"):
        InstrumentModel("t", "kwire", 100.0, 1.0, np.zeros(3), np.zeros(3))


def test_tool_in_world_known_chain():
    # Tracker: tool origin at (10, 0, 0); reference array rotated 90 deg about z and at
    # (0, 20, 0); CT world is 30 mm below the reference origin along reference z.
    T_tracker_from_tool = make_rigid(np.eye(3), [10.0, 0.0, 0.0])
    T_tracker_from_reference = make_rigid(rotation_about_axis([0, 0, 1], 90.0), [0.0, 20.0, 0.0])
    T_reference_from_world = make_rigid(np.eye(3), [0.0, 0.0, 30.0])
    T_world_from_tool = tool_in_world(T_tracker_from_tool, T_tracker_from_reference,
                                      T_reference_from_world)
    # Tool origin in the reference frame: R^T ((10, 0, 0) - (0, 20, 0)) = (-20, -10, 0);
    # in world: subtract the 30 mm translation along z.
    assert_allclose(transform_points(T_world_from_tool, np.zeros(3)), [-20.0, -10.0, -30.0],
                    atol=1e-12)
    chain = T_tracker_from_reference @ T_reference_from_world @ T_world_from_tool
    assert_allclose(chain, T_tracker_from_tool, atol=1e-12)


def test_tool_in_world_rejects_non_rigid():
    with pytest.raises(ValueError, match="T_tracker_from_reference"):
        tool_in_world(np.eye(4), 2 * np.eye(4), np.eye(4))


def test_tip_and_axis_points_towards_tip():
    model = InstrumentModel("t", "kwire", 100.0, 1.6, np.array([0.0, 5.0, -100.0]),
                            np.array([0.0, 0.0, 1.0]))
    T = make_rigid(rotation_about_axis([1, 0, 0], 90.0), [1.0, 2.0, 3.0])
    tip, axis = tip_and_axis(T, model)
    # Rx(90): (x, y, z) -> (x, -z, y); tip (0, 5, -100) -> (0, 100, 5) + t.
    assert_allclose(tip, [1.0, 102.0, 8.0], atol=1e-12)
    # Handle direction +z_tool -> world (0, -1, 0); the returned axis points to the tip.
    assert_allclose(axis, [0.0, 1.0, 0.0], atol=1e-12)


def test_deviation_tip_on_the_line():
    tip = np.array([20.0, 30.0, 0.0])
    dev = deviation_from_plan(tip, PLAN_DIR, TRAJECTORY)
    assert dev["distance_to_trajectory_mm"] == pytest.approx(0.0, abs=1e-12)
    assert dev["angle_to_trajectory_deg"] == pytest.approx(0.0, abs=1e-6)
    assert dev["depth_along_trajectory_mm"] == pytest.approx(20.0)
    assert dev["tip_to_target_mm"] == pytest.approx(20.0)
    assert dev["lateral_offset_at_entry_mm"] == pytest.approx(0.0, abs=1e-12)


def test_deviation_parallel_offset_3mm_and_before_entry():
    tip = np.array([23.0, 60.0, 0.0])  # 3 mm to the left, 10 mm before the entry
    dev = deviation_from_plan(tip, PLAN_DIR, TRAJECTORY)
    assert dev["distance_to_trajectory_mm"] == pytest.approx(3.0)
    assert dev["angle_to_trajectory_deg"] == pytest.approx(0.0, abs=1e-6)
    assert dev["depth_along_trajectory_mm"] == pytest.approx(-10.0)
    assert dev["tip_to_target_mm"] == pytest.approx(math.hypot(3.0, 50.0))
    assert dev["lateral_offset_at_entry_mm"] == pytest.approx(3.0)


@pytest.mark.parametrize("tilt_axis", [[0, 0, 1], [1, 0, 0]])
def test_deviation_10_degree_tilt_about_the_entry(tilt_axis):
    axis = rotation_about_axis(tilt_axis, 10.0) @ PLAN_DIR
    entry = np.array(TRAJECTORY["entry_world"])
    tip = entry + 20.0 * axis  # pivoted at the entry, 20 mm in
    dev = deviation_from_plan(tip, axis, TRAJECTORY)
    assert dev["angle_to_trajectory_deg"] == pytest.approx(10.0)
    assert dev["distance_to_trajectory_mm"] == pytest.approx(20.0 * math.sin(math.radians(10)))
    assert dev["depth_along_trajectory_mm"] == pytest.approx(20.0 * math.cos(math.radians(10)))
    assert dev["lateral_offset_at_entry_mm"] == pytest.approx(0.0, abs=1e-9)


def test_deviation_reversed_and_perpendicular_instrument():
    tip = np.array([20.0, 30.0, 0.0])
    assert deviation_from_plan(tip, -PLAN_DIR, TRAJECTORY)["angle_to_trajectory_deg"] == \
        pytest.approx(180.0)
    dev = deviation_from_plan(tip, [1.0, 0.0, 0.0], TRAJECTORY)
    assert dev["angle_to_trajectory_deg"] == pytest.approx(90.0)
    assert dev["lateral_offset_at_entry_mm"] == math.inf


def test_deviation_rejects_degenerate_trajectory():
    bad = dict(TRAJECTORY, target_world=TRAJECTORY["entry_world"])
    with pytest.raises(ValueError, match="less than 1 mm apart"):
        deviation_from_plan(np.zeros(3), PLAN_DIR, bad)
    with pytest.raises(ValueError, match="target_world"):
        deviation_from_plan(np.zeros(3), PLAN_DIR, {"entry_world": [0, 0, 0]})


def test_nearest_trajectory_picks_closest_segment():
    right = dict(TRAJECTORY, side="right", entry_world=[-20.0, 50.0, 0.0],
                 target_world=[-20.0, 10.0, 0.0])
    upper = dict(TRAJECTORY, level="L2", label=30, entry_world=[20.0, 50.0, 35.0],
                 target_world=[20.0, 10.0, 35.0])
    plan = {"schema": "guidance.plan/1", "trajectories": [right, TRAJECTORY, upper]}
    traj, dev = nearest_trajectory([-18.0, 40.0, 1.0], PLAN_DIR, plan)
    assert traj == right
    assert dev["distance_to_trajectory_mm"] == pytest.approx(math.hypot(2.0, 1.0))
    traj, _ = nearest_trajectory([19.0, 45.0, 30.0], PLAN_DIR, [right, TRAJECTORY, upper])
    assert traj == upper
    with pytest.raises(ValueError, match="no trajectories"):
        nearest_trajectory(np.zeros(3), PLAN_DIR, [])


def test_plan_trajectories_forms():
    assert plan_trajectories(None) == []
    assert plan_trajectories([TRAJECTORY]) == [TRAJECTORY]
    assert plan_trajectories({"schema": "guidance.plan/1", "trajectories": [TRAJECTORY]}) == [TRAJECTORY]
    with pytest.raises(ValueError, match="schema"):
        plan_trajectories({"schema": "other/1", "trajectories": []})
    with pytest.raises(ValueError, match="schema"):
        plan_trajectories({"trajectories": [TRAJECTORY]})
    with pytest.raises(ValueError, match="must be a list"):
        plan_trajectories({"schema": "guidance.plan/1", "trajectories": 3})


def test_full_chain_tip_lands_on_plan():
    """A tool held along the plan, seen through a tracker and a registration, deviates 0."""
    model = get_instrument("jamshidi")
    entry = np.array(TRAJECTORY["entry_world"])
    # Tool frame in world: +z_tool (towards the handle) along +y world, tip 10 mm in.
    R_world_from_tool = rotation_about_axis([1, 0, 0], -90.0)
    tip_world = entry + 10.0 * PLAN_DIR
    T_world_from_tool = make_rigid(R_world_from_tool,
                                   tip_world - R_world_from_tool @ model.tip_offset_tool)
    T_reference_from_world = make_rigid(rotation_about_axis([0, 1, 1], 25.0), [5, -7, 300])
    T_tracker_from_reference = make_rigid(rotation_about_axis([1, 2, 0], -40.0), [100, 0, -900])
    T_tracker_from_tool = T_tracker_from_reference @ T_reference_from_world @ T_world_from_tool
    T = tool_in_world(T_tracker_from_tool, T_tracker_from_reference, T_reference_from_world)
    assert_allclose(T, T_world_from_tool, atol=1e-9)
    tip, axis = tip_and_axis(T, model)
    dev = deviation_from_plan(tip, axis, TRAJECTORY)
    assert dev["distance_to_trajectory_mm"] == pytest.approx(0.0, abs=1e-9)
    assert dev["angle_to_trajectory_deg"] == pytest.approx(0.0, abs=1e-5)
    assert dev["depth_along_trajectory_mm"] == pytest.approx(10.0)
