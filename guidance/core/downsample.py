"""Anti-aliased resampling of a volume onto a coarser grid, one axis at a time.

What: the volume's trilinear interpolant convolved with a Gaussian of sigma
``SIGMA_PER_SPACING`` x the new spacing, sampled on the new grid (same direction, centred
in the old voxel-centre box). Both filters are separable, so each axis is one 1-D
filter: output sample n takes ``sum_t w[n, t] * input[first[n] + t]``, with
``w = (hat * Gaussian)(x_n - k)`` in closed form (``hat`` the linear interpolation's
kernel). Taps that fall outside the input are dropped and the rest renormalised, so a
volume cut by its grid keeps its value at the cut.

Why not block means, a Gaussian filter and a trilinear resample (SimpleITK): on the
512 x 512 x 133 clinical grid the four smoothed volumes of a prepared CT took 2.7 s that
way and take 0.45 s this way (2 cores): each axis is read once, split over the cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from guidance.core.volume import Volume, VolumeError, covering_grid

__all__ = ["SIGMA_PER_SPACING", "downsample", "axis_weights"]

SIGMA_PER_SPACING = 0.6
"""The anti-aliasing Gaussian's sigma as a fraction of the new spacing. 0.6 keeps the
registration pyramid's coarse levels as smooth as SimpleITK's block means, Gaussian and
trilinear resample made them (nominally 0.5, plus the interpolation on the reduced grid):
with 0.5, two near-lateral real-CT views ended 5 mm off and were reported ok."""
TAIL_SIGMAS = 4.0
"""The Gaussian is cut this many sigmas from its centre."""


def downsample(volume: Volume, spacing_mm: float) -> Volume:
    """``volume`` smoothed and resampled onto the grid of ``spacing_mm`` that fits in its
    voxel-centre box (module docstring), float32. An axis whose spacing is already
    ``spacing_mm`` or coarser keeps its samples (a CT's 2.5 mm slices are not
    interpolated to 1 mm: as much information in 2.5x the voxels). The weights are
    non-negative: a non-negative volume stays so."""
    if spacing_mm <= 0:
        raise VolumeError(f"spacing_mm must be positive, got {spacing_mm}")
    spacing_out = np.maximum(float(spacing_mm), volume.spacing)
    size_ijk, origin = covering_grid(volume, spacing_out, volume.direction)
    T_out = volume.T_world_from_index.copy()
    T_out[:3, :3] = volume.direction * spacing_out
    T_out[:3, 3] = origin
    T_in_from_out = volume.T_index_from_world @ T_out  # diagonal: the grids share their axes
    data = np.ascontiguousarray(volume.data, dtype=np.float32)
    ratios = np.diag(T_in_from_out)[:3]
    for axis_ijk in np.argsort(-ratios):  # the most reducing axis first: later passes see less data
        if spacing_out[axis_ijk] <= volume.spacing[axis_ijk]:
            continue  # the same samples (covering_grid: same spacing, same box)
        axis_kji = 2 - int(axis_ijk)
        first, weights = axis_weights(data.shape[axis_kji], size_ijk[axis_ijk], float(T_in_from_out[axis_ijk, 3]),
                                      float(ratios[axis_ijk]), SIGMA_PER_SPACING * float(spacing_mm)
                                      / float(volume.spacing[axis_ijk]))
        shape = data.shape
        before, after = int(np.prod(shape[:axis_kji])), int(np.prod(shape[axis_kji + 1:]))
        out = np.empty((before, len(first), after), np.float32)
        if after == 1:
            _split(_filter_rows, before, data.reshape(before, shape[axis_kji]), first, weights, out[:, :, 0])
        else:
            _split(_filter_axis, len(first), data.reshape(before, shape[axis_kji], after), first, weights, out)
        data = out.reshape(shape[:axis_kji] + (len(first),) + shape[axis_kji + 1:])
    return Volume(data, T_out, volume.units)


def axis_weights(n_in: int, n_out: int, offset: float, ratio: float, sigma_voxels: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D filter of one axis: output n sits at input index ``offset + n * ratio``;
    ``sigma_voxels`` is the Gaussian's sigma in input voxels. Returns ``first`` (n_out,)
    int64 and ``weights`` (n_out, taps) float32, each row summing to 1 over its taps
    inside the input (all taps are)."""
    reach = 1.0 + TAIL_SIGMAS * sigma_voxels
    taps = min(int(np.floor(2 * reach)) + 2, n_in)
    x = offset + ratio * np.arange(n_out)
    # Every window lies inside the input (a clamped window still covers the kernel's support there).
    first = np.clip(np.floor(x - reach).astype(np.int64) + 1, 0, n_in - taps)
    k = first[:, None] + np.arange(taps)
    w = np.maximum(_hat_gaussian(x[:, None] - k, sigma_voxels), 0.0)  # the tails' rounding: never below zero
    total = w.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise VolumeError(f"an output sample at input index {x[total[:, 0] <= 0][0]:.2f} has no input voxel near it")
    return first, (w / total).astype(np.float32)


