"""sim.scenario: determinism, ground truth, breathing, instrument motion and image, tracker."""

import math

import numpy as np
import pytest

from guidance.core.geometry import (
    intrinsics,
    invert_rigid,
    make_rigid,
    project,
    rotation_angle_deg,
    transform_points,
)
from guidance.core.instrument_models import InstrumentModel, get_instrument
from guidance.navigation.instruments import tip_and_axis, tool_in_world
from guidance.core.views import View
from sim.phantom import make_phantom
from sim.scenario import (
    START_OUTSIDE_MM,
    Scenario,
    ScenarioPlayer,
    instrument_line_integral,
)

SMALL = dict(detector_px=128, pixel_spacing_mm=2.4)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=2.0)


@pytest.fixture(scope="module")
def player(phantom):
    return ScenarioPlayer(Scenario(**SMALL), phantom)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="video"), "mode must be one of fluoro, shots; got 'video'"),
    (dict(intensity="png"), "intensity must be one of line_integral, raw, display"),
    (dict(instrument="drill"), "instrument must be one of kwire, jamshidi"),
    (dict(target_side="middle"), "target_side must be one of left, right"),
    (dict(target_level="T12"), "target_level must be one of L1, L2, L3, L4, L5"),
    (dict(fps=0), "fps must be a positive number"),
    (dict(breathing_amplitude_mm=-1.0), "breathing_amplitude_mm must be a non-negative number"),
    (dict(sid_mm=1200.0), "sid_mm .* must be less than sdd_mm"),
    (dict(shots=()), "at least one"),
    (dict(shots=((0.0, 0.0), (90.0,))), r"shots\[1\] must be a \(lao_deg, cranial_deg\) pair"),
    (dict(detector_px=12.5), "detector_px must be an integer"),
    (dict(tracked="no"), "tracked must be True or False"),
    (dict(rest_at_shots_s=-0.5), "rest_at_shots_s must be a non-negative number"),
    (dict(start_depth_mm=math.nan), "start_depth_mm must be a finite number"),
])
def test_scenario_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scenario(**kwargs)


def test_target_missing_from_the_plan():
    phantom = make_phantom(seed=0, spacing_mm=4.0, levels=("L3", "L4"))
    with pytest.raises(ValueError, match="no L1/left trajectory; planned: L3/left, L3/right"):
        ScenarioPlayer(Scenario(target_level="L1", **SMALL), phantom)


def test_frames_are_deterministic(phantom, player):
    other = ScenarioPlayer(Scenario(**SMALL), phantom)
    other.frame_at(1.0)  # the order of requests must not matter
    a, b = player.frame_at(0.4), other.frame_at(0.4)
    assert a.pixels.dtype == np.uint16 and a.pixels.shape == (128, 128)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.frame_id == b.frame_id == 6
    for key in a.tracker:
        np.testing.assert_array_equal(a.tracker[key], b.tracker[key])
    reseeded = ScenarioPlayer(Scenario(seed=1, **SMALL), phantom).frame_at(0.4)
    assert not np.array_equal(a.pixels, reseeded.pixels)
    assert not np.allclose(a.T_cam_from_world, reseeded.T_cam_from_world)


def test_ground_truth_relation_and_misplacement(player):
    state = player.state_at(0.0)  # breathing is zero at t = 0: M = M0
    np.testing.assert_allclose(state.T_cam_from_world,
                               state.view.T_cam_from_world @ invert_rigid(state.T_world_corrected_from_world),
                               atol=1e-9)
    M = invert_rigid(state.T_world_corrected_from_world)
    iso = player.isocenter_world
    assert np.linalg.norm(transform_points(M, iso) - iso) == pytest.approx(8.0)
    assert rotation_angle_deg(M) == pytest.approx(3.0)
    assert state.view.intensity == "raw" and state.view.I0 == 4095.0


