import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from guidance.core.geometry import rotation_about_axis
from guidance.core.volume import (
    Volume,
    VolumeError,
    affine_from_geometry,
    attenuation_coefficients,
    crop_to_mask,
    hu_to_attenuation,
    list_dicom_series,
    load_volume,
    resample,
    save_volume,
    transform_volume,
)


def small_volume(direction=np.eye(3)):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    return Volume(data, affine_from_geometry([10.0, -20.0, 30.0], [0.5, 0.8, 2.0], direction))


def test_index_world_round_trip_with_direction():
    vol = small_volume(rotation_about_axis([1, 2, 3], 25.0))
    ijk = np.array([[0, 0, 0], [6, 5, 4], [1.5, 2.25, 3.75]])
    assert_allclose(vol.world_to_index(vol.index_to_world(ijk)), ijk, atol=1e-12)
    assert_allclose(vol.spacing, [0.5, 0.8, 2.0])
    assert_allclose(vol.index_to_world([[0, 0, 0]])[0], [10, -20, 30])


def test_save_load_keeps_geometry(tmp_path):
    vol = small_volume(rotation_about_axis([0, 1, 1], 30.0))
    for name in ("v.nii.gz", "v.mha", "v.nrrd"):
        save_volume(vol, tmp_path / name)
        back = load_volume(tmp_path / name)
        assert_allclose(back.T_world_from_index, vol.T_world_from_index, atol=1e-5)
        assert_allclose(back.data, vol.data)


def test_dicom_series_geometry_matches_headers(shared_data):
    folder = shared_data / "ct_dicom_series"
    vol = load_volume(folder)
    files = list(list_dicom_series(folder).values())[0]
    reader = sitk.ImageFileReader()
    positions = []
    for f in files:
        reader.SetFileName(f)
        reader.ReadImageInformation()
        positions.append([float(x) for x in reader.GetMetaData("0020|0032").split("\\")])
        orientation = [float(x) for x in reader.GetMetaData("0020|0037").split("\\")]
        pixel_spacing = [float(x) for x in reader.GetMetaData("0028|0030").split("\\")]
    positions = np.array(positions)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    order = np.argsort(positions @ normal)
    assert vol.data.shape == (len(files), 512, 512)
    assert_allclose(vol.origin, positions[order[0]], atol=1e-3)
    assert_allclose(vol.direction, np.column_stack([row, col, normal]), atol=1e-6)
    # DICOM PixelSpacing is (row spacing, column spacing) = (dv, du)
    assert_allclose(vol.spacing[:2], pixel_spacing[::-1])
    assert vol.spacing[2] == pytest.approx(np.diff(positions[order] @ normal).mean(), abs=1e-3)
    # The last slice is where its header says.
    assert_allclose(vol.index_to_world([[0, 0, len(files) - 1]])[0], positions[order[-1]], atol=1e-3)


def test_nifti_real_ct_loads_in_lps(shared_data):
    vol = load_volume(shared_data / "ct_abdomen_3mm.nii.gz")
    assert vol.data.shape == (112, 101, 122)
    assert_allclose(vol.spacing, [3, 3, 3])
    assert vol.data.dtype == np.float32
    # The NIfTI sform is RAS; SimpleITK turns it into LPS direction cosines.
    image = sitk.ReadImage(str(shared_data / "ct_abdomen_3mm.nii.gz"))
    assert_allclose(vol.direction.ravel(), image.GetDirection())
    assert_allclose(vol.origin, image.GetOrigin())


def test_missing_path():
    with pytest.raises(VolumeError, match="does not exist"):
        load_volume("no/such/ct.nii.gz")


def test_2d_image_is_rejected(tmp_path):
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(tmp_path / "frame.png"))
    with pytest.raises(VolumeError, match="2D"):
        load_volume(tmp_path / "frame.png")
    sitk.WriteImage(sitk.Image(32, 32, 1, sitk.sitkInt16), str(tmp_path / "slice.mha"))
    with pytest.raises(VolumeError, match="2D"):
        load_volume(tmp_path / "slice.mha")


def test_zero_spacing_is_rejected(tmp_path):
    path = tmp_path / "zero.mha"
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 0 1\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + bytes(128))
    with pytest.raises(VolumeError, match="zero voxel spacing"):
        load_volume(path)


