"""DICOM X-ray images (XA, RF; single and multi-frame; classic and Enhanced XA/XRF) in:
pixels and the C-arm view from the tags. The one module that reads DICOM tags (pydicom).

Geometry (DICOM PS3.3 C.8.7.5, XA Positioner): the positioner angles are relative to the
*patient*, whatever the patient position: ``PositionerPrimaryAngle`` in the transverse
plane, 0 with the detector in front of the chest, +90 at the patient's left (LAO),
-90 at the right (RAO); ``PositionerSecondaryAngle`` in the sagittal plane, + towards
the head (cranial), - caudal. In a classic file they apply to the first frame; the
``...AngleIncrement`` tags give one value per frame (offsets from the first) or one
value (a constant change per frame). ``carm_angles_from_dicom`` converts them in one place.
``DistanceSourceToDetector`` is the focal length, ``DistanceSourceToPatient`` (Enhanced:
``DistanceSourceToIsocenter``) the source-to-isocentre distance, ``ImagerPixelSpacing``
(row spacing, column spacing) the detector pitch at the detector.

Enhanced XA/XRF files (PS3.3 A.53, A.54) keep each frame's tags in its item of the
Per-frame Functional Groups Sequence (X-Ray Positioner, X-Ray Geometry, Field of View,
Frame Pixel Data Properties, Frame Content macros; each a one-item sequence), the tags
common to all frames in the Shared Functional Groups Sequence: a tag is looked up in the
frame's item, then the shared item, then the top level (``_FrameTags``).

Principal point (where the isocentre projects, PS3.17 FFF.2.1.5): the image centre,
which is what the XA IOD assumes, unless ``PositionOfIsocenterProjection`` (0018,9430;
physical detector elements, row then column, from the centre of the top-left element)
states it; it is then placed in the stored image with ``FieldOfViewOrigin`` (0018,7030;
the stored image's top-left corner on the detector, detector elements, row then column),
``DetectorElementSpacing`` (0018,7022) against ``ImagerPixelSpacing`` (binning), then
``FieldOfViewRotation`` (clockwise) and ``FieldOfViewHorizontalFlip``. (Detector Active
Origin only places the active area, not the beam, so it is not needed.)

Frames are returned in the image convention of ``guidance.core.views.carm_view`` (rows
towards the patient's feet); where ``PatientOrientation`` (the patient directions of
the rows and columns) or, without it, a feet-first ``PatientPosition`` says the file's
pixels are oriented otherwise, they are flipped to that convention (and the principal
point with them). ``read_xray_dicom`` is the one DICOM pixel reader: ``read_xray`` of a
DICOM file goes through it too, so every DICOM read gives the same orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from guidance.core.errors import GuidanceError
from guidance.core.views import View, carm_view

__all__ = ["DicomError", "DicomTagMissing", "DicomXray", "DicomInstance", "carm_angles_from_dicom", "read_xray_dicom",
           "isocenter_projection_px", "is_dicom", "instance_of"]

XRAY_MODALITIES = ("XA", "RF")
ENHANCED_XRAY_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.12.1.1", "1.2.840.10008.5.1.4.1.1.12.2.1")
"""Enhanced XA and Enhanced XRF Image Storage."""
_LETTER_LPS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}


class DicomError(GuidanceError):
    """A DICOM file that cannot be read, or whose tags cannot give the X-ray geometry."""


class DicomTagMissing(DicomError):
    """A tag the X-ray geometry needs is absent (the message names it)."""


@dataclass(frozen=True)
class DicomXray:
    """The frames (N, H, W) of a DICOM X-ray and each frame's ``View`` (none when read
    without its geometry); ``frame_time_s``: seconds between frames (None when the file
    does not say)."""

    frames: np.ndarray
    views: list[View]
    modality: str
    frame_time_s: float | None = None

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class DicomInstance:
    """What a receiver files a DICOM instance under."""

    modality: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int | None


def carm_angles_from_dicom(primary_deg: float, secondary_deg: float) -> tuple[float, float]:
    """(lao_deg, cranial_deg) for ``carm_view(..., patient_position="supine")`` of DICOM
    positioner angles: DICOM defines them relative to the patient, which is what
    ``carm_view`` computes for a supine patient (room = patient LPS), so the values carry
    over unchanged (primary + LAO / - RAO, secondary + cranial / - caudal). A prone
    patient seen from below (``carm_view`` LAO a, prone) has DICOM primary angle a + 180."""
    return float(primary_deg), float(secondary_deg)


def is_dicom(path: str | Path) -> bool:
    """True for a file with the DICOM preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def instance_of(ds: pydicom.Dataset) -> DicomInstance:
    """The identifiers of a received dataset; raises DicomError naming a missing UID."""
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "")).strip():
            raise DicomError(f"DICOM instance without {keyword}")
    number = ds.get("SeriesNumber")
    return DicomInstance(modality=str(ds.get("Modality", "OT")) or "OT", study_uid=str(ds.get("StudyInstanceUID", "")),
                         series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
                         series_number=None if number in (None, "") else int(number))


