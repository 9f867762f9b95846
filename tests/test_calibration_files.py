"""The guidance.calibration/1 file: round trips, validation, matching, application,
and the reports drawn from it."""

import json
from dataclasses import replace

import numpy as np
import pytest

from calibration.carm import CarmAngleEntry, CarmAngleTable, interpolate_view, sagging_carm_view
from calibration.distortion import DistortionModel
from calibration.files import (
    CALIBRATION_SCHEMA,
    Calibration,
    CalibrationError,
    apply_carm_calibration,
    calibration_to_dict,
    carm_angle_table,
    carm_calibration,
    check_matches,
    distortion_calibration,
    distortion_model,
    pivot_calibration_record,
    read_calibration,
    write_calibration,
)
from calibration.pivot import PivotResult
from calibration.report import calibration_summary, render_pivot, render_residuals, write_png
from guidance.core.views import carm_view

K = carm_view(source_to_detector_mm=1010.0, principal_point_px=(258.0, 251.0)).K
T = carm_view().T_cam_from_world


def _single(device_id="carm-OR3", size=(512, 512)):
    return Calibration(kind="carm", device_id=device_id, method="test",
                       parameters={"pixel_spacing_mm": [0.6, 0.6], "K": K.tolist(),
                                   "T_cam_from_phantom": T.tolist()},
                       residuals={"rms_px": 0.05}, image_size=size,
                       date="2024-05-02T10:31:00+00:00")


def _table():
    entries = []
    for lao in (-20.0, 0.0, 20.0):
        for cran in (0.0, 10.0):
            v = sagging_carm_view(lao, cran)
            entries.append(CarmAngleEntry(lao, cran, v.K, v.T_cam_from_world, 0.04))
    nominal = {"source_to_detector_mm": 1000.0, "source_to_isocenter_mm": 600.0,
               "isocenter_world": [0.0, 0.0, 0.0], "patient_position": "supine"}
    return CarmAngleTable(tuple(entries), (512, 512), (0.6, 0.6), nominal)


def _distortion_model():
    fwd = np.zeros((2, 10))
    fwd[0, 6], fwd[1, 9] = -1.5, -1.5
    inv = -fwd
    return DistortionModel((512, 512), 3, (255.5, 255.5), 256.0, fwd, inv)


def _pivot():
    return PivotResult(np.array([1.0, 2.0, -160.0]), np.array([40.0, -60.0, -1300.0]),
                       np.zeros((5, 3)), 0.8, "linear")


@pytest.mark.parametrize("make", [
    _single,
    lambda: carm_calibration(device_id="carm-OR3", pixel_spacing_mm=(0.6, 0.6), table=_table()),
    lambda: distortion_calibration(_distortion_model(), device_id="ii-1",
                                   residuals={"heldout_rms_px": 0.04}),
    lambda: pivot_calibration_record(_pivot(), device_id="pointer-7", n_poses=5),
], ids=["carm", "carm-table", "distortion", "pivot"])
def test_round_trip(make, tmp_path):
    cal = make()
    path = write_calibration(cal, tmp_path / "c.calibration.json")
    back = read_calibration(path)
    assert calibration_to_dict(back) == calibration_to_dict(cal)
    assert json.loads(path.read_text())["schema"] == CALIBRATION_SCHEMA


def test_typed_views_of_the_parameters():
    table = carm_angle_table(carm_calibration(device_id="c", pixel_spacing_mm=(0.6, 0.6),
                                              table=_table()))
    assert table.lao_values == [-20.0, 0.0, 20.0] and table.cranial_values == [0.0, 10.0]
    model = distortion_model(distortion_calibration(_distortion_model(), device_id="ii"))
    np.testing.assert_allclose(model.forward, _distortion_model().forward)
    with pytest.raises(CalibrationError, match="expected a distortion calibration"):
        distortion_model(_single())


def test_mismatched_frames_or_device_are_named():
    cal = _single(device_id="X", size=(1024, 1024))
    check_matches(cal, image_size=(1024, 1024), device_id="X")
    with pytest.raises(CalibrationError) as err:
        check_matches(cal, image_size=(512, 512), device_id="Y")
    assert str(err.value) == ("calibration is for 1024x1024 frames from device X, "
                              "got 512x512 from device Y")
    with pytest.raises(CalibrationError, match="got 1024x1024 from device Z"):
        check_matches(cal, device_id="Z")
    pivot = pivot_calibration_record(_pivot(), device_id="pointer-7", n_poses=5)
    with pytest.raises(CalibrationError, match="is for device pointer-7, got device pointer-8"):
        check_matches(pivot, device_id="pointer-8")


