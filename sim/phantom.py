"""Synthetic lumbar spine CT phantom from analytic shapes, with screw and interbody plans.

The phantom is a CT in Hounsfield units on an axis-aligned grid in world LPS mm (x to
the patient's left, y posterior, z superior), a TotalSegmentator-style label map on the
same grid, a pedicle screw plan (two trajectories per level) and an interbody plan (a
lateral LLIF trajectory per lumbar disc, an anterior ALIF one for L4-L5 and, with the
sacrum, L5-S1). Every vertebra is built
in its own frame (origin at the body centre, x left, y posterior, z along its own
superior axis) from rounded boxes and elliptic cylinders combined as signed distances;
the vertebral frames follow a lordotic (and optionally scoliotic) curve. Surfaces get a
one-voxel linear partial-volume ramp so DRRs of the phantom are not aliased. The same
seed gives the same phantom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import make_rigid, rotation_from_rotvec, transform_points
from guidance.core.levels import LEVEL_LABELS, LUMBAR
from guidance.core.plan import SIDES, write_plan
from guidance.core.volume import Volume, save_volume

__all__ = [
    "PhantomError",
    "Phantom",
    "make_phantom",
    "write_phantom",
]


# CT numbers (HU) of the tissues.
_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_SKIN = 30.0
_HU_MUSCLE = 40.0
_HU_CANAL = 10.0
_HU_DISC = 90.0
_FAR = 1.0e3  # "far outside" signed distance (mm) where a shape is not evaluated


class PhantomError(GuidanceError):
    """Phantom options out of their range (levels, spacing, angles, variation)."""


@dataclass(frozen=True)
class _LevelSpec:
    """Nominal sizes of one lumbar vertebra (mm, degrees)."""

    width: float  # body, left-right
    depth: float  # body, anterior-posterior
    height: float  # body, cranio-caudal
    disc_below: float  # height of the disc under this vertebra
    pedicle_width: float
    pedicle_height: float
    pedicle_offset: float  # lateral offset of the pedicle axis at its isthmus
    convergence_deg: float  # medial angle of the pedicle axis (anterior end medial)
    tp_tip: float  # lateral distance of a transverse process tip from the midline
    spinous_length: float
    canal_depth: float  # posterior body wall to the lamina at the midline


_NOMINAL = {
    "L1": _LevelSpec(42.5, 31.5, 26.0, 9.0, 8.0, 15.0, 15.0, 10.0, 35.0, 30.0, 17.0),
    "L2": _LevelSpec(43.5, 32.0, 27.0, 10.0, 8.5, 15.0, 15.75, 11.0, 40.0, 31.0, 16.5),
    "L3": _LevelSpec(45.0, 32.5, 27.5, 11.0, 9.0, 14.5, 16.5, 12.0, 45.0, 31.0, 16.0),
    "L4": _LevelSpec(46.0, 33.0, 27.5, 11.5, 9.5, 14.0, 17.25, 13.5, 43.0, 29.0, 16.0),
    "L5": _LevelSpec(47.0, 33.5, 27.0, 10.5, 10.0, 13.5, 18.25, 15.0, 42.0, 25.0, 16.0),
}
# The S1 body (only width, depth and height are used).
_S1 = _LevelSpec(50.0, 34.0, 26.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------- shapes


def _shape_coords(M: np.ndarray, x, y, z):
    """Coordinates in a shape frame of world points given as broadcastable x, y, z arrays."""
    return tuple(M[r, 0] * x + M[r, 1] * y + M[r, 2] * z + M[r, 3] for r in range(3))


@dataclass(frozen=True)
class _Shape:
    """An analytic solid placed in the world by ``T_world_from_shape`` (mm).

    ``kind`` "box": rounded box of half sizes ``half`` and edge radius ``radius``;
    "cylinder": elliptic cylinder along the shape z axis, semi-axes half[0:2], half
    length half[2], narrowed by ``waist`` (fraction) at mid-height.
    """

    kind: str
    T_world_from_shape: np.ndarray
    half: tuple[float, float, float]
    radius: float = 0.0
    waist: float = 0.0

    def bounds_world(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """World axis-aligned box (lo, hi) holding the shape, grown by ``margin`` mm."""
        h = np.asarray(self.half)
        corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) * h
        pts = transform_points(self.T_world_from_shape, corners)
        return pts.min(axis=0) - margin, pts.max(axis=0) + margin

    def sdf(self, x, y, z) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) at world points x, y, z."""
        M = np.linalg.inv(self.T_world_from_shape)[:3].astype(np.float32)
        px, py, pz = _shape_coords(M, x, y, z)
        if self.kind == "box":
            return _box_sdf(px, py, pz, self.half, self.radius)
        return _cylinder_sdf(px, py, pz, self.half, self.waist)


