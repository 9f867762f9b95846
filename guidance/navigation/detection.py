"""Instruments found in the X-ray itself (known-component registration, no tracker).

Given registered frames (each a line-integral-like image, bone bright, as
``guidance.core.images.preprocess`` gives it, and its ``View`` with ``T_cam_from_world``
known) and the models of the straight instruments that may be in them, estimate each
instrument's tip and axis in CT coordinates (world, LPS mm):

1. **Anatomy removal**: a white top-hat of the image (image minus its morphological
   opening with a disc wider than the instrument's projected shaft) keeps thin bright
   structures and drops the smooth anatomy.
2. **Candidates**: a probabilistic Hough transform on the ridge centres of the smoothed,
   thresholded top-hat proposes straight segments; collinear pieces are merged, refitted
   to their ridge pixels and split where the ridge breaks.
3. **Refinement**: the instrument's analytic line integral (a cylinder of the model's
   diameter and length, seen through the view's pinhole, blurred by the detector PSF) is
   fitted to the top-hat: a scan of the tip along the shaft, then least squares (a free
   contrast gain and offset per view) over the tip and the axis direction, per view and
   then jointly in 3D over the views.
4. **Verification**: the gradient correlation between the fitted model and the image
   (mean normalised cross-correlation of the u and v gradients over the instrument's
   band) and the fitted contrast (close to the model's attenuation) decide; the
   thresholds keep false detections on instrument-free frames under 1% on the bench.

One view gives the tip's ray and the in-plane direction; its depth comes from the
anatomy (assumed docked on the most posterior bone surface along that ray: a posterior
approach) with an uncertainty, or is unknown (a large sigma) where the ray crosses the
spine, as in a lateral view. Two or more views of one moment give the full 3D pose
(triangulated, then refined jointly); a view and an earlier one of another orientation
give it from the two shaft planes (the instrument may have moved along its axis in
between) or, where those planes nearly coincide (an instrument near the C-arm's rotation
plane), from the two tip rays when its travel in between is bounded
(``combine_with_earlier_view``). Direction convention as in ``guidance.navigation.instruments``:
``axis_world`` points from the handle towards the tip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numba
import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import backproject, invert_rigid, project, transform_points
from guidance.core.instrument_models import METAL_MAX_LINE_INTEGRAL, InstrumentModel
from guidance.core.views import View
from guidance.core.volume import Volume

__all__ = [
    "DetectionError",
    "DetectionSettings",
    "ViewDetection",
    "InstrumentEstimate",
    "instrument_projection",
    "instrument_image",
    "anatomy_residual",
    "propose_segments",
    "detect_in_view",
    "single_view_estimate",
    "mirrored_about_ray",
    "detect_instruments",
    "combine_with_earlier_view",
    "most_certain",
]


TIP_MARGIN_PX = 3.0
"""A segment end this close to the image border is the shaft leaving the image, not a tip."""
TIP_SEARCH_PX = 20.0
"""The tip is searched this far beyond a segment's end (the ridge often breaks where the
shaft enters bone)."""
FAR_END_MARGIN_PX = 20.0
"""A far end closer than this to the border may be the shaft fading out at the image edge:
its foreshortening is not trusted."""


class DetectionError(GuidanceError):
    """Input to instrument detection that cannot be used (shapes, views, models)."""


@dataclass(frozen=True)
class DetectionSettings:
    """Detector settings.

    ``blur_sigma_px``: detector PSF (Gaussian sigma, pixels) of the projection model;
    ``min_length_px``: shortest visible shaft proposed; ``max_candidates``: segments tried
    per search (each with every model; the best-correlated model is refined);
    ``max_instruments``: instruments found per view at most; ``max_searches``: proposal
    rounds per view (the later ones only where an instrument found hid something);
    ``min_gradient_correlation`` and ``gain_range``: a fitted instrument is accepted when
    its gradient correlation reaches the threshold and its fitted contrast, relative to
    the model's attenuation, lies in the range (K-wires found in the simulator's images at
    an exposure control's dose: 0.61-0.86; false fits 0.06-0.10); ``min_guided_correlation``: the (stricter)
    threshold for an instrument looked for where another view places it (a wider search,
    so more chances of a false fit); ``max_pixels``: band pixels used per view
    in the fit (subsampled away from the tip); ``max_iterations``: function evaluations
    of a least-squares refinement; ``match_distance_mm``: largest distance between two
    views' tip rays for them to be the same instrument; ``depth_sigma_mm``: single-view
    depth uncertainty where the anatomy cannot give the depth (no bone volume, no bone on
    the tip's ray, or a ray crossing the spine: the depth is then the focus point's).
    """

    blur_sigma_px: float = 0.7
    min_length_px: float = 10.0
    max_candidates: int = 3
    max_instruments: int = 4
    max_searches: int = 2
    min_gradient_correlation: float = 0.45
    min_guided_correlation: float = 0.5
    gain_range: tuple[float, float] = (0.5, 1.5)
    max_pixels: int = 1200
    max_iterations: int = 15
    match_distance_mm: float = 10.0
    depth_sigma_mm: float = 30.0


@dataclass(frozen=True)
class ViewDetection:
    """One instrument found in one view.

    ``tip_uv``: tip pixel (u, v); ``direction_uv``: unit image direction from the handle
    towards the tip; ``tip_cam`` / ``axis_cam``: the fitted 3D model in the camera frame
    (mm; the depth and out-of-plane angle are weakly determined in one view);
    ``gradient_correlation`` in [-1, 1]; ``gain``: fitted contrast relative to the
    model; ``tip_sigma_px``: 1-sigma in-plane tip uncertainty from the fit (pixels);
    ``far_uv``: the projected far (handle-side) end of the working part when it lies in
    the image (then tip and far end might be swapped), else None; ``direction_sigma_deg``:
    1-sigma of the shaft's image direction from the fit.
    """

    model: InstrumentModel
    tip_uv: np.ndarray
    direction_uv: np.ndarray
    tip_cam: np.ndarray
    axis_cam: np.ndarray
    gradient_correlation: float
    gain: float
    tip_sigma_px: float
    far_uv: np.ndarray | None = None
    direction_sigma_deg: float = math.nan

    def swapped(self) -> "ViewDetection":
        """The same shaft with tip and far end exchanged (needs ``far_uv``)."""
        far_cam = self.tip_cam + self.model.length_mm * self.axis_cam
        return dataclasses.replace(self, tip_uv=self.far_uv, far_uv=self.tip_uv, direction_uv=-self.direction_uv,
                                   tip_cam=far_cam, axis_cam=-self.axis_cam)


@dataclass(frozen=True)
class InstrumentEstimate:
    """An instrument's pose in CT coordinates estimated from the images alone.

    ``tip_world`` (mm) and ``axis_world`` (unit, handle -> tip); ``n_views``: views it was
    found in; ``score``: the lowest gradient correlation over those views;
    ``tip_sigma_mm``: 1-sigma tip uncertainty across the viewing ray (in-plane, at the
    tip); ``depth_sigma_mm``: along the viewing ray (single view: from the anatomy;
    several views: from the fit); ``axis_sigma_deg``: 1-sigma axis uncertainty (single
    view: the out-of-plane angle is unknown, 90). Two views of different moments combined
    by their tip rays (``combine_with_earlier_view``), placed as if the instrument had not
    moved in between: ``tip_if_moved_world``, where the true tip lies had it moved the
    whole travel bound (the true tip lies between the two; ``depth_sigma_mm`` covers that
    span), and ``depth_sigma_unmoved_mm``, the depth sigma of the views' noise alone;
    otherwise None and ``depth_sigma_mm``.
    """

    model: InstrumentModel
    tip_world: np.ndarray
    axis_world: np.ndarray
    n_views: int
    score: float
    tip_sigma_mm: float
    depth_sigma_mm: float
    axis_sigma_deg: float
    detections: tuple[ViewDetection, ...]
    tip_if_moved_world: np.ndarray | None = None
    depth_sigma_unmoved_mm: float | None = None

    @property
    def sigma_unmoved_mm(self) -> float:
        """1-sigma of the tip (mm, in-plane and depth together) from the views' noise alone."""
        depth = self.depth_sigma_mm if self.depth_sigma_unmoved_mm is None else self.depth_sigma_unmoved_mm
        return math.hypot(self.tip_sigma_mm, depth)


# ----------------------------------------------------------------------- projection model

_GH_NODES = np.array([-1.0, 1.0])
_GH_WEIGHTS = np.array([0.5, 0.5])
"""Two-point Gauss-Hermite rule for a unit Gaussian: exact for polynomials to degree 3."""


def _psf_rays(K: np.ndarray, uv: np.ndarray, blur_sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit camera-frame rays (N, 4, 3) and weights (4,) sampling each pixel's footprint:
    the detector PSF convolved with the pixel box, as a Gaussian quadrature."""
    sigma = math.sqrt(blur_sigma_px ** 2 + 1.0 / 12.0)
    du, dv = (g.ravel() * sigma for g in np.meshgrid(_GH_NODES, _GH_NODES))
    weights = np.outer(_GH_WEIGHTS, _GH_WEIGHTS).ravel()
    Kinv = np.linalg.inv(K)
    u = uv[:, :1] + du
    v = uv[:, 1:] + dv
    d = np.stack([Kinv[0, 0] * u + Kinv[0, 1] * v + Kinv[0, 2], Kinv[1, 1] * v + Kinv[1, 2],
                  np.ones_like(u)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return d, weights


@numba.njit(cache=True, fastmath=True)
def _cylinder_kernel(rays, weights, tip, w, radius, length, mu, max_integral, out):  # pragma: no cover - compiled
    """Per pixel, -log of the weighted mean over its rays of exp(-min(mu * chord,
    max_integral)), the chord (mm) through the finite cylinder (axis from ``tip`` along
    unit ``w`` for ``length``, ``radius``): the detector blurs intensities, not line
    integrals, which matters where the steel is dense (a wire seen end-on)."""
    pp = tip[0] * tip[0] + tip[1] * tip[1] + tip[2] * tip[2]
    f = w[0] * tip[0] + w[1] * tip[1] + w[2] * tip[2]
    r2 = radius * radius
    for n in range(rays.shape[0]):
        acc = 0.0
        for m in range(rays.shape[1]):
            value = 0.0
            d0, d1, d2 = rays[n, m, 0], rays[n, m, 1], rays[n, m, 2]
            b = d0 * w[0] + d1 * w[1] + d2 * w[2]
            e = d0 * tip[0] + d1 * tip[1] + d2 * tip[2]
            sin2 = max(1.0 - b * b, 1e-12)
            s = (e - b * f) / sin2
            t = (b * e - f) / sin2
            gap2 = s * s + pp + t * t - 2.0 * s * e - 2.0 * s * t * b + 2.0 * t * f
            if gap2 < r2:
                chord = 2.0 * math.sqrt((r2 - gap2) / sin2)
                half = 0.5 * chord * abs(b)
                if half > 1e-9:
                    lo = max(t - half, 0.0)
                    hi = min(t + half, length)
                    if hi > lo:
                        value = min(mu * chord * (hi - lo) / (2.0 * half), max_integral)
                elif 0.0 <= t <= length:
                    value = min(mu * chord, max_integral)
            acc += weights[m] * math.exp(-value)
        out[n] = -math.log(acc)


@numba.njit(cache=True, fastmath=True)
def _scan_kernel(rays, weights, values, tips, axes, radius, length, mu, max_integral, out):  # pragma: no cover
    """Per pose k (``tips[k]``, unit ``axes[k]``, camera frame): the sum of squared residuals
    of the band ``values`` against the model's line integral (``_cylinder_kernel``) with the
    best gain and offset (``_fit_linear``); the cost ``_band_residual`` gives, times noise^2."""
    n = values.shape[0]
    m = np.empty(n)
    for k in range(tips.shape[0]):
        _cylinder_kernel(rays, weights, tips[k], axes[k], radius, length, mu, max_integral, m)
        a, c = _fit_linear(m, values)
        cost = 0.0
        for i in range(n):
            d = a * m[i] + c - values[i]
            cost += d * d
        out[k] = cost


def _cylinder_integral(rays: np.ndarray, weights: np.ndarray, tip_cam: np.ndarray, axis_cam: np.ndarray,
                       model: InstrumentModel) -> np.ndarray:
    """Weighted line integral (N,) of the model's cylinder (tip at ``tip_cam``, running
    ``model.length_mm`` along ``axis_cam`` towards the handle) along ``rays`` (N, M, 3)
    from the source. A ray meets the infinite cylinder over a chord of length
    2 sqrt(r^2 - e^2) / sin(angle) (e: distance between the ray and the axis line); the end
    caps keep the part of that chord whose axial coordinate lies in [0, length]; the line
    integral saturates at METAL_MAX_LINE_INTEGRAL as the simulator's does, and the rays of a
    pixel are averaged as intensities."""
    out = np.empty(rays.shape[0])
    w = np.asarray(axis_cam, float) / np.linalg.norm(axis_cam)
    _cylinder_kernel(rays, weights, np.asarray(tip_cam, float), w, model.diameter_mm / 2.0, model.length_mm,
                     model.mu_per_mm, METAL_MAX_LINE_INTEGRAL, out)
    return out


def instrument_projection(view: View, tip_cam: np.ndarray, axis_cam: np.ndarray, model: InstrumentModel,
                          pixels_uv: np.ndarray, *, blur_sigma_px: float = 0.7) -> np.ndarray:
    """The instrument's expected line integral (N,) at pixels (N, 2) = (u, v) of ``view``.

    ``tip_cam`` (mm) and ``axis_cam`` (unit, tip -> handle) in the camera frame; the
    working part is a cylinder of ``model.diameter_mm`` and ``model.length_mm`` with
    attenuation ``model.mu_per_mm`` (saturating at ``METAL_MAX_LINE_INTEGRAL``); each pixel
    integrates its box and a Gaussian PSF of ``blur_sigma_px`` (as intensities). The
    detector's own model, independent of the simulator's.
    """
    uv = np.asarray(pixels_uv, dtype=float).reshape(-1, 2)
    rays, weights = _psf_rays(view.K, uv, blur_sigma_px)
    return _cylinder_integral(rays, weights, np.asarray(tip_cam, float), np.asarray(axis_cam, float), model)


# ------------------------------------------------------------------------------ candidates


def _projected_width_px(view: View, model: InstrumentModel, depth_mm: float) -> float:
    """The shaft's projected width (pixels) at camera depth ``depth_mm``."""
    return model.diameter_mm * max(view.K[0, 0], view.K[1, 1]) / depth_mm


