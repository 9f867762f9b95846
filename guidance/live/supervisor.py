"""A warm supervisor: prepare once in a parent process, fork workers that serve, fork a new
one at once when a worker dies.

Why: a cold process of this stack (numpy, ZeroMQ with CURVE, OpenCV, numba and its cached
kernels, the CT and its prepared pyramid) takes seconds from its exec to ready; a forked
child of a parent that did all that is ready in a fraction of a second
(docs/benchmarks.md, reliability, session 6).

The rules that make a fork safe are the caller's to keep in ``prepare`` and this module's
to check: the parent must start nothing that does not survive ``fork`` (a thread, a ZeroMQ
context or socket, numba's parallel thread pool): the child has only the thread that forked.
``supervise`` refuses to fork while the parent runs Python threads besides its main one,
and warns when ``prepare`` left the process with more native threads than it had before.

Restarts (``RestartPolicy``): a worker killed by a signal or exiting with a status other than
0 is logged and forked again at once; a crash loop (workers dying within ``quick_s`` of
their start several times in a row) waits, exponentially longer. A worker that exits with 0
(stopped on purpose), or with ``SETUP_ERROR_STATUS`` within ``quick_s`` of its start (its
set-up failed: a taken port, a bad key; a new worker would fail the same way), ends the
supervision with that status. When ``stop`` is set (the CLI's SIGINT/SIGTERM handler), the
worker gets SIGTERM (SIGKILL after ``stop_timeout_s``) and ``supervise`` returns its status.
A worker never outlives its parent: it asks the kernel for SIGKILL when the parent dies
(``prctl(PR_SET_PDEATHSIG)``), and the parent waits on a pidfd (woken at the worker's death),
so this runs on Linux only (kernel 5.3 or later).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from guidance.core.errors import GuidanceError
from guidance.core.stop import Stop

__all__ = ["RestartPolicy", "SETUP_ERROR_STATUS", "SupervisorError", "native_threads", "supervise"]

log = logging.getLogger(__name__)

Prepared = TypeVar("Prepared")

SETUP_ERROR_STATUS = 2
"""A worker's exit status for an error in its input or set-up (the CLI's "error: ..."):
not restarted when it comes within ``RestartPolicy.quick_s`` of the worker's start."""
PR_SET_PDEATHSIG = 1
"""linux/prctl.h: the signal a process gets when its parent dies."""
WAIT_TICK_S = 0.1
"""How often the waiting parent looks at ``stop`` (a worker's death wakes it at once)."""


class SupervisorError(GuidanceError):
    """Supervision that cannot start (not Linux, threads in the parent at fork time)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is forked again. A worker that dies within ``quick_s`` seconds of
    its start counts as a quick death; after ``free_restarts`` quick deaths in a row the
    next worker waits ``first_delay_s``, doubled for each further one, at most
    ``max_delay_s``. ``stop_timeout_s``: a worker told to stop (SIGTERM) is killed
    (SIGKILL) after this long."""

    quick_s: float = 5.0
    free_restarts: int = 3
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stop_timeout_s: float = 10.0

    def delay_s(self, quick_deaths: int) -> float:
        """Seconds to wait before the next worker after ``quick_deaths`` quick deaths in a row."""
        if quick_deaths <= self.free_restarts:
            return 0.0
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** (quick_deaths - self.free_restarts - 1))


