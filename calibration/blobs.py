"""Detection of small round attenuating blobs (BBs, grid dots) with sub-pixel centroids.

Images are converted to an attenuation-like image (bright = attenuating), the smooth
background is removed with a morphological top-hat, blobs are segmented by a noise-scaled
threshold and ``cv2.connectedComponentsWithStats``, and each centroid is refined as the
background-subtracted, intensity-weighted mean over a circular window. Pixel coordinates
follow docs/conventions.md: (u, v) = (column, row), the centre of the top-left pixel is (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from calibration.errors import CalibrationError
from guidance.core.views import check_intensity

__all__ = ["Blobs", "attenuation_image", "detect_blobs"]


@dataclass(frozen=True)
class Blobs:
    """Detected blobs, one row each.

    ``uv`` (N, 2) sub-pixel centres (px); ``radius_px`` (N,) radius of an equivalent
    projected sphere from the second moments (blur inflates it slightly); ``integral``
    (N,) background-subtracted attenuation summed over the blob (attenuation x px^2,
    proportional to the projected volume); ``elongation`` (N,) ratio of the principal
    axes (1 for a round blob, larger for merged blobs).
    """

    uv: np.ndarray
    radius_px: np.ndarray
    integral: np.ndarray
    elongation: np.ndarray

    def __len__(self) -> int:
        return len(self.uv)


def attenuation_image(image: np.ndarray, *, intensity: str = "raw",
                      I0: float | None = None) -> np.ndarray:
    """Float image that is larger where the X-ray was attenuated more.

    ``line_integral`` images are returned as they are. ``raw`` images (detector counts,
    bright where unattenuated) and ``display`` images (treated as raw: metal dark) give
    ``-log(I / I0)``; without ``I0`` the 99.9th percentile of the image is used.
    """
    check_intensity(intensity)
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise CalibrationError(f"expected a single-channel 2-D image, got shape {img.shape}")
    if intensity == "line_integral":
        return img
    level = float(np.percentile(img, 99.9)) if I0 is None else float(I0)
    if not level > 0:
        raise CalibrationError("the unattenuated level I0 must be positive")
    return -np.log(np.clip(img, 0.5, None) / level)


def _refine(att: np.ndarray, u: float, v: float, r_win: float,
            n_iter: int = 3) -> tuple[float, float, float, float, float] | None:
    """Background-subtracted weighted centroid in a circular window of radius ``r_win``
    (px) about (u, v); the background is a plane fitted to an annulus 1..4 px outside
    the window.
    Returns (u, v, radius_px, integral, elongation, background scatter) or None at the
    border or with no positive signal."""
    H, W = att.shape
    r_out = r_win + 4.0
    for _ in range(n_iter):
        u_lo, u_hi = int(np.floor(u - r_out)), int(np.ceil(u + r_out))
        v_lo, v_hi = int(np.floor(v - r_out)), int(np.ceil(v + r_out))
        if u_lo < 0 or v_lo < 0 or u_hi >= W or v_hi >= H:
            return None
        patch = att[v_lo:v_hi + 1, u_lo:u_hi + 1]
        vv, uu = np.mgrid[v_lo:v_hi + 1, u_lo:u_hi + 1]
        d2 = (uu - u) ** 2 + (vv - v) ** 2
        inner = d2 <= r_win ** 2
        annulus = (d2 > (r_win + 1.0) ** 2) & (d2 <= r_out ** 2)
        A = np.column_stack([np.ones(annulus.sum()), uu[annulus] - u, vv[annulus] - v])
        plane = np.linalg.lstsq(A, patch[annulus], rcond=None)[0]
        bg_scatter = float(np.std(patch[annulus] - A @ plane))
        w = patch[inner] - (plane[0] + plane[1] * (uu[inner] - u) + plane[2] * (vv[inner] - v))
        total = w.sum()
        if not total > 0:
            return None
        u = float((w * uu[inner]).sum() / total)
        v = float((w * vv[inner]).sum() / total)
    du, dv = uu[inner] - u, vv[inner] - v
    cov = np.array([[(w * du * du).sum(), (w * du * dv).sum()],
                    [(w * du * dv).sum(), (w * dv * dv).sum()]]) / total
    ev = np.linalg.eigvalsh(cov)
    # A projected sphere of radius R has <r^2> = 0.4 R^2 about its centre.
    radius = float(np.sqrt(max(2.5 * (ev[0] + ev[1]), 0.0)))
    elongation = float(np.sqrt(ev[1] / ev[0])) if ev[0] > 0 else np.inf
    return u, v, radius, float(total), elongation, bg_scatter


def detect_blobs(attenuation: np.ndarray, *, min_radius_px: float = 1.0,
                 max_radius_px: float = 12.0, threshold_sigma: float = 5.0,
                 max_elongation: float = 1.5, max_background_scatter: float = 3.0,
                 mask: np.ndarray | None = None) -> Blobs:
    """Round attenuating blobs of radius ``min_radius_px``..``max_radius_px`` (px).

    ``attenuation`` is an image from :func:`attenuation_image`. Pixels exceeding the
    background (top-hat) by ``threshold_sigma`` robust noise deviations form candidate
    components; components of implausible area, touching the border, with no signal or
    elongated beyond ``max_elongation`` (merged or partial blobs), or whose background
    annulus deviates from a plane by more than ``max_background_scatter`` x the median
    over all blobs (edges, neighbours) are dropped. ``mask``
    (bool, H x W) restricts detection to a field of view; blobs whose centroid window
    and background annulus are not wholly inside it are dropped.
    """
    att = np.asarray(attenuation, dtype=np.float32)
    size = 2 * int(np.ceil(max_radius_px)) + 5
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    tophat = cv2.morphologyEx(att, cv2.MORPH_TOPHAT, kernel)
    smooth = cv2.GaussianBlur(tophat, (0, 0), 1.0)
    inside = np.ones(att.shape, bool) if mask is None else np.asarray(mask, bool)
    values = smooth[inside]
    level = np.median(values)
    sigma = 1.4826 * np.median(np.abs(values - level))
    fg = ((smooth > level + threshold_sigma * max(sigma, 1e-6)) & inside).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(fg, connectivity=8)
    depth = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)
    min_area = max(3.0, 0.5 * np.pi * min_radius_px ** 2)
    max_area = 1.5 * np.pi * max_radius_px ** 2
    rows = []
    att64 = att.astype(np.float64)
    for k in range(1, n):
        area = stats[k, cv2.CC_STAT_AREA]
        if not min_area <= area <= max_area:
            continue
        r_win = 1.3 * np.sqrt(area / np.pi) + 2.0
        found = _refine(att64, centroids[k, 0], centroids[k, 1], r_win)
        if found is None or found[4] > max_elongation:
            continue
        if depth[int(round(found[1])), int(round(found[0]))] < r_win + 5.0:
            continue
        if not min_radius_px <= found[2] <= 1.5 * max_radius_px:
            continue
        rows.append(found)
    table = np.array(rows, dtype=float).reshape(-1, 6)
    # A background that a plane does not fit (an edge, a neighbouring blob) biases the
    # centroid: drop blobs whose annulus scatter is far above the typical one.
    table = table[table[:, 5] <= max_background_scatter * np.median(table[:, 5])] \
        if len(table) else table
    return Blobs(uv=table[:, :2].copy(), radius_px=table[:, 2].copy(),
                 integral=table[:, 3].copy(), elongation=table[:, 4].copy())
