"""guidance.navigation.detection: instruments found in simulated X-rays, against the simulator's truth."""

import math
from dataclasses import replace

import numpy as np
import pytest

from guidance.core.geometry import backproject, make_rigid, project, rotation_about_axis
from guidance.core.images import preprocess
from guidance.core.instrument_models import get_instrument
from guidance.core.plan import trajectory_endpoints
from guidance.core.views import carm_view
from guidance.core.volume import Volume, affine_from_geometry
from guidance.navigation.detection import (
    DetectionError,
    DetectionSettings,
    InstrumentEstimate,
    ViewDetection,
    _bone_depth,
    _contrast_step,
    combine_with_earlier_view,
    detect_in_view,
    detect_instruments,
    instrument_image,
    instrument_projection,
    mirrored_about_ray,
    most_certain,
    single_view_estimate,
)
from guidance.navigation.instruments import tip_and_axis
from sim.scenario import (
    START_OUTSIDE_MM,
    Scenario,
    ScenarioPlayer,
    instrument_line_integral,
    tool_pose_on_trajectory,
)

KWIRE = get_instrument("kwire")
NEEDLE = get_instrument("jamshidi")
SMALL = dict(detector_px=256, pixel_spacing_mm=1.2)
AP, LATERAL = (0.0, 0.0), (90.0, 0.0)


def _frame(player: ScenarioPlayer, t_s: float, angles, noise_offset: int = 0, extra=()):
    """(line-integral image, registered view) of the player's scenario at t_s from angles
    (``extra``: (model, T_world_from_tool) of untracked instruments drawn as well)."""
    frame, view = player.shot_at(t_s, *angles, noise_offset=noise_offset, extra_instruments=extra)
    return preprocess(frame.pixels, view).image, view


def _in_plane_mm(view, tip_uv, tip_world) -> float:
    source, rays = backproject(view.K, view.T_cam_from_world, np.asarray(tip_uv)[None])
    return float(np.linalg.norm(np.cross(tip_world - source, rays[0])))


def test_projection_matches_the_simulators_line_integral():
    """The detector's cylinder model (PSF off) against an independent reference: the
    simulator's line integral on an 8x finer detector, averaged over each pixel as
    intensities, for a Jamshidi needle tilted 70 degrees (the end caps matter): same
    total attenuation and centroid, pixelwise close."""
    coarse = carm_view(detector_size_px=(96, 96), pixel_spacing_mm=(1.2, 1.2))
    fine = carm_view(detector_size_px=(768, 768), pixel_spacing_mm=(0.15, 0.15))
    T_cam_from_tool = make_rigid(rotation_about_axis(np.array([1.0, 0.3, 0.2]), 70.0), [5.0, -3.0, 600.0])
    fine_image = instrument_line_integral(fine, T_cam_from_tool, NEEDLE, supersample=1).astype(float)
    reference = -np.log(np.exp(-fine_image).reshape(96, 8, 96, 8).mean(axis=(1, 3)))
    tip = T_cam_from_tool[:3, :3] @ NEEDLE.tip_offset_tool + T_cam_from_tool[:3, 3]
    axis = T_cam_from_tool[:3, :3] @ NEEDLE.axis_tool
    vv, uu = np.mgrid[0:96, 0:96]
    uv = np.column_stack([uu.ravel(), vv.ravel()]).astype(float)
    mine = instrument_projection(coarse, tip, axis, NEEDLE, uv, blur_sigma_px=0.0).reshape(96, 96)
    assert reference.sum() > 50.0
    assert mine.sum() == pytest.approx(reference.sum(), rel=0.02)
    for weights in (uu, vv):
        assert (mine * weights).sum() / mine.sum() == pytest.approx((reference * weights).sum() / reference.sum(),
                                                                    abs=0.05)
    assert np.max(np.abs(mine - reference)) < 0.15 * reference.max()


