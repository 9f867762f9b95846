"""Image-intensifier distortion: dot-grid plate simulation, grid detection and indexing,
a polynomial distortion model, and undistortion of points and images.

Pixels follow docs/conventions.md ((u, v), top-left pixel centre (0, 0)). The model maps
*distorted* pixel positions (as the image intensifier delivers them) to *undistorted*
ones (a perspective projection of the detector plane) with a global 2D polynomial; the
inverse map (undistorted -> distorted), fitted from the same points, gives the
``cv2.remap`` tables. The undistorted frame is fixed by the plate: the similarity (scale,
rotation, offset) that maps grid indices onto the dots near the image centre, where
pincushion and S-distortion vanish to first order; any remaining similarity is absorbed
by the C-arm calibration that follows.

The simulated distortion combines pincushion (radial, ``r_d = r (1 + k1 r^2 + k2 r^4)``
with r normalised by half the smaller image side) and S-distortion (a rotation about the
distortion centre growing as ``s r^2``, as the Earth's field bends the electron paths).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import cv2
import numpy as np

from calibration.blobs import Blobs, attenuation_image, detect_blobs
from calibration.errors import CalibrationError

__all__ = [
    "IIDistortion",
    "DistortionModel",
    "DistortionResult",
    "SimulatedGrid",
    "ii_distortion",
    "simulate_grid_image",
    "detect_grid_dots",
    "assign_grid_indices",
    "fit_distortion",
    "calibrate_distortion_image",
    "undistort_points",
    "undistort_maps",
    "undistort_image",
    "distortion_model_to_dict",
    "distortion_model_from_dict",
]

CANDIDATE_DEGREES = (3, 4, 5, 6, 7)


@dataclass(frozen=True)
class IIDistortion:
    """Simulation truth: pincushion + S-distortion about ``center_px`` (px).

    With r = |p - center| / ``norm_radius_px``: the radius grows by the factor
    ``1 + k1 r^2 + k2 r^4`` and the point turns about the centre by ``s r^2`` radians.
    """

    center_px: tuple[float, float]
    norm_radius_px: float
    k1: float
    k2: float
    s: float

    def distort(self, uv: np.ndarray) -> np.ndarray:
        """Distorted positions (N, 2) of undistorted pixels (N, 2)."""
        p = np.asarray(uv, dtype=float) - self.center_px
        r2 = (p ** 2).sum(axis=-1, keepdims=True) / self.norm_radius_px ** 2
        q = p * (1.0 + self.k1 * r2 + self.k2 * r2 ** 2)
        phi = self.s * r2
        c, s = np.cos(phi), np.sin(phi)
        rot = np.concatenate([c * q[..., :1] - s * q[..., 1:], s * q[..., :1] + c * q[..., 1:]],
                             axis=-1)
        return rot + self.center_px

    def undistort(self, uv: np.ndarray, tol_px: float = 1e-6, max_iter: int = 50) -> np.ndarray:
        """Undistorted positions of distorted pixels (fixed-point inversion of distort,
        to ``tol_px``)."""
        d = np.asarray(uv, dtype=float)
        p = d.copy()
        for _ in range(max_iter):
            step = d - self.distort(p)
            p += step
            if np.abs(step).max() < tol_px:
                break
        return p


def ii_distortion(image_size: tuple[int, int], *, amplitude_px: float = 10.0,
                  s_fraction: float = 0.3, center_offset_px: tuple[float, float] = (4.0, -3.0)
                  ) -> IIDistortion:
    """A typical image-intensifier distortion: the pincushion moves points at the middle of
    the image edge (r = half the smaller side) outwards by ``amplitude_px`` (80 % from the
    r^3 term, 20 % from r^5), and the S-distortion moves them sideways by ``s_fraction`` x
    that. The distortion centre sits ``center_offset_px`` from the image centre."""
    W, H = image_size
    R = min(W, H) / 2.0
    centre = ((W - 1) / 2.0 + center_offset_px[0], (H - 1) / 2.0 + center_offset_px[1])
    return IIDistortion(center_px=centre, norm_radius_px=R, k1=0.8 * amplitude_px / R,
                        k2=0.2 * amplitude_px / R, s=s_fraction * amplitude_px / R)


@dataclass(frozen=True)
class SimulatedGrid:
    """A simulated dot-grid exposure: ``raw`` counts (H, W) with centre level ``I0``;
    ``fov_mask`` the circular field of view; ``nodes_undistorted`` / ``nodes_distorted``
    (M, 2) every grid node inside the field of view, in undistorted and distorted px."""

    raw: np.ndarray
    I0: float
    fov_mask: np.ndarray
    nodes_undistorted: np.ndarray
    nodes_distorted: np.ndarray


def simulate_grid_image(distortion: IIDistortion, image_size: tuple[int, int], *,
                        pitch_px: float = 16.0, dot_diameter_px: float = 5.0,
                        grid_angle_deg: float = 1.0,
                        grid_offset_px: tuple[float, float] = (0.3, -0.2),
                        mu_per_px: float = 0.5, I0: float = 10000.0,
                        blur_sigma_px: float = 0.8, vignetting: float = 0.3,
                        fov_radius_px: float | None = None, supersample: int = 2,
                        seed: int | None = 0) -> SimulatedGrid:
    """Render a noisy exposure of a dot-grid plate (steel balls of ``dot_diameter_px`` on
    a square grid of ``pitch_px``, both in undistorted px, turned by ``grid_angle_deg``
    and shifted by ``grid_offset_px`` from the image centre) seen through ``distortion``.

    Every sub-pixel of the distorted image is mapped back to the plate and the ball's
    chord length there is integrated (attenuation ``mu_per_px`` per px of steel).
    Counts: ``I0 (1 - vignetting r^2)`` inside a circular field of view (radius
    ``fov_radius_px``, default half the smaller side), Beer-Lambert, Gaussian blur,
    Poisson noise; outside the field of view the image is dark.
    """
    W, H = image_size
    rng = np.random.default_rng(seed)
    s = supersample
    # Exact inverse at pixel centres; the smooth displacement is interpolated (cv2.remap)
    # to the sub-pixel samples.
    gv, gu = np.mgrid[0:H, 0:W].astype(np.float64)
    centres = np.stack([gu, gv], axis=-1)
    disp = (distortion.undistort(centres.reshape(-1, 2), tol_px=1e-5).reshape(H, W, 2)
            - centres).astype(np.float32)
    offs = (np.arange(s) + 0.5) / s - 0.5
    us = (np.arange(W)[:, None] + offs[None, :]).ravel()
    vs = (np.arange(H)[:, None] + offs[None, :]).ravel()
    uu, vv = np.meshgrid(us.astype(np.float32), vs.astype(np.float32))
    sub = cv2.remap(disp, uu, vv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    p = (np.stack([uu, vv], axis=-1) + sub).reshape(-1, 2).astype(np.float64)
    centre = np.array([(W - 1) / 2.0, (H - 1) / 2.0]) + grid_offset_px
    a = np.deg2rad(grid_angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    ij = np.round((p - centre) @ R / pitch_px)
    rho2 = (((p - centre) @ R - ij * pitch_px) ** 2).sum(axis=1)
    r = dot_diameter_px / 2.0
    chord = 2.0 * np.sqrt(np.clip(r * r - rho2, 0.0, None)) * mu_per_px
    L = chord.reshape(H, s, W, s).mean(axis=(1, 3))
    fov_r = min(W, H) / 2.0 if fov_radius_px is None else fov_radius_px
    rr2 = ((gu - (W - 1) / 2.0) ** 2 + (gv - (H - 1) / 2.0) ** 2) / fov_r ** 2
    fov = rr2 <= 1.0
    level = np.where(fov, I0 * (1.0 - vignetting * rr2), 0.02 * I0)
    expected = level * np.exp(-L)
    if blur_sigma_px > 0:
        expected = cv2.GaussianBlur(expected, (0, 0), blur_sigma_px)
    raw = rng.poisson(expected).astype(np.float32)
    n = int(np.ceil(np.hypot(W, H) / pitch_px))
    gi, gj = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    nodes = centre + (np.column_stack([gi.ravel(), gj.ravel()]) * pitch_px) @ R.T
    nodes_d = distortion.distort(nodes)
    inside = ((nodes_d - [(W - 1) / 2.0, (H - 1) / 2.0]) ** 2).sum(axis=1) <= fov_r ** 2
    return SimulatedGrid(raw=raw, I0=float(I0), fov_mask=fov, nodes_undistorted=nodes[inside],
                         nodes_distorted=nodes_d[inside])


def detect_grid_dots(image: np.ndarray, *, intensity: str = "raw", I0: float | None = None,
                     max_radius_px: float = 8.0, fov_margin_px: int = 6) -> Blobs:
    """Detect the plate's dots inside the field of view (pixels brighter than 10 % of the
    image's 99th percentile of raw counts, closed over the dots, eroded by
    ``fov_margin_px``)."""
    img = np.asarray(image, dtype=float)
    mask = None
    if intensity != "line_integral":
        bright = (img > 0.1 * np.percentile(img, 99)).astype(np.uint8)
        k_dot = 2 * int(np.ceil(max_radius_px)) + 3
        bright = cv2.morphologyEx(bright, cv2.MORPH_CLOSE,
                                  cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_dot, k_dot)))
        k = 2 * fov_margin_px + 1
        mask = cv2.erode(bright, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    att = attenuation_image(img, intensity=intensity, I0=I0)
    if mask is not None:
        att = np.where(mask, att, np.median(att[mask]))
    return detect_blobs(att, min_radius_px=1.0, max_radius_px=max_radius_px, mask=mask)


def assign_grid_indices(uv: np.ndarray, *,
                        tolerance: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices (i, j) of detected dots by growing the lattice from the central dot.

    The pitch and the two lattice directions come from the central dot's nearest
    neighbours (i along +u, j along +v). Each indexed dot predicts its four neighbours by
    linear extrapolation along the grid line (or by the local lattice vectors) and takes
    the nearest unindexed detection within ``tolerance`` x pitch; growth proceeds
    outwards from the centre. Returns (ij (N, 2) int, indexed (N,) bool); indices are
    relative to the central dot.
    """
    from scipy.spatial import cKDTree

    uv = np.asarray(uv, dtype=float)
    if len(uv) < 9:
        raise CalibrationError(f"need at least 9 grid dots, got {len(uv)}")
    tree = cKDTree(uv)
    pitch = float(np.median(tree.query(uv, k=2)[0][:, 1]))
    c = int(tree.query(np.median(uv, axis=0))[1])
    d, nb = tree.query(uv[c], k=5)
    vecs = uv[nb[1:]] - uv[c]
    vecs = vecs[np.abs(d[1:] - pitch) < tolerance * pitch]
    if len(vecs) < 2:
        raise CalibrationError("could not find the grid directions around the central dot")
    step = {(1, 0): vecs[np.argmax(vecs[:, 0])], (0, 1): vecs[np.argmax(vecs[:, 1])]}
    step[-1, 0], step[0, -1] = -step[1, 0], -step[0, 1]
    index_of = {(0, 0): c}
    taken = np.zeros(len(uv), bool)
    taken[c] = True
    frontier = [(0.0, (0, 0))]
    while frontier:
        _, node = heapq.heappop(frontier)
        p = uv[index_of[node]]
        for dirn, vec in step.items():
            nxt = (node[0] + dirn[0], node[1] + dirn[1])
            if nxt in index_of:
                continue
            back = (node[0] - dirn[0], node[1] - dirn[1])
            pred = 2 * p - uv[index_of[back]] if back in index_of else p + vec
            dist, k = tree.query(pred)
            if dist <= tolerance * pitch and not taken[k]:
                index_of[nxt] = int(k)
                taken[k] = True
                heapq.heappush(frontier, (float(np.hypot(*nxt)), nxt))
    ij = np.zeros((len(uv), 2), int)
    for key, k in index_of.items():
        ij[k] = key
    return ij, taken


