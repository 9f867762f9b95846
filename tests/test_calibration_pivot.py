"""Pivot calibration of tracked instruments on simulated noisy poses."""

import numpy as np
import pytest

from calibration.cli import calibrate_pivot
from calibration.errors import CalibrationError
from calibration.pivot import (
    pivot_calibration,
    pose_from_markers,
    read_poses,
    simulate_pivot_poses,
    write_poses,
)
from guidance.core.geometry import make_rigid, rotation_about_axis


@pytest.fixture(scope="module")
def noisy():
    return simulate_pivot_poses(n_poses=200, marker_noise_mm=0.25, seed=7)


def test_linear_solution_recovers_tip_and_pivot(noisy):
    res = pivot_calibration(noisy.T_tracker_from_tool, method="linear")
    assert np.linalg.norm(res.tip_offset_mm - noisy.tip_offset_mm) < 0.5
    assert np.linalg.norm(res.pivot_point_mm - noisy.pivot_point_mm) < 0.5
    assert 0.3 < res.rms_mm < 2.0
    assert res.residuals_mm.shape == (200, 3)


def test_sphere_fit_agrees(noisy):
    lin = pivot_calibration(noisy.T_tracker_from_tool, method="linear")
    sph = pivot_calibration(noisy.T_tracker_from_tool, method="sphere")
    assert sph.method == "sphere"
    assert np.linalg.norm(sph.tip_offset_mm - noisy.tip_offset_mm) < 0.5
    assert np.linalg.norm(sph.tip_offset_mm - lin.tip_offset_mm) < 0.75
    assert np.linalg.norm(sph.pivot_point_mm - lin.pivot_point_mm) < 0.75


@pytest.mark.parametrize("method", ["linear", "sphere"])
def test_exact_without_noise(method):
    sim = simulate_pivot_poses(n_poses=20, marker_noise_mm=0.0, seed=1)
    res = pivot_calibration(sim.T_tracker_from_tool, method=method)
    np.testing.assert_allclose(res.tip_offset_mm, sim.tip_offset_mm, atol=1e-6)
    np.testing.assert_allclose(res.pivot_point_mm, sim.pivot_point_mm, atol=1e-6)
    assert res.rms_mm < 1e-6


def test_pose_from_markers_is_the_rigid_fit():
    markers = np.array([[0.0, 0, 0], [50, 0, 0], [0, 80, 0], [-35, 45, 10]])
    T = make_rigid(rotation_about_axis([1.0, -2.0, 0.5], 37.0), [10.0, -20.0, -900.0])
    measured = markers @ T[:3, :3].T + T[:3, 3]
    np.testing.assert_allclose(pose_from_markers(markers, measured), T, atol=1e-9)


def test_bad_input_is_refused():
    spin_only = np.stack([make_rigid(rotation_about_axis([0, 0, 1], a), [0, 0, 100.0])
                          for a in range(0, 90, 10)])
    with pytest.raises(CalibrationError, match="do not pivot enough"):
        pivot_calibration(spin_only)
    with pytest.raises(CalibrationError, match="at least 4 poses"):
        pivot_calibration(spin_only[:3])
    with pytest.raises(CalibrationError, match=r"shape \(N, 4, 4\)"):
        pivot_calibration(np.zeros((10, 3, 4)))
    skewed = spin_only.copy()
    skewed[0, 0, 0] = 2.0
    with pytest.raises(CalibrationError, match="proper rotations"):
        pivot_calibration(skewed)
    with pytest.raises(ValueError, match="linear, sphere"):
        pivot_calibration(spin_only, method="ransac")


@pytest.mark.parametrize("suffix", [".json", ".npy", ".csv"])
def test_poses_file_round_trip(noisy, tmp_path, suffix):
    path = tmp_path / f"poses{suffix}"
    if suffix == ".csv":
        np.savetxt(path, noisy.T_tracker_from_tool.reshape(-1, 16), delimiter=",")
    else:
        write_poses(noisy.T_tracker_from_tool, path)
    np.testing.assert_allclose(read_poses(path), noisy.T_tracker_from_tool)


def test_unreadable_poses_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_poses(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"poses": []}')
    with pytest.raises(CalibrationError, match="cannot read poses"):
        read_poses(bad)


def test_cli_simulated_pivot(tmp_path):
    out = tmp_path / "pointer.calibration.json"
    summary = calibrate_pivot(None, True, out, 3)
    assert out.exists() and (tmp_path / "pointer.calibration.png").exists()
    assert summary["tip_error_mm"] < 0.5
    assert summary["sphere_tip_difference_mm"] < 0.75
    again = calibrate_pivot(tmp_path / "pointer_inputs" / "pivot_poses.json", False,
                            tmp_path / "again.calibration.json")
    np.testing.assert_allclose(again["tip_offset_mm"], summary["tip_offset_mm"])