def anatomy_residual(image: np.ndarray, width_px: float) -> np.ndarray:
    """Thin bright structures of a line-integral image (bone bright): the white top-hat
    with a disc of diameter about 1.5 ``width_px`` + 5 pixels, so a shaft ``width_px`` wide
    survives whole while the anatomy's broader structures are removed. Non-negative."""
    radius = int(math.ceil(0.75 * width_px + 2.0))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.morphologyEx(image.astype(np.float32), cv2.MORPH_TOPHAT, disc)


def _noise_sigma(residual: np.ndarray) -> float:
    """Robust noise level of a top-hat image (median absolute deviation of its high-pass,
    over every other pixel in u and v: a quarter of the pixels estimate it as well)."""
    high = residual - cv2.GaussianBlur(residual, (0, 0), 2.0)
    return max(float(np.median(np.abs(high))) * 1.4826 * 1.2, 1e-6)


def propose_segments(residual: np.ndarray, width_px: float, expected_peak: float, *,
                     min_length_px: float = 10.0, max_candidates: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    """Straight bright segments of a top-hat image, strongest (mean ridge value) first:
    (end0, end1) pixels.

    The top-hat, smoothed at a quarter of the shaft width (at least 1 px), is thresholded
    at the larger of 5 noise sigmas and a quarter of ``expected_peak`` (the model's
    central line integral) and thinned to ridge centres; a probabilistic Hough transform
    finds segments; segments on one line are merged, the line refitted to the ridge
    pixels along it (weighted principal axis) and split where the ridge breaks for more
    than 3 px.
    """
    sigma = max(1.0, width_px / 4.0)
    smooth = cv2.GaussianBlur(residual, (0, 0), sigma)
    threshold = max(5.0 * _noise_sigma(smooth), 0.25 * expected_peak)
    # Ridge centres only (a local maximum across u or v): thin lines, few Hough segments.
    peak_u = np.zeros_like(smooth, dtype=bool)
    peak_v = np.zeros_like(smooth, dtype=bool)
    peak_u[:, 1:-1] = (smooth[:, 1:-1] >= smooth[:, :-2]) & (smooth[:, 1:-1] >= smooth[:, 2:])
    peak_v[1:-1] = (smooth[1:-1] >= smooth[:-2]) & (smooth[1:-1] >= smooth[2:])
    mask = ((smooth > threshold) & (peak_u | peak_v)).astype(np.uint8)
    lines = cv2.HoughLinesP(mask, 1.0, math.pi / 360.0, int(min_length_px), minLineLength=min_length_px,
                            maxLineGap=3)
    if lines is None:
        return []
    ends = lines.reshape(-1, 4).astype(float)
    ends = ends[np.argsort(-np.hypot(ends[:, 2] - ends[:, 0], ends[:, 3] - ends[:, 1]), kind="stable")]
    tol = 2.0 + width_px / 2.0
    # Greedy clustering, longest segment first: a segment joins the first cluster whose
    # founding segment's line passes within ``tol`` of both its ends.
    members = np.full(len(ends), -1)
    founders: list[int] = []
    for k in range(len(ends)):
        if members[k] >= 0:
            continue
        members[k] = k
        founders.append(k)
        p0, p1 = ends[k, :2], ends[k, 2:]
        direction = (p1 - p0) / math.hypot(*(p1 - p0))
        normal = np.array([-direction[1], direction[0]])
        later = np.arange(k + 1, len(ends))
        later = later[members[later] < 0]
        close = ((np.abs((ends[later, :2] - p0) @ normal) <= tol) & (np.abs((ends[later, 2:] - p0) @ normal) <= tol))
        members[later[close]] = k
    candidates = []
    margin = int(math.ceil(2.0 * tol)) + 3
    for k in founders:
        pts = ends[members == k].reshape(-1, 2)
        direction = _unit(pts[1] - pts[0])
        normal = np.array([-direction[1], direction[0]])
        s = (pts - pts[0]) @ direction
        # The line through the ridge pixels along the cluster (weighted principal axis):
        # finer than the Hough quantisation; only the ridge pixels in the cluster's box
        # (grown by the tolerances) can be near it.
        lo = np.maximum(np.floor(pts.min(axis=0)).astype(int) - margin, 0)
        hi = np.ceil(pts.max(axis=0)).astype(int) + margin + 1
        box_v, box_u = np.nonzero(mask[lo[1]:hi[1], lo[0]:hi[0]])
        ridge = np.column_stack([box_u + lo[0], box_v + lo[1]]).astype(float)
        rel = ridge - pts[0]
        near = (np.abs(rel @ normal) <= tol) & (rel @ direction >= s.min() - 2) & (rel @ direction <= s.max() + 2)
        if near.sum() >= 3:
            w = smooth[box_v[near] + lo[1], box_u[near] + lo[0]].astype(float)
            centre = (ridge[near] * w[:, None]).sum(axis=0) / w.sum()
            d = ridge[near] - centre
            cov = (d * w[:, None]).T @ d
            direction = np.linalg.eigh(cov)[1][:, -1]
            normal = np.array([-direction[1], direction[0]])
            pts = np.vstack([centre, pts])
        s = (pts - pts[0]) @ direction
        offsets = np.sort((pts - pts[0]) @ normal)  # their median (np.median's overhead counts here)
        middle = len(offsets) // 2
        median = offsets[middle] if len(offsets) % 2 else 0.5 * (offsets[middle - 1] + offsets[middle])
        base = pts[0] + float(median) * normal
        steps = np.arange(s.min(), s.max() + 1.0)
        samples = base + steps[:, None] * direction
        # Strength at each step: the best of three positions across the line.
        across = samples[None] + np.array([-1.0, 0.0, 1.0])[:, None, None] * normal
        values = _sample(smooth, across.reshape(-1, 2)).reshape(3, -1).max(axis=0)
        above = values > threshold
        for first, last in _runs(above, max_gap=3):
            if steps[last] - steps[first] >= min_length_px:
                candidates.append((float(values[first:last + 1].mean()), samples[first], samples[last]))
                step = _contrast_step(values[first:last + 1], int(min_length_px))
                if step is not None:  # a thicker instrument over a thinner one: its part alone too
                    k, strong_first = step
                    a, b = (first, first + k - 1) if strong_first else (first + k, last)
                    outer = samples[a] if strong_first else samples[b]
                    # Only where the thicker one runs out of the image (its handle side): its
                    # tip is then where the ridge steps down.
                    if _near_border_px(outer, residual.shape, FAR_END_MARGIN_PX):
                        candidates.append((float(values[a:b + 1].mean()), samples[a], samples[b]))
    candidates.sort(key=lambda c: -c[0])
    return [(a, b) for _, a, b in candidates[:max_candidates]]


CONTRAST_STEP_RATIO = 2.0
"""A ridge whose mean strength changes by this factor along a segment is two instruments
end to end in the image (a needle over a K-wire that runs on past its tip)."""


def _contrast_step(values: np.ndarray, min_length: int) -> tuple[int, bool] | None:
    """Where a ridge profile steps between two levels (the split maximising the
    between-part variance, each part at least ``min_length`` samples, the means at least
    ``CONTRAST_STEP_RATIO`` apart): (index of the second part's first sample, whether the
    first part is the stronger), or None."""
    n = len(values)
    if n < 2 * min_length:
        return None
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    k = np.arange(min_length, n - min_length + 1)
    left, right = cumulative[k] / k, (cumulative[n] - cumulative[k]) / (n - k)
    best = int(np.argmax(k * (n - k) * (left - right) ** 2))
    low, high = sorted((left[best], right[best]))
    if low <= 0 or high < CONTRAST_STEP_RATIO * low:
        return None
    return int(k[best]), bool(left[best] > right[best])


def _near_border_px(uv: np.ndarray, shape: tuple[int, int], margin_px: float) -> bool:
    """Whether pixel (u, v) lies within ``margin_px`` of the border of an image of ``shape`` (H, W)."""
    return bool(uv[0] < margin_px or uv[1] < margin_px or uv[0] > shape[1] - 1 - margin_px
                or uv[1] > shape[0] - 1 - margin_px)


def _sample(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest-pixel values of ``image`` at points (N, 2), 0 outside."""
    iu, iv = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
    ok = (iu >= 0) & (iv >= 0) & (iu < image.shape[1]) & (iv < image.shape[0])
    out = np.zeros(len(uv), dtype=float)
    out[ok] = image[iv[ok], iu[ok]]
    return out


def _runs(flags: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """(first, last) indices of the runs of True in ``flags``, bridging gaps up to ``max_gap``."""
    idx = np.flatnonzero(flags)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


# ------------------------------------------------------------------------------ refinement


@dataclass
class _Band:
    """Pixels around a projected instrument, their PSF rays and the image values there."""

    uv: np.ndarray
    rays: np.ndarray
    weights: np.ndarray
    values: np.ndarray
    grad_u: np.ndarray
    grad_v: np.ndarray
    noise: float
    shifted_rays: dict = dataclasses.field(default_factory=dict)
    """PSF rays of the band's pixels shifted by (du, dv), by shift (``_verify``'s gradients)."""


def _band(view: View, residual: np.ndarray, grads: tuple[np.ndarray, np.ndarray], noise: float, tip_uv: np.ndarray,
          end_uv: np.ndarray, half_width_px: float, settings: DetectionSettings) -> _Band | None:
    """The band of pixels within ``half_width_px`` of the segment tip -> end (extended past
    the tip), all near the tip and an even subsample elsewhere (at most ``max_pixels``)."""
    H, W = residual.shape
    axis = end_uv - tip_uv
    length = float(np.linalg.norm(axis))
    if length < 1e-6:
        return None
    axis /= length
    start = tip_uv - (half_width_px + TIP_SEARCH_PX + 2.0) * axis
    lo = np.maximum(np.floor(np.minimum(start, end_uv) - half_width_px), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(start, end_uv) + half_width_px), [W - 1, H - 1]).astype(int)
    if np.any(hi <= lo):
        return None
    vv, uu = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    uv = np.column_stack([uu.ravel(), vv.ravel()]).astype(float)
    rel = uv - start
    s = rel @ axis
    d = np.abs(rel @ np.array([-axis[1], axis[0]]))
    keep = (d <= half_width_px) & (s >= 0) & (s <= length + 2.0 * half_width_px + TIP_SEARCH_PX + 8.0)
    uv, s = uv[keep], s[keep]
    near = s <= 30.0 + half_width_px + TIP_SEARCH_PX
    far_idx = np.flatnonzero(~near)
    budget = max(settings.max_pixels - int(near.sum()), 0)
    if len(far_idx) > budget:
        far_idx = far_idx[np.linspace(0, len(far_idx) - 1, budget).astype(int)]
    sel = np.concatenate([np.flatnonzero(near), far_idx])
    uv = uv[sel]
    if len(uv) < 20:
        return None
    iu, iv = uv[:, 0].astype(int), uv[:, 1].astype(int)
    rays, weights = _psf_rays(view.K, uv, settings.blur_sigma_px)
    return _Band(uv=uv, rays=rays, weights=weights, values=residual[iv, iu].astype(float),
                 grad_u=grads[0][iv, iu].astype(float), grad_v=grads[1][iv, iu].astype(float),
                 noise=noise)


@numba.njit(cache=True, fastmath=True)
def _fit_linear(model_values: np.ndarray, values: np.ndarray) -> tuple[float, float]:  # pragma: no cover
    """Gain and offset (a, c) minimising |a m + c - values|^2 (closed form; compiled, as the
    tip scan ``_scan_kernel`` calls it per pose)."""
    n = values.shape[0]
    sm, sv, smm, smv = 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        sm += model_values[i]
        sv += values[i]
        smm += model_values[i] * model_values[i]
        smv += model_values[i] * values[i]
    det = n * smm - sm * sm
    if det <= 1e-12 * max(n * smm, 1e-300):
        return 0.0, sv / max(n, 1)
    a = (n * smv - sm * sv) / det
    return a, (sv - a * sm) / n


def _band_residual(band: _Band, tip_cam: np.ndarray, axis_cam: np.ndarray, model: InstrumentModel) -> np.ndarray:
    m = _cylinder_integral(band.rays, band.weights, tip_cam, axis_cam, model)
    a, c = _fit_linear(m, band.values)
    return (a * m + c - band.values) / band.noise


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _verify(view: View, band: _Band, tip_cam: np.ndarray, axis_cam: np.ndarray, model: InstrumentModel,
            settings: DetectionSettings) -> tuple[float, float]:
    """(gradient correlation, gain) of the fitted model against the image over the band:
    the model's u and v gradients (central differences of the analytic projection) are
    correlated with the image's (Sobel / 8), and the contrast gain fitted."""
    def values(du: float, dv: float) -> np.ndarray:
        if (du, dv) not in band.shifted_rays:
            band.shifted_rays[du, dv] = _psf_rays(view.K, band.uv + np.array([du, dv]), settings.blur_sigma_px)[0]
        return _cylinder_integral(band.shifted_rays[du, dv], band.weights, tip_cam, axis_cam, model)
    gu = 0.5 * (values(1.0, 0.0) - values(-1.0, 0.0))
    gv = 0.5 * (values(0.0, 1.0) - values(0.0, -1.0))
    gc = 0.5 * (_ncc(gu, band.grad_u) + _ncc(gv, band.grad_v))
    gain, _ = _fit_linear(_cylinder_integral(band.rays, band.weights, tip_cam, axis_cam, model), band.values)
    return gc, gain


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(float(v @ v))


def _single_view_poses(Kinv: np.ndarray, tips_uv: np.ndarray, theta: float, phi: float,
                       depth_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(tip_cam, axis_cam tip -> handle), each (N, 3), of an instrument whose tip projects to
    each of ``tips_uv`` (N, 2) at camera depth ``depth_mm``, whose shaft runs in the image at
    angle ``theta`` (rad, from +u towards +v, tip -> handle) and leaves the plane
    perpendicular to the tip's ray by ``phi`` (rad, positive away from the source)."""
    def rays(uv: np.ndarray) -> np.ndarray:
        d = uv @ Kinv[:, :2].T + Kinv[:, 2]
        return d / np.sqrt(np.einsum("ij,ij->i", d, d))[:, None]

    tips_uv = np.asarray(tips_uv, float).reshape(-1, 2)
    r = rays(tips_uv)
    r2 = rays(tips_uv + np.array([math.cos(theta), math.sin(theta)]))
    e = r2 - np.einsum("ij,ij->i", r2, r)[:, None] * r
    e /= np.sqrt(np.einsum("ij,ij->i", e, e))[:, None]
    return r * (depth_mm / r[:, 2:3]), math.cos(phi) * e + math.sin(phi) * r


def _single_view_pose(Kinv: np.ndarray, tip_uv: np.ndarray, theta: float, phi: float,
                      depth_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``_single_view_poses`` for one tip pixel: (tip_cam, axis_cam), each (3,)."""
    def ray(uv: np.ndarray) -> np.ndarray:
        return _unit(Kinv @ np.array([uv[0], uv[1], 1.0]))

    r = ray(tip_uv)
    r2 = ray(tip_uv + np.array([math.cos(theta), math.sin(theta)]))
    e = _unit(r2 - (r2 @ r) * r)
    return r * depth_mm / r[2], math.cos(phi) * e + math.sin(phi) * r


@dataclass
class _Start:
    """A candidate set up for refinement in one view with one model."""

    model: InstrumentModel
    Kinv: np.ndarray
    band: _Band
    tip_uv: np.ndarray
    theta: float
    phi: float
    depth_mm: float
    gradient_correlation: float


def _start(view: View, residual: np.ndarray, grads, noise: float, model: InstrumentModel, tip_uv: np.ndarray,
           far_uv: np.ndarray, far_visible: bool, depth_mm: float, settings: DetectionSettings,
           phi: float | None = None) -> _Start | None:
    """Initial pose of a candidate segment (tip and far-end pixels) for one model: the
    out-of-plane angle ``phi`` (rad, see ``_single_view_pose``) when known, else from the
    far end's foreshortening (when visible), then the tip position by a 1-pixel scan along
    the shaft; None when no band fits in the image."""
    K = view.K
    Kinv = np.linalg.inv(K)
    theta = math.atan2(far_uv[1] - tip_uv[1], far_uv[0] - tip_uv[0])
    if phi is None and not far_visible:
        phi = 0.0
    elif phi is None:
        tip_cam, e = _single_view_pose(Kinv, tip_uv, theta, 0.0, depth_mm)
        r = _unit(tip_cam)
        phis = np.radians(np.linspace(-85.0, 85.0, 171))
        ends = tip_cam + model.length_mm * (np.cos(phis)[:, None] * e + np.sin(phis)[:, None] * r)
        ends_uv = (ends @ K.T)[:, :2] / np.maximum(ends[:, 2:3], 1e-9)
        errors = np.where(ends[:, 2] > 1.0, np.linalg.norm(ends_uv - far_uv, axis=1), np.inf)
        phi = float(phis[int(np.argmin(errors))])
    half_width = _projected_width_px(view, model, depth_mm) / 2.0 + 3.0 * settings.blur_sigma_px + 4.0
    tip_cam, axis_cam = _single_view_pose(Kinv, tip_uv, theta, phi, depth_mm)
    end_cam = tip_cam + model.length_mm * axis_cam
    end_uv = (K @ end_cam)[:2] / end_cam[2] if end_cam[2] > 1.0 else far_uv
    band = _band(view, residual, grads, noise, tip_uv, end_uv, half_width, settings)
    if band is None:
        return None
    # The tip often lies in bone whose own ridges continue the shaft: scan along it first.
    along = np.array([math.cos(theta), math.sin(theta)])
    reach = min(26.0, 0.5 * float(np.linalg.norm(far_uv - tip_uv)))
    shifts = np.arange(-20.0, reach + 1.0, 2.0)
    tips, axes = _single_view_poses(Kinv, tip_uv + shifts[:, None] * along, theta, phi, depth_mm)
    costs = np.empty(len(shifts))
    _scan_kernel(band.rays, band.weights, band.values, tips, axes, model.diameter_mm / 2.0, model.length_mm,
                 model.mu_per_mm, METAL_MAX_LINE_INTEGRAL, costs)
    tip_uv = tip_uv + shifts[int(np.argmin(costs))] * along
    gc, _ = _verify(view, band, *_single_view_pose(Kinv, tip_uv, theta, phi, depth_mm), model, settings)
    return _Start(model, Kinv, band, tip_uv, theta, phi, depth_mm, gc)


def _refine_single(view: View, start: _Start, far_visible: bool, settings: DetectionSettings) -> ViewDetection | None:
    """Least-squares refinement of the tip pixel, the in-plane angle and, when the far end
    is in the image, the out-of-plane angle (a weak prior keeps it near its start; without
    the far end it stays fixed: the image cannot show it); None if the result fails
    verification."""
    from scipy.optimize import least_squares  # here: the live pipeline starts faster without scipy

    model, band = start.model, start.band
    prior_rad = math.radians(20.0)
    n = 4 if far_visible else 3

    def pose(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phi = start.phi + (p[3] if far_visible else 0.0)
        return _single_view_pose(start.Kinv, start.tip_uv + p[:2], start.theta + p[2], phi, start.depth_mm)

    def residuals(p: np.ndarray) -> np.ndarray:
        r = _band_residual(band, *pose(p), model)
        return np.append(r, p[3] / prior_rad) if far_visible else r

    fit = least_squares(residuals, np.zeros(n), x_scale=np.array([1.0, 1.0, 0.02, 0.1])[:n],
                        diff_step=1e-3, max_nfev=settings.max_iterations, ftol=1e-5, xtol=1e-5)
    tip_cam, axis_cam = pose(fit.x)
    gc, gain = _verify(view, band, tip_cam, axis_cam, model, settings)
    if gc < settings.min_gradient_correlation or not settings.gain_range[0] <= gain <= settings.gain_range[1]:
        return None
    cov = _covariance(residuals, fit.x, np.array([0.05, 0.05, 1e-3, 1e-3])[:n])
    tip_sigma = math.sqrt(max(float(np.trace(cov[:2, :2])) / 2.0, 0.0))
    K = view.K
    tip_fit = (K @ tip_cam)[:2] / tip_cam[2]
    end_cam = tip_cam + model.length_mm * axis_cam
    far_uv = (K @ end_cam)[:2] / end_cam[2]
    if _shaft_runs_on(band, tip_fit, _unit(tip_fit - far_uv)):
        return None
    return ViewDetection(model=model, tip_uv=tip_fit, direction_uv=_unit(tip_fit - far_uv), tip_cam=tip_cam,
                         axis_cam=axis_cam, gradient_correlation=gc, gain=gain, tip_sigma_px=tip_sigma,
                         direction_sigma_deg=math.degrees(math.sqrt(max(float(cov[2, 2]), 0.0))),
                         far_uv=far_uv if far_visible else None)


TIP_END_RATIO = 0.5
"""Beyond a true tip the image is at most this fraction of the shaft just behind it."""


def _shaft_runs_on(band: _Band, tip_uv: np.ndarray, direction_uv: np.ndarray) -> bool:
    """Whether the image continues the shaft past a fitted tip (the mean within 1.5 px of
    the axis line 3-15 px beyond the tip reaching ``TIP_END_RATIO`` of the mean 3-15 px
    behind it): the tip was put on a piece of a longer shaft (a break in its ridge, the
    image border), not where the instrument ends. False when the band has too few pixels
    on either side to tell."""
    rel = band.uv - tip_uv
    along = rel @ direction_uv
    across = np.abs(rel @ np.array([-direction_uv[1], direction_uv[0]]))
    on_line = across <= 1.5
    beyond = on_line & (along >= 3.0) & (along <= 15.0)
    behind = on_line & (along <= -3.0) & (along >= -15.0)
    if beyond.sum() < 5 or behind.sum() < 5:
        return False
    shaft = float(band.values[behind].mean())
    return shaft > 0 and float(band.values[beyond].mean()) >= TIP_END_RATIO * shaft


def _covariance(residuals, x: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Parameter covariance of a least-squares solution ``x``: (J^T J)^-1 s^2, with J by
    central differences of ``steps`` and s^2 the residual variance; inf when singular."""
    r0 = residuals(x)
    J = np.column_stack([(residuals(x + np.eye(len(x))[k] * h) - residuals(x - np.eye(len(x))[k] * h)) / (2 * h)
                         for k, h in enumerate(steps)])
    try:
        return np.linalg.inv(J.T @ J) * float(r0 @ r0) / max(len(r0) - len(x), 1)
    except np.linalg.LinAlgError:
        return np.full((len(x), len(x)), np.inf)


def _near_border(uv: np.ndarray, view: View, margin_px: float) -> bool:
    return _near_border_px(uv, view.shape, margin_px)


def _check_inputs(image: np.ndarray, view: View, models) -> None:
    if not isinstance(view, View):
        raise DetectionError(f"view must be a View, got {type(view).__name__}")
    if np.ndim(image) != 2 or image.shape != view.shape:
        raise DetectionError(f"image of shape {np.shape(image)} does not match its view "
                             f"({view.width}x{view.height})")
    if not models or not all(isinstance(m, InstrumentModel) for m in models):
        raise DetectionError("models must be a non-empty sequence of InstrumentModel")


def detect_in_view(image: np.ndarray, view: View, models: list[InstrumentModel] | tuple[InstrumentModel, ...],
                   focus_world: np.ndarray, *, settings: DetectionSettings | None = None) -> list[ViewDetection]:
    """The instruments found in one registered view, best first.

    ``image``: line-integral-like (bone bright, ``preprocess``); ``view``: its registered
    geometry; ``models``: the instruments that may be present (each candidate gets the
    best-fitting one); ``focus_world``: a point of the anatomy in CT coordinates (e.g. the
    registered vertebra's centre): its depth seeds the fit, and of a segment's two ends,
    the tip is one not at the image border and nearer the focus's projection.

    Each instrument accepted is subtracted from the image (its fitted projection,
    ``instrument_image``) before the next candidate is fitted, and a further search looks
    at what the subtractions revealed, so a shaft lying over another one leaves the other
    visible; candidates that failed are tried again only where a subtraction changed the
    image under them.
    """
    return [found for found, _ in _detect_view(image, view, models, focus_world, settings or DetectionSettings())[0]]


def _detect_view(image: np.ndarray, view: View, models, focus_world: np.ndarray, settings: DetectionSettings
                 ) -> tuple[list[tuple[ViewDetection, tuple[slice, slice, np.ndarray]]], np.ndarray]:
    """``detect_in_view``'s work: ([(detection, its ``instrument_image``)] best first, the
    anatomy residual before any subtraction)."""
    _check_inputs(image, view, models)
    focus_cam = transform_points(view.T_cam_from_world, np.asarray(focus_world, float))
    depth = float(focus_cam[2])
    if depth <= 0:
        raise DetectionError("the focus point lies behind the X-ray source")
    focus_uv = (view.K @ focus_cam)[:2] / depth
    image = np.nan_to_num(np.asarray(image, dtype=np.float32))
    width = max(_projected_width_px(view, m, depth) for m in models)
    base = anatomy_residual(image, width)
    residual = base.copy()
    noise = _noise_sigma(residual)
    peak = min(m.mu_per_mm * m.diameter_mm for m in models)
    thinnest = min(_projected_width_px(view, m, depth) for m in models)
    found: list[ViewDetection] = []
    images: list[tuple[slice, slice, np.ndarray]] = []
    failed: list[tuple[np.ndarray, np.ndarray]] = []
    covered = np.zeros(residual.shape, bool)  # pixels of the instruments subtracted so far
    for search in range(settings.max_searches):
        # Proposals ignore the instruments found (their footprint suppressed): a shaft they
        # hide is proposed from what shows beyond them, and fitted to the image less them.
        candidates = propose_segments(np.where(covered, 0.0, residual).astype(np.float32), thinnest, peak,
                                      min_length_px=settings.min_length_px, max_candidates=settings.max_candidates)
        if search > 0:  # after the first search, only what the subtractions revealed
            candidates = [c for c in candidates if any(_covered_near(covered, e, 3) for e in c)]
        accepted = False
        for a, b in candidates:
            if len(found) >= settings.max_instruments or any(_same_segment((a, b), f) for f in failed):
                continue
            grads = (cv2.Sobel(residual, cv2.CV_32F, 1, 0, ksize=3) / 8.0,
                     cv2.Sobel(residual, cv2.CV_32F, 0, 1, ksize=3) / 8.0)
            best = _candidate(view, residual, grads, noise, models, a, b, focus_uv, depth, found, covered, settings)
            if best is None:
                failed.append((a, b))
                continue
            found.append(best)
            accepted = True
            rows, cols, patch = instrument_image(view, best, settings=settings)
            images.append((rows, cols, patch))
            residual[rows, cols] -= patch
            covered[rows, cols] |= patch > 0.1 * float(patch.max(initial=0.0))
            # Segments under the subtracted instrument see a different image now: try them again.
            failed = [f for f in failed if not _crosses(f, rows, cols, patch)]
        if not accepted:
            break
    pairs = sorted(zip(found, images), key=lambda p: -p[0].gradient_correlation)
    return pairs, base


def _candidate(view: View, residual: np.ndarray, grads, noise: float, models, a: np.ndarray, b: np.ndarray,
               focus_uv: np.ndarray, depth_mm: float, found: list[ViewDetection], covered: np.ndarray,
               settings: DetectionSettings) -> ViewDetection | None:
    """The instrument fitted to one candidate segment (the best-correlated model, refined
    and verified), or None; an instrument of a model already found on the same image line
    is not found twice. A segment end at the image border or on an instrument
    already found (``covered``) is where the shaft disappears, not one of its ends."""
    def hidden(e: np.ndarray, margin_px: float) -> bool:
        return _near_border(e, view, margin_px) or _covered_near(covered, e, 3)

    tip_uv, far_uv = sorted((a, b), key=lambda e: (hidden(e, TIP_MARGIN_PX), np.linalg.norm(e - focus_uv)))
    if hidden(tip_uv, TIP_MARGIN_PX):
        return None
    far_visible = not hidden(far_uv, FAR_END_MARGIN_PX)
    starts = [_start(view, residual, grads, noise, model, tip_uv, far_uv, far_visible, depth_mm, settings)
              for model in models]
    starts = [st for st in starts if st is not None]
    if not starts:
        return None
    start = max(starts, key=lambda st: st.gradient_correlation)
    if start.gradient_correlation < settings.min_gradient_correlation - 0.15:
        return None
    best = _refine_single(view, start, far_visible, settings)
    if best is None or any(_same_line(d, best) for d in found):
        return None
    return best


def _covered_near(covered: np.ndarray, uv: np.ndarray, radius_px: int) -> bool:
    """Whether any pixel within ``radius_px`` (a square) of ``uv`` is set in ``covered``."""
    u, v = int(round(uv[0])), int(round(uv[1]))
    return bool(covered[max(v - radius_px, 0):v + radius_px + 1, max(u - radius_px, 0):u + radius_px + 1].any())


def _same_line(a: ViewDetection, b: ViewDetection, offset_px: float = 4.0) -> bool:
    """Two detections of one model on one image line (parallel within about 5 deg, ``b``'s
    tip within ``offset_px`` of ``a``'s line): one shaft, e.g. what an imperfect
    subtraction of ``a`` left of it, not a second instrument."""
    if a.model.name != b.model.name or abs(float(a.direction_uv @ b.direction_uv)) < 0.996:
        return False
    normal = np.array([-a.direction_uv[1], a.direction_uv[0]])
    return abs(float((b.tip_uv - a.tip_uv) @ normal)) < offset_px


def _same_segment(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], tol_px: float = 3.0) -> bool:
    """Two candidate segments with the same ends (either order) within ``tol_px``."""
    return bool(max(np.linalg.norm(a[0] - b[0]), np.linalg.norm(a[1] - b[1])) <= tol_px
                or max(np.linalg.norm(a[0] - b[1]), np.linalg.norm(a[1] - b[0])) <= tol_px)


def _crosses(segment: tuple[np.ndarray, np.ndarray], rows: slice, cols: slice, patch: np.ndarray) -> bool:
    """Whether a segment passes over the non-zero pixels of ``patch`` (placed at rows, cols)."""
    a, b = segment
    n = int(np.ceil(np.linalg.norm(b - a))) + 1
    uv = np.round(a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)).astype(int)
    iu, iv = uv[:, 0] - cols.start, uv[:, 1] - rows.start
    ok = (iu >= 0) & (iv >= 0) & (iu < patch.shape[1]) & (iv < patch.shape[0])
    return bool(np.any(patch[iv[ok], iu[ok]] != 0))


def instrument_image(view: View, detection: ViewDetection, *,
                     settings: DetectionSettings | None = None) -> tuple[slice, slice, np.ndarray]:
    """The fitted instrument as the image shows it: its fitted contrast (``gain``) times
    the model's line integral (``instrument_projection``) on the pixels within its projected
    half-width plus the blur of the shaft, zero elsewhere; returned as (rows, cols, patch)
    so that ``image[rows, cols] -= patch`` removes it."""
    settings = settings or DetectionSettings()
    model = detection.model
    tip_cam = detection.tip_cam
    end_cam = tip_cam + model.length_mm * detection.axis_cam
    tip_uv = detection.tip_uv
    end_uv = (view.K @ end_cam)[:2] / end_cam[2] if end_cam[2] > 1.0 else tip_uv - 1e4 * detection.direction_uv
    half = _projected_width_px(view, model, float(tip_cam[2])) / 2.0 + 3.0 * settings.blur_sigma_px + 1.0
    lo = np.clip(np.floor(np.minimum(tip_uv, end_uv) - half), 0, [view.width - 1, view.height - 1]).astype(int)
    hi = np.clip(np.ceil(np.maximum(tip_uv, end_uv) + half), 0, [view.width - 1, view.height - 1]).astype(int)
    rows, cols = slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1)
    vv, uu = np.mgrid[rows, cols]
    uv = np.column_stack([uu.ravel(), vv.ravel()]).astype(float)
    axis = end_uv - tip_uv
    length = float(np.linalg.norm(axis))
    t = np.clip((uv - tip_uv) @ axis / max(length * length, 1e-12), 0.0, 1.0)
    near = np.linalg.norm(uv - (tip_uv + t[:, None] * axis), axis=1) <= half
    patch = np.zeros(len(uv), np.float32)
    if near.any():
        patch[near] = detection.gain * instrument_projection(view, tip_cam, detection.axis_cam, model, uv[near],
                                                             blur_sigma_px=settings.blur_sigma_px)
    return rows, cols, patch.reshape(vv.shape)


