import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from guidance.core.drr import DrrVolume, prepare_volume, render_drr, render_drr_reference
from guidance.core.geometry import backproject, rotation_about_axis
from guidance.core.views import carm_view
from guidance.core.volume import Volume, VolumeError, affine_from_geometry, crop_to_mask, resample


def grid(n, spacing, centre=(0.0, 0.0, 0.0)):
    """World coordinates (z, y, x arrays) and the affine of a centred axis-aligned grid."""
    origin = np.asarray(centre) - (np.asarray(n) - 1) / 2.0 * np.asarray(spacing)
    T = affine_from_geometry(origin, spacing, np.eye(3))
    k, j, i = np.meshgrid(*(np.arange(m) for m in n[::-1]), indexing="ij")
    pts = np.stack([i, j, k], -1).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    return pts.reshape(k.shape + (3,)), T


def ball(pts, centre, radius, spacing):
    """Anti-aliased ball: 1 inside, 0 outside, linear over one voxel at the surface."""
    r = np.linalg.norm(pts - np.asarray(centre), axis=-1)
    return np.clip((radius - r) / spacing + 0.5, 0.0, 1.0).astype(np.float32)


def chord(source, dirs, centre, radius):
    """Exact chord length of rays (source, unit dirs) through a sphere."""
    oc = source - np.asarray(centre)
    b = dirs @ oc
    disc = b**2 - (oc @ oc - radius**2)
    return 2.0 * np.sqrt(np.clip(disc, 0.0, None)), np.sqrt(np.clip(oc @ oc - b**2, 0, None))


def ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def spheres():
    pts, T = grid((81, 81, 81), (1.0, 1.0, 1.0))
    mu = 0.02 * ball(pts, (0, 0, 0), 30.0, 1.0) + 0.03 * ball(pts, (12, -8, 10), 9.0, 1.0)
    labels = (ball(pts, (12, -8, 10), 9.0, 1.0) > 0.5).astype(np.uint8) + 1
    return (Volume(mu, T, "mu_per_mm"), Volume(labels, T, "label"))


@pytest.mark.parametrize("lao,cran", [(0, 0), (90, 0), (35, -20)])
def test_sphere_line_integrals_are_mu_times_chord(lao, cran):
    pts, T = grid((101, 101, 101), (1.0, 1.0, 1.0), centre=(5, -3, 2))
    vol = Volume(0.02 * ball(pts, (5, -3, 2), 40.0, 1.0), T, "mu_per_mm")
    view = carm_view(lao_deg=lao, cranial_deg=cran, detector_size_px=(96, 96), pixel_spacing_mm=(1.2, 1.2),
                     isocenter_world=(5, -3, 2))
    img = render_drr(vol, view)
    vv, uu = np.mgrid[0:96, 0:96]
    source, dirs = backproject(view.K, view.T_cam_from_world, np.column_stack([uu.ravel(), vv.ravel()]))
    length, miss = chord(source, dirs, (5, -3, 2), 40.0)
    inner = miss < 0.85 * 40.0
    assert inner.sum() > 1000
    rel = np.abs(img.ravel()[inner] - 0.02 * length[inner]) / (0.02 * length[inner])
    assert rel.max() < 0.01
    assert img.ravel()[miss > 40.5 + np.sqrt(3)].max() == 0.0


