"""Calibrations in the live path: the C-arm angle table's K per orientation moves the
registered pose onto the truth, pivot calibrations move the instrument tip, frames and
instruments that do not match their calibration are refused with the reason."""

import time

import numpy as np
import pytest

from calibration.carm import CarmAngleEntry, CarmAngleTable
from calibration.errors import CalibrationError
from calibration.files import Calibration, carm_calibration
from guidance.core.geometry import intrinsics, invert_rigid, make_rigid, rotation_about_axis, transform_points
from guidance.core.instrument_models import INSTRUMENTS
from guidance.core.views import carm_view
from guidance.live.calibrations import calibrated_view, sort_calibrations
from guidance.live.pipeline import Pipeline, PipelineSettings
from guidance.live.wire import Frame, TrackerSample
from sim.xray import XrayParams, simulate_xray

SIZE, PITCH, SDD, SID = 128, 2.4, 1000.0, 600.0
TRUE_SDD = {0.0: 1040.0, 90.0: 980.0}
TRUE_PP = {0.0: (70.0, 58.0), 90.0: (60.0, 66.0)}
"""The C-arm really has these SDD (mm) and principal points (px) at LAO 0 and 90."""


def true_K(lao):
    return intrinsics(TRUE_SDD[lao], (PITCH, PITCH), TRUE_PP[lao])


def nominal(lao, centre, angles=True):
    view = carm_view(lao_deg=lao, isocenter_world=centre, patient_position="prone", detector_size_px=(SIZE, SIZE),
                     pixel_spacing_mm=(PITCH, PITCH), source_to_detector_mm=SDD, source_to_isocenter_mm=SID)
    view = view.with_intensity("raw", 4095.0)
    if angles:
        view.extra.update({"lao_deg": lao, "cranial_deg": 0.0})
    return view


def carm_cal(centre):
    entries = tuple(CarmAngleEntry(lao, 0.0, true_K(lao), nominal(lao, centre).T_cam_from_world) for lao in (0.0, 90.0))
    nominal_model = {"source_to_detector_mm": SDD, "source_to_isocenter_mm": SID,
                     "isocenter_world": [float(x) for x in centre], "patient_position": "prone"}
    table = CarmAngleTable(entries, (SIZE, SIZE), (PITCH, PITCH), nominal_model)
    return carm_calibration(device_id="carm-1", pixel_spacing_mm=(PITCH, PITCH), table=table)


def test_the_angle_table_gives_each_orientation_its_K(registrator):
    centre = registrator.centre(None)
    cal = carm_cal(centre)
    for lao in (0.0, 90.0):
        view = calibrated_view(cal, nominal(lao, centre), "carm-1")
        np.testing.assert_allclose(view.K, true_K(lao), atol=1e-9)
        np.testing.assert_allclose(view.T_cam_from_world, nominal(lao, centre).T_cam_from_world)


def in_plane_error_mm(T_est, T_true, point):
    d = transform_points(T_est, point) - transform_points(T_true, point)
    return float(np.linalg.norm(d[:2]))


def test_carm_calibration_moves_the_registered_pose_onto_the_truth(registrator, phantom):
    """The image comes from a C-arm whose K differs from the nominal one: with the
    calibration the registered pose is right across the beam, without it the pose
    absorbs the principal point error."""
    centre = registrator.centre(None)
    view = nominal(0.0, centre)
    R = rotation_about_axis([0.2, 1.0, 0.3], 2.0)
    M = make_rigid(R, centre + np.array([3.0, -2.0, 4.0]) - R @ centre)
    actual = view.with_pose(view.T_cam_from_world @ M)
    actual = type(actual)(K=true_K(0.0), T_cam_from_world=actual.T_cam_from_world, image_size=actual.image_size)
    image, _ = simulate_xray(phantom.ct, actual, XrayParams(seed=1), intensity="raw")
    frame = Frame(frame_id=1, acquired_ns=time.time_ns(), view=view, pixels=image, source="carm-1")
    errors = {}
    for name, carm in (("calibrated", carm_cal(centre)), ("nominal", None)):
        (pose,) = Pipeline(registrator, settings=PipelineSettings(carm=carm)).on_frame(frame)
        assert pose.status == "ok", pose.reason
        errors[name] = in_plane_error_mm(pose.views[0]["T_cam_from_world"], actual.T_cam_from_world, centre)
    assert errors["calibrated"] < 1.0, errors
    assert errors["nominal"] > errors["calibrated"] + 3.0, errors


