"""Benchmarks behind ``run_guidance.py bench ...``: each returns rows and prints a table.

Benchmarks measure; tests assert. Figures go to docs/benchmarks.md with the command
that produced them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guidance.drr import prepare_volume, render_drr
from guidance.views import View, carm_view
from guidance.volume import Volume, hu_to_attenuation, load_volume, resample

__all__ = ["DrrBenchRow", "bench_drr", "format_table", "clinical_grid"]

log = logging.getLogger(__name__)

DETECTOR_SIZES = (128, 256, 512)
DETECTOR_WIDTH_MM = 307.2


@dataclass(frozen=True)
class DrrBenchRow:
    """Median and p90 time (ms) of one DRR of ``volume`` at ``detector_px``^2."""

    volume: str
    grid: str
    renderer: str
    detector_px: int
    median_ms: float
    p90_ms: float
    repeats: int


def clinical_grid(volume: Volume) -> Volume:
    """The volume resampled onto a typical clinical CT grid: 512 x 512 x 133 voxels of
    0.7 x 0.7 x 2.5 mm, centred on the volume (air where the volume has no data)."""
    spacing = np.array([0.7, 0.7, 2.5])
    size = np.array([512, 512, 133])
    origin = volume.center_world() - volume.direction @ ((size - 1) / 2.0 * spacing)
    return resample(volume, spacing=tuple(spacing), size=tuple(int(s) for s in size), origin=origin,
                    direction=volume.direction)


def _ap_view(volume: Volume, detector_px: int) -> View:
    """Prone AP shot through the volume centre, 1000 mm SDD, 600 mm to the isocentre."""
    pitch = DETECTOR_WIDTH_MM / detector_px
    return carm_view(isocenter_world=volume.center_world(), patient_position="prone",
                     detector_size_px=(detector_px, detector_px), pixel_spacing_mm=(pitch, pitch))


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times)), float(np.percentile(times, 90))


def bench_drr(*, shared_data: Path | None = None, repeats: int = 20, sizes=DETECTOR_SIZES) -> list[DrrBenchRow]:
    """Time DRRs of the embedded phantom (1 mm), the phantom on a 512x512x133 clinical
    grid, and the real CTs of ``shared_data`` when present (native and clinical grid)."""
    from sim.phantom import make_phantom

    volumes: list[tuple[str, Volume]] = []
    phantom = make_phantom(seed=0).ct
    volumes.append(("phantom", phantom))
    volumes.append(("phantom", clinical_grid(phantom)))
    if shared_data is not None and shared_data.is_dir():
        abdomen = shared_data / "ct_abdomen_3mm.nii.gz"
        if abdomen.exists():
            ct = load_volume(abdomen)
            volumes.append(("ct_abdomen_3mm", ct))
            volumes.append(("ct_abdomen_3mm", clinical_grid(ct)))
        series = shared_data / "ct_dicom_series"
        if series.is_dir():
            volumes.append(("ct_dicom_series", load_volume(series)))
    else:
        log.warning("real CT folder %s absent: benchmarking the phantom only", shared_data)
    rows = []
    for name, hu in volumes:
        grid = "x".join(str(n) for n in hu.size_ijk) + " @ " + "x".join(f"{s:.2g}" for s in hu.spacing) + " mm"
        dv = prepare_volume(hu_to_attenuation(hu))
        for n in sizes:
            view = _ap_view(hu, n)
            out = np.empty(view.shape, np.float32)
            med, p90 = _time(lambda: render_drr(dv, view, out=out), repeats)
            rows.append(DrrBenchRow(name, grid, "guidance (numba)", n, med, p90, repeats))
    return rows


def format_table(rows: list[DrrBenchRow]) -> str:
    """Markdown table of DRR benchmark rows."""
    lines = ["| volume | grid | renderer | detector | median ms | p90 ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.volume} | {r.grid} | {r.renderer} | {r.detector_px}² | {r.median_ms:.1f} | "
                     f"{r.p90_ms:.1f} |")
    return "\n".join(lines)