def write_dicom_series(folder, uid, n_slices=3, spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0)):
    """A minimal CT series written slice by slice (SimpleITK's DICOM-from-array recipe)."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n_slices):
        image = sitk.GetImageFromArray(np.full((1, 8, 8), 100 * k, np.int16))
        image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        image.SetOrigin(position)
        tags = {
            "0008|0060": "CT",
            "0020|000e": uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{x:.3f}" for x in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{uid}_{k}.dcm"))
        writer.Execute(image)


def test_folder_with_several_series_lists_them(tmp_path):
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.7", n_slices=3)
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.8", n_slices=4)
    with pytest.raises(VolumeError, match="2 DICOM series") as info:
        load_volume(tmp_path)
    assert "1.2.826.0.1.3680043.2.1125.8 (4 files)" in str(info.value)
    vol = load_volume(tmp_path, series_uid="1.2.826.0.1.3680043.2.1125.8")
    assert vol.data.shape == (4, 8, 8)
    assert_allclose(vol.spacing, [0.5, 0.5, 2.0])
    assert_allclose(vol.origin, [1.0, 2.0, 3.0])
    with pytest.raises(VolumeError, match="not in"):
        load_volume(tmp_path, series_uid="9.9.9")


def test_hu_to_attenuation_fixed_points():
    hu = np.array([-2000, -1000, 0, 1900, 1000], dtype=np.float32).reshape(1, 1, 5)
    hu = np.repeat(np.repeat(hu, 2, axis=0), 2, axis=1)
    vol = Volume(hu, np.eye(4))
    mu = hu_to_attenuation(vol, energy_kev=60.0)
    mu_w, mu_b = attenuation_coefficients(60.0)
    assert mu.units == "mu_per_mm"
    assert_allclose(mu.data[0, 0], [0, 0, mu_w, mu_b, mu_w + (mu_b - mu_w) * 1000 / 1900], rtol=1e-6)
    assert mu_w == pytest.approx(0.0206, rel=0.01)  # NIST water at 60 keV
    with pytest.raises(VolumeError, match="HU"):
        hu_to_attenuation(mu)
    with pytest.raises(ValueError, match="keV"):
        attenuation_coefficients(10.0)


def test_crop_to_mask_with_margin_keeps_world_positions():
    vol = small_volume()
    mask = np.zeros(vol.data.shape, bool)
    mask[2, 3, 4] = True
    crop = crop_to_mask(vol, mask, margin_mm=1.0)
    # margin 1 mm = 2 voxels in i (0.5 mm), 1.25 -> 2 in j, 0.5 -> 1 in k
    assert crop.data.shape == (3, 5, 5)
    assert_allclose(crop.index_to_world([[2, 2, 1]]), vol.index_to_world([[4, 3, 2]]))
    assert crop.data[1, 2, 2] == vol.data[2, 3, 4]
    with pytest.raises(VolumeError, match="empty"):
        crop_to_mask(vol, np.zeros_like(mask))


def test_resample_preserves_a_linear_field():
    g = np.mgrid[0:20, 0:21, 0:22].astype(np.float32)
    vol = Volume(g[0] * 2 + g[1] - g[2], affine_from_geometry([0, 0, 0], [1.0, 1.5, 2.0], np.eye(3)))
    out = resample(vol, spacing=(0.7, 0.7, 0.7))
    pts = out.index_to_world(np.array([[5, 7, 9], [10, 12, 30]]))
    ijk = vol.world_to_index(pts)
    expected = ijk[:, 2] * 2 + ijk[:, 1] - ijk[:, 0]
    got = [out.data[9, 7, 5], out.data[30, 12, 10]]
    assert_allclose(got, expected, atol=1e-3)
    with pytest.raises(ValueError, match="linear, nearest, bspline"):
        resample(vol, interpolation="cubic")


def test_transform_volume_moves_content_by_the_motion():
    data = np.zeros((20, 20, 20), np.float32)
    data[10, 10, 5] = 100.0
    vol = Volume(data, np.eye(4), "mu_per_mm")
    T = np.eye(4)
    T[:3, 3] = [3.0, 0.0, 0.0]  # +3 mm along i
    moved = transform_volume(vol, T)
    assert moved.data[10, 10, 8] == pytest.approx(100.0)
    assert moved.data[10, 10, 5] == 0.0
    with pytest.raises(ValueError, match="linear, nearest"):
        transform_volume(vol, T, interpolation="cubic")
