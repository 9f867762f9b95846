"""The simulated patient beyond the scanned box (sim.body)."""

import numpy as np

from guidance.core.volume import Volume
from sim.body import SOFT_TISSUE_MAX_HU, continued_body


def _elliptic_body(shape_kji, spacing, semi_x, semi_y):
    """HU voxels [k, j, i] of an elliptic cylinder of water (0 HU) along k, in air, centred in
    the grid, with a bone rod (1000 HU) on its axis."""
    nk, nj, ni = shape_kji
    j, i = np.mgrid[:nj, :ni]
    x, y = (i - (ni - 1) / 2.0) * spacing, (j - (nj - 1) / 2.0) * spacing
    inside = (x / semi_x) ** 2 + (y / semi_y) ** 2 <= 1.0
    hu = np.where(inside, 0.0, -1000.0).astype(np.float32)
    hu[np.hypot(x, y) < 8.0] = 1000.0
    return np.broadcast_to(hu, (nk, nj, ni)).copy()


def test_a_body_the_field_of_view_cuts_goes_on_in_its_ellipse_and_the_slices_go_on():
    """A water cylinder 300 x 200 mm cut to a 220 mm wide field of view (and ending at the
    first and last slice): continued, it holds the cylinder within the margin again, its
    slices go on beyond the ends, and no bone is made up."""
    spacing = 2.0
    full = _elliptic_body((20, 111, 151), spacing, semi_x=150.0, semi_y=100.0)
    cut = full[:, :, 20:131]  # 220 mm of the 300
    ct = Volume(cut, np.diag([spacing, spacing, spacing, 1.0]), "HU")
    grown = continued_body(ct, 40.0)
    n = 20  # 40 mm in voxels
    assert grown.data.shape == (20 + 2 * n, 111 + 2 * n, 111 + 2 * n)
    np.testing.assert_allclose(grown.index_to_world([[n, n, n]]), ct.index_to_world([[0, 0, 0]]))
    middle = grown.data[n + 10, n:-n, :]  # a slice, rows of the original grid, columns 40 mm on each side
    truth = full[10, :, :]
    body, expected = middle > -500.0, truth > -500.0
    assert (body & expected).sum() / (body | expected).sum() > 0.97
    beyond = np.zeros(middle.shape, bool)
    beyond[:, :n] = beyond[:, -n:] = True
    assert np.all(middle[beyond & body] == 0.0)  # the tissue where the face cuts the body: water
    assert grown.data[:, :n, :].max() < -500.0 and grown.data[:, -n:, :].max() < -500.0  # j faces: air, not cut
    np.testing.assert_array_equal(grown.data[0], np.minimum(grown.data[n], SOFT_TISSUE_MAX_HU))  # slices go on
    assert grown.data[:n].max() <= SOFT_TISSUE_MAX_HU and grown.data[n:-n, n:-n, n:-n].max() == 1000.0


def test_a_body_inside_the_box_gets_nothing_more():
    """A body the box holds whole, ending with the scan: only the slices go on."""
    hu = _elliptic_body((6, 61, 81), 2.0, semi_x=60.0, semi_y=40.0)
    grown = continued_body(Volume(hu, np.eye(4), "HU"), 10.0)
    assert grown.data.shape == (6 + 20, 61 + 20, 81 + 20)
    assert grown.data[:, :10].max() < -500.0 and grown.data[:, :, :10].max() < -500.0
    assert continued_body(Volume(hu, np.eye(4), "HU"), 0.0).data is hu