# ------------------------------------------------------------------------------------ 3D


CROSSING_RAY_DEG = 45.0
"""A tip ray more than this from the anterior-posterior axis (world y), e.g. a lateral
view's, crosses the spine: every point of it lies at nearly one y, so the most posterior
bone surface along it does not locate a posterior approach's tip (measured: a median error
of 18 mm with sigmas of 1-4 mm where the tip had not reached the bone); such a single
view reports the depth as unknown."""


REACH_MM = 60.0
"""How far past the first bone surface along its ray a posterior approach's tip may lie
(a pedicle screw's path is 40-55 mm): a single view's depth sigma counts the bone that far."""


def _bone_depth(bone: Volume, bone_level: float, source: np.ndarray, ray: np.ndarray, around_mm: float,
                span_mm: float = 200.0, step_mm: float = 0.5, posterior_tolerance_mm: float = 10.0
                ) -> tuple[float, float] | None:
    """(distance from the source, 1-sigma) of the most posterior bone surface (largest
    world y, LPS) along a world ray, searched within ``span_mm`` around ``around_mm``; None
    when the ray meets no bone. The sigma combines where in the bone the tip may be (it may
    be anywhere in the bone along the ray within ``REACH_MM`` of the surface, uniform: the
    RMS distance of that bone from the surface; at least that of the surface's own run,
    length / sqrt(3): a tip that went through a thin lamina into the vertebral body lies
    far past its first surface) and the spread of the other runs whose posterior surface
    lies within ``posterior_tolerance_mm`` of it (a ray nearly parallel to the coronal
    plane cannot tell them apart)."""
    s = np.arange(max(around_mm - span_mm / 2, 0.0), around_mm + span_mm / 2, step_mm)
    points = source + s[:, None] * ray
    ijk = np.round(bone.world_to_index(points)).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(bone.size_ijk)), axis=1)
    inside = np.zeros(len(s), bool)
    inside[ok] = bone.data[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] > bone_level
    if not inside.any():
        return None
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(int), [0]])))
    runs = []
    for first, last in zip(edges[::2], edges[1::2] - 1):
        i = first if points[first, 1] >= points[last, 1] else last
        runs.append((points[i, 1], s[i], (last - first + 1) * step_mm))
    y_best, distance, length = max(runs)
    plausible = [r[1] for r in runs if r[0] >= y_best - posterior_tolerance_mm]
    reached = s[inside & (np.abs(s - distance) <= REACH_MM)] - distance
    spread = max(float(np.mean(reached ** 2)), length ** 2 / 3.0)
    sigma = math.sqrt(spread + float(np.var(plausible)))
    return float(distance), sigma


