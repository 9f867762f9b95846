"""Intra-operative X-ray / CT guidance for minimally invasive spine surgery.

Importing the package limits BLAS (OpenBLAS/MKL) to one thread: the hot loops run in
numba's own thread pool, and BLAS worker threads spinning beside it on a small
machine made 6x6 solves and vector dot products tens of times slower (tracking went
from 25 ms to 560 ms per frame on 2 cores).
"""

from threadpoolctl import threadpool_limits

threadpool_limits(limits=1, user_api="blas")
