"""guidance.tools.bench_instruments: a small run finds the K-wire and prints every table."""

import math

from guidance.tools.bench_instruments import bench_instruments, format_instrument_table


def test_a_small_bench_finds_the_kwire_and_prints_its_tables():
    report = bench_instruments(cases=2, free_frames=1, near_plane_cases=1)
    summary = report["summary"]
    assert summary["cases"] == 2 and summary["free_frames"] == 1
    assert summary["biplane_found_rate"] == 1.0 and summary["biplane_tip_mm_median"] < 1.0
    assert summary["AP_in_plane_mm_median"] < 0.5 and 0.0 <= summary["AP_within_3_sigma_rate"] <= 1.0
    table = format_instrument_table(summary)
    assert "| biplane tip error (mm) |" in table and "AP alone: tip within 3 reported sigmas" in table
    assert "Near the C-arm's rotation plane (1 AP + lateral pairs" in table
    assert not math.isnan(summary["false_detection_rate"])
