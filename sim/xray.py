"""X-ray image formation from a line-integral image (the output of guidance.core.drr).

The input is a float (H, W) array of attenuation line integrals L = int mu dl
(dimensionless); pixels are (u, v) = (column, row) with the centre of the top-left pixel
at (0, 0) (docs/conventions.md). The chain, in the order the physics applies it:

1. Beer-Lambert with scatter: I = I0 ((1 - f) exp(-L) + f G(exp(-L))), where G is a
   broad Gaussian (sigma = 10% of the larger image side) and f the scatter fraction of
   a flat field, so an unattenuated detector still reads I0.
2. Quantum noise: N = photons_per_pixel_at_unit_dose * dose photons hit an unattenuated
   pixel; counts are Poisson with mean N I / I0 and scaled back to I0 units.
3. Detector blur: Gaussian of ``blur_sigma_px`` (scintillator light spread).
4. Image intensifier pincushion distortion, a radial warp about the centre c:
   r_d = r_u (1 + k1 (r_u / r_max)^2), r_max = half the diagonal between the corner
   pixel centres, so an undistorted point at a corner moves outward by k1 r_max.
5. Collimation in output pixels: outside, the detector sees nothing (a dark level).

Intensity kinds (``guidance.core.views.INTENSITY_KINDS``): "raw" counts (bright where
unattenuated), "line_integral" -log(I / I0) after noise and blur, "display" an 8-bit
monitor picture (bone dark).

This is the one X-ray model of the project: the CLI's ``render``, the scenarios of the
live simulator and the evaluation's test images all call :func:`prepare_anatomy`,
:meth:`Anatomy.line_integral` and :func:`acquire` (or :func:`simulate_xray`, which chains
them), so they share one energy, one sampling and one detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

from guidance.core.drr import DrrVolume, prepare_volume, render_drr
from guidance.core.errors import GuidanceError
from guidance.core.views import View, check_intensity
from guidance.core.volume import Volume, hu_to_attenuation
from sim.body import BODY_MARGIN_MM, SOFT_TISSUE_MAX_HU, continued_body

__all__ = [
    "XrayError",
    "ENERGY_KEV",
    "BONE_STEP_MM",
    "SOFT_STEP_MM",
    "SOFT_TISSUE_MAX_HU",
    "RAW_DTYPES",
    "DARK_FRACTION",
    "XrayParams",
    "form_image",
    "expected_intensity",
    "collimation_mask",
    "distortion_maps",
    "distort_points",
    "undistort_points",
    "Anatomy",
    "prepare_anatomy",
    "AEC_PHOTONS",
    "RAW_I0",
    "acquire",
    "labelled_view",
    "auto_exposure",
    "simulate_xray",
]

ENERGY_KEV = 70.0
"""Effective beam energy of the HU -> attenuation mapping of simulated images (keV);
registration renders at another (60 keV), so tests are no "inverse crime"."""
BONE_STEP_MM = 0.5
"""DRR sampling step through bone (mm)."""
SOFT_STEP_MM = 2.0
"""DRR sampling step through soft tissue (mm): smooth, so a coarse step is exact to <0.3%."""
RAW_DTYPES = ("float32", "uint16")
DARK_FRACTION = 1.0e-3  # detector level outside the collimator, as a fraction of I0
_SCATTER_SIGMA_FRACTION = 0.1  # scatter kernel sigma, fraction of the larger image side
_DISPLAY_PERCENTILES = (0.5, 99.5)  # robust window of the log image inside the field
_UNSHARP_SIGMA_PX = 4.0
_UNSHARP_AMOUNT = 0.6
_DISPLAY_GAMMA = 0.8


class XrayError(GuidanceError):
    """Impossible X-ray acquisition settings or an unusable line-integral image."""


@dataclass(frozen=True)
class XrayParams:
    """Acquisition and detector settings of one simulated X-ray image.

    ``I0``: detector reading of an unattenuated pixel (counts, independent of dose: the
    automatic gain keeps the picture level). ``dose``: relative dose, scaling the photon
    number ``photons_per_pixel_at_unit_dose`` per unattenuated pixel (so SNR ~ sqrt(dose)).
    ``blur_sigma_px``: detector Gaussian blur (pixels). ``distortion_k1``: pincushion
    coefficient (0 = none, > 0 pincushion, must exceed -1/3) about
    ``distortion_center_px`` (default the image centre). ``collimation``: None, a
    rectangle (u_min, v_min, u_max, v_max) of pixel centres kept, or a radius (pixels)
    of a circular field about the image centre. ``scatter_fraction``: scatter share of
    a flat-field signal, in [0, 1). ``noise``: False gives the noise-free expectation.
    ``seed``: the noise seed (None: fresh noise every call).
    """

    I0: float = 4095.0
    dose: float = 1.0
    photons_per_pixel_at_unit_dose: float = 2000.0
    blur_sigma_px: float = 0.7
    distortion_k1: float = 0.0
    distortion_center_px: tuple[float, float] | None = None
    collimation: tuple[float, float, float, float] | float | None = None
    scatter_fraction: float = 0.0
    noise: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("I0", "dose", "photons_per_pixel_at_unit_dose"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise XrayError(f"{name} must be positive and finite; got {value!r}")
        if not (np.isfinite(self.blur_sigma_px) and self.blur_sigma_px >= 0):
            raise XrayError(f"blur_sigma_px must be >= 0; got {self.blur_sigma_px!r}")
        if not (np.isfinite(self.distortion_k1) and self.distortion_k1 > -1.0 / 3.0):
            raise XrayError(f"distortion_k1 must be finite and > -1/3; got {self.distortion_k1!r}")
        if not 0.0 <= self.scatter_fraction < 1.0:
            raise XrayError(f"scatter_fraction must be in [0, 1); got {self.scatter_fraction!r}")
        _check_collimation(self.collimation)

    @property
    def photons_per_pixel(self) -> float:
        """Mean photons reaching an unattenuated pixel at this dose."""
        return self.photons_per_pixel_at_unit_dose * self.dose


def _check_collimation(collimation) -> None:
    if collimation is None:
        return
    if np.ndim(collimation) == 0:
        if not (np.isfinite(collimation) and collimation > 0):
            raise XrayError(f"a circular collimation radius must be positive; got {collimation!r}")
        return
    c = np.asarray(collimation, dtype=float)
    if c.shape != (4,) or not np.all(np.isfinite(c)) or c[2] < c[0] or c[3] < c[1]:
        raise XrayError("collimation must be None, a radius (pixels) or a rectangle "
                        f"(u_min, v_min, u_max, v_max) with min <= max; got {collimation!r}")


# -------------------------------------------------------------------------- distortion


def _centre(image_size: tuple[int, int], center) -> np.ndarray:
    W, H = image_size
    return np.array([(W - 1) / 2.0, (H - 1) / 2.0] if center is None else center, dtype=float)


def _half_diagonal(image_size: tuple[int, int]) -> float:
    """r_max of the distortion model: half the diagonal between corner pixel centres."""
    W, H = image_size
    return 0.5 * math.hypot(W - 1, H - 1)


def distort_points(points_uv: np.ndarray, image_size: tuple[int, int], k1: float,
                   center: tuple[float, float] | None = None) -> np.ndarray:
    """Distorted pixels (N, 2) of ideal (pinhole) pixels: r_d = r_u (1 + k1 (r_u/r_max)^2)."""
    p = np.asarray(points_uv, dtype=float).reshape(-1, 2)
    c = _centre(image_size, center)
    d = p - c
    r2 = np.sum(d * d, axis=1, keepdims=True) / _half_diagonal(image_size) ** 2
    return c + d * (1.0 + k1 * r2)


def undistort_points(points_uv: np.ndarray, image_size: tuple[int, int], k1: float,
                     center: tuple[float, float] | None = None) -> np.ndarray:
    """Ideal pixels (N, 2) of distorted pixels: inverts the radial model by Newton steps.

    r (1 + k1 r^2 / r_max^2) is increasing for k1 > -1/3 up to r_max, so the root is
    unique; Newton from r = r_d converges monotonically (convex or concave f).
    """
    p = np.asarray(points_uv, dtype=float).reshape(-1, 2)
    c = _centre(image_size, center)
    d = p - c
    r_d = np.linalg.norm(d, axis=1)
    a = k1 / _half_diagonal(image_size) ** 2
    r = r_d.copy()
    for _ in range(50):
        step = (r + a * r**3 - r_d) / (1.0 + 3.0 * a * r**2)
        r -= step
        if np.all(np.abs(step) < 1e-10):
            break
    scale = np.divide(r, r_d, out=np.ones_like(r), where=r_d > 0)
    return c + d * scale[:, None]


def distortion_maps(image_size: tuple[int, int], k1: float,
                    center: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(map_x, map_y) float32 (H, W) for cv2.remap: for every pixel (u, v) of the distorted
    image, where it lies in the ideal image, so ``remap(ideal, map_x, map_y)`` distorts."""
    W, H = image_size
    v, u = np.mgrid[0:H, 0:W]
    src = undistort_points(np.column_stack([u.ravel(), v.ravel()]), image_size, k1, center)
    return (src[:, 0].reshape(H, W).astype(np.float32),
            src[:, 1].reshape(H, W).astype(np.float32))