def test_box_line_integrals_are_mu_times_chord():
    # A box of ones over voxel centres 10..50; trilinear ramps make its edges at 9.5 and 50.5.
    n = 61
    mu = np.zeros((n, n, n), np.float32)
    mu[10:51, 15:46, 20:41] = 0.03
    T = affine_from_geometry((0, 0, 0), (1.0, 1.0, 1.0), np.eye(3))
    lo, hi = np.array([19.5, 14.5, 9.5]), np.array([40.5, 45.5, 50.5])
    view = carm_view(lao_deg=25, cranial_deg=10, detector_size_px=(64, 64), pixel_spacing_mm=(1.5, 1.5),
                     isocenter_world=(hi + lo) / 2)
    img = render_drr(Volume(mu, T, "mu_per_mm"), view)
    vv, uu = np.mgrid[0:64, 0:64]
    source, dirs = backproject(view.K, view.T_cam_from_world, np.column_stack([uu.ravel(), vv.ravel()]))
    ta = (lo - source) / dirs
    tb = (hi - source) / dirs
    t_in = np.minimum(ta, tb).max(axis=1)
    t_out = np.maximum(ta, tb).min(axis=1)
    length = np.clip(t_out - t_in, 0, None)
    # Where the ray enters and leaves through a face, away from the box edges (where two
    # ramps overlap), the trilinear box integrates exactly like the sharp box.
    p_in = source + t_in[:, None] * dirs
    p_out = source + t_out[:, None] * dirs

    def off_edges(p):
        return ((p > lo + 2.0) & (p < hi - 2.0)).sum(axis=1) >= 2

    inner = (length > 10.0) & off_edges(p_in) & off_edges(p_out)
    assert inner.sum() > 300
    rel = np.abs(img.ravel()[inner] - 0.03 * length[inner]) / (0.03 * length[inner])
    assert rel.max() < 0.01


def test_matches_slow_reference(spheres):
    mu, _ = spheres
    view = carm_view(lao_deg=20, cranial_deg=15, detector_size_px=(48, 40), pixel_spacing_mm=(2.0, 2.0))
    fast = render_drr(mu, view)
    slow = render_drr_reference(mu, view, step_mm=0.05)
    assert ncc(fast, slow) > 0.999
    assert np.abs(fast - slow).sum() / np.abs(slow).sum() < 0.01
    assert np.abs(fast - slow).max() < 0.01 * slow.max()


def test_oblique_volume_renders_like_its_axis_aligned_resample():
    direction = rotation_about_axis([1, 1, 0.3], 35.0)
    n, sp = (70, 64, 60), (1.0, 1.1, 1.2)
    origin = -direction @ ((np.array(n) - 1) / 2.0 * np.array(sp))
    T = affine_from_geometry(origin, sp, direction)
    k, j, i = np.meshgrid(*(np.arange(m) for m in n[::-1]), indexing="ij")
    pts = np.stack([i, j, k], -1).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    pts = pts.reshape(k.shape + (3,))
    data = 0.02 * ball(pts, (0, 0, 0), 24.0, 1.0) + 0.04 * ball(pts, (10, 5, -8), 8.0, 1.0)
    oblique = Volume(data, T, "mu_per_mm")
    aligned = resample(oblique, spacing=(0.6, 0.6, 0.6), direction=np.eye(3))
    assert_allclose(aligned.direction, np.eye(3))
    view = carm_view(lao_deg=60, cranial_deg=10, detector_size_px=(64, 64), pixel_spacing_mm=(1.5, 1.5))
    a = render_drr(oblique, view)
    b = render_drr(aligned, view)
    assert ncc(a, b) > 0.999
    assert np.abs(a - b).sum() / np.abs(b).sum() < 0.01


def test_label_selection_renders_only_that_structure(spheres):
    mu, labels = spheres
    view = carm_view(detector_size_px=(64, 64), pixel_spacing_mm=(1.5, 1.5))
    only2 = render_drr(prepare_volume(mu, labels=labels, label_ids=[2]), view)
    masked = Volume(np.where(labels.data == 2, mu.data, 0).astype(np.float32), mu.T_world_from_index, "mu_per_mm")
    assert_allclose(only2, render_drr(masked, view), atol=1e-5)
    assert only2.max() > 0 and only2.max() < render_drr(mu, view).max()
    with pytest.raises(VolumeError, match="none of the labels"):
        prepare_volume(mu, labels=labels, label_ids=[7])


