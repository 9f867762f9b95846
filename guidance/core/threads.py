"""Thread runtimes for a small shared machine: an explicit call, never an import side effect.

The hot loops run in numba's thread pool. Other runtimes' worker threads spin-wait
beside it and, on a small machine shared with a simulator or display, stole the cores
the registration needed (a live tracking update measured 137 ms instead of 28 ms; gdb
showed OpenBLAS's server thread at 100% CPU while idle). :func:`configure_threads`
keeps BLAS and OpenCV single-threaded (their work here is small) and lets OpenMP threads
wait passively. The environment variables act only before numpy, OpenCV and numba start
their runtimes, so the CLI calls it first thing; the BLAS limit is also applied at run
time with threadpoolctl for a host that imported numpy earlier. Variables the user set
are kept.
"""

from __future__ import annotations

import os

__all__ = ["THREAD_ENVIRONMENT", "configure_threads"]

THREAD_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OPENCV_FOR_THREADS_NUM": "1"}


def configure_threads(numba_threads: int | None = None) -> None:
    """Set the thread environment (unless already set), limit BLAS to one thread and,
    when given, numba's pool to ``numba_threads`` threads. Changes this process."""
    for name, value in THREAD_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    if numba_threads is not None:
        import numba

        numba.set_num_threads(max(1, min(int(numba_threads), numba.config.NUMBA_NUM_THREADS)))
