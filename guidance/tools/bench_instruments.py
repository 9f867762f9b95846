"""``run_guidance.py bench instruments``: instruments found in simulated X-rays, against truth.

The simulator (``sim.scenario``) renders the phantom's anatomy with K-wires on planned
pedicle trajectories (seeded patient misplacement and breathing, Poisson noise, detector
blur), as an AP and a lateral view of one moment, every other case with a Jamshidi
needle on the contralateral pedicle as well (overlapping instruments). Each frame's
registered view (the actual ``T_cam_from_world``) is given to the detector, as the
pipeline would after registration. Measured:

- biplane: 3D tip error (mm) and axis error (deg) of every instrument present;
- single view: in-plane tip error (mm: the true tip's distance from the detected tip's
  ray), the 3D tip error (depth from the anatomy in the AP view; in the lateral view, whose
  ray crosses the spine, the depth is reported unknown) and whether it lies within 3
  reported sigmas;
- time (ms, wall clock and process CPU) per view (detection and single-view pose,
  looking for both models);
- false detections on instrument-free frames (AP, lateral and obliques);
- near the C-arm's rotation plane: the demo's K-wire (L3 left, turned 8 deg medially, so
  it lies almost in the plane through the AP and lateral sources, where the two views'
  shaft planes nearly coincide), AP and lateral of one moment, each view's detection
  combined as the pipeline combines a frame with a kept shot
  (``combine_with_earlier_view``: the tip rays, the wire known not to have moved): tip and
  axis error against the reported sigmas; and the same with the lateral taken
  ``NEAR_PLANE_MOVED_MM`` earlier in the advance: refused when the travel is unknown, and
  with the travel bound given, how often the error lies within 3 reported sigmas.
"""

from __future__ import annotations

import math
import time

import numpy as np

from guidance.core.geometry import backproject
from guidance.core.images import preprocess
from guidance.core.instrument_models import get_instrument
from guidance.core.levels import LUMBAR
from guidance.core.plan import trajectory_endpoints
from guidance.core.views import View
from guidance.navigation.detection import (
    DetectionSettings,
    InstrumentEstimate,
    combine_with_earlier_view,
    detect_in_view,
    detect_instruments,
    single_view_estimate,
)
from guidance.navigation.instruments import tip_and_axis
from guidance.tools.bench import DETECTOR_WIDTH_MM
from sim.phantom import Phantom, make_phantom
from sim.scenario import START_OUTSIDE_MM, Scenario, ScenarioPlayer, tool_pose_on_trajectory

__all__ = ["VIEW_ANGLES", "FREE_ANGLES", "bench_instruments", "format_instrument_table"]

VIEW_ANGLES = {"AP": (0.0, 0.0), "lateral": (90.0, 0.0)}
"""(LAO, cranial) of the biplane pair."""
FREE_ANGLES = ((0.0, 0.0), (90.0, 0.0), (20.0, 0.0), (-30.0, 10.0), (60.0, -10.0))
"""C-arm angles of the instrument-free frames."""
TIP_DEPTHS_MM = (-8.0, 5.0, 18.0, 30.0)
"""Tip positions past the entry point along the trajectory (negative: not yet in bone)."""
NEAR_PLANE_CASE = {"target_level": "L3", "target_side": "left", "instrument_medial_deg": 8.0}
"""The demo's K-wire path (``run_guidance.py demo``), whose axis lies near the C-arm's rotation plane."""
NEAR_PLANE_MOVED_MM = 6.0
"""How far the K-wire advanced between the lateral and the AP view in the bench's moved pairs."""
MATCH_MM = 10.0
"""A true instrument counts as found when an estimate of its model lies within this of its tip."""


def _frame(player: ScenarioPlayer, t_s: float, angles: tuple[float, float], extra, noise_offset: int):
    """(line-integral image, registered view) of the scenario at ``t_s`` from ``angles``."""
    frame, view = player.shot_at(t_s, *angles, noise_offset=noise_offset, extra_instruments=extra)
    return preprocess(frame.pixels, view).image, view


def _axis_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip(np.dot(a, b), -1.0, 1.0))))


def _match(truth: list[tuple[str, np.ndarray, np.ndarray]], estimates: list[InstrumentEstimate]):
    """For each true (model name, tip, axis): the nearest estimate of that model within MATCH_MM, or None."""
    out = []
    for name, tip, _ in truth:
        options = [e for e in estimates if e.model.name == name and np.linalg.norm(e.tip_world - tip) <= MATCH_MM]
        out.append(min(options, key=lambda e: np.linalg.norm(e.tip_world - tip)) if options else None)
    return out


