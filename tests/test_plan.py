"""Plans for every approach: posterior screws, lateral (LLIF) and anterior (ALIF) interbody
trajectories with cages; one validator, files round-trip, the phantom plans each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guidance.core.plan import (
    PLAN_SCHEMA,
    PlanError,
    implant_diameter_mm,
    plan_to_dict,
    read_plan,
    trajectory_approach,
    write_plan,
)
from sim.phantom import make_phantom

POSTERIOR = {"level": "L3", "label": 29, "side": "left", "entry_world": [20.0, 40.0, 5.0],
             "target_world": [9.0, -8.0, 5.0], "screw_diameter_mm": 6.5}
LATERAL = {"approach": "lateral", "level": "L3", "label": 29, "level_below": "L4", "side": "left",
           "entry_world": [23.0, 1.0, -16.0], "target_world": [0.0, 0.0, -16.5],
           "cage": {"length_mm": 45.0, "width_mm": 18.0, "height_mm": 10.0}}
ANTERIOR = {"approach": "anterior", "level": "L5", "label": 27, "level_below": "sacrum", "side": "midline",
            "entry_world": [0.0, -14.0, -95.0], "target_world": [0.0, 2.0, -93.0],
            "cage": {"length_mm": 24.0, "width_mm": 34.0, "height_mm": 12.0, "lordosis_deg": 8.0}}


@pytest.mark.parametrize("trajectory, approach, diameter", [
    (POSTERIOR, "posterior", 6.5), (dict(POSTERIOR, approach="posterior"), "posterior", 6.5),
    (LATERAL, "lateral", 10.0), (ANTERIOR, "anterior", 12.0)])
def test_each_approach_round_trips_and_validates(tmp_path, trajectory, approach, diameter):
    path = write_plan([trajectory], tmp_path / "plan.json")
    assert json.loads(path.read_text())["schema"] == PLAN_SCHEMA
    (back,) = read_plan(path)
    assert back == trajectory  # unknown keys (lordosis_deg) kept, nothing added
    assert trajectory_approach(back) == approach
    assert implant_diameter_mm(back) == diameter


@pytest.mark.parametrize("trajectory, message", [
    (dict(POSTERIOR, approach="oblique"), "'approach' must be one of posterior, lateral, anterior"),
    ({k: v for k, v in LATERAL.items() if k != "cage"}, "is missing 'cage'"),
    ({k: v for k, v in LATERAL.items() if k != "level_below"}, "is missing 'level_below'"),
    (dict(LATERAL, level_below="L3"), "'level_below' must be a level name other than 'L3'"),
    (dict(LATERAL, level_below="L9"), "'level_below' must be a level name"),
    (dict(LATERAL, cage={"length_mm": 45.0, "width_mm": 18.0}), "'cage' is missing 'height_mm'"),
    (dict(LATERAL, cage={"length_mm": 45.0, "width_mm": 18.0, "height_mm": -1}), "'cage.height_mm' must be"),
    (dict(LATERAL, cage=[45, 18, 10]), "needs 'cage'"),
    (dict(ANTERIOR, side="left"), "'side' must be one of midline"),
    (dict(LATERAL, side="midline"), "'side' must be one of left, right"),
    (dict(POSTERIOR, cage=LATERAL["cage"]), "has no 'cage'"),
])
def test_bad_approach_fields_are_named(trajectory, message):
    with pytest.raises(PlanError, match=message):
        plan_to_dict([trajectory])


@pytest.mark.parametrize("sacrum", [False, True])
def test_phantom_plans_every_approach_inside_its_disc(sacrum):
    """Lateral trajectories run from the left disc wall to the disc centre, anterior ones
    from the anterior wall; their targets lie between the two vertebrae's bones and the
    cage fits between the endplates (analytic distances)."""
    phantom = make_phantom(seed=1, include_sacrum=sacrum, spacing_mm=2.0)
    plan = plan_to_dict(phantom.interbody_plan)["trajectories"]
    approaches = [t["approach"] for t in plan]
    assert approaches.count("lateral") == 4
    assert approaches.count("anterior") == (2 if sacrum else 1)
    for t in plan:
        upper = phantom.bone_signed_distance(t["level"], np.array([t["target_world"]]))[0]
        lower = phantom.bone_signed_distance(t["level_below"], np.array([t["target_world"]]))[0]
        half = t["cage"]["height_mm"] / 2
        assert upper > half and lower > half  # outside both bones, the cage clears the endplates
        entry, target = np.array(t["entry_world"]), np.array(t["target_world"])
        frame = phantom.T_world_from_vertebra[t["level"]]
        d = (target - entry) / np.linalg.norm(target - entry)
        if t["approach"] == "lateral":
            assert d @ frame[:3, 0] < -0.99  # from the patient's left towards the right
        else:
            assert d @ frame[:3, 1] > 0.99  # from anterior towards posterior
