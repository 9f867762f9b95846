"""BB calibration phantom: design, JSON file (``guidance.bbphantom/1``) and X-ray simulator.

The phantom frame (mm) has its origin at the phantom centre and its z axis normal to the
plates; in the nominal mounting it coincides with the camera axes translated to the
isocentre (``nominal_T_cam_from_phantom``), so +z points from the source towards the
detector. The default design has two acrylic plates: one near the source carrying a
square grid of large steel balls, one near the detector carrying a half-cell offset grid
of small balls whose pitch is scaled so that, seen from the nominal source, the two grids
interleave into a regular lattice with no overlapping shadows. The ball size tells the
plates apart; the nominal geometry resolves the remaining 90-degree symmetry.

The simulator integrates attenuation analytically along the ray through every pixel
(ray/sphere chord lengths, ray/slab path lengths), supersampled over each pixel, and
turns line integrals into detector counts with Beer-Lambert, detector blur and Poisson
noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from calibration.errors import CalibrationError
from guidance.core.jsonfile import read_json
from guidance.core.geometry import backproject, make_rigid, project, transform_points
from guidance.core.views import View

__all__ = [
    "PHANTOM_SCHEMA",
    "Plate",
    "BBPhantom",
    "SimulatedBBImage",
    "two_plane_phantom",
    "nominal_T_cam_from_phantom",
    "phantom_to_dict",
    "phantom_from_dict",
    "read_phantom",
    "write_phantom",
    "sphere_line_integrals",
    "anatomy_background",
    "counts_from_line_integrals",
    "simulate_bb_image",
]

PHANTOM_SCHEMA = "guidance.bbphantom/1"
MU_STEEL_PER_MM = 0.8
MU_PMMA_PER_MM = 0.024


@dataclass(frozen=True)
class Plate:
    """An acrylic plate normal to phantom z: centre plane ``z_mm``, ``thickness_mm``,
    square of half side ``half_size_mm`` (all phantom frame, mm)."""

    z_mm: float
    thickness_mm: float
    half_size_mm: float


@dataclass(frozen=True)
class BBPhantom:
    """Steel balls at ``positions_mm`` (N, 3, phantom frame) with ``diameters_mm`` (N,)."""

    positions_mm: np.ndarray
    diameters_mm: np.ndarray
    name: str = "bb-phantom"
    plates: tuple[Plate, ...] = field(default=())

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions_mm, dtype=float)
        dia = np.asarray(self.diameters_mm, dtype=float).reshape(-1)
        if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) < 6:
            raise CalibrationError(f"a BB phantom needs at least 6 positions of shape (N, 3), "
                                   f"got {pos.shape}")
        if dia.shape != (len(pos),) or not np.all(dia > 0):
            raise CalibrationError("BB diameters must be positive, one per position")
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(dia))):
            raise CalibrationError("BB positions and diameters must be finite")
        object.__setattr__(self, "positions_mm", pos)
        object.__setattr__(self, "diameters_mm", dia)
        object.__setattr__(self, "plates", tuple(self.plates))

    def __len__(self) -> int:
        return len(self.positions_mm)

    @property
    def size_classes_mm(self) -> np.ndarray:
        """Distinct BB diameters (mm), ascending."""
        return np.unique(self.diameters_mm)

    @property
    def size_class(self) -> np.ndarray:
        """Index into ``size_classes_mm`` of each BB (N,)."""
        return np.searchsorted(self.size_classes_mm, self.diameters_mm)


DEFAULT_CODE = ((0, 0), (1, 0), (0, -2), (-2, 1), (2, 2), (-1, 3), (3, -3))


def two_plane_phantom(*, n_large: int = 9, pitch_mm: float = 18.0, depth_mm: float = 100.0,
                      source_to_center_mm: float = 600.0, large_mm: float = 3.5,
                      small_mm: float = 2.5, plate_thickness_mm: float = 10.0,
                      code: tuple[tuple[int, int], ...] = DEFAULT_CODE) -> BBPhantom:
    """The default two-plate design.

    Plate A at z = -depth/2 (source side): an ``n_large`` x ``n_large`` grid of
    ``large_mm`` balls at ``pitch_mm``, except at the ``code`` nodes (grid offsets
    (i, j) from the centre node along x, y) which carry ``small_mm`` balls: an asymmetric
    pattern that fixes the grid's offset and orientation even when its border is out
    of view. Plate B at z = +depth/2: an (n-1) x (n-1) grid of ``small_mm`` balls at
    the pitch that projects, from a source ``source_to_center_mm`` before the phantom
    centre, onto the same detector pitch, shifted half a cell so the shadows interleave.
    """
    if n_large < 3 or depth_mm <= 0 or not 0 < depth_mm / 2 < source_to_center_mm:
        raise CalibrationError("need n_large >= 3 and 0 < depth/2 < source_to_center_mm")
    z_a, z_b = -depth_mm / 2.0, depth_mm / 2.0
    pitch_b = pitch_mm * (source_to_center_mm + z_b) / (source_to_center_mm + z_a)
    ka = np.arange(n_large) - (n_large - 1) / 2.0
    kb = np.arange(n_large - 1) - (n_large - 2) / 2.0
    xa, ya = np.meshgrid(ka * pitch_mm, ka * pitch_mm)
    xb, yb = np.meshgrid(kb * pitch_b, kb * pitch_b)
    pos = np.vstack([
        np.column_stack([xa.ravel(), ya.ravel(), np.full(xa.size, z_a)]),
        np.column_stack([xb.ravel(), yb.ravel(), np.full(xb.size, z_b)]),
    ])
    dia = np.concatenate([np.full(xa.size, large_mm), np.full(xb.size, small_mm)])
    centre = (n_large - 1) // 2
    for i, j in code:
        if not (abs(i) <= centre and abs(j) <= centre):
            raise CalibrationError(f"code node {(i, j)} is outside the {n_large}x{n_large} grid")
        dia[(centre + j) * n_large + centre + i] = small_mm
    half_a = (n_large - 1) / 2.0 * pitch_mm + 60.0
    half_b = (n_large - 2) / 2.0 * pitch_b + 60.0
    plates = (Plate(z_a, plate_thickness_mm, half_a), Plate(z_b, plate_thickness_mm, half_b))
    return BBPhantom(pos, dia, name=f"two-plane-{n_large}x{n_large}", plates=plates)


def nominal_T_cam_from_phantom(source_to_center_mm: float = 600.0) -> np.ndarray:
    """Nominal mounting: phantom axes along the camera axes, centre on the principal ray
    ``source_to_center_mm`` from the source."""
    return make_rigid(np.eye(3), [0.0, 0.0, source_to_center_mm])


def phantom_to_dict(phantom: BBPhantom) -> dict:
    """The ``guidance.bbphantom/1`` JSON object of a phantom."""
    return {
        "schema": PHANTOM_SCHEMA,
        "name": phantom.name,
        "bbs": [{"position_mm": [float(x) for x in p], "diameter_mm": float(d)}
                for p, d in zip(phantom.positions_mm, phantom.diameters_mm)],
        "plates": [{"z_mm": p.z_mm, "thickness_mm": p.thickness_mm,
                    "half_size_mm": p.half_size_mm} for p in phantom.plates],
    }


def phantom_from_dict(d: dict) -> BBPhantom:
    """Validate and build a phantom from its JSON object."""
    if not isinstance(d, dict) or d.get("schema") != PHANTOM_SCHEMA:
        got = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise CalibrationError(f"unsupported phantom schema {got!r}; expected {PHANTOM_SCHEMA!r}")
    try:
        bbs = d["bbs"]
        pos = [b["position_mm"] for b in bbs]
        dia = [b["diameter_mm"] for b in bbs]
        plates = tuple(Plate(float(p["z_mm"]), float(p["thickness_mm"]),
                             float(p["half_size_mm"])) for p in d.get("plates", []))
        pos_arr = np.array(pos, dtype=float)
        dia_arr = np.array(dia, dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"malformed phantom: {exc!r}") from None
    return BBPhantom(pos_arr, dia_arr, name=str(d.get("name", "bb-phantom")), plates=plates)


def read_phantom(path: str | Path) -> BBPhantom:
    """Read a ``guidance.bbphantom/1`` JSON file."""
    return phantom_from_dict(read_json(path, what="phantom", error=CalibrationError))


def write_phantom(phantom: BBPhantom, path: str | Path) -> None:
    """Write a phantom as ``guidance.bbphantom/1`` JSON."""
    Path(path).write_text(json.dumps(phantom_to_dict(phantom), indent=1) + "\n")


def _subpixel_grid(u_lo: int, u_hi: int, v_lo: int, v_hi: int,
                   supersample: int) -> np.ndarray:
    """(n_pix * s^2, 2) sample positions covering pixels u_lo..u_hi x v_lo..v_hi, each
    pixel split into s x s sub-pixels (pixel centre at integer coordinates)."""
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    us = (np.arange(u_lo, u_hi + 1)[:, None] + offs[None, :]).ravel()
    vs = (np.arange(v_lo, v_hi + 1)[:, None] + offs[None, :]).ravel()
    uu, vv = np.meshgrid(us, vs)
    return np.column_stack([uu.ravel(), vv.ravel()])


def sphere_line_integrals(K: np.ndarray, T_cam_from_obj: np.ndarray,
                          image_size: tuple[int, int], centres_mm: np.ndarray,
                          diameters_mm: np.ndarray, *, mu_per_mm: float = MU_STEEL_PER_MM,
                          supersample: int = 3) -> np.ndarray:
    """Attenuation line integrals (H, W) of spheres (centres in the object frame, mm),
    each pixel averaged over ``supersample`` x ``supersample`` rays from the focal spot."""
    W, H = image_size
    out = np.zeros((H, W))
    centres = np.asarray(centres_mm, dtype=float).reshape(-1, 3)
    radii = np.asarray(diameters_mm, dtype=float).reshape(-1) / 2.0
    cam = transform_points(T_cam_from_obj, centres)
    uv = project(K @ T_cam_from_obj[:3], centres)
    s = supersample
    for c, r, z, (u, v) in zip(centres, radii, cam[:, 2], uv):
        if z <= r:
            continue
        half = 1.3 * K[0, 0] * r / np.sqrt(z * z - r * r) + 2.0
        u_lo, u_hi = max(int(u - half), 0), min(int(u + half) + 1, W - 1)
        v_lo, v_hi = max(int(v - half), 0), min(int(v + half) + 1, H - 1)
        if u_lo > u_hi or v_lo > v_hi:
            continue
        src, d = backproject(K, T_cam_from_obj, _subpixel_grid(u_lo, u_hi, v_lo, v_hi, s))
        w = c - src
        miss2 = w @ w - (d @ w) ** 2
        chord = 2.0 * np.sqrt(np.clip(r * r - miss2, 0.0, None)) * mu_per_mm
        nv, nu = v_hi - v_lo + 1, u_hi - u_lo + 1
        out[v_lo:v_hi + 1, u_lo:u_hi + 1] += chord.reshape(nv, s, nu, s).mean(axis=(1, 3))
    return out


def _plate_line_integrals(K: np.ndarray, T_cam_from_phantom: np.ndarray,
                          image_size: tuple[int, int], plates: tuple[Plate, ...],
                          mu_per_mm: float = MU_PMMA_PER_MM) -> np.ndarray:
    """Line integrals (H, W) of the phantom's acrylic plates (slab path length / |cos|)."""
    W, H = image_size
    out = np.zeros(H * W)
    if not plates:
        return out.reshape(H, W)
    src, d = backproject(K, T_cam_from_phantom, _subpixel_grid(0, W - 1, 0, H - 1, 1))
    dz = np.where(np.abs(d[:, 2]) < 1e-9, 1e-9, d[:, 2])
    for p in plates:
        s = (p.z_mm - src[2]) / dz
        x, y = src[0] + s * d[:, 0], src[1] + s * d[:, 1]
        inside = (np.abs(x) <= p.half_size_mm) & (np.abs(y) <= p.half_size_mm) & (s > 0)
        out += np.where(inside, mu_per_mm * p.thickness_mm / np.abs(dz), 0.0)
    return out.reshape(H, W)


