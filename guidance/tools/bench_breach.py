"""`bench breach`: the breach warning against the phantom's exact geometry.

Many instrument paths per planned pedicle screw of the phantoms (seeds ``seed``,
``seed + 1``, ...: different anatomy): straight ones (in the corridor, drifting medially
or laterally by 0-6 mm, parallel or pivoting about the entry, wrong angles up to 15
degrees) and redirected ones (on the plan to a depth of 0-8 mm, then turned 5-15 degrees
medially or laterally, so the warning can only come after the turn). Each tip advances
from 10 mm before the entry to the planned depth in 1 mm steps with tracker noise; at each
step the corridor model (``guidance.navigation.breach``, built from the voxelised CT and
labels) predicts the breach of the planned screw along the instrument's line. The ground
truth of each path is the largest protrusion of the screw (a ball of the screw's radius
swept along the line, sampled in 64 directions) beyond the vertebra's analytic surface
(``Phantom.bone_signed_distance``), over the same stretch of the path, starting where the
planned screw first lies fully inside the true bone.

A breach counts as warned in time when the first warning comes no later than the breach
begins or, on a redirected path, no later than the first pose along the new direction
(the warning extends the instrument's current axis: no pose before the turn shows where
the turned path goes). ``warned_before_breach_over_2mm`` keeps the strict count.
"""

from __future__ import annotations

import math
import time

import numpy as np

from guidance.core.geometry import invert_rigid, rotation_about_axis, transform_points
from guidance.core.plan import trajectory_endpoints
from guidance.navigation.breach import (
    BREACH_WARNING_MM,
    breach_side,
    build_corridor,
    gertzbein_robbins_grade,
    predict_breach,
)

__all__ = ["bench_breach", "format_breach_table", "path_truth", "warned_in_time"]

_BALL = 64
_TRUTH_STEP_MM = 0.5
_START_BEFORE_ENTRY_MM = 10.0
_LEAD_TARGET_MM = 5.0
_STEP_MM = 1.0
"""Tip travel between two instrument poses."""