def single_view_estimate(detection: ViewDetection, view: View, *, focus_world: np.ndarray,
                         bone: Volume | None = None, bone_level: float = 0.0,
                         settings: DetectionSettings | None = None) -> InstrumentEstimate:
    """CT pose of an instrument seen in one view: the tip on its fitted ray, at the depth
    of the most posterior bone surface along that ray in ``bone`` (voxels above
    ``bone_level``, e.g. a label map or a bone attenuation volume; a posterior approach
    docks there), or at the focus point's depth, the depth unknown, without ``bone``, where
    the ray meets none, or where it crosses the spine (``CROSSING_RAY_DEG``, e.g. a lateral
    view). ``depth_sigma_mm``: see ``_bone_depth``, or ``settings.depth_sigma_mm`` where
    the depth is unknown; the axis keeps the in-plane direction exactly, its out-of-plane
    angle only as the foreshortening shows it."""
    settings = settings or DetectionSettings()
    source, rays = backproject(view.K, view.T_cam_from_world, detection.tip_uv[None])
    ray = rays[0]
    focus_distance = float(np.linalg.norm(np.asarray(focus_world, float) - source))
    crossing = abs(float(ray[1])) < math.cos(math.radians(CROSSING_RAY_DEG))
    found = None if bone is None or crossing else _bone_depth(bone, bone_level, source, ray, focus_distance)
    if found is None:
        distance, depth_sigma = focus_distance, settings.depth_sigma_mm
    else:
        distance, depth_sigma = found[0], max(found[1], 1.0)
    tip_world = source + distance * ray
    R_world_from_cam = invert_rigid(view.T_cam_from_world)[:3, :3]
    axis_world = -_unit(R_world_from_cam @ detection.axis_cam)
    mm_per_px = distance / max(view.K[0, 0], view.K[1, 1])
    return InstrumentEstimate(model=detection.model, tip_world=tip_world, axis_world=axis_world, n_views=1,
                              score=detection.gradient_correlation,
                              tip_sigma_mm=detection.tip_sigma_px * mm_per_px, depth_sigma_mm=depth_sigma,
                              axis_sigma_deg=90.0, detections=(detection,))