def _monomials(xy: np.ndarray, degree: int) -> np.ndarray:
    """Design matrix (N, n_terms) of x^a y^b, a + b <= degree, ordered by total degree
    then decreasing a."""
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([x ** (t - b) * y ** b for t in range(degree + 1)
                            for b in range(t + 1)])


@dataclass(frozen=True)
class DistortionModel:
    """Polynomial distortion correction for frames of ``image_size`` (W, H).

    With x = (u - center_px[0]) / scale_px, y = (v - center_px[1]) / scale_px and m the
    monomials x^a y^b (a + b <= degree, by total degree then decreasing a):
    undistorted = distorted + ``forward`` @ m(distorted) (px) and
    distorted = undistorted + ``inverse`` @ m(undistorted); ``forward`` and ``inverse``
    are (2, n_terms) arrays.
    """

    image_size: tuple[int, int]
    degree: int
    center_px: tuple[float, float]
    scale_px: float
    forward: np.ndarray
    inverse: np.ndarray

    def __post_init__(self) -> None:
        n_terms = (self.degree + 1) * (self.degree + 2) // 2
        for name in ("forward", "inverse"):
            m = np.asarray(getattr(self, name), dtype=float)
            if m.shape != (2, n_terms) or not np.all(np.isfinite(m)):
                raise CalibrationError(f"distortion '{name}' must be a finite 2 x {n_terms} "
                                       f"array for degree {self.degree}, got {m.shape}")
            object.__setattr__(self, name, m)
        if not self.scale_px > 0:
            raise CalibrationError("distortion scale_px must be positive")

    def _apply(self, coeffs: np.ndarray, uv: np.ndarray) -> np.ndarray:
        p = np.asarray(uv, dtype=float)
        flat = p.reshape(-1, 2)
        xy = (flat - self.center_px) / self.scale_px
        return (flat + _monomials(xy, self.degree) @ coeffs.T).reshape(p.shape)

    def undistort_points(self, uv: np.ndarray) -> np.ndarray:
        """Undistorted pixel positions of distorted ones, shape (..., 2)."""
        return self._apply(self.forward, uv)

    def distort_points(self, uv: np.ndarray) -> np.ndarray:
        """Distorted pixel positions of undistorted ones, shape (..., 2)."""
        return self._apply(self.inverse, uv)


