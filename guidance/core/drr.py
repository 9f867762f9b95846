"""Digitally reconstructed radiographs: a multi-threaded numba ray caster.

``render_drr`` returns, for each detector pixel, the line integral of linear
attenuation (1/mm) along the ray from the focal spot through the pixel centre,
i.e. the dimensionless ``-log(I / I0)`` an ideal detector would measure. Rays are
clipped to the box of voxel centres of the volume, sampled at a fixed step with
trilinear interpolation (midpoint rule), in any view geometry and for any volume
direction cosines (the ray is walked in continuous-index space).

Empty space is skipped without moving any sample: each ray visits only the samples
inside the box of non-zero voxels and jumps over bricks of voxels that are all zero
(an occupancy grid made once by ``prepare_volume``), which pays off for bone-only
volumes, where most of each ray crosses zeros.

``render_drr_motion`` also returns the image's derivative with respect to a small rigid
motion of the volume, from the same pass over the rays: the registration's Jacobian
without a render per parameter.

Typical use prepares the volume once (``prepare_volume``: attenuation values,
optional label selection, cropping to the non-zero box, occupancy grid) and renders
many views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid
from guidance.core.views import View
from guidance.core.volume import Volume, VolumeError, crop_to_mask

__all__ = ["DrrError", "DrrVolume", "prepare_volume", "render_drr", "render_drr_motion",
           "render_drr_reference"]


class DrrError(GuidanceError):
    """A render request that cannot be served (bad step, output buffer or label selection)."""


BRICK_VOXELS = 8
"""Edge (voxels) of the bricks of the occupancy grid that lets rays jump over empty space."""


@dataclass(frozen=True)
class DrrVolume:
    """A volume ready for rendering.

    Attenuation is stored as uint16 codes (``mu = code * mu_scale``, 1/mm), padded by
    one zero voxel at the high end of each axis so the trilinear kernel needs no
    bounds clamps; halving the bytes per voxel relative to float32 makes rendering
    about 1.4x faster at a quantisation of 1.5e-5 of the volume's maximum.
    ``size_ijk`` is the unpadded grid; ``step_mm`` the default sampling step.

    Empty-space skipping: ``occupancy`` [k, j, i] (uint8) is 1 for each brick of
    ``brick_voxels``^3 voxels that a sample inside it may read a non-zero voxel from (any
    non-zero voxel in the brick widened by one voxel below and two above, the trilinear
    footprint plus rounding); ``nonzero_box_ijk`` (2 x 3: low and high corner, continuous
    i, j, k index) is the box of non-zero voxels widened by one voxel, outside which
    every sample is zero. Both are derived from ``codes`` when not given. Every field is
    a numpy array or a scalar, so a prepared volume can be stored with ``np.savez`` and
    rebuilt with ``DrrVolume(**fields)``.
    """

    codes: np.ndarray
    mu_scale: float
    size_ijk: tuple[int, int, int]
    T_world_from_index: np.ndarray
    T_index_from_world: np.ndarray
    step_mm: float
    occupancy: np.ndarray | None = None
    nonzero_box_ijk: np.ndarray | None = None
    brick_voxels: int = BRICK_VOXELS

    def __post_init__(self) -> None:
        size = tuple(int(n) for n in np.asarray(self.size_ijk).ravel())
        brick = int(self.brick_voxels)
        object.__setattr__(self, "size_ijk", size)
        object.__setattr__(self, "mu_scale", float(self.mu_scale))
        object.__setattr__(self, "step_mm", float(self.step_mm))
        object.__setattr__(self, "brick_voxels", brick)
        if len(size) != 3 or self.codes.dtype != np.uint16 or self.codes.shape != tuple(n + 1 for n in size[::-1]):
            raise VolumeError(f"codes must be uint16 of shape (k, j, i) = size_ijk reversed + 1, got "
                              f"{self.codes.dtype} {self.codes.shape} for size_ijk {size}")
        if brick < 2 or brick & (brick - 1):
            raise VolumeError(f"brick_voxels must be a power of two >= 2, got {brick}")
        if self.occupancy is None or self.nonzero_box_ijk is None:
            occupancy, box = _occupancy(self.codes[: size[2], : size[1], : size[0]] > 0, brick)
            object.__setattr__(self, "occupancy", occupancy)
            object.__setattr__(self, "nonzero_box_ijk", box)
        bricks = tuple(-(-n // brick) for n in size[::-1])
        if self.occupancy.shape != bricks or self.nonzero_box_ijk.shape != (2, 3):
            raise VolumeError(f"occupancy {self.occupancy.shape} / nonzero_box_ijk {self.nonzero_box_ijk.shape} do not "
                              f"fit a {size} grid in bricks of {brick} (expected {bricks} / (2, 3))")
        object.__setattr__(self, "occupancy", np.ascontiguousarray(self.occupancy, dtype=np.uint8))
        object.__setattr__(self, "nonzero_box_ijk", np.ascontiguousarray(self.nonzero_box_ijk, dtype=np.float64))

    @property
    def mu(self) -> np.ndarray:
        """Attenuation (1/mm) as float32 [k, j, i] on the unpadded grid."""
        ni, nj, nk = self.size_ijk
        return self.codes[:nk, :nj, :ni].astype(np.float32) * np.float32(self.mu_scale)

    @property
    def volume(self) -> Volume:
        return Volume(data=self.mu, T_world_from_index=self.T_world_from_index, units="mu_per_mm")


def _brick_any(mask: np.ndarray, axis: int, brick: int) -> np.ndarray:
    """For each brick b along ``axis``: whether ``mask`` is set anywhere in voxels
    b * brick - 1 .. (b + 1) * brick + 1 (the brick widened by 1 below and 2 above)."""
    m = np.moveaxis(mask, axis, -1)
    n = m.shape[-1]
    nb = -(-n // brick)
    padded = np.zeros(m.shape[:-1] + (nb * brick + 3,), dtype=bool)
    padded[..., 1: n + 1] = m  # padded[x + 1] is voxel x
    out = padded[..., 1: nb * brick + 1].reshape(m.shape[:-1] + (nb, brick)).any(axis=-1)
    out |= padded[..., 0: nb * brick: brick]
    out |= padded[..., brick + 1:: brick][..., :nb]
    out |= padded[..., brick + 2:: brick][..., :nb]
    return np.moveaxis(out, -1, axis)


def _occupancy(nonzero: np.ndarray, brick: int) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy bricks [k, j, i] (uint8) and the widened box of non-zero voxels (2 x 3,
    i, j, k) of a boolean [k, j, i] grid; an empty grid gets no occupied brick."""
    occupancy = nonzero
    for axis in (2, 1, 0):  # the contiguous axis first: the later passes see 1/brick of the data
        occupancy = _brick_any(occupancy, axis, brick)
    lo_hi = []
    for axis in (2, 1, 0):  # i, j, k
        along = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        lo_hi.append((along[0] - 1.0, along[-1] + 1.0) if len(along) else (-1.0, nonzero.shape[axis]))
    return occupancy.astype(np.uint8), np.array(lo_hi, dtype=np.float64).T


