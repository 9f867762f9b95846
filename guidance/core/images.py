"""X-ray image IO and preprocessing by intensity kind (docs/conventions.md).

Registration compares a line-integral-like picture (bone bright, roughly linear in
attenuation) with DRRs. ``preprocess`` turns each intensity kind into that:
``raw`` by -log(I / I0), ``line_integral`` as is, ``display`` by robust windowing
and, because the monitor's polarity is unknown, an explicit or detected polarity.
It also finds the valid pixels (inside the collimator, finite, not saturated).

SimpleITK and the DICOM reader (pydicom) are imported by the file readers and writers
that use them: the live pipeline imports this module only to preprocess frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.views import View

__all__ = ["ImageError", "PreparedImage", "read_xray", "write_xray", "stretch_raw", "preprocess", "valid_pixel_mask"]

POLARITIES = ("bone_dark", "bone_bright")
FLAT_RELATIVE_STD = 0.005
RAW_FLOOR = 1e-5
"""Raw counts are floored at this fraction of I0 before -log: line integrals up to 11.5.
A lateral view through an abdomen reaches 7-8, so a higher floor (1e-3 was used) cut
the body off flat and the collimator detection then took it for a blade."""


class ImageError(GuidanceError):
    """An X-ray image that cannot be read or does not fit its view."""


@dataclass(frozen=True)
class PreparedImage:
    """A line-integral-like float32 image (bone bright) and its valid-pixel mask."""

    image: np.ndarray
    mask: np.ndarray


def read_xray(path: str | Path) -> np.ndarray:
    """Read a 2D X-ray image: PNG/TIFF 8/16-bit (OpenCV), MetaImage/NRRD float (SimpleITK)
    or DICOM XA/RF (``guidance.core.dicom.read_xray_dicom``, the one DICOM reader, so the
    pixels are oriented as every DICOM read gives them; the first frame of a multi-frame
    file). Returns the pixel array [v, u]."""
    import SimpleITK as sitk

    from guidance.core.dicom import is_dicom, read_xray_dicom

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"X-ray image not found: {path}")
    suffix = "".join(path.suffixes).lower()
    if is_dicom(path) or suffix.endswith(".dcm"):
        return read_xray_dicom(path, require_geometry=False).frames[0]
    if suffix.endswith((".png", ".tif", ".tiff", ".jpg", ".jpeg")):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ImageError(f"cannot decode image {path}")
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return image
    try:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise ImageError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image.ndim == 3:
        image = image[0]
    if image.ndim != 2:
        raise ImageError(f"{path} is not a 2D image (shape {image.shape})")
    return image


def write_xray(image: np.ndarray, path: str | Path) -> None:
    """Write an X-ray image: integer images to PNG/TIFF, float images to .mha/.nrrd."""
    import SimpleITK as sitk

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".tif", ".tiff"):
        if image.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"{suffix} needs an 8 or 16-bit image, got {image.dtype}")
        if not cv2.imwrite(str(path), image):
            raise ImageError(f"cannot write {path}")
        return
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))


def stretch_raw(image: np.ndarray, view: View) -> tuple[np.ndarray, View]:
    """Raw counts made visible in any image viewer, losslessly: the uint16 pixels times the
    largest integer factor that keeps them within 16 bits, and the view with I0 times the
    same factor and the factor recorded as ``raw_scale`` (counts = pixels / raw_scale), so
    -log(I / I0), what registration uses, is unchanged. Other images are returned as is."""
    if view.intensity != "raw" or image.dtype != np.uint16:
        return image, view
    factor = 65535 // max(int(image.max()), 1)
    if factor <= 1:
        return image, view
    scale = factor * float(view.extra.get("raw_scale", 1))
    stretched = replace(view, I0=view.I0 * factor, extra={**view.extra, "raw_scale": scale})
    return (image.astype(np.uint32) * factor).astype(np.uint16), stretched


def valid_pixel_mask(image: np.ndarray, *, erode_px: int = 2) -> np.ndarray:
    """Pixels inside the collimator, eroded by ``erode_px``.

    Collimated pixels are finite-but-flat: near the image minimum, with a local (5x5)
    standard deviation under ``FLAT_RELATIVE_STD`` of their own level, and connected to
    the image border (the blades). Anatomy carries quantum noise of at least that much,
    so a dark but noisy region, such as a thick body in a lateral view, stays valid;
    NaN/inf pixels are invalid.
    """
    finite = np.isfinite(image)
    values = np.where(finite, image, 0).astype(np.float32)
    if not finite.any():
        return finite
    lo, hi = np.percentile(values[finite], [0.0, 99.0])
    span = max(float(hi - lo), 1e-12)
    mean = cv2.blur(values, (5, 5))
    std = np.sqrt(np.maximum(cv2.blur(values * values, (5, 5)) - mean * mean, 0.0))
    flat = std <= np.maximum(FLAT_RELATIVE_STD * np.abs(mean), 1e-6 * span)
    flat_dark = (values <= lo + 0.02 * span) & flat & finite
    n, comp = cv2.connectedComponents(flat_dark.astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
    collimated = np.isin(comp, border[border > 0])
    mask = finite & ~collimated
    if erode_px > 0:
        kernel = np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8)
        mask = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
    return mask


def preprocess(image: np.ndarray, view: View, *, polarity: str = "bone_dark") -> PreparedImage:
    """Line-integral-like image (float32, bone bright) and valid mask for registration.

    ``polarity`` applies to ``display`` images only: "bone_dark" (fluoroscopy monitors)
    or "bone_bright" (radiographic convention).
    """
    if image.ndim != 2:
        raise ImageError(f"expected a 2D image, got shape {image.shape}")
    if image.shape != view.shape:
        raise ImageError(
            f"image is {image.shape[1]}x{image.shape[0]} pixels but its view says "
            f"{view.width}x{view.height}"
        )
    if polarity not in POLARITIES:
        raise ImageError(f"polarity must be one of {', '.join(POLARITIES)}; got {polarity!r}")
    pixels = image.astype(np.float32)
    mask = valid_pixel_mask(pixels) if view.intensity != "line_integral" else np.isfinite(pixels)
    if not mask.any():
        raise ImageError("no valid pixels in the image (all collimated, NaN or constant)")
    if view.intensity == "raw":
        line = -np.log(np.clip(pixels, RAW_FLOOR * view.I0, None) / view.I0)
    elif view.intensity == "line_integral":
        line = pixels
    else:
        lo, hi = np.percentile(pixels[mask], [0.5, 99.5])
        line = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        if polarity == "bone_dark":
            line = 1.0 - line
    line = np.where(mask, line, 0.0).astype(np.float32)
    return PreparedImage(image=line, mask=mask)
