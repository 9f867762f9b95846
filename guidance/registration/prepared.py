"""A CT prepared once for many 2D/3D registrations, and its disk cache.

Preparation maps HU to linear attenuation and splits it at the bone threshold into
bone (the attenuation above the threshold's, so it starts at zero on the bone's edge)
and soft tissue (everything up to the threshold's attenuation). The bone is cropped to
its bounding box and built into a volume pyramid (Gaussian pre-filter, coarser
grids; an axis already as coarse, e.g. 2.5 mm slices, keeps its samples) with the
label map on every pyramid level; the soft tissue is kept on one coarse grid, because
it is smooth and only its edges at the scale of millimetres (body outline, fat
planes, gas) matter. Without it a real CT's depth along the beam
came out 1-2.5 mm off: the X-ray shows those edges and a bone-only model does not.
Also stored: the rotation centres (bone centroids of the whole CT and of every label)
and the spine axis and vertebral height used to try starts one level up and down.

A prepared CT is saved with ``np.savez`` (arrays and a JSON header, no pickled
objects) under a name derived from a hash of the CT's voxels and geometry, the label
map and the settings that shape the pyramid. A file whose stored hash or format
version does not match, or that fails to load, is rebuilt, never used.

SimpleITK and scipy are imported by the functions that use them (preparing, a vertebra's
volume): a live pipeline that loads its prepared CT from the cache does not wait for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from guidance.core.cache import default_cache_dir
from guidance.core.downsample import downsample
from guidance.core.drr import DrrVolume, prepare_volume, render_drr, render_drr_motion
from guidance.core.errors import GuidanceError
from guidance.core.views import View
from guidance.core.volume import (
    BODY_HU, Volume, VolumeError, attenuation_from_hu, body_cut_faces, hu_to_attenuation, resample,
)

__all__ = [
    "PREPARED_FORMAT",
    "PrepareSettings",
    "PreparedCT",
    "AnatomyModel",
    "prepare_ct",
    "load_or_prepare",
]

log = logging.getLogger(__name__)

PREPARED_FORMAT = "guidance.prepared_ct/7"
LABEL_MARGIN_VOXELS = 1  # a vertebra's coarse volume keeps this many voxels around its label (smoothed edges)
SOFT_PIXEL_PER_VOXEL = 0.6
"""Soft tissue is drawn on a detector whose pixel, back-projected to the anatomy, is this
fraction of its voxel (finer detectors are not binned), then interpolated up."""


class PreparedCTError(GuidanceError):
    """A CT that cannot be prepared (no bone above the threshold, label grid mismatch)."""


@dataclass(frozen=True)
class PrepareSettings:
    """The settings that shape a prepared CT (all part of its cache key).

    ``bone_threshold_hu``: voxels below are not bone (None: everything is rendered as
    bone, on the fine grids); ``soft_tissue_spacing_mm``: the grid of the soft tissue
    below the threshold (None: bone only, as a model without soft tissue); ``energy_kev``:
    effective energy of the HU -> attenuation map; ``pyramid_spacings_mm``: the
    spacings of the smoothed coarse volumes (an axis already coarser keeps its samples;
    the native bone volume is always level 0);
    ``vertebra_height_mm``: the spine's repeat distance when no label map gives it.
    ``soft_continuation_mm``: beyond each face of the CT's box that the body touches the soft
    tissue goes on this far (``_continued``; 0: it ends at the face).
    ``fine_soft_tissue_spacing_mm``: the soft tissue's grid drawn with the native bone grid (the
    finest pyramid level; None: ``soft_tissue_spacing_mm`` there too): the 4 mm grid alone left
    one view of the phantom and one of the real CT 2.0-2.1 mm off in depth from every start,
    halved no mTRE and lowered every view's similarity by 0.02-0.09 (docs/benchmarks.md,
    sessions 15-16).
    """

    bone_threshold_hu: float | None = 150.0
    soft_tissue_spacing_mm: float | None = 4.0
    energy_kev: float = 60.0
    pyramid_spacings_mm: tuple[float, ...] = (1.0, 2.0, 4.0)
    vertebra_height_mm: float = 30.0
    soft_continuation_mm: float = 60.0
    fine_soft_tissue_spacing_mm: float | None = 2.0


@dataclass(frozen=True)
class AnatomyModel:
    """What a 2D/3D registration renders: ``bone`` on a pyramid grid plus, when prepared,
    the ``soft`` tissue on its coarse grid, drawn on a binned detector and interpolated
    up (its line integrals add to the bone's). That detector is binned a whole number of
    times (``soft_factor_for``), at least ``soft_binning`` (a coarse search level, where it only
    steers candidates), or ``soft_factor`` times when that is set (``fixed_for``)."""

    bone: DrrVolume
    soft: DrrVolume | None = None
    soft_binning: float = 1.0
    soft_factor: int | None = None

    def soft_factor_for(self, view: View) -> int:
        """The soft tissue's detector binning in ``view``: whole pixels that, back-projected to
        the soft grid's centre, are about ``SOFT_PIXEL_PER_VOXEL`` of its voxel, at least
        ``soft_binning`` (1: not binned, also without soft tissue)."""
        soft = self.soft
        if soft is None:
            return 1
        T = soft.T_world_from_index
        centre = T[:3, :3] @ ((np.array(soft.size_ijk) - 1.0) / 2.0) + T[:3, 3]
        depth_mm = float(view.T_cam_from_world[2, :3] @ centre + view.T_cam_from_world[2, 3])
        footprint_mm = depth_mm / float(view.K[0, 0])
        # A whole number of pixels: a binning that followed the depth continuously would move
        # the binned detector's grid with every pose, and the image's motion derivative with it.
        return max(1, int(np.ceil(max(SOFT_PIXEL_PER_VOXEL * soft.step_mm / footprint_mm, self.soft_binning))))

    def fixed_for(self, view: View) -> "AnatomyModel":
        """This model with the soft tissue's binning fixed at ``view``'s, for every pose near it
        (one registration's): taken from each pose, it switched between whole numbers where
        the depth crossed a boundary (2.002 -> 1.999 of a voxel over 1 mm), a step in the cost."""
        return replace(self, soft_factor=self.soft_factor_for(view))

    def render(self, view: View, *, out: np.ndarray | None = None, parallel: bool | None = None) -> np.ndarray:
        """Line-integral image (H, W) float32 of the anatomy in ``view`` (render_drr's
        conventions; ``out`` is filled and returned when given)."""
        image = render_drr(self.bone, view, out=out, parallel=parallel)
        if self.soft is not None:
            image += self._soft_image(view, parallel, with_motion=False)[0]
        return image

    def render_motion(self, view: View, *, parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``render``'s image and its derivative (H, W, 6) with respect to a small motion of
        the anatomy (``render_drr_motion``: the twist (w rad, b mm) in the view's camera frame)."""
        image, motion = render_drr_motion(self.bone, view, parallel=parallel)
        if self.soft is not None:
            soft_image, soft_motion = self._soft_image(view, parallel, with_motion=True)
            image += soft_image
            motion += soft_motion
        return image, motion

    def _soft_image(self, view: View, parallel: bool | None,
                    with_motion: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The soft tissue's line integrals in ``view`` and, with ``with_motion``, their motion
        derivative (else None), drawn on a binned detector and interpolated up."""
        soft = self.soft
        factor = float(self.soft_factor if self.soft_factor is not None else self.soft_factor_for(view))
        if factor <= 1.0:
            return render_drr_motion(soft, view, parallel=parallel) if with_motion else (
                render_drr(soft, view, parallel=parallel), None)
        W, H = view.image_size
        coarse = view.downsampled(factor)
        coarse = coarse.cropped(0, 0, int(np.ceil(W / factor)) + 1, int(np.ceil(H / factor)) + 1)
        # Pixel (u, v) of the view lies at ((u + 0.5) / factor - 0.5, ...) of the binned one (View.downsampled).
        to_small = np.array([[1.0 / factor, 0.0, 0.5 / factor - 0.5], [0.0, 1.0 / factor, 0.5 / factor - 0.5]])

        def up(small: np.ndarray) -> np.ndarray:
            return cv2.warpAffine(small, to_small, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)

        if not with_motion:
            return up(render_drr(soft, coarse, parallel=parallel)), None
        small, small_motion = render_drr_motion(soft, coarse, parallel=parallel)
        # warpAffine takes at most 4 channels: the motion's 6 in two halves
        motion = np.concatenate([up(np.ascontiguousarray(small_motion[..., :3])),
                                 up(np.ascontiguousarray(small_motion[..., 3:]))], axis=-1)
        return up(small), motion


@dataclass(frozen=True)
class PreparedCT:
    """Bone attenuation volumes, finest first, the soft tissue, labels, centres and the
    spine axis.

    ``volumes[0]`` is the native grid cropped to the bone (plus margin), the others the
    coarser ``spacings_mm``; ``soft`` the soft tissue on its coarse grid (None when not
    prepared), ``soft_fine`` on the finer grid drawn with ``volumes[0]`` (None: ``soft``
    there too); ``labels[n]`` is the label map on ``volumes[n]``'s grid
    (None without labels). ``centres`` maps a label id (-1 for the whole CT) to the
    bone centroid (world mm). ``spine_axis_world`` is a unit vector (world) along the
    spine, ``vertebra_height_mm`` its repeat distance. ``key`` identifies the inputs,
    ``prepare_s`` is how long building or loading took, ``from_cache`` which one it was.
    """

    volumes: tuple[DrrVolume, ...]
    spacings_mm: tuple[float, ...]
    labels: tuple[np.ndarray | None, ...]
    centres: dict[int, np.ndarray]
    spine_axis_world: np.ndarray
    vertebra_height_mm: float
    key: str
    soft: DrrVolume | None = None
    soft_fine: DrrVolume | None = None
    prepare_s: float = 0.0
    from_cache: bool = False

    def centre(self, label: int | None) -> np.ndarray:
        """Bone centroid (world mm) of a label, or of the whole CT for None."""
        key = -1 if label is None else int(label)
        if key not in self.centres:
            raise VolumeError(f"label {label} is not present in the label map")
        return self.centres[key]

    def pyramid_index(self, spacing_mm: float) -> int:
        """Index of the coarsest volume whose spacing is at most ``spacing_mm`` (0 if none)."""
        fits = [n for n, s in enumerate(self.spacings_mm) if s <= spacing_mm * 1.0001]
        return max(fits, key=lambda n: self.spacings_mm[n]) if fits else 0

    def anatomy(self, index: int) -> AnatomyModel:
        """What registration renders on pyramid level ``index``: all bone and the soft tissue."""
        return AnatomyModel(self.volumes[index], self.soft_tissue(index))

    def soft_tissue(self, index: int) -> DrrVolume | None:
        """The soft tissue drawn with pyramid level ``index``'s bone: the fine grid with the
        native one."""
        return self.soft_fine if index == 0 and self.soft_fine is not None else self.soft

    def volume(self, index: int, label: int | None = None) -> DrrVolume:
        """Bone volume of pyramid level ``index``: all bone, or one label's bone
        (plus ``LABEL_MARGIN_VOXELS``), cropped to it."""
        dv = self.volumes[index]
        if label is None:
            return dv
        labels = self.labels[index]
        if labels is None:
            raise PreparedCTError("per-vertebra registration needs a label map")
        keep = labels == int(label)
        if not keep.any():
            raise VolumeError(f"label {label} is not present in the label map")
        from scipy import ndimage

        keep = ndimage.binary_dilation(keep, iterations=LABEL_MARGIN_VOXELS)
        mu = dv.mu
        only = Volume(np.where(keep, mu, 0.0).astype(np.float32), dv.T_world_from_index, "mu_per_mm")
        return prepare_volume(only, margin_mm=float(self.spacings_mm[index]), step_mm=dv.step_mm)


def cache_key(ct: Volume, labels: Volume | None, settings: PrepareSettings) -> str:
    """Hex digest of the CT voxels and geometry, the label map and the settings."""
    return content_digest(ct, labels, PREPARED_FORMAT, repr(settings))


def content_digest(ct: Volume, labels: Volume | None, *texts: str) -> str:
    """Hex digest of two volumes' voxels, dtypes and geometry (or their absence), with
    ``texts[0]`` before and the other texts after them: one content identity for the
    disk cache and for the evaluation workers' registrators."""
    h = hashlib.blake2b(digest_size=20)
    h.update(texts[0].encode() if texts else b"")
    for volume in (ct, labels):
        if volume is None:
            h.update(b"none")
            continue
        data = np.ascontiguousarray(volume.data)
        h.update(f"{data.dtype.str}{data.shape}".encode())
        h.update(np.asarray(volume.T_world_from_index, dtype=np.float64).tobytes())
        h.update(memoryview(data).cast("B"))
    for text in texts[1:]:
        h.update(text.encode())
    return h.hexdigest()


def _labels_on(labels: Volume, dv: DrrVolume) -> np.ndarray:
    """The label map resampled (nearest) onto a rendering volume's grid, uint16 [k, j, i]."""
    ni, nj, nk = dv.size_ijk
    grid = Volume(np.zeros((nk, nj, ni), np.float32), dv.T_world_from_index, "label")
    on = resample(labels, spacing=tuple(grid.spacing), size=(ni, nj, nk), origin=grid.origin,
                  direction=grid.direction, interpolation="nearest", default_value=0.0)
    return np.rint(on.data).astype(np.uint16)


def _centroid(dv: DrrVolume, weights: np.ndarray) -> np.ndarray:
    kk, jj, ii = np.nonzero(weights > 0)
    w = weights[kk, jj, ii].astype(np.float64)
    ijk = np.array([np.average(ii, weights=w), np.average(jj, weights=w), np.average(kk, weights=w)])
    return dv.T_world_from_index[:3, :3] @ ijk + dv.T_world_from_index[:3, 3]


def _spine(ct: Volume, centres: dict[int, np.ndarray], default_height_mm: float) -> tuple[np.ndarray, float]:
    """Spine axis (unit, world) and vertebral height (mm): from the centres of adjacent
    labels when there are at least two, else the CT's slice axis and the default."""
    ids = sorted(k for k in centres if k >= 0)
    steps = [centres[b] - centres[a] for a, b in zip(ids, ids[1:]) if b == a + 1]
    if not steps:
        return ct.direction[:, 2] / np.linalg.norm(ct.direction[:, 2]), float(default_height_mm)
    points = np.array([centres[i] for i in ids])
    _, _, vt = np.linalg.svd(points - points.mean(axis=0))
    return vt[0], float(np.median([np.linalg.norm(s) for s in steps]))


def _continued(soft: Volume, length_mm: float, body_mu_per_mm: float) -> Volume:
    """The soft tissue (attenuation) continued by ``length_mm`` beyond each face of its grid
    that the body touches (``body_cut_faces``, any voxel): the face's voxels repeated
    outward. Beyond the first and last slice (array axis k) they go on unchanged, as a body
    does over a few centimetres; beyond an edge of the field of view (j, i) they fade as
    exp(-3 d / ``length_mm``) with the distance d beyond the face (to 5% at the end), as a
    body rounds off within centimetres there.

    A model that ends where the scan does has edges the X-ray does not show, and a single
    view's depth (its magnification) follows them (docs/benchmarks.md, session 14). How much
    tissue lies beyond a field-of-view edge is unknown: the fade makes the model's edge
    soft, not right. A fade beyond the slices drew a ramp across anteroposterior views that
    pulled the phantom's spine 40 mm off at an accepted similarity."""
    if length_mm <= 0:
        return soft
    cut = body_cut_faces(soft.data, body_mu_per_mm, min_share=0.0)
    widths = [(int(np.ceil(length_mm / spacing)) * low, int(np.ceil(length_mm / spacing)) * high)
              for (low, high), spacing in zip(cut, soft.spacing[::-1])]
    if not any(low or high for low, high in widths):
        return soft
    data = np.pad(soft.data, widths, mode="edge")
    for axis in (1, 2):  # the field of view's edges
        (low, high), spacing = widths[axis], soft.spacing[::-1][axis]
        index = np.arange(data.shape[axis], dtype=float)
        beyond_mm = np.maximum(np.maximum(low - index, index - (data.shape[axis] - 1 - high)), 0.0) * spacing
        shape = [1, 1, 1]
        shape[axis] = -1
        data *= np.exp(-3.0 * beyond_mm / length_mm).astype(np.float32).reshape(shape)
    (k0, _), (j0, _), (i0, _) = widths
    T = soft.T_world_from_index.copy()
    T[:3, 3] = soft.index_to_world(-np.array([i0, j0, k0], dtype=float))[0]
    return Volume(data=data, T_world_from_index=T, units=soft.units)


def prepare_ct(
    ct: Volume, labels: Volume | None = None, settings: PrepareSettings | None = None, *, key: str | None = None
) -> PreparedCT:
    """Build a prepared CT from a CT in HU and an optional label map on its grid
    (``key``: its ``cache_key`` when already computed)."""
    t0 = time.perf_counter()
    s = settings or PrepareSettings()
    if labels is not None and labels.data.shape != ct.data.shape:
        raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {ct.data.shape}")
    mu = hu_to_attenuation(ct, energy_kev=s.energy_kev)
    soft = soft_fine = None
    if s.bone_threshold_hu is not None:
        is_bone = ct.data >= s.bone_threshold_hu
        if not is_bone.any():
            raise PreparedCTError(f"no voxel of the CT reaches the bone threshold of {s.bone_threshold_hu} HU")
        if s.soft_tissue_spacing_mm is None:
            bone = np.where(is_bone, mu.data, 0.0)
        else:
            mu_threshold = float(attenuation_from_hu(s.bone_threshold_hu, energy_kev=s.energy_kev))
            bone = np.where(is_bone, np.maximum(mu.data - mu_threshold, 0.0), 0.0)
            soft_mu = mu.with_data(np.minimum(mu.data, mu_threshold).astype(np.float32))
            body_mu = float(attenuation_from_hu(BODY_HU, energy_kev=s.energy_kev))

            def soft_on(spacing_mm: float) -> DrrVolume:
                grid = _continued(downsample(soft_mu, spacing_mm), s.soft_continuation_mm, body_mu)
                return prepare_volume(grid, margin_mm=spacing_mm)

            soft = soft_on(s.soft_tissue_spacing_mm)
            if s.fine_soft_tissue_spacing_mm is not None:
                soft_fine = soft_on(s.fine_soft_tissue_spacing_mm)
        mu = mu.with_data(bone.astype(np.float32))
    if not (mu.data > 0).any():
        raise PreparedCTError("the CT has no attenuating voxel")
    base = prepare_volume(mu, margin_mm=3.0)
    volumes, spacings = [base], [float(base.volume.spacing.min())]
    base_mu = base.volume
    for spacing in sorted(s.pyramid_spacings_mm):
        if spacing > spacings[0] * 1.01:
            volumes.append(prepare_volume(downsample(base_mu, spacing), crop=False))
            spacings.append(float(spacing))
    label_maps = tuple(None if labels is None else _labels_on(labels, dv) for dv in volumes)
    centres = {-1: _centroid(base, base_mu.data)}
    if labels is not None:
        for label in np.unique(label_maps[0]):
            if label > 0:  # the label's bone; a label without bone (all below the threshold): its voxels
                inside = label_maps[0] == label
                bone = np.where(inside, base_mu.data, 0.0)
                centres[int(label)] = _centroid(base, bone if np.any(bone > 0) else inside.astype(np.float32))
    axis, height = _spine(ct, centres, s.vertebra_height_mm)
    return PreparedCT(volumes=tuple(volumes), spacings_mm=tuple(spacings), labels=label_maps, centres=centres,
                      spine_axis_world=axis, vertebra_height_mm=height, key=key or cache_key(ct, labels, s),
                      soft=soft, soft_fine=soft_fine, prepare_s=time.perf_counter() - t0)


def save_prepared(prepared: PreparedCT, path: str | Path) -> None:
    """Write a prepared CT as one ``.npz`` (written to a temporary name, then renamed)."""
    path = Path(path)
    header = {
        "format": PREPARED_FORMAT,
        "key": prepared.key,
        "spacings_mm": list(prepared.spacings_mm),
        "vertebra_height_mm": prepared.vertebra_height_mm,
        "volumes": [_volume_header(dv) for dv in prepared.volumes],
        "soft": None if prepared.soft is None else _volume_header(prepared.soft),
        "soft_fine": None if prepared.soft_fine is None else _volume_header(prepared.soft_fine),
        "has_labels": prepared.labels[0] is not None,
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
              "centre_ids": np.array(sorted(prepared.centres), dtype=np.int64),
              "centres": np.array([prepared.centres[k] for k in sorted(prepared.centres)]),
              "spine_axis_world": prepared.spine_axis_world}
    for n, dv in enumerate(prepared.volumes):
        arrays.update(_volume_arrays(dv, str(n)))
        if prepared.labels[n] is not None:
            arrays[f"labels_{n}"] = prepared.labels[n]
    for name in ("soft", "soft_fine"):
        if getattr(prepared, name) is not None:
            arrays.update(_volume_arrays(getattr(prepared, name), name))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_prepared(path: str | Path, key: str) -> PreparedCT:
    """Read a prepared CT written by ``save_prepared``; PreparedCTError when the file
    does not hold the prepared CT of ``key`` in this format."""
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(f["header"].tobytes().decode())
        if header.get("format") != PREPARED_FORMAT or header.get("key") != key:
            raise PreparedCTError(f"{path}: format {header.get('format')!r} or key does not match")
        volumes, labels = [], []
        for n, meta in enumerate(header["volumes"]):
            volumes.append(_read_volume(f, meta, str(n), path))
            labels.append(np.array(f[f"labels_{n}"]) if header["has_labels"] else None)
        soft, soft_fine = (None if header[name] is None else _read_volume(f, header[name], name, path)
                           for name in ("soft", "soft_fine"))
        centres = {int(k): np.array(c, dtype=np.float64) for k, c in zip(f["centre_ids"], f["centres"])}
        axis = np.array(f["spine_axis_world"], dtype=np.float64)
    return PreparedCT(volumes=tuple(volumes), spacings_mm=tuple(float(s) for s in header["spacings_mm"]),
                      labels=tuple(labels), centres=centres, spine_axis_world=axis,
                      vertebra_height_mm=float(header["vertebra_height_mm"]), key=key, soft=soft, soft_fine=soft_fine,
                      from_cache=True)


def _volume_header(dv: DrrVolume) -> dict:
    return {"mu_scale": dv.mu_scale, "size_ijk": list(dv.size_ijk), "step_mm": dv.step_mm,
            "brick_voxels": dv.brick_voxels}


def _volume_arrays(dv: DrrVolume, name: str) -> dict[str, np.ndarray]:
    return {f"codes_{name}": dv.codes, f"T_world_from_index_{name}": dv.T_world_from_index,
            f"occupancy_{name}": dv.occupancy, f"nonzero_box_ijk_{name}": dv.nonzero_box_ijk}


def _read_volume(f, meta: dict, name: str, path: Path) -> DrrVolume:
    """One rendering volume of a prepared-CT file (header entry ``meta``, arrays ``*_name``)."""
    T = np.array(f[f"T_world_from_index_{name}"], dtype=np.float64)
    codes = np.array(f[f"codes_{name}"])
    ni, nj, nk = meta["size_ijk"]
    if codes.shape != (nk + 1, nj + 1, ni + 1) or codes.dtype != np.uint16:
        raise PreparedCTError(f"{path}: volume {name} has shape {codes.shape}, not {(nk + 1, nj + 1, ni + 1)}")
    return DrrVolume(codes=codes, mu_scale=float(meta["mu_scale"]), size_ijk=(ni, nj, nk),
                     T_world_from_index=T, T_index_from_world=np.linalg.inv(T), step_mm=float(meta["step_mm"]),
                     occupancy=np.array(f[f"occupancy_{name}"]), nonzero_box_ijk=np.array(f[f"nonzero_box_ijk_{name}"]),
                     brick_voxels=int(meta["brick_voxels"]))


def load_or_prepare(
    ct: Volume,
    labels: Volume | None = None,
    settings: PrepareSettings | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> PreparedCT:
    """The prepared CT from ``cache_dir`` (default ``default_cache_dir()``) when a valid
    file is there, else built (and saved). An unreadable, stale or corrupt file is
    logged and rebuilt; a cache that cannot be written is logged and skipped."""
    t0 = time.perf_counter()
    s = settings or PrepareSettings()
    if not use_cache:
        return prepare_ct(ct, labels, s)
    key = cache_key(ct, labels, s)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"prepared_ct_{key}.npz"
    if path.exists():
        try:
            prepared = load_prepared(path, key)
            return _with_time(prepared, time.perf_counter() - t0)
        except Exception as exc:  # any failure to read the file means: rebuild it
            log.warning("prepared CT cache %s unusable (%s): rebuilding it", path, exc)
    prepared = prepare_ct(ct, labels, s, key=key)
    try:
        save_prepared(prepared, path)
    except OSError as exc:
        log.warning("cannot write the prepared CT cache %s: %s", path, exc)
    return _with_time(prepared, time.perf_counter() - t0)


def _with_time(prepared: PreparedCT, prepare_s: float) -> PreparedCT:
    return replace(prepared, prepare_s=prepare_s)