def _in_plane_error(view: View, tip_uv: np.ndarray, tip_world: np.ndarray) -> float:
    source, rays = backproject(view.K, view.T_cam_from_world, tip_uv[None])
    return float(np.linalg.norm(np.cross(tip_world - source, rays[0])))


def bench_instruments(*, cases: int = 40, free_frames: int = 100, near_plane_cases: int = 8, detector_px: int = 512,
                      pixel_spacing_mm: float | None = None, phantom: Phantom | None = None, seed: int = 0,
                      settings: DetectionSettings | None = None) -> dict:
    """Run the benchmark; returns {"summary": {...}, "cases": [...], "free": [...], "near_plane": [...]}.

    ``cases`` biplane cases cycle through levels and ``TIP_DEPTHS_MM`` together, then sides (odd cases
    add a contralateral Jamshidi needle); ``free_frames`` instrument-free frames cycle
    through ``FREE_ANGLES`` and levels; ``near_plane_cases`` pairs on ``NEAR_PLANE_CASE``
    cycle through ``TIP_DEPTHS_MM`` and seeds; the detector is ``detector_px``^2 pixels of
    ``pixel_spacing_mm`` (default: a 307.2 mm wide detector).
    """
    settings = settings or DetectionSettings()
    pixel_spacing_mm = DETECTOR_WIDTH_MM / detector_px if pixel_spacing_mm is None else pixel_spacing_mm
    phantom = phantom or make_phantom(seed=seed, spacing_mm=1.0)
    bone = phantom.labels
    kwire, needle = get_instrument("kwire"), get_instrument("jamshidi")
    models = (kwire, needle)
    levels = [lv for lv in LUMBAR if lv in phantom.levels]
    players: dict[tuple, ScenarioPlayer] = {}

    def player_for(level: str, side: str, instrument: str | None, case_seed: int) -> ScenarioPlayer:
        key = (level, side, instrument, case_seed)
        if key not in players:
            scenario = Scenario(detector_px=detector_px, pixel_spacing_mm=pixel_spacing_mm, instrument=instrument,
                                target_level=level, target_side=side, seed=case_seed, advance_mm_per_s=3.0)
            players[key] = ScenarioPlayer(scenario, phantom)
        return players[key]

    rows = []
    for i in range(cases):
        level = levels[i % len(levels)]
        depth = TIP_DEPTHS_MM[i % len(TIP_DEPTHS_MM)]
        side = ("left", "right")[(i // (len(levels) * len(TIP_DEPTHS_MM))) % 2]
        player = player_for(level, side, "kwire", seed + i)
        t_s = (depth + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
        state = player.state_at(t_s)
        truth = [("kwire", *tip_and_axis(state.T_world_from_tool, kwire))]
        extra = ()
        if i % 2 == 1:
            other = next(t for t in phantom.plan if t["level"] == level and t["side"] != side)
            entry, target = trajectory_endpoints(other)
            T_needle = tool_pose_on_trajectory(entry, target, 10.0, needle)
            extra = ((needle, T_needle),)
            truth.append(("jamshidi", *tip_and_axis(T_needle, needle)))
        images, views = [], []
        for k, angles in enumerate(VIEW_ANGLES.values()):
            image, view = _frame(player, t_s, angles, extra, k)
            images.append(image)
            views.append(view)
        focus = player.isocenter_world
        row = {"case": i, "level": level, "side": side, "depth_mm": depth, "instruments": len(truth)}
        # Single views: the primary K-wire, timed when it is alone.
        for name, image, view in zip(VIEW_ANGLES, images, views):
            t0, c0 = time.perf_counter(), time.process_time()
            found = detect_in_view(image, view, models, focus, settings=settings)
            estimates = [single_view_estimate(d, view, focus_world=focus, bone=bone, settings=settings) for d in found]
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            row[f"{name}_cpu_ms"] = (time.process_time() - c0) * 1e3
            tip = truth[0][1]
            options = [(_in_plane_error(view, e.detections[0].tip_uv, tip), e) for e in estimates
                       if e.model.name == "kwire"]
            options = [o for o in options if o[0] <= MATCH_MM]
            row[f"{name}_found"] = bool(options)
            row[f"{name}_ms"] = elapsed_ms
            if options:
                in_plane, match = min(options, key=lambda o: o[0])
                row[f"{name}_in_plane_mm"] = in_plane
                row[f"{name}_score"] = match.score
                row[f"{name}_gain"] = match.detections[0].gain
                row[f"{name}_depth_error_mm"] = float(np.linalg.norm(match.tip_world - tip))
                row[f"{name}_within_3_sigma"] = bool(
                    row[f"{name}_depth_error_mm"] <= 3.0 * math.hypot(match.tip_sigma_mm, match.depth_sigma_mm))
        t0 = time.perf_counter()
        estimates = detect_instruments(images, views, models, focus_world=focus, bone=bone, settings=settings)
        row["biplane_ms"] = (time.perf_counter() - t0) * 1e3
        row["estimates"] = len(estimates)
        for j, ((name, tip, axis), est) in enumerate(zip(truth, _match(truth, estimates))):
            prefix = "biplane" if j == 0 else "second"
            row[f"{prefix}_found"] = est is not None and est.n_views >= 2
            if est is not None and est.n_views >= 2:
                row[f"{prefix}_tip_mm"] = float(np.linalg.norm(est.tip_world - tip))
                row[f"{prefix}_axis_deg"] = _axis_error_deg(est.axis_world, axis)
        rows.append(row)

    free = []
    for i in range(free_frames):
        level = levels[i % len(levels)]
        angles = FREE_ANGLES[(i // len(levels)) % len(FREE_ANGLES)]
        player = player_for(level, "left", None, seed + 1000 + i)
        image, view = _frame(player, 1.0 + 0.37 * i, angles, (), 0)
        found = detect_in_view(image, view, models, player.isocenter_world, settings=settings)
        free.append({"frame": i, "level": level, "angles": list(angles), "detections": len(found),
                     "scores": [round(d.gradient_correlation, 3) for d in found],
                     "gains": [round(d.gain, 3) for d in found]})
    near = [_near_plane_case(phantom, detector_px, pixel_spacing_mm, TIP_DEPTHS_MM[i % len(TIP_DEPTHS_MM)],
                             seed + 2000 + i // len(TIP_DEPTHS_MM), settings) for i in range(near_plane_cases)]
    summary = _summary(rows, free, detector_px, pixel_spacing_mm) | _near_plane_summary(near)
    return {"summary": summary, "cases": rows, "free": free, "near_plane": near}


def _near_plane_case(phantom: Phantom, detector_px: int, pixel_spacing_mm: float, depth_mm: float, case_seed: int,
                     settings: DetectionSettings) -> dict:
    """One ``NEAR_PLANE_CASE`` pair: the AP view's K-wire combined with the lateral's (one
    moment, then the lateral ``NEAR_PLANE_MOVED_MM`` earlier), against the truth."""
    kwire = get_instrument("kwire")
    player = ScenarioPlayer(Scenario(detector_px=detector_px, pixel_spacing_mm=pixel_spacing_mm, seed=case_seed,
                                     **NEAR_PLANE_CASE), phantom)
    focus = player.isocenter_world

    def found(t_s: float, angles: tuple[float, float], noise_offset: int):
        image, view = _frame(player, t_s, angles, (), noise_offset)
        detections = detect_in_view(image, view, [kwire], focus, settings=settings)
        return (detections[0] if detections else None), view

    t_s = (depth_mm + START_OUTSIDE_MM) / player.scenario.advance_mm_per_s
    tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, kwire)
    (ap, ap_view), (lateral, lateral_view) = found(t_s, VIEW_ANGLES["AP"], 0), found(t_s, VIEW_ANGLES["lateral"], 1)
    row = {"depth_mm": depth_mm, "seed": case_seed, "found": ap is not None and lateral is not None}
    if not row["found"]:
        return row
    row["planes_alone"] = combine_with_earlier_view(ap, ap_view, lateral, lateral_view) is not None
    still = combine_with_earlier_view(ap, ap_view, lateral, lateral_view, moved_mm=0.0)
    row["combined"] = still is not None
    if still is not None:
        row |= _scored("still", still, tip, axis)
    then_s = t_s - NEAR_PLANE_MOVED_MM / player.scenario.advance_mm_per_s
    earlier, earlier_view = found(then_s, VIEW_ANGLES["lateral"], 1)
    if earlier is not None:
        row["moved_unknown_combined"] = combine_with_earlier_view(ap, ap_view, earlier, earlier_view) is not None
        bounded = combine_with_earlier_view(ap, ap_view, earlier, earlier_view, moved_mm=NEAR_PLANE_MOVED_MM)
        row["moved_bounded_combined"] = bounded is not None
        if bounded is not None:
            row |= _scored("moved", bounded, tip, axis)
    return row


def _scored(prefix: str, estimate: InstrumentEstimate, tip: np.ndarray, axis: np.ndarray) -> dict:
    """Tip and axis errors of an estimate and its reported sigmas; whether the tip lies
    within 3 sigma (tip error against the root sum of squares of its in-plane and depth sigmas)."""
    tip_mm = float(np.linalg.norm(estimate.tip_world - tip))
    return {f"{prefix}_tip_mm": tip_mm, f"{prefix}_axis_deg": _axis_error_deg(estimate.axis_world, axis),
            f"{prefix}_depth_sigma_mm": estimate.depth_sigma_mm, f"{prefix}_axis_sigma_deg": estimate.axis_sigma_deg,
            f"{prefix}_within_3_sigma": tip_mm <= 3.0 * math.hypot(estimate.tip_sigma_mm, estimate.depth_sigma_mm)}


def _near_plane_summary(near: list[dict]) -> dict:
    out = {"near_plane_cases": len(near)}
    for key in ("still_tip_mm", "still_axis_deg", "still_depth_sigma_mm", "still_axis_sigma_deg", "moved_tip_mm",
                "moved_depth_sigma_mm"):
        out["near_plane_" + key + "_median"], out["near_plane_" + key + "_p90"] = _stats(near, key)
    for key in ("found", "planes_alone", "combined", "still_within_3_sigma", "moved_unknown_combined",
                "moved_bounded_combined", "moved_within_3_sigma"):
        present = [r[key] for r in near if key in r]
        out[f"near_plane_{key}_rate"] = float(np.mean(present)) if present else math.nan
    return out


def _stats(rows: list[dict], key: str) -> tuple[float, float]:
    values = np.array([r[key] for r in rows if key in r], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    return float(np.median(values)), float(np.percentile(values, 90))


def _summary(rows: list[dict], free: list[dict], detector_px: int, pixel_spacing_mm: float) -> dict:
    n = len(rows)
    out = {"detector": f"{detector_px} px x {pixel_spacing_mm} mm", "cases": n, "free_frames": len(free)}
    for key in ("biplane_tip_mm", "biplane_axis_deg", "second_tip_mm", "second_axis_deg",
                "AP_in_plane_mm", "lateral_in_plane_mm", "AP_depth_error_mm", "lateral_depth_error_mm",
                "AP_ms", "lateral_ms", "AP_cpu_ms", "lateral_cpu_ms", "biplane_ms"):
        out[key + "_median"], out[key + "_p90"] = _stats(rows, key)
    one = [r for r in rows if r["instruments"] == 1]
    two = [r for r in rows if r["instruments"] == 2]
    for name in ("AP", "lateral"):
        for suffix, subset in (("one_instrument", one), ("two_instruments", two)):
            out[f"{name}_ms_{suffix}_median"] = _stats(subset, f"{name}_ms")[0]
            out[f"{name}_cpu_ms_{suffix}_median"] = _stats(subset, f"{name}_cpu_ms")[0]
    for key in ("biplane_found", "second_found", "AP_found", "lateral_found", "AP_within_3_sigma",
                "lateral_within_3_sigma"):
        for suffix, subset in (("", rows), ("_one_instrument", one), ("_two_instruments", two)):
            present = [r[key] for r in subset if key in r]
            out[key + "_rate" + suffix] = float(np.mean(present)) if present else math.nan
    frames_with_false = sum(1 for f in free if f["detections"] > 0)
    out["false_detection_rate"] = frames_with_false / len(free) if free else math.nan
    return out


_TABLE = (
    ("biplane tip error (mm)", "biplane_tip_mm"),
    ("biplane axis error (deg)", "biplane_axis_deg"),
    ("2nd instrument tip error (mm)", "second_tip_mm"),
    ("2nd instrument axis error (deg)", "second_axis_deg"),
    ("AP in-plane tip error (mm)", "AP_in_plane_mm"),
    ("lateral in-plane tip error (mm)", "lateral_in_plane_mm"),
    ("AP tip error, depth from anatomy (mm)", "AP_depth_error_mm"),
    ("lateral tip error, depth unknown (mm)", "lateral_depth_error_mm"),
    ("time per view, AP (ms)", "AP_ms"),
    ("time per view, lateral (ms)", "lateral_ms"),
    ("CPU time per view, AP (ms)", "AP_cpu_ms"),
    ("CPU time per view, lateral (ms)", "lateral_cpu_ms"),
    ("time biplane, all instruments (ms)", "biplane_ms"),
)


def _median_p90_rows(summary: dict, rows, prefix: str = "") -> list[str]:
    """Table rows "| label | median | p90 |" of the summary's ``{prefix}{key}_median`` / ``_p90``."""
    return [f"| {label} | {summary[f'{prefix}{key}_median']:.2f} | {summary[f'{prefix}{key}_p90']:.2f} |"
            for label, key in rows]


def format_instrument_table(summary: dict) -> str:
    """A Markdown table of the summary: median and p90 per measure, then the rates."""
    lines = [f"detector {summary['detector']}, {summary['cases']} biplane cases, "
             f"{summary['free_frames']} instrument-free frames", "",
             "| measure | median | p90 |", "|---|---|---|"]
    lines += _median_p90_rows(summary, _TABLE)
    lines += ["", "| CPU time per view (ms, median) | K-wire alone | with the needle |", "|---|---|---|"]
    for name in ("AP", "lateral"):
        lines.append(f"| {name} | {summary[f'{name}_cpu_ms_one_instrument_median']:.0f} | "
                     f"{summary[f'{name}_cpu_ms_two_instruments_median']:.0f} |")
    lines += ["", "| rate | all cases | K-wire alone | with the needle |", "|---|---|---|---|"]
    for label, key in (("K-wire found in both views", "biplane_found_rate"),
                       ("2nd instrument found in both views", "second_found_rate"),
                       ("K-wire found, AP alone", "AP_found_rate"),
                       ("K-wire found, lateral alone", "lateral_found_rate"),
                       ("AP alone: tip within 3 reported sigmas (depth from anatomy)", "AP_within_3_sigma_rate"),
                       ("lateral alone: tip within 3 reported sigmas (depth unknown)",
                        "lateral_within_3_sigma_rate")):
        rates = (summary[key], summary[key + "_one_instrument"], summary[key + "_two_instruments"])
        lines.append(f"| {label} | " + " | ".join("-" if np.isnan(r) else f"{r:.3f}" for r in rates) + " |")
    lines.append(f"| instrument-free frames with a detection | {summary['false_detection_rate']:.3f} | | |")
    if summary.get("near_plane_cases"):
        lines += ["", f"Near the C-arm's rotation plane ({summary['near_plane_cases']} AP + lateral pairs, the demo's "
                  "K-wire; the AP detection combined with the lateral one):", "",
                  "| measure | median | p90 |", "|---|---|---|"]
        lines += _median_p90_rows(summary, (
            ("tip error, wire at rest (mm)", "still_tip_mm"),
            ("axis error, wire at rest (deg)", "still_axis_deg"),
            ("reported depth sigma, wire at rest (mm)", "still_depth_sigma_mm"),
            ("reported axis sigma, wire at rest (deg)", "still_axis_sigma_deg"),
            (f"tip error, moved {NEAR_PLANE_MOVED_MM:g} mm, travel bound given (mm)", "moved_tip_mm"),
            (f"reported depth sigma, moved {NEAR_PLANE_MOVED_MM:g} mm (mm)", "moved_depth_sigma_mm")), "near_plane_")
        lines += ["", "| rate | |", "|---|---|"]
        for label, key in (("found in both views", "found"),
                           ("combined by the shaft planes alone (travel unknown)", "planes_alone"),
                           ("combined, wire at rest", "combined"),
                           ("wire at rest: tip error within 3 reported sigmas", "still_within_3_sigma"),
                           ("moved, travel unknown: combined (should be 0)", "moved_unknown_combined"),
                           ("moved, travel bound given: combined", "moved_bounded_combined"),
                           ("moved, travel bound given: tip error within 3 reported sigmas", "moved_within_3_sigma")):
            lines.append(f"| {label} | {summary[f'near_plane_{key}_rate']:.3f} |")
    return "\n".join(lines)