def test_single_view_finds_the_kwire_in_plane(phantom):
    """At the benchmark's detector (512 px of 0.6 mm)."""
    player = ScenarioPlayer(Scenario(detector_px=512, pixel_spacing_mm=0.6, target_level="L3", target_side="left",
                                     seed=3), phantom)
    t_s = (10.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE)
    # Lateral: the tip sits on the pedicle's cortex, whose ridge continues the shaft: the
    # tip is found 1-1.6 mm along it in this case, depending on the anatomy render's last
    # bits (the benchmark's median lateral in-plane error is 0.17 mm).
    for angles, tolerance_mm in ((AP, 0.5), (LATERAL, 2.0)):
        image, view = _frame(player, t_s, angles)
        found = detect_in_view(image, view, [KWIRE], player.isocenter_world)
        assert len(found) == 1, angles
        assert _in_plane_mm(view, found[0].tip_uv, tip) <= tolerance_mm, angles
    # Depth from the anatomy: the AP tip ray's posterior bone surface, within 3 sigma.
    image, view = _frame(player, t_s, AP)
    estimate = single_view_estimate(detect_in_view(image, view, [KWIRE], player.isocenter_world)[0], view,
                                    focus_world=player.isocenter_world, bone=phantom.labels)
    assert estimate.n_views == 1 and estimate.axis_sigma_deg == 90.0
    assert np.linalg.norm(estimate.tip_world - tip) <= 3.0 * estimate.depth_sigma_mm


def test_a_lateral_ray_across_the_spine_reports_the_depth_unknown(phantom):
    """The bench's failing geometry (case 0: L1 left, the K-wire 8 mm before the entry, in
    the soft tissue): the lateral tip ray crosses the spine, where the most posterior bone
    surface along it (the rule of an AP view) lies more than 10 mm from the tip, which its
    sigma of a few mm did not cover. The lateral single view now reports the focus point's
    depth with the large unknown-depth sigma, which covers the error; the AP view of the
    same moment keeps the bone surface's depth (8 mm under the tip here)."""
    player = ScenarioPlayer(Scenario(detector_px=512, pixel_spacing_mm=0.6, target_level="L1", target_side="left",
                                     seed=0), phantom)
    t_s = (-8.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, _ = tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE)
    focus = player.isocenter_world
    for k, angles in enumerate((AP, LATERAL)):
        image, view = _frame(player, t_s, angles, k)
        (found,) = detect_in_view(image, view, [KWIRE], focus)
        estimate = single_view_estimate(found, view, focus_world=focus, bone=phantom.labels)
        source, rays = backproject(view.K, view.T_cam_from_world, found.tip_uv[None])
        surface, surface_sigma = _bone_depth(phantom.labels, 0.0, source, rays[0],
                                             float(np.linalg.norm(focus - source)))
        surface_error = float(np.linalg.norm(source + surface * rays[0] - tip))
        if angles == LATERAL:
            assert surface_error > 10.0 and surface_error > 3.0 * surface_sigma
            assert np.linalg.norm(estimate.tip_world - source) == pytest.approx(np.linalg.norm(focus - source))
            assert estimate.depth_sigma_mm == DetectionSettings().depth_sigma_mm
        else:
            np.testing.assert_allclose(estimate.tip_world, source + surface * rays[0])
            assert surface_error < 10.0
        assert np.linalg.norm(estimate.tip_world - tip) <= 3.0 * math.hypot(estimate.tip_sigma_mm,
                                                                            estimate.depth_sigma_mm), angles


