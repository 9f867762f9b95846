"""The benchmark runners: every scheduler returns every case, a failing task is retried
once and then reported as an error record (phantom at 3 mm, tiny detectors)."""

import pytest

from guidance.evaluation import runners
from guidance.evaluation.benchmark import make_benchmark_set, summarize
from guidance.evaluation.metrics import EvaluationError
from sim.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=3.0)


@pytest.fixture(scope="module")
def level_cases(phantom):
    """Cases that register L3 alone: without a label map every task fails (a bad setup)."""
    return make_benchmark_set(phantom.ct, labels=phantom.labels, level=29, n_views=1, n_starts_per_bin=2,
                              bins=((3.0, 6.0),), detector_px=16, seed=4)


def test_failed_tasks_are_retried_then_reported_not_lost(phantom, level_cases, caplog):
    records = runners.run_benchmark(level_cases, phantom.ct, labels=None, progress=False)
    assert [r["case_id"] for r in records] == [c.case_id for c in level_cases]
    assert all(r["status"] == "error" and "label map" in r["reason"] for r in records)
    tries = [m for m in caplog.messages if "failed (try" in m]
    assert len(tries) == 2 * len(level_cases)  # every case ran twice
    summary = summarize(records)
    assert summary["errors"] == [c.case_id for c in level_cases] and summary["n_cases"] == 0


def test_dask_prepares_the_ct_once_per_worker_and_reports_failures_alike(phantom, level_cases, monkeypatch):
    """An in-process worker runs 4 tasks (2 cases, each tried twice) on one prepared CT."""
    from dask.distributed import LocalCluster

    built = []

    class CountedRegistrator(runners.Registrator):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runners, "Registrator", CountedRegistrator)
    monkeypatch.setattr(runners, "_registrators", {})  # no CT prepared by an earlier test
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        records = runners.run_benchmark(level_cases, phantom.ct, labels=None, scheduler="dask",
                                        dask_address=cluster.scheduler_address, progress=False)
    assert [r["status"] for r in records] == ["error"] * len(level_cases)
    assert len(built) == 1


def test_the_ct_key_follows_the_content(phantom):
    key = runners.ct_key(phantom.ct, phantom.labels, None)
    assert key == runners.ct_key(phantom.ct.with_data(phantom.ct.data.copy()), phantom.labels, None)
    changed = phantom.ct.data.copy()
    changed[0, 0, 0] += 1.0
    assert key != runners.ct_key(phantom.ct.with_data(changed), phantom.labels, None)
    assert key != runners.ct_key(phantom.ct, None, None)


def test_bad_runner_options_are_rejected(phantom):
    with pytest.raises(EvaluationError, match="scheduler must be one of local, processes, dask"):
        runners.run_benchmark([], phantom.ct, scheduler="threads")
    with pytest.raises(EvaluationError, match="needs the dask scheduler"):
        runners.run_benchmark([], phantom.ct, dask_address="tcp://127.0.0.1:1")
