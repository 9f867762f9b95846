"""guidance.core.stop: a stop request that a signal handler may set while the main thread waits on it."""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from guidance.core.stop import StopFlag

ROOT = Path(__file__).resolve().parents[1]

SIGNALLED_WAITS = textwrap.dedent("""
    import signal, sys, threading, time
    from guidance.core.stop import StopFlag

    stop = threading.Event() if sys.argv[1] == "event" else StopFlag()
    handled = [0]

    def handler(*_):
        handled[0] += 1
        stop.set()

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)  # a handler every ms, between any two bytecodes
    end = time.monotonic() + 8.0
    while handled[0] < 300 and time.monotonic() < end:  # 300 handlers, however busy the machine
        stop.wait(0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    print("finished", handled[0] >= 300)
""")


def signalled_waits(kind):
    """Run SIGNALLED_WAITS with a ``kind`` stop; its output, or None when it hung or crashed."""
    try:
        done = subprocess.run([sys.executable, "-c", SIGNALLED_WAITS, kind], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


def test_a_signal_handler_may_set_it_while_the_main_thread_waits_on_it():
    assert signalled_waits("flag") == "finished True\n"


def test_the_signalled_waits_hang_a_threading_event():
    """The reference: with threading.Event the same script does not finish (the handler's
    set waits for the lock its own thread holds in wait), so the test above can fail."""
    assert signalled_waits("event") is None


def test_wait_returns_on_timeout_unset_and_soon_after_set_from_another_thread():
    stop = StopFlag()
    start = time.monotonic()
    assert stop.wait(0.1) is False and not stop.is_set()
    assert 0.1 <= time.monotonic() - start < 5.0
    threading.Timer(0.1, stop.set).start()
    start = time.monotonic()
    assert stop.wait() is True and stop.is_set()
    assert time.monotonic() - start < 5.0  # not forever; POLL_S after the set when idle
    assert stop.wait(0) is True