def prepare_volume(
    mu_volume: Volume,
    *,
    labels: Volume | None = None,
    label_ids: tuple[int, ...] | list[int] | None = None,
    margin_mm: float = 2.0,
    step_mm: float | None = None,
    crop: bool = True,
) -> DrrVolume:
    """Make a ``DrrVolume`` from an attenuation volume (units "mu_per_mm").

    With ``labels`` (same grid) and ``label_ids`` only those structures are kept, e.g.
    one vertebra. With ``crop`` the grid is cut to the box of non-zero voxels (plus a
    margin), which moves the samples along each ray by a fraction of a step at most. The
    default step is one voxel of the finest axis. The occupancy grid for empty-space
    skipping is computed here (see ``DrrVolume``).
    """
    if mu_volume.units != "mu_per_mm":
        raise VolumeError(
            f"render_drr needs linear attenuation (units 'mu_per_mm'), got {mu_volume.units!r}; "
            "map HU with guidance.core.volume.hu_to_attenuation first"
        )
    data = mu_volume.data
    if labels is not None or label_ids is not None:
        if labels is None or label_ids is None:
            raise DrrError("label selection needs both labels and label_ids")
        if labels.data.shape != data.shape:
            raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {data.shape}")
        keep = np.isin(labels.data, np.asarray(list(label_ids)))
        if not keep.any():
            raise VolumeError(f"none of the labels {list(label_ids)} is present in the label map")
        mu_volume = mu_volume.with_data(np.where(keep, data, 0.0).astype(np.float32))
    if crop:
        nonzero = mu_volume.data > 0
        if nonzero.any():
            mu_volume = crop_to_mask(mu_volume, nonzero, margin_mm=margin_mm)
    if min(mu_volume.data.shape) < 2:
        raise VolumeError("the volume must have at least 2 voxels along each axis to render")
    if not np.all(np.isfinite(mu_volume.data)) or mu_volume.data.min() < 0:
        raise VolumeError("attenuation must be finite and non-negative")
    if step_mm is None:
        step_mm = float(mu_volume.spacing.min())
    mu_max = float(mu_volume.data.max())
    mu_scale = mu_max / 65535.0 if mu_max > 0 else 1.0
    nk, nj, ni = mu_volume.data.shape
    codes = np.zeros((nk + 1, nj + 1, ni + 1), dtype=np.uint16)
    codes[:nk, :nj, :ni] = np.rint(mu_volume.data / mu_scale)
    return DrrVolume(
        codes=codes,
        mu_scale=mu_scale,
        size_ijk=mu_volume.size_ijk,
        T_world_from_index=mu_volume.T_world_from_index,
        T_index_from_world=mu_volume.T_index_from_world,
        step_mm=float(step_mm),
    )


