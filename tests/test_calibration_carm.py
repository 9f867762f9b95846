"""C-arm calibration with the BB phantom: simulated exposures with known geometry."""

import numpy as np
import pytest

from calibration.carm import (
    CarmAngleEntry,
    CarmAngleTable,
    build_angle_table,
    calibrate_carm_image,
    detect_bbs,
    dlt_projection,
    interpolate_view,
    sagging_carm_view,
)
from calibration.cli import calibrate_carm
from calibration.errors import CalibrationError
from calibration.files import apply_carm_calibration, read_calibration
from calibration.phantom_bb import (
    nominal_T_cam_from_phantom,
    phantom_from_dict,
    phantom_to_dict,
    read_phantom,
    simulate_bb_image,
    two_plane_phantom,
    write_phantom,
)
from guidance.core.geometry import (
    decompose_projection,
    invert_rigid,
    make_rigid,
    project,
    rotation_about_axis,
)
from guidance.core.views import carm_view

I0 = 10000.0


@pytest.fixture(scope="module")
def phantom():
    return two_plane_phantom()


@pytest.fixture(scope="module")
def truth():
    """An off-nominal C-arm (SDD 1012 mm, principal point off centre) and a phantom
    placed 4 mm / 1 degree away from its nominal pose."""
    view = carm_view(source_to_detector_mm=1012.0, principal_point_px=(259.3, 252.1),
                     intensity="raw", I0=I0)
    placement = make_rigid(rotation_about_axis([1.0, 2.0, 0.5], 1.0), [3.0, -2.5, 4.0])
    return view, nominal_T_cam_from_phantom() @ placement


@pytest.fixture(scope="module")
def nominal():
    return carm_view(intensity="raw", I0=I0)


def _errors(result, view):
    sdd = result.source_to_detector_mm(view.pixel_spacing_mm)
    return (abs(sdd - view.source_to_detector_mm) / view.source_to_detector_mm,
            float(np.linalg.norm(result.K[:2, 2] - view.K[:2, 2])))


def test_phantom_design_and_json_round_trip(phantom, tmp_path):
    assert len(phantom) == 81 + 64
    assert list(phantom.size_classes_mm) == [2.5, 3.5]
    path = tmp_path / "phantom.json"
    write_phantom(phantom, path)
    back = read_phantom(path)
    np.testing.assert_allclose(back.positions_mm, phantom.positions_mm)
    np.testing.assert_allclose(back.diameters_mm, phantom.diameters_mm)
    assert back.plates == phantom.plates
    bad = phantom_to_dict(phantom)
    bad["schema"] = "guidance.bbphantom/0"
    with pytest.raises(CalibrationError, match="schema"):
        phantom_from_dict(bad)


def test_detection_is_subpixel(phantom, truth):
    view, T = truth
    sim = simulate_bb_image(phantom, view, T, seed=1)
    blobs = detect_bbs(sim.raw, I0=sim.I0)
    d = np.linalg.norm(sim.true_uv[:, None, :] - blobs.uv[None, :, :], axis=2).min(axis=1)
    assert (d < 0.5).sum() >= 0.95 * len(phantom)
    assert np.sqrt(np.mean(d[d < 0.5] ** 2)) < 0.08


@pytest.mark.parametrize("missing, spurious", [(0.0, 0.0), (0.1, 0.05)])
def test_recovers_known_geometry(phantom, truth, nominal, missing, spurious):
    view, T = truth
    sim = simulate_bb_image(phantom, view, T, seed=2, missing_fraction=missing,
                            spurious_fraction=spurious)
    result = calibrate_carm_image(sim.raw, phantom, nominal, nominal_T_cam_from_phantom())
    sdd_err, pp_err = _errors(result, view)
    assert sdd_err < 0.005
    assert pp_err < 1.0
    assert result.rms_px < 0.3
    # Every correspondence used is right, and nearly every visible BB is used.
    np.testing.assert_array_less(np.linalg.norm(sim.true_uv[result.bb_index] - result.uv,
                                                axis=1), 0.5)
    assert sim.visible[result.bb_index].all()
    assert len(result.bb_index) >= 0.85 * sim.visible.sum()
    # The projection matrix maps the phantom where the true one does.
    np.testing.assert_allclose(project(result.P, phantom.positions_mm), sim.true_uv, atol=0.5)


def test_anatomy_background(phantom, truth, nominal):
    view, T = truth
    sim = simulate_bb_image(phantom, view, T, seed=3, missing_fraction=0.1,
                            spurious_fraction=0.05, background="anatomy")
    result = calibrate_carm_image(sim.raw, phantom, nominal, nominal_T_cam_from_phantom())
    sdd_err, pp_err = _errors(result, view)
    assert sdd_err < 0.005 and pp_err < 1.5 and result.rms_px < 0.3


def test_refuses_an_image_without_the_phantom(phantom, nominal):
    rng = np.random.default_rng(0)
    blank = rng.poisson(I0, nominal.shape).astype(np.float32)
    with pytest.raises(CalibrationError, match="too few BBs"):
        calibrate_carm_image(blank, phantom, nominal, nominal_T_cam_from_phantom())


