"""Image similarity between a preprocessed X-ray (fixed) and a DRR (moving).

Each measure is built once per fixed image and mask (the fixed side is normalised
once), then scores many moving images. Every measure is a correlation of one or
more normalised blocks, so it also gives a residual vector r with
``||r||^2 = 2 m (1 - score)`` (m blocks): least-squares optimisers use the
residuals, global optimisers the score. Scores lie in [-1, 1], 1 for images equal up
to a positive affine intensity change. ``SIMILARITIES`` maps names to classes.
"""

from __future__ import annotations

import cv2
import numpy as np

from guidance.registration.errors import RegistrationError

__all__ = ["SIMILARITIES", "Similarity", "NCC", "GradientNCC", "PatchNCC", "get_similarity", "patch_agreement"]


def _centred(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Zero-mean float64 copy and its norm."""
    v = values.astype(np.float64) - values.mean()
    return v, float(np.linalg.norm(v))


def _normalise(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit norm (all zeros for a constant block)."""
    v, n = _centred(values)
    return v / n if n > 0 else v


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = image.astype(np.float32, copy=False)
    return cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)


class Similarity:
    """Base: subclasses define ``_blocks(image) -> list of 1D arrays`` over the mask."""

    def __init__(self, fixed: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.mask = np.ones(fixed.shape, bool) if mask is None else mask.astype(bool)
        self._fixed = [_normalise(b) for b in self._blocks(fixed)]
        self.n_blocks = len(self._fixed)

    def _blocks(self, image: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def residuals(self, moving: np.ndarray) -> np.ndarray:
        """Normalised fixed minus normalised moving, all blocks concatenated."""
        blocks = self._blocks(moving)
        if not self._fixed:
            return np.zeros(1)
        return np.concatenate([f - _normalise(m) for f, m in zip(self._fixed, blocks)])

    def residual_derivatives(self, moving: np.ndarray, d_moving: list[np.ndarray]) -> list[np.ndarray]:
        """d residuals / dt for each image change ``d_moving`` (per unit of t) of ``moving``:
        every measure's blocks are linear in the image, so only the normalisation is
        differentiated."""
        if not self._fixed:
            return [np.zeros(1) for _ in d_moving]
        blocks = []
        for m in self._blocks(moving):
            v, norm = _centred(m)
            blocks.append((v / norm if norm > 0 else v, norm))
        out = []
        for dm in d_moving:
            parts = []
            for (n, norm), d in zip(blocks, self._blocks(dm)):
                dv = _centred(d)[0]
                parts.append(-(dv - n * np.dot(n, dv)) / norm if norm > 0 else np.zeros(len(dv)))
            out.append(np.concatenate(parts))
        return out

    def score(self, moving: np.ndarray) -> float:
        """Mean correlation over the blocks, in [-1, 1] (0 when nothing is comparable)."""
        if not self._fixed:
            return 0.0
        r = self.residuals(moving)
        return float(1.0 - np.dot(r, r) / (2.0 * self.n_blocks))


class NCC(Similarity):
    """Normalised cross-correlation of the intensities over the mask."""

    def _blocks(self, image):
        return [image[self.mask]]


class GradientNCC(Similarity):
    """Gradient correlation: mean NCC of horizontal and vertical Sobel gradients over the
    mask's interior. Insensitive to smooth background (soft tissue, heel effect, display
    processing): the standard measure for 2D/3D registration of X-rays."""

    def __init__(self, fixed, mask=None):
        mask = np.ones(fixed.shape, bool) if mask is None else mask
        self.interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        super().__init__(fixed, mask)

    def _blocks(self, image):
        gx, gy = _gradients(image)
        return [gx[self.interior], gy[self.interior]]


class PatchNCC(Similarity):
    """Mean local NCC over non-overlapping patches (robust to spatially varying contrast).
    Patches with less than half their pixels valid are left out."""

    patch_px = 16

    def __init__(self, fixed, mask=None):
        mask = np.ones(fixed.shape, bool) if mask is None else mask.astype(bool)
        H, W = fixed.shape
        p = self.patch_px
        self._patches = []
        for v in range(0, H - p + 1, p):
            for u in range(0, W - p + 1, p):
                sl = (slice(v, v + p), slice(u, u + p))
                m = mask[sl]
                if m.sum() >= p * p // 2 and np.ptp(fixed[sl][m]) > 0:
                    self._patches.append((sl, m))
        super().__init__(fixed, mask)

    def _blocks(self, image):
        return [image[sl][m] for sl, m in self._patches]


SIMILARITIES = {"ncc": NCC, "gradient_ncc": GradientNCC, "patch_ncc": PatchNCC}


def get_similarity(name: str) -> type[Similarity]:
    """The similarity class called ``name``; ValueError lists the known names."""
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise RegistrationError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}") from None


AGREEMENT_PATCH_PX = 16


def _patches(image: np.ndarray, patch_px: int) -> np.ndarray:
    """The image's whole patch_px x patch_px squares from its top-left corner, one per row
    (n_patches, patch_px^2)."""
    p = patch_px
    h, w = image.shape[0] // p * p, image.shape[1] // p * p
    return image[:h, :w].reshape(h // p, p, w // p, p).swapaxes(1, 2).reshape(-1, p * p)


def patch_agreement(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray | None = None,
                    patch_px: int = AGREEMENT_PATCH_PX) -> float:
    """Median gradient correlation of the patches (``patch_px`` squares with at least half
    their pixels in the mask's interior) in which the moving image (the model) has the
    stronger half of its gradient energy; in [-1, 1], NaN without such patches.

    Where the model's edges lie on the image's, most of those patches agree, even where
    something the model lacks keeps the whole image's correlation low; a wrong pose puts many
    of them over other structures (right poses 0.69-0.96, wrong ones at most 0.43 while
    scoring up to 0.75; docs/benchmarks.md, session 17). Noise lowers it about as much as
    the correlation."""
    mask = np.ones(fixed.shape, bool) if mask is None else mask.astype(bool)
    interior = _patches(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float64), patch_px)
    keep = interior.sum(axis=1) >= patch_px * patch_px / 2
    if not keep.any():
        return float("nan")
    weights = interior[keep]
    count = weights.sum(axis=1, keepdims=True)
    correlation = np.zeros(len(weights))
    energy = np.zeros(len(weights))
    for f, m in zip(_gradients(fixed), _gradients(moving)):
        f, m = _patches(f, patch_px)[keep], _patches(m, patch_px)[keep]
        f = (f - (f * weights).sum(axis=1, keepdims=True) / count) * weights
        m = (m - (m * weights).sum(axis=1, keepdims=True) / count) * weights
        f_norm, m_norm = np.sqrt((f * f).sum(axis=1)), np.sqrt((m * m).sum(axis=1))
        norms = f_norm * m_norm
        correlation += 0.5 * np.divide((f * m).sum(axis=1), norms, out=np.zeros(len(norms)), where=norms > 0)
        energy += m_norm ** 2
    return float(np.median(correlation[energy >= np.median(energy)]))
