"""Runners of a benchmark: register every case here, in a local process pool, or on Dask.

Every scheduler runs the same task, ``score_case``, on the same seeded cases, so the
records are the same whichever runs them. The CT is prepared (a ``Registrator``) once
per worker, not per task: the process pool's initializer builds it, and on Dask the CT
is broadcast to every worker once and a per-worker cache keyed by the CT's content
hash builds it on the worker's first task. A task that raises is retried once; a task
that fails again becomes an error record (``status`` "error", the message in
``reason``) that the summary counts, so no case is lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import replace
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from guidance.core.geometry import transform_points
from guidance.core.images import preprocess
from guidance.core.threads import configure_threads
from guidance.core.volume import Volume
from guidance.evaluation.metrics import SUCCESS_MM, EvaluationError, mean_projection_distance, mtre
from guidance.registration.prepared import content_digest
from guidance.registration.register import RegistrationSettings, Registrator

if TYPE_CHECKING:
    from guidance.evaluation.benchmark import BenchmarkCase

__all__ = ["SCHEDULERS", "score_case", "error_record", "run_benchmark", "progress_line"]

log = logging.getLogger(__name__)

SCHEDULERS = ("local", "processes", "dask")
"""local: this process; processes: a pool of spawned processes; dask: a dask.distributed
cluster (a LocalCluster sized to the machine, or an existing one by address)."""
RETRIES = 1
"""A failed task is run again this many times before it becomes an error record."""


def score_case(registrator: Registrator, case: BenchmarkCase) -> dict:
    """Register one case and measure it: a JSON-ready record with the initial and final
    mTRE (mm), the final mPD (mm, detector and isocentre; means over the views), the
    registration status, reason, similarity, patch agreement, pose uncertainty (mm, 1 sigma) and the error
    it describes (the rotation centre's, across and along the first view's ray), time (s),
    CT preparation time (s) and success (mTRE < 2 mm)."""
    images = [preprocess(img, v, polarity=case.polarity) for img, v in zip(case.images, case.views_init)]
    result = registrator.register(images, list(case.views_init), level=case.level)
    final = [mtre(ve.T_cam_from_world, vg.T_cam_from_world, case.targets_world)
             for ve, vg in zip(result.views, case.views_gt)]
    mpd = np.array([mean_projection_distance(ve, vg, case.targets_world)
                    for ve, vg in zip(result.views, case.views_gt)])
    final_mtre = float(np.mean(final))
    centre = registrator.centre(case.level)
    centre_error = (transform_points(result.views[0].T_cam_from_world, centre)
                    - transform_points(case.views_gt[0].T_cam_from_world, centre))
    return {
        "case_id": case.case_id,
        "level": case.level,
        "bin_mm": None if case.bin_mm is None else list(case.bin_mm),
        "n_views": len(case.images),
        "intensity": case.views_init[0].intensity,
        "initial_mtre_mm": case.initial_mtre(),
        "final_mtre_mm": final_mtre,
        "mpd_detector_mm": float(mpd[:, 0].mean()),
        "mpd_isocenter_mm": float(mpd[:, 1].mean()),
        "status": result.status,
        "reason": result.reason,
        "similarity": float(result.similarity),
        "uncertainty_in_plane_mm": result.to_dict()["uncertainty_in_plane_mm"],
        "uncertainty_depth_mm": result.to_dict()["uncertainty_depth_mm"],
        "patch_agreement": result.to_dict()["patch_agreement"],
        "centre_error_in_plane_mm": float(np.linalg.norm(centre_error[:2])),
        "centre_error_depth_mm": float(abs(centre_error[2])),
        "time_s": float(result.time_s),
        "prepare_s": float(result.prepare_s),
        "success": bool(final_mtre < SUCCESS_MM),
    }


def error_record(case: BenchmarkCase, error: BaseException) -> dict:
    """The record of a case whose task failed on every try: status "error", the error in
    ``reason``, no final measures."""
    return {"case_id": case.case_id, "level": case.level,
            "bin_mm": None if case.bin_mm is None else list(case.bin_mm), "n_views": len(case.images),
            "intensity": case.views_init[0].intensity, "initial_mtre_mm": case.initial_mtre(),
            "status": "error", "reason": f"{type(error).__name__}: {error}", "success": False}


# ------------------------------------------------------------------ per-worker prepared CT


def ct_key(ct: Volume, labels: Volume | None, settings: RegistrationSettings | None) -> str:
    """Content hash of what a Registrator is built from (CT, labels, settings)."""
    return content_digest(ct, labels, "registrator", repr(settings))


_registrators: dict[str, Registrator] = {}
_registrators_lock = threading.Lock()


def _registrator(key: str, ct: Volume, labels: Volume | None, settings: RegistrationSettings | None,
                 numba_threads: int | None = None) -> Registrator:
    """This process's Registrator of the CT ``key`` (built on first use, then reused)."""
    with _registrators_lock:
        if key not in _registrators:
            if numba_threads is not None:
                configure_threads(numba_threads)
            _registrators.clear()  # one CT per worker at a time: a new evaluation replaces the last
            _registrators[key] = Registrator(ct, labels=labels, settings=settings)
        return _registrators[key]


def _init_pool_worker(key: str, ct: Volume, labels: Volume | None, settings: RegistrationSettings | None,
                      numba_threads: int) -> None:
    _registrator(key, ct, labels, settings, numba_threads)


def _score_in_pool_worker(key: str, case: BenchmarkCase) -> dict:
    return score_case(_registrators[key], case)