class _FrameTags:
    """Where frame i's tags are: an Enhanced file's per-frame functional group item, then its
    shared item (each macro a one-item sequence inside them), then the top level, where a
    classic file keeps everything."""

    def __init__(self, ds: pydicom.Dataset, n_frames: int, path: Path) -> None:
        self.ds, self.path = ds, path
        self.enhanced = str(ds.get("SOPClassUID", "")) in ENHANCED_XRAY_SOP_CLASSES \
            or "PerFrameFunctionalGroupsSequence" in ds
        self._groups: list[list[pydicom.Dataset]] = [[] for _ in range(n_frames)]
        if self.enhanced:
            per_frame = ds.get("PerFrameFunctionalGroupsSequence")
            if not per_frame:
                raise DicomError(f"{path}: Enhanced X-ray file without PerFrameFunctionalGroupsSequence")
            if len(per_frame) != n_frames:
                raise DicomError(f"{path}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items for "
                                 f"{n_frames} frames")
            shared = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
            self._groups = [[item, *shared] for item in per_frame]

    def get(self, keyword: str, i: int) -> object | None:
        """The value of ``keyword`` for frame ``i`` (0-based), None when absent or empty."""
        for group in self._groups[i]:
            value = _in_group(group, keyword)
            if value is not None:
                return value
        value = self.ds.get(keyword)
        return None if value is None or value == "" else value

    def required(self, i: int, *keywords: str) -> object:
        """The first of ``keywords`` present for frame ``i``; DicomError naming them when none is."""
        for keyword in keywords:
            value = self.get(keyword, i)
            if value is not None:
                return value
        names = " (or ".join(keywords) + ")" * (len(keywords) - 1)
        where = f" for frame {i + 1} (per-frame or shared functional groups, or top level)" if self.enhanced else ""
        raise DicomTagMissing(f"{self.path}: cannot build the X-ray geometry: tag {names} is missing{where}")


def _in_group(group: pydicom.Dataset, keyword: str) -> object | None:
    """``keyword`` in a functional group item: directly, or in one of its macros' one-item sequences."""
    candidates = [group] + [e.value[0] for e in group if e.VR == "SQ" and len(e.value) > 0]
    for item in candidates:
        value = item.get(keyword)
        if value is not None and value != "":
            return value
    return None


def _number_pair(value: object, keyword: str, path: Path) -> tuple[float, float]:
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    if len(values) != 2:
        raise DicomError(f"{path}: {keyword} needs 2 values (row, column), got {values}")
    return float(values[0]), float(values[1])


def _per_frame(ds: pydicom.Dataset, start_deg: float, keyword: str, n: int, path: Path) -> np.ndarray:
    """Angles of the n frames of a classic file from the first-frame angle and its increment tag."""
    increment = ds.get(keyword)
    if increment is None or increment == "" or n == 1:
        return np.full(n, start_deg)
    values = np.atleast_1d(np.asarray(increment, dtype=float))
    if values.size == 1:
        return start_deg + values[0] * np.arange(n)
    if values.size != n:
        raise DicomError(f"{path}: {keyword} has {values.size} values for {n} frames (needs 1 or {n})")
    return start_deg + values