@numba.njit(cache=True, fastmath=True)
def _cell(flat, s_j, s_k, pi, pj, pk):
    """The trilinear cell of the point (pi, pj, pk) (continuous index in [0, size - 1]:
    truncation is floor and the zero pad keeps +1 valid): its fractions fi, fj, fk and
    its eight voxels a_kji. Unsigned offsets and float32 fractions: signed indices cost
    a negative-index check per load, float64 fractions a conversion per lerp (together
    1.4x the time per sample)."""
    i0 = int(pi)
    j0 = int(pj)
    k0 = int(pk)
    b = np.uint64(k0) * np.uint64(s_k) + np.uint64(j0) * np.uint64(s_j) + np.uint64(i0)
    bj = b + np.uint64(s_j)
    bk = b + np.uint64(s_k)
    bjk = bk + np.uint64(s_j)
    one = np.uint64(1)
    return (np.float32(pi - np.float32(i0)), np.float32(pj - np.float32(j0)), np.float32(pk - np.float32(k0)),
            np.float32(flat[b]), np.float32(flat[b + one]), np.float32(flat[bj]), np.float32(flat[bj + one]),
            np.float32(flat[bk]), np.float32(flat[bk + one]), np.float32(flat[bjk]), np.float32(flat[bjk + one]))


@numba.njit(cache=True, fastmath=True)
def _integrate(flat, s_j, s_k, a, s, m_begin, m_end, acc):
    """Add the trilinear samples ``a + m s`` (continuous index in [0, size - 1]), m in
    [m_begin, m_end), to ``acc`` (float64, as every caller starts it), stepping from one to
    the next. (A loop over independent
    positions a + m s was vectorised by LLVM, but then the code compiled in a process and
    the code numba loads from its cache summed in different orders: renders differed
    between runs.)"""
    fm = np.float32(m_begin)
    pi = a[0] + fm * s[0]
    pj = a[1] + fm * s[1]
    pk = a[2] + fm * s[2]
    si = s[0]
    sj = s[1]
    sk = s[2]
    for _ in range(m_begin, m_end):
        fi, fj, fk, a000, a001, a010, a011, a100, a101, a110, a111 = _cell(flat, s_j, s_k, pi, pj, pk)
        c00 = a000 + fi * (a001 - a000)
        c01 = a010 + fi * (a011 - a010)
        c10 = a100 + fi * (a101 - a100)
        c11 = a110 + fi * (a111 - a110)
        c0 = c00 + fj * (c01 - c00)
        c1 = c10 + fj * (c11 - c10)
        acc += c0 + fk * (c1 - c0)
        pi += si
        pj += sj
        pk += sk
    return acc