def test_frames_that_do_not_match_the_carm_calibration_are_refused(registrator, phantom):
    centre = registrator.centre(None)
    pipeline = Pipeline(registrator, settings=PipelineSettings(carm=carm_cal(centre)))
    pixels = np.full((SIZE, SIZE), 2000, np.uint16)
    cases = {
        "device": Frame(frame_id=1, acquired_ns=1, view=nominal(0.0, centre), pixels=pixels, source="carm-2"),
        "angle table": Frame(frame_id=2, acquired_ns=1, view=nominal(0.0, centre, angles=False), pixels=pixels,
                             source="carm-1"),
        "outside the calibrated range": Frame(frame_id=3, acquired_ns=1, view=nominal(120.0, centre), pixels=pixels,
                                              source="carm-1"),
    }
    for reason, frame in cases.items():
        (pose,) = pipeline.on_frame(frame)
        assert pose.status == "failed" and reason in pose.reason, (reason, pose.reason)
    assert pipeline.stats.frames_rejected == 3


def pivot(tool_id, tip_offset_mm):
    return Calibration(kind="pivot", device_id=tool_id, method="pivot linear least squares",
                       parameters={"tip_offset_mm": list(tip_offset_mm), "pivot_point_mm": [0.0, 0.0, 0.0]},
                       residuals={"rms_mm": 0.2})


def instrument_tips(pipeline):
    """Tip (world) of a kwire held at a known pose, with the CT registered to the reference array."""
    T_world_from_reference = make_rigid(rotation_about_axis([0, 0, 1], 15.0), [5.0, 80.0, 20.0])
    T_tracker_from_world = make_rigid(rotation_about_axis([1, 0, 0], 70.0), [100.0, -300.0, 1400.0])
    T_world_from_tool = make_rigid(rotation_about_axis([1, 1, 0], 40.0), [10.0, -60.0, 30.0])
    pipeline.T_reference_from_world = invert_rigid(T_world_from_reference)
    pipeline.on_tracker(TrackerSample(tool_id="reference", T_tracker_from_tool=T_tracker_from_world
                                      @ T_world_from_reference, quality=0.1, acquired_ns=1))
    states = pipeline.on_tracker(TrackerSample(tool_id="kwire", T_tracker_from_tool=T_tracker_from_world
                                               @ T_world_from_tool, quality=0.1, acquired_ns=1))
    return states, T_world_from_tool


def test_pivot_calibration_moves_the_instrument_tip(registrator):
    tip_offset = np.array([0.6, -0.4, -147.5])  # the nominal kwire tip is at (0, 0, -150)
    calibrated = Pipeline(registrator, settings=PipelineSettings(pivots={"kwire": pivot("kwire", tip_offset)}))
    (state,), T_world_from_tool = instrument_tips(calibrated)
    np.testing.assert_allclose(state.tip_world, transform_points(T_world_from_tool, tip_offset), atol=1e-9)
    (state,), _ = instrument_tips(Pipeline(registrator))
    np.testing.assert_allclose(state.tip_world, transform_points(T_world_from_tool, INSTRUMENTS["kwire"]
                                                                 .tip_offset_tool), atol=1e-9)


def test_an_instrument_that_does_not_match_its_pivot_calibration_is_refused(registrator, caplog):
    pipeline = Pipeline(registrator, settings=PipelineSettings(pivots={"kwire": pivot("kwire", [0.0, 0.0, -60.0])}))
    states, _ = instrument_tips(pipeline)
    assert states == [] and pipeline.stats.instruments_refused == 1
    assert "pivot calibration puts the tip 90 mm from the kwire model's" in caplog.text
    with pytest.raises(CalibrationError, match="no known instrument"):
        Pipeline(registrator, settings=PipelineSettings(pivots={"drill": pivot("drill", [0.0, 0.0, -60.0])}))


def test_calibrations_are_sorted_by_kind():
    centre = np.zeros(3)
    cals = sort_calibrations([carm_cal(centre), pivot("kwire", [0, 0, -150.0]), pivot("jamshidi", [0, 0, -120.0])])
    assert cals.carm is not None and cals.distortion is None and set(cals.pivots) == {"kwire", "jamshidi"}
    with pytest.raises(CalibrationError, match="two C-arm calibrations"):
        sort_calibrations([carm_cal(centre), carm_cal(centre)])