def _box_sdf(px, py, pz, half, radius: float) -> np.ndarray:
    """Exact signed distance to a box with rounded edges (mm)."""
    r = np.float32(radius)
    qx, qy, qz = (np.abs(p) - np.float32(h - radius) for p, h in zip((px, py, pz), half))
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
    return outside + inside - r


def _ellipse_sdf(px, py, a, b) -> np.ndarray:
    """First-order signed distance to an ellipse: (g - 1) / |grad g|, exact at the curve."""
    g = np.sqrt((px / a) ** 2 + (py / b) ** 2)
    grad = np.sqrt((px / a**2) ** 2 + (py / b**2) ** 2)
    return np.where(g > 1e-6, g * (g - 1) / np.maximum(grad, 1e-12), -np.minimum(a, b))


def _cylinder_sdf(px, py, pz, half, waist: float) -> np.ndarray:
    """Signed distance to a capped elliptic cylinder along z with a concave waist (mm)."""
    a, b, hl = (np.float32(h) for h in half)
    scale = 1 - np.float32(waist) * (1 - np.minimum((pz / hl) ** 2, 1))
    return np.maximum(_ellipse_sdf(px, py, a * scale, b * scale), np.abs(pz) - hl)


def _frame(ex: np.ndarray, ez: np.ndarray) -> np.ndarray:
    """Right-handed rotation with columns (ex, ez x ex, ez); ex is made orthogonal to ez."""
    ez = np.asarray(ez, dtype=float) / np.linalg.norm(ez)
    ex = np.asarray(ex, dtype=float) - np.dot(ex, ez) * ez
    ex /= np.linalg.norm(ex)
    return np.column_stack([ex, np.cross(ez, ex), ez])


def _place(T_world_from_vertebra, kind, centre, half, R=np.eye(3), **kw) -> _Shape:
    """A shape given in the vertebra frame (centre, rotation R), placed in the world."""
    T = T_world_from_vertebra @ make_rigid(R, centre)
    return _Shape(kind, T, tuple(float(h) for h in half), **kw)


