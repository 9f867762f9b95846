"""Simulated intra-operative CT / CBCT: the pre-operative CT as an intra-op scanner sees
it after the patient moved.

A CBCT differs from the pre-operative CT in four ways modelled here: the anatomy has
moved (a known rigid motion), the scanner reconstructs on its own grid (another
spacing, a smaller field of view centred on the region of interest), its intensity
calibration differs (gain and offset on the CT numbers) and it is noisier (Gaussian
noise in HU). Frames: the intra-op volume lives in the scanner's LPS frame; a CT point
X (pre-op world) lies at ``T_scanner_from_world @ X`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guidance.core.volume import Volume, resample, transform_volume
from sim.scenario import ScenarioPlayer

__all__ = ["CBCT_GAIN", "CBCT_OFFSET_HU", "CBCT_NOISE_HU", "INTRAOP_SPACING_MM", "INTRAOP_FOV_MM", "cbct_like",
           "IntraopScan", "intraop_scan"]

CBCT_GAIN = 0.9
"""Intra-op CT number per pre-op CT number (the scanner's other calibration)."""
CBCT_OFFSET_HU = 30.0
"""Offset of the intra-op CT numbers (HU)."""
CBCT_NOISE_HU = 20.0
"""Standard deviation of the Gaussian noise of the intra-op volume (HU)."""


def cbct_like(ct: Volume, T_scanner_from_world: np.ndarray, seed: int, *, spacing_mm: float | None = None,
              fov_mm: float | None = None, centre_scanner: np.ndarray | None = None) -> Volume:
    """The CT ``ct`` (HU) moved by ``T_scanner_from_world`` and scanned like a CBCT.

    Without ``spacing_mm`` / ``fov_mm`` the volume keeps the CT's grid; with them it is
    resampled onto an isotropic grid of ``spacing_mm`` covering a cube of ``fov_mm``
    centred on ``centre_scanner`` (scanner frame, mm; default: the CT's centre), air
    outside the CT. Then ``CBCT_GAIN * HU + CBCT_OFFSET_HU`` plus seeded Gaussian noise
    of ``CBCT_NOISE_HU``; float32 HU.
    """
    moved = transform_volume(ct, T_scanner_from_world)
    if spacing_mm is not None or fov_mm is not None:
        spacing = float(spacing_mm if spacing_mm is not None else ct.spacing.min())
        centre = moved.center_world() if centre_scanner is None else np.asarray(centre_scanner, dtype=float)
        if fov_mm is None:
            extent = moved.corners_world().max(axis=0) - moved.corners_world().min(axis=0)
            fov_mm = float(extent.max())
        n = int(round(fov_mm / spacing)) + 1
        origin = centre - (n - 1) / 2.0 * spacing
        moved = resample(moved, spacing=(spacing,) * 3, size=(n, n, n), origin=origin, direction=np.eye(3))
    noise = np.random.default_rng(seed).normal(0.0, CBCT_NOISE_HU, moved.data.shape).astype(np.float32)
    return moved.with_data((CBCT_GAIN * moved.data + CBCT_OFFSET_HU + noise).astype(np.float32))


INTRAOP_SPACING_MM = 1.25
"""Voxel size of the simulated intra-op scan (mm, isotropic)."""
INTRAOP_FOV_MM = 160.0
"""Side of the simulated intra-op scan's cubic field of view (mm), centred on the target vertebra."""


@dataclass(frozen=True)
class IntraopScan:
    """A simulated intra-op scan: ``volume`` (HU, scanner LPS frame), the scanner in the
    tracker frame ``T_tracker_from_scanner`` (exact), and the truth
    ``T_scanner_from_world`` (pre-op CT point -> scanner frame)."""

    t_s: float
    volume: Volume
    T_tracker_from_scanner: np.ndarray
    T_scanner_from_world: np.ndarray


def intraop_scan(player: ScenarioPlayer, ct: Volume, t_s: float) -> IntraopScan:
    """The CBCT-like scan of a scenario's patient at scenario time ``t_s``: the scanner's
    frame is the scenario's nominal world (the frame the C-arm views and the tracker are
    calibrated in), where the anatomy lies moved by ``player.patient_motion(t_s)``."""
    M = player.patient_motion(t_s)
    volume = cbct_like(ct, M, player.scenario.seed, spacing_mm=INTRAOP_SPACING_MM, fov_mm=INTRAOP_FOV_MM,
                       centre_scanner=player.isocenter_world)
    return IntraopScan(t_s=t_s, volume=volume, T_tracker_from_scanner=player.T_tracker_from_room.copy(),
                       T_scanner_from_world=M)
