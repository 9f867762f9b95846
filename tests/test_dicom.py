"""DICOM X-ray in: files built here with pydicom from simulated images; the views read
back from their tags are checked against the simulator's ground truth."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, XRayRadiofluoroscopicImageStorage
from pydicom.uid import generate_uid

import run_guidance
from guidance.core.dicom import DicomError, DicomTagMissing, isocenter_projection_px, read_xray_dicom
from guidance.core.images import read_xray
from guidance.core.geometry import make_rigid, transform_points
from guidance.core.views import carm_view
from sim.phantom import make_phantom, write_phantom
from sim.xray import XrayParams, simulate_xray

SOP_CLASS = {"XA": XRayAngiographicImageStorage, "RF": XRayRadiofluoroscopicImageStorage}


def dicom_primary_angle(lao_deg: float, patient_position: str) -> float:
    """The DICOM (patient-relative) primary angle of the simulator's C-arm LAO angle: the
    detector of a prone patient seen from below is behind the patient (180 degrees off)."""
    angle = lao_deg + (180.0 if patient_position == "prone" else 0.0)
    return (angle + 180.0) % 360.0 - 180.0


def _new_dataset(path, sop_class_uid: str, modality: str) -> FileDataset:
    """An empty DICOM file dataset of one SOP class, with new instance, study and series UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    return ds


def write_xray_dicom(path, frames, *, primary, secondary, sdd=1000.0, sid=600.0, spacing_rc=(0.6, 0.6),
                     modality="XA", patient_position="HFP", orientation=None, lin=False, increments="vector",
                     frame_time_ms=None, extra=None):
    """An XA/RF file with pydicom: frames (N, H, W) uint8/uint16, first-frame angles and
    per-frame increments (a vector of offsets, or one constant step); ``extra``: more
    top-level tags by keyword."""
    frames = np.asarray(frames)
    ds = _new_dataset(path, SOP_CLASS[modality], modality)
    ds.PatientPosition = patient_position
    if orientation is not None:
        ds.PatientOrientation = orientation
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    bits = frames.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelIntensityRelationship = "LIN" if lin else "DISP"
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = sdd, sid
    ds.ImagerPixelSpacing = list(spacing_rc)
    primary, secondary = np.atleast_1d(primary).astype(float), np.atleast_1d(secondary).astype(float)
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = primary[0], secondary[0]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
        if increments == "vector":
            ds.PositionerPrimaryAngleIncrement = list(primary - primary[0])
            ds.PositionerSecondaryAngleIncrement = list(secondary - secondary[0])
        else:
            ds.PositionerPrimaryAngleIncrement = primary[1] - primary[0]
            ds.PositionerSecondaryAngleIncrement = secondary[1] - secondary[0]
        if frame_time_ms is not None:
            ds.FrameTime = frame_time_ms
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=3.0)


def sim_view(phantom, lao, cranial, position="prone", size=(64, 48), pitch=(0.9, 0.7), principal_point=None):
    """The simulator's ground-truth view: 64 x 48 pixels of 0.9 (columns) x 0.7 (rows) mm."""
    return carm_view(lao_deg=lao, cranial_deg=cranial, source_to_detector_mm=1000.0, source_to_isocenter_mm=600.0,
                     detector_size_px=size, pixel_spacing_mm=pitch, isocenter_world=phantom.ct.center_world(),
                     patient_position=position, principal_point_px=principal_point, intensity="display")


def assert_same_view(view, truth):
    assert view.image_size == truth.image_size
    assert_allclose(view.K, truth.K, atol=1e-9)
    assert_allclose(view.T_cam_from_world, truth.T_cam_from_world, atol=1e-9)