@dataclass(frozen=True)
class _Bone:
    """One labelled bone: body and posterior shapes (each with its cortical thickness)."""

    label: int
    body: tuple[_Shape, ...]
    posterior: tuple[_Shape, ...]
    shell_body_mm: float
    shell_posterior_mm: float
    cortical_hu: float
    cancellous_hu: float

    def sdf(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the bone surface at world points (no windowing)."""
        return np.minimum.reduce([s.sdf(x, y, z) for s in self.body + self.posterior])


@dataclass(frozen=True)
class _Soft:
    """A soft-tissue solid of uniform HU; ``planes`` (normal, point) clip it to n.(p-c) <= 0."""

    shape: _Shape
    hu: float
    planes: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def sdf(self, x, y, z) -> np.ndarray:
        d = self.shape.sdf(x, y, z)
        for n, c in self.planes:
            n32 = n.astype(np.float32)
            plane = n32[0] * x + n32[1] * y + n32[2] * z - np.float32(np.dot(n, c))
            d = np.maximum(d, plane)
        return d


# ------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class _Grid:
    """Axis-aligned voxel grid: world position of voxel (0, 0, 0), spacing, shape (k, j, i)."""

    origin: np.ndarray
    spacing: float
    shape: tuple[int, int, int]

    def window(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Slices [k, j, i] of the voxels whose centres lie in the world box lo..hi."""
        n = np.array(self.shape[::-1])
        i0 = np.clip(np.ceil((lo - self.origin) / self.spacing), 0, n).astype(int)
        i1 = np.clip(np.floor((hi - self.origin) / self.spacing) + 1, 0, n).astype(int)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(i0[a], i1[a]) for a in (2, 1, 0))

    def coords(self, sl: tuple[slice, slice, slice]):
        """Broadcastable float32 world coordinates x (1,1,I), y (1,J,1), z (K,1,1) of a window."""
        axes = []
        for a, s in zip((2, 1, 0), sl):
            v = self.origin[a] + self.spacing * np.arange(s.start, s.stop)
            shape = [1, 1, 1]
            shape[2 - a] = -1
            axes.append(v.astype(np.float32).reshape(shape))
        return axes[2], axes[1], axes[0]

    @property
    def T_world_from_index(self) -> np.ndarray:
        return make_rigid(np.eye(3) * self.spacing, self.origin)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel inside a surface at signed distance d: linear over one voxel."""
    return np.clip(np.float32(0.5) - d / np.float32(width), 0, 1)


def _union_bounds(shapes, margin: float) -> tuple[np.ndarray, np.ndarray]:
    boxes = [s.bounds_world(margin) for s in shapes]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def _paint_soft(ct: np.ndarray, grid: _Grid, soft: _Soft) -> None:
    """Blend a uniform soft-tissue solid into the CT with its partial-volume ramp."""
    sl = grid.window(*soft.shape.bounds_world(grid.spacing))
    if sl is None:
        return
    f = _ramp(soft.sdf(*grid.coords(sl)), grid.spacing)
    ct[sl] += f * (np.float32(soft.hu) - ct[sl])


def _bone_distance(grid: _Grid, bone: _Bone, sl, margin: float):
    """Signed distance to the bone and the local cortical thickness on a window."""
    size = tuple(s.stop - s.start for s in sl)
    dists = []
    for shapes in (bone.body, bone.posterior):
        d = np.full(size, _FAR, dtype=np.float32)
        for shape in shapes:
            sub = grid.window(*shape.bounds_world(margin))
            if sub is None:
                continue
            rel = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(sub, sl))
            np.minimum(d[rel], shape.sdf(*grid.coords(sub)), out=d[rel])
        dists.append(d)
    d_body, d_post = dists
    shell = np.where(d_body <= d_post, bone.shell_body_mm, bone.shell_posterior_mm)
    return np.minimum(d_body, d_post), shell.astype(np.float32)


def _paint_bone(ct: np.ndarray, labels: np.ndarray, depth: np.ndarray, grid: _Grid, bone: _Bone):
    """Blend a bone (cortical shell over a cancellous core) into the CT and label it.

    A voxel gets the label of the bone whose surface its centre lies deepest inside
    (``depth`` keeps the best signed distance so far), so touching bones do not
    overwrite each other arbitrarily.
    """
    margin = max(bone.shell_body_mm, bone.shell_posterior_mm) + 2 * grid.spacing
    sl = grid.window(*_union_bounds(bone.body + bone.posterior, margin))
    if sl is None:
        return
    d, shell = _bone_distance(grid, bone, sl, margin)
    occ = _ramp(d, grid.spacing)
    core = _ramp(d + shell, grid.spacing)
    hu = np.float32(bone.cortical_hu) * (occ - core) + np.float32(bone.cancellous_hu) * core
    ct[sl] = ct[sl] * (1 - occ) + hu
    win = (d <= 0) & (d < depth[sl])
    labels[sl][win] = bone.label
    depth[sl][win] = d[win]


# ----------------------------------------------------------------------------- anatomy


def _vertebra(spec: _LevelSpec, T: np.ndarray, label: int, hu: tuple[float, float]) -> _Bone:
    """Body, pedicles, facets, laminae, spinous and transverse processes of one vertebra.

    Sizes from ``spec`` (mm); shapes are laid out in the vertebra frame ``T`` (world
    from vertebra: origin at the body centre, x left, y posterior, z superior).
    """
    a, b, h2 = spec.width / 2, spec.depth / 2, spec.height / 2
    pw, ph, px = spec.pedicle_width, spec.pedicle_height, spec.pedicle_offset
    zp = _pedicle_z(spec)
    body = (_place(T, "cylinder", (0, 0, 0), (a, b, h2), waist=0.05),)
    post = [_spinous(spec, T)]
    for sx in (1.0, -1.0):
        axis = _pedicle_axis(spec, sx)  # the pedicle runs 14 mm before to 12 mm behind its isthmus
        post.append(_place(T, "cylinder", _pedicle_isthmus(spec, sx) - axis, (pw / 2, ph / 2, 13.0),
                           R=_frame(np.cross((0, 0, 1), axis), axis)))
        z0, z1 = zp - ph / 2, h2 + 9.0  # superior articular process, lateral
        post.append(_place(T, "cylinder", (sx * (px + 4.0), b + 18.0, (z0 + z1) / 2),
                           (3.5, 6.0, (z1 - z0) / 2)))
        z0, z1 = -h2 - 9.0, zp  # inferior articular process, medial
        post.append(_place(T, "cylinder", (sx * (px - 4.5), b + 21.0, (z0 + z1) / 2),
                           (3.25, 5.5, (z1 - z0) / 2)))
        post.append(_lamina(spec, T, sx))
        post.append(_transverse_process(spec, T, sx))
    return _Bone(label, body, tuple(post), 1.2, 2.0, *hu)


def _pedicle_z(spec: _LevelSpec) -> float:
    """Height of the pedicle axis in the vertebra frame: pedicles join the upper body."""
    return spec.height / 2 - spec.pedicle_height / 2 - 1.0


def _pedicle_isthmus(spec: _LevelSpec, sx: float) -> np.ndarray:
    """Centre of the narrowest pedicle section (vertebra frame, mm); sx = +1 left, -1 right."""
    return np.array([sx * spec.pedicle_offset, spec.depth / 2 + 6.0, _pedicle_z(spec)])


def _pedicle_axis(spec: _LevelSpec, sx: float) -> np.ndarray:
    """Unit pedicle axis pointing posterior and lateral (vertebra frame)."""
    c = math.radians(spec.convergence_deg)
    return np.array([sx * math.sin(c), math.cos(c), 0.0])


def _lamina(spec: _LevelSpec, T: np.ndarray, sx: float) -> _Shape:
    """Plate from the facet column to the midline, roofing the spinal canal."""
    b, h2, zp = spec.depth / 2, spec.height / 2, _pedicle_z(spec)
    A = np.array([sx * (spec.pedicle_offset - 3.0), b + 15.0, 0.0])
    B = np.array([0.0, b + spec.canal_depth + 3.0, 0.0])
    z0, z1 = -h2 - 5.0, zp + 6.0
    half = (np.linalg.norm(B - A) / 2 + 2.0, 3.0, (z1 - z0) / 2)
    centre = (A + B) / 2 + (0, 0, (z0 + z1) / 2)
    return _place(T, "box", centre, half, R=_frame(B - A, (0, 0, 1)), radius=1.5)


def _spinous(spec: _LevelSpec, T: np.ndarray) -> _Shape:
    """Spinous process: a posterior plate sloping 10 degrees caudally."""
    t = math.radians(10.0)
    ey = np.array([0.0, math.cos(t), -math.sin(t)])
    root = np.array([0.0, spec.depth / 2 + spec.canal_depth + 2.0, -2.0])
    half = (3.5, spec.spinous_length / 2 + 1.0, 10.0 * spec.height / 27.0)
    return _place(T, "box", root + spec.spinous_length / 2 * ey, half,
                  R=_frame((1, 0, 0), np.cross((1, 0, 0), ey)), radius=2.5)


def _transverse_process(spec: _LevelSpec, T: np.ndarray, sx: float) -> _Shape:
    """Transverse process from the pedicle-facet junction, pointing lateral, 12 deg posterior."""
    t = math.radians(12.0)
    ex = np.array([sx * math.cos(t), math.sin(t), 0.0])
    root = np.array([sx * (spec.pedicle_offset + 1.0), spec.depth / 2 + 13.0, _pedicle_z(spec)])
    length = (spec.tp_tip - spec.pedicle_offset - 1.0) / math.cos(t)
    return _place(T, "box", root + length / 2 * ex, (length / 2, 3.0, 5.0),
                  R=_frame(ex, (0, 0, 1)), radius=2.5)


def _sacrum(T: np.ndarray, l5: _LevelSpec, hu: tuple[float, float]) -> _Bone:
    """Simplified sacrum in the S1 frame ``T``: S1 body, alae, S2-S5 bodies curving
    anteriorly (sacral kyphosis), the dorsal wall of the sacral canal and the S1 facets."""
    a, b, h2 = _S1.width / 2, _S1.depth / 2, _S1.height / 2
    body = [_place(T, "cylinder", (0, 0, 0), (a, b, h2), waist=0.04)]
    post = [_place(T, "box", (0, b + 12.0, -3.0), (l5.pedicle_offset + 6.0, 3.5, 12.0),
                   radius=2.0)]
    for sx in (1.0, -1.0):
        post.append(_place(T, "box", (sx * 30.0, 9.0, -8.0), (18.0, 17.5, 13.0), radius=4.0))
        post.append(_place(T, "cylinder", (sx * (l5.pedicle_offset + 4.0), b + 16.0, h2 + 0.5),
                           (3.5, 6.0, 8.5)))
    bottom, R = np.array([0.0, 0.0, -h2]), np.eye(3)
    for k, (h, w, d) in enumerate([(20, 40, 22), (16, 32, 17), (12, 24, 13), (10, 16, 10)]):
        R = _rotation_x(10.0 - 10.0 * k)
        centre = bottom - R[:, 2] * h / 2
        body.append(_place(T, "cylinder", centre, (w / 2, d / 2, h / 2 + 1.0), R=R))
        if k < 2:  # dorsal wall of the sacral canal
            post.append(_place(T, "box", centre + R @ (0, d / 2 + 9.0, 0), (w / 2, 3.0, h / 2),
                               R=R, radius=2.0))
        bottom = bottom - R[:, 2] * h
    return _Bone(LEVEL_LABELS["sacrum"], tuple(body), tuple(post), 1.0, 1.5, *hu)


def _rotation_x(deg: float) -> np.ndarray:
    """Rotation about the x (left) axis by ``deg`` degrees (right hand)."""
    return rotation_from_rotvec([math.radians(deg), 0.0, 0.0])


def _disc(upper: tuple[_LevelSpec, np.ndarray], lower: tuple[_LevelSpec, np.ndarray]) -> _Soft:
    """Intervertebral disc filling the (wedge-shaped) gap between two endplates.

    The disc reaches 0.5 mm into both bodies so no background shows at the endplates
    once the bone is blended over it.
    """
    (su, Tu), (sl, Tl) = upper, lower
    nu, nl = Tu[:3, 2], Tl[:3, 2]
    top = Tu[:3, 3] - nu * (su.height / 2 - 0.5)
    bottom = Tl[:3, 3] + nl * (sl.height / 2 - 0.5)
    axis = top - bottom
    centre = (top + bottom) / 2
    T = make_rigid(_frame(Tu[:3, 0], axis), centre)
    half = ((su.width + sl.width) / 4 * 0.98, (su.depth + sl.depth) / 4 * 0.98,
            np.linalg.norm(axis) / 2 + 5.0)
    return _Soft(_Shape("cylinder", T, half), _HU_DISC, ((nu, top), (-nl, bottom)))


def _canal(spec: _LevelSpec, T: np.ndarray) -> _Soft:
    """Spinal canal contents (thecal sac and epidural fat) behind one vertebra and its disc."""
    half = (spec.pedicle_offset - spec.pedicle_width / 2 + 1.0, spec.canal_depth / 2 + 1.5,
            spec.height / 2 + spec.disc_below / 2 + 1.0)
    centre = (0.0, spec.depth / 2 + spec.canal_depth / 2 + 0.5, -spec.disc_below / 2)
    return _Soft(_place(T, "cylinder", centre, half), _HU_CANAL)


# ------------------------------------------------------------------------------ layout


def _check_levels(levels) -> tuple[str, ...]:
    """Validated level names, superior to inferior; they must be contiguous lumbar levels."""
    names = tuple(levels)
    if not names or any(n not in LUMBAR for n in names) or len(set(names)) != len(names):
        raise PhantomError(f"levels must be distinct names among {', '.join(LUMBAR)}; got {levels!r}")
    idx = sorted(LUMBAR.index(n) for n in names)
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise PhantomError(f"levels must be contiguous (e.g. L2, L3, L4); got {levels!r}")
    return tuple(LUMBAR[i] for i in idx)


def _perturbed_specs(names, rng, variation: float) -> list[_LevelSpec]:
    """Per-level sizes with a small seeded variation (sigma 1.5% overall, 0.75% per body
    axis, each clipped at 2 sigma, scaled by ``variation``)."""

    def g(sigma: float) -> float:
        return float(np.clip(rng.normal(0.0, sigma), -2 * sigma, 2 * sigma)) * variation

    specs = []
    for n in names:
        s = _NOMINAL[n]
        k = 1.0 + g(0.015)
        specs.append(_LevelSpec(
            width=s.width * k * (1 + g(0.0075)), depth=s.depth * k * (1 + g(0.0075)),
            height=s.height * k * (1 + g(0.0075)), disc_below=s.disc_below * (1 + g(0.05)),
            pedicle_width=s.pedicle_width * (1 + g(0.03)), pedicle_height=s.pedicle_height * k,
            pedicle_offset=s.pedicle_offset * k, convergence_deg=s.convergence_deg + g(1.0),
            tp_tip=s.tp_tip * (1 + g(0.04)), spinous_length=s.spinous_length * (1 + g(0.05)),
            canal_depth=s.canal_depth * (1 + g(0.04)),
        ))
    return specs


def _curve_rotation(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Frames (N, 3, 3) = R_y(beta) @ R_x(alpha): sagittal tilt alpha, coronal tilt beta (rad)."""
    ca, sa, cb, sb = np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta)
    zero, one = np.zeros_like(alpha), np.ones_like(alpha)
    Rx = np.stack([one, zero, zero, zero, ca, -sa, zero, sa, ca], -1).reshape(-1, 3, 3)
    Ry = np.stack([cb, zero, sb, zero, one, zero, -sb, zero, cb], -1).reshape(-1, 3, 3)
    return Ry @ Rx