def _sphere_directions(n: int) -> np.ndarray:
    """n unit vectors spread evenly over the sphere (Fibonacci lattice)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    r = np.sqrt(1.0 - z * z)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def _truth_start(phantom, trajectory: dict, radius: float) -> float:
    """Depth past the entry (mm) where the planned screw first lies inside the true bone."""
    entry, target = trajectory_endpoints(trajectory)
    length = float(np.linalg.norm(target - entry))
    depths = np.arange(0.0, length, 0.25)
    points = entry + depths[:, None] * (target - entry) / length
    ball = (points[:, None, :] + radius * _sphere_directions(_BALL)[None]).reshape(-1, 3)
    worst = phantom.bone_signed_distance(trajectory["level"], ball).reshape(len(depths), _BALL).max(axis=1)
    inside = np.flatnonzero(worst <= 0.0)
    return float(depths[inside[0]]) if len(inside) else float(depths[int(np.argmin(worst))])


def path_truth(phantom, trajectory: dict, start_world: np.ndarray, axis_world: np.ndarray, radius: float,
               corridor_start_mm: float) -> dict:
    """Ground truth of a straight path: the swept screw's largest protrusion beyond the
    analytic bone (``breach_mm``), its grade and side, and the distance along the path
    from ``start_world`` to where the protrusion starts (``breach_at_mm``, None without)."""
    entry, target = trajectory_endpoints(trajectory)
    length = float(np.linalg.norm(target - entry))
    direction = (target - entry) / length
    cos = float(axis_world @ direction)
    depth0 = float((start_world - entry) @ direction)
    s = np.arange((corridor_start_mm - depth0) / cos, (length - depth0) / cos, _TRUTH_STEP_MM)
    s = np.append(s, (length - depth0) / cos)
    points = start_world + s[:, None] * axis_world
    dirs = _sphere_directions(_BALL)
    d = phantom.bone_signed_distance(trajectory["level"], (points[:, None, :] + radius * dirs[None]).reshape(-1, 3))
    d = d.reshape(len(s), _BALL)
    per_point = d.max(axis=1)
    worst = int(np.argmax(per_point))
    breach = max(0.0, float(per_point[worst]))
    side, at = None, None
    if breach > 0:
        T = invert_rigid(phantom.T_world_from_vertebra[trajectory["level"]])
        normal = T[:3, :3] @ dirs[int(np.argmax(d[worst]))]
        side = breach_side(normal, transform_points(T, points[worst][None])[0])
        at = float(s[int(np.argmax(per_point > 0))])
    return {"breach_mm": breach, "grade": gertzbein_robbins_grade(breach), "side": side, "breach_at_mm": at}


def _unit_perpendicular(v: np.ndarray, direction: np.ndarray) -> np.ndarray:
    v = v - (v @ direction) * direction
    return v / np.linalg.norm(v)


def _paths(trajectory: dict, T_world_from_vertebra: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Straight paths (start point at the entry's depth, unit axis) around one trajectory."""
    entry, target = trajectory_endpoints(trajectory)
    length = float(np.linalg.norm(target - entry))
    direction = (target - entry) / length
    x_v, z_v = T_world_from_vertebra[:3, 0], T_world_from_vertebra[:3, 2]
    sign = 1.0 if (entry - T_world_from_vertebra[:3, 3]) @ x_v > 0 else -1.0
    lateral = _unit_perpendicular(sign * x_v, direction)  # away from the midline
    paths = []

    def add(family: str, offset: np.ndarray, axis: np.ndarray) -> None:
        paths.append({"family": family, "start": entry + offset, "axis": axis / np.linalg.norm(axis)})

    for _ in range(6):
        r, phi = rng.uniform(0.0, 1.0), rng.uniform(0.0, 2 * math.pi)
        around = rotation_about_axis(direction, math.degrees(phi)) @ lateral
        tilt = rotation_about_axis(np.cross(direction, around), rng.uniform(0.0, 2.0)) @ direction
        add("corridor", r * around, tilt)
    for o in np.arange(-6.0, 6.01, 1.0):
        add("parallel medial/lateral", o * lateral, direction)
    for o in (-6.0, -4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 6.0):
        add("pivot medial/lateral", np.zeros(3), length * direction + o * lateral)
    for _ in range(10):
        phi = rng.uniform(0.0, 2 * math.pi)
        around = rotation_about_axis(direction, math.degrees(phi)) @ lateral
        add("wrong angle", rng.normal(0.0, 0.5, 3),
            rotation_about_axis(np.cross(direction, around), rng.uniform(3.0, 15.0)) @ direction)
    for o in (-4.0, -2.0, 2.0, 4.0):
        add("parallel cranial/caudal", o * _unit_perpendicular(z_v, direction), direction)
    for _ in range(10):
        sign = rng.choice([-1.0, 1.0])  # +1: lateral
        turn = rotation_about_axis(np.cross(direction, sign * lateral), rng.uniform(5.0, 15.0)) @ direction
        paths.append({"family": "redirected medial/lateral", "start": entry, "axis": direction,
                      "bend_depth_mm": float(rng.uniform(0.0, 8.0)), "turned_axis": turn})
    return paths


def _noisy(tip: np.ndarray, axis: np.ndarray, rng: np.random.Generator, noise_mm: float,
           noise_deg: float) -> tuple[np.ndarray, np.ndarray]:
    tip = tip + rng.normal(0.0, noise_mm / math.sqrt(3.0), 3)
    rot = rotation_about_axis(rng.normal(size=3), rng.normal(0.0, noise_deg))
    return tip, rot @ axis


def bench_breach(*, seed: int = 0, phantoms: int = 2, noise_mm: float = 0.25, noise_deg: float = 0.2,
                 warning_mm: float = BREACH_WARNING_MM) -> dict:
    """Run the benchmark (module docstring) on ``phantoms`` phantoms (seeds ``seed``,
    ``seed + 1``, ...); returns {"summary": {...}, "rows": [...]}."""
    from sim.phantom import make_phantom

    if phantoms < 1:
        raise ValueError(f"phantoms must be at least 1, got {phantoms}")
    rng = np.random.default_rng(seed)
    rows = []
    predict_s = []
    for phantom_seed in range(seed, seed + phantoms):
        phantom = make_phantom(seed=phantom_seed)
        for trajectory in phantom.plan:
            rows += _trajectory_rows(phantom, phantom_seed, trajectory, rng, noise_mm, noise_deg, warning_mm,
                                     predict_s)
    return {"summary": _summary(rows, predict_s, phantoms, noise_mm, noise_deg, warning_mm), "rows": rows}