@numba.njit(cache=True, fastmath=True)
def _integrate_gradient(flat, s_j, s_k, a, s, m_begin, m_end, sums):
    """``_integrate`` that also sums the trilinear interpolant's gradient (per index
    unit) at each sample, plain and weighted by the sample number m: ``sums`` is
    (value, gi, gj, gk, m gi, m gj, m gk) (float64, as the caller starts them), returned updated."""
    acc, gi_sum, gj_sum, gk_sum, mgi_sum, mgj_sum, mgk_sum = sums
    fm = np.float32(m_begin)
    pi = a[0] + fm * s[0]
    pj = a[1] + fm * s[1]
    pk = a[2] + fm * s[2]
    for _ in range(m_begin, m_end):
        fi, fj, fk, a000, a001, a010, a011, a100, a101, a110, a111 = _cell(flat, s_j, s_k, pi, pj, pk)
        d00 = a001 - a000
        d01 = a011 - a010
        d10 = a101 - a100
        d11 = a111 - a110
        c00 = a000 + fi * d00
        c01 = a010 + fi * d01
        c10 = a100 + fi * d10
        c11 = a110 + fi * d11
        c0 = c00 + fj * (c01 - c00)
        c1 = c10 + fj * (c11 - c10)
        e0 = d00 + fj * (d01 - d00)
        e1 = d10 + fj * (d11 - d10)
        gi = e0 + fk * (e1 - e0)
        gj = (c01 - c00) + fk * ((c11 - c10) - (c01 - c00))
        gk = c1 - c0
        acc += c0 + fk * gk
        gi_sum += gi
        gj_sum += gj
        gk_sum += gk
        mgi_sum += fm * gi
        mgj_sum += fm * gj
        mgk_sum += fm * gk
        fm += np.float32(1.0)
        pi += s[0]
        pj += s[1]
        pk += s[2]
    return acc, gi_sum, gj_sum, gk_sum, mgi_sum, mgj_sum, mgk_sum


@numba.njit(cache=True, fastmath=True)
def _slab(lo, hi, src, d, t0, t1):
    """The part [t0, t1] of the ray src + t d that lies in the box lo..hi (per axis);
    empty when t1 <= t0."""
    for ax in range(3):
        if abs(d[ax]) < 1e-12:
            if src[ax] < lo[ax] or src[ax] > hi[ax]:
                t1 = -1.0
        else:
            ta = (lo[ax] - src[ax]) / d[ax]
            tb = (hi[ax] - src[ax]) / d[ax]
            if ta > tb:
                ta, tb = tb, ta
            t0 = max(t0, ta)
            t1 = min(t1, tb)
    return t0, t1


@numba.njit(cache=True, fastmath=True)
def _dda_start(src, d, t0, step, m, brick_shift):
    """Brick walk along one axis from sample m (t = t0 + (m + 0.5) step): brick index,
    its step (+-1, 0), the sample coordinate of the next brick face and its increment."""
    p = src + (t0 + (m + 0.5) * step) * d
    sm = step * d
    brick = 1 << brick_shift
    b = int(p) >> brick_shift
    if sm > 0.0:
        return b, 1, m + ((b + 1) * brick - p) / sm, brick / sm
    if sm < 0.0:
        return b, -1, m + (b * brick - p) / sm, -brick / sm
    return b, 0, 1e30, 0.0


@numba.njit(cache=True, fastmath=True)
def _sum_run(flat, s_j, s_k, a, s, m_begin, m_end, sums, with_gradient):
    """The samples m_begin .. m_end - 1 added to ``sums`` (``_integrate_gradient``'s
    seven; only the first without ``with_gradient``)."""
    if with_gradient:
        return _integrate_gradient(flat, s_j, s_k, a, s, m_begin, m_end, sums)
    return (_integrate(flat, s_j, s_k, a, s, m_begin, m_end, sums[0]),
            sums[1], sums[2], sums[3], sums[4], sums[5], sums[6])


