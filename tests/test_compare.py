"""Registration settings compared on stored cases: a variant's text, the alternating
registrations, the table and the command line (phantom at 2 mm, biplane pairs of 64 px)."""

import json
from dataclasses import replace

import pytest

import run_guidance
from guidance.evaluation import benchmark as ev
from guidance.evaluation.compare import compare_settings, format_comparison, settings_from_text
from guidance.evaluation.metrics import EvaluationError
from guidance.registration.quality import QualityLimits
from guidance.registration.register import RegistrationSettings
from sim.phantom import make_phantom, write_phantom

FAST = RegistrationSettings(pyramid=(2, 1), n_candidates=2)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=2.0)


@pytest.fixture(scope="module")
def cases(phantom):
    return ev.make_benchmark_set(phantom.ct, labels=phantom.labels, n_views=1, n_starts_per_bin=2, bins=((4.0, 6.0),),
                                 intensity="raw", detector_px=64, biplane=True, seed=1)


def test_a_variant_is_read_from_text_and_bad_text_is_named():
    settings = settings_from_text("coarse_soft_binning=1; pyramid=(4, 2);depth_profile_mm=None")
    assert settings.coarse_soft_binning == 1.0 and isinstance(settings.coarse_soft_binning, float)
    assert settings.pyramid == (4, 2) and settings.depth_profile_mm is None
    assert settings.n_candidates == RegistrationSettings().n_candidates
    assert settings_from_text("") == RegistrationSettings()
    for text, message in [("no_such=1", "'no_such=1' is not 'setting=value'"),
                          ("pyramid", "is not 'setting=value'"),
                          ("pyramid=(4,", "not a Python literal"),
                          ("pyramid=4", "of type int, the setting of type tuple")]:
        with pytest.raises(EvaluationError, match=message):
            settings_from_text(text)


def test_variants_register_the_same_cases_and_changed_outcomes_are_named(phantom, cases):
    strict = replace(FAST, quality=QualityLimits(min_similarity=0.999))  # a gate that fails everything
    result = compare_settings(cases, phantom.ct, {"reference": FAST, "same": FAST, "strict": strict},
                              labels=phantom.labels, progress=False)
    records, variants = result["records"], result["variants"]
    assert [r["case_id"] for r in records["strict"]] == [c.case_id for c in cases]
    assert all(r["status"] == "ok" and r["success"] for r in records["reference"])
    # Registration is deterministic: the same settings, the same poses and outcomes.
    assert [r["final_mtre_mm"] for r in records["same"]] == [r["final_mtre_mm"] for r in records["reference"]]
    assert variants["same"]["outcome_changes"] == [] and variants["reference"]["time_ratio"]["median"] == 1.0
    assert variants["same"]["time_ratio"]["min"] > 0.0
    assert all(r["status"] == "failed" for r in records["strict"])
    assert variants["strict"]["outcome_changes"] == [c.case_id for c in cases]
    assert variants["strict"]["summary"]["quality_gate"]["failed_correct"] == len(cases)
    assert variants["strict"]["settings"]["quality"]["min_similarity"] == 0.999
    assert variants["strict"]["settings"]["pyramid"] == (2, 1)
    table = format_comparison(result).splitlines()
    assert len(table) == 5 and table[4].startswith("| strict | pyramid=(2, 1), n_candidates=2, quality=")
    assert "| 0 / 0 / 2 / 0 |" in table[4] and f"| {cases[0].case_id}, {cases[1].case_id} |" in table[4]


def test_compare_command_prints_the_table_and_writes_json(phantom, cases, tmp_path, capsys):
    paths = write_phantom(phantom, tmp_path / "phantom")
    ev.write_benchmark_set(cases, tmp_path / "set")
    out = tmp_path / "compare.json"
    argv = ["compare", "--set", str(tmp_path / "set"), "--ct", str(paths["ct"]), "--labels", str(paths["labels"]),
            "--reference", "pyramid=(2, 1);n_candidates=2", "--every", "2", "--json", str(out)]
    finite = "pyramid=(2, 1);n_candidates=2;analytic_jacobian=False"  # a second --variant adds to the first
    assert run_guidance.main(argv + ["--variant", "pyramid=(2, 1);n_candidates=2;coarse_soft_binning=1.0",
                                     "--variant", finite]) == 0
    printed = capsys.readouterr().out
    assert "| reference | pyramid=(2, 1), n_candidates=2 | 100% |" in printed
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_model"] and len(data["result"]["records"]["reference"]) == 1
    assert data["result"]["variants"]["pyramid=(2, 1);n_candidates=2;coarse_soft_binning=1.0"]["settings"] == {
        "pyramid": [2, 1], "n_candidates": 2, "coarse_soft_binning": 1.0}
    assert data["result"]["variants"][finite]["summary"]["success_rate"] == 1.0
    assert run_guidance.main(argv + ["--variant", "coarse_soft_bining=1.0"]) == 2
    assert "'coarse_soft_bining=1.0' is not 'setting=value'" in capsys.readouterr().err
