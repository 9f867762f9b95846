"""The anatomy a command works on: a CT from files, or the embedded phantom.

One loader for every entry point (CLI, evaluation, benchmarks): a CT path with optional
label map and plan files, else the synthetic phantom of a seed with its own labels and
plan. Grids are checked once here.

The phantom's subject (CT, labels, screw plan) takes ~0.2-0.5 s to make, at every start
of every process that needs it (a restarted pipeline waits for it), so it is kept in the
cache folder (``guidance.core.cache``) as one ``.npz`` (arrays and a JSON header, no
pickled objects) named by a hash of the seed and of the source code that makes it. A
file whose format or key does not match, or that fails to load (a truncated or altered
file fails the zip CRC-32 of its arrays), is logged and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guidance.core.cache import default_cache_dir
from guidance.core.errors import GuidanceError
from guidance.core.plan import plan_from_dict, plan_to_dict, read_plan
from guidance.core.volume import Volume, VolumeError, load_volume

if TYPE_CHECKING:
    from sim.phantom import Phantom

__all__ = ["Subject", "SubjectCacheError", "SUBJECT_FORMAT", "PHANTOM_SOURCES", "load_subject", "phantom_subject"]

log = logging.getLogger(__name__)

SUBJECT_FORMAT = "guidance.phantom_subject/1"
PHANTOM_SOURCES = ("sim.phantom", "guidance.core.geometry", "guidance.core.levels", "guidance.core.plan",
                   "guidance.core.volume")
"""The modules whose source code makes the phantom: part of its cache key, so that a
change to any of them makes a new phantom (a change elsewhere needs SUBJECT_FORMAT bumped)."""


class SubjectCacheError(GuidanceError):
    """A cached phantom subject that is not the one asked for (format or key differs)."""


@dataclass(frozen=True)
class Subject:
    """A CT in HU (world = LPS mm), its label map (TotalSegmentator ids, same grid) or
    None, and its screw plan (``guidance.plan/1`` trajectories) or None."""

    ct: Volume
    labels: Volume | None
    plan: list[dict] | None


def load_subject(ct: str | Path | Phantom | None = None, *, labels: str | Path | None = None,
                 plan: str | Path | None = None, phantom_seed: int = 0, cache_dir: str | Path | None = None,
                 use_cache: bool = True) -> Subject:
    """The subject of a CT file (or DICOM folder), a ``Phantom``, or (``ct`` None) the
    phantom of ``phantom_seed`` (``phantom_subject``: from ``cache_dir`` when made before);
    ``labels`` / ``plan`` files replace the phantom's own."""
    if ct is None:
        own = phantom_subject(phantom_seed, cache_dir=cache_dir, use_cache=use_cache)
    elif isinstance(ct, (str, Path)):
        own = Subject(ct=load_volume(ct), labels=None, plan=None)
    else:  # a Phantom
        own = Subject(ct=ct.ct, labels=ct.labels, plan=ct.plan)
    label_map = load_volume(labels, units="label") if labels is not None else own.labels
    if label_map is not None and label_map.data.shape != own.ct.data.shape:
        raise VolumeError(f"labels grid {label_map.data.shape} differs from the CT grid {own.ct.data.shape}")
    trajectories = read_plan(plan) if plan is not None else own.plan
    return Subject(ct=own.ct, labels=label_map, plan=trajectories)


def phantom_subject(seed: int = 0, *, cache_dir: str | Path | None = None, use_cache: bool = True) -> Subject:
    """The CT, labels and screw plan of ``make_phantom(seed=seed)``, read from ``cache_dir``
    (default ``default_cache_dir()``) when a valid file is there, else made (and saved).
    An unreadable, stale or corrupt file is logged and rebuilt; a cache that cannot be
    written is logged and skipped; ``use_cache=False`` always makes it and writes nothing."""
    if not use_cache:
        return _make_phantom_subject(seed)
    key = phantom_key(seed)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"phantom_subject_{key}.npz"
    if path.exists():
        try:
            return load_phantom_subject(path, key)
        except Exception as exc:  # any failure to read the file means: rebuild it
            log.warning("phantom cache %s unusable (%s): rebuilding it", path, exc)
    t0 = time.perf_counter()
    subject = _make_phantom_subject(seed)
    try:
        save_phantom_subject(subject, path, key)
    except OSError as exc:
        log.warning("cannot write the phantom cache %s: %s", path, exc)
        return subject
    log.info("phantom of seed %d made in %.2f s and cached in %s", seed, time.perf_counter() - t0, path)
    return subject


def phantom_key(seed: int) -> str:
    """Hex digest of the cache format, the seed and the source code of ``PHANTOM_SOURCES``."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{SUBJECT_FORMAT} seed={int(seed)}".encode())
    for name in PHANTOM_SOURCES:
        h.update(name.encode())
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()


def _make_phantom_subject(seed: int) -> Subject:
    from sim.phantom import make_phantom  # only when not cached: making it is what the cache saves

    phantom = make_phantom(seed=seed)
    return Subject(ct=phantom.ct, labels=phantom.labels, plan=phantom.plan)


def save_phantom_subject(subject: Subject, path: str | Path, key: str) -> None:
    """Write a phantom's subject as one ``.npz`` (written to a temporary name, then renamed)."""
    path = Path(path)
    header = {"format": SUBJECT_FORMAT, "key": key, "ct_units": subject.ct.units,
              "labels_units": subject.labels.units, "plan": plan_to_dict(subject.plan)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             ct=subject.ct.data, T_world_from_index_ct=subject.ct.T_world_from_index,
             labels=subject.labels.data, T_world_from_index_labels=subject.labels.T_world_from_index)
    os.replace(tmp, path)


def load_phantom_subject(path: str | Path, key: str) -> Subject:
    """Read a phantom's subject written by ``save_phantom_subject``; SubjectCacheError when
    the file does not hold the subject of ``key`` in this format (zipfile's BadZipFile when
    an array fails its CRC-32)."""
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(f["header"].tobytes().decode())
        if header.get("format") != SUBJECT_FORMAT or header.get("key") != key:
            raise SubjectCacheError(f"{path}: format {header.get('format')!r} or key does not match")
        ct = Volume(f["ct"], f["T_world_from_index_ct"], header["ct_units"])
        labels = Volume(f["labels"], f["T_world_from_index_labels"], header["labels_units"])
    return Subject(ct=ct, labels=labels, plan=plan_from_dict(header["plan"]))
