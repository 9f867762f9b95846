"""Intra-operative X-ray / CT guidance for minimally invasive spine surgery.

Threads: the hot loops run in numba's thread pool. Other runtimes' worker threads
spin-wait beside it and, on a small machine shared with a simulator or display, stole
the cores the registration needed (a live tracking update measured 137 ms instead of
28 ms; gdb showed OpenBLAS's server thread at 100% CPU while idle). So, unless the
user chose otherwise: BLAS and OpenCV run single-threaded (their work here is small)
and OpenMP threads wait passively. The variables only act if set before numpy, OpenCV
and numba start their runtimes, which ``run_guidance.py`` ensures; the BLAS limit is
also applied at run time with threadpoolctl for library users who imported numpy first.
"""

import os

THREAD_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OPENCV_FOR_THREADS_NUM": "1"}
for _name, _value in THREAD_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

from threadpoolctl import threadpool_limits  # noqa: E402  (after the environment on purpose)

threadpool_limits(limits=1, user_api="blas")