def test_subwindow_and_binned_detector(spheres):
    mu, _ = spheres
    dv = prepare_volume(mu)
    view = carm_view(lao_deg=10, detector_size_px=(128, 128), pixel_spacing_mm=(0.8, 0.8))
    full = render_drr(dv, view)
    win = render_drr(dv, view.cropped(30, 40, 50, 20))
    assert_allclose(win, full[40:60, 30:80], atol=1e-6)
    half = render_drr(dv, view.downsampled(2))
    binned = full.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    assert ncc(half, binned) > 0.999


def test_crop_does_not_change_the_image(spheres):
    mu, _ = spheres
    view = carm_view(lao_deg=45, detector_size_px=(64, 64), pixel_spacing_mm=(1.5, 1.5))
    a = render_drr(prepare_volume(mu, crop=True), view)
    b = render_drr(prepare_volume(mu, crop=False), view)
    # Cropping moves the sample positions along each ray by a fraction of a step only.
    assert np.abs(a - b).max() < 0.005 * b.max()
    assert ncc(a, b) > 0.9999


def test_rejects_hu_volume_and_bad_out(spheres):
    mu, _ = spheres
    with pytest.raises(VolumeError, match="hu_to_attenuation"):
        prepare_volume(Volume(mu.data, mu.T_world_from_index, "HU"))
    view = carm_view(detector_size_px=(8, 8))
    with pytest.raises(ValueError, match="float32"):
        render_drr(mu, view, out=np.zeros((8, 8)))


def oblique_grid(n, spacing, axis, angle_deg):
    """World points (k, j, i, 3) and affine of a grid with rotated direction cosines, centred at 0."""
    direction = rotation_about_axis(axis, angle_deg)
    origin = -direction @ ((np.array(n) - 1) / 2.0 * np.array(spacing))
    T = affine_from_geometry(origin, spacing, direction)
    k, j, i = np.meshgrid(*(np.arange(m) for m in n[::-1]), indexing="ij")
    pts = np.stack([i, j, k], -1).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    return pts.reshape(k.shape + (3,)), T


@pytest.fixture(scope="module")
def bone_and_body():
    """A bone-only volume (a column of small 'vertebrae', a thin rod, scattered single
    voxels, including some on brick faces) and the same with a soft-tissue body around
    it, on an oblique anisotropic grid."""
    n, sp = (72, 60, 40), (0.8, 0.9, 2.0)
    pts, T = oblique_grid(n, sp, [0.3, 1.0, 0.2], 25.0)
    bone = np.zeros(pts.shape[:3], np.float32)
    for z in (-24.0, -8.0, 8.0, 24.0):
        bone += 0.05 * ball(pts, (4.0, 6.0, z), 5.0, 1.0)
    rod = np.linalg.norm(pts[..., :2] - np.array([-12.0, -6.0]), axis=-1)
    bone += 0.04 * np.clip((1.5 - rod) / 0.9 + 0.5, 0.0, 1.0)
    rng = np.random.default_rng(3)
    specks = rng.integers(0, np.array(bone.shape), size=(40, 3))
    specks[:8, 2] = [7, 8, 15, 16, 23, 24, 31, 32]  # on both sides of the 8-voxel brick faces
    bone[tuple(specks.T)] = 0.06
    body = np.maximum(0.018 * ball(pts, (0.0, 0.0, 0.0), 26.0, 1.0), bone)
    return Volume(bone, T, "mu_per_mm"), Volume(body, T, "mu_per_mm")


OBLIQUE_VIEWS = [(0, 0), (90, 0), (35, -20), (-60, 40)]