def test_breathing_moves_the_anatomy_by_the_amplitude(phantom):
    player = ScenarioPlayer(Scenario(initial_misalignment_mm=0.0, initial_misalignment_deg=0.0,
                                     breathing_amplitude_mm=1.5, breathing_period_s=4.0, **SMALL), phantom)
    for t_s, y in [(0.0, 0.0), (1.0, 1.5), (2.0, 0.0), (3.0, -1.5)]:
        M = invert_rigid(player.state_at(t_s).T_world_corrected_from_world)
        np.testing.assert_allclose(M, make_rigid(np.eye(3), (0.0, y, 0.0)), atol=1e-12)
    ys = [invert_rigid(player.state_at(t).T_world_corrected_from_world)[1, 3] for t in np.arange(0, 4, 0.1)]
    assert max(ys) - min(ys) == pytest.approx(3.0, abs=1e-9)


def test_instrument_advances_along_the_plan_and_stops_at_the_target(player):
    model = get_instrument("kwire")
    entry, target = player.entry_world, player.target_world
    direction = (target - entry) / np.linalg.norm(target - entry)
    for t_s in (0.0, 2.0, 5.5):
        tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, model)
        np.testing.assert_allclose(tip, entry - START_OUTSIDE_MM * direction + 3.0 * t_s * direction, atol=1e-9)
        np.testing.assert_allclose(axis, direction, atol=1e-12)
    tip, _ = tip_and_axis(player.state_at(1000.0).T_world_from_tool, model)
    np.testing.assert_allclose(tip, target, atol=1e-9)


def test_rests_around_each_change_of_orientation():
    """Fluoroscopy after an AP and a lateral shot (2 s apart, fluoroscopy from 4 s): the
    orientation changes at 0, 2 and 4 s; rests of 1.5 s either side merge into one from 0
    to 5.5 s, rests of 0.5 s stay apart. Shots cycling AP, AP, lateral: no change at the
    second AP. Without a rest the instrument advances throughout."""
    lead = dict(lead_shots=((0.0, 0.0), (90.0, 0.0)))
    assert Scenario(**lead).orientation_changes_s() == (0.0, 2.0, 4.0)
    assert Scenario(**lead).rest_intervals_s() == ()
    assert Scenario(**lead, rest_at_shots_s=1.5).rest_intervals_s() == ((0.0, 5.5),)
    assert Scenario(**lead, rest_at_shots_s=0.5).rest_intervals_s() == ((0.0, 0.5), (1.5, 2.5), (3.5, 4.5))
    cycling = Scenario(mode="shots", shots=((0.0, 0.0), (0.0, 0.0), (90.0, 0.0)), duration_s=7.0, rest_at_shots_s=0.5)
    assert cycling.orientation_changes_s() == (0.0, 4.0, 6.0)
    assert cycling.rest_intervals_s() == ((0.0, 0.5), (3.5, 4.5), (5.5, 6.5))
    assert Scenario(**lead, fluoro_angles=(90.0, 0.0)).orientation_changes_s() == (0.0, 2.0)


def test_instrument_rests_during_the_shots_then_advances(phantom):
    """With rests of 0.5 s around shots 2 s apart, the true tip is the same at every time
    within a rest (to 1e-12 mm) and advances at 3 mm/s outside them: between 1.0 and 3.0 s
    it rested from 1.5 to 2.5 s, so it moved 3 mm/s x 1 s; the frames carry that truth.
    ``start_depth_mm`` 0: it rests docked at the entry point."""
    model = get_instrument("kwire")
    player = ScenarioPlayer(Scenario(**SMALL, mode="shots", rest_at_shots_s=0.5), phantom)
    direction = (player.target_world - player.entry_world) / np.linalg.norm(player.target_world - player.entry_world)

    def tip(t_s: float) -> np.ndarray:
        return tip_and_axis(player.state_at(t_s).T_world_from_tool, model)[0]

    for start, end in ((0.0, 0.5), (1.5, 2.5)):
        for t_s in np.linspace(start, end, 7):
            np.testing.assert_allclose(tip(t_s), tip(start), atol=1e-12)
    np.testing.assert_allclose(tip(0.0), player.entry_world - START_OUTSIDE_MM * direction, atol=1e-9)
    np.testing.assert_allclose(tip(3.0) - tip(1.0), 3.0 * direction, atol=1e-9)
    np.testing.assert_allclose(tip(1.5) - tip(0.5), 3.0 * direction, atol=1e-9)
    assert np.linalg.norm(tip(0.6) - tip(0.5)) == pytest.approx(0.3, abs=1e-9)
    np.testing.assert_allclose(player.frame_at(2.2).T_world_from_tool, player.state_at(1.5).T_world_from_tool,
                               atol=1e-12)
    docked = ScenarioPlayer(Scenario(**SMALL, mode="shots", rest_at_shots_s=0.5, start_depth_mm=0.0), phantom)
    np.testing.assert_allclose(tip_and_axis(docked.state_at(0.4).T_world_from_tool, model)[0], player.entry_world,
                               atol=1e-9)