def test_normalised_dlt_is_exact_without_noise(phantom, truth):
    view, T = truth
    P = view.K @ T[:3]
    K, T_est = decompose_projection(dlt_projection(phantom.positions_mm,
                                                   project(P, phantom.positions_mm)))
    np.testing.assert_allclose(K, view.K, atol=1e-6 * view.K[0, 0])
    np.testing.assert_allclose(T_est, T, atol=1e-6 * 600)
    plate = phantom.positions_mm[:81]
    with pytest.raises(CalibrationError, match="coplanar"):
        dlt_projection(plate, project(P, plate))


@pytest.fixture(scope="module")
def angle_table(phantom):
    """Calibrations at LAO 0/20 x cranial 0/10 of a sagging C-arm, phantom fixed on the
    table at the isocentre."""
    T_world_from_phantom = invert_rigid(carm_view().T_cam_from_world) @ \
        nominal_T_cam_from_phantom()
    results = []
    for k, (lao, cran) in enumerate([(0.0, 0.0), (0.0, 10.0), (20.0, 0.0), (20.0, 10.0)]):
        view = sagging_carm_view(lao, cran, intensity="raw", I0=I0)
        sim = simulate_bb_image(phantom, view, view.T_cam_from_world @ T_world_from_phantom,
                                seed=10 + k, missing_fraction=0.1, spurious_fraction=0.05)
        nom = carm_view(lao_deg=lao, cranial_deg=cran, intensity="raw", I0=I0)
        results.append((lao, cran, calibrate_carm_image(
            sim.raw, phantom, nom, nom.T_cam_from_world @ T_world_from_phantom)))
    return build_angle_table(results, pixel_spacing_mm=(0.6, 0.6), source_to_isocenter_mm=600.0,
                             T_world_from_phantom=T_world_from_phantom)


def test_angle_table_interpolates_between_orientations(angle_table):
    pts = np.random.default_rng(0).uniform(-60.0, 60.0, (100, 3))
    for lao, cran in [(10.0, 5.0), (0.0, 0.0), (20.0, 3.0)]:
        view = interpolate_view(angle_table, lao, cran)
        true = sagging_carm_view(lao, cran)
        ideal = carm_view(lao_deg=lao, cranial_deg=cran)
        err = np.linalg.norm(project(view.P, pts) - project(true.P, pts), axis=1).mean()
        assert err < 0.25
        assert view.extra == {"lao_deg": lao, "cranial_deg": cran}
        if (lao, cran) != (0.0, 0.0):
            # The sag the table captures is far larger than what is left.
            assert np.linalg.norm(project(ideal.P, pts) - project(true.P, pts), axis=1).mean() \
                > 4 * err


def test_angle_table_range_and_grid_are_checked(angle_table):
    with pytest.raises(CalibrationError, match="LAO 30 deg is outside"):
        interpolate_view(angle_table, 30.0, 5.0)
    with pytest.raises(CalibrationError, match="full grid"):
        CarmAngleTable(angle_table.entries[:3], angle_table.image_size,
                       angle_table.pixel_spacing_mm, angle_table.nominal)
    e = angle_table.entries[0]
    with pytest.raises(CalibrationError, match="duplicate"):
        CarmAngleTable((e, CarmAngleEntry(e.lao_deg, e.cranial_deg, e.K, e.T_cam_from_world)),
                       angle_table.image_size, angle_table.pixel_spacing_mm,
                       angle_table.nominal)


def test_cli_simulated_carm_calibration(tmp_path):
    out = tmp_path / "carm.calibration.json"
    summary = calibrate_carm(None, True, out, 4)
    assert out.exists() and (tmp_path / "carm.calibration.png").exists()
    entry = summary["entries"][0]
    assert abs(entry["sdd_error_pct"]) < 0.5 and entry["principal_point_error_px"] < 1.0
    assert summary["rms_px"] < 0.3
    view = apply_carm_calibration(read_calibration(out))
    assert view.image_size == (512, 512)
    assert view.source_to_detector_mm == pytest.approx(entry["sdd_mm"])


def test_cli_one_row_angle_table_and_rerun_from_files(tmp_path):
    summary = calibrate_carm(None, True, tmp_path / "table.calibration.json", 5,
                             angles=[(0.0, 0.0), (20.0, 0.0)])
    assert summary["n_images"] == 2 and summary["interpolation_mpd_px"] < 0.25
    cal = read_calibration(tmp_path / "table.calibration.json")
    assert apply_carm_calibration(cal, lao_deg=10.0, cranial_deg=0.0).extra["lao_deg"] == 10.0
    # The simulated inputs on disk (images, view files, phantom pose) give the same result.
    images = sorted((tmp_path / "table_inputs").glob("*.png"))
    again = calibrate_carm(images, False, tmp_path / "again.calibration.json")
    assert [e["sdd_mm"] for e in again["entries"]] == \
        [e["sdd_mm"] for e in sorted(summary["entries"], key=lambda e: e["image"])]
    with pytest.raises(CalibrationError, match="no nominal view file"):
        calibrate_carm([tmp_path / "table.calibration.png"], False, tmp_path / "x.json")