@pytest.mark.parametrize("which", ["bone", "body"])
def test_empty_space_skipping_keeps_the_line_integrals(bone_and_body, which):
    vol = bone_and_body[0 if which == "bone" else 1]
    dv = prepare_volume(vol, crop=False)
    if which == "bone":
        assert dv.occupancy.mean() < 0.6  # there is empty space to skip
    for lao, cran in OBLIQUE_VIEWS:
        view = carm_view(lao_deg=lao, cranial_deg=cran, detector_size_px=(72, 64), pixel_spacing_mm=(1.3, 1.3),
                         isocenter_world=(1.0, -2.0, 3.0))
        skipped = render_drr(dv, view)
        plain = render_drr(dv, view, skip_empty=False)
        # The same samples of the dequantised volume, summed in float64 by scipy.
        reference = render_drr_reference(dv.volume, view, step_mm=dv.step_mm, kernel_samples=True)
        scale = reference.max()
        assert scale > 0 and (reference > 0.01 * scale).mean() > 0.1
        signal = reference > 0.01 * scale
        for image in (skipped, plain):  # float32 stepping along the ray vs float64
            assert np.abs(image - reference).max() < 1e-4 * scale
            assert (np.abs(image - reference)[signal] / reference[signal]).max() < 5e-4
        # Skipping changes nothing but where a run of float32 steps restarts.
        assert np.abs(skipped - plain).max() < 1e-5 * scale
        assert (np.abs(skipped - plain)[signal] / plain[signal]).max() < 1e-4


def test_skipping_matches_the_dense_reference(bone_and_body):
    bone, _ = bone_and_body
    view = carm_view(lao_deg=35, cranial_deg=-20, detector_size_px=(40, 36), pixel_spacing_mm=(2.0, 2.0))
    fast = render_drr(bone, view)
    slow = render_drr_reference(bone, view, step_mm=0.05)
    assert ncc(fast, slow) > 0.999
    assert np.abs(fast - slow).sum() / np.abs(slow).sum() < 0.01


def _twist_matrix(twist):
    """4 x 4 generator of the motion q -> q + w x q + b, twist (w, b)."""
    w, b = twist[:3], twist[3:]
    V = np.zeros((4, 4))
    V[:3, :3] = [[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]]
    V[:3, 3] = b
    return V


@pytest.mark.parametrize("which", ["bone", "body", "cut body"])
def test_motion_derivative_matches_central_differences(bone_and_body, which):
    """The DRR's derivative under the six motions of the volume (turns about its centre,
    shifts across and along the rays), from one pass over the rays, equals central
    differences of moved renders, in oblique views of the oblique anisotropic grid, with
    empty space skipped (bone) and not (a body filling most of its box), and for a body
    cut off by its grid (as a CT's first and last slices cut through the patient), whose
    rays end on non-zero voxels: there the moving ends count too. The volume is
    smoothed, yet the trilinear interpolant's gradient, constant between voxel faces,
    stays coarser than its values (measured against dense reference renders: correlation
    0.989-0.9998 where the renders' own differences give 0.996-0.99999)."""
    from scipy.linalg import expm
    from scipy.ndimage import gaussian_filter

    from guidance.core.drr import render_drr_motion

    vol = bone_and_body[0 if which == "bone" else 1]
    vol = vol.with_data(gaussian_filter(vol.data, 1.0))
    if which == "cut body":
        kept = np.zeros(vol.data.shape, bool)
        kept[:, :, 20:] = True  # i >= 20: through the body
        vol = crop_to_mask(vol, kept, margin_mm=0.0)
        assert vol.data[:, :, 0].max() > 0.5 * vol.data.max()
    dv = prepare_volume(vol, crop=False)
    centre_world = vol.T_world_from_index[:3, :3] @ ((np.array(vol.size_ijk) - 1) / 2) + vol.T_world_from_index[:3, 3]
    for lao, cran in OBLIQUE_VIEWS[2:]:
        view = carm_view(lao_deg=lao, cranial_deg=cran, detector_size_px=(56, 52), pixel_spacing_mm=(1.6, 1.6),
                         isocenter_world=(1.0, -2.0, 3.0))
        image, motion = render_drr_motion(dv, view, parallel=False)
        assert_allclose(image, render_drr(dv, view), rtol=1e-6, atol=1e-7)
        _, parallel = render_drr_motion(dv, view, parallel=True)
        assert_array_equal(parallel, motion)
        centre = view.T_cam_from_world[:3, :3] @ centre_world + view.T_cam_from_world[:3, 3]
        for k in range(6):
            twist = np.eye(6)[k]
            if k < 3:  # a turn about the volume's centre
                twist[3:] = -np.cross(twist[:3], centre)
            h = 0.004 if k < 3 else 0.3  # rad, mm: about 0.2 mm at the volume's edge
            moved = [render_drr(dv, view.with_pose(expm(sign * h * _twist_matrix(twist)) @ view.T_cam_from_world))
                     for sign in (1.0, -1.0)]
            central = (moved[0].astype(np.float64) - moved[1]) / (2.0 * h)
            analytic = motion @ twist
            assert np.abs(central).max() > 0
            assert np.corrcoef(analytic.ravel(), central.ravel())[0, 1] > 0.98, (which, lao, k)
            scale = np.dot(analytic.ravel(), central.ravel()) / np.dot(central.ravel(), central.ravel())
            assert 0.95 < scale < 1.05, (which, lao, k)


