"""sim.subject: the CT-or-phantom loader and its disk cache (phantom and volume files)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from guidance.core.volume import Volume, VolumeError, load_volume, save_volume
from sim.phantom import make_phantom
from sim.subject import (
    Subject, SubjectCacheError, cached_volume, load_subject, phantom_key, phantom_subject, read_cached, volume_key,
    write_cached,
)


@pytest.fixture(scope="module")
def made():
    """The phantom of seed 3, made (the reference every cached load is compared with)."""
    return make_phantom(seed=3)


def assert_same_volume(volume: Volume, reference: Volume) -> None:
    assert np.array_equal(volume.data, reference.data) and volume.data.dtype == reference.data.dtype
    assert np.array_equal(volume.T_world_from_index, reference.T_world_from_index)
    assert volume.units == reference.units


def assert_same(subject: Subject, phantom) -> None:
    assert_same_volume(subject.ct, phantom.ct)
    assert_same_volume(subject.labels, phantom.labels)
    assert subject.plan == phantom.plan


def test_the_phantom_is_made_once_then_read_from_the_cache(made, tmp_path, caplog):
    """The first start makes the phantom and writes its file; the second reads that file
    (shown by a file whose CT differs by one: its content is what comes back)."""
    with caplog.at_level(logging.INFO, logger="sim.subject"):
        first = phantom_subject(3, cache_dir=tmp_path)
    path = tmp_path / f"phantom_{phantom_key(3)}.npz"
    assert list(tmp_path.iterdir()) == [path]
    assert "cached in" in caplog.text
    assert_same(first, made)
    assert_same(phantom_subject(3, cache_dir=tmp_path), made)  # read back: identical to the made one
    write_cached(path, phantom_key(3), {"ct": first.ct.with_data(first.ct.data + 1.0), "labels": first.labels},
                 first.plan)
    second = load_subject(None, phantom_seed=3, cache_dir=tmp_path)
    assert np.array_equal(second.ct.data, made.ct.data + 1.0)
    assert phantom_key(4) != phantom_key(3)


def test_a_corrupt_or_stale_cached_phantom_is_rebuilt(made, tmp_path, caplog):
    """A byte altered in the CT's voxels (the zip CRC-32 catches it) or a file holding
    another key is logged and rebuilt, never used."""
    phantom_subject(3, cache_dir=tmp_path)
    path = tmp_path / f"phantom_{phantom_key(3)}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the CT's array (most of the file)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sim.subject"):
        assert_same(phantom_subject(3, cache_dir=tmp_path), made)
    assert "unusable" in caplog.text and "CRC" in caplog.text
    volumes, plan = read_cached(path, phantom_key(3))  # rewritten whole
    assert_same(Subject(ct=volumes["ct"], labels=volumes["labels"], plan=plan), made)
    with pytest.raises(SubjectCacheError, match="format .* or key does not match"):
        read_cached(path, phantom_key(4))
    caplog.clear()
    write_cached(path, phantom_key(4), volumes, plan)  # another key's file under this key's name
    with caplog.at_level(logging.WARNING, logger="sim.subject"):
        assert_same(phantom_subject(3, cache_dir=tmp_path), made)
    assert "key does not match" in caplog.text


def test_without_the_cache_nothing_is_written(made, tmp_path):
    assert_same(phantom_subject(3, cache_dir=tmp_path, use_cache=False), made)
    assert list(tmp_path.iterdir()) == []


def test_a_ct_file_is_read_once_then_from_the_cache_until_its_bytes_change(made, tmp_path):
    """The CT and label files are decoded once (SimpleITK), then read from the cache (a
    fresh process that finds them there never imports SimpleITK); a file rewritten with
    other voxels has another key, so its old cached volume is never used."""
    files, cache = tmp_path / "files", tmp_path / "cache"
    files.mkdir()
    save_volume(made.ct, files / "ct.nii.gz")
    save_volume(made.labels, files / "labels.nii.gz")
    reference = Subject(ct=load_volume(files / "ct.nii.gz"), labels=load_volume(files / "labels.nii.gz", units="label"),
                        plan=None)
    first = load_subject(files / "ct.nii.gz", labels=files / "labels.nii.gz", cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert_same_volume(first.ct, reference.ct)
    assert_same_volume(first.labels, reference.labels)
    snippet = ("import json, sys; from sim.subject import load_subject; "
               f"s = load_subject({str(files / 'ct.nii.gz')!r}, labels={str(files / 'labels.nii.gz')!r}, "
               f"cache_dir={str(cache)!r}); print(json.dumps([s.labels.data.shape, 'SimpleITK' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [list(made.ct.data.shape), False]
    key = volume_key(files / "ct.nii.gz", "HU")
    save_volume(made.ct.with_data(made.ct.data + 5.0), files / "ct.nii.gz")
    assert volume_key(files / "ct.nii.gz", "HU") != key
    assert np.array_equal(cached_volume(files / "ct.nii.gz", cache_dir=cache).data, reference.ct.data + 5.0)
    assert volume_key(files / "labels.nii.gz", "label") != volume_key(files / "labels.nii.gz", "HU")


def test_a_dicom_folder_is_keyed_by_every_file_in_it(shared_data, tmp_path):
    """The real DICOM series: read once, then from the cache, identical."""
    folder = shared_data / "ct_dicom_series"
    first = cached_volume(folder, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    again = cached_volume(folder, cache_dir=tmp_path)
    assert_same_volume(again, first)
    assert_same_volume(first, load_volume(folder))


def test_a_missing_file_and_a_label_map_of_another_grid_are_refused(made, tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        load_subject(tmp_path / "nothing.nii.gz", cache_dir=tmp_path)
    labels = tmp_path / "labels.nii.gz"
    save_volume(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), "label"), labels)
    with pytest.raises(VolumeError, match="labels grid .* differs from the CT grid"):
        load_subject(made, labels=labels, cache_dir=tmp_path)
