"""Prepared CT: the pyramid, centres and spine axis, and the disk cache (hit equals a fresh
preparation; a stale or corrupt file is rebuilt, never used)."""

from dataclasses import replace

import numpy as np
import pytest

from guidance.core.drr import render_drr
from guidance.core.views import carm_view
from guidance.core.volume import Volume, attenuation_from_hu, hu_to_attenuation
from guidance.registration.prepared import AnatomyModel, PrepareSettings, load_or_prepare, prepare_ct
from sim.phantom import make_phantom

SETTINGS = PrepareSettings(pyramid_spacings_mm=(4.0, 8.0))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=2.0)


def _same(a, b):
    assert a.key == b.key and a.spacings_mm == b.spacings_mm
    for va, vb in zip(a.volumes, b.volumes):
        np.testing.assert_array_equal(va.codes, vb.codes)
        np.testing.assert_array_equal(va.T_world_from_index, vb.T_world_from_index)
        assert (va.mu_scale, va.size_ijk, va.step_mm) == (vb.mu_scale, vb.size_ijk, vb.step_mm)
        np.testing.assert_array_equal(va.occupancy, vb.occupancy)
        np.testing.assert_array_equal(va.nonzero_box_ijk, vb.nonzero_box_ijk)
    assert (a.soft is None) == (b.soft is None) and (a.soft_fine is None) == (b.soft_fine is None)
    for va, vb in zip(a.volumes + (a.soft, a.soft_fine), b.volumes + (b.soft, b.soft_fine)):
        if va is not None:
            np.testing.assert_array_equal(va.codes, vb.codes)
            np.testing.assert_array_equal(va.T_world_from_index, vb.T_world_from_index)
    for la, lb in zip(a.labels, b.labels):
        np.testing.assert_array_equal(la, lb)
    assert sorted(a.centres) == sorted(b.centres)
    for k in a.centres:
        np.testing.assert_array_equal(a.centres[k], b.centres[k])
    np.testing.assert_array_equal(a.spine_axis_world, b.spine_axis_world)
    assert a.vertebra_height_mm == b.vertebra_height_mm


def test_pyramid_centres_and_spine(phantom):
    prepared = prepare_ct(phantom.ct, phantom.labels, SETTINGS)
    assert prepared.spacings_mm == (2.0, 4.0, 8.0)  # native bone volume, then the coarse ones
    assert prepared.volumes[0].size_ijk[0] < phantom.ct.size_ijk[0]  # cropped to the bone
    # Every level carries the labels; the whole-CT centre lies between the vertebrae's.
    assert all(lab is not None and set(np.unique(lab)) - {0} for lab in prepared.labels)
    ids = [phantom.levels[n] for n in ("L1", "L2", "L3", "L4", "L5")]
    centres = np.array([prepared.centre(i) for i in ids])
    assert np.linalg.norm(prepared.centre(None) - centres.mean(axis=0)) < 15.0
    # Spine axis along the centres, vertebral height = distance between neighbours.
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    assert prepared.vertebra_height_mm == pytest.approx(np.median(steps))
    direction = (centres[-1] - centres[0]) / np.linalg.norm(centres[-1] - centres[0])
    assert abs(direction @ prepared.spine_axis_world) > 0.95
    assert prepared.pyramid_index(5.0) == 1 and prepared.pyramid_index(100.0) == 2 and prepared.pyramid_index(1.0) == 0
    one = prepared.volume(1, ids[2])
    assert one.size_ijk[2] < prepared.volumes[1].size_ijk[2]  # one vertebra, cropped


def test_a_label_without_bone_is_centred_on_its_voxels(phantom):
    """A label whose voxels all lie below the bone threshold (inside the bone's box) has
    no bone to weigh: its centre is its voxels' centroid (it raised ZeroDivisionError)."""
    ct = phantom.ct.data
    kk, jj, ii = np.nonzero(ct > 150.0)
    box = tuple(slice(a.min() + 2, a.max() - 2) for a in (kk, jj, ii))
    soft = np.zeros(ct.shape, bool)
    soft[box] = ct[box] < 100.0
    k, j, i = (a[:40] for a in np.nonzero(soft))
    labels = phantom.labels.data.copy()
    labels[k, j, i] = 99
    prepared = prepare_ct(phantom.ct, Volume(labels, phantom.labels.T_world_from_index, "label"), SETTINGS)
    expected = phantom.ct.index_to_world(np.column_stack([i, j, k])).mean(axis=0)
    np.testing.assert_allclose(prepared.centre(99), expected, atol=1e-6)