@numba.njit(cache=True, fastmath=True)
def _cast_row(v, codes, occupancy, brick_shift, box, grid_box, Kinv, R, src, step_mm, mu_scale, skip_empty, out,
              with_motion, motion):
    """Line integrals of detector row ``v`` into ``out[v]`` (and with ``with_motion``
    their derivatives under a motion of the volume into ``motion[v]``: see
    ``render_drr_motion``).

    Each ray is clipped to ``grid_box`` (the box of voxel centres) and sampled at the
    midpoints of n = ceil(length / step_mm) equal steps (this rule fixes every sample
    position). With ``skip_empty`` only the samples inside ``box`` (the non-zero voxels'
    box, widened so that samples outside read only zeros) are visited, and runs of
    samples in bricks whose ``occupancy`` is 0 are jumped over: those samples read only
    zero voxels, so the sum is the same."""
    W = out.shape[1]
    s_j = codes.shape[2]
    s_k = codes.shape[1] * codes.shape[2]
    flat = codes.ravel()
    last_k, last_j, last_i = occupancy.shape[0] - 1, occupancy.shape[1] - 1, occupancy.shape[2] - 1
    for u in range(W):
        out[v, u] = 0.0
        if with_motion:
            motion[v, u, :] = 0.0
        dx = Kinv[0, 0] * u + Kinv[0, 1] * v + Kinv[0, 2]
        dy = Kinv[1, 1] * v + Kinv[1, 2]
        norm = math.sqrt(dx * dx + dy * dy + 1.0)
        dx /= norm
        dy /= norm
        dz = 1.0 / norm
        # Ray direction in index units per mm travelled.
        d = (
            R[0, 0] * dx + R[0, 1] * dy + R[0, 2] * dz,
            R[1, 0] * dx + R[1, 1] * dy + R[1, 2] * dz,
            R[2, 0] * dx + R[2, 1] * dy + R[2, 2] * dz,
        )
        t0, t1 = _slab(grid_box[0], grid_box[1], src, d, 0.0, 1e30)
        if t1 <= t0:
            continue
        n = int(math.ceil((t1 - t0) / step_mm))
        step = (t1 - t0) / n
        tm = t0 + 0.5 * step
        a = (np.float32(src[0] + tm * d[0]), np.float32(src[1] + tm * d[1]), np.float32(src[2] + tm * d[2]))
        s = (np.float32(step * d[0]), np.float32(step * d[1]), np.float32(step * d[2]))
        sums = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # float64: hundreds of float32 samples per ray
        if not skip_empty:
            sums = _sum_run(flat, s_j, s_k, a, s, 0, n, sums, with_motion)
        else:
            ta, tb = _slab(box[0], box[1], src, d, t0, t1)
            if tb <= ta:
                continue
            # Samples m whose t = t0 + (m + 0.5) step lies in [ta, tb], one more each side.
            m = max(0, int(math.floor((ta - t0) / step - 0.5)))
            m_end = min(n, int(math.ceil((tb - t0) / step - 0.5)) + 1)
            # Walk the bricks along the ray (3D DDA in units of samples): brick index b*,
            # sample coordinate of the next face crossing f*, its increment g* per brick.
            bi, di, fi, gi = _dda_start(src[0], d[0], t0, step, m, brick_shift)
            bj, dj, fj, gj = _dda_start(src[1], d[1], t0, step, m, brick_shift)
            bk, dk, fk, gk = _dda_start(src[2], d[2], t0, step, m, brick_shift)
            run = -1
            while m < m_end:
                f = min(fi, fj, fk)
                # Samples m .. m_next - 1 lie in this brick (up to rounding, which the
                # widened occupancy covers).
                m_next = m_end if f >= m_end else int(max(f, 0.0)) + 1
                if m_next > m:
                    if occupancy[min(max(bk, 0), last_k), min(max(bj, 0), last_j), min(max(bi, 0), last_i)]:
                        if run < 0:
                            run = m
                    elif run >= 0:
                        sums = _sum_run(flat, s_j, s_k, a, s, run, m, sums, with_motion)
                        run = -1
                    m = m_next
                if f == fi:
                    bi += di
                    fi += gi
                elif f == fj:
                    bj += dj
                    fj += gj
                else:
                    bk += dk
                    fk += gk
            if run >= 0:
                sums = _sum_run(flat, s_j, s_k, a, s, run, m_end, sums, with_motion)
        weight = step * mu_scale
        out[v, u] = sums[0] * weight
        if with_motion:
            ray = (dx, dy, dz)
            mu0, ds0 = _box_end(flat, s_j, s_k, grid_box, src, d, t0, R, ray, mu_scale)
            mu1, ds1 = _box_end(flat, s_j, s_k, grid_box, src, d, t1, R, ray, mu_scale)
            _motion_sensitivity(sums, tm, step, weight, R, ray, mu0, ds0, mu1, ds1, motion[v, u])


