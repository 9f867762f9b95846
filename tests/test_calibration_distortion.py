"""Image-intensifier distortion: dot-grid detection, indexing, polynomial fit, remap."""

import cv2
import numpy as np
import pytest

from calibration.cli import calibrate_distortion
from calibration.distortion import (
    DistortionModel,
    assign_grid_indices,
    calibrate_distortion_image,
    detect_grid_dots,
    distortion_model_from_dict,
    distortion_model_to_dict,
    fit_distortion,
    ii_distortion,
    simulate_grid_image,
    undistort_image,
    undistort_maps,
    undistort_points,
)
from calibration.errors import CalibrationError

SIZE = (512, 512)


def _similarity_rms(src: np.ndarray, dst: np.ndarray) -> float:
    """RMS (px) left after the best similarity from src onto dst."""
    S, _ = cv2.estimateAffinePartial2D(src.astype(np.float64), dst.astype(np.float64))
    res = src @ S[:, :2].T + S[:, 2] - dst
    return float(np.sqrt((res ** 2).sum(axis=1).mean()))


@pytest.fixture(scope="module")
def grid10():
    truth = ii_distortion(SIZE, amplitude_px=10.0)
    sim = simulate_grid_image(truth, SIZE, seed=1)
    blobs = detect_grid_dots(sim.raw)
    return truth, sim, blobs


def test_simulated_distortion_size(grid10):
    truth, _, _ = grid10
    edge = np.array([[511.0, 255.5], [255.5, 0.0]])
    shift = np.linalg.norm(truth.distort(edge) - edge, axis=1)
    assert np.all((shift > 9.0) & (shift < 12.0))
    back = truth.undistort(truth.distort(edge))
    np.testing.assert_allclose(back, edge, atol=1e-4)


def test_dots_are_detected_and_indexed_consistently(grid10):
    _, sim, blobs = grid10
    d = np.linalg.norm(blobs.uv[:, None, :] - sim.nodes_distorted[None], axis=2)
    nearest = d.argmin(axis=1)
    assert np.all(d.min(axis=1) < 0.3)
    assert len(blobs) > 0.8 * len(sim.nodes_distorted)
    ij, ok = assign_grid_indices(blobs.uv)
    assert ok.mean() > 0.98
    # Indices are right when they map onto the true (undistorted) grid by one similarity.
    assert _similarity_rms(ij[ok].astype(float), sim.nodes_undistorted[nearest[ok]]) < 1e-3


@pytest.mark.parametrize("amplitude", [5.0, 15.0])
def test_polynomial_model_on_held_out_points(amplitude):
    truth = ii_distortion(SIZE, amplitude_px=amplitude)
    sim = simulate_grid_image(truth, SIZE, seed=int(amplitude))
    result = calibrate_distortion_image(sim.raw, degree=5)
    assert result.heldout_rms_px < 0.15
    assert result.max_correction_px > 0.6 * amplitude
    # Against the truth, up to the similarity that fixes the undistorted frame.
    und = result.model.undistort_points(sim.nodes_distorted)
    assert _similarity_rms(und, sim.nodes_undistorted) < 0.1


def test_degree_selection_reports_every_candidate(grid10):
    _, _, blobs = grid10
    ij, ok = assign_grid_indices(blobs.uv)
    result = fit_distortion(blobs.uv[ok], ij[ok], SIZE, degree=None)
    assert set(result.heldout_by_degree) == {3, 4, 5, 6, 7}
    assert result.heldout_rms_px == min(result.heldout_by_degree.values())
    assert result.model.degree in result.heldout_by_degree


def test_indexing_survives_missing_and_spurious_dots(grid10):
    _, sim, blobs = grid10
    rng = np.random.default_rng(3)
    keep = rng.uniform(size=len(blobs)) > 0.1
    spurious = rng.uniform(60.0, 450.0, (25, 2))
    uv = np.vstack([blobs.uv[keep], spurious])
    ij, ok = assign_grid_indices(uv)
    genuine = np.arange(len(uv)) < keep.sum()
    assert ok[genuine].mean() > 0.95
    result = fit_distortion(uv[ok], ij[ok], SIZE)
    assert result.heldout_rms_px < 0.15
    und = result.model.undistort_points(sim.nodes_distorted)
    assert _similarity_rms(und, sim.nodes_undistorted) < 0.1


def test_undistorted_image_shows_a_regular_grid(grid10):
    _, sim, blobs = grid10
    ij, ok = assign_grid_indices(blobs.uv)
    model = fit_distortion(blobs.uv[ok], ij[ok], SIZE).model
    maps = undistort_maps(model)
    assert maps[0].shape == (512, 512) and maps[0].dtype == np.float32
    flat = undistort_image(sim.raw, model, maps=maps)
    assert flat.shape == sim.raw.shape and flat.dtype == sim.raw.dtype
    dots = detect_grid_dots(flat)
    ij2, ok2 = assign_grid_indices(dots.uv)
    assert ok2.sum() > 0.8 * ok.sum()
    assert _similarity_rms(ij2[ok2].astype(float), dots.uv[ok2]) < 0.15


def test_points_round_trip_and_model_file(grid10):
    _, _, blobs = grid10
    ij, ok = assign_grid_indices(blobs.uv)
    model = fit_distortion(blobs.uv[ok], ij[ok], SIZE).model
    rng = np.random.default_rng(0)
    angle, radius = rng.uniform(0, 2 * np.pi, 200), 220.0 * np.sqrt(rng.uniform(size=200))
    pts = 255.5 + radius[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    # Both directions are fitted to the same dots: inside the field of view they agree.
    np.testing.assert_allclose(model.distort_points(undistort_points(pts, model)), pts, atol=0.05)
    back = distortion_model_from_dict(distortion_model_to_dict(model), SIZE)
    np.testing.assert_allclose(back.undistort_points(pts), model.undistort_points(pts))
    with pytest.raises(CalibrationError, match="512x512 frames, got 256x256"):
        undistort_image(np.zeros((256, 256), np.float32), model)
    with pytest.raises(CalibrationError, match="2 x 21"):
        DistortionModel(SIZE, 5, (255.5, 255.5), 256.0, np.zeros((2, 20)), np.zeros((2, 21)))


def test_cli_simulated_distortion(tmp_path):
    out = tmp_path / "ii.calibration.json"
    summary = calibrate_distortion(None, True, out, 0, amplitude_px=10.0)
    assert out.exists() and (tmp_path / "ii.calibration.png").exists()
    assert summary["heldout_rms_px"] < 0.15 and summary["truth_rms_px"] < 0.1
