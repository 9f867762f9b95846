"""sim.subject: the CT-or-phantom loader and the phantom's disk cache."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from guidance.core.volume import Volume, VolumeError, save_volume
from sim.phantom import make_phantom
from sim.subject import (
    Subject, SubjectCacheError, load_phantom_subject, load_subject, phantom_key, phantom_subject,
    save_phantom_subject,
)


@pytest.fixture(scope="module")
def made():
    """The phantom of seed 3, made (the reference every cached load is compared with)."""
    return make_phantom(seed=3)


def assert_same(subject: Subject, phantom) -> None:
    assert np.array_equal(subject.ct.data, phantom.ct.data) and subject.ct.data.dtype == phantom.ct.data.dtype
    assert np.array_equal(subject.labels.data, phantom.labels.data)
    assert subject.labels.data.dtype == phantom.labels.data.dtype
    assert np.array_equal(subject.ct.T_world_from_index, phantom.ct.T_world_from_index)
    assert np.array_equal(subject.labels.T_world_from_index, phantom.labels.T_world_from_index)
    assert (subject.ct.units, subject.labels.units) == ("HU", "label")
    assert subject.plan == phantom.plan


def test_the_phantom_is_made_once_then_read_from_the_cache(made, tmp_path, caplog):
    """The first start makes the phantom and writes its file; the second reads that file
    (shown by a file whose CT differs by one: its content is what comes back)."""
    with caplog.at_level(logging.INFO, logger="sim.subject"):
        first = phantom_subject(3, cache_dir=tmp_path)
    files = list(tmp_path.glob("phantom_subject_*.npz"))
    assert [f.name for f in files] == [f"phantom_subject_{phantom_key(3)}.npz"]
    assert "made" in caplog.text
    assert_same(first, made)
    assert_same(phantom_subject(3, cache_dir=tmp_path), made)  # read back: identical to the made one
    marked = replace(first, ct=first.ct.with_data(first.ct.data + 1.0))
    save_phantom_subject(marked, files[0], phantom_key(3))
    second = load_subject(None, phantom_seed=3, cache_dir=tmp_path)
    assert np.array_equal(second.ct.data, made.ct.data + 1.0)
    assert phantom_key(4) != phantom_key(3)


def test_a_corrupt_or_stale_cached_phantom_is_rebuilt(made, tmp_path, caplog):
    """A byte altered in the CT's voxels (the zip CRC-32 catches it) or a file of another
    key is logged and rebuilt, never used."""
    phantom_subject(3, cache_dir=tmp_path)
    path = tmp_path / f"phantom_subject_{phantom_key(3)}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the CT's array (most of the file)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sim.subject"):
        assert_same(phantom_subject(3, cache_dir=tmp_path), made)
    assert "unusable" in caplog.text and "CRC" in caplog.text
    assert_same(load_phantom_subject(path, phantom_key(3)), made)  # rewritten whole
    with pytest.raises(SubjectCacheError, match="format .* or key does not match"):
        load_phantom_subject(path, phantom_key(4))
    caplog.clear()
    save_phantom_subject(load_phantom_subject(path, phantom_key(3)), path, phantom_key(4))  # another key's content
    with caplog.at_level(logging.WARNING, logger="sim.subject"):
        assert_same(phantom_subject(3, cache_dir=tmp_path), made)
    assert "key does not match" in caplog.text
    assert_same(load_phantom_subject(path, phantom_key(3)), made)


def test_without_the_cache_nothing_is_written(made, tmp_path):
    assert_same(phantom_subject(3, cache_dir=tmp_path, use_cache=False), made)
    assert list(tmp_path.iterdir()) == []


def test_a_label_map_of_another_grid_is_refused(made, tmp_path):
    labels = tmp_path / "labels.nii.gz"
    save_volume(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), "label"), labels)
    with pytest.raises(VolumeError, match="labels grid .* differs from the CT grid"):
        load_subject(made, labels=labels)