def _fit_coeffs(src: np.ndarray, dst: np.ndarray, degree: int, center: np.ndarray,
                scale: float) -> np.ndarray:
    """Least-squares (2, n_terms) coefficients of dst - src as a polynomial of src."""
    A = _monomials((src - center) / scale, degree)
    return np.linalg.lstsq(A, dst - src, rcond=None)[0].T


def _cv_rms(src: np.ndarray, dst: np.ndarray, degree: int, center: np.ndarray, scale: float,
            folds: int, rng: np.random.Generator) -> float:
    """Held-out RMS (px) of the polynomial fit over ``folds``-fold cross-validation."""
    order = rng.permutation(len(src))
    err = []
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        coeffs = _fit_coeffs(src[train], dst[train], degree, center, scale)
        pred = src[test] + _monomials((src[test] - center) / scale, degree) @ coeffs.T
        err.append(((pred - dst[test]) ** 2).sum(axis=1))
    return float(np.sqrt(np.concatenate(err).mean()))


@dataclass(frozen=True)
class DistortionResult:
    """A distortion calibration: the ``model``; dots used (``uv`` distorted px, ``ij``
    grid indices, ``targets`` undistorted px); ``heldout_rms_px`` the cross-validated
    RMS on held-out dots of the chosen degree; ``heldout_by_degree`` the same for every
    candidate degree; ``residuals_px`` (N, 2) fit residuals on all dots;
    ``max_correction_px`` the largest correction at a dot; ``n_outliers`` dots dropped."""

    model: DistortionModel
    uv: np.ndarray
    ij: np.ndarray
    targets: np.ndarray
    heldout_rms_px: float
    heldout_by_degree: dict
    residuals_px: np.ndarray
    max_correction_px: float
    n_outliers: int