def mirrored_about_ray(estimate: InstrumentEstimate, view: View) -> InstrumentEstimate:
    """A single-view estimate with its axis's component along the tip's viewing ray reversed:
    the other pose that view can hardly tell apart (the image shows how far the shaft leaves
    the image plane, hardly to which side; a wire near the beam then points ~160 deg wrong).
    The tip, the image direction and the sigmas stay."""
    source = invert_rigid(view.T_cam_from_world)[:3, 3]
    ray = _unit(np.asarray(estimate.tip_world, float) - source)
    axis = np.asarray(estimate.axis_world, float)
    return dataclasses.replace(estimate, axis_world=_unit(axis - 2.0 * float(axis @ ray) * ray))


def _triangulate(detections: list[ViewDetection], views: list[View]) -> tuple[np.ndarray, np.ndarray]:
    """(tip_world, axis_world tip -> handle) from one detection per view: the axis is the
    direction closest to all back-projected planes (source, tip ray, shaft), the tip the
    point closest to all tip rays; the axis's sign makes its projections run from the tip
    towards the handle as the images show (a single view's out-of-plane sign is not known)."""
    normals, sources, rays = [], [], []
    for det, view in zip(detections, views):
        R = invert_rigid(view.T_cam_from_world)[:3, :3]
        source, tip_rays = backproject(view.K, view.T_cam_from_world, det.tip_uv[None])
        normals.append(_unit(R @ np.cross(det.tip_cam, det.axis_cam)))
        sources.append(source)
        rays.append(tip_rays[0])
    axis = np.linalg.svd(np.array(normals))[2][-1]
    tip, _ = _closest_point(sources, rays, [1.0] * len(rays))
    agreement = 0.0
    for det, view in zip(detections, views):
        shown = project(view.P, np.array([tip, tip + 10.0 * axis]))
        agreement += float((shown[1] - shown[0]) @ -det.direction_uv)
    return tip, (axis if agreement >= 0 else -axis)


