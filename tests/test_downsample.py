"""guidance.core.downsample: separable anti-aliased resampling, against analytic Gaussians and SimpleITK."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from guidance.core.downsample import SIGMA_PER_SPACING, axis_weights, downsample
from guidance.core.volume import Volume, VolumeError, affine_from_geometry

SPACING = np.array([0.7, 0.8, 2.5])
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # not the identity
ORIGIN = np.array([-30.0, 12.0, 100.0])


def blob(sigma_mm, size_ijk=(96, 84, 30), centre_ijk=(47.3, 40.6, 14.2)):
    """A Gaussian blob (peak 1) of isotropic ``sigma_mm`` on an anisotropic, rotated grid."""
    T = affine_from_geometry(ORIGIN, SPACING, DIRECTION)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in size_ijk[::-1]), indexing="ij")
    d = (np.stack([ii, jj, kk], axis=-1) - np.array(centre_ijk)) * SPACING
    data = np.exp(-0.5 * (d ** 2).sum(axis=-1) / sigma_mm ** 2).astype(np.float32)
    return Volume(data, T, "mu_per_mm"), T[:3, :3] @ np.array(centre_ijk) + T[:3, 3]


@pytest.mark.parametrize("spacing_mm", [1.0, 2.0, 4.0])
def test_a_gaussian_blob_comes_out_as_the_analytic_convolution(spacing_mm):
    """Variances add: the blob's, the anti-aliasing Gaussian's and the linear
    interpolation kernel's (1/6 of an input voxel squared), per resampled axis; the 2.5 mm
    axis is kept as it is below 4 mm."""
    sigma0 = 5.0
    volume, centre = blob(sigma0)
    out = downsample(volume, spacing_mm)
    resampled = SPACING < spacing_mm
    assert np.allclose(out.spacing, np.where(resampled, spacing_mm, SPACING)) and np.allclose(out.direction, DIRECTION)
    variance = sigma0 ** 2 + np.where(resampled, (SIGMA_PER_SPACING * spacing_mm) ** 2 + SPACING ** 2 / 6.0, 0.0)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in out.data.shape), indexing="ij")
    world = out.index_to_world(np.stack([ii, jj, kk], axis=-1).reshape(-1, 3))
    along = (world - centre) @ DIRECTION  # offsets along the grid's axes i, j, k
    reference = sigma0 ** 3 / np.sqrt(np.prod(variance)) * np.exp(-0.5 * (along ** 2 / variance).sum(axis=1))
    assert np.abs(out.data.ravel() - reference).max() < 0.01  # of the peak, 1
    assert out.data.sum() * np.prod(out.spacing) == pytest.approx(volume.data.sum() * np.prod(SPACING), rel=0.01)


def test_an_axis_already_as_coarse_keeps_its_samples():
    """A CT's 2.5 mm slices are not interpolated onto a 1 mm grid: each slice stays one
    sample (here a volume constant in-plane, random across its slices)."""
    per_slice = np.random.default_rng(3).uniform(0.0, 0.05, 30).astype(np.float32)
    data = np.broadcast_to(per_slice[:, None, None], (30, 40, 50)).copy()
    volume = Volume(data, affine_from_geometry(ORIGIN, SPACING, DIRECTION), "mu_per_mm")
    out = downsample(volume, 1.0)
    assert out.size_ijk == (35, 32, 30) and np.allclose(out.spacing, [1.0, 1.0, 2.5])
    assert np.allclose(out.center_world(), volume.center_world())
    assert np.allclose(out.data, per_slice[:, None, None], rtol=1e-5)


def test_the_new_grid_is_centred_in_the_old_box_and_keeps_a_cut_volume_at_its_value():
    volume = Volume(np.full((20, 30, 40), 0.02, np.float32), affine_from_geometry(ORIGIN, SPACING, DIRECTION),
                    "mu_per_mm")
    out = downsample(volume, 2.0)
    assert np.allclose(out.center_world(), volume.center_world())
    assert out.size_ijk == (14, 12, 20)  # floor(extent / 2 mm) + 1: 27.3, 23.2 mm; the 2.5 mm slices kept
    assert np.allclose(out.data, 0.02, rtol=1e-5)  # renormalised taps at the faces: no fall-off


def test_each_row_of_weights_sums_to_one_and_a_linear_ramp_is_kept():
    first, weights = axis_weights(50, 20, 1.3, 2.4, 1.5)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-6) and (weights >= 0).all()
    assert first.min() >= 0 and first.max() + weights.shape[1] <= 50
    x = 1.3 + 2.4 * np.arange(20)
    ramp = 3.0 + 0.5 * np.arange(50)
    filtered = np.array([w @ ramp[f: f + len(w)] for f, w in zip(first, weights)])
    inside = (x > 1.0 + 4 * 1.5 + 1) & (x < 49 - 4 * 1.5 - 1)  # away from the renormalised faces
    assert inside.sum() >= 10 and np.allclose(filtered[inside], 3.0 + 0.5 * x[inside], atol=1e-4)


def test_without_smoothing_the_weights_are_linear_interpolation():
    first, weights = axis_weights(10, 4, 0.25, 2.5, 0.0)
    values = np.arange(10.0) ** 2
    out = [w @ values[f: f + len(w)] for f, w in zip(first, weights)]
    assert np.allclose(out, np.interp(0.25 + 2.5 * np.arange(4), np.arange(10.0), values))


def test_a_non_positive_spacing_is_refused():
    volume, _ = blob(2.0, size_ijk=(8, 8, 4), centre_ijk=(4, 4, 2))
    with pytest.raises(VolumeError, match="spacing_mm"):
        downsample(volume, 0.0)


def test_it_leaves_no_thread_behind():
    """A supervisor prepares its CT before it forks workers; a thread started then (numba's
    parallel pool) would be missing in every worker. In a fresh process, as the supervisor's."""
    script = textwrap.dedent("""
        import time
        import numpy as np
        import scipy.special  # its import starts a BLAS thread: not the downsampling's
        from guidance.core.downsample import downsample
        from guidance.core.volume import Volume
        from guidance.live.supervisor import native_threads
        before = len(native_threads())
        volume = Volume(np.ones((40, 60, 80), np.float32), np.diag([0.7, 0.7, 2.5, 1.0]), "mu_per_mm")
        assert downsample(volume, 2.0).data.shape == (40, 21, 28)
        for _ in range(100):  # a joined thread leaves the kernel's list a moment later
            if len(native_threads()) <= before:
                break
            time.sleep(0.01)
        print(before, len(native_threads()))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after == before