def _grid_targets(uv: np.ndarray, ij: np.ndarray, central: int = 2) -> np.ndarray:
    """Undistorted positions of all dots: the similarity from grid indices to the dots
    within ``central`` grid steps of the central dot (OpenCV, LMedS), applied to every
    index."""
    near = np.abs(ij).max(axis=1) <= central
    if near.sum() < 6:
        raise CalibrationError("too few dots around the central dot to fix the grid scale")
    S, _ = cv2.estimateAffinePartial2D(ij[near].astype(np.float64), uv[near],
                                       method=cv2.LMEDS)
    if S is None:
        raise CalibrationError("could not fit the grid similarity")
    return ij @ S[:, :2].T + S[:, 2]


def fit_distortion(uv: np.ndarray, ij: np.ndarray, image_size: tuple[int, int], *,
                   degree: int | None = 5, folds: int = 5,
                   seed: int = 0) -> DistortionResult:
    """Fit the polynomial model to indexed dots (distorted ``uv`` (N, 2) px, ``ij`` (N, 2)).

    ``degree`` None picks, from CANDIDATE_DEGREES, the degree with the lowest held-out
    RMS. Dots whose residual exceeds max(0.5 px, 5 robust sigmas) are dropped once
    (mis-indexed or spurious) before the final fit and cross-validation.
    """
    uv = np.asarray(uv, dtype=float)
    ij = np.asarray(ij)
    W, H = image_size
    center = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
    scale = max(W, H) / 2.0
    rng = np.random.default_rng(seed)
    targets = _grid_targets(uv, ij)
    n_needed = 3 * (max(CANDIDATE_DEGREES) + 1) * (max(CANDIDATE_DEGREES) + 2) // 2
    if len(uv) < n_needed:
        raise CalibrationError(f"need at least {n_needed} indexed dots, got {len(uv)}")
    first = _fit_coeffs(uv, targets, degree or 5, center, scale)
    res = uv + _monomials((uv - center) / scale, degree or 5) @ first.T - targets
    norm = np.linalg.norm(res, axis=1)
    keep = norm <= max(0.5, 5 * 1.4826 * np.median(norm))
    uv, ij, targets = uv[keep], ij[keep], targets[keep]
    degrees = CANDIDATE_DEGREES if degree is None else tuple(sorted({degree, 5}))
    heldout = {d: _cv_rms(uv, targets, d, center, scale, folds, rng) for d in degrees}
    chosen = min(heldout, key=heldout.get) if degree is None else degree
    fwd = _fit_coeffs(uv, targets, chosen, center, scale)
    inv = _fit_coeffs(targets, uv, chosen, center, scale)
    model = DistortionModel((int(W), int(H)), chosen, (float(center[0]), float(center[1])),
                            float(scale), fwd, inv)
    und = model.undistort_points(uv)
    return DistortionResult(model=model, uv=uv, ij=ij, targets=targets,
                            heldout_rms_px=heldout[chosen], heldout_by_degree=heldout,
                            residuals_px=und - targets,
                            max_correction_px=float(np.linalg.norm(und - uv, axis=1).max()),
                            n_outliers=int((~keep).sum()))