def _refine_multi(views: list[View], bands: list[_Band], tip0: np.ndarray, axis0: np.ndarray,
                  model: InstrumentModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint least-squares fit over the views of (tip_world, axis_world tip -> handle);
    returns them and the 5x5 covariance of (tip mm, axis tilts rad)."""
    from scipy.optimize import least_squares

    b1 = _unit(np.cross(axis0, np.eye(3)[int(np.argmin(np.abs(axis0)))]))
    b2 = np.cross(axis0, b1)

    def pose(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tip0 + p[:3], _unit(axis0 + p[3] * b1 + p[4] * b2)

    def residuals(p: np.ndarray) -> np.ndarray:
        tip, axis = pose(p)
        out = []
        for view, band in zip(views, bands):
            T = view.T_cam_from_world
            out.append(_band_residual(band, T[:3, :3] @ tip + T[:3, 3], T[:3, :3] @ axis, model))
        return np.concatenate(out)

    fit = least_squares(residuals, np.zeros(5), x_scale=np.array([0.5, 0.5, 0.5, 0.01, 0.01]),
                        diff_step=1e-3, max_nfev=80)
    cov = _covariance(residuals, fit.x, np.array([0.05, 0.05, 0.05, 1e-4, 1e-4]))
    tip, axis = pose(fit.x)
    return tip, axis, cov


def _multi_view_estimate(detections: list[ViewDetection], views: list[View], residuals: list[np.ndarray],
                         focus_world: np.ndarray, settings: DetectionSettings) -> InstrumentEstimate:
    model = detections[0].model
    tip0, axis0 = _triangulate(detections, views)
    far0 = tip0 + model.length_mm * axis0
    if np.linalg.norm(far0 - focus_world) < np.linalg.norm(tip0 - focus_world):
        # The tip is the end in the anatomy: an instrument's handle stays outside.
        tip0, axis0 = far0, -axis0
    bands = []
    for det, view, residual in zip(detections, views, residuals):
        T = view.T_cam_from_world
        tip_cam = T[:3, :3] @ tip0 + T[:3, 3]
        end_cam = tip_cam + model.length_mm * (T[:3, :3] @ axis0)
        tip_uv = (view.K @ tip_cam)[:2] / tip_cam[2]
        end_uv = (view.K @ end_cam)[:2] / end_cam[2] if end_cam[2] > 1.0 else tip_uv - 1e3 * det.direction_uv
        half_width = _projected_width_px(view, model, tip_cam[2]) / 2.0 + 3.0 * settings.blur_sigma_px + 4.0
        grads = (np.zeros_like(residual), np.zeros_like(residual))
        band = _band(view, residual, grads, _noise_sigma(residual), tip_uv, end_uv, half_width, settings)
        if band is None:
            raise DetectionError("the triangulated instrument leaves a view")
        bands.append(band)
    tip, axis, cov = _refine_multi(views, bands, tip0, axis0, model)
    tip_sigma = math.sqrt(max(float(np.trace(cov[:3, :3])) / 3.0, 0.0))
    axis_sigma = math.degrees(math.sqrt(max(float(cov[3, 3] + cov[4, 4]) / 2.0, 0.0)))
    return InstrumentEstimate(model=model, tip_world=tip, axis_world=-axis, n_views=len(views),
                              score=min(d.gradient_correlation for d in detections), tip_sigma_mm=tip_sigma,
                              depth_sigma_mm=tip_sigma, axis_sigma_deg=axis_sigma, detections=tuple(detections))


def _end_hypotheses(a: ViewDetection, b: ViewDetection) -> list[tuple[ViewDetection, ViewDetection]]:
    """The pairings of two views' detections worth trying: as found, and with the tip and
    far end swapped in a view where both ends are visible (tried only when the pairing as
    found does not match)."""
    out = [(a, b)]
    if a.far_uv is not None:
        out.append((a.swapped(), b))
    if b.far_uv is not None:
        out.append((a, b.swapped()))
    return out


def _ray_distance(det_a: ViewDetection, view_a: View, det_b: ViewDetection, view_b: View) -> float:
    """Closest distance (mm) between the two detections' tip rays."""
    sa, ra = backproject(view_a.K, view_a.T_cam_from_world, det_a.tip_uv[None])
    sb, rb = backproject(view_b.K, view_b.T_cam_from_world, det_b.tip_uv[None])
    n = np.cross(ra[0], rb[0])
    if np.linalg.norm(n) < 1e-9:
        return float(np.linalg.norm(np.cross(sb - sa, ra[0])))
    return float(abs((sb - sa) @ n) / np.linalg.norm(n))


def detect_instruments(images: list[np.ndarray], views: list[View],
                       models: list[InstrumentModel] | tuple[InstrumentModel, ...], *, focus_world: np.ndarray,
                       bone: Volume | None = None, bone_level: float = 0.0,
                       settings: DetectionSettings | None = None) -> list[InstrumentEstimate]:
    """The instruments in one or more registered views of one moment, in CT coordinates.

    ``images``: line-integral-like (``preprocess``), one per ``views`` entry (each with its
    registered ``T_cam_from_world``). Detections are matched across views by their tip
    rays (closest approach under ``settings.match_distance_mm``, same model); a match in
    two or more views is triangulated and refined jointly, an instrument seen in one view
    only gets the single-view estimate (depth from ``bone``, see
    ``single_view_estimate``). Returns [] when no instrument is found.
    """
    settings = settings or DetectionSettings()
    if len(images) != len(views) or not views:
        raise DetectionError(f"need one image per view; got {len(images)} images and {len(views)} views")
    focus_world = np.asarray(focus_world, float)
    detected = [_detect_view(im, v, models, focus_world, settings) for im, v in zip(images, views)]
    per_view = [[d for d, _ in pairs] for pairs, _ in detected]

    def residual_without_others(j: int, keep: ViewDetection | None) -> np.ndarray:
        """View j's anatomy residual less every instrument found there but ``keep``."""
        pairs, base = detected[j]
        out = base.copy()
        for d, (rows, cols, patch) in pairs:
            if d is not keep:
                out[rows, cols] -= patch
        return out

    used = [set() for _ in views]
    estimates = []
    for i, dets in enumerate(per_view):
        for a, det in enumerate(dets):
            if a in used[i]:
                continue
            used[i].add(a)
            group, group_views, group_index = [det], [views[i]], [i]
            found_as = [det]  # each view's detection as found (group may hold it with its ends swapped)
            for j in range(i + 1, len(views)):
                options = []
                for b, other in enumerate(per_view[j]):
                    if b in used[j] or other.model.name != det.model.name:
                        continue
                    for mine, theirs in _end_hypotheses(group[0], other):
                        distance = _ray_distance(mine, views[i], theirs, views[j])
                        options.append((distance, b, mine, theirs))
                        if distance <= settings.match_distance_mm:
                            break
                options = [o for o in options if o[0] <= settings.match_distance_mm]
                if options:
                    _, b, mine, theirs = min(options, key=lambda o: o[0])
                    used[j].add(b)
                    group[0] = mine
                    group.append(theirs)
                    group_views.append(views[j])
                    group_index.append(j)
                    found_as.append(per_view[j][b])
            guided_residuals = {}  # view j -> the image the instrument was found in by a guided search
            if len(group) == 1:  # hidden in the other views? look where this view says it must be
                for j in range(len(views)):
                    if j == i:
                        continue
                    found = _guided_search(group[0], views[i], views[j], residual_without_others(j, None),
                                           focus_world, settings, base=detected[j][1], others=detected[j][0])
                    if found is not None:
                        group.append(found[0])
                        group_views.append(views[j])
                        group_index.append(j)
                        found_as.append(None)  # not among view j's own detections
                        guided_residuals[j] = found[1]
            det = group[0]
            if len(group) == 1:
                estimates.append(single_view_estimate(det, views[i], focus_world=focus_world, bone=bone,
                                                      bone_level=bone_level, settings=settings))
                continue
            residuals = [guided_residuals[j] if j in guided_residuals else residual_without_others(j, d)
                         for j, d in zip(group_index, found_as)]
            estimates.append(_multi_view_estimate(group, group_views, residuals, focus_world, settings))
    return estimates


def _guided_search(det: ViewDetection, view: View, other: View, residual: np.ndarray, focus_world: np.ndarray,
                   settings: DetectionSettings, *, base: np.ndarray | None = None,
                   others: list[tuple[ViewDetection, tuple[slice, slice, np.ndarray]]] = (),
                   span_mm: float = 120.0, reach_px: float = 40.0) -> tuple[ViewDetection, np.ndarray] | None:
    """The instrument of ``det`` (found in ``view``) in another view where the search alone
    missed it (e.g. lying over another instrument): (its detection there, the image it was
    fitted on), or None when nothing verifies.

    Its tip lies on the detected tip's ray, so its image in ``other`` lies on that ray's
    projection (the epipolar line): a grid over the tip's distance along the ray
    (``span_mm`` around the focus, 1 mm) and the shaft's image direction (3 deg) is scored
    on ``residual`` (the other view's image less the instruments found there): the mean
    over ``reach_px`` along the shaft minus the mean just beyond the tip. The best gives the
    3D axis (the intersection of the two views' shaft planes), which is fitted
    (``_refine_single``) and verified, against ``settings.min_guided_correlation``.
    When that fails and an instrument found in ``other`` (``others``: its detections and
    ``instrument_image`` patches; ``base``: the other view's image before any subtraction)
    lies over the hypothesis, the two are fitted jointly (``_joint_refit``: the one found
    may have absorbed the hidden one's contrast, and subtracting it erased it) and the
    hidden one fitted and verified again on the image less the refitted one; tried from
    the grid's hypothesis both ways along its axis and from one lying along each instrument
    found (``_under_hider``), the best verified kept."""
    hypothesis = _epipolar_hypothesis(det, view, other, residual, focus_world, span_mm, reach_px)
    if hypothesis is None:
        return None
    found = _fit_hypothesis(other, residual, det.model, *hypothesis, settings)
    if found is not None:
        return found, residual
    if base is None:
        return None
    tip_world, axis_world = hypothesis
    hypotheses = [(tip_world, axis_world, None), (tip_world, -axis_world, None)]  # the grid's direction, both ways
    for k, (hider, _) in enumerate(others):  # and one lying along each instrument found: it hides it best
        under = _under_hider(det, view, other, hider, focus_world, span_mm)
        if under is not None:
            hypotheses.append((*under, k))
    best = None
    for tip_world, axis_world, only in hypotheses:
        start = _hypothesis_start(other, residual, det.model, tip_world, axis_world, settings)
        if start is None:
            continue
        shaft = (start.tip_uv, start.tip_uv + reach_px * np.array([math.cos(start.theta), math.sin(start.theta)]))
        for k, (hider, (rows, cols, patch)) in enumerate(others):
            if (only is not None and k != only) or not _crosses(shaft, rows, cols, patch):
                continue
            rest = base.copy()  # the image less every instrument but the hider
            for m, (_, (r, c, q)) in enumerate(others):
                if m != k:
                    rest[r, c] -= q
            refit = _joint_refit(other, rest, hider, start, settings)
            if refit is None:
                continue
            hider_again, hidden_tip_world, hidden_axis_world = refit
            rows2, cols2, patch2 = instrument_image(other, hider_again, settings=settings)
            rest[rows2, cols2] -= patch2
            found = _fit_hypothesis(other, rest, det.model, hidden_tip_world, hidden_axis_world, settings)
            if found is not None and (best is None or found.gradient_correlation > best[0].gradient_correlation):
                best = (found, rest)
    return best


def _under_hider(det: ViewDetection, view: View, other: View, hider: ViewDetection, focus_world: np.ndarray,
                 span_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The hypothesis (``_placed``) of ``det``'s instrument lying along ``hider`` in view
    ``other``: its tip where the epipolar line of ``det``'s tip (``span_mm`` around the
    focus) crosses ``hider``'s image line, at most ``TIP_SEARCH_PX`` beyond its tip, its
    image running along ``hider``'s; None when they do not cross there."""
    source, rays = backproject(view.K, view.T_cam_from_world, det.tip_uv[None])
    around = float(np.linalg.norm(focus_world - source))
    a, b = project(other.P, source + np.array([[around - span_mm / 2.0], [around + span_mm / 2.0]]) * rays[0])
    handle_uv = -hider.direction_uv
    # a + x (b - a) = hider.tip_uv + y handle_uv
    matrix = np.column_stack([b - a, -handle_uv])
    if abs(float(np.linalg.det(matrix))) < 1e-9:
        return None
    x, y = np.linalg.solve(matrix, hider.tip_uv - a)
    if not (0.0 <= x <= 1.0 and y >= -TIP_SEARCH_PX):
        return None
    return _placed(det, view, other, hider.tip_uv + y * handle_uv, handle_uv)


def _epipolar_hypothesis(det: ViewDetection, view: View, other: View, residual: np.ndarray, focus_world: np.ndarray,
                         span_mm: float, reach_px: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``_guided_search``'s grid: the best (tip_world, unit axis_world tip -> handle) on the
    epipolar line of ``det``'s tip, or None (at the border, or shaft planes that coincide)."""
    source, rays = backproject(view.K, view.T_cam_from_world, det.tip_uv[None])
    ray = rays[0]
    around = float(np.linalg.norm(focus_world - source))
    tips = source + np.arange(around - span_mm / 2.0, around + span_mm / 2.0, 1.0)[:, None] * ray  # (D, 3)
    tips_uv = project(other.P, tips)
    thetas = np.radians(np.arange(0.0, 360.0, 3.0))
    directions = np.column_stack([np.cos(thetas), np.sin(thetas)])  # (T, 2)
    smooth = cv2.GaussianBlur(residual, (0, 0), 1.0)

    def mean_at(steps_px: np.ndarray) -> np.ndarray:
        uv = tips_uv[:, None, None, :] + steps_px[None, None, :, None] * directions[None, :, None, :]
        return _sample(smooth, uv.reshape(-1, 2)).reshape(len(tips), len(thetas), len(steps_px)).mean(axis=2)

    score = mean_at(np.arange(2.0, reach_px + 1.0, 2.0)) - mean_at(np.arange(-12.0, -2.0, 2.0))
    d, t = np.unravel_index(int(np.argmax(score)), score.shape)
    return _placed(det, view, other, tips_uv[d], directions[t])


def _placed(det: ViewDetection, view: View, other: View, tip_uv: np.ndarray, handle_uv: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """The 3D hypothesis of ``det``'s instrument (found in ``view``) whose image in
    ``other`` has its tip at ``tip_uv`` (on the epipolar line of ``det``'s tip) and runs
    along unit ``handle_uv`` towards the handle: (tip_world on ``det``'s tip ray, unit
    axis_world tip -> handle: the intersection of the two views' shaft planes, the handle's
    side as ``det`` shows it), or None (tip at the border, or planes that coincide)."""
    if _near_border(tip_uv, other, TIP_MARGIN_PX):
        return None
    source, rays = backproject(view.K, view.T_cam_from_world, det.tip_uv[None])
    other_source, other_rays = backproject(other.K, other.T_cam_from_world, np.array([tip_uv, tip_uv + handle_uv]))
    if float(np.linalg.norm(np.cross(rays[0], other_rays[0]))) < 1e-6:
        return None
    tip_world, _ = _closest_point([source, other_source], [rays[0], other_rays[0]], [1e-3, 1.0])
    R_world_from_cam = invert_rigid(view.T_cam_from_world)[:3, :3]
    plane_normal = _unit(R_world_from_cam @ np.cross(det.tip_cam, det.axis_cam))
    other_normal = np.cross(other_rays[0], other_rays[1])
    axis_world = np.cross(plane_normal, other_normal)
    if np.linalg.norm(axis_world) < 1e-6 * np.linalg.norm(other_normal):
        return None  # the two shaft planes coincide: the views cannot place the shaft
    axis_world = _unit(axis_world)
    handle = R_world_from_cam @ det.axis_cam  # tip -> handle in the world
    return tip_world, (axis_world if axis_world @ handle >= 0 else -axis_world)


def _hypothesis_start(other: View, residual: np.ndarray, model: InstrumentModel, tip_world: np.ndarray,
                      axis_world: np.ndarray, settings: DetectionSettings) -> _Start | None:
    """The ``_start`` (tip scan along the shaft) of a 3D hypothesis (tip, axis tip -> handle)
    in view ``other``, or None (behind the source, or no band in the image)."""
    T = other.T_cam_from_world
    tip_cam = T[:3, :3] @ tip_world + T[:3, 3]
    axis_cam = T[:3, :3] @ axis_world
    end_cam = tip_cam + model.length_mm * axis_cam
    if tip_cam[2] <= 1.0 or end_cam[2] <= 1.0:
        return None
    tip_uv = (other.K @ tip_cam)[:2] / tip_cam[2]
    far_uv = (other.K @ end_cam)[:2] / end_cam[2]
    grads = (cv2.Sobel(residual, cv2.CV_32F, 1, 0, ksize=3) / 8.0, cv2.Sobel(residual, cv2.CV_32F, 0, 1, ksize=3) / 8.0)
    phi = math.asin(float(np.clip(axis_cam @ _unit(tip_cam), -1.0, 1.0)))
    return _start(other, residual, grads, _noise_sigma(residual), model, tip_uv, far_uv, False, float(tip_cam[2]),
                  settings, phi=phi)


def _fit_hypothesis(other: View, residual: np.ndarray, model: InstrumentModel, tip_world: np.ndarray,
                    axis_world: np.ndarray, settings: DetectionSettings) -> ViewDetection | None:
    """A 3D hypothesis fitted in view ``other`` (``_hypothesis_start``, ``_refine_single``)
    and verified against ``settings.min_guided_correlation``; None when it fails."""
    start = _hypothesis_start(other, residual, model, tip_world, axis_world, settings)
    if start is None:
        return None
    found = _refine_single(other, start, False, settings)
    if found is None or found.gradient_correlation < settings.min_guided_correlation:
        return None
    return found


def _view_pose(detection: ViewDetection) -> tuple[np.ndarray, float, float, float]:
    """(tip pixel, in-plane angle theta, out-of-plane angle phi (rad), tip depth mm) of a
    detection, as ``_single_view_pose`` takes them."""
    theta = math.atan2(-detection.direction_uv[1], -detection.direction_uv[0])
    phi = math.asin(float(np.clip(detection.axis_cam @ _unit(detection.tip_cam), -1.0, 1.0)))
    return detection.tip_uv, theta, phi, float(detection.tip_cam[2])


def _joint_refit(view: View, image: np.ndarray, hider: ViewDetection, hidden: _Start, settings: DetectionSettings
                 ) -> tuple[ViewDetection, np.ndarray, np.ndarray] | None:
    """Two instruments on one stretch of ``image`` (the view's anatomy residual with both in
    it) fitted together: each one's tip pixel and in-plane angle (out-of-plane angle and
    depth kept), the image modelled as a contrast per instrument times its line integral
    plus an offset over the union of their bands. Returns (``hider`` refitted, with its
    contrast; the hidden one's tip_world and axis_world tip -> handle), or None when the
    refitted ``hider`` no longer passes the contrast check."""
    from scipy.optimize import least_squares

    Kinv = np.linalg.inv(view.K)
    hider_uv, hider_theta, hider_phi, hider_depth = _view_pose(hider)
    model_a, model_b = hider.model, hidden.model
    end_cam = hider.tip_cam + model_a.length_mm * hider.axis_cam
    end_uv = (view.K @ end_cam)[:2] / end_cam[2] if end_cam[2] > 1.0 else hider_uv - 1e3 * hider.direction_uv
    zeros = (np.zeros_like(image), np.zeros_like(image))
    half = _projected_width_px(view, model_a, hider_depth) / 2.0 + 3.0 * settings.blur_sigma_px + 4.0
    band_a = _band(view, image, zeros, 1.0, hider_uv, end_uv, half, settings)
    if band_a is None:
        return None
    uv = np.unique(np.vstack([band_a.uv, hidden.band.uv]), axis=0)
    rays, weights = _psf_rays(view.K, uv, settings.blur_sigma_px)
    values = image[uv[:, 1].astype(int), uv[:, 0].astype(int)].astype(float)

    def poses(p: np.ndarray):
        a = _single_view_pose(Kinv, hider_uv + p[:2], hider_theta + p[2], hider_phi, hider_depth)
        b = _single_view_pose(Kinv, hidden.tip_uv + p[3:5], hidden.theta + p[5], hidden.phi, hidden.depth_mm)
        return a, b

    def fit(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = poses(p)
        design = np.column_stack([_cylinder_integral(rays, weights, *a, model_a),
                                  _cylinder_integral(rays, weights, *b, model_b), np.ones(len(uv))])
        coef = np.linalg.lstsq(design, values, rcond=None)[0]
        return design @ coef - values, coef

    # Levenberg-Marquardt: its evaluation budget counts the Jacobian's differences too (about
    # 8 steps here), where the trust-region solver's SVD of the large band would dominate.
    result = least_squares(lambda p: fit(p)[0], np.zeros(6), x_scale=np.array([1.0, 1.0, 0.02, 1.0, 1.0, 0.02]),
                           method="lm", diff_step=1e-3, max_nfev=4 * settings.max_iterations, ftol=1e-5, xtol=1e-5)
    (tip_a, axis_a), (tip_b, axis_b) = poses(result.x)
    gain_a = float(fit(result.x)[1][0])
    if not settings.gain_range[0] <= gain_a <= settings.gain_range[1]:
        return None
    tip_uv_a = (view.K @ tip_a)[:2] / tip_a[2]
    far_a = tip_a + model_a.length_mm * axis_a
    direction_a = _unit(tip_uv_a - (view.K @ far_a)[:2] / far_a[2]) if far_a[2] > 1.0 else hider.direction_uv
    refitted = dataclasses.replace(hider, tip_uv=tip_uv_a, direction_uv=direction_a, tip_cam=tip_a, axis_cam=axis_a,
                                   gain=gain_a)
    T_world_from_cam = invert_rigid(view.T_cam_from_world)
    return (refitted, T_world_from_cam[:3, :3] @ tip_b + T_world_from_cam[:3, 3],
            _unit(T_world_from_cam[:3, :3] @ axis_b))


TIP_SIGMA_FLOOR_PX = 0.5
"""Least 1-sigma in-plane tip error (pixels) of a detection when views are combined: the fit's
own sigma (image noise alone) is ten times smaller than the bench's in-plane errors (p90
0.2-0.45 mm at 0.6 mm pixels), which come from the anatomy under the tip."""
DIRECTION_SIGMA_FLOOR_DEG = 0.2
"""Least 1-sigma image direction error of a detection when views are combined (the fit's own
is a few hundredths of a degree; the same anatomy bias as ``TIP_SIGMA_FLOOR_PX``)."""


def _shaft_plane(detection: ViewDetection, view: View) -> tuple[np.ndarray, np.ndarray]:
    """(X-ray source, unit normal), world: the plane through the source that holds the
    detected shaft's image line (every 3D position of the shaft that this view shows)."""
    T_world_from_cam = invert_rigid(view.T_cam_from_world)
    normal = _unit(T_world_from_cam[:3, :3] @ np.cross(detection.tip_cam, detection.axis_cam))
    return T_world_from_cam[:3, 3], normal


def _mm_per_px(view: View, point_world: np.ndarray) -> float:
    depth = float(transform_points(view.T_cam_from_world, point_world)[2])
    return depth / max(view.K[0, 0], view.K[1, 1])


def combine_with_earlier_view(detection: ViewDetection, view: View, earlier: ViewDetection, earlier_view: View, *,
                              max_travel_mm: float = 40.0, min_plane_angle_deg: float = 10.0,
                              view_sigma_mm: float = 0.0, moved_mm: float | None = None,
                              still_since: tuple[ViewDetection, View] | None = None,
                              min_ray_angle_deg: float = 20.0, max_miss_sigmas: float = 3.0
                              ) -> InstrumentEstimate | None:
    """Full 3D pose of an instrument found now in ``view`` and earlier, in another
    orientation, in ``earlier_view`` (each view registered, e.g. the AP fluoroscopy frame
    and the lateral shot the multi-shot registration keeps), or None when the two views
    cannot place it.

    Two ways, the one with the smaller depth uncertainty kept:

    - **Shaft planes** (the instrument may have advanced or withdrawn along its axis in
      between): the axis is the intersection of the two views' shaft planes (source and
      shaft image line), the tip where the current tip ray meets it. Needs the planes to
      meet at ``min_plane_angle_deg`` or more: an instrument lying near the plane through
      both sources (near the C-arm's rotation plane, for an AP and a lateral view) has
      nearly one shaft plane in both; and the tip within ``max_travel_mm`` along the axis
      of where the earlier view put it. See ``_combine_planes``.
    - **Tip rays** (the instrument has moved at most ``moved_mm`` along its axis in
      between; 0 for two views of one moment): the tip is the point closest to both tip
      rays, the axis the line through it that both views' image directions show. Needs
      the rays to meet at ``min_ray_angle_deg`` or more and to pass within
      ``max_miss_sigmas`` of their combined in-plane sigma (plus the miss that a travel
      of ``moved_mm`` can explain) of each other: a larger miss means the instrument moved
      more than that, or is another one. In near-parallel shaft planes the miss hardly
      grows with a travel along the axis, so the travel must be bounded from outside:
      ``moved_mm``, or ``still_since``: the instrument found in ``view``'s orientation
      (detection, its registered view) at or before the earlier view's acquisition and
      not moved since (a monotonic advance assumed): its tip's displacement across the
      current ray bounds the travel. Without either, this way is not tried. See
      ``_combine_tip_rays``.

    Uncertainties, first order: each detection's in-plane tip sigma is its fit's (at least
    ``TIP_SIGMA_FLOOR_PX``) and ``view_sigma_mm`` (the registered views' own 1-sigma error
    across the beam, at the instrument, in each view; it dominates a fit's sigma);
    direction sigmas at least ``DIRECTION_SIGMA_FLOOR_DEG``. ``tip_sigma_mm`` across the
    current ray, ``depth_sigma_mm`` along it, ``axis_sigma_deg`` of the axis.
    """
    if detection.model.name != earlier.model.name:
        return None
    options = [_combine_planes(detection, view, earlier, earlier_view, max_travel_mm=max_travel_mm,
                               min_plane_angle_deg=min_plane_angle_deg, view_sigma_mm=view_sigma_mm)]
    if moved_mm is not None or still_since is not None:
        options.append(_combine_tip_rays(detection, view, earlier, earlier_view, view_sigma_mm=view_sigma_mm,
                                         moved_mm=moved_mm, still_since=still_since,
                                         min_ray_angle_deg=min_ray_angle_deg, max_miss_sigmas=max_miss_sigmas))
    options = [o for o in options if o is not None]
    return min(options, key=lambda e: e.depth_sigma_mm) if options else None


def most_certain(single: InstrumentEstimate, combined: list[InstrumentEstimate] | tuple[InstrumentEstimate, ...], *,
                 max_sigmas: float = 3.0) -> InstrumentEstimate:
    """Of a single-view estimate (depth from the anatomy: ``single_view_estimate``) and the
    combinations of that view with others (``combine_with_earlier_view``), the one with the
    smallest ``depth_sigma_mm``.

    The single view takes part only where no combination refutes it: its depth assumes
    the tip docked on the bone (at or anterior of the most posterior bone surface along
    its ray), whatever its sigma says. A combination refutes it when its tip lies more
    than ``max_sigmas`` of both estimates' sigmas away; or, placed by the tip rays of two
    moments (``tip_if_moved_world``), when even the deepest tip its travel bound allows
    lies posterior (world y, LPS) of the single view's by more than ``max_sigmas`` of its
    noise (``sigma_unmoved_mm``): the tip has not reached that bone yet, e.g. a wire
    resting in the soft tissue for the AP and lateral shots."""
    def refutes(other: InstrumentEstimate) -> bool:
        if other.tip_if_moved_world is not None:
            deepest_y = min(other.tip_world[1], other.tip_if_moved_world[1])
            return float(deepest_y - single.tip_world[1]) > max_sigmas * other.sigma_unmoved_mm
        sigma = math.hypot(single.tip_sigma_mm, single.depth_sigma_mm, other.tip_sigma_mm, other.depth_sigma_mm)
        return float(np.linalg.norm(single.tip_world - other.tip_world)) > max_sigmas * sigma

    options = list(combined)
    if not any(refutes(c) for c in options):
        options.append(single)
    return min(options, key=lambda e: e.depth_sigma_mm)


def _in_plane_sigma_mm(detection: ViewDetection, view: View, point_world: np.ndarray, view_sigma_mm: float) -> float:
    """1-sigma of a detection's tip across its ray at ``point_world`` (mm): the fit's (at least
    ``TIP_SIGMA_FLOOR_PX``) and the registered view's own."""
    return math.hypot(max(detection.tip_sigma_px, TIP_SIGMA_FLOOR_PX) * _mm_per_px(view, point_world), view_sigma_mm)


def _direction_sigma_rad(detection: ViewDetection) -> float:
    """1-sigma of a detection's image direction (rad), at least ``DIRECTION_SIGMA_FLOOR_DEG``
    (1 deg when the fit gave none)."""
    sigma = detection.direction_sigma_deg
    return math.radians(max(sigma, DIRECTION_SIGMA_FLOOR_DEG) if math.isfinite(sigma) else 1.0)


def _oriented(axis: np.ndarray, tip: np.ndarray, pairs) -> np.ndarray:
    """``axis`` or its opposite: the one whose projections run from the handle towards the tip
    as the detections of (detection, view) ``pairs`` show (handle -> tip)."""
    agreement = 0.0
    for det, v in pairs:
        shown = project(v.P, np.array([tip - 10.0 * axis, tip]))
        agreement += float((shown[1] - shown[0]) @ det.direction_uv)
    return axis if agreement >= 0 else -axis


def _combine_planes(detection: ViewDetection, view: View, earlier: ViewDetection, earlier_view: View, *,
                    max_travel_mm: float, min_plane_angle_deg: float, view_sigma_mm: float
                    ) -> InstrumentEstimate | None:
    """``combine_with_earlier_view`` by the shaft planes. ``depth_sigma_mm`` (along the
    current ray) from the current tip's in-plane sigma over the tangent of the angle between
    ray and axis, and the earlier tip's sigma moving the earlier plane; ``axis_sigma_deg``
    from both direction sigmas over the sine of the planes' angle."""
    source, n_now = _shaft_plane(detection, view)
    source_then, n_then = _shaft_plane(earlier, earlier_view)
    cross = np.cross(n_now, n_then)
    sin_planes = float(np.linalg.norm(cross))
    if sin_planes < math.sin(math.radians(min_plane_angle_deg)):
        return None
    axis = cross / sin_planes
    # A point of the line: on both planes, nearest the current source.
    offsets = np.array([n_now @ source, n_then @ source_then, axis @ source])
    point = np.linalg.solve(np.array([n_now, n_then, axis]), offsets)

    def on_line(origin: np.ndarray, tip_uv: np.ndarray, v: View) -> tuple[np.ndarray, float]:
        """Where the tip ray through ``tip_uv`` of view ``v`` meets the line (closest point on
        the line), and the sine of the angle between ray and line."""
        ray = backproject(v.K, v.T_cam_from_world, tip_uv[None])[1][0]
        b = float(ray @ axis)
        w = point - origin
        t = (b * (w @ ray) - (w @ axis)) / max(1.0 - b * b, 1e-12)
        return point + t * axis, math.sqrt(max(1.0 - b * b, 0.0))

    tip, sin_now = on_line(source, detection.tip_uv, view)
    tip_then, _ = on_line(source_then, earlier.tip_uv, earlier_view)
    if abs(float((tip - tip_then) @ axis)) > max_travel_mm:
        return None
    axis = _oriented(axis, tip, ((detection, view), (earlier, earlier_view)))
    sigma_now = _in_plane_sigma_mm(detection, view, tip, view_sigma_mm)
    sigma_then = _in_plane_sigma_mm(earlier, earlier_view, tip_then, view_sigma_mm)
    ray_now = backproject(view.K, view.T_cam_from_world, detection.tip_uv[None])[1][0]
    cos_now = math.sqrt(max(1.0 - sin_now ** 2, 0.0))
    depth_sigma = math.hypot(sigma_now * cos_now / max(sin_now, 1e-3),
                             sigma_then / max(abs(float(ray_now @ n_then)), 1e-3))
    direction_sigma = math.hypot(_direction_sigma_rad(detection), _direction_sigma_rad(earlier))
    return InstrumentEstimate(model=detection.model, tip_world=tip, axis_world=axis, n_views=2,
                              score=min(detection.gradient_correlation, earlier.gradient_correlation),
                              tip_sigma_mm=sigma_now, depth_sigma_mm=depth_sigma,
                              axis_sigma_deg=math.degrees(direction_sigma) / sin_planes,
                              detections=(detection, earlier))


def _closest_point(sources: list[np.ndarray], rays: list[np.ndarray], sigmas: list[float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The point (3,) nearest to the lines (source, unit ray), each distance weighted by
    1 / sigma^2 (the tip's in-plane sigma in that view), and its covariance (3, 3)."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for s, r, sigma in zip(sources, rays, sigmas):
        P = (np.eye(3) - np.outer(r, r)) / sigma ** 2
        A += P
        b += P @ s
    cov = np.linalg.inv(A)
    return cov @ b, cov


def _line_miss(s1: np.ndarray, r1: np.ndarray, s2: np.ndarray, r2: np.ndarray) -> float:
    """Closest distance (mm) between two lines (source, unit direction), not parallel."""
    n = np.cross(r1, r2)
    return float(abs((s2 - s1) @ n) / np.linalg.norm(n))


def _image_plane_normal(detection: ViewDetection, view: View, point_world: np.ndarray) -> np.ndarray:
    """Unit world normal of the plane through the view's source and ``point_world`` that
    holds the detected image direction there: every line through the point that this
    view shows running as the detection does."""
    uv = project(view.P, point_world[None])[0]
    _, rays = backproject(view.K, view.T_cam_from_world, np.array([uv, uv - 10.0 * detection.direction_uv]))
    return _unit(np.cross(rays[0], rays[1]))


def _combine_tip_rays(detection: ViewDetection, view: View, earlier: ViewDetection, earlier_view: View, *,
                      view_sigma_mm: float, moved_mm: float | None, still_since: tuple[ViewDetection, View] | None,
                      min_ray_angle_deg: float, max_miss_sigmas: float) -> InstrumentEstimate | None:
    """``combine_with_earlier_view`` by the tip rays, the instrument having moved at most
    ``moved_mm`` (or as ``still_since`` bounds it) along its axis between the views.

    The tip: the weighted closest point of the two tip rays (as if nothing moved); its
    covariance, plus the error a travel makes (the earlier tip ray then passed through a
    point of the axis that far away) for a travel anywhere in [0, bound] (uniform: RMS
    bound / sqrt(3), so that 3 sigma covers the whole bound), gives ``tip_sigma_mm`` and
    ``depth_sigma_mm``. The axis: through the tip, in both
    views' planes of image direction (their intersection); with planes within 1 deg of
    each other the views cannot place it and the current view's own 3D axis is kept
    (``axis_sigma_deg`` 90), else its sigma is both direction sigmas over the sine of the
    planes' angle (at most 90)."""
    source, rays = backproject(view.K, view.T_cam_from_world, detection.tip_uv[None])
    source_then, rays_then = backproject(earlier_view.K, earlier_view.T_cam_from_world, earlier.tip_uv[None])
    ray, ray_then = rays[0], rays_then[0]
    sin_rays = float(np.linalg.norm(np.cross(ray, ray_then)))
    if sin_rays < math.sin(math.radians(min_ray_angle_deg)):
        return None
    rough, _ = _closest_point([source, source_then], [ray, ray_then], [1.0, 1.0])
    sigmas = [_in_plane_sigma_mm(detection, view, rough, view_sigma_mm),
              _in_plane_sigma_mm(earlier, earlier_view, rough, view_sigma_mm)]
    tip, cov = _closest_point([source, source_then], [ray, ray_then], sigmas)
    # The axis through the tip.
    n_now = _image_plane_normal(detection, view, tip)
    n_then = _image_plane_normal(earlier, earlier_view, tip)
    cross = np.cross(n_now, n_then)
    sin_planes = float(np.linalg.norm(cross))
    if sin_planes >= math.sin(math.radians(1.0)):
        axis = cross / sin_planes
        direction_sigma = math.hypot(_direction_sigma_rad(detection), _direction_sigma_rad(earlier))
        axis_sigma = min(math.degrees(direction_sigma) / sin_planes, 90.0)
    else:
        axis = -(invert_rigid(view.T_cam_from_world)[:3, :3] @ detection.axis_cam)
        axis_sigma = 90.0
    axis = _oriented(_unit(axis), tip, ((detection, view), (earlier, earlier_view)))
    # How a travel along the axis between the views shows: the miss and the tip's error per mm.
    moved_tip = tip + axis
    moved_ray = _unit(moved_tip - source)
    miss_per_mm = _line_miss(source, moved_ray, source_then, ray_then)
    triangulated, _ = _closest_point([source, source_then], [moved_ray, ray_then], sigmas)
    error_per_mm = triangulated - moved_tip
    if still_since is not None:
        still_detection, still_view = still_since
        still_source, still_rays = backproject(still_view.K, still_view.T_cam_from_world,
                                               still_detection.tip_uv[None])
        across = float(np.linalg.norm(np.cross(tip - still_source, still_rays[0])))
        margin = max_miss_sigmas * math.hypot(sigmas[0], _in_plane_sigma_mm(still_detection, still_view, tip,
                                                                            view_sigma_mm))
        across_per_mm = float(np.linalg.norm(np.cross(axis, ray)))
        bound = (across + margin) / max(across_per_mm, 1e-3)
        moved_mm = bound if moved_mm is None else min(moved_mm, bound)
    miss = _line_miss(source, ray, source_then, ray_then)
    if miss > max_miss_sigmas * math.hypot(*sigmas) + moved_mm * miss_per_mm:
        return None
    total = cov + np.outer(error_per_mm, error_per_mm) * moved_mm ** 2 / 3.0
    depth_sigma = math.sqrt(max(float(ray @ total @ ray), 0.0))
    tip_sigma = math.sqrt(max((float(np.trace(total)) - depth_sigma ** 2) / 2.0, 0.0))
    return InstrumentEstimate(model=detection.model, tip_world=tip, axis_world=axis, n_views=2,
                              score=min(detection.gradient_correlation, earlier.gradient_correlation),
                              tip_sigma_mm=tip_sigma, depth_sigma_mm=depth_sigma, axis_sigma_deg=axis_sigma,
                              detections=(detection, earlier), tip_if_moved_world=tip - moved_mm * error_per_mm,
                              depth_sigma_unmoved_mm=math.sqrt(max(float(ray @ cov @ ray), 0.0)))
