import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.core.geometry import (
    GeometryError,
    backproject,
    check_rigid,
    decompose_projection,
    intrinsics,
    invert_rigid,
    make_rigid,
    project,
    projection_matrix,
    rotation_about_axis,
    rotation_angle_deg,
    rotation_from_rotvec,
    rotvec_from_rotation,
    transform_points,
)


def random_pose(rng, scale=100.0):
    return make_rigid(rotation_from_rotvec(rng.normal(size=3)), rng.normal(size=3) * scale)


def test_invert_rigid_composes_to_identity():
    rng = np.random.default_rng(0)
    T = random_pose(rng)
    assert_allclose(invert_rigid(T) @ T, np.eye(4), atol=1e-12)
    assert_allclose(invert_rigid(T), np.linalg.inv(T), atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 0.3, 2.0, np.pi - 1e-6, np.pi])
def test_rotvec_round_trip(angle):
    axis = np.array([0.2, -0.5, 0.84])
    axis /= np.linalg.norm(axis)
    R = rotation_from_rotvec(axis * angle)
    assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert_allclose(rotation_from_rotvec(rotvec_from_rotation(R)), R, atol=1e-9)
    assert rotation_angle_deg(R) == pytest.approx(np.rad2deg(angle), abs=1e-5)


def test_rotation_about_axis_is_right_handed():
    R = rotation_about_axis([0, 0, 1], 90.0)
    assert_allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_projection_round_trip_subpixel():
    rng = np.random.default_rng(1)
    K = intrinsics(1000.0, (0.5, 0.55), (250.3, 260.7), skew=0.2)
    T = random_pose(rng, 20.0)
    T[:3, 3] += [0, 0, 600]
    pts = rng.uniform(-80, 80, size=(200, 3))
    uv = project(projection_matrix(K, T), pts)
    source, dirs = backproject(K, T, uv)
    depth = transform_points(T, pts)[:, 2]
    d_cam_z = dirs @ T[2, :3]
    recovered = source + dirs * (depth / d_cam_z)[:, None]
    assert_allclose(recovered, pts, atol=1e-8)
    assert_allclose(project(projection_matrix(K, T), recovered), uv, atol=1e-6)


def test_principal_point_projects_from_optical_axis():
    K = intrinsics(1000.0, (0.5, 0.5), (256.0, 200.0))
    uv = project(projection_matrix(K, np.eye(4)), np.array([[0.0, 0.0, 700.0]]))
    assert_allclose(uv, [[256.0, 200.0]])


def test_decompose_projection_recovers_k_and_pose_up_to_scale():
    rng = np.random.default_rng(2)
    K = intrinsics(1100.0, (0.4, 0.4), (300.0, 310.0), skew=0.5)
    T = random_pose(rng)
    for scale in (1.0, -3.5, 1e-3, 1e-9):
        K2, T2 = decompose_projection(scale * projection_matrix(K, T))
        assert_allclose(K2, K, rtol=1e-10, atol=1e-9)
        assert_allclose(T2, T, atol=1e-9)


def test_decompose_projection_rejects_singular():
    with pytest.raises(GeometryError, match="singular"):
        decompose_projection(np.zeros((3, 4)))
    with pytest.raises(GeometryError, match="3x4"):
        decompose_projection(np.eye(3))


def test_check_rigid_errors():
    with pytest.raises(GeometryError, match="4x4"):
        check_rigid(np.eye(3))
    bad = np.eye(4)
    bad[0, 0] = 2.0
    with pytest.raises(GeometryError, match="rotation"):
        check_rigid(bad)
    bad = np.eye(4)
    bad[3, 0] = 1.0
    with pytest.raises(GeometryError, match="last row"):
        check_rigid(bad)
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(GeometryError, match="NaN"):
        check_rigid(bad)
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(GeometryError):
        check_rigid(mirror)


def test_rotvec_conversions_match_scipy():
    """The NumPy conversions against scipy's Rotation (independent reference), over random
    axes and angles from 0 to 180 deg, tiny angles and angles next to 180 deg."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    axes = rng.normal(size=(60, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.r_[rng.uniform(0.0, np.pi, 40), 1e-12, 1e-7, 1e-4, 2e-3, np.pi - 1e-9, np.pi - 1e-5,
                   np.pi, rng.uniform(np.pi - 0.1, np.pi, 13)]
    for axis, angle in zip(axes, angles):
        rotvec = axis * angle
        R = rotation_from_rotvec(rotvec)
        assert_allclose(R, Rotation.from_rotvec(rotvec).as_matrix(), atol=1e-14)
        reference = Rotation.from_matrix(R).as_rotvec()
        got = rotvec_from_rotation(R)
        if angle < np.pi - 1e-6:
            assert_allclose(got, reference, atol=1e-12)
        else:  # at 180 deg v and -v are the same rotation
            assert_allclose(rotation_from_rotvec(got), R, atol=1e-12)
            assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(reference), abs=1e-9)
