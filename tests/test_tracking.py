"""Tracking updates: started from the previous update's Jacobian (Broyden updates) they
follow the same poses as finite differences with a fraction of the DRRs, and multi-shot
tracking reuses a Jacobian only for the same view geometry and settings."""

from dataclasses import replace

import numpy as np
import pytest

from guidance.core.geometry import invert_rigid, make_rigid, transform_points
from guidance.core.images import preprocess
from guidance.live.shots import Shot, ShotRegistrar
from guidance.registration.register import Registrator, RegistrationSettings
from guidance.registration.tracking import TrackingSettings, track
from sim.scenario import Scenario, ScenarioPlayer

S = 1_000_000_000


@pytest.fixture(scope="module")
def player(phantom):
    """AP fluoroscopy of a fast, deep breath (6 mm in 2 s: up to 1.2 mm between frames),
    the patient placed exactly (tracking starts from the truth of the first frame)."""
    scenario = Scenario(duration_s=1.0, breathing_amplitude_mm=6.0, breathing_period_s=2.0,
                        initial_misalignment_mm=0.0, initial_misalignment_deg=0.0, instrument=None, seed=4)
    return ScenarioPlayer(scenario, phantom)


@pytest.fixture(scope="module")
def fluoro(player):
    return [player.frame_at(k / 15) for k in range(7)]


def in_plane_error_mm(T_cam_from_world_est, frame, point):
    """Error (mm) across the beam of the frame's true camera, at a world point."""
    d = transform_points(T_cam_from_world_est, point) - transform_points(frame.T_cam_from_world, point)
    return float(np.linalg.norm(np.ravel(d)[:2]))


def test_broyden_updates_follow_the_finite_difference_poses_with_fewer_drrs(phantom, fluoro):
    """With finite-difference Jacobians (``analytic_jacobian=False``, where the previous
    update's Jacobian saves the most renders)."""
    registrator = Registrator(phantom.ct, labels=phantom.labels, settings=RegistrationSettings(analytic_jacobian=False))
    centre = registrator.centre(None)
    images = [preprocess(f.pixels, f.view) for f in fluoro]
    fd_settings = TrackingSettings(reuse_jacobian=False)
    T_fd = T_broyden = fluoro[0].T_world_corrected_from_world
    jacobian = None
    for n, (frame, image) in enumerate(zip(fluoro[1:], images[1:]), start=1):
        fd = track(registrator, [image], [frame.view], T_fd, settings=fd_settings)
        broyden = track(registrator, [image], [frame.view], T_broyden, jacobian=jacobian)
        assert fd.ok and broyden.ok, (fd.reason, broyden.reason)
        T_fd, T_broyden, jacobian = fd.T_world_corrected_from_world, broyden.T_world_corrected_from_world, \
            broyden.jacobian
        errors = [in_plane_error_mm(r.views[0].T_cam_from_world, frame, centre) for r in (fd, broyden)]
        assert max(errors) < 0.5, (n, errors)
        apart = in_plane_error_mm(broyden.views[0].T_cam_from_world, replace(
            frame, T_cam_from_world=fd.views[0].T_cam_from_world), centre)
        assert apart < 0.3, (n, apart)
        assert fd.evaluations >= 8  # a finite-difference Jacobian (6) and a step, at least
        if n > 1:  # from the second update on, the previous Jacobian is the start
            assert broyden.evaluations <= 4, (n, broyden.evaluations, broyden.stop_reasons)
            assert "Broyden" in broyden.stop_reasons[-1]
    assert jacobian.matrix.shape[1] == 6 and len(jacobian.roi_masks) == 1
    # A start 6 mm from where the ROI was placed (more than half its 10 mm margin): the ROI
    # is placed anew and the Jacobian, whose rows belong to the old one, is not used.
    shifted = make_rigid(np.eye(3), [6.0, 0.0, 0.0]) @ T_broyden
    far = track(registrator, [images[-1]], [fluoro[-1].view], shifted, jacobian=jacobian)
    assert far.evaluations >= 8 and "Broyden" not in far.stop_reasons[-1]


def test_multi_shot_tracking_reuses_a_jacobian_only_for_the_same_view(registrator, player, fluoro):
    """Same view: Broyden updates of the previous Jacobian; a C-arm turned by 5 deg (the
    same orientation for the shot book) or other tracking settings: fresh Jacobians again."""
    registrar = ShotRegistrar(registrator)

    def shot(frame):
        return Shot(frame_id=frame.frame_id, acquired_ns=int(frame.t_s * S), image=preprocess(frame.pixels, frame.view),
                    view=frame.view)

    previous = track(registrator, [shot(fluoro[0]).image], [fluoro[0].view], fluoro[0].T_world_corrected_from_world)
    broyden = []
    for frame in fluoro[1:3]:
        outcome = registrar.register(shot(frame), previous, None)
        assert outcome.mode == "tracking" and outcome.result.ok
        previous = outcome.result
        broyden.append("Broyden" in outcome.result.stop_reasons[-1])
    state = player.state_at(fluoro[3].t_s)
    turned = player.nominal_view(5.0, 0.0)
    frame = player.render(replace(state, view=turned, T_cam_from_world=turned.T_cam_from_world
                                  @ invert_rigid(state.T_world_corrected_from_world)))
    outcome = registrar.register(shot(frame), previous, None)
    assert outcome.mode == "tracking" and outcome.result.ok
    broyden.append("Broyden" in outcome.result.stop_reasons[-1])
    registrar.tracking = replace(registrar.tracking, motion_sd=(1.0,) * 6)
    broyden.append("Broyden" in registrar.register(shot(frame), outcome.result, None).result.stop_reasons[-1])
    assert broyden == [False, True, False, False]