def calibrate_distortion_image(image: np.ndarray, *, intensity: str = "raw",
                               I0: float | None = None, degree: int | None = 5,
                               seed: int = 0) -> DistortionResult:
    """Detect, index and fit: the distortion calibration of one dot-grid exposure."""
    H, W = np.asarray(image).shape[:2]
    blobs = detect_grid_dots(image, intensity=intensity, I0=I0)
    ij, ok = assign_grid_indices(blobs.uv)
    return fit_distortion(blobs.uv[ok], ij[ok], (W, H), degree=degree, seed=seed)


def undistort_points(uv: np.ndarray, model: DistortionModel) -> np.ndarray:
    """Undistorted pixel positions of distorted pixels (..., 2)."""
    return model.undistort_points(uv)


def undistort_maps(model: DistortionModel) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` tables (map_u, map_v), float32 (H, W): for each undistorted output
    pixel, the distorted input position to sample."""
    W, H = model.image_size
    vv, uu = np.mgrid[0:H, 0:W].astype(np.float64)
    src = model.distort_points(np.stack([uu, vv], axis=-1))
    return src[..., 0].astype(np.float32), src[..., 1].astype(np.float32)


def undistort_image(image: np.ndarray, model: DistortionModel, *,
                    interpolation: int = cv2.INTER_LINEAR,
                    maps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The undistorted image (same size and dtype; outside the input: 0). Pass ``maps``
    from :func:`undistort_maps` to reuse them across frames."""
    img = np.asarray(image)
    H, W = img.shape[:2]
    if (W, H) != tuple(model.image_size):
        raise CalibrationError(f"distortion model is for {model.image_size[0]}x"
                               f"{model.image_size[1]} frames, got {W}x{H}")
    map_u, map_v = undistort_maps(model) if maps is None else maps
    return cv2.remap(img, map_u, map_v, interpolation, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0)


def distortion_model_to_dict(model: DistortionModel) -> dict:
    """The ``parameters`` object of a distortion calibration."""
    return {"model": "polynomial", "degree": model.degree,
            "center_px": list(model.center_px), "scale_px": model.scale_px,
            "forward": model.forward.tolist(), "inverse": model.inverse.tolist()}


def distortion_model_from_dict(d: dict, image_size: tuple[int, int]) -> DistortionModel:
    """Validate and build a model from a distortion calibration's ``parameters``."""
    if not isinstance(d, dict):
        raise CalibrationError("distortion parameters must be an object")
    if d.get("model") != "polynomial":
        raise CalibrationError(f"unknown distortion model {d.get('model')!r}; expected "
                               f"'polynomial'")
    try:
        degree = int(d["degree"])
        center = tuple(float(x) for x in d["center_px"])
        scale = float(d["scale_px"])
        fwd = np.array(d["forward"], dtype=float)
        inv = np.array(d["inverse"], dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"malformed distortion parameters: {exc!r}") from None
    if len(center) != 2 or not 1 <= degree <= 10:
        raise CalibrationError("distortion center_px must be [u, v] and degree in 1..10")
    return DistortionModel(tuple(image_size), degree, center, scale, fwd, inv)
