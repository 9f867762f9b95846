"""Surgical plans: the guidance.plan/1 schema, its one validator and plan files.

A plan is a list of trajectories, each a dict with ``level`` (name), ``label``
(TotalSegmentator id), ``side`` (left/right), ``entry_world`` and ``target_world``
(LPS mm of the pre-op CT) and ``screw_diameter_mm``; unknown keys are kept. On disk it
is ``{"schema": "guidance.plan/1", "trajectories": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.jsonfile import read_json_as
from guidance.core.levels import LEVEL_LABELS

__all__ = [
    "PLAN_SCHEMA",
    "SIDES",
    "PlanError",
    "plan_from_dict",
    "plan_to_dict",
    "plan_trajectories",
    "trajectory_endpoints",
    "read_plan",
    "write_plan",
]

PLAN_SCHEMA = "guidance.plan/1"
SIDES = ("left", "right")


class PlanError(GuidanceError):
    """A plan (or plan file) that violates the guidance.plan/1 schema."""


def _point(t: dict, key: str, where: str) -> list[float]:
    value = t[key]
    try:
        p = np.array(value, dtype=float)
    except (TypeError, ValueError):
        raise PlanError(f"{where}: '{key}' must be [x, y, z] numbers (mm), got {value!r}") from None
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise PlanError(f"{where}: '{key}' must be 3 finite numbers [x, y, z] (mm), got {value!r}")
    return [float(v) for v in p]


def _trajectory_from_dict(t, where: str) -> dict:
    """One validated trajectory (a copy; unknown keys are kept)."""
    if not isinstance(t, dict):
        raise PlanError(f"{where} must be a JSON object")
    missing = [k for k in ("level", "label", "side", "entry_world", "target_world",
                           "screw_diameter_mm") if k not in t]
    if missing:
        raise PlanError(f"{where} is missing {', '.join(repr(k) for k in missing)}")
    level, label, side = t["level"], t["label"], t["side"]
    if not isinstance(level, str) or not level:
        raise PlanError(f"{where}: 'level' must be a non-empty string, got {level!r}")
    if isinstance(label, bool) or not isinstance(label, int) or label <= 0:
        raise PlanError(f"{where}: 'label' must be a positive integer, got {label!r}")
    if level in LEVEL_LABELS and LEVEL_LABELS[level] != label:
        raise PlanError(f"{where}: label {label} does not match level {level} "
                        f"(TotalSegmentator id {LEVEL_LABELS[level]})")
    if side not in SIDES:
        raise PlanError(f"{where}: 'side' must be one of {', '.join(SIDES)}; got {side!r}")
    entry, target = _point(t, "entry_world", where), _point(t, "target_world", where)
    if np.linalg.norm(np.subtract(target, entry)) < 1.0:
        raise PlanError(f"{where}: entry and target are less than 1 mm apart")
    d = t["screw_diameter_mm"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 20:
        raise PlanError(f"{where}: 'screw_diameter_mm' must be a number in (0, 20), got {d!r}")
    return {**t, "entry_world": entry, "target_world": target, "screw_diameter_mm": float(d)}


def plan_from_dict(d) -> list[dict]:
    """Validate a guidance.plan/1 object and return its trajectories."""
    if not isinstance(d, dict):
        raise PlanError("a plan must be a JSON object")
    if d.get("schema") != PLAN_SCHEMA:
        raise PlanError(f"unsupported plan schema {d.get('schema')!r}; expected {PLAN_SCHEMA!r}")
    trajectories = d.get("trajectories")
    if not isinstance(trajectories, list):
        raise PlanError("plan 'trajectories' must be a list")
    return [_trajectory_from_dict(t, f"trajectories[{i}]") for i, t in enumerate(trajectories)]


def plan_to_dict(trajectories: list[dict]) -> dict:
    """The guidance.plan/1 object of a list of trajectories (validated)."""
    return {"schema": PLAN_SCHEMA,
            "trajectories": plan_from_dict({"schema": PLAN_SCHEMA, "trajectories": trajectories})}


def read_plan(path: str | Path) -> list[dict]:
    """Read and validate a plan JSON file; errors name the file and the faulty entry."""
    return read_json_as(path, plan_from_dict, what="plan", error=PlanError)


def write_plan(trajectories: list[dict], path: str | Path) -> Path:
    """Write trajectories as a guidance.plan/1 JSON file."""
    path = Path(path)
    path.write_text(json.dumps(plan_to_dict(trajectories), indent=2) + "\n")
    return path


def plan_trajectories(plan: dict | list | tuple | None) -> list[dict]:
    """The validated trajectories of a plan given as a list of them, a guidance.plan/1
    object or None (no plan: an empty list)."""
    if plan is None:
        return []
    if isinstance(plan, (list, tuple)):
        plan = {"schema": PLAN_SCHEMA, "trajectories": list(plan)}
    return plan_from_dict(plan)


def trajectory_endpoints(trajectory: dict) -> tuple[np.ndarray, np.ndarray]:
    """(entry_world, target_world) of a planned trajectory (LPS mm), validated."""
    t = _trajectory_from_dict(trajectory, f"trajectory {trajectory.get('level', '?')}"
                              if isinstance(trajectory, dict) else "trajectory")
    return np.array(t["entry_world"]), np.array(t["target_world"])
