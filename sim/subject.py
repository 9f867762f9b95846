"""The anatomy a command works on: a CT from files, or the embedded phantom.

One loader for every entry point (CLI, evaluation, benchmarks): a CT path with optional
label map and plan files, else the synthetic phantom of a seed with its own labels and
plan. Grids are checked once here.

Making the phantom (~0.2-0.5 s) or reading a CT file (SimpleITK's import and decoding:
~0.3 s for a small NIfTI, over 1 s for a 20-slice DICOM series) happens at every start
of every process that needs it, and a restarted pipeline waits for it. So both are kept
in the cache folder (``guidance.core.cache``), one ``.npz`` each (arrays and a JSON
header, no pickled objects), named by a hash of their inputs: the phantom's seed and the
source code that makes it; a file's (or a DICOM folder's files') bytes and the units
asked for. A cached file whose format or key does not match, or that fails to load (a
truncated or altered file fails the zip CRC-32 of its arrays), is logged and rebuilt,
never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
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

__all__ = ["Subject", "SubjectCacheError", "SUBJECT_CACHE_FORMAT", "PHANTOM_SOURCES", "load_subject",
           "phantom_subject", "cached_volume", "phantom_key", "volume_key", "read_cached", "write_cached"]

log = logging.getLogger(__name__)

SUBJECT_CACHE_FORMAT = "guidance.subject_cache/1"
PHANTOM_SOURCES = ("sim.phantom", "guidance.core.geometry", "guidance.core.levels", "guidance.core.plan",
                   "guidance.core.volume")
"""The modules whose source code makes the phantom: part of its cache key, so that a
change to any of them makes a new phantom (a change elsewhere needs SUBJECT_CACHE_FORMAT bumped)."""
_HASH_CHUNK = 1 << 20


class SubjectCacheError(GuidanceError):
    """A cached file that does not hold what was asked for (format or key differs)."""


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
    phantom of ``phantom_seed``; ``labels`` / ``plan`` files replace the phantom's own.
    The phantom and the volume files are read from ``cache_dir`` (default
    ``default_cache_dir()``) when made or read before (``use_cache=False``: never)."""
    if ct is None:
        own = phantom_subject(phantom_seed, cache_dir=cache_dir, use_cache=use_cache)
    elif isinstance(ct, (str, Path)):
        own = Subject(ct=cached_volume(ct, cache_dir=cache_dir, use_cache=use_cache), labels=None, plan=None)
    else:  # a Phantom
        own = Subject(ct=ct.ct, labels=ct.labels, plan=ct.plan)
    label_map = own.labels
    if labels is not None:
        label_map = cached_volume(labels, units="label", cache_dir=cache_dir, use_cache=use_cache)
    if label_map is not None and label_map.data.shape != own.ct.data.shape:
        raise VolumeError(f"labels grid {label_map.data.shape} differs from the CT grid {own.ct.data.shape}")
    trajectories = read_plan(plan) if plan is not None else own.plan
    return Subject(ct=own.ct, labels=label_map, plan=trajectories)


def phantom_subject(seed: int = 0, *, cache_dir: str | Path | None = None, use_cache: bool = True) -> Subject:
    """The CT, labels and screw plan of ``make_phantom(seed=seed)``, from the cache when made before."""
    def make() -> tuple[dict[str, Volume], list[dict]]:
        from sim.phantom import make_phantom  # only when not cached: making it is what the cache saves

        phantom = make_phantom(seed=seed)
        return {"ct": phantom.ct, "labels": phantom.labels}, phantom.plan

    if not use_cache:
        volumes, plan = make()
    else:
        volumes, plan = _cached("phantom", phantom_key(seed), cache_dir, make)
    return Subject(ct=volumes["ct"], labels=volumes["labels"], plan=plan)


def cached_volume(path: str | Path, *, units: str = "HU", cache_dir: str | Path | None = None,
                  use_cache: bool = True) -> Volume:
    """``load_volume(path, units=units)`` (a file or a DICOM folder holding one series),
    from the cache when that content was read before."""
    path = Path(path)
    if not use_cache or not path.exists():  # a missing path: load_volume's error
        return load_volume(path, units=units)
    volumes, _ = _cached("volume", volume_key(path, units), cache_dir,
                         lambda: ({"volume": load_volume(path, units=units)}, None))
    return volumes["volume"]


def phantom_key(seed: int) -> str:
    """Hex digest of the cache format, the seed and the source code of ``PHANTOM_SOURCES``."""
    h = hashlib.blake2b(f"{SUBJECT_CACHE_FORMAT} phantom seed={int(seed)}".encode(), digest_size=20)
    for name in PHANTOM_SOURCES:
        h.update(name.encode())
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()


def volume_key(path: str | Path, units: str) -> str:
    """Hex digest of the cache format, ``units`` and the bytes of the file ``path`` or of
    every file directly in the folder ``path`` (with their names, in name order)."""
    path = Path(path)
    h = hashlib.blake2b(f"{SUBJECT_CACHE_FORMAT} volume units={units}".encode(), digest_size=20)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(f"\0{file.name}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _cached(kind: str, key: str, cache_dir: str | Path | None,
            make: Callable[[], tuple[dict[str, Volume], list[dict] | None]]
            ) -> tuple[dict[str, Volume], list[dict] | None]:
    """The volumes and plan of ``kind_key.npz`` in the cache folder, else ``make()``'s
    (then written there); an unusable file is logged and rebuilt, an unwritable folder logged."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{kind}_{key}.npz"
    if path.exists():
        try:
            return read_cached(path, key)
        except Exception as exc:  # any failure to read the file means: rebuild it
            log.warning("%s cache %s unusable (%s): rebuilding it", kind, path, exc)
    t0 = time.perf_counter()
    volumes, plan = make()
    try:
        write_cached(path, key, volumes, plan)
    except OSError as exc:
        log.warning("cannot write the %s cache %s: %s", kind, path, exc)
    else:
        log.info("%s made or read in %.2f s, cached in %s", kind, time.perf_counter() - t0, path)
    return volumes, plan


def write_cached(path: str | Path, key: str, volumes: dict[str, Volume], plan: list[dict] | None) -> None:
    """Write named volumes and a plan as one ``.npz`` (to a temporary name, then renamed)."""
    path = Path(path)
    header = {"format": SUBJECT_CACHE_FORMAT, "key": key, "units": {n: v.units for n, v in volumes.items()},
              "plan": None if plan is None else plan_to_dict(plan)}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for name, volume in volumes.items():
        arrays[f"data_{name}"] = volume.data
        arrays[f"T_world_from_index_{name}"] = volume.T_world_from_index
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_cached(path: str | Path, key: str) -> tuple[dict[str, Volume], list[dict] | None]:
    """The named volumes and plan written by ``write_cached``; SubjectCacheError when the
    file does not hold those of ``key`` in this format (zipfile's BadZipFile when an
    array fails its CRC-32)."""
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(f["header"].tobytes().decode())
        if header.get("format") != SUBJECT_CACHE_FORMAT or header.get("key") != key:
            raise SubjectCacheError(f"{path}: format {header.get('format')!r} or key does not match")
        volumes = {name: Volume(f[f"data_{name}"], f[f"T_world_from_index_{name}"], units)
                   for name, units in header["units"].items()}
    return volumes, None if header["plan"] is None else plan_from_dict(header["plan"])