def test_single_frame_xa_gives_the_simulators_view_and_pixels(tmp_path, phantom):
    truth = sim_view(phantom, 25.0, -12.0)
    image, _ = simulate_xray(phantom.ct, truth, XrayParams(seed=1), intensity="display")
    path = write_xray_dicom(tmp_path / "shot.dcm", image[None], primary=dicom_primary_angle(25.0, "prone"),
                            secondary=-12.0, spacing_rc=(0.7, 0.9))
    shot = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
    assert len(shot) == 1 and shot.modality == "XA"
    assert_same_view(shot.views[0], truth)
    assert shot.views[0].intensity == "display"
    assert_allclose(shot.frames[0], image)


@pytest.mark.parametrize("increments", ["vector", "constant"])
def test_multi_frame_rf_cine_has_per_frame_angles(tmp_path, phantom, increments):
    laos, cranials = [-30.0, -25.0, -20.0], [5.0, 7.5, 10.0]
    truths = [sim_view(phantom, a, b, size=(32, 24)) for a, b in zip(laos, cranials)]
    frames = np.stack([simulate_xray(phantom.ct, t, XrayParams(seed=i), intensity="display")[0]
                       for i, t in enumerate(truths)])
    path = write_xray_dicom(tmp_path / "cine.dcm", frames, modality="RF", increments=increments,
                            primary=[dicom_primary_angle(a, "prone") for a in laos], secondary=cranials,
                            spacing_rc=(0.7, 0.9), frame_time_ms=66.7)
    cine = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
    assert len(cine) == 3 and cine.frame_time_s == pytest.approx(0.0667)
    for view, truth in zip(cine.views, truths):
        assert_same_view(view, truth)
    assert_allclose(cine.frames, frames)


def test_supine_patient_and_orientation_flips(tmp_path, phantom):
    truth = sim_view(phantom, 0.0, 0.0, position="supine")
    image = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    # AP of a supine patient: image columns run to the patient's right, rows to the feet.
    plain = write_xray_dicom(tmp_path / "a.dcm", image[None], primary=0.0, secondary=0.0, patient_position="HFS",
                             spacing_rc=(0.7, 0.9))
    mirrored = write_xray_dicom(tmp_path / "b.dcm", image[None, :, ::-1], primary=0.0, secondary=0.0,
                                orientation=["L", "F"], spacing_rc=(0.7, 0.9))
    feet_first = write_xray_dicom(tmp_path / "c.dcm", image[None, ::-1, ::-1], primary=0.0, secondary=0.0,
                                  patient_position="FFS", spacing_rc=(0.7, 0.9))
    for path in (plain, mirrored, feet_first):
        shot = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
        assert_same_view(shot.views[0], truth)
        assert_allclose(shot.frames[0], image)


def test_linear_pixels_are_raw_with_the_full_scale_or_given_i0(tmp_path, phantom):
    image = np.full((1, 8, 8), 1000, np.uint16)
    path = write_xray_dicom(tmp_path / "raw.dcm", image, primary=0.0, secondary=0.0, lin=True)
    assert read_xray_dicom(path).views[0].I0 == 65535.0
    assert read_xray_dicom(path, I0=4095.0).views[0].intensity == "raw"


@pytest.mark.parametrize("keyword", ["DistanceSourceToDetector", "DistanceSourceToPatient", "ImagerPixelSpacing",
                                     "PositionerPrimaryAngle", "PositionerSecondaryAngle"])
def test_a_missing_geometry_tag_is_named(tmp_path, keyword):
    path = write_xray_dicom(tmp_path / "x.dcm", np.zeros((1, 8, 8), np.uint8), primary=0.0, secondary=0.0)
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path)
    with pytest.raises(DicomError, match=keyword):
        read_xray_dicom(path)