def _edit(tmp_path, change):
    d = calibration_to_dict(_single())
    change(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(kind="lens"), "unknown calibration kind 'lens'"),
    (lambda d: d.update(schema="guidance.calibration/2"), "unsupported calibration schema"),
    (lambda d: d.pop("device_id"), "'device_id' must be a non-empty string"),
    (lambda d: d.update(date="yesterday"), "ISO 8601"),
    (lambda d: d.pop("image_size"), "needs 'image_size'"),
    (lambda d: d.update(image_size=[512.5, 512]), "needs 'image_size'"),
    (lambda d: d["parameters"].update(K=[[1, 0], [0, 1]]), r"parameters.K must be a finite 3x3"),
    (lambda d: d["parameters"].pop("K"), r"parameters.K must be"),
    (lambda d: d["parameters"].pop("pixel_spacing_mm"), "pixel_spacing_mm"),
    (lambda d: d["parameters"]["T_cam_from_phantom"][0].__setitem__(0, 2.0),
     "not a proper rotation"),
    (lambda d: d.update(residuals={"rms_px": "small"}), "'residuals' must map names"),
    (lambda d: d.update(parameters=[]), "'parameters' must be an object"),
])
def test_malformed_files_give_clear_errors(tmp_path, change, message):
    path = _edit(tmp_path, change)
    with pytest.raises(CalibrationError, match=message) as err:
        read_calibration(path)
    assert str(path) in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_calibration(tmp_path / "none.json")
    path = tmp_path / "broken.json"
    path.write_text('{"schema": ')
    with pytest.raises(CalibrationError, match="not valid JSON"):
        read_calibration(path)
    d = calibration_to_dict(distortion_calibration(_distortion_model(), device_id="ii"))
    d["parameters"]["forward"] = [[0.0] * 3, [0.0] * 3]
    path.write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match="'forward' must be a finite 2 x 10"):
        read_calibration(path)
    d["parameters"]["model"] = "thin-plate"
    path.write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match="unknown distortion model 'thin-plate'"):
        read_calibration(path)


def test_apply_single_orientation():
    view = apply_carm_calibration(_single())
    np.testing.assert_allclose(view.K, K)
    np.testing.assert_allclose(view.T_cam_from_world, T)
    assert view.source_to_detector_mm == pytest.approx(1010.0)
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    moved = apply_carm_calibration(_single(), T_phantom_from_world=shifted)
    np.testing.assert_allclose(moved.T_cam_from_world, T @ shifted)
    nominal = carm_view(lao_deg=30.0, intensity="raw", I0=4000.0)
    kept = apply_carm_calibration(_single(), nominal)
    np.testing.assert_allclose(kept.K, K)
    np.testing.assert_allclose(kept.T_cam_from_world, nominal.T_cam_from_world)
    assert kept.intensity == "raw"
    with pytest.raises(CalibrationError, match="512x512 frames from device carm-OR3, got 256x256"):
        apply_carm_calibration(_single(), nominal.downsampled(2))
    with pytest.raises(CalibrationError, match="no angle table"):
        apply_carm_calibration(_single(), lao_deg=10.0, cranial_deg=0.0)


def test_apply_angle_table():
    cal = carm_calibration(device_id="carm-OR3", pixel_spacing_mm=(0.6, 0.6), table=_table())
    view = apply_carm_calibration(cal, lao_deg=20.0, cranial_deg=10.0)
    truth = sagging_carm_view(20.0, 10.0)
    np.testing.assert_allclose(view.K, truth.K, atol=1e-9)
    np.testing.assert_allclose(view.T_cam_from_world, truth.T_cam_from_world, atol=1e-9)
    # A view carrying its angles gets the K interpolated there and keeps its pose.
    nominal = replace(carm_view(lao_deg=5.0, cranial_deg=5.0),
                      extra={"lao_deg": 5.0, "cranial_deg": 5.0})
    between = apply_carm_calibration(cal, nominal)
    np.testing.assert_allclose(between.K, interpolate_view(carm_angle_table(cal), 5.0, 5.0).K)
    np.testing.assert_allclose(between.T_cam_from_world, nominal.T_cam_from_world)
    with pytest.raises(CalibrationError, match="give lao_deg and cranial_deg"):
        apply_carm_calibration(cal)
    with pytest.raises(CalibrationError, match="cranial 20 deg is outside"):
        apply_carm_calibration(cal, lao_deg=0.0, cranial_deg=20.0)


def test_summary_and_report_pictures(tmp_path):
    text = calibration_summary(_single())
    assert "SDD 1010.0 mm" in text and "principal point (258.0, 251.0) px" in text
    assert "rms_px 0.05" in text and "\n" not in text
    pivot_text = calibration_summary(pivot_calibration_record(_pivot(), device_id="p",
                                                              n_poses=5))
    assert "length 160.02 mm" in pivot_text
    table_text = calibration_summary(carm_calibration(device_id="c", pixel_spacing_mm=(0.6, 0.6),
                                                      table=_table()))
    assert "angle table of 6 orientations, LAO -20..20 deg" in table_text
    image = np.random.default_rng(0).uniform(0, 4000, (64, 80))
    uv = np.array([[10.0, 12.0], [40.0, 30.0]])
    pic = render_residuals(image, uv, np.array([[0.1, 0.0], [0.0, -0.2]]),
                           rejected_uv=np.array([[60.0, 50.0]]), zoom=2.0)
    assert pic.shape == (128, 160, 3) and pic.dtype == np.uint8
    assert write_png(tmp_path / "r.png", pic).stat().st_size > 0
    assert render_pivot(np.random.default_rng(1).normal(0, 1, (30, 3))).shape == (600, 1200, 3)