def test_occupancy_is_the_widened_brick_footprint():
    rng = np.random.default_rng(0)
    nonzero = rng.random((21, 18, 27)) < 0.004
    mu = np.where(nonzero, 0.02, 0.0).astype(np.float32)
    T = affine_from_geometry((0, 0, 0), (1.0, 1.0, 1.0), np.eye(3))
    dv = prepare_volume(Volume(mu, T, "mu_per_mm"), crop=False)
    brick = dv.brick_voxels
    expected = np.zeros(dv.occupancy.shape, np.uint8)
    for k, j, i in np.ndindex(expected.shape):
        block = nonzero[max(k * brick - 1, 0): (k + 1) * brick + 2, max(j * brick - 1, 0): (j + 1) * brick + 2,
                        max(i * brick - 1, 0): (i + 1) * brick + 2]
        expected[k, j, i] = block.any()
    assert_array_equal(dv.occupancy, expected)
    assert 0 < expected.sum() < expected.size
    kk, jj, ii = np.nonzero(nonzero)
    assert_allclose(dv.nonzero_box_ijk, [[ii.min() - 1, jj.min() - 1, kk.min() - 1],
                                         [ii.max() + 1, jj.max() + 1, kk.max() + 1]])


def test_empty_volume_renders_zeros():
    T = affine_from_geometry((0, 0, 0), (1.0, 1.0, 1.0), np.eye(3))
    dv = prepare_volume(Volume(np.zeros((10, 12, 14), np.float32), T, "mu_per_mm"))
    assert dv.occupancy.sum() == 0
    view = carm_view(detector_size_px=(16, 16), pixel_spacing_mm=(2.0, 2.0), isocenter_world=(7, 6, 5))
    assert render_drr(dv, view).max() == 0.0


def test_prepared_volume_round_trips_through_savez(spheres, tmp_path):
    mu, _ = spheres
    dv = prepare_volume(mu)
    path = tmp_path / "prepared.npz"
    np.savez(path, **{name: getattr(dv, name) for name in DrrVolume.__dataclass_fields__})
    with np.load(path) as stored:
        loaded = DrrVolume(**{name: stored[name] for name in stored.files})
    assert loaded.size_ijk == dv.size_ijk and loaded.step_mm == dv.step_mm
    view = carm_view(lao_deg=30, detector_size_px=(48, 48), pixel_spacing_mm=(2.0, 2.0))
    assert_array_equal(render_drr(loaded, view), render_drr(dv, view))
    # Without occupancy (a DrrVolume built by hand) it is derived from the codes.
    derived = DrrVolume(dv.codes, dv.mu_scale, dv.size_ijk, dv.T_world_from_index, dv.T_index_from_world, dv.step_mm)
    assert_array_equal(derived.occupancy, dv.occupancy)
    with pytest.raises(VolumeError, match="occupancy"):
        DrrVolume(dv.codes, dv.mu_scale, dv.size_ijk, dv.T_world_from_index, dv.T_index_from_world, dv.step_mm,
                  occupancy=dv.occupancy[:-1], nonzero_box_ijk=dv.nonzero_box_ijk)