def _angles(tags: _FrameTags, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(primary, secondary) positioner angles (deg) of each frame."""
    if tags.enhanced:
        return (np.array([float(tags.required(i, "PositionerPrimaryAngle")) for i in range(n)]),
                np.array([float(tags.required(i, "PositionerSecondaryAngle")) for i in range(n)]))
    return (_per_frame(tags.ds, float(tags.required(0, "PositionerPrimaryAngle")), "PositionerPrimaryAngleIncrement",
                       n, tags.path),
            _per_frame(tags.ds, float(tags.required(0, "PositionerSecondaryAngle")),
                       "PositionerSecondaryAngleIncrement", n, tags.path))


def isocenter_projection_px(isocenter_rc: tuple[float, float], fov_origin_rc: tuple[float, float],
                            element_spacing_rc: tuple[float, float], pixel_spacing_rc: tuple[float, float],
                            image_size: tuple[int, int], rotation_deg: int = 0, horizontal_flip: bool = False
                            ) -> tuple[float, float]:
    """(u, v) in stored pixels (centre of the top-left pixel = (0, 0)) of the isocentre's
    projection ``isocenter_rc`` (detector elements from the centre of the top-left element,
    row then column), for a stored image of ``image_size`` (W, H) whose top-left corner lies
    at ``fov_origin_rc`` (detector elements from the detector's top-left corner) before it
    was rotated clockwise by ``rotation_deg`` (0, 90, 180, 270) and then, if
    ``horizontal_flip``, mirrored left-right. Stored pixels are ``pixel_spacing_rc`` mm
    (row, column after rotation), detector elements ``element_spacing_rc`` mm apart."""
    W, H = image_size
    quarter = rotation_deg in (90, 270)
    rows0, cols0 = (W, H) if quarter else (H, W)  # the stored grid before rotation
    spacing0 = pixel_spacing_rc[::-1] if quarter else pixel_spacing_rc
    r, c = ((isocenter_rc[k] + 0.5 - fov_origin_rc[k]) * element_spacing_rc[k] / spacing0[k] - 0.5 for k in (0, 1))
    if rotation_deg == 90:
        r, c = c, rows0 - 1 - r
    elif rotation_deg == 180:
        r, c = rows0 - 1 - r, cols0 - 1 - c
    elif rotation_deg == 270:
        r, c = cols0 - 1 - c, r
    if horizontal_flip:
        c = W - 1 - c
    return float(c), float(r)


def _principal_point(tags: _FrameTags, i: int, size: tuple[int, int], pixel_spacing_rc: tuple[float, float]
                     ) -> tuple[float, float]:
    """Frame i's principal point in the file's pixels (see the module docstring)."""
    W, H = size
    isocenter = tags.get("PositionOfIsocenterProjection", i)
    if isocenter is None:
        return (W - 1) / 2.0, (H - 1) / 2.0
    rotation = int(float(tags.get("FieldOfViewRotation", i) or 0))
    if rotation not in (0, 90, 180, 270):
        raise DicomError(f"{tags.path}: FieldOfViewRotation {rotation} is not one of 0, 90, 180, 270")
    flip = str(tags.get("FieldOfViewHorizontalFlip", i) or "NO").upper()
    if flip not in ("YES", "NO"):
        raise DicomError(f"{tags.path}: FieldOfViewHorizontalFlip {flip!r} is not YES or NO")
    p = tags.path
    return isocenter_projection_px(
        _number_pair(isocenter, "PositionOfIsocenterProjection", p),
        _number_pair(tags.required(i, "FieldOfViewOrigin"), "FieldOfViewOrigin", p),
        _number_pair(tags.required(i, "DetectorElementSpacing"), "DetectorElementSpacing", p),
        pixel_spacing_rc, (W, H), rotation, flip == "YES")


def _flips(orientation, position: str, R_world_from_cam: np.ndarray | None, path: Path,
           missing: DicomError | None) -> tuple[bool, bool]:
    """(flip columns, flip rows) that bring the file's pixels to the carm_view convention.
    ``R_world_from_cam``: the view's axes (None when the geometry could not be built,
    ``missing`` saying why): PatientOrientation can only be checked against them."""
    if orientation and len(orientation) == 2:
        if R_world_from_cam is None:
            raise DicomError(f"{path}: PatientOrientation {list(orientation)} cannot be related to the image "
                             f"without the C-arm geometry: {missing}")
        flips = []
        for axis, letters in zip((R_world_from_cam[:, 0], R_world_from_cam[:, 1]), orientation):
            try:
                direction = np.sum([_LETTER_LPS[c] for c in str(letters).upper()], axis=0)
            except KeyError:
                raise DicomError(f"{path}: PatientOrientation {list(orientation)} has a letter outside "
                                 f"{''.join(_LETTER_LPS)}") from None
            cosine = float(np.dot(axis, direction) / max(np.linalg.norm(direction), 1e-12))
            if abs(cosine) < 0.3:
                raise DicomError(f"{path}: PatientOrientation {list(orientation)} does not fit the positioner "
                                 f"angles (an image axis lies across the stated direction)")
            flips.append(cosine < 0)
        return flips[0], flips[1]
    if position.startswith("FF"):
        return True, True
    if not position.startswith("HF"):
        raise DicomError(f"{path}: PatientPosition {position} without PatientOrientation: the image "
                         "orientation is unknown (give PatientOrientation or a view file)")
    return False, False


def _intensity(relationship: object, bits_stored: int, I0: float | None) -> tuple[str, float | None]:
    if str(relationship or "").upper() == "LIN":
        return "raw", float(I0) if I0 is not None else float(2 ** bits_stored - 1)
    return "display", None


def _frame_time_s(tags: _FrameTags, n: int) -> float | None:
    """Seconds between frames: FrameTime (ms), else (Enhanced) the median step of the
    frames' FrameAcquisitionDateTime; None when the file says neither."""
    frame_time_ms = tags.ds.get("FrameTime")
    if frame_time_ms not in (None, ""):
        return float(frame_time_ms) / 1e3
    if not tags.enhanced or n < 2:
        return None
    stamps = [tags.get("FrameAcquisitionDateTime", i) for i in range(n)]
    if any(s is None for s in stamps):
        return None
    try:
        seconds = [pydicom.valuerep.DT(s).timestamp() for s in stamps]
    except (ValueError, TypeError, OverflowError) as exc:
        raise DicomError(f"{tags.path}: FrameAcquisitionDateTime is not a DICOM date-time: {exc}") from None
    return float(np.median(np.diff(seconds)))


def read_xray_dicom(path: str | Path, *, isocenter_world=(0.0, 0.0, 0.0), I0: float | None = None,
                    require_geometry: bool = True) -> DicomXray:
    """Frames and views of an XA or RF DICOM file (single or multi-frame, classic or Enhanced).

    ``isocenter_world``: where the C-arm's isocentre lies in the CT (LPS mm); DICOM X-ray
    images carry no frame of reference shared with the CT, so this is the initial guess
    that registration corrects (e.g. the CT centre). Intensity: ``PixelIntensityRelationship``
    LIN gives "raw" (unattenuated level ``I0``, default the full scale 2**BitsStored - 1),
    anything else "display". Raises DicomError naming the missing or inconsistent tag;
    with ``require_geometry`` False a file without its geometry tags gives no views (a
    view file must then say it), its frames oriented by PatientPosition alone.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise DicomError(f"cannot read DICOM file {path}: {exc}") from None
    modality = str(ds.get("Modality", ""))
    if modality not in XRAY_MODALITIES:
        raise DicomError(f"{path}: Modality {modality!r} is not an X-ray image ({', '.join(XRAY_MODALITIES)})")
    try:
        pixels = ds.pixel_array
    except (AttributeError, ValueError, RuntimeError) as exc:
        raise DicomError(f"{path}: cannot decode the pixel data: {exc}") from None
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = pixels.reshape(n, *pixels.shape[-2:]) if pixels.ndim in (2, 3) else None
    if frames is None or (pixels.ndim == 3 and pixels.shape[0] != n):
        raise DicomError(f"{path}: pixel data of shape {pixels.shape} is not {n} grey frames")
    tags = _FrameTags(ds, n, path)
    H, W = frames.shape[1:]
    try:
        views = _views(tags, n, (W, H), isocenter_world, I0)
        missing = None
    except DicomTagMissing as exc:
        if require_geometry:
            raise
        views, missing = [], exc
    position = str(ds.get("PatientPosition", "HFS") or "HFS").upper()
    out = []
    for i in range(n):
        R = views[i].T_cam_from_world[:3, :3].T if views else None
        flip_u, flip_v = _flips(tags.get("PatientOrientation", i), position, R, path, missing)
        out.append(np.ascontiguousarray(frames[i][::-1 if flip_v else 1, ::-1 if flip_u else 1]))
        if views and (flip_u or flip_v):  # the principal point moves with the pixels
            K = views[i].K.copy()
            K[0, 2] = W - 1 - K[0, 2] if flip_u else K[0, 2]
            K[1, 2] = H - 1 - K[1, 2] if flip_v else K[1, 2]
            views[i] = replace(views[i], K=K)
    return DicomXray(frames=np.stack(out), views=views, modality=modality, frame_time_s=_frame_time_s(tags, n))


def _views(tags: _FrameTags, n: int, size: tuple[int, int], isocenter_world, I0: float | None) -> list[View]:
    """Each frame's view for the file's pixels as stored (before orientation flips)."""
    primary, secondary = _angles(tags, n)
    intensity, level = _intensity(tags.get("PixelIntensityRelationship", 0), int(tags.ds.get("BitsStored", 16)), I0)
    views = []
    for i in range(n):
        sdd = float(tags.required(i, "DistanceSourceToDetector"))
        sid = float(tags.required(i, "DistanceSourceToPatient", "DistanceSourceToIsocenter"))
        dv, du = _number_pair(tags.required(i, "ImagerPixelSpacing"), "ImagerPixelSpacing", tags.path)
        lao, cranial = carm_angles_from_dicom(primary[i], secondary[i])
        principal_point = _principal_point(tags, i, size, (dv, du))
        try:
            views.append(carm_view(lao_deg=lao, cranial_deg=cranial, source_to_detector_mm=sdd,
                                   source_to_isocenter_mm=sid, detector_size_px=size, pixel_spacing_mm=(du, dv),
                                   isocenter_world=isocenter_world, patient_position="supine",
                                   principal_point_px=principal_point, intensity=intensity, I0=level))
        except GuidanceError as exc:
            raise DicomError(f"{tags.path}: no C-arm view from DistanceSourceToPatient {sid}, "
                             f"DistanceSourceToDetector {sdd}, ImagerPixelSpacing {[dv, du]}: {exc}") from None
    return views