def anatomy_background(image_size: tuple[int, int], rng: np.random.Generator, *,
                       amplitude: float = 1.0) -> np.ndarray:
    """An anatomy-like line-integral image (H, W): smooth soft tissue plus a column of
    vertebral bodies and a few bright edges; ``amplitude`` scales it (about 1 = a thin
    patient at the field centre)."""
    W, H = image_size
    soft = cv2.GaussianBlur(rng.standard_normal((H, W)), (0, 0), W / 10.0)
    soft = 0.8 + 0.3 * soft / (np.abs(soft).max() + 1e-12)
    spine = np.zeros((H, W))
    cx = W / 2.0 + rng.uniform(-0.1, 0.1) * W
    body_h = H / 7.0
    v = rng.uniform(-body_h, 0.0)
    while v < H + body_h:
        axes = (int(W / 12.0), int(0.4 * body_h))
        cv2.ellipse(spine, (int(cx), int(v)), axes, 0.0, 0.0, 360.0, 0.5, -1)
        v += body_h
    spine = cv2.GaussianBlur(spine, (0, 0), 3.0)
    return amplitude * (soft + spine)


def counts_from_line_integrals(line_integral: np.ndarray, rng: np.random.Generator, *,
                               I0: float = 10000.0, blur_sigma_px: float = 0.6) -> np.ndarray:
    """Detector counts (float32): Beer-Lambert ``I0 * exp(-L)``, Gaussian detector blur of
    ``blur_sigma_px``, then Poisson noise."""
    expected = I0 * np.exp(-np.asarray(line_integral, dtype=float))
    if blur_sigma_px > 0:
        expected = cv2.GaussianBlur(expected, (0, 0), blur_sigma_px)
    return rng.poisson(expected).astype(np.float32)


