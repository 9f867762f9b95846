"""``bench latency``: the live loop (simulator and pipeline processes on loopback, images
pre-rendered) scored against the simulator's ground truth, on the phantom or on a real CT
resampled to the clinical grid (``guidance.core.volume.clinical_grid``)."""

from __future__ import annotations

from pathlib import Path

from guidance.core.volume import clinical_grid, save_volume
from guidance.tools.demo import DEMO_SHOTS, DemoSubject, run_demo

__all__ = ["CLINICAL_CT_NAME", "CLINICAL_LABELS_NAME", "bench_latency"]

CLINICAL_CT_NAME = "ct_clinical_grid.nii.gz"
"""The resampled CT that the simulator and the pipeline both load, in the output folder."""
CLINICAL_LABELS_NAME = "labels_clinical_grid.nii.gz"


def bench_latency(out_dir: str | Path, *, duration_s: float = 120.0, speed: float = 1.0, single_view: bool = False,
                  ct: str | Path | None = None, labels: str | Path | None = None, plan: str | Path | None = None,
                  target_world: tuple[float, float, float] | None = None) -> dict:
    """Run the demo's scenario for ``duration_s`` (an AP and a lateral shot first unless
    ``single_view``, then AP fluoroscopy at 15 fps) with no display and return
    ``{"summary": DemoReport.summary(), "rows": per-pose rows}``.

    ``ct``: a real CT (with optional ``labels`` and ``plan``) instead of the phantom. It is
    resampled once onto the clinical grid (labels by nearest neighbour) and written to
    ``out_dir`` (``CLINICAL_CT_NAME``), which the simulator and the pipeline then both
    load; the scenario aims at ``target_world`` (LPS mm), else at the label centroid of
    its level (``sim.scenario.scenario_site``), and the pose error is scored there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subject = None
    if ct is not None:
        from sim.subject import load_subject

        loaded = load_subject(ct, labels=labels, plan=plan)
        save_volume(clinical_grid(loaded.ct), out / CLINICAL_CT_NAME)
        labels_path = None
        if loaded.labels is not None:
            labels_path = str(out / CLINICAL_LABELS_NAME)
            save_volume(clinical_grid(loaded.labels, interpolation="nearest"), labels_path)
        subject = DemoSubject(ct=str(out / CLINICAL_CT_NAME), labels=labels_path,
                              plan=None if plan is None else str(plan))
    report = run_demo(out, duration_s=duration_s, with_display=False, print_rows=False, prerender=True,
                      lead_shots=() if single_view else DEMO_SHOTS, speed=speed, subject=subject,
                      target_world=target_world)
    return {"summary": report.summary(), "rows": report.rows}
