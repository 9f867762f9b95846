"""The anatomy a command works on: a CT from files, or the embedded phantom.

One loader for every entry point (CLI, evaluation, benchmarks): a CT path with optional
label map and plan files, else the synthetic phantom of a seed with its own labels and
plan. Grids are checked once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guidance.core.plan import read_plan
from guidance.core.volume import Volume, VolumeError, load_volume
from sim.phantom import Phantom, make_phantom

__all__ = ["Subject", "load_subject"]


@dataclass(frozen=True)
class Subject:
    """A CT in HU (world = LPS mm), its label map (TotalSegmentator ids, same grid) or
    None, and its screw plan (``guidance.plan/1`` trajectories) or None."""

    ct: Volume
    labels: Volume | None
    plan: list[dict] | None


def load_subject(ct: str | Path | Phantom | None = None, *, labels: str | Path | None = None,
                 plan: str | Path | None = None, phantom_seed: int = 0) -> Subject:
    """The subject of a CT file (or DICOM folder), a ``Phantom``, or (``ct`` None) the
    phantom of ``phantom_seed``; ``labels`` / ``plan`` files replace the phantom's own."""
    phantom = ct if isinstance(ct, Phantom) else make_phantom(seed=phantom_seed) if ct is None else None
    volume = phantom.ct if phantom is not None else load_volume(ct)
    label_map = load_volume(labels, units="label") if labels is not None else None
    if label_map is None and phantom is not None:
        label_map = phantom.labels
    if label_map is not None and label_map.data.shape != volume.data.shape:
        raise VolumeError(f"labels grid {label_map.data.shape} differs from the CT grid {volume.data.shape}")
    trajectories = read_plan(plan) if plan is not None else phantom.plan if phantom is not None else None
    return Subject(ct=volume, labels=label_map, plan=trajectories)