RENDER_SNIPPET = """
import sys
import numpy as np
from guidance.core.drr import PARALLEL_MIN_PIXELS, render_drr
from guidance.core.views import carm_view
from guidance.core.volume import Volume, affine_from_geometry

mu = np.zeros((20, 20, 20), np.float32)
mu[5:15, 5:15, 5:15] = 0.02
volume = Volume(mu, affine_from_geometry((-9.5, -9.5, -9.5), (1.0, 1.0, 1.0), np.eye(3)), "mu_per_mm")
px = int(sys.argv[1])
assert (px * px >= PARALLEL_MIN_PIXELS) == (sys.argv[2] == "parallel")
image = render_drr(volume, carm_view(detector_size_px=(px, px), pixel_spacing_mm=(40.0 / px, 40.0 / px)))
assert image.max() > 0
import numba
print(numba.threading_layer())
"""


def test_parallel_kernel_is_not_loaded_from_the_serial_cache(tmp_path):
    """numba caches compiled kernels by function name and line: the serial kernel
    compiled (and cached) first must not be what a later process runs as the parallel
    one. numba's threading layer exists only after a parallel region has run."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"), NUMBA_NUM_THREADS="2",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def run(px, kind):
        return subprocess.run([sys.executable, "-c", RENDER_SNIPPET, str(px), kind], env=env, capture_output=True,
                              text=True, timeout=300)

    serial = run(64, "serial")
    assert serial.returncode != 0 and "ValueError" in serial.stderr  # no parallel region ran
    assert any((tmp_path / "numba_cache").rglob("*.nbi"))  # the serial kernel is cached
    parallel = run(256, "parallel")
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.strip() in ("tbb", "omp", "workqueue")


def test_parallel_choice_does_not_change_the_image():
    """``parallel`` picks the kernel, not the result: forced either way on a small and a
    large image, the two kernels give the same pixels."""
    mu = np.zeros((20, 20, 20), np.float32)
    mu[5:15, 4:16, 6:14] = 0.02
    volume = prepare_volume(Volume(mu, affine_from_geometry((-9.5, -9.5, -9.5), (1.0, 1.0, 1.0), np.eye(3)),
                                   "mu_per_mm"))
    for px in (32, 200):
        view = carm_view(lao_deg=20.0, detector_size_px=(px, px), pixel_spacing_mm=(40.0 / px, 40.0 / px))
        assert_array_equal(render_drr(volume, view, parallel=True), render_drr(volume, view, parallel=False))


def test_rendering_releases_the_gil():
    """A long render on one thread leaves the interpreter to the others (the live loop's
    heartbeats and tracker samples): while it runs, a Python loop on this thread keeps
    taking turns, never stalled for more than half the render (holding the GIL it would
    stall for all of it)."""
    import threading
    import time

    mu = np.full((120, 120, 120), 0.02, np.float32)
    volume = prepare_volume(Volume(mu, affine_from_geometry((-59.5, -59.5, -59.5), (1.0, 1.0, 1.0), np.eye(3)),
                                   "mu_per_mm"), step_mm=0.1)
    view = carm_view(lao_deg=20.0, detector_size_px=(200, 200), pixel_spacing_mm=(1.0, 1.0))
    render_drr(volume, view, parallel=False)  # compiled and warm
    spans = []

    def render():
        t0 = time.perf_counter()
        render_drr(volume, view, parallel=False)
        spans.append((t0, time.perf_counter()))

    worker = threading.Thread(target=render)
    ticks = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    (t0, t1), = spans
    inside = [t for t in ticks if t0 <= t <= t1]
    gaps = np.diff([t0, *inside, t1])
    assert t1 - t0 > 0.05 and gaps.max() < 0.5 * (t1 - t0), (t1 - t0, gaps.max())
