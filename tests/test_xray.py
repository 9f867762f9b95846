"""X-ray image formation: Beer-Lambert, quantum noise, blur, distortion, collimation."""

import numpy as np
import pytest

from sim.xray import (
    DARK_FRACTION,
    XrayParams,
    collimation_mask,
    distort_points,
    distortion_maps,
    form_image,
    undistort_points,
)

H, W = 192, 256
EXACT = dict(noise=False, blur_sigma_px=0.0)


def smooth_line_integral(seed=0):
    """A smooth random line-integral image in [0, 8] (float32, H x W)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:H, 0:W] / 40.0
    L = 4.0 + 2.0 * np.sin(u + rng.uniform(0, 6)) * np.cos(v * 0.7) + 2.0 * np.sin(0.5 * u * v)
    return L.astype(np.float32)


def bone_phantom():
    """Soft tissue (L = 2) with a 'bone' block (L = 4) in the middle."""
    L = np.full((H, W), 2.0, dtype=np.float32)
    L[64:128, 96:160] = 4.0
    return L


def snr(L_value, **kw):
    raw = form_image(np.full((H, W), L_value, np.float32),
                     XrayParams(blur_sigma_px=0.0, seed=1, **kw), intensity="raw")
    return raw.mean() / raw.std()


def test_noise_free_raw_is_beer_lambert():
    L = smooth_line_integral()
    raw = form_image(L, XrayParams(**EXACT), intensity="raw")
    assert raw.dtype == np.float32 and raw.shape == (H, W)
    np.testing.assert_allclose(raw, 4095.0 * np.exp(-L.astype(np.float64)), rtol=1e-5)
    back = form_image(L, XrayParams(**EXACT), intensity="line_integral")
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, L, atol=1e-5)
    counts = form_image(L, XrayParams(I0=60000.0, **EXACT), intensity="raw", dtype="uint16")
    assert counts.dtype == np.uint16
    np.testing.assert_array_equal(counts, np.rint(60000.0 * np.exp(-L.astype(np.float64))))


def test_poisson_variance_on_flat_field():
    L = np.full((H, W), 0.5, dtype=np.float32)
    params = XrayParams(blur_sigma_px=0.0, photons_per_pixel_at_unit_dose=2000.0, seed=3)
    raw = form_image(L, params, intensity="raw").astype(np.float64)
    photons = 2000.0 * np.exp(-0.5)  # expected counts per pixel
    assert raw.mean() == pytest.approx(4095.0 * np.exp(-0.5), rel=2e-3)
    # Counts have variance = mean; raw = counts * I0 / N.
    assert raw.var() == pytest.approx(photons * (4095.0 / 2000.0) ** 2, rel=0.05)


def test_snr_scales_with_sqrt_dose():
    ratio = snr(1.0, dose=4.0) / snr(1.0, dose=1.0)
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert snr(1.0, dose=1.0) == pytest.approx(np.sqrt(2000.0 * np.exp(-1.0)), rel=0.05)


def test_blur_preserves_mean_and_smooths_noise():
    L = bone_phantom()
    sharp = form_image(L, XrayParams(**EXACT), intensity="raw")
    blurred = form_image(L, XrayParams(noise=False, blur_sigma_px=2.0), intensity="raw")
    assert blurred.mean() == pytest.approx(sharp.mean(), rel=1e-4)
    assert np.abs(np.diff(blurred[96])).max() < 0.5 * np.abs(np.diff(sharp[96])).max()
    flat = np.ones((H, W), np.float32)
    noisy = form_image(flat, XrayParams(blur_sigma_px=0.0, seed=4), intensity="raw")
    smoothed = form_image(flat, XrayParams(blur_sigma_px=1.0, seed=4), intensity="raw")
    assert smoothed.mean() == pytest.approx(noisy.mean(), rel=1e-3)
    assert smoothed.std() < 0.5 * noisy.std()


def test_distortion_model_and_round_trip():
    size, k1 = (W, H), 0.08
    r_max = 0.5 * np.hypot(W - 1, H - 1)
    centre = np.array([(W - 1) / 2, (H - 1) / 2])
    corner = distort_points([[0.0, 0.0]], size, k1)[0]
    np.testing.assert_allclose(np.linalg.norm(corner - centre), r_max * (1 + k1))
    v, u = np.mgrid[0:H:7, 0:W:7]
    pts = np.column_stack([u.ravel(), v.ravel()]).astype(float)
    for c in (None, (100.0, 80.0)):
        for k in (k1, -0.1):
            back = undistort_points(distort_points(pts, size, k, c), size, k, c)
            assert np.abs(back - pts).max() < 0.01
    map_x, map_y = distortion_maps(size, k1, (100.0, 80.0))
    assert map_x.shape == (H, W) and map_x.dtype == np.float32
    src = np.column_stack([map_x.ravel(), map_y.ravel()])
    grid = np.column_stack([np.tile(np.arange(W), H), np.repeat(np.arange(H), W)])
    assert np.abs(distort_points(src, size, k1, (100.0, 80.0)) - grid).max() < 0.01


def test_distortion_moves_an_edge_point_by_the_model_amount():
    k1 = 0.1
    v, u = np.mgrid[0:H, 0:W]
    dot = np.array([W - 30.0, (H - 1) / 2 + 20.0])  # near the right edge
    L = 3.0 * np.exp(-((u - dot[0]) ** 2 + (v - dot[1]) ** 2) / (2 * 1.5**2))
    image = form_image(L.astype(np.float32), XrayParams(distortion_k1=k1, **EXACT),
                       intensity="line_integral")
    weights = np.clip(image, 0, None)
    found = np.array([(weights * u).sum(), (weights * v).sum()]) / weights.sum()
    expected = distort_points(dot[None], (W, H), k1)[0]
    r_u = np.linalg.norm(dot - [(W - 1) / 2, (H - 1) / 2])
    shift = k1 * r_u**3 / (0.5 * np.hypot(W - 1, H - 1)) ** 2
    assert np.linalg.norm(expected - dot) == pytest.approx(shift)
    assert shift > 2.0
    assert np.linalg.norm(found - expected) < 0.05


def test_collimation_zeroes_outside():
    L = bone_phantom()
    rect = (40, 30, 200, 150)
    mask = collimation_mask((W, H), rect)
    assert mask.sum() == (200 - 40 + 1) * (150 - 30 + 1)
    raw = form_image(L, XrayParams(collimation=rect, seed=0), intensity="raw")
    assert np.all(raw[~mask] == pytest.approx(4095.0 * DARK_FRACTION))
    assert raw[mask].min() > 10 * 4095.0 * DARK_FRACTION
    shown = form_image(L, XrayParams(collimation=rect, seed=0), intensity="display")
    assert np.all(shown[~mask] == 0) and shown[mask].mean() > 50
    circle = form_image(L, XrayParams(collimation=80.0, seed=0), intensity="display")
    assert circle[0, 0] == 0 and circle[H // 2, W // 2 - 70] > 0
    assert circle[H // 2, W // 2 + 90] == 0


def test_display_is_uint8_with_dark_bone():
    L = bone_phantom()
    shown = form_image(L, XrayParams(seed=5), intensity="display")
    assert shown.dtype == np.uint8 and shown.shape == (H, W)
    bone, soft = shown[72:120, 104:152].mean(), shown[10:50, 10:60].mean()
    assert bone < soft - 100, (bone, soft)


def test_scatter_keeps_flat_field_and_lowers_contrast():
    flat = form_image(np.zeros((H, W), np.float32),
                      XrayParams(scatter_fraction=0.3, **EXACT), intensity="raw")
    np.testing.assert_allclose(flat, 4095.0, rtol=1e-4)
    L = bone_phantom()
    contrast = []
    for f in (0.0, 0.3):
        line = form_image(L, XrayParams(scatter_fraction=f, **EXACT), intensity="line_integral")
        contrast.append(line[96, 128] - line[96, 20])
    assert contrast[0] == pytest.approx(2.0, abs=1e-4)
    assert contrast[1] < 0.8 * contrast[0]


def test_same_seed_same_image():
    L = smooth_line_integral(1)
    params = XrayParams(seed=11, distortion_k1=0.05, scatter_fraction=0.1)
    for variant in ("raw", "line_integral", "display"):
        a = form_image(L, params, intensity=variant)
        np.testing.assert_array_equal(a, form_image(L, params, intensity=variant))
    other = form_image(L, XrayParams(seed=12, distortion_k1=0.05, scatter_fraction=0.1),
                       intensity="raw")
    assert not np.array_equal(form_image(L, params, intensity="raw"), other)


def test_invalid_options_name_the_allowed_values():
    L = bone_phantom()
    with pytest.raises(ValueError, match="line_integral, raw, display"):
        form_image(L, XrayParams(), intensity="log")
    with pytest.raises(ValueError, match="float32, uint16"):
        form_image(L, XrayParams(), intensity="raw", dtype="int8")
    with pytest.raises(ValueError, match="'raw' intensity only"):
        form_image(L, XrayParams(), intensity="display", dtype="uint16")
    with pytest.raises(ValueError, match="2D"):
        form_image(L[0], XrayParams(), intensity="raw")
    with pytest.raises(ValueError, match="collimation"):
        XrayParams(collimation=(10, 10, 5))
    with pytest.raises(ValueError, match="dose"):
        XrayParams(dose=0.0)
    with pytest.raises(ValueError, match="distortion_k1"):
        XrayParams(distortion_k1=-0.5)