def test_the_depth_sigma_counts_the_bone_a_tip_can_reach_past_a_thin_lamina():
    """An AP-like ray (from posterior, world -y) through a 5 mm bone slab (a lamina), a
    15 mm gap, then 40 mm of bone (the vertebral body): the depth is the slab's posterior
    surface; its sigma is the RMS distance from that surface of the bone within
    ``REACH_MM`` (60 mm): sqrt((5^3 + 60^3 - 20^3) / 3 / 45) = 39.3 mm for a tip anywhere in
    that bone, not the slab's own 5 / sqrt(3) = 2.9 mm, which a tip 40 mm into the body
    lay far outside."""
    data = np.zeros((101, 101, 101), np.float32)  # [k, j, i], 1 mm voxels, world = index - 50
    data[:, 80:85, :] = 1.0  # y in [29.5, 34.5)
    data[:, 25:65, :] = 1.0  # y in [-25.5, 14.5)
    bone = Volume(data, affine_from_geometry([-50.0, -50.0, -50.0], [1.0, 1.0, 1.0], np.eye(3)), "label")
    source = np.array([0.0, 600.25, 0.0])
    distance, sigma = _bone_depth(bone, 0.5, source, np.array([0.0, -1.0, 0.0]), 600.0)
    assert distance == pytest.approx(600.25 - 34.5, abs=0.5)
    assert sigma == pytest.approx(math.sqrt((5.0 ** 3 + 60.0 ** 3 - 20.0 ** 3) / 3.0 / 45.0), rel=0.03)


def _estimate(tip_world, depth_sigma_mm, n_views=2, **fields) -> InstrumentEstimate:
    return InstrumentEstimate(model=KWIRE, tip_world=np.asarray(tip_world, float),
                              axis_world=np.array([0.0, -1.0, 0.0]), n_views=n_views, score=0.6, tip_sigma_mm=0.3,
                              depth_sigma_mm=depth_sigma_mm, axis_sigma_deg=5.0, detections=(), **fields)


def test_the_most_certain_estimate_unless_two_views_refute_the_anatomy():
    """A single view's anatomy depth (tip docked on the bone surface at y = 0, LPS) takes
    part where it agrees with the two-view estimates, and is the most certain one there;
    two views placing the tip posterior of it (still in the soft tissue) refute it, though
    their sigma is larger: by the distance (30 mm, a combination of the shaft planes: more
    than 3 of both sigmas together), or, for a tip-ray combination of two moments (20 mm),
    because even the deepest tip its travel bound allows (6 mm) lies posterior of that
    surface beyond 3 sigmas of the views' noise; a bound reaching the surface (25 mm)
    does not."""
    single = _estimate([0.0, 0.0, 0.0], 5.0, n_views=1)
    near = _estimate([0.0, 4.0, 0.0], 8.0)
    assert most_certain(single, []) is single
    assert most_certain(single, [near]) is single
    planes = _estimate([0.0, 30.0, 0.0], 6.5)
    assert most_certain(single, [planes]) is planes
    moved_6 = _estimate([0.0, 20.0, 0.0], 6.0, tip_if_moved_world=np.array([0.0, 14.0, 0.0]),
                        depth_sigma_unmoved_mm=1.0)
    assert moved_6.sigma_unmoved_mm == pytest.approx(math.hypot(0.3, 1.0))
    assert most_certain(single, [moved_6]) is moved_6
    moved_25 = replace(moved_6, tip_if_moved_world=np.array([0.0, -5.0, 0.0]))
    assert most_certain(single, [moved_25]) is single
    assert most_certain(single, [moved_25, planes]) is moved_25  # one refutation is enough


def test_biplane_finds_the_kwire_in_3d(phantom):
    player = ScenarioPlayer(Scenario(**SMALL, target_level="L4", target_side="right", seed=4), phantom)
    t_s = (20.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE)
    frames = [_frame(player, t_s, angles, k) for k, angles in enumerate((AP, LATERAL))]
    estimates = detect_instruments([f[0] for f in frames], [f[1] for f in frames], [KWIRE],
                                   focus_world=player.isocenter_world, bone=phantom.labels)
    assert len(estimates) == 1
    (estimate,) = estimates
    assert estimate.n_views == 2 and estimate.model is KWIRE
    assert np.linalg.norm(estimate.tip_world - tip) <= 1.0
    assert math.degrees(math.acos(min(1.0, float(estimate.axis_world @ axis)))) <= 1.0