def test_instrument_appears_in_the_image(phantom):
    lateral = dict(fluoro_angles=(90.0, 0.0), **SMALL)
    with_wire = ScenarioPlayer(Scenario(**lateral), phantom).frame_at(8.0)
    without = ScenarioPlayer(Scenario(instrument=None, **lateral), phantom).frame_at(8.0)
    assert without.T_world_from_tool is None and "kwire" not in without.tracker
    tip, axis = tip_and_axis(with_wire.T_world_from_tool, get_instrument("kwire"))
    shaft = tip - np.arange(5.0, 40.0, 2.0)[:, None] * axis
    uv = np.rint(project(with_wire.view.with_pose(with_wire.T_cam_from_world).P, shaft)).astype(int)
    assert np.all((uv >= 0) & (uv < 128))
    on_shaft = with_wire.pixels[uv[:, 1], uv[:, 0]].astype(float)
    reference = without.pixels[uv[:, 1], uv[:, 0]].astype(float)
    # A 1.6 mm wire covers about one 2.4 mm pixel (x1.67 magnification) before the blur.
    assert on_shaft.mean() < 0.85 * reference.mean()
    assert np.mean(on_shaft < reference) > 0.8


def test_instrument_line_integral_is_the_analytic_chord():
    view = View(K=intrinsics(1000.0, (1.0, 1.0), (32.0, 32.0)), T_cam_from_world=np.eye(4), image_size=(65, 65))
    rod = InstrumentModel("rod", "kwire", 20.0, 4.0, np.zeros(3), np.array([1.0, 0.0, 0.0]))
    T_cam_from_tool = make_rigid(np.eye(3), (-10.0, 0.0, 500.0))  # x = -10..10 mm at depth 500
    L = instrument_line_integral(view, T_cam_from_tool, rod, mu_per_mm=1.0, max_line_integral=np.inf,
                                 supersample=1)
    assert L[32, 32] == pytest.approx(4.0)  # through the axis, perpendicular: the diameter
    d = 500.0 / 1000.0 / math.sqrt(1.0 + 1e-6)  # distance of the ray through v = 33 to the axis
    assert L[33, 32] == pytest.approx(2.0 * math.sqrt(4.0 - d * d), rel=1e-6)
    assert L[32, 50] == pytest.approx(4.0 * math.sqrt(1.0 + 0.018**2), rel=1e-6)  # oblique ray
    assert L[32, 56] == 0.0 and L[32, 8] == 0.0 and L[40, 32] == 0.0  # past the ends, beside
    saturated = instrument_line_integral(view, T_cam_from_tool, rod, mu_per_mm=1.0, max_line_integral=3.0,
                                         supersample=1)
    assert saturated[32, 32] == pytest.approx(3.0)


