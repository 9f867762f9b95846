"""DICOM X-ray images (XA, RF; single and multi-frame) in: pixels and the C-arm view from
the tags. The one module that reads DICOM tags (pydicom).

Geometry (DICOM PS3.3 C.8.7.5, XA Positioner): the positioner angles are relative to the
*patient*, whatever the patient position: ``PositionerPrimaryAngle`` in the transverse
plane, 0 with the detector in front of the chest, +90 at the patient's left (LAO),
-90 at the right (RAO); ``PositionerSecondaryAngle`` in the sagittal plane, + towards
the head (cranial), - caudal. They apply to the first frame; the ``...AngleIncrement``
tags give one value per frame (offsets from the first) or one value (a constant change
per frame). ``carm_angles_from_dicom`` converts them in one place.
``DistanceSourceToDetector`` is the focal length, ``DistanceSourceToPatient`` the
source-to-isocentre distance, ``ImagerPixelSpacing`` (row spacing, column spacing) the
detector pitch at the detector; the principal point is the image centre (the XA IOD has
no tag for it: a calibration file overrides it).

Frames are returned in the image convention of ``guidance.core.views.carm_view`` (rows
towards the patient's feet); where ``PatientOrientation`` (the patient directions of
the rows and columns) or, without it, a feet-first ``PatientPosition`` says the file's
pixels are oriented otherwise, they are flipped to that convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from guidance.core.errors import GuidanceError
from guidance.core.views import View, carm_view

__all__ = ["DicomError", "DicomXray", "DicomInstance", "carm_angles_from_dicom", "read_xray_dicom",
           "is_dicom", "instance_of"]

XRAY_MODALITIES = ("XA", "RF")
_LETTER_LPS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}


class DicomError(GuidanceError):
    """A DICOM file that cannot be read, or whose tags cannot give the X-ray geometry."""


@dataclass(frozen=True)
class DicomXray:
    """The frames (N, H, W) of a DICOM X-ray and each frame's ``View``; ``frame_time_s``:
    seconds between frames (None when the file does not say)."""

    frames: np.ndarray
    views: list[View]
    modality: str
    frame_time_s: float | None = None

    def __len__(self) -> int:
        return len(self.views)


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


def _required(ds: pydicom.Dataset, keyword: str, path: Path) -> object:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomError(f"{path}: cannot build the X-ray geometry: tag {keyword} is missing")
    return value


def _per_frame(ds: pydicom.Dataset, start_deg: float, keyword: str, n: int, path: Path) -> np.ndarray:
    """Angles of the n frames from the first-frame angle and its increment tag."""
    increment = ds.get(keyword)
    if increment is None or increment == "" or n == 1:
        return np.full(n, start_deg)
    values = np.atleast_1d(np.asarray(increment, dtype=float))
    if values.size == 1:
        return start_deg + values[0] * np.arange(n)
    if values.size != n:
        raise DicomError(f"{path}: {keyword} has {values.size} values for {n} frames (needs 1 or {n})")
    return start_deg + values


def _flips(ds: pydicom.Dataset, view: View, path: Path) -> tuple[bool, bool]:
    """(flip columns, flip rows) that bring the file's pixels to the carm_view convention."""
    R_world_from_cam = view.T_cam_from_world[:3, :3].T
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) == 2:
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
    position = str(ds.get("PatientPosition", "HFS") or "HFS").upper()
    if position.startswith("FF"):
        return True, True
    if not position.startswith("HF"):
        raise DicomError(f"{path}: PatientPosition {position} without PatientOrientation: the image "
                         "orientation is unknown (give PatientOrientation or a view file)")
    return False, False


def _intensity(ds: pydicom.Dataset, I0: float | None) -> tuple[str, float | None]:
    relationship = str(ds.get("PixelIntensityRelationship", "") or "").upper()
    if relationship == "LIN":
        return "raw", float(I0) if I0 is not None else float(2 ** int(ds.get("BitsStored", 16)) - 1)
    return "display", None


def read_xray_dicom(path: str | Path, *, isocenter_world=(0.0, 0.0, 0.0), I0: float | None = None) -> DicomXray:
    """Frames and views of an XA or RF DICOM file (single or multi-frame).

    ``isocenter_world``: where the C-arm's isocentre lies in the CT (LPS mm); DICOM X-ray
    images carry no frame of reference shared with the CT, so this is the initial guess
    that registration corrects (e.g. the CT centre). Intensity: ``PixelIntensityRelationship``
    LIN gives "raw" (unattenuated level ``I0``, default the full scale 2**BitsStored - 1),
    anything else "display". Raises DicomError naming the missing or inconsistent tag.
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
    sdd = float(_required(ds, "DistanceSourceToDetector", path))
    sid = float(_required(ds, "DistanceSourceToPatient", path))
    spacing = _required(ds, "ImagerPixelSpacing", path)
    if len(spacing) != 2:
        raise DicomError(f"{path}: ImagerPixelSpacing needs 2 values (row, column spacing), got {list(spacing)}")
    dv, du = float(spacing[0]), float(spacing[1])
    primary = _per_frame(ds, float(_required(ds, "PositionerPrimaryAngle", path)),
                         "PositionerPrimaryAngleIncrement", n, path)
    secondary = _per_frame(ds, float(_required(ds, "PositionerSecondaryAngle", path)),
                           "PositionerSecondaryAngleIncrement", n, path)
    intensity, level = _intensity(ds, I0)
    H, W = frames.shape[1:]
    views, out = [], []
    for i in range(n):
        lao, cranial = carm_angles_from_dicom(primary[i], secondary[i])
        try:
            view = carm_view(lao_deg=lao, cranial_deg=cranial, source_to_detector_mm=sdd,
                             source_to_isocenter_mm=sid, detector_size_px=(W, H), pixel_spacing_mm=(du, dv),
                             isocenter_world=isocenter_world, patient_position="supine", intensity=intensity,
                             I0=level)
        except ValueError as exc:
            raise DicomError(f"{path}: DistanceSourceToPatient {sid} / DistanceSourceToDetector {sdd}: {exc}") \
                from None
        flip_u, flip_v = _flips(ds, view, path)
        frame = frames[i][::-1 if flip_v else 1, ::-1 if flip_u else 1]
        out.append(np.ascontiguousarray(frame))
        views.append(view)
    frame_time_ms = ds.get("FrameTime")
    return DicomXray(frames=np.stack(out), views=views, modality=modality,
                     frame_time_s=None if frame_time_ms in (None, "") else float(frame_time_ms) / 1e3)