def test_an_earlier_shot_of_another_orientation_makes_the_pose_3d(phantom):
    """A lateral shot taken when the K-wire was 5 mm deep and an AP frame 20 mm further on:
    the two shaft planes give its line, the AP tip ray its tip, within the biplane targets
    (the depth of one view alone comes from the anatomy); the depth uncertainty drops
    accordingly. Two views of one orientation or of different models do not combine."""
    player = ScenarioPlayer(Scenario(detector_px=512, pixel_spacing_mm=0.6, target_level="L4", target_side="right",
                                     seed=4), phantom)
    then_s, now_s = ((depth + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s for depth in (5.0, 25.0))
    lateral_image, lateral_view = _frame(player, then_s, LATERAL, 1)
    ap_image, ap_view = _frame(player, now_s, AP)
    (lateral,) = detect_in_view(lateral_image, lateral_view, [KWIRE], player.isocenter_world)
    (ap,) = detect_in_view(ap_image, ap_view, [KWIRE], player.isocenter_world)
    tip, axis = tip_and_axis(player.state_at(now_s).T_world_from_tool, KWIRE)
    combined = combine_with_earlier_view(ap, ap_view, lateral, lateral_view)
    assert combined is not None and combined.n_views == 2
    assert np.linalg.norm(combined.tip_world - tip) <= 1.0
    assert _axis_error_deg(combined.axis_world, axis) <= 1.0
    single = single_view_estimate(ap, ap_view, focus_world=player.isocenter_world, bone=phantom.labels)
    assert combined.depth_sigma_mm < 2.0 < single.depth_sigma_mm
    (ap_again,) = detect_in_view(*_frame(player, now_s, AP, 2), [KWIRE], player.isocenter_world)
    assert combine_with_earlier_view(ap, ap_view, ap_again, ap_view) is None
    assert combine_with_earlier_view(ap, ap_view, replace(lateral, model=NEEDLE), lateral_view) is None


NEAR_PLANE = dict(detector_px=512, pixel_spacing_mm=0.6, target_level="L3", target_side="left",
                  instrument_medial_deg=8.0, seed=2000)
"""The demo's K-wire path: its axis lies near the C-arm's rotation plane, so an AP and a
lateral view's shaft planes meet at about 5 deg."""


def _near_plane_detections(player: ScenarioPlayer, depth_mm: float, angles, noise_offset: int = 0):
    t_s = (depth_mm + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    image, view = _frame(player, t_s, angles, noise_offset)
    (found,) = detect_in_view(image, view, [KWIRE], player.isocenter_world)
    return found, view


def test_near_parallel_shaft_planes_are_combined_by_the_tip_rays(phantom):
    """The demo's K-wire at rest, seen AP and lateral: the shaft planes (about 5 deg apart)
    cannot place it and are refused; the two tip rays can (they meet at about 90 deg):
    the tip within 1 mm of the simulator's (the biplane target; the bench's near-plane
    pairs measure 0.17 mm median, 0.48 mm p90 at this detector) and within 3 of the
    reported sigmas, the reported depth sigma a fraction of the single view's (anatomy)."""
    player = ScenarioPlayer(Scenario(**NEAR_PLANE), phantom)
    ap, ap_view = _near_plane_detections(player, -8.0, AP)
    lateral, lateral_view = _near_plane_detections(player, -8.0, LATERAL, 1)
    t_s = (-8.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE)
    assert combine_with_earlier_view(ap, ap_view, lateral, lateral_view) is None
    combined = combine_with_earlier_view(ap, ap_view, lateral, lateral_view, moved_mm=0.0)
    assert combined is not None and combined.n_views == 2
    error_mm = float(np.linalg.norm(combined.tip_world - tip))
    assert error_mm <= 1.0
    assert error_mm <= 3.0 * math.hypot(combined.tip_sigma_mm, combined.depth_sigma_mm)
    assert _axis_error_deg(combined.axis_world, axis) <= 3.0 * combined.axis_sigma_deg
    single = single_view_estimate(ap, ap_view, focus_world=player.isocenter_world, bone=phantom.labels)
    assert combined.depth_sigma_mm < 0.25 * single.depth_sigma_mm


def test_a_wire_that_moved_between_the_shots_is_not_reported_as_a_good_pose(phantom):
    """The demo's K-wire seen lateral, then AP after 6 mm more: the tip rays still nearly
    meet (the travel runs inside both shaft planes), so without a bound on the travel the
    pair is refused; with the AP view of the lateral's moment as ``still_since`` the travel
    it shows bounds it, and the reported depth sigma covers the error (at least a third of
    it) instead of claiming the precision of a wire at rest."""
    player = ScenarioPlayer(Scenario(**NEAR_PLANE), phantom)
    lateral, lateral_view = _near_plane_detections(player, -8.0, LATERAL, 1)
    ap_then, ap_then_view = _near_plane_detections(player, -8.0, AP, 2)
    ap, ap_view = _near_plane_detections(player, -2.0, AP)
    t_s = (-2.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, _ = tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE)
    assert combine_with_earlier_view(ap, ap_view, lateral, lateral_view) is None
    bounded = combine_with_earlier_view(ap, ap_view, lateral, lateral_view, still_since=(ap_then, ap_then_view))
    assert bounded is not None
    error_mm = float(np.linalg.norm(bounded.tip_world - tip))
    assert error_mm > 3.0  # the rays meet where the wire was: it is placed where it was seen laterally
    assert error_mm <= 3.0 * bounded.depth_sigma_mm
    # The true tip lies on the span from the estimate (no travel) to where the whole bound
    # would put it, within 3 sigma of the views' noise.
    start, end = bounded.tip_world, bounded.tip_if_moved_world
    along = float(np.clip((tip - start) @ (end - start) / ((end - start) @ (end - start)), 0.0, 1.0))
    assert np.linalg.norm(start + along * (end - start) - tip) <= 3.0 * bounded.sigma_unmoved_mm
    assert bounded.depth_sigma_unmoved_mm < bounded.depth_sigma_mm
    # At rest since the AP view of the lateral's moment the bound is tighter, though not
    # zero: a wire this close to the AP beam moves little across it as it advances.
    at_rest = combine_with_earlier_view(ap_then, ap_then_view, lateral, lateral_view,
                                        still_since=(ap_then, ap_then_view))
    assert at_rest is not None and at_rest.depth_sigma_mm < 0.5 * bounded.depth_sigma_mm
    then_s = (-8.0 + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    then_tip, _ = tip_and_axis(player.state_at(then_s).T_world_from_tool, KWIRE)
    assert np.linalg.norm(at_rest.tip_world - then_tip) <= 1.0


def test_a_moved_wire_claimed_at_rest_is_refused_where_the_rays_miss(phantom):
    """Where the shaft planes meet at a good angle (L4 right), a wire that advanced 20 mm
    between the lateral and the AP view makes the tip rays miss each other by millimetres:
    claimed at rest (``moved_mm=0``), the tip-ray way is refused and the shaft planes
    (which allow the travel) place it, as without the claim."""
    player = ScenarioPlayer(Scenario(detector_px=512, pixel_spacing_mm=0.6, target_level="L4", target_side="right",
                                     seed=4), phantom)
    lateral, lateral_view = _near_plane_detections(player, 5.0, LATERAL, 1)
    ap, ap_view = _near_plane_detections(player, 25.0, AP)
    planes = combine_with_earlier_view(ap, ap_view, lateral, lateral_view)
    claimed = combine_with_earlier_view(ap, ap_view, lateral, lateral_view, moved_mm=0.0)
    assert planes is not None and claimed is not None
    np.testing.assert_allclose(claimed.tip_world, planes.tip_world)
    assert claimed.depth_sigma_mm == planes.depth_sigma_mm


def _axis_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip(a @ b, -1.0, 1.0))))