def _spine_frames(s_centres: np.ndarray, s_top: float, s_bottom: float, lordosis_deg: float,
                  scoliosis_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, 3) and rotations (N, 3, 3) along the spine curve at arc lengths s (mm).

    The curve's tilt varies linearly with arc length so that the frames at s_top and
    s_bottom differ by ``lordosis_deg`` in the sagittal plane (superior end tilted
    posteriorly) and ``scoliosis_deg`` in the coronal plane (positive: convex to the
    patient's left). The world origin sits at the curve midpoint.
    """
    span = s_top - s_bottom
    s_mid = (s_top + s_bottom) / 2

    def tilt(s, deg):
        return np.radians(deg) * (s_mid - s) / span if span > 0 else np.zeros_like(s)

    s = np.linspace(min(s_centres.min(), s_bottom), max(s_centres.max(), s_top), 2001)
    R = _curve_rotation(tilt(s, lordosis_deg), tilt(s, scoliosis_deg))
    tangent = R[:, :, 2]
    steps = (tangent[1:] + tangent[:-1]) / 2 * np.diff(s)[:, None]
    p = np.vstack([np.zeros(3), np.cumsum(steps, axis=0)])
    p -= np.array([np.interp(s_mid, s, p[:, a]) for a in range(3)])
    pos = np.column_stack([np.interp(s_centres, s, p[:, a]) for a in range(3)])
    return pos, _curve_rotation(tilt(s_centres, lordosis_deg), tilt(s_centres, scoliosis_deg))


def _vertebra_transforms(specs, rng, variation, lordosis_deg, scoliosis_deg, sacrum: bool):
    """World-from-vertebra transforms, superior to inferior (plus S1 last with the sacrum)."""
    bottom_up = specs[::-1]
    s = [bottom_up[0].height / 2]
    for lower, upper in zip(bottom_up[:-1], bottom_up[1:]):
        s.append(s[-1] + lower.height / 2 + upper.disc_below + upper.height / 2)
    s = np.array(s)
    s_all = np.append(s, -specs[-1].disc_below - 13.0) if sacrum else s
    pos, R = _spine_frames(s_all, s[-1], s[0], lordosis_deg, scoliosis_deg)
    Ts = []
    for i in range(len(s)):
        wobble = np.clip(rng.normal(0.0, [1.5, 1.0, 1.5]), -3, 3) * variation
        shift = np.clip(rng.normal(0.0, 0.5, 2), -1, 1) * variation
        Ri = R[i] @ rotation_from_rotvec(np.radians(wobble))
        Ts.append(make_rigid(Ri, pos[i] + R[i] @ np.append(shift, 0.0)))
    Ts = Ts[::-1]
    if sacrum:
        Ts.append(make_rigid(R[-1] @ _rotation_x(10.0), pos[-1]))
    return Ts


def _bone_hu(rng, variation: float) -> tuple[float, float]:
    """(cortical, cancellous) HU of one vertebra: 1500 +- 100 and 250 +- 25 (2 sigma)."""
    g = np.clip(rng.normal(0.0, 1.0, 2), -2, 2) * variation
    return 1500.0 + 50.0 * g[0], 250.0 + 12.5 * g[1]


# ------------------------------------------------------------------------ soft tissue


@dataclass(frozen=True)
class _Contour:
    """Elliptic body outline (mm) in the axial plane: centre, semi-axes, skin and fat."""

    centre_y: float
    semi_x: float
    semi_y: float
    skin_mm: float
    fat_mm: float


def _soft_tissue_slice(grid: _Grid, c: _Contour) -> np.ndarray:
    """Axial HU slice (J, I), the same at every z: air, skin, subcutaneous fat, muscle."""
    x, y, _ = grid.coords((slice(0, 1), slice(0, grid.shape[1]), slice(0, grid.shape[2])))
    d = _ellipse_sdf(x[0], y[0] - np.float32(c.centre_y), np.float32(c.semi_x),
                     np.float32(c.semi_y))
    depths = (0.0, c.skin_mm, c.skin_mm + c.fat_mm)
    inside = [_ramp(d + np.float32(t), grid.spacing) for t in depths]
    hu = _HU_AIR * (1 - inside[0]) + _HU_SKIN * (inside[0] - inside[1])
    hu += _HU_FAT * (inside[1] - inside[2]) + _HU_MUSCLE * inside[2]
    return hu.astype(np.float32)


def _make_grid(bones: list[_Bone], contour: _Contour, spacing: float) -> _Grid:
    """Grid over the bones plus margins: 30 mm laterally and anteriorly (at least +-100 mm
    in x), 12 mm cranio-caudally, and posteriorly up to 5 mm beyond the skin."""
    lo, hi = _union_bounds([s for b in bones for s in b.body + b.posterior], 0.0)
    lo = np.array([min(lo[0] - 30, -100.0), lo[1] - 30, lo[2] - 12])
    hi = np.array([max(hi[0] + 30, 100.0), contour.centre_y + contour.semi_y + 5, hi[2] + 12])
    origin = np.floor(lo / spacing) * spacing
    n = np.floor((hi - origin) / spacing).astype(int) + 1
    return _Grid(origin, float(spacing), (int(n[2]), int(n[1]), int(n[0])))


# ------------------------------------------------------------------------------ plan


def _trajectory(spec: _LevelSpec, T: np.ndarray, bone: _Bone, sx: float) -> tuple:
    """(entry, target) world points (mm) of a pedicle screw along the pedicle axis.

    The axis runs through the pedicle isthmus parallel to the upper endplate, converging
    medially; the target lies in the anterior third of the body (20% of its depth
    behind the anterior wall); the entry is where the axis leaves the bone posteriorly
    (the facet / lamina junction), found by marching along it in 0.05 mm steps.
    """
    axis, isthmus = _pedicle_axis(spec, sx), _pedicle_isthmus(spec, sx)
    target_y = -spec.depth / 2 + 0.2 * spec.depth
    target = isthmus - axis * (isthmus[1] - target_y) / axis[1]
    t = np.arange(0.0, 60.0, 0.05)
    pts = transform_points(T, isthmus + t[:, None] * axis)
    d = bone.sdf(*pts.astype(np.float32).T)
    k = int(np.argmax(d > 0))  # first sample outside: interpolate the crossing
    t_exit = t[k - 1] + 0.05 * d[k - 1] / (d[k - 1] - d[k])
    return transform_points(T, isthmus + t_exit * axis), transform_points(T, target)


def _screw_diameter(pedicle_width: float) -> float:
    """Screw diameter (mm): about 70% of the pedicle width, in 0.5 mm steps, 4.5 to 7.5."""
    return float(np.clip(math.floor(pedicle_width * 0.7 * 2) / 2, 4.5, 7.5))


def _plan(names, specs, Ts, bones) -> list[dict]:
    plan = []
    for name, spec, T, bone in zip(names, specs, Ts, bones):
        for side, sx in zip(SIDES, (1.0, -1.0)):
            entry, target = _trajectory(spec, T, bone, sx)
            plan.append({
                "level": name,
                "label": LEVEL_LABELS[name],
                "side": side,
                "entry_world": [round(float(v), 4) for v in entry],
                "target_world": [round(float(v), 4) for v in target],
                "screw_diameter_mm": _screw_diameter(spec.pedicle_width),
            })
    return plan


def _disc_frame(upper: tuple[_LevelSpec, np.ndarray], lower: tuple[_LevelSpec, np.ndarray]):
    """(centre, x left, y posterior, height, width, depth) of the disc between two levels
    (world mm): centre midway between the facing endplate centres, axes of the upper
    vertebra, height the distance between the endplate centres, width and depth the mean
    of the two bodies'."""
    (su, Tu), (sl, Tl) = upper, lower
    top = Tu[:3, 3] - Tu[:3, 2] * su.height / 2
    bottom = Tl[:3, 3] + Tl[:3, 2] * sl.height / 2
    return ((top + bottom) / 2, Tu[:3, 0], Tu[:3, 1], float(np.linalg.norm(top - bottom)),
            (su.width + sl.width) / 2, (su.depth + sl.depth) / 2)


def _interbody_plan(names, specs, Ts, lower_s1: tuple[_LevelSpec, np.ndarray] | None) -> list[dict]:
    """Interbody access trajectories, each ending at its cage's centre (world mm).

    Lateral (LLIF, from the patient's left) for every lumbar disc: entry at the disc's left
    wall, target at the disc centre, a cage spanning the disc (length 6 mm less than the
    disc width, in 5 mm steps), 18 mm wide, 2 mm lower than the disc. Anterior (ALIF) for
    L4-L5 and L5-S1: entry at the anterior wall, target 3 mm anterior to the disc centre, a
    cage of 70% of the disc's width and depth, 2 mm lower than the disc.
    """
    pairs = list(zip(names, specs, Ts))
    discs = [(u[0], low[0], _disc_frame(u[1:], low[1:])) for u, low in zip(pairs[:-1], pairs[1:])]
    if lower_s1 is not None:
        discs.append((names[-1], "sacrum", _disc_frame((specs[-1], Ts[len(names) - 1]), lower_s1)))

    def point(p: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in p]

    plan = []
    for upper, lower, (centre, ex, ey, height, width, depth) in discs:
        cage_h = float(math.floor(height - 2.0))
        base = {"level": upper, "label": LEVEL_LABELS[upper], "level_below": lower}
        if lower != "sacrum":
            plan.append({**base, "approach": "lateral", "side": "left",
                         "entry_world": point(centre + ex * width / 2), "target_world": point(centre),
                         "cage": {"length_mm": float(5 * math.floor((width - 6.0) / 5)),
                                  "width_mm": 18.0, "height_mm": cage_h}})
        if upper == "L5" or lower == "L5":
            plan.append({**base, "approach": "anterior", "side": "midline",
                         "entry_world": point(centre - ey * depth / 2), "target_world": point(centre - 3.0 * ey),
                         "cage": {"length_mm": float(round(0.7 * depth)), "width_mm": float(round(0.7 * width)),
                                  "height_mm": cage_h}})
    return plan


# ---------------------------------------------------------------------------- phantom


@dataclass(frozen=True)
class Phantom:
    """CT (HU), label map (uint8, same grid), screw plan, interbody plan (lateral and
    anterior approaches, ``_interbody_plan``), level name -> label id, and the
    ``T_world_from_vertebra`` 4x4 frame of each level (origin at the body centre, x left,
    y posterior, z along the vertebra's superior axis) and the analytic ``bones`` (level
    name -> the shapes the CT was painted from; see ``bone_signed_distance``)."""

    ct: Volume
    labels: Volume
    plan: list[dict]
    levels: dict[str, int]
    T_world_from_vertebra: dict[str, np.ndarray] = field(default_factory=dict)
    interbody_plan: list[dict] = field(default_factory=list)
    bones: dict[str, _Bone] = field(default_factory=dict)

    def bone_signed_distance(self, level: str, points_world: np.ndarray) -> np.ndarray:
        """Signed distance (mm, negative inside) from world points (N, 3) (LPS mm) to the
        surface of one level's bone, from its analytic shapes: the ground truth that the
        voxelised CT and labels only approximate (the union is exact outside the bone and
        a lower bound of the depth inside)."""
        if level not in self.bones:
            raise ValueError(f"no bone for level {level!r}; levels: {', '.join(self.bones)}")
        p = np.asarray(points_world, dtype=np.float32).reshape(-1, 3)
        return np.asarray(self.bones[level].sdf(p[:, 0], p[:, 1], p[:, 2]), dtype=float)


def make_phantom(
    *,
    seed: int = 0,
    spacing_mm: float = 1.0,
    levels=LUMBAR,
    lordosis_deg: float = 40.0,
    scoliosis_deg: float = 0.0,
    include_sacrum: bool = False,
    variation: float = 1.0,
) -> Phantom:
    """Build the lumbar spine phantom (deterministic from ``seed``).

    ``levels``: contiguous lumbar level names; ``lordosis_deg`` / ``scoliosis_deg``: Cobb
    angles between the top and bottom vertebrae (sagittal, concave posteriorly; coronal,
    convex to the patient's left when positive); ``variation`` scales the seeded
    perturbation of sizes (a few %), angles (1-1.5 deg) and bone densities (0 = nominal).
    """
    names = _check_levels(levels)
    if not 0.2 <= spacing_mm <= 5.0:
        raise PhantomError(f"spacing_mm must be in [0.2, 5] mm; got {spacing_mm}")
    if not 0.0 <= variation <= 3.0:
        raise PhantomError(f"variation must be in [0, 3]; got {variation}")
    if not -30.0 <= lordosis_deg <= 80.0 or abs(scoliosis_deg) > 60.0:
        raise PhantomError("lordosis_deg must be in [-30, 80] and scoliosis_deg in [-60, 60]")
    if include_sacrum and names[-1] != "L5":
        raise PhantomError("include_sacrum needs L5 as the lowest level")
    rng = np.random.default_rng(seed)
    specs = _perturbed_specs(names, rng, variation)
    Ts = _vertebra_transforms(specs, rng, variation, lordosis_deg, scoliosis_deg, include_sacrum)
    bones = [_vertebra(s, T, LEVEL_LABELS[n], _bone_hu(rng, variation))
             for n, s, T in zip(names, specs, Ts)]
    pairs = list(zip(specs, Ts))
    discs = [_disc(u, low) for u, low in zip(pairs[:-1], pairs[1:])]
    if include_sacrum:
        discs.append(_disc(pairs[-1], (_S1, Ts[-1])))
        bones.append(_sacrum(Ts[-1], specs[-1], (1300.0, 180.0)))
    g = np.clip(rng.normal(0.0, 1.0, 3), -2, 2) * variation
    contour = _Contour(0.0, 150.0 * (1 + 0.03 * g[0]), 110.0 * (1 + 0.03 * g[1]), 2.0,
                       14.0 + 3.0 * g[2])
    grid = _make_grid(bones, contour, spacing_mm)
    ct = np.ascontiguousarray(np.broadcast_to(_soft_tissue_slice(grid, contour), grid.shape))
    for soft in [_canal(s, T) for s, T in pairs] + discs:
        _paint_soft(ct, grid, soft)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    depth = np.full(grid.shape, np.inf, dtype=np.float32)
    for bone in bones:
        _paint_bone(ct, labels, depth, grid, bone)
    level_ids = {n: LEVEL_LABELS[n] for n in names}
    frames = dict(zip(names, Ts))
    bone_of = dict(zip(names, bones))
    if include_sacrum:
        level_ids["sacrum"] = LEVEL_LABELS["sacrum"]
        frames["sacrum"] = Ts[-1]
        bone_of["sacrum"] = bones[-1]
    return Phantom(
        ct=Volume(ct, grid.T_world_from_index, "HU"),
        labels=Volume(labels, grid.T_world_from_index, "label"),
        plan=_plan(names, specs, Ts, bones),
        levels=level_ids,
        T_world_from_vertebra=frames,
        interbody_plan=_interbody_plan(names, specs, Ts, (_S1, Ts[-1]) if include_sacrum else None),
        bones=bone_of,
    )


def write_phantom(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write ``ct.nii.gz``, ``labels.nii.gz``, ``plan.json`` (screws) and
    ``interbody_plan.json`` (lateral and anterior approaches) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"ct": out / "ct.nii.gz", "labels": out / "labels.nii.gz", "plan": out / "plan.json",
             "interbody_plan": out / "interbody_plan.json"}
    save_volume(phantom.ct, paths["ct"])
    save_volume(phantom.labels, paths["labels"])
    write_plan(phantom.plan, paths["plan"])
    write_plan(phantom.interbody_plan, paths["interbody_plan"])
    return paths