def test_tracker_samples_map_back_to_the_truth(player):
    model = get_instrument("kwire")
    position_errors, angle_errors, tip_errors = [], [], []
    for t_s in np.arange(0.0, 6.0, 0.1):
        state = player.state_at(t_s)
        np.testing.assert_array_equal(state.tracker["carm"], state.T_tracker_from_cam)
        T_world_from_tracker = invert_rigid(state.T_tracker_from_cam @ state.T_cam_from_world)
        for tool, truth in (("kwire", state.T_world_from_tool), ("reference", player.T_world_from_reference)):
            error = invert_rigid(truth) @ T_world_from_tracker @ state.tracker[tool]
            position_errors.append(np.linalg.norm(error[:3, 3]))
            angle_errors.append(rotation_angle_deg(error))
        # The navigation chain needs no C-arm: tool in CT coordinates through the reference array.
        T_world_from_tool = tool_in_world(state.tracker["kwire"], state.tracker["reference"],
                                          invert_rigid(player.T_world_from_reference))
        tip_errors.append(np.linalg.norm(tip_and_axis(T_world_from_tool, model)[0]
                                         - tip_and_axis(state.T_world_from_tool, model)[0]))
    assert 0.15 < np.sqrt(np.mean(np.square(position_errors))) < 0.35
    assert 0.12 < np.sqrt(np.mean(np.square(angle_errors))) < 0.28
    assert max(position_errors) < 1.0 and max(angle_errors) < 0.8
    assert np.median(tip_errors) < 1.5  # rotation noise acts 150 mm from the tip


def test_shots_mode_cycles_views_with_a_room_fixed_tracker(phantom):
    player = ScenarioPlayer(Scenario(mode="shots", shot_interval_s=2.0, breathing_amplitude_mm=0.0,
                                     instrument=None, **SMALL), phantom)
    ap, lateral, again = player.state_at(0.5), player.state_at(2.1), player.state_at(8.0)
    assert (ap.frame_id, lateral.frame_id, again.frame_id) == (0, 1, 4)
    np.testing.assert_allclose(again.view.T_cam_from_world, ap.view.T_cam_from_world)
    # Prone, source under the table: AP rays run anterior -> posterior (world +y); the
    # lateral (LAO 90) rays run along the patient's left-right axis.
    assert ap.view.principal_ray_world[1] == pytest.approx(1.0)
    assert abs(lateral.view.principal_ray_world[0]) == pytest.approx(1.0)
    assert not np.allclose(ap.T_tracker_from_cam, lateral.T_tracker_from_cam)
    true_reference = [s.T_tracker_from_cam @ s.T_cam_from_world @ player.T_world_from_reference
                      for s in (ap, lateral)]
    np.testing.assert_allclose(true_reference[0], true_reference[1], atol=1e-9)


def test_instrument_turned_medially_about_the_entry(phantom):
    """``instrument_medial_deg``: the path keeps the entry, turns towards the midline by the
    angle and keeps its length."""
    turned = ScenarioPlayer(Scenario(instrument_medial_deg=8.0, **SMALL), phantom)
    plain = ScenarioPlayer(Scenario(**SMALL), phantom)
    np.testing.assert_allclose(turned.entry_world, plain.entry_world)
    a, b = (p.target_world - p.entry_world for p in (plain, turned))
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(a))
    assert np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))) == pytest.approx(8.0)
    frame = phantom.T_world_from_vertebra["L3"]  # the scenario's default target level

    def from_midline(p):
        return abs((p - frame[:3, 3]) @ frame[:3, 0])

    assert from_midline(turned.target_world) < from_midline(plain.target_world) - 5.0  # 8 deg over ~48 mm
    with pytest.raises(ValueError, match="instrument_medial_deg"):
        Scenario(instrument_medial_deg=45.0)


def test_a_pose_seen_before_reuses_its_anatomy_image(phantom):
    """Breathing is periodic: one breath later the pose repeats and the anatomy image comes
    from the player's memory, the same as a fresh render (the noise, seeded by the time,
    differs)."""
    scenario = Scenario(duration_s=3.0, detector_px=64, pixel_spacing_mm=4.8, intensity="line_integral", dose=1e6,
                        breathing_period_s=1.0, instrument=None)
    warm, fresh = ScenarioPlayer(scenario, phantom), ScenarioPlayer(scenario, phantom)
    warm.frame_at(0.2)
    assert len(warm._anatomy_images) == 1
    again = warm.frame_at(1.2)
    assert len(warm._anatomy_images) == 1
    np.testing.assert_allclose(again.pixels, fresh.frame_at(1.2).pixels, rtol=1e-6, atol=1e-6)
    warm.frame_at(1.25)  # another breathing phase: rendered
    assert len(warm._anatomy_images) == 2