@lru_cache(maxsize=4)
def _cached_maps(image_size: tuple[int, int], k1: float, center) -> tuple[np.ndarray, np.ndarray]:
    """distortion_maps, kept for repeated images of one geometry (read-only arrays)."""
    maps = distortion_maps(image_size, k1, center)
    for m in maps:
        m.flags.writeable = False
    return maps


# -------------------------------------------------------------------------- the chain


def collimation_mask(image_size: tuple[int, int], collimation) -> np.ndarray:
    """Boolean (H, W): True where the pixel centre lies inside the collimated field."""
    _check_collimation(collimation)
    W, H = image_size
    if collimation is None:
        return np.ones((H, W), dtype=bool)
    v, u = np.mgrid[0:H, 0:W]
    if np.ndim(collimation) == 0:
        c = _centre(image_size, None)
        return (u - c[0]) ** 2 + (v - c[1]) ** 2 <= float(collimation) ** 2
    u0, v0, u1, v1 = (float(x) for x in collimation)
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (pixels) with mirrored borders, which keeps the mean of smooth images."""
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def _broad_gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a large sigma (pixels), computed on a grid f = sigma / 4 times coarser
    (the result is smooth, so this is accurate and much faster than a full-size kernel)."""
    f = max(1, int(sigma // 4))
    H, W = image.shape
    small = cv2.resize(image, (max(1, round(W / f)), max(1, round(H / f))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(_gaussian(small, sigma / f), (W, H), interpolation=cv2.INTER_LINEAR)


def expected_intensity(line_integral: np.ndarray, params: XrayParams) -> np.ndarray:
    """Noise-free detector signal (float64, I0 units) before blur: primary plus scatter."""
    primary = np.exp(-np.asarray(line_integral, dtype=np.float64))
    f = params.scatter_fraction
    if f > 0:
        sigma = _SCATTER_SIGMA_FRACTION * max(primary.shape)
        primary = (1.0 - f) * primary + f * _broad_gaussian(primary, sigma)
    return params.I0 * primary


def _quantum_noise(intensity: np.ndarray, params: XrayParams, rng) -> np.ndarray:
    """Poisson photon counts of the expected intensity, rescaled to I0 units."""
    n = params.photons_per_pixel
    return rng.poisson(intensity * (n / params.I0)).astype(np.float64) * (params.I0 / n)


def _check_line_integral(line_integral) -> np.ndarray:
    L = np.asarray(line_integral)
    if L.ndim != 2 or min(L.shape) < 2:
        raise XrayError(f"line_integral must be a 2D (H, W) image; got shape {L.shape}")
    if not np.all(np.isfinite(L)):
        raise XrayError("line_integral contains NaN or infinite values")
    return L


def _display(intensity: np.ndarray, mask: np.ndarray, I0: float) -> np.ndarray:
    """8-bit monitor picture: log, robust window, unsharp mask, gamma; bone dark."""
    if not mask.any():
        return np.zeros(intensity.shape, dtype=np.uint8)
    p = np.log(np.maximum(intensity, I0 * DARK_FRACTION)).astype(np.float32)
    lo, hi = np.percentile(p[mask], _DISPLAY_PERCENTILES)
    x = np.clip((p - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    x = x + _UNSHARP_AMOUNT * (x - _gaussian(x, _UNSHARP_SIGMA_PX))
    x = np.clip(x, 0.0, 1.0) ** _DISPLAY_GAMMA
    out = np.rint(255.0 * x).astype(np.uint8)
    out[~mask] = 0
    return out


def form_image(line_integral: np.ndarray, params: XrayParams = XrayParams(), *,
               intensity: str, dtype: str | None = None) -> np.ndarray:
    """Simulated X-ray image (H, W) of a line-integral image, in the ``intensity`` kind.

    "raw": detector counts, float32 (``dtype="uint16"``: rounded, clipped to 0..65535);
    "line_integral": float32 -log(I / I0) after noise, blur and distortion (zero photon
    counts are floored at half a photon; outside the collimator -log(DARK_FRACTION));
    "display": uint8, bone dark, 0 outside the collimator.
    """
    check_intensity(intensity)
    if dtype is not None and intensity != "raw":
        raise XrayError(f"dtype applies to 'raw' intensity only; got dtype for {intensity!r}")
    L = _check_line_integral(line_integral)
    H, W = L.shape
    signal = expected_intensity(L, params)
    if params.noise:
        signal = _quantum_noise(signal, params, np.random.default_rng(params.seed))
    if params.blur_sigma_px > 0:
        signal = _gaussian(signal, params.blur_sigma_px)
    if params.distortion_k1 != 0:
        center = params.distortion_center_px
        maps = _cached_maps((W, H), params.distortion_k1, None if center is None else tuple(center))
        signal = cv2.remap(signal, *maps, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=params.I0 * DARK_FRACTION)
    mask = collimation_mask((W, H), params.collimation)
    signal = np.where(mask, signal, params.I0 * DARK_FRACTION)
    if intensity == "raw":
        return _raw_output(signal, dtype)
    if intensity == "line_integral":
        floor = 0.5 / params.photons_per_pixel if params.noise else np.finfo(np.float64).tiny
        return (-np.log(np.maximum(signal / params.I0, floor))).astype(np.float32)
    return _display(signal, mask, params.I0)


def _raw_output(intensity: np.ndarray, dtype: str | None) -> np.ndarray:
    try:
        name = "float32" if dtype is None else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in RAW_DTYPES:
        raise XrayError(f"raw dtype must be one of {', '.join(RAW_DTYPES)}; got {dtype!r}")
    if name == "uint16":
        return np.clip(np.rint(intensity), 0, 65535).astype(np.uint16)
    return intensity.astype(np.float32)


@dataclass(frozen=True)
class Anatomy:
    """A CT (HU) prepared for simulated X-rays: attenuation at ``ENERGY_KEV`` split into
    soft tissue (HU capped at ``SOFT_TISSUE_MAX_HU``, sampled coarsely at ``SOFT_STEP_MM``)
    and the bone excess (sampled finely); their line integrals add up to the full CT's."""

    soft: DrrVolume
    bone: DrrVolume

    def line_integral(self, view: View) -> np.ndarray:
        """Attenuation line integrals (H, W) float32 (dimensionless) seen in ``view``
        (its ``T_cam_from_world`` maps world = LPS mm of the CT to the source frame)."""
        return render_drr(self.soft, view) + render_drr(self.bone, view)


def prepare_anatomy(ct_hu: Volume, *, energy_kev: float = ENERGY_KEV, bone_step_mm: float = BONE_STEP_MM,
                    soft_step_mm: float = SOFT_STEP_MM, body_margin_mm: float = BODY_MARGIN_MM) -> Anatomy:
    """The ``Anatomy`` of a CT in HU (soft tissue included) and of the patient beyond its
    box up to ``body_margin_mm`` (``sim.body.continued_body``; 0: the box alone), ready for
    many views."""
    ct_hu = continued_body(ct_hu, body_margin_mm)
    mu = hu_to_attenuation(ct_hu, energy_kev=energy_kev)
    soft = hu_to_attenuation(ct_hu.with_data(np.minimum(ct_hu.data, SOFT_TISSUE_MAX_HU)), energy_kev=energy_kev)
    bone = mu.with_data(np.maximum(mu.data - soft.data, 0.0).astype(np.float32))
    return Anatomy(soft=prepare_volume(soft, step_mm=soft_step_mm), bone=prepare_volume(bone, step_mm=bone_step_mm))


AEC_PHOTONS = 1000.0
"""What a C-arm's automatic exposure control aims at: mean photons per pixel behind the
patient (``auto_exposure``)."""

RAW_I0 = 30000.0
"""Unattenuated level of 16-bit raw images behind an exposure control: a 12-bit range
(``XrayParams().I0``) leaves 6-18 counts behind a 300 mm wide body in a lateral view."""


def auto_exposure(line_integral: np.ndarray, params: XrayParams, photons_per_pixel: float = AEC_PHOTONS) -> XrayParams:
    """``params`` with the dose an automatic exposure control sets: ``photons_per_pixel``
    photons on average behind the patient, over the central quarter of the detector."""
    H, W = line_integral.shape
    centre = np.asarray(line_integral)[H // 4: H - H // 4, W // 4: W - W // 4]
    transmitted = float(np.mean(np.exp(-centre.astype(np.float64))))
    return replace(params, dose=photons_per_pixel / (params.photons_per_pixel_at_unit_dose * max(transmitted, 1e-6)))


def acquire(line_integral: np.ndarray, view: View, params: XrayParams = XrayParams(), *,
            intensity: str) -> tuple[np.ndarray, View]:
    """An acquisition as it is stored and sent: the pixels of ``form_image`` ("raw" as
    uint16 counts, "display" uint8, "line_integral" float32) and ``view`` labelled with
    that intensity kind (and ``params.I0`` for raw)."""
    image = form_image(line_integral, params, intensity=intensity, dtype="uint16" if intensity == "raw" else None)
    return image, labelled_view(view, intensity, params)


def labelled_view(view: View, intensity: str, params: XrayParams = XrayParams()) -> View:
    """``view`` labelled with the intensity kind of its images (and ``params.I0`` for raw)."""
    return view.with_intensity(intensity, I0=params.I0 if intensity == "raw" else None)


def simulate_xray(ct_hu: Volume | Anatomy, view: View, params: XrayParams = XrayParams(), *,
                  intensity: str) -> tuple[np.ndarray, View]:
    """A simulated X-ray of a CT (HU, or its prepared ``Anatomy``) seen in ``view``:
    ``acquire`` of the anatomy's line integrals at the dose a C-arm's exposure control sets
    (``auto_exposure``) times ``params.dose``. Returns the stored pixels and the labelled view."""
    anatomy = ct_hu if isinstance(ct_hu, Anatomy) else prepare_anatomy(ct_hu)
    line = anatomy.line_integral(view)
    return acquire(line, view, auto_exposure(line, params, AEC_PHOTONS * params.dose), intensity=intensity)