@numba.njit(cache=True, fastmath=True)
def _box_end(flat, s_j, s_k, grid_box, src, d, t, R, ray, mu_scale):
    """Where a ray leaves or enters the box of voxel centres, at t (mm from the source):
    the attenuation there (1/mm), and how far that end moves along the ray per unit of a
    motion (w, b) of the volume (6-tuple, mm): n . v(q) / (n . d) with n the face's
    normal, v(q) = w x q + b at the end q (w . (q x n) + b . n). Zero for a ray that
    grazes its face (|n . d| < 0.1 |n|), where the end's motion is unbounded."""
    p = (src[0] + t * d[0], src[1] + t * d[1], src[2] + t * d[2])
    axis = 0
    nearest = 1e30
    for a in range(3):
        gap = min(abs(p[a] - grid_box[0, a]), abs(p[a] - grid_box[1, a]))
        if gap < nearest:
            nearest = gap
            axis = a
    inside = (np.float32(min(max(p[0], grid_box[0, 0]), grid_box[1, 0])),
              np.float32(min(max(p[1], grid_box[0, 1]), grid_box[1, 1])),
              np.float32(min(max(p[2], grid_box[0, 2]), grid_box[1, 2])))
    zero = np.float32(0.0)
    mu = _integrate(flat, s_j, s_k, inside, (zero, zero, zero), 0, 1, 0.0) * mu_scale
    n = (R[axis, 0], R[axis, 1], R[axis, 2])  # index = R q + src: the face i_axis = const has normal R[axis]
    nd = n[0] * ray[0] + n[1] * ray[1] + n[2] * ray[2]
    if abs(nd) < 0.1 * math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]):
        return mu, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    q = (t * ray[0], t * ray[1], t * ray[2])
    return mu, ((q[1] * n[2] - q[2] * n[1]) / nd, (q[2] * n[0] - q[0] * n[2]) / nd, (q[0] * n[1] - q[1] * n[0]) / nd,
                n[0] / nd, n[1] / nd, n[2] / nd)


@numba.njit(cache=True, fastmath=True)
def _motion_sensitivity(sums, tm, step, weight, R, ray, mu0, ds0, mu1, ds1, out):
    """d (line integral) / d (w, b) of one ray (``render_drr_motion``) into ``out`` (6),
    from ``_integrate_gradient``'s sums: G = integral of grad mu ds and G1 = integral of s
    grad mu ds (s mm from the source; sample m at s = tm + m step), both turned from index
    to camera axes (grad_cam = R^T grad_index). A velocity v(q) = w x q + b of the volume
    changes the integral inside the clipped ray by -(G . v) = -(G . b + w . (d x G1)) for
    the unit ray d, and moves its ends (``_box_end``: mu0 at the entry, mu1 at the exit,
    and their motions ds0, ds1), adding mu1 ds1 - mu0 ds0. Along the ray, grad mu
    integrates exactly to mu1 - mu0: the sum's own part there is the sampling's noise (the
    samples sit still while the volume moves through them), which would swamp a depth
    motion's small effect, so it is replaced by that (v . d is the same all along the ray)."""
    G = _camera_axes(R, (sums[1], sums[2], sums[3]), weight)
    G1 = _camera_axes(R, (tm * sums[1] + step * sums[4], tm * sums[2] + step * sums[5],
                          tm * sums[3] + step * sums[6]), weight)
    along = G[0] * ray[0] + G[1] * ray[1] + G[2] * ray[2] - (mu1 - mu0)
    d_x_G1 = (ray[1] * G1[2] - ray[2] * G1[1], ray[2] * G1[0] - ray[0] * G1[2], ray[0] * G1[1] - ray[1] * G1[0])
    for a in range(3):
        out[a] = -d_x_G1[a] + mu1 * ds1[a] - mu0 * ds0[a]
        out[3 + a] = -(G[a] - along * ray[a]) + mu1 * ds1[3 + a] - mu0 * ds0[3 + a]


@numba.njit(cache=True, fastmath=True)
def _camera_axes(R, g, weight):
    """weight x R^T g: an index-space gradient (sum) in camera axes (index = R q + src)."""
    return ((R[0, 0] * g[0] + R[1, 0] * g[1] + R[2, 0] * g[2]) * weight,
            (R[0, 1] * g[0] + R[1, 1] * g[1] + R[2, 1] * g[2]) * weight,
            (R[0, 2] * g[0] + R[1, 2] * g[1] + R[2, 2] * g[2]) * weight)