def _hat_gaussian(d: np.ndarray, sigma: float) -> np.ndarray:
    """(hat * Gaussian_sigma)(d): the linear interpolation kernel max(0, 1 - |u|) convolved
    with a unit Gaussian of ``sigma`` (input voxels); the hat itself for sigma -> 0."""
    if sigma < 1e-3:
        return np.maximum(0.0, 1.0 - np.abs(d))
    from scipy.special import ndtr

    def ramp_integral(a: float, b: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
        """Integral over v in [v0, v1] of (a + b v) * Gaussian_sigma(v)."""
        pdf = np.exp(-0.5 * (np.stack([v0, v1]) / sigma) ** 2) / np.sqrt(2 * np.pi)
        return a * (ndtr(v1 / sigma) - ndtr(v0 / sigma)) - b * sigma * (pdf[1] - pdf[0])

    # u = d + v runs over the hat's two sides: 1 + u on [-1, 0], 1 - u on [0, 1].
    return ramp_integral(1.0 + d, 1.0, -1.0 - d, -d) + ramp_integral(1.0 - d, -1.0, -d, 1.0 - d)


def _split(kernel, n: int, *arrays: np.ndarray) -> None:
    """``kernel(*arrays, lo, hi)`` over 0..n in one chunk per core, on threads that end
    before this returns. Not numba's parallel pool: a supervisor prepares its CT before it
    forks workers, and a forked child of a process that started that pool's threads lacks them."""
    threads = max(1, min(len(os.sched_getaffinity(0)), n))
    bounds = np.linspace(0, n, threads + 1).astype(int)
    if threads == 1:
        kernel(*arrays, 0, n)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="downsample") as pool:
        list(pool.map(lambda lo_hi: kernel(*arrays, *lo_hi), zip(bounds[:-1], bounds[1:])))


@numba.njit(cache=True, fastmath=True, nogil=True)
def _filter_axis(src, first, weights, out, n_lo, n_hi):
    """out[a, n, b] = sum_t weights[n, t] * src[a, first[n] + t, b] for n in n_lo..n_hi - 1:
    a 1-D filter along the middle axis."""
    for a in range(out.shape[0]):
        for n in range(n_lo, n_hi):
            out[a, n, :] = 0.0
            for t in range(weights.shape[1]):
                w = weights[n, t]
                k = first[n] + t
                for b in range(out.shape[2]):
                    out[a, n, b] += w * src[a, k, b]


@numba.njit(cache=True, fastmath=True, nogil=True)
def _filter_rows(src, first, weights, out, a_lo, a_hi):
    """out[a, n] = sum_t weights[n, t] * src[a, first[n] + t] for rows a_lo..a_hi - 1: the
    same filter along the contiguous axis."""
    for a in range(a_lo, a_hi):
        for n in range(out.shape[1]):
            acc = np.float32(0.0)
            for t in range(weights.shape[1]):
                acc += weights[n, t] * src[a, first[n] + t]
            out[a, n] = acc
