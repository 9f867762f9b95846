"""Preprocessing by intensity kind and the valid-pixel (collimator) mask."""

import numpy as np
import pytest

from guidance.core.images import ImageError, preprocess, valid_pixel_mask
from guidance.core.views import carm_view


def test_raw_becomes_line_integrals_even_through_thick_bodies():
    view = carm_view(detector_size_px=(64, 64), intensity="raw", I0=30000.0)
    L = np.tile(np.linspace(0.5, 9.0, 64, dtype=np.float32), (64, 1))  # lateral abdomen reaches 7-9
    rng = np.random.default_rng(1)
    counts = (30000.0 * np.exp(-L) * (1 + 0.01 * rng.standard_normal(L.shape))).astype(np.float32)
    prepared = preprocess(counts, view)
    assert prepared.mask[3:-3, 3:-3].all()  # noisy dark anatomy is not taken for a collimator
    np.testing.assert_allclose(prepared.image[prepared.mask], L[prepared.mask], atol=0.05)
    assert prepared.image.max() > 8.5  # no ceiling at 6.9 as a 1e-3 I0 floor would give


def test_collimator_blades_are_masked_but_dark_noisy_anatomy_is_not():
    rng = np.random.default_rng(0)
    image = rng.poisson(20.0, (80, 80)).astype(np.float32)  # dark, noisy body
    image[:, :60] += 500.0
    image[:10, :] = 0.3  # collimator blade along the top: flat and darkest
    mask = valid_pixel_mask(image)
    assert not mask[:8].any()
    assert mask[20:-5, 62:-5].all()  # the dark noisy region stays valid


def test_display_polarity_and_errors():
    view = carm_view(detector_size_px=(32, 32), intensity="display")
    img = np.full((32, 32), 200, np.uint8)
    img[10:20, 10:20] = 40  # bone dark on the monitor
    dark = preprocess(img, view, polarity="bone_dark").image
    assert dark[15, 15] > dark[2, 2]
    bright = preprocess(img, view, polarity="bone_bright").image
    assert bright[15, 15] < bright[2, 2]
    with pytest.raises(ValueError, match="bone_dark, bone_bright"):
        preprocess(img, view, polarity="auto")
    with pytest.raises(ImageError, match="32x32"):
        preprocess(np.zeros((16, 16), np.uint8), view)