# Two distinct functions (not two dispatchers of one): numba keys its on-disk cache by
# the function's name and line, so one function compiled twice would share one cache
# entry and load whichever variant was compiled first for both. Both release the GIL, so
# the live loop's thread (heartbeats, tracker samples) runs while a registration renders.
@numba.njit(cache=True, parallel=True, fastmath=True, nogil=True)
def _cast_parallel(codes, occupancy, brick_shift, box, grid_box, Kinv, R, src, step_mm, mu_scale, skip_empty, out,
                   with_motion, motion):
    """All detector rows, spread over numba's threads."""
    for v in numba.prange(out.shape[0]):
        _cast_row(v, codes, occupancy, brick_shift, box, grid_box, Kinv, R, src, step_mm, mu_scale, skip_empty, out,
                  with_motion, motion)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _cast_serial(codes, occupancy, brick_shift, box, grid_box, Kinv, R, src, step_mm, mu_scale, skip_empty, out,
                 with_motion, motion):
    """All detector rows on the calling thread."""
    for v in range(out.shape[0]):
        _cast_row(v, codes, occupancy, brick_shift, box, grid_box, Kinv, R, src, step_mm, mu_scale, skip_empty, out,
                  with_motion, motion)


PARALLEL_MIN_PIXELS = 192 * 192
"""By default smaller images render on one thread: their work per parallel region is so
short that waiting for a descheduled peer (a busy 2-core machine: the live simulator,
pipeline and display together) costs more than the second thread gains (measured 10x
slower registrations under load). On an otherwise idle machine both threads win at
every size (a single-view registration 1.75 -> 1.33 s)."""