def test_soft_tissue_goes_on_beyond_the_faces_the_body_touches():
    """A block of water whose box the body leaves through the low i face (the field of
    view's edge) and both slice ends, with air beyond its high i face and both j faces:
    the model's soft tissue goes on 60 mm beyond the cut faces, unchanged beyond the slices
    and fading as exp(-3 d / 60 mm) beyond the field of view, and stops at the others."""
    hu = np.full((20, 20, 20), -1000.0, np.float32)
    hu[:, 5:15, :14] = 0.0  # water touching i = 0 and both k ends, 6 voxels of air before i = 19
    hu[10, 10, 10] = 1000.0  # a bone voxel, which preparation needs
    ct = Volume(hu, np.diag([4.0, 4.0, 4.0, 1.0]), "HU")
    settings = PrepareSettings(pyramid_spacings_mm=(4.0,))
    soft = prepare_ct(ct, None, settings).soft
    water = float(attenuation_from_hu(0.0))

    def mu_at(x, y, z):
        ijk = np.linalg.solve(soft.T_world_from_index, [x, y, z, 1.0])[:3]
        i, j, k = np.rint(ijk).astype(int)
        return float(soft.codes[k, j, i]) * soft.mu_scale

    for d in (4.0, 20.0, 40.0):
        assert mu_at(-d, 40.0, 40.0) == pytest.approx(water * np.exp(-3.0 * d / 60.0), rel=0.02)  # beyond i = 0
        assert mu_at(20.0, 40.0, 76.0 + d) == pytest.approx(water, rel=0.02)  # beyond the last slice
        assert mu_at(-d, 40.0, -d) == pytest.approx(water * np.exp(-3.0 * d / 60.0), rel=0.02)  # both
    ni, nj, nk = soft.size_ijk
    corners = soft.T_world_from_index @ np.array([[0, 0, 0, 1.0], [ni - 1, nj - 1, nk - 1, 1.0]]).T
    assert corners[0, 0] < -56.0 and corners[2, 0] < -56.0 and corners[2, 1] > 76.0 + 56.0  # 60 mm on
    assert corners[0, 1] < 76.0 + 8.0 and corners[1, 0] > -8.0 and corners[1, 1] < 76.0 + 8.0  # not beyond air
    plain = prepare_ct(ct, None, replace(settings, soft_continuation_mm=0.0))
    assert plain.soft.size_ijk[0] < ni and plain.soft.size_ijk[2] < nk


@pytest.mark.parametrize("lao, cranial", [(0.0, 0.0), (90.0, 0.0), (35.0, 15.0)])
def test_bone_and_soft_tissue_draw_the_whole_ct(phantom, lao, cranial):
    """The registration's model (bone above the threshold's attenuation on its grid, the
    rest on a 4 mm grid, 2 mm with the native bone grid, drawn on a binned detector) gives
    the line integrals of the whole CT, up to the soft tissue's blur; bone alone misses the
    body's share (the soft tissue here ends where the CT does)."""
    prepared = prepare_ct(phantom.ct, None, replace(SETTINGS, soft_continuation_mm=0.0))
    assert prepared.soft is not None and prepared.soft.step_mm == pytest.approx(4.0)
    assert prepared.anatomy(0).soft.step_mm == pytest.approx(2.0)
    assert all(prepared.anatomy(n).soft is prepared.soft for n in range(1, len(prepared.volumes)))
    centre = prepared.centre(None)
    view = carm_view(lao_deg=lao, cranial_deg=cranial, isocenter_world=centre, detector_size_px=(160, 128),
                     patient_position="prone")
    whole = render_drr(hu_to_attenuation(phantom.ct, energy_kev=60.0), view, step_mm=0.5)
    body = whole > 0.05 * whole.max()
    model = prepared.anatomy(0).render(view)
    bone_only = AnatomyModel(prepared.volumes[0]).render(view)
    error = np.abs(model - whole)[body] / whole[body]
    assert np.median(error) < 0.01 and np.quantile(error, 0.95) < 0.02
    assert np.median(np.abs(bone_only - whole)[body] / whole[body]) > 0.5
    # The soft tissue drawn on the binned detector equals it drawn on every pixel, up to interpolation.
    soft_fine = render_drr(prepared.anatomy(0).soft, view)
    soft_binned = model - bone_only
    assert np.median(np.abs(soft_binned - soft_fine)[body] / soft_fine[body]) < 0.005


def test_a_coarse_level_may_bin_the_soft_tissue_further(phantom):
    """``soft_binning`` (the coarse search level's) draws the soft tissue on a coarser
    detector: still its line integrals up to interpolation; below the binning the voxel
    size asks for anyway, it changes nothing."""
    prepared = prepare_ct(phantom.ct, None, SETTINGS)
    view = carm_view(lao_deg=20.0, isocenter_world=prepared.centre(None), detector_size_px=(160, 128),
                     patient_position="prone").downsampled(4)  # pixels about half the soft voxel
    model = prepared.anatomy(0)
    bone_only = AnatomyModel(prepared.volumes[0]).render(view)
    soft_fine = render_drr(model.soft, view)
    body = soft_fine > 0.05 * soft_fine.max()
    natural = model.render(view)
    np.testing.assert_array_equal(replace(model, soft_binning=0.5).render(view), natural)
    coarse = replace(model, soft_binning=3.0).render(view)
    assert np.abs(coarse - natural).max() > 1e-3 * soft_fine.max()
    error = np.abs((coarse - bone_only) - soft_fine)[body] / soft_fine[body]
    assert np.median(error) < 0.002 and np.quantile(error, 0.95) < 0.01


