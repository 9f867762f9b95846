"""CT volumes: loading with SimpleITK, HU -> linear attenuation, crop and resample.

A ``Volume`` holds voxels as a float32 array indexed [k, j, i] (z-y-x, as SimpleITK
gives them) and the affine ``T_world_from_index`` that maps a continuous index
(i, j, k, 1) to LPS millimetres, including the direction cosines, so oblique
acquisitions keep their true geometry. Voxel centres sit at integer indices.

SimpleITK is imported by the functions that use it: it takes 0.1-0.3 s, and the live
processes import this module (for ``Volume``) before their first heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from guidance.core.errors import GuidanceError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "Volume",
    "VolumeError",
    "load_volume",
    "list_dicom_series",
    "volume_from_sitk",
    "volume_to_sitk",
    "save_volume",
    "hu_to_attenuation",
    "attenuation_from_hu",
    "attenuation_coefficients",
    "crop_to_mask",
    "crop_to_index_box",
    "covering_grid",
    "resample",
    "affine_from_geometry",
    "transform_volume",
    "label_centroid_world",
    "clinical_grid",
]


class VolumeError(GuidanceError):
    """A CT volume that cannot be loaded or has unusable geometry."""


def affine_from_geometry(origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``T_world_from_index`` from ITK origin (mm), spacing (mm) and 3x3 direction cosines."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    T[:3, 3] = np.asarray(origin, dtype=float)
    return T


@dataclass(frozen=True)
class Volume:
    """Voxels [k, j, i] and the continuous-index -> world (LPS mm) affine.

    ``units`` says what the voxels hold: "HU" for CT numbers, "mu_per_mm" for linear
    attenuation, "label" for integer label maps (stored as float32 or an int array).
    """

    data: np.ndarray
    T_world_from_index: np.ndarray
    units: str = "HU"

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise VolumeError(f"a volume must be 3D, got an array of shape {self.data.shape}")
        T = np.asarray(self.T_world_from_index, dtype=float)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise VolumeError("T_world_from_index must be a finite 4x4 matrix")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise VolumeError(f"voxel spacing must be positive, got {self.spacing.tolist()}")
        object.__setattr__(self, "T_world_from_index", T)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (i, j, k) in mm."""
        return np.linalg.norm(np.asarray(self.T_world_from_index)[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines (columns = index axes in world)."""
        return self.T_world_from_index[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of the centre of voxel (0, 0, 0)."""
        return self.T_world_from_index[:3, 3].copy()

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        k, j, i = self.data.shape
        return (i, j, k)

    @property
    def T_index_from_world(self) -> np.ndarray:
        return np.linalg.inv(self.T_world_from_index)

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """World points (N, 3) of continuous indices (N, 3) given as (i, j, k)."""
        p = np.asarray(ijk, dtype=float).reshape(-1, 3)
        return p @ self.T_world_from_index[:3, :3].T + self.T_world_from_index[:3, 3]

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (i, j, k) of world points (N, 3)."""
        p = np.asarray(points, dtype=float).reshape(-1, 3)
        T = self.T_index_from_world
        return p @ T[:3, :3].T + T[:3, 3]

    def center_world(self) -> np.ndarray:
        """World position of the geometric centre of the voxel grid."""
        return self.index_to_world((np.array(self.size_ijk) - 1) / 2.0)[0]

    def corners_world(self) -> np.ndarray:
        """The 8 corners (8, 3) of the voxel-centre box in world coordinates."""
        n = np.array(self.size_ijk) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
        return self.index_to_world(corners)

    def with_data(self, data: np.ndarray, units: str | None = None) -> "Volume":
        """The same grid holding other voxels."""
        if data.shape != self.data.shape:
            raise VolumeError(f"data shape {data.shape} does not match the grid {self.data.shape}")
        return replace(self, data=data, units=self.units if units is None else units)


def volume_from_sitk(image: sitk.Image, units: str = "HU") -> Volume:
    """Wrap a 3D SimpleITK image, keeping origin, spacing and direction."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise VolumeError(f"expected a 3D image, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError("expected a scalar image, got a multi-component (vector/RGB) image")
    size = image.GetSize()
    if min(size) < 2:
        raise VolumeError(f"image of size {size} is 2D (a single slice), not a CT volume")
    spacing = np.array(image.GetSpacing(), dtype=float)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise VolumeError(f"missing or zero voxel spacing {spacing.tolist()}")
    dtype = np.float32 if units != "label" else None
    data = sitk.GetArrayFromImage(image)
    if dtype is not None:
        data = data.astype(np.float32, copy=False)
    T = affine_from_geometry(image.GetOrigin(), spacing, image.GetDirection())
    return Volume(data=np.ascontiguousarray(data), T_world_from_index=T, units=units)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image with the volume's geometry (for SimpleITK filters and writing)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.data)
    image.SetSpacing(volume.spacing.tolist())
    image.SetOrigin(volume.origin.tolist())
    image.SetDirection(volume.direction.ravel().tolist())
    return image


def list_dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> sorted file names of every DICOM series in a folder."""
    import SimpleITK as sitk

    folder = str(folder)
    reader = sitk.ImageSeriesReader()
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in reader.GetGDCMSeriesIDs(folder)}


def load_volume(path: str | Path, *, series_uid: str | None = None, units: str = "HU") -> Volume:
    """Load a CT (NIfTI, MetaImage, NRRD, ... or a DICOM series folder) in world LPS mm.

    A folder holding several DICOM series needs ``series_uid``; the error lists them.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise VolumeError(f"CT path does not exist: {path}")
    if path.is_dir():
        series = list_dicom_series(path)
        if not series:
            raise VolumeError(f"no DICOM series found in folder {path}")
        if series_uid is None:
            if len(series) > 1:
                listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
                raise VolumeError(
                    f"folder {path} holds {len(series)} DICOM series, select one by "
                    f"SeriesInstanceUID: {listing}"
                )
            series_uid = next(iter(series))
        if series_uid not in series:
            raise VolumeError(f"series {series_uid} not in {path}; available: {', '.join(series)}")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(series[series_uid])
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise VolumeError(f"cannot read DICOM series {series_uid} in {path}: {exc}") from None
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1]
            if "spacing" in str(exc).lower():
                raise VolumeError(f"{path}: missing or zero voxel spacing ({detail})") from None
            raise VolumeError(f"cannot read image {path}: {detail}") from None
    if image.GetDimension() == 2:
        raise VolumeError(f"{path} is a 2D image, not a CT volume")
    if image.GetDimension() == 3 and min(image.GetSize()) < 2:
        raise VolumeError(f"{path} is a single-slice (2D) image of size {image.GetSize()}, not a CT volume")
    if image.GetDimension() != 3:
        raise VolumeError(f"{path} is a {image.GetDimension()}D image; expected a 3D CT")
    try:
        return volume_from_sitk(image, units=units)
    except VolumeError as exc:
        raise VolumeError(f"{path}: {exc}") from None


def label_centroid_world(labels: Volume, label: int | None = None) -> np.ndarray:
    """Centroid (world LPS mm) of the voxels of ``label`` in a label map, or of every
    labelled voxel (> 0) when ``label`` is None; VolumeError when there are none."""
    mask = labels.data > 0 if label is None else labels.data == label
    kk, jj, ii = np.nonzero(mask)
    if len(ii) == 0:
        raise VolumeError("the label map has no labelled voxels" if label is None
                          else f"the label map has no voxels of label {label}")
    return labels.index_to_world(np.array([[ii.mean(), jj.mean(), kk.mean()]]))[0]


def save_volume(volume: Volume, path: str | Path) -> None:
    """Write a volume with SimpleITK (format from the extension)."""
    import SimpleITK as sitk

    image = volume_to_sitk(volume)
    if volume.units == "label":
        image = sitk.Cast(image, sitk.sitkUInt8 if volume.data.max() < 256 else sitk.sitkUInt16)
    sitk.WriteImage(image, str(path), useCompression=True)


# Linear attenuation (1/mm) of water and of ICRU cortical bone (1.92 g/cm3) at a few
# effective energies, from the NIST XCOM mass attenuation tables.
_ENERGIES_KEV = np.array([40.0, 50.0, 60.0, 70.0, 80.0, 100.0])
_MU_WATER = np.array([0.02683, 0.02269, 0.02059, 0.01929, 0.01837, 0.01707])
_MU_BONE = np.array([1.281, 0.8145, 0.6044, 0.4870, 0.4282, 0.3566]) / 10.0
_HU_CORTICAL_BONE = 1900.0


def attenuation_coefficients(energy_kev: float) -> tuple[float, float]:
    """(mu_water, mu_cortical_bone) in 1/mm at an effective energy (keV), interpolated."""
    if not _ENERGIES_KEV[0] <= energy_kev <= _ENERGIES_KEV[-1]:
        raise VolumeError(f"effective energy must be in [{_ENERGIES_KEV[0]}, {_ENERGIES_KEV[-1]}] keV")
    return (
        float(np.interp(energy_kev, _ENERGIES_KEV, _MU_WATER)),
        float(np.interp(energy_kev, _ENERGIES_KEV, _MU_BONE)),
    )


def attenuation_from_hu(hu: np.ndarray | float, *, energy_kev: float = 60.0) -> np.ndarray:
    """Linear attenuation (1/mm) of CT numbers at an effective energy: float32 for
    integer or float32 input (a clinical CT has tens of millions of voxels), else float64.

    Bilinear model: air (-1000 HU) to water (0 HU) follows mu_water (1 + HU/1000);
    above water the slope is set so that cortical bone (1900 HU) gets the bone
    attenuation at that energy, because bone attenuates relatively more than water at
    diagnostic energies (photo-electric effect of calcium). A fluoroscopy beam at
    70-80 kVp has an effective energy near 60 keV. Values below -1000 HU map to 0.
    """
    mu_w, mu_b = attenuation_coefficients(energy_kev)
    hu = np.asarray(hu)
    real = np.dtype(np.result_type(hu.dtype, np.float32)).type
    # mu_w + slope_below_water * min(HU, 0) + slope_above_water * max(HU, 0), in place:
    # a third of the time of a select, and no float64 temporaries.
    mu = np.asarray(np.maximum(hu, real(0.0)), dtype=real) * real((mu_b - mu_w) / _HU_CORTICAL_BONE)
    mu += np.minimum(hu, real(0.0)) * real(mu_w / 1000.0)
    mu += real(mu_w)
    return np.maximum(mu, real(0.0))


def hu_to_attenuation(volume: Volume, *, energy_kev: float = 60.0) -> Volume:
    """The volume in linear attenuation (1/mm, ``attenuation_from_hu``) at an effective energy."""
    if volume.units != "HU":
        raise VolumeError(f"hu_to_attenuation needs a volume in HU, got units {volume.units!r}")
    mu = attenuation_from_hu(volume.data, energy_kev=energy_kev)
    return volume.with_data(mu.astype(np.float32), units="mu_per_mm")


def crop_to_index_box(volume: Volume, lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> Volume:
    """Sub-volume of voxels lo..hi (inclusive, i-j-k indices), clipped to the grid."""
    size = np.array(volume.size_ijk)
    lo = np.clip(np.floor(lo_ijk).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(hi_ijk).astype(int), 0, size - 1)
    if np.any(hi < lo):
        raise VolumeError("the crop box does not intersect the volume")
    data = volume.data[lo[2]: hi[2] + 1, lo[1]: hi[1] + 1, lo[0]: hi[0] + 1]
    T = volume.T_world_from_index.copy()
    T[:3, 3] = volume.index_to_world(lo)[0]
    return Volume(data=np.ascontiguousarray(data), T_world_from_index=T, units=volume.units)


def crop_to_mask(volume: Volume, mask: np.ndarray, margin_mm: float = 10.0) -> Volume:
    """Crop to the bounding box of a boolean mask on the same grid, plus a margin (mm)."""
    if mask.shape != volume.data.shape:
        raise VolumeError(f"mask shape {mask.shape} does not match the volume {volume.data.shape}")
    kk, jj, ii = np.nonzero(mask)
    if len(ii) == 0:
        raise VolumeError("the crop mask is empty (label not present?)")
    margin = margin_mm / volume.spacing
    lo = np.array([ii.min(), jj.min(), kk.min()]) - margin
    hi = np.array([ii.max(), jj.max(), kk.max()]) + margin
    return crop_to_index_box(volume, lo, hi)


def covering_grid(volume: Volume, spacing: np.ndarray, direction: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Size (i, j, k) and origin (world mm) of the grid of ``spacing`` and ``direction``
    that fits in ``volume``'s voxel-centre box, centred on it."""
    corners = volume.corners_world() @ direction
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    size = tuple(int(np.floor((hi[a] - lo[a]) / spacing[a] + 1e-6)) + 1 for a in range(3))
    extent = (np.array(size) - 1) * spacing
    return size, direction @ ((lo + hi) / 2.0 - extent / 2.0)


def resample(
    volume: Volume,
    *,
    spacing: tuple[float, float, float] | None = None,
    size: tuple[int, int, int] | None = None,
    direction: np.ndarray | None = None,
    origin: np.ndarray | None = None,
    interpolation: str = "linear",
    default_value: float | None = None,
) -> Volume:
    """Resample onto another grid (SimpleITK). Missing size/origin keep the same physical box.

    ``interpolation`` is "linear", "nearest" (labels) or "bspline".
    """
    import SimpleITK as sitk

    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    if interpolation not in interpolators:
        raise VolumeError(f"interpolation must be one of {', '.join(interpolators)}; got {interpolation!r}")
    new_dir = volume.direction if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    new_spacing = volume.spacing if spacing is None else np.asarray(spacing, dtype=float)
    if size is None or origin is None:
        box_size, box_origin = covering_grid(volume, new_spacing, new_dir)
        size = box_size if size is None else size
        origin = box_origin if origin is None else origin
    if default_value is None:
        default_value = -1000.0 if volume.units == "HU" else 0.0
    image = volume_to_sitk(volume)
    out = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        interpolators[interpolation],
        [float(x) for x in origin],
        [float(x) for x in new_spacing],
        new_dir.ravel().tolist(),
        float(default_value),
        image.GetPixelID(),
    )
    data = sitk.GetArrayFromImage(out)
    if volume.units != "label":
        data = data.astype(np.float32, copy=False)
    T = affine_from_geometry(out.GetOrigin(), out.GetSpacing(), out.GetDirection())
    return Volume(data=np.ascontiguousarray(data), T_world_from_index=T, units=volume.units)


def transform_volume(volume: Volume, T_new_from_old: np.ndarray, *, default_value: float | None = None,
                     interpolation: str = "linear") -> Volume:
    """The volume's content moved by a rigid motion (world mm), on the same grid:
    the value at world point y is the old value at ``inv(T_new_from_old) @ y``."""
    import SimpleITK as sitk

    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in interpolators:
        raise VolumeError(f"interpolation must be one of {', '.join(interpolators)}; got {interpolation!r}")
    T_old_from_new = np.linalg.inv(np.asarray(T_new_from_old, dtype=float))
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(T_old_from_new[:3, :3].ravel().tolist())
    tx.SetTranslation(T_old_from_new[:3, 3].tolist())
    if default_value is None:
        default_value = -1000.0 if volume.units == "HU" else 0.0
    image = volume_to_sitk(volume)
    moved = sitk.GetArrayFromImage(sitk.Resample(image, image, tx, interpolators[interpolation], default_value))
    return volume.with_data(moved.astype(volume.data.dtype, copy=False))


BODY_HU = -500.0
"""CT numbers above this are the patient's body (tissue, not the air around it)."""


def body_cut_faces(data: np.ndarray, body_value: float, *, min_share: float = 0.05) -> tuple[tuple[bool, bool], ...]:
    """Per array axis (k, j, i), whether its first and last layer cut through the body: more
    than ``min_share`` of the layer above ``body_value`` (``BODY_HU``, or its attenuation).
    The patient goes on beyond such a face of the scanned box."""
    return tuple(tuple(bool(np.mean(np.take(data, end, axis=axis) > body_value) > min_share) for end in (0, -1))
                 for axis in range(data.ndim))


CLINICAL_SPACING_MM = (0.7, 0.7, 2.5)
CLINICAL_SIZE = (512, 512, 133)


def clinical_grid(volume: Volume, *, interpolation: str = "linear") -> Volume:
    """The volume resampled onto a typical clinical CT grid: 512 x 512 x 133 voxels of
    0.7 x 0.7 x 2.5 mm, centred on the volume (air, or label 0, where it has no data);
    ``interpolation`` "nearest" for label maps."""
    spacing = np.array(CLINICAL_SPACING_MM)
    size = np.array(CLINICAL_SIZE)
    origin = volume.center_world() - volume.direction @ ((size - 1) / 2.0 * spacing)
    return resample(volume, spacing=tuple(spacing), size=tuple(int(s) for s in size), origin=origin,
                    direction=volume.direction, interpolation=interpolation)