def warned_in_time(warned_at_mm: float, breach_at_mm: float, direction_seen_at_mm: float) -> bool:
    """Whether a warning first raised at ``warned_at_mm`` of travel came in time for a
    breach beginning at ``breach_at_mm``: before it, or no later than the first pose along
    the path's current direction (``direction_seen_at_mm``: 0 for a straight path; on a
    redirected one, the first pose past the turn)."""
    return warned_at_mm <= max(breach_at_mm, direction_seen_at_mm)


def _trajectory_rows(phantom, phantom_seed: int, trajectory: dict, rng: np.random.Generator, noise_mm: float,
                     noise_deg: float, warning_mm: float, predict_s: list[float]) -> list[dict]:
    """One row per simulated path around ``trajectory`` (appends prediction times to ``predict_s``)."""
    frame = phantom.T_world_from_vertebra[trajectory["level"]]
    corridor = build_corridor(phantom.ct, phantom.labels, trajectory, T_world_from_vertebra=frame)
    radius = corridor.implant_radius_mm
    start_truth = _truth_start(phantom, trajectory, radius)
    entry, target = trajectory_endpoints(trajectory)
    length = float(np.linalg.norm(target - entry))
    direction = (target - entry) / length
    rows = []
    for path in _paths(trajectory, frame, rng):
        axis = path["axis"]
        cos = float(axis @ direction)
        origin = path["start"] - _START_BEFORE_ENTRY_MM / cos * axis
        if "bend_depth_mm" in path:  # on the plan to the bend, then along the turned axis
            bend_travel = _START_BEFORE_ENTRY_MM + path["bend_depth_mm"]
            bend = origin + bend_travel * axis
            axis2 = path["turned_axis"]
            truth = path_truth(phantom, trajectory, bend, axis2, radius, max(start_truth, path["bend_depth_mm"]))
            if truth["breach_at_mm"] is not None:
                truth["breach_at_mm"] += bend_travel
            end = bend_travel + (length - path["bend_depth_mm"]) / float(axis2 @ direction)
            seen_at = math.floor(bend_travel / _STEP_MM + 1.0) * _STEP_MM  # the first pose past the turn
        else:
            bend_travel, bend, axis2, seen_at = np.inf, None, axis, 0.0
            truth = path_truth(phantom, trajectory, origin, axis, radius, start_truth)
            end = (length - float((origin - entry) @ direction)) / cos
        first_warning, last = None, None
        for travel in np.arange(0.0, end + 1e-9, _STEP_MM):
            if travel <= bend_travel:
                true_tip, true_axis = origin + travel * axis, axis
            else:
                true_tip, true_axis = bend + (travel - bend_travel) * axis2, axis2
            tip, noisy_axis = _noisy(true_tip, true_axis, rng, noise_mm, noise_deg)
            t0 = time.perf_counter()
            last = predict_breach(corridor, tip, noisy_axis, warning_mm=warning_mm)
            predict_s.append(time.perf_counter() - t0)
            if last is not None and last.warning and first_warning is None:
                first_warning = float(travel)
        lead, in_time = None, False
        if truth["breach_at_mm"] is not None and first_warning is not None:
            lead = truth["breach_at_mm"] - first_warning
            in_time = warned_in_time(first_warning, truth["breach_at_mm"], seen_at)
        rows.append({
            "phantom_seed": phantom_seed, "level": trajectory["level"], "side": trajectory["side"],
            "family": path["family"], "true_breach_mm": truth["breach_mm"], "true_grade": truth["grade"],
            "true_side": truth["side"], "true_breach_at_mm": truth["breach_at_mm"],
            "warned": first_warning is not None, "turned_at_mm": None if bend is None else bend_travel,
            "direction_seen_at_mm": seen_at, "warned_at_mm": first_warning, "lead_mm": lead,
            "warned_in_time": in_time,
            "predicted_breach_mm": None if last is None else last.breach_mm,
            "predicted_grade": None if last is None else last.grade,
            "predicted_side": None if last is None else last.side,
        })
    return rows


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def _summary(rows: list[dict], predict_s: list[float], phantoms: int, noise_mm: float, noise_deg: float,
             warning_mm: float) -> dict:
    positives = [r for r in rows if r["true_breach_mm"] > 2.0]
    negatives = [r for r in rows if r["true_breach_mm"] <= 0.0]
    grade_b = [r for r in rows if 0.0 < r["true_breach_mm"] <= 2.0]
    leads = np.array([r["lead_mm"] for r in positives if r["lead_mm"] is not None])
    redirected = [r for r in positives if r["family"].startswith("redirected")]
    redirected_leads = [r["lead_mm"] for r in redirected if r["lead_mm"] is not None]
    # A warning 5 mm ahead is possible only when the turn comes at least 5 mm (plus one
    # sampling step) before the breach starts.
    possible = [r for r in redirected if r["true_breach_at_mm"] - r["turned_at_mm"] >= _LEAD_TARGET_MM + _STEP_MM]
    foreseeable = [r for r in positives if not r["family"].startswith("redirected")] + possible
    with_side = [r for r in positives if r["predicted_side"] is not None]
    grades = "ABCDE"
    graded = [r for r in rows if r["predicted_grade"] is not None]
    return {
        "phantoms": phantoms,
        "paths": len(rows),
        "breaches_over_2mm": len(positives),
        "no_breach": len(negatives),
        "grade_b": len(grade_b),
        "sensitivity_over_2mm": _rate([r["warned_in_time"] for r in positives]),
        "warned_before_breach_over_2mm": _rate([r["lead_mm"] is not None and r["lead_mm"] >= 0 for r in positives]),
        "sensitivity_over_2mm_lead_5mm": _rate([r["lead_mm"] is not None and r["lead_mm"] >= _LEAD_TARGET_MM
                                                for r in positives]),
        "lead_5mm_where_the_path_allows": _rate([r["lead_mm"] is not None and r["lead_mm"] >= _LEAD_TARGET_MM
                                                 for r in foreseeable]),
        "specificity": _rate([not r["warned"] for r in negatives]),
        "warned_grade_b": _rate([r["warned"] for r in grade_b]),
        "lead_min_mm": float(leads.min()) if len(leads) else float("nan"),
        "lead_median_mm": float(np.median(leads)) if len(leads) else float("nan"),
        "redirected_over_2mm": len(redirected),
        "redirected_lead_5mm": _rate([r["lead_mm"] is not None and r["lead_mm"] >= _LEAD_TARGET_MM
                                      for r in redirected]),
        "redirected_turned_6mm_before_breach": len(possible),
        "redirected_lead_5mm_of_those": _rate([r["lead_mm"] is not None and r["lead_mm"] >= _LEAD_TARGET_MM
                                               for r in possible]),
        "redirected_lead_min_mm": float(min(redirected_leads)) if redirected_leads else float("nan"),
        "redirected_lead_median_mm": float(np.median(redirected_leads)) if redirected_leads else float("nan"),
        "side_agreement_over_2mm": _rate([r["predicted_side"] == r["true_side"] for r in with_side]),
        "grade_exact": _rate([r["predicted_grade"] == r["true_grade"] for r in graded]),
        "grade_within_one": _rate([abs(grades.index(r["predicted_grade"]) - grades.index(r["true_grade"])) <= 1
                                   for r in graded]),
        "breach_error_median_mm": float(np.median([abs(r["predicted_breach_mm"] - r["true_breach_mm"])
                                                   for r in graded])) if graded else float("nan"),
        "predict_p50_ms": float(np.percentile(predict_s, 50) * 1e3) if predict_s else float("nan"),
        "tracker_noise_mm": noise_mm,
        "tracker_noise_deg": noise_deg,
        "warning_threshold_mm": warning_mm,
    }


def format_breach_table(result: dict) -> str:
    """The summary as a markdown table, and the paths per family and true grade."""
    lines = ["| measure | value |", "|---|---|"]
    for k, v in result["summary"].items():
        lines.append(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |")
    families = sorted({r["family"] for r in result["rows"]})
    lines += ["", "| family | paths | true A | true B | true C-E | warned |", "|---|---|---|---|---|---|"]
    for f in families:
        rs = [r for r in result["rows"] if r["family"] == f]
        count = {g: sum(r["true_grade"] == g for r in rs) for g in "ABCDE"}
        lines.append(f"| {f} | {len(rs)} | {count['A']} | {count['B']} | {count['C'] + count['D'] + count['E']} | "
                     f"{sum(r['warned'] for r in rs)} |")
    return "\n".join(lines)