@dataclass(frozen=True)
class SimulatedBBImage:
    """A simulated phantom exposure: ``raw`` detector counts (H, W) with unattenuated
    level ``I0``; ``line_integral`` the noise-free attenuation; ``visible`` (N,) which BBs
    were rendered; ``true_uv`` (N, 2) projected BB centres; ``spurious_uv`` (M, 2) centres
    of the added foreign blobs."""

    raw: np.ndarray
    I0: float
    line_integral: np.ndarray
    visible: np.ndarray
    true_uv: np.ndarray
    spurious_uv: np.ndarray


def _spurious_spheres(K: np.ndarray, image_size: tuple[int, int], n: int, depth_mm: float,
                      diameters: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random balls (camera frame centres, diameters) at ``depth_mm`` whose shadows
    fall inside the image with a 20 px margin."""
    W, H = image_size
    uv = np.column_stack([rng.uniform(20, W - 21, n), rng.uniform(20, H - 21, n)])
    rays = np.linalg.solve(K, np.column_stack([uv, np.ones(n)]).T).T
    centres = rays * depth_mm
    return centres, rng.choice(diameters, n) * rng.uniform(0.9, 1.1, n)


def simulate_bb_image(phantom: BBPhantom, view: View,
                      T_cam_from_phantom: np.ndarray | None = None, *, seed: int | None = 0,
                      I0: float = 10000.0, blur_sigma_px: float = 0.6,
                      background: str = "plates", missing_fraction: float = 0.0,
                      spurious_fraction: float = 0.0, supersample: int = 3) -> SimulatedBBImage:
    """Render a noisy X-ray exposure of the phantom.

    ``view`` gives the detector (K, image size); ``T_cam_from_phantom`` places the
    phantom (default ``view.T_cam_from_world``: the phantom frame is the world). ``background``:
    "none", "plates" (the acrylic plates) or "anatomy" (plates + an anatomy-like field).
    ``missing_fraction`` of the BBs are left out (occluded or lost) and
    ``spurious_fraction`` x N foreign balls of similar size are added.
    """
    backgrounds = ("none", "plates", "anatomy")
    if background not in backgrounds:
        raise CalibrationError(f"background must be one of {', '.join(backgrounds)}; got {background!r}")
    rng = np.random.default_rng(seed)
    K, image_size = view.K, view.image_size
    T = view.T_cam_from_world if T_cam_from_phantom is None else np.asarray(T_cam_from_phantom,
                                                                            dtype=float)
    n = len(phantom)
    visible = np.ones(n, bool)
    visible[rng.choice(n, int(round(missing_fraction * n)), replace=False)] = False
    L = sphere_line_integrals(K, T, image_size, phantom.positions_mm[visible],
                              phantom.diameters_mm[visible], supersample=supersample)
    n_spurious = int(round(spurious_fraction * n))
    depth = float(transform_points(T, np.zeros(3))[2])
    centres, dia = _spurious_spheres(K, image_size, n_spurious, depth,
                                     phantom.size_classes_mm, rng)
    L += sphere_line_integrals(K, np.eye(4), image_size, centres, dia, supersample=supersample)
    if background != "none":
        L += _plate_line_integrals(K, T, image_size, phantom.plates)
    if background == "anatomy":
        L += anatomy_background(image_size, rng)
    raw = counts_from_line_integrals(L, rng, I0=I0, blur_sigma_px=blur_sigma_px)
    spurious_uv = project(K @ np.eye(4)[:3], centres) if n_spurious else np.zeros((0, 2))
    return SimulatedBBImage(raw=raw, I0=float(I0), line_integral=L, visible=visible,
                            true_uv=project(K @ T[:3], phantom.positions_mm),
                            spurious_uv=spurious_uv)