@pytest.mark.parametrize("level, side, seed, depth_mm, needle_axis_deg, kwire_views",
                         [("L1", "left", 15, 30.0, 2.0, (2,)), ("L4", "left", 3, 30.0, 2.0, (2,)),
                          ("L4", "right", 33, 5.0, 3.0, (1, 2))])
def test_overlapping_instruments_are_both_found_in_both_views(phantom, level, side, seed, depth_mm,
                                                              needle_axis_deg, kwire_views):
    """A K-wire ``depth_mm`` into one pedicle and a Jamshidi needle 10 mm into the other: in
    the lateral view the needle lies over the K-wire, which shows only beyond the needle's
    tip (30 mm), or runs under the needle's shaft from behind its tip (5 mm: the needle's
    fit absorbs part of it and its subtraction erased it before the guided search fitted
    the two jointly). Found in both views: the tips within 1 mm, the K-wire's axis within
    2 deg, the needle's within ``needle_axis_deg`` (the bench's needle axis error: 1.0 deg
    median, 4.5 deg p90). The K-wire under the needle's shaft (5 mm) is faint in the lateral
    view at an exposure control's dose, with the body beyond the CT imaged: found there or
    not, depending on the noise (``kwire_views``, both seen), it is never matched to the
    needle; placed from the AP view alone it lies in-plane within 1 mm and in depth within
    its uncertainty (3 sigma)."""
    player = ScenarioPlayer(Scenario(detector_px=512, pixel_spacing_mm=0.6, target_level=level, target_side=side,
                                     seed=seed), phantom)
    t_s = (depth_mm + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    other = next(t for t in phantom.plan if t["level"] == level and t["side"] != side)
    T_needle = tool_pose_on_trajectory(*trajectory_endpoints(other), 10.0, NEEDLE)
    truth = {"kwire": tip_and_axis(player.state_at(t_s).T_world_from_tool, KWIRE),
             "jamshidi": tip_and_axis(T_needle, NEEDLE)}
    frames = [_frame(player, t_s, angles, k, extra=((NEEDLE, T_needle),)) for k, angles in enumerate((AP, LATERAL))]
    estimates = detect_instruments([f[0] for f in frames], [f[1] for f in frames], [KWIRE, NEEDLE],
                                   focus_world=player.isocenter_world, bone=phantom.labels)
    for name, (tip, axis) in truth.items():
        (estimate,) = [e for e in estimates if e.model.name == name]
        if name == "kwire":
            assert estimate.n_views in kwire_views
        if name == "kwire" and estimate.n_views == 1:
            ap_view = frames[0][1]
            assert _in_plane_mm(ap_view, project(ap_view.P, estimate.tip_world[None])[0], tip) <= 1.0
            assert np.linalg.norm(estimate.tip_world - tip) <= 3.0 * estimate.depth_sigma_mm
            continue
        assert estimate.n_views == 2, name
        assert np.linalg.norm(estimate.tip_world - tip) <= 1.0, name
        assert _axis_error_deg(estimate.axis_world, axis) <= (2.0 if name == "kwire" else needle_axis_deg), name


def test_contrast_step_splits_a_ridge_between_two_levels():
    """A ridge profile at 1 for 30 samples then 3 for 20 steps at sample 30, the second
    part the stronger; with the levels closer than the ratio, or too short a profile, no step."""
    rng = np.random.default_rng(0)
    profile = np.concatenate([np.full(30, 1.0), np.full(20, 3.0)]) + rng.normal(0.0, 0.05, 50)
    assert _contrast_step(profile, 10) == (30, False)
    assert _contrast_step(profile[::-1], 10) == (20, True)
    assert _contrast_step(np.concatenate([np.full(30, 1.0), np.full(20, 1.3)]), 10) is None
    assert _contrast_step(profile, 26) is None  # two parts of 26 do not fit in 50 samples


def test_instrument_image_removes_the_instrument():
    """Subtracting ``instrument_image`` of a detection at an instrument's true pose (gain
    1) from the simulator's line integral of it (an independent rendering) leaves little
    of it, and the patch covers where the instrument is."""
    view = carm_view(detector_size_px=(128, 128), pixel_spacing_mm=(1.2, 1.2))
    T_cam_from_tool = make_rigid(rotation_about_axis(np.array([1.0, 0.2, 0.1]), 75.0), [4.0, -2.0, 600.0])
    image = instrument_line_integral(view, T_cam_from_tool, NEEDLE).astype(np.float32)
    tip_cam = T_cam_from_tool[:3, :3] @ NEEDLE.tip_offset_tool + T_cam_from_tool[:3, 3]
    axis_cam = T_cam_from_tool[:3, :3] @ NEEDLE.axis_tool
    tip_uv = (view.K @ tip_cam)[:2] / tip_cam[2]
    end = tip_cam + 50.0 * axis_cam
    detection = ViewDetection(model=NEEDLE, tip_uv=tip_uv, direction_uv=tip_uv - (view.K @ end)[:2] / end[2],
                              tip_cam=tip_cam, axis_cam=axis_cam, gradient_correlation=1.0, gain=1.0,
                              tip_sigma_px=0.1)
    rows, cols, patch = instrument_image(view, detection, settings=DetectionSettings(blur_sigma_px=0.0))
    left = image.copy()
    left[rows, cols] -= patch
    assert image.sum() > 100.0
    assert np.abs(left).sum() < 0.08 * image.sum()


def test_instrument_free_frames_yield_no_instrument(phantom):
    player = ScenarioPlayer(Scenario(**SMALL, instrument=None, target_level="L2", seed=5), phantom)
    for angles in (AP, LATERAL, (30.0, 10.0)):
        image, view = _frame(player, 3.0, angles)
        assert detect_in_view(image, view, [KWIRE, NEEDLE], player.isocenter_world) == []


def test_bad_input_is_refused(phantom):
    view = carm_view(detector_size_px=(64, 64), pixel_spacing_mm=(4.8, 4.8))
    with pytest.raises(DetectionError, match="does not match its view"):
        detect_in_view(np.zeros((32, 64), np.float32), view, [KWIRE], np.zeros(3))
    with pytest.raises(DetectionError, match="InstrumentModel"):
        detect_in_view(np.zeros((64, 64), np.float32), view, [], np.zeros(3))
    with pytest.raises(DetectionError, match="one image per view"):
        detect_instruments([np.zeros((64, 64), np.float32)], [], [KWIRE], focus_world=np.zeros(3))


def test_mirrored_about_ray_keeps_the_image_and_reverses_the_tilt_out_of_it():
    """The mirror pose of one view: the same tip and the same image of the shaft (its far
    end projects in the same image direction), the tilt along the viewing ray reversed (a
    shaft 15 deg off the beam turns by 150 deg); mirroring twice gives the estimate back."""
    from guidance.core.geometry import invert_rigid, project

    view = carm_view(lao_deg=10.0, isocenter_world=np.zeros(3), patient_position="prone",
                     detector_size_px=(256, 256), pixel_spacing_mm=(1.2, 1.2))
    tip = np.array([10.0, -20.0, 5.0])
    ray = tip - invert_rigid(view.T_cam_from_world)[:3, 3]
    ray /= np.linalg.norm(ray)
    across = np.cross(ray, [0.0, 0.0, 1.0])
    across /= np.linalg.norm(across)
    axis = math.cos(math.radians(15.0)) * ray + math.sin(math.radians(15.0)) * across
    estimate = InstrumentEstimate(model=get_instrument("kwire"), tip_world=tip, axis_world=axis, n_views=1,
                                  score=0.9, tip_sigma_mm=0.2, depth_sigma_mm=20.0, axis_sigma_deg=90.0,
                                  detections=())
    mirror = mirrored_about_ray(estimate, view)
    np.testing.assert_array_equal(mirror.tip_world, tip)
    assert math.degrees(math.acos(float(mirror.axis_world @ axis))) == pytest.approx(150.0, abs=1e-9)

    def image_direction(e):
        uv = project(view.P, np.array([e.tip_world, e.tip_world - 50.0 * e.axis_world]))
        return (uv[1] - uv[0]) / np.linalg.norm(uv[1] - uv[0])

    np.testing.assert_allclose(image_direction(mirror), image_direction(estimate), atol=1e-9)
    np.testing.assert_allclose(mirrored_about_ray(mirror, view).axis_world, axis, atol=1e-12)
