"""Calibration accuracy benchmark on simulated noisy data, run through the same entry
points as real calibrations (calibration.cli) in a temporary folder.

Cases and targets:

- C-arm, one AP exposure (512 x 512 px, 0.6 mm, SDD about 1000 mm), ``n_trials`` seeds
  each, for a clean phantom image, with 10 % missing + 5 % spurious BBs, and with an
  anatomy-like background as well: worst SDD relative error (<= 0.5 %), worst principal
  point error (<= 1 px), worst reprojection RMS (<= 0.2 px);
- C-arm angle table (LAO -20/0/20 x cranial -10/0/10 deg, a sagging C-arm): mean
  projection distance of interpolated views at random in-between angles (<= 0.25 px);
- distortion, edge amplitude 5, 10, 15 px: held-out RMS (<= 0.1 px) and error against
  the true distortion (informative);
- pivot, 0.25 mm marker noise, 200 poses, ``n_pivot_trials`` seeds: RMS tip error of the
  linear and sphere solvers (<= 0.5 mm).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from calibration.cli import calibrate_carm, calibrate_distortion, calibrate_pivot

__all__ = ["run_calibration_benchmark", "format_table"]

CARM_CASES = (
    ("C-arm AP, clean phantom image", 0.0, 0.0, "plates"),
    ("C-arm AP, 10% missing + 5% spurious BBs", 0.1, 0.05, "plates"),
    ("C-arm AP, anatomy background, 10% missing + 5% spurious", 0.1, 0.05, "anatomy"),
)


def _row(case: str, metric: str, value: float, target: float | None) -> dict:
    """A benchmark row; lower values are better, ``target`` None for informative rows."""
    ok = None if target is None else bool(value <= target)
    return {"case": case, "metric": metric, "value": float(value), "target": target,
            "pass": ok}


def run_calibration_benchmark(seed: int = 0, *, n_trials: int = 5,
                              n_pivot_trials: int = 20) -> list[dict]:
    """Run every case; returns rows ``{"case", "metric", "value", "target", "pass"}``
    (``target`` None and ``pass`` None for informative rows)."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for case, missing, spurious, background in CARM_CASES:
            entries = [calibrate_carm(None, True, out / "carm.calibration.json", seed + k,
                                      missing_fraction=missing, spurious_fraction=spurious,
                                      background=background)["entries"][0]
                       for k in range(n_trials)]
            label = f"{case} ({n_trials} seeds, worst)"
            rows.append(_row(label, "SDD relative error (%)",
                             max(abs(e["sdd_error_pct"]) for e in entries), 0.5))
            rows.append(_row(label, "principal point error (px)",
                             max(e["principal_point_error_px"] for e in entries), 1.0))
            rows.append(_row(label, "reprojection RMS (px)",
                             max(e["rms_px"] for e in entries), 0.2))
        angles = [(a, c) for a in (-20.0, 0.0, 20.0) for c in (-10.0, 0.0, 10.0)]
        table = calibrate_carm(None, True, out / "table.calibration.json", seed, angles=angles)
        rows.append(_row("C-arm angle table 3x3, interpolated views", "mean projection "
                         "distance (px)", table["interpolation_mpd_px"], 0.25))
        rows.append(_row("C-arm angle table 3x3, per orientation (worst)",
                         "principal point error (px)",
                         max(e["principal_point_error_px"] for e in table["entries"]), None))
        for amplitude in (5.0, 10.0, 15.0):
            s = calibrate_distortion(None, True, out / "dist.calibration.json", seed,
                                     amplitude_px=amplitude)
            case = f"distortion, {amplitude:g} px at the edge, degree {s['degree']}"
            rows.append(_row(case, "held-out RMS (px)", s["heldout_rms_px"], 0.1))
            rows.append(_row(case, "RMS error vs truth (px)", s["truth_rms_px"], None))
        for method in ("linear", "sphere"):
            errors = [calibrate_pivot(None, True, out / "pivot.calibration.json", seed + k,
                                      method=method)["tip_error_mm"]
                      for k in range(n_pivot_trials)]
            rows.append(_row(f"pivot {method}, 0.25 mm marker noise, 200 poses "
                             f"({n_pivot_trials} seeds)", "RMS tip error (mm)",
                             float(np.sqrt(np.mean(np.square(errors)))), 0.5))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows."""
    lines = ["| case | metric | value | target | pass |", "|---|---|---:|---:|:---:|"]
    for r in rows:
        target = "-" if r["target"] is None else f"<= {r['target']:g}"
        ok = "-" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        lines.append(f"| {r['case']} | {r['metric']} | {r['value']:.4g} | {target} | {ok} |")
    return "\n".join(lines)