def test_inconsistent_tags_are_refused(tmp_path):
    frames = np.zeros((3, 8, 8), np.uint8)
    path = write_xray_dicom(tmp_path / "x.dcm", frames, primary=[0.0, 1.0, 2.0], secondary=[0.0, 0.0, 0.0])
    ds = pydicom.dcmread(path)
    ds.PositionerPrimaryAngleIncrement = [0.0, 1.0]
    ds.save_as(path)
    with pytest.raises(DicomError, match="PositionerPrimaryAngleIncrement has 2 values for 3 frames"):
        read_xray_dicom(path)
    ds.Modality = "CT"
    ds.save_as(path)
    with pytest.raises(DicomError, match="not an X-ray"):
        read_xray_dicom(path)
    (tmp_path / "not.dcm").write_bytes(b"hello")
    with pytest.raises(DicomError, match="cannot read DICOM"):
        read_xray_dicom(tmp_path / "not.dcm")


def test_register_cli_takes_a_dicom_shot_without_a_view_file(tmp_path, phantom):
    paths = write_phantom(phantom, tmp_path / "phantom")
    nominal = carm_view(source_to_detector_mm=1000.0, source_to_isocenter_mm=600.0, detector_size_px=(128, 128),
                        pixel_spacing_mm=(2.4, 2.4), isocenter_world=phantom.ct.center_world(),
                        patient_position="prone", intensity="display")
    centre = phantom.ct.center_world()
    c, s = np.cos(np.radians(2.0)), np.sin(np.radians(2.0))
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    M = make_rigid(R, centre + np.array([3.0, -2.0, 2.0]) - R @ centre)  # anatomy misplaced by ~4 mm
    actual = nominal.with_pose(nominal.T_cam_from_world @ M)
    image, _ = simulate_xray(phantom.ct, actual, XrayParams(seed=3), intensity="display")
    shot = write_xray_dicom(tmp_path / "shot.dcm", image[None], primary=180.0, secondary=0.0,
                            spacing_rc=(2.4, 2.4))
    out = tmp_path / "result.json"
    rc = run_guidance.main(["register", "--ct", str(paths["ct"]), "--labels", str(paths["labels"]),
                            "--image", str(shot), "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result
    T_est = np.array(result["views"][0]["T_cam_from_world"])
    error = transform_points(T_est, centre) - transform_points(actual.T_cam_from_world, centre)  # camera axes
    assert np.linalg.norm(error[:2]) < 0.5
    # One 128 px view of the 3 mm phantom hardly sees depth: the error lies within what the
    # result says (seeds 3-8 measured 0.2-2.4 mm at a reported 1.9-2.1 mm, 1 sigma).
    assert result["uncertainty_depth_mm"] < 3.0
    assert abs(error[2]) < 2.0 * result["uncertainty_depth_mm"]
    assert np.linalg.norm(transform_points(nominal.T_cam_from_world, centre)
                          - transform_points(actual.T_cam_from_world, centre)) > 3.0


def test_sim_replays_a_dicom_cine_as_live_frames(tmp_path, phantom):
    import signal

    from guidance.live.transport import Subscriber, free_tcp_endpoint
    from guidance.live.wire import Frame

    laos = [10.0, 12.0, 14.0]
    truths = [sim_view(phantom, a, 0.0, size=(32, 24)) for a in laos]
    frames = np.stack([simulate_xray(phantom.ct, t, XrayParams(seed=i), intensity="display")[0]
                       for i, t in enumerate(truths)])
    path = write_xray_dicom(tmp_path / "cine.dcm", frames, modality="RF", spacing_rc=(0.7, 0.9),
                            primary=[dicom_primary_angle(a, "prone") for a in laos], secondary=[0.0] * 3)
    endpoint = free_tcp_endpoint()
    sub = Subscriber([endpoint], topics=("frame",))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = run_guidance.main(["sim", "--dicom", str(path), "--frames", endpoint, "--fps", "30", "--startup", "0.5",
                                "--isocenter", *(str(x) for x in phantom.ct.center_world()), "--plain"])
        received = []
        while (msg := sub.recv(1.0)) is not None:
            received.append(msg)
    finally:
        sub.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert rc == 0
    assert [m.frame_id for m in received] == [0, 1, 2] and all(isinstance(m, Frame) for m in received)
    for msg, truth, pixels in zip(received, truths, frames):
        assert_same_view(msg.view, truth)
        assert_allclose(msg.pixels, pixels)


# --------------------------------------------------------------- detector origin (principal point)


def isocenter_tags(principal_point, fov_origin_rc, element_spacing_rc, pixel_spacing_rc):
    """The detector tags that put the isocentre's projection at ``principal_point`` (u, v) of
    an unrotated stored image: the inverse of the reading, written out from the definitions
    (stored pixel r spans detector elements O + b r .. O + b (r + 1), b = binning)."""
    u0, v0 = principal_point
    binning = np.divide(pixel_spacing_rc, element_spacing_rc)
    isocenter = np.asarray(fov_origin_rc) + binning * (np.array([v0, u0]) + 0.5) - 0.5
    return {"PositionOfIsocenterProjection": [float(x) for x in isocenter], "FieldOfViewOrigin": list(fov_origin_rc),
            "DetectorElementSpacing": list(element_spacing_rc)}


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", [False, True])
def test_isocenter_projection_follows_binning_origin_rotation_and_flip(rotation, flip):
    """Reference: an indicator image on the stored grid before rotation, turned by np.rot90
    and np.fliplr; its bright pixel is where the isocentre must land."""
    origin, element, binning = (4.0, 6.0), (0.2, 0.25), (2, 3)
    r0, c0 = 2, 5  # the stored pixel (before rotation) whose centre the isocentre hits
    isocenter = tuple(origin[k] + binning[k] * ((r0, c0)[k] + 0.5) - 0.5 for k in (0, 1))
    indicator = np.zeros((6, 8))
    indicator[r0, c0] = 1.0
    stored = np.rot90(indicator, k=-rotation // 90)
    stored = np.fliplr(stored) if flip else stored
    v, u = np.unravel_index(np.argmax(stored), stored.shape)
    spacing0 = (element[0] * binning[0], element[1] * binning[1])
    spacing = spacing0[::-1] if rotation in (90, 270) else spacing0
    got = isocenter_projection_px(isocenter, origin, element, spacing, stored.shape[::-1], rotation, flip)
    assert_allclose(got, (u, v), atol=1e-9)


def test_isocenter_projection_tags_give_the_simulators_shifted_principal_point(tmp_path, phantom):
    truth = sim_view(phantom, 25.0, -12.0, principal_point=(40.0, 19.0))
    image, _ = simulate_xray(phantom.ct, truth, XrayParams(seed=1), intensity="display")
    tags = isocenter_tags((40.0, 19.0), (10.0, 30.0), (0.35, 0.45), (0.7, 0.9))
    path = write_xray_dicom(tmp_path / "shot.dcm", image[None], primary=dicom_primary_angle(25.0, "prone"),
                            secondary=-12.0, spacing_rc=(0.7, 0.9), extra=tags)
    shot = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
    assert_same_view(shot.views[0], truth)
    assert_allclose(shot.frames[0], image)
    centred = read_xray_dicom(write_xray_dicom(tmp_path / "centred.dcm", image[None], primary=25.0, secondary=-12.0,
                                               spacing_rc=(0.7, 0.9)))
    assert_allclose(centred.views[0].K[:2, 2], [31.5, 23.5])


def test_the_principal_point_moves_with_the_orientation_flips(tmp_path, phantom):
    """A mirrored file (columns to the patient's left): the isocentre stated in the file's
    pixels lands, after the flip to the carm_view convention, on the simulator's point."""
    truth = sim_view(phantom, 0.0, 0.0, position="supine", principal_point=(20.0, 30.0))
    image = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    in_file = (63.0 - 20.0, 30.0)  # the same point in the mirrored file's pixels
    path = write_xray_dicom(tmp_path / "b.dcm", image[None, :, ::-1], primary=0.0, secondary=0.0,
                            orientation=["L", "F"], spacing_rc=(0.7, 0.9),
                            extra=isocenter_tags(in_file, (0.0, 0.0), (0.7, 0.9), (0.7, 0.9)))
    shot = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
    assert_same_view(shot.views[0], truth)
    assert_allclose(shot.frames[0], image)


def test_isocenter_projection_without_its_companion_tags_is_named(tmp_path):
    tags = isocenter_tags((3.0, 4.0), (0.0, 0.0), (0.6, 0.6), (0.6, 0.6))
    for keyword in ("FieldOfViewOrigin", "DetectorElementSpacing"):
        path = write_xray_dicom(tmp_path / "x.dcm", np.zeros((1, 8, 8), np.uint8), primary=0.0, secondary=0.0,
                                extra={k: v for k, v in tags.items() if k != keyword})
        with pytest.raises(DicomTagMissing, match=f"tag {keyword} is missing"):
            read_xray_dicom(path)


# ------------------------------------------------------------------------- Enhanced XA / XRF

ENHANCED_SOP_CLASS = {"XA": "1.2.840.10008.5.1.4.1.1.12.1.1", "RF": "1.2.840.10008.5.1.4.1.1.12.2.1"}


def one_item(**keywords):
    """A one-item sequence value (a functional group macro)."""
    item = pydicom.Dataset()
    for keyword, value in keywords.items():
        setattr(item, keyword, value)
    return [item]


def write_enhanced_xray_dicom(path, frames, *, primary, secondary, fov_origins, isocenter_rc, element_rc,
                              spacing_rc=(0.7, 0.9), sdd=1000.0, sid=600.0, modality="XA", frame_step_s=0.1):
    """An Enhanced XA/XRF file: per frame (Per-frame Functional Groups) the positioner angles,
    the field-of-view origin and the acquisition time; shared (Shared Functional Groups)
    the source distances and the imager pixel spacing; the detector at the top level."""
    frames = np.asarray(frames)
    ds = _new_dataset(path, ENHANCED_SOP_CLASS[modality], modality)
    ds.PatientPosition = "HFP"
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(frames), frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelIntensityRelationship = "DISP"
    ds.PositionOfIsocenterProjection, ds.DetectorElementSpacing = list(isocenter_rc), list(element_rc)
    shared = pydicom.Dataset()
    shared.XRayGeometrySequence = one_item(DistanceSourceToIsocenter=sid, DistanceSourceToDetector=sdd)
    shared.FramePixelDataPropertiesSequence = one_item(ImagerPixelSpacing=list(spacing_rc))
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i, (a, b, origin) in enumerate(zip(primary, secondary, fov_origins)):
        group = pydicom.Dataset()
        stamp = f"20260101120000.{int(i * frame_step_s * 1e6):06d}"
        group.FrameContentSequence = one_item(FrameAcquisitionNumber=i + 1, FrameAcquisitionDateTime=stamp)
        group.PositionerPositionSequence = one_item(PositionerPrimaryAngle=float(a), PositionerSecondaryAngle=float(b))
        group.FieldOfViewSequence = one_item(FieldOfViewOrigin=list(origin), FieldOfViewRotation=0,
                                             FieldOfViewHorizontalFlip="NO")
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("modality", ["XA", "RF"])
def test_enhanced_multi_frame_gives_each_frames_view_from_its_functional_groups(tmp_path, phantom, modality):
    """A cine whose C-arm turns and whose field of view pans across the detector: each
    frame's view (angles, shifted principal point) equals the simulator's ground truth."""
    laos, cranials = [-30.0, -26.0, -22.0], [5.0, 6.0, 9.0]
    element, spacing = (0.35, 0.45), (0.7, 0.9)
    isocenter = (40.0, 60.0)  # detector elements
    fov_origins = [(10.0, 20.0), (14.0, 26.0), (18.0, 32.0)]
    binning = np.divide(spacing, element)
    principal_points = [tuple(((np.array(isocenter) + 0.5 - o) / binning - 0.5)[::-1]) for o in fov_origins]
    truths = [sim_view(phantom, a, b, size=(32, 24), principal_point=p)
              for a, b, p in zip(laos, cranials, principal_points)]
    frames = np.stack([simulate_xray(phantom.ct, t, XrayParams(seed=i), intensity="display")[0]
                       for i, t in enumerate(truths)]).astype(np.uint16)
    path = write_enhanced_xray_dicom(tmp_path / "cine.dcm", frames, modality=modality,
                                     primary=[dicom_primary_angle(a, "prone") for a in laos], secondary=cranials,
                                     fov_origins=fov_origins, isocenter_rc=isocenter, element_rc=element,
                                     spacing_rc=spacing)
    cine = read_xray_dicom(path, isocenter_world=phantom.ct.center_world())
    assert len(cine) == 3 and cine.modality == modality
    assert cine.frame_time_s == pytest.approx(0.1)
    assert len({tuple(v.K[:2, 2]) for v in cine.views}) == 3
    for view, truth in zip(cine.views, truths):
        assert_same_view(view, truth)
    assert_allclose(cine.frames, frames)


def test_enhanced_file_without_a_frames_tags_names_the_tag_and_frame(tmp_path):
    frames = np.zeros((2, 8, 8), np.uint16)
    path = write_enhanced_xray_dicom(tmp_path / "x.dcm", frames, primary=[0.0, 1.0], secondary=[0.0, 0.0],
                                     fov_origins=[(0.0, 0.0)] * 2, isocenter_rc=(3.5, 3.5), element_rc=(0.7, 0.9))
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[1].PositionerPositionSequence
    ds.save_as(path)
    with pytest.raises(DicomError, match="tag PositionerPrimaryAngle is missing for frame 2"):
        read_xray_dicom(path)
    del ds.SharedFunctionalGroupsSequence[0].XRayGeometrySequence
    ds.PerFrameFunctionalGroupsSequence[1].PositionerPositionSequence = one_item(PositionerPrimaryAngle=1.0,
                                                                                 PositionerSecondaryAngle=0.0)
    ds.save_as(path)
    with pytest.raises(DicomError, match="tag DistanceSourceToDetector is missing for frame 1"):
        read_xray_dicom(path)
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(path)
    with pytest.raises(DicomError, match="without PerFrameFunctionalGroupsSequence"):
        read_xray_dicom(path)


# ---------------------------------------------------------------------- one DICOM pixel path


def test_read_xray_orients_dicom_pixels_like_read_xray_dicom(tmp_path, phantom):
    """A feet-first file stores its pixels turned by 180 degrees: every reader gives them in
    the carm_view convention, with or without the geometry tags; a PatientOrientation that
    cannot be related to the image without the geometry is an error naming the missing tag."""
    image = np.arange(3 * 48 * 64, dtype=np.uint16).reshape(3, 48, 64)
    path = write_xray_dicom(tmp_path / "ff.dcm", image[:, ::-1, ::-1], primary=[0.0] * 3, secondary=[0.0] * 3,
                            patient_position="FFS")
    assert_allclose(read_xray_dicom(path).frames, image)
    assert_allclose(read_xray(path), image[0])
    ds = pydicom.dcmread(path)
    del ds.PositionerPrimaryAngle
    ds.save_as(path)
    with pytest.raises(DicomError, match="PositionerPrimaryAngle"):
        read_xray_dicom(path)
    assert_allclose(read_xray(path), image[0])
    ds.PatientOrientation = ["L", "F"]
    ds.save_as(path)
    with pytest.raises(DicomError, match="PatientOrientation .* without the C-arm geometry.*PositionerPrimaryAngle"):
        read_xray(path)