def _ray_geometry(drr_volume: DrrVolume, view: View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    T_index_from_cam = drr_volume.T_index_from_world @ invert_rigid(view.T_cam_from_world)
    Kinv = np.linalg.inv(view.K)
    return Kinv, np.ascontiguousarray(T_index_from_cam[:3, :3]), T_index_from_cam[:3, 3].copy()


def render_drr(
    volume: DrrVolume | Volume,
    view: View,
    *,
    step_mm: float | None = None,
    out: np.ndarray | None = None,
    skip_empty: bool = True,
    parallel: bool | None = None,
) -> np.ndarray:
    """Line-integral image (H, W) float32 of ``volume`` seen in ``view``: per pixel the
    integral of mu (1/mm) along the ray in mm (dimensionless); ``view.T_cam_from_world``
    maps the volume's world (LPS mm) to the X-ray source frame.

    ``view`` may be a sub-window (``View.cropped``) or a binned detector
    (``View.downsampled``) for coarse-to-fine work. A plain ``Volume`` in mu_per_mm is
    prepared on the fly; prepare once with ``prepare_volume`` when rendering often.
    ``skip_empty`` jumps over empty space (same samples, same sums); False walks every
    sample of every ray, for comparison. ``parallel``: spread the rows over numba's
    threads (None: only images of ``PARALLEL_MIN_PIXELS`` or more).
    """
    return _render(volume, view, step_mm, out, None, skip_empty, parallel)[0]


def render_drr_motion(volume: DrrVolume | Volume, view: View, *, out: np.ndarray | None = None,
                      parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``render_drr``'s image and its derivative (H, W, 6) float32 with respect to a small
    rigid motion of the volume, the twist (w rad, b mm) in the view's camera frame that
    moves a point q by w x q + b: ``image change = motion @ twist``.

    One pass over the rays (about 1.1-1.3x a plain render; the volume's step, empty space
    skipped), where finite differences need a render per parameter. It sums the trilinear
    interpolant's gradient at the image's own samples, except along the ray, where their
    sum is noise and the exact value (the attenuation at the ray's ends) is taken, and it
    counts the ray's ends moving with the volume's box (``_motion_sensitivity``)."""
    return _render(volume, view, None, out, np.empty(view.shape + (6,), np.float32), True, parallel)


def _render(volume: DrrVolume | Volume, view: View, step_mm: float | None, out: np.ndarray | None,
            motion: np.ndarray | None, skip_empty: bool, parallel: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """The ray cast behind ``render_drr`` and ``render_drr_motion`` (motion None: image only)."""
    if isinstance(volume, Volume):
        volume = prepare_volume(volume)
    step = volume.step_mm if step_mm is None else float(step_mm)
    if step <= 0:
        raise DrrError("step_mm must be positive")
    if out is None:
        out = np.empty(view.shape, dtype=np.float32)
    elif out.shape != view.shape or out.dtype != np.float32:
        raise DrrError(f"out must be float32 of shape {view.shape}")
    Kinv, R, src = _ray_geometry(volume, view)
    grid_box = np.array([[0.0, 0.0, 0.0], np.array(volume.size_ijk) - 1.0])
    if parallel is None:
        parallel = out.size >= PARALLEL_MIN_PIXELS
    cast = _cast_parallel if parallel else _cast_serial
    brick_shift = volume.brick_voxels.bit_length() - 1
    with_motion = motion is not None
    cast(volume.codes, volume.occupancy, brick_shift, volume.nonzero_box_ijk, grid_box, Kinv, R, src, step,
         volume.mu_scale, bool(skip_empty), out, with_motion, motion if with_motion else _NO_MOTION)
    return out, motion


_NO_MOTION = np.empty((1, 1, 6), np.float32)
"""The kernel's motion argument when only the image is wanted (one compiled signature)."""


def render_drr_reference(
    volume: Volume, view: View, *, step_mm: float = 0.1, kernel_samples: bool = False
) -> np.ndarray:
    """Slow, independent reference, interpolating with ``scipy.ndimage.map_coordinates``
    (order 1, zero outside the voxel-centre box) in float64. For tests only.

    By default dense samples every ``step_mm`` along each ray from the source to far
    beyond the volume. With ``kernel_samples`` the samples sit where ``render_drr`` puts
    them on this grid (each ray clipped to the voxel-centre box, ceil(length / step_mm)
    equal steps, their midpoints), so the two agree to float32 rounding."""
    from scipy.ndimage import map_coordinates

    from guidance.core.geometry import backproject

    H, W = view.shape
    vv, uu = np.mgrid[0:H, 0:W]
    source, dirs = backproject(view.K, view.T_cam_from_world, np.column_stack([uu.ravel(), vv.ravel()]))
    corners = volume.corners_world()
    dist = np.linalg.norm(corners - source, axis=1)
    t_dense = np.arange(dist.min() - step_mm, dist.max() + step_mm, step_mm) + 0.5 * step_mm
    out = np.zeros(H * W)
    M = volume.T_index_from_world
    src_idx = M[:3, :3] @ source + M[:3, 3]
    size = np.array(volume.size_ijk) - 1.0
    data = volume.data.astype(np.float64)
    for start in range(0, H * W, 256):
        d_idx = dirs[start: start + 256] @ M[:3, :3].T
        if kernel_samples:
            with np.errstate(divide="ignore", invalid="ignore"):
                ta, tb = (0.0 - src_idx) / d_idx, (size - src_idx) / d_idx
            t0 = np.nan_to_num(np.minimum(ta, tb), nan=-np.inf).max(axis=1).clip(0.0, None)
            t1 = np.nan_to_num(np.maximum(ta, tb), nan=np.inf).min(axis=1)
            hit = t1 > t0
            n = np.where(hit, np.ceil((t1 - t0) / step_mm), 0).astype(int)
            ray_step = np.where(hit, (t1 - t0) / np.maximum(n, 1), 0.0)
            m = np.arange(max(int(n.max()), 1))
            t = t0[:, None] + (m[None, :] + 0.5) * ray_step[:, None]
            weight = (m[None, :] < n[:, None]) * ray_step[:, None]
        else:
            t = np.broadcast_to(t_dense, (len(d_idx), len(t_dense)))
            weight = np.full(t.shape, step_mm)
        pts = src_idx[None, None, :] + t[..., None] * d_idx[:, None, :]
        coords = np.stack([pts[..., 2], pts[..., 1], pts[..., 0]])
        vals = map_coordinates(data, coords.reshape(3, -1), order=1, cval=0.0).reshape(t.shape)
        if not kernel_samples:
            vals = np.where(np.all((pts >= 0) & (pts <= size), axis=-1), vals, 0.0)
        out[start: start + 256] = (vals * weight).sum(axis=1)
    return out.reshape(H, W).astype(np.float32)