def _score_on_dask_worker(key: str, ct: Volume, labels: Volume | None, settings: RegistrationSettings | None,
                          numba_threads: int | None, case: BenchmarkCase) -> dict:
    return score_case(_registrator(key, ct, labels, settings, numba_threads), case)


# ------------------------------------------------------------------ runners


def progress_line(done: int, total: int, elapsed_s: float, width: int = 30) -> str:
    """``\\r[#####.....] 5/10 cases  12 s, ~12 s left`` (no estimate before the first case)."""
    filled = int(width * done / max(total, 1))
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} cases  {elapsed_s:.0f} s"
    return line + (f", ~{elapsed_s / done * (total - done):.0f} s left" if done else "")


def _with_retries(cases: Sequence[BenchmarkCase], run: Callable[[list[int]], Iterable[tuple[int, object]]],
                  report: Callable[[int], None]) -> list[dict]:
    """Run the cases (``run(indices)`` yields (index, record or exception) as they finish),
    rerun the failed ones up to RETRIES times, then turn what still fails into error
    records."""
    records: list[dict | None] = [None] * len(cases)
    pending = list(range(len(cases)))
    done = 0
    for attempt in range(RETRIES + 1):
        failed = []
        for i, outcome in run(pending):
            if isinstance(outcome, BaseException):
                log.warning("case %s failed (try %d of %d): %s", cases[i].case_id, attempt + 1, RETRIES + 1,
                            outcome, exc_info=outcome)
                if attempt == RETRIES:
                    records[i] = error_record(cases[i], outcome)
                else:
                    failed.append(i)
                    continue
            else:
                records[i] = outcome
            done += 1
            report(done)
        pending = failed
    return records


def _run_local(cases, registrator: Registrator):
    def run(indices):
        for i in indices:
            try:
                yield i, score_case(registrator, cases[i])
            except Exception as exc:  # reported by _with_retries, never lost
                yield i, exc
    return run


def _outcome(future) -> object:
    """A finished future's result, or its exception (concurrent.futures and Dask alike)."""
    try:
        return future.result()
    except Exception as exc:  # reported by _with_retries, never lost
        return exc


def _dask_client(address: str | None, jobs: int | None):
    """A client of the cluster at ``address``, or of a new LocalCluster of ``jobs`` worker
    processes (default: one per core), one thread each."""
    from dask.distributed import Client, LocalCluster

    if address is not None:
        return Client(address), None
    n = jobs or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def run_benchmark(
    cases: Sequence[BenchmarkCase],
    ct: Volume,
    *,
    labels: Volume | None = None,
    settings: RegistrationSettings | None = None,
    scheduler: str = "local",
    jobs: int | None = None,
    dask_address: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Register every case against ``ct`` (HU) and return their records (``score_case``,
    or ``error_record`` for a case that failed twice), in the order of ``cases``.

    ``scheduler``: "local" runs here, one registration at a time, rendering every DRR
    on all numba threads (unless ``settings.parallel_render`` says otherwise);
    "processes" a pool of ``jobs`` spawned processes
    (default: one per core; each builds one Registrator and gets its share of the numba
    threads); "dask" a LocalCluster of ``jobs`` worker processes (default: one per core)
    or, with ``dask_address`` ("tcp://host:port"), an existing dask.distributed cluster.
    ``progress`` draws a text bar on stderr.
    """
    if scheduler not in SCHEDULERS:
        raise EvaluationError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if jobs is not None and jobs < 1:
        raise EvaluationError(f"jobs must be >= 1; got {jobs}")
    if dask_address is not None and scheduler != "dask":
        raise EvaluationError("a Dask address needs the dask scheduler")
    t0 = time.perf_counter()

    def report(done: int) -> None:
        if progress:
            sys.stderr.write(progress_line(done, len(cases), time.perf_counter() - t0))
            sys.stderr.flush()

    report(0)
    key = ct_key(ct, labels, settings)
    if scheduler == "local":
        local = settings or RegistrationSettings()
        if local.parallel_render is None:
            local = replace(local, parallel_render=True)
        records = _with_retries(cases, _run_local(cases, Registrator(ct, labels=labels, settings=local)), report)
    elif scheduler == "processes":
        n = jobs or os.cpu_count() or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_pool_worker, initargs=(key, ct, labels, settings, threads)) as pool:
            def run(indices):
                futures = {pool.submit(_score_in_pool_worker, key, cases[i]): i for i in indices}
                for future in as_completed(futures):
                    yield futures[future], _outcome(future)
            records = _with_retries(cases, run, report)
    else:
        records = _run_dask(cases, ct, labels, settings, key, jobs, dask_address, report)
    if progress:
        sys.stderr.write("\n")
    elapsed_s = time.perf_counter() - t0
    log.info("%d cases in %.1f s on the %s scheduler: %.1f runs/minute", len(cases), elapsed_s, scheduler,
             60.0 * len(cases) / max(elapsed_s, 1e-9))
    return records


def _run_dask(cases, ct, labels, settings, key, jobs, address, report) -> list[dict]:
    """The Dask runner: CT broadcast once, tasks not pure (distinct seeded cases), retries by _with_retries."""
    from dask.distributed import as_completed as dask_as_completed

    client, cluster = _dask_client(address, jobs)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        threads = None if address is not None else max(1, (os.cpu_count() or 1) // n_workers)
        ct_f, labels_f, settings_f = client.scatter([ct, labels, settings], broadcast=True)

        def run(indices):
            futures = {client.submit(_score_on_dask_worker, key, ct_f, labels_f, settings_f, threads, cases[i],
                                     pure=False): i for i in indices}
            for future in dask_as_completed(futures):
                yield futures[future], _outcome(future)
        return _with_retries(cases, run, report)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
