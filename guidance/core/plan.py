"""Surgical plans: the guidance.plan/1 schema, its one validator and plan files.

A plan is a list of trajectories, each a dict with ``approach``, ``level`` (name),
``label`` (TotalSegmentator id), ``side``, ``entry_world`` and ``target_world`` (LPS mm of
the pre-op CT); unknown keys are kept. On disk it is
``{"schema": "guidance.plan/1", "trajectories": [...]}``.

Approaches (``approach``, default "posterior" so that older files stay valid):

- "posterior": a pedicle screw of ``screw_diameter_mm`` through the pedicle of ``level``;
  ``side`` left or right.
- "lateral" (LLIF) and "anterior" (ALIF): an interbody access trajectory to the disc
  between ``level`` and ``level_below`` (a level name), ending where the ``cage`` is
  centred; ``cage`` = {"length_mm" (along the trajectory), "width_mm", "height_mm"
  (cranio-caudal)}; ``side``: the approach side for lateral, "midline" for anterior.
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
    "APPROACHES",
    "APPROACH_SIDES",
    "CAGE_KEYS",
    "PlanError",
    "plan_from_dict",
    "plan_to_dict",
    "plan_trajectories",
    "trajectory_endpoints",
    "trajectory_approach",
    "implant_diameter_mm",
    "read_plan",
    "write_plan",
]

PLAN_SCHEMA = "guidance.plan/1"
SIDES = ("left", "right")
APPROACHES = ("posterior", "lateral", "anterior")
APPROACH_SIDES = {"posterior": SIDES, "lateral": SIDES, "anterior": ("midline",)}
CAGE_KEYS = ("length_mm", "width_mm", "height_mm")


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


def _size_mm(value, where: str, name: str, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < hi:
        raise PlanError(f"{where}: '{name}' must be a number in (0, {hi:g}) mm, got {value!r}")
    return float(value)


def _cage(t: dict, where: str) -> dict:
    cage = t.get("cage")
    if not isinstance(cage, dict):
        raise PlanError(f"{where}: an interbody trajectory needs 'cage' = "
                        f"{{{', '.join(repr(k) for k in CAGE_KEYS)}}} (mm), got {cage!r}")
    missing = [k for k in CAGE_KEYS if k not in cage]
    if missing:
        raise PlanError(f"{where}: 'cage' is missing {', '.join(repr(k) for k in missing)}")
    return {**cage, **{k: _size_mm(cage[k], where, f"cage.{k}", 100.0) for k in CAGE_KEYS}}


def _trajectory_from_dict(t, where: str) -> dict:
    """One validated trajectory (a copy; unknown keys are kept, a missing ``approach`` is
    left out: it means "posterior")."""
    if not isinstance(t, dict):
        raise PlanError(f"{where} must be a JSON object")
    approach = t.get("approach", "posterior")
    if approach not in APPROACHES:
        raise PlanError(f"{where}: 'approach' must be one of {', '.join(APPROACHES)}; got {approach!r}")
    required = ("level", "label", "side", "entry_world", "target_world")
    required += ("screw_diameter_mm",) if approach == "posterior" else ("level_below", "cage")
    missing = [k for k in required if k not in t]
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
    sides = APPROACH_SIDES[approach]
    if side not in sides:
        raise PlanError(f"{where}: 'side' must be one of {', '.join(sides)} ({approach} approach); "
                        f"got {side!r}")
    entry, target = _point(t, "entry_world", where), _point(t, "target_world", where)
    if np.linalg.norm(np.subtract(target, entry)) < 1.0:
        raise PlanError(f"{where}: entry and target are less than 1 mm apart")
    out = {**t, "entry_world": entry, "target_world": target}
    if approach == "posterior":
        out["screw_diameter_mm"] = _size_mm(t["screw_diameter_mm"], where, "screw_diameter_mm", 20.0)
        if "cage" in t:
            raise PlanError(f"{where}: a posterior (pedicle screw) trajectory has no 'cage'")
        return out
    below = t["level_below"]
    if below not in LEVEL_LABELS or below == level:
        raise PlanError(f"{where}: 'level_below' must be a level name other than {level!r} "
                        f"({', '.join(LEVEL_LABELS)}); got {below!r}")
    out["cage"] = _cage(t, where)
    return out


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


def _validated(trajectory: dict) -> dict:
    return _trajectory_from_dict(trajectory, f"trajectory {trajectory.get('level', '?')}"
                                 if isinstance(trajectory, dict) else "trajectory")


def trajectory_endpoints(trajectory: dict) -> tuple[np.ndarray, np.ndarray]:
    """(entry_world, target_world) of a planned trajectory (LPS mm), validated."""
    t = _validated(trajectory)
    return np.array(t["entry_world"]), np.array(t["target_world"])


def trajectory_approach(trajectory: dict) -> str:
    """The approach of a trajectory ("posterior" when the dict does not say)."""
    return _validated(trajectory).get("approach", "posterior")


def implant_diameter_mm(trajectory: dict) -> float:
    """Size (mm) of the implant across its path, the one that must stay in the bony
    corridor: the screw diameter (posterior), the cage height (interbody: between the
    endplates)."""
    t = _validated(trajectory)
    return t["cage"]["height_mm"] if "cage" in t else t["screw_diameter_mm"]