def supervise(prepare: Callable[[], Prepared], work: Callable[[Prepared, int], int], *, stop: Stop,
              policy: RestartPolicy | None = None, name: str = "worker") -> int:
    """Run ``prepare()`` once here, then ``work(prepared, generation)`` in forked workers
    (generation 0, 1, 2, ...: the restart count), one at a time, until ``stop`` is set or a
    worker ends supervision (module docstring); returns the last worker's exit status as a
    shell gives it (128 + N for signal N). ``work`` returns the worker's exit status; an
    exception in it is logged, ``GuidanceError`` and ``OSError`` as ``SETUP_ERROR_STATUS``,
    others as 1."""
    if not sys.platform.startswith("linux"):
        raise SupervisorError(f"supervised workers need Linux (fork and prctl PR_SET_PDEATHSIG); this is "
                              f"{sys.platform}: run without supervision")
    policy = policy or RestartPolicy()
    threads_before = native_threads()
    prepared = prepare()
    _check_fork_safe(threads_before)
    generation, quick_deaths = 0, 0
    while True:
        started = time.monotonic()
        pid = _fork(work, prepared, generation, name)
        log.info("%s generation %d started (pid %d)", name, generation, pid)
        status, stopped = _wait(pid, stop, policy.stop_timeout_s)
        code = os.waitstatus_to_exitcode(status)
        lived_s = time.monotonic() - started
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if stopped:
            log.info("%s generation %d (pid %d) %s after it was told to stop", name, generation, pid, how)
            return _shell_status(code)
        if code == 0:
            log.info("%s generation %d (pid %d) exited with status 0 (stopped on purpose): supervision ends",
                     name, generation, pid)
            return 0
        if code == SETUP_ERROR_STATUS and lived_s < policy.quick_s:
            log.error("%s generation %d (pid %d) exited with status %d (its set-up failed, see above): not "
                      "restarted", name, generation, pid, code)
            return code
        quick_deaths = quick_deaths + 1 if lived_s < policy.quick_s else 0
        delay_s = policy.delay_s(quick_deaths)
        log.warning("%s generation %d (pid %d) %s after %.2f s; generation %d %s", name, generation, pid, how,
                    lived_s, generation + 1, "now" if delay_s == 0 else
                    f"in {delay_s:.2f} s ({quick_deaths} workers in a row died within {policy.quick_s:g} s)")
        if stop.wait(delay_s):
            return _shell_status(code)
        generation += 1


def native_threads() -> list[str]:
    """Names of this process's threads (Linux: /proc/self/task, the kernel's view, so the
    threads of C libraries too)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # ended meanwhile
            pass
    return names


def _check_fork_safe(threads_before: list[str]) -> None:
    """Refuse Python threads besides the main one (they would be missing in the worker, their
    locks perhaps held); warn when the preparation started native threads."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        raise SupervisorError(f"the supervisor's process runs threads besides its main one ({', '.join(others)}): "
                              f"a forked worker would lack them; start them in the worker")
    threads = native_threads()
    if len(threads) > len(threads_before):
        log.warning("the preparation started %d native threads (now %s): they do not exist in a forked worker",
                    len(threads) - len(threads_before), ", ".join(threads))


def _fork(work: Callable[[Prepared, int], int], prepared: Prepared, generation: int, name: str) -> int:
    """Fork a worker running ``work(prepared, generation)``; its pid (the worker never returns)."""
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # else both processes would write what is buffered
        stream.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent(parent)
        code = work(prepared, generation)
    except (GuidanceError, OSError) as exc:
        log.error("%s generation %d: %s", name, generation, exc)
        code = SETUP_ERROR_STATUS
    except BaseException:  # noqa: BLE001 - the worker must end here, never in the parent's code
        log.exception("%s generation %d failed", name, generation)
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code if isinstance(code, int) and 0 <= code <= 255 else 1)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux ``prctl``); a parent gone already
    is an error."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        raise SupervisorError(f"the supervisor (pid {parent}) ended before its worker started")


def _wait(pid: int, stop: Stop, stop_timeout_s: float) -> tuple[int, bool]:
    """Wait for worker ``pid`` to end: its wait status, and whether it was told to stop
    (``stop`` set: SIGTERM, then SIGKILL after ``stop_timeout_s``). Its death wakes this
    at once (a pidfd); ``stop`` is looked at every ``WAIT_TICK_S``."""
    pidfd = os.pidfd_open(pid)
    try:
        told_at, killed = None, False
        while True:
            ready, _, _ = select.select([pidfd], [], [], WAIT_TICK_S)
            if ready:
                return os.waitpid(pid, 0)[1], told_at is not None
            if stop.is_set() and told_at is None:
                told_at = time.monotonic()
                os.kill(pid, signal.SIGTERM)
            elif told_at is not None and not killed and time.monotonic() - told_at > stop_timeout_s:
                log.warning("worker pid %d did not stop within %.0f s of SIGTERM: killed", pid, stop_timeout_s)
                os.kill(pid, signal.SIGKILL)
                killed = True
    finally:
        os.close(pidfd)


def _shell_status(code: int) -> int:
    """An exit code as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code