def test_the_soft_binning_fixed_for_a_view_holds_across_its_boundary(phantom):
    """Where the soft tissue's binning from each pose's depth switches between whole numbers
    (here 3 -> 2 pixels, 0.02 mm of depth apart), the image jumped; fixed for the view
    (``fixed_for``, one registration's), both poses take the same binning and the image moves
    smoothly, far less than across the switch."""
    from guidance.registration.prepared import SOFT_PIXEL_PER_VOXEL

    prepared = prepare_ct(phantom.ct, None, SETTINGS)
    model = prepared.anatomy(0)
    view = carm_view(lao_deg=20.0, isocenter_world=prepared.centre(None), detector_size_px=(160, 128),
                     patient_position="prone").downsampled(2)
    T = model.soft.T_world_from_index
    soft_centre = T[:3, :3] @ ((np.array(model.soft.size_ijk) - 1.0) / 2.0) + T[:3, 3]
    depth_mm = float(view.T_cam_from_world[2, :3] @ soft_centre + view.T_cam_from_world[2, 3])
    at_two = SOFT_PIXEL_PER_VOXEL * model.soft.step_mm * float(view.K[0, 0]) / 2.0  # the depth where it is 2

    def at(offset_mm):
        T_cam = view.T_cam_from_world.copy()
        T_cam[2, 3] += at_two - depth_mm + offset_mm
        return view.with_pose(T_cam)

    near, far = at(-0.01), at(0.01)
    assert (model.soft_factor_for(near), model.soft_factor_for(far)) == (3, 2)
    fixed = model.fixed_for(near)
    assert fixed.soft_factor == 3 and fixed.fixed_for(far).soft_factor == 2
    jump = np.abs(model.render(far) - model.render(near)).max()
    smooth = np.abs(fixed.render(far) - fixed.render(near)).max()
    assert smooth < 0.1 * jump


def test_one_soft_tissue_grid_serves_every_level_without_a_fine_one(phantom):
    prepared = prepare_ct(phantom.ct, None, replace(SETTINGS, fine_soft_tissue_spacing_mm=None))
    assert prepared.soft_fine is None
    assert all(prepared.anatomy(n).soft is prepared.soft for n in range(len(prepared.volumes)))


def test_bone_only_preparation_keeps_no_soft_tissue(phantom):
    prepared = prepare_ct(phantom.ct, None, PrepareSettings(pyramid_spacings_mm=(4.0,), soft_tissue_spacing_mm=None))
    assert prepared.soft is None and prepared.soft_fine is None
    mu = hu_to_attenuation(phantom.ct, energy_kev=60.0).data
    assert prepared.volumes[0].mu.max() == pytest.approx(float(mu.max()), rel=1e-3)  # full bone attenuation


def test_cache_hit_equals_fresh_preparation_and_corrupt_file_is_rebuilt(phantom, tmp_path, caplog):
    fresh = prepare_ct(phantom.ct, phantom.labels, SETTINGS)
    first = load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path)
    assert not first.from_cache
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and fresh.key in files[0].name
    hit = load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path)
    assert hit.from_cache
    _same(hit, fresh)
    # Corrupt the file: it is detected, rebuilt and rewritten.
    files[0].write_bytes(files[0].read_bytes()[:1000])
    rebuilt = load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path)
    assert not rebuilt.from_cache and "rebuilding" in caplog.text
    _same(rebuilt, fresh)
    assert load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path).from_cache


def test_stale_cache_file_is_not_used(phantom, tmp_path):
    """A file under the right name whose stored key belongs to other inputs is rebuilt."""
    other = make_phantom(seed=3, spacing_mm=2.0)
    prepared = load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path)
    wrong = load_or_prepare(other.ct, other.labels, SETTINGS, cache_dir=tmp_path)
    assert wrong.key != prepared.key
    path = tmp_path / f"prepared_ct_{prepared.key}.npz"
    path.write_bytes((tmp_path / f"prepared_ct_{wrong.key}.npz").read_bytes())
    again = load_or_prepare(phantom.ct, phantom.labels, SETTINGS, cache_dir=tmp_path)
    assert not again.from_cache
    _same(again, prepare_ct(phantom.ct, phantom.labels, SETTINGS))


def test_cache_key_follows_voxels_geometry_and_settings(phantom, tmp_path):
    base = load_or_prepare(phantom.ct, None, SETTINGS, cache_dir=tmp_path)
    changed = phantom.ct.with_data(phantom.ct.data + np.float32(1.0))
    moved_T = phantom.ct.T_world_from_index.copy()
    moved_T[0, 3] += 1.0
    moved = type(phantom.ct)(phantom.ct.data, moved_T, "HU")
    keys = {base.key,
            load_or_prepare(changed, None, SETTINGS, cache_dir=tmp_path).key,
            load_or_prepare(moved, None, SETTINGS, cache_dir=tmp_path).key,
            load_or_prepare(phantom.ct, None, PrepareSettings(pyramid_spacings_mm=(4.0,)), cache_dir=tmp_path).key}
    assert len(keys) == 4 and len(list(tmp_path.glob("*.npz"))) == 4
