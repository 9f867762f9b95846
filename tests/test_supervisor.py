"""guidance.live.supervisor and `pipeline --supervise`: real forked processes, real sockets on
loopback. The supervisor runs in a subprocess of its own (it forks; the test process may run
threads)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from guidance.live.recording import read_manifest
from guidance.live.supervisor import RestartPolicy, SupervisorError, supervise
from guidance.live.transport import Publisher, Subscriber, free_tcp_endpoint
from guidance.live.wire import Frame, Heartbeat, PoseResult

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 180.0
"""Longest wait for an event (a first registration takes seconds idle, much longer loaded);
waits end as soon as it happens."""

SUPERVISED = textwrap.dedent("""
    import logging, os, signal, sys, time
    from guidance.core.errors import GuidanceError
    from guidance.core.stop import StopFlag
    from guidance.live.supervisor import RestartPolicy, supervise

    mode, log_file, quick_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=logging.INFO)
    stop = StopFlag()  # as the CLI's: a threading.Event set in a signal handler can deadlock
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def work(prepared, generation):
        with open(log_file, "a") as f:
            f.write(f"{generation} {os.getpid()} {time.monotonic()}\\n")
        if mode == "crash":
            return 3
        if mode == "setup-error":
            raise GuidanceError("the port is taken")
        stop.wait()  # "serve": until told to stop
        return 0

    policy = RestartPolicy(quick_s=quick_s, free_restarts=1, first_delay_s=0.2, max_delay_s=0.8)
    sys.exit(supervise(lambda: "prepared", work, stop=stop, policy=policy))
""")


def start_supervised(mode, folder, quick_s=60.0):
    folder.mkdir()
    log_file = folder / "workers.txt"
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED, mode, str(log_file), str(quick_s)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log_file


def workers_started(log_file, n, proc):
    """(generation, pid, monotonic start) of the first ``n`` workers, once they have started."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        if len(lines) >= n:
            return [(int(g), int(p), float(t)) for g, p, t in (line.split() for line in lines[:n])]
        time.sleep(0.05)
    raise AssertionError(f"{n} workers did not start; supervisor rc {proc.poll()}")


def gone(pid):
    """True once ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_the_restart_delay_grows_after_the_free_restarts_up_to_its_cap():
    policy = RestartPolicy(free_restarts=2, first_delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay_s(n) for n in range(7)] == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 3.0]


def test_a_crash_loop_backs_off_and_sigterm_ends_it(tmp_path):
    proc, log_file = start_supervised("crash", tmp_path / "crash")
    workers = workers_started(log_file, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 3, out  # the last worker's status
    assert [g for g, _, _ in workers] == [0, 1, 2, 3, 4]
    policy = RestartPolicy(quick_s=60.0, free_restarts=1, first_delay_s=0.2, max_delay_s=0.8)
    for (_, _, before), (generation, _, after) in zip(workers, workers[1:]):
        assert after - before >= policy.delay_s(generation)  # 0, 0.2, 0.4, 0.8 s: each waited at least that
    assert "generation 1 now" in out and "generation 2 in 0.20 s" in out and "generation 4 in 0.80 s" in out


def test_a_setup_error_ends_supervision_without_a_restart_unless_the_worker_had_run_a_while(tmp_path):
    proc, log_file = start_supervised("setup-error", tmp_path / "setup")
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2, out
    assert len(log_file.read_text().splitlines()) == 1
    assert "the port is taken" in out and "not restarted" in out
    proc, log_file = start_supervised("setup-error", tmp_path / "later", quick_s=0.0)  # every worker "ran a while"
    workers_started(log_file, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2 and "not restarted" not in out, out


def test_sigterm_stops_the_worker_and_a_killed_supervisor_leaves_none(tmp_path):
    proc, log_file = start_supervised("serve", tmp_path / "stopped")
    [(_, worker, _)] = workers_started(log_file, 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert gone(worker)
    proc, log_file = start_supervised("serve", tmp_path / "killed")
    [(_, worker, _)] = workers_started(log_file, 1, proc)
    proc.kill()
    proc.wait()
    assert gone(worker)  # PR_SET_PDEATHSIG


def test_a_thread_running_in_the_supervisor_is_refused_before_any_fork():
    release = threading.Event()

    def prepare():
        threading.Thread(target=release.wait, name="left-running").start()

    try:
        with pytest.raises(SupervisorError, match="left-running"):
            supervise(prepare, lambda prepared, generation: 0, stop=threading.Event())
    finally:
        release.set()


@pytest.fixture(scope="module")
def sim_frame():
    """A frame of the CLI's default phantom, as the simulator renders it."""
    from sim.phantom import make_phantom
    from sim.scenario import Scenario, ScenarioPlayer

    player = ScenarioPlayer(Scenario(duration_s=1.0, fps=15.0, seed=0), make_phantom(seed=0))
    return player.render(player.state_at(0.0))


def test_supervised_pipeline_serves_again_after_its_worker_is_killed(tmp_path, sim_frame):
    """Ok poses from generation 0; kill -9 of the worker: the supervisor forks generation 1,
    whose heartbeats say so, and ok poses of frames acquired after the kill resume; the
    recording gets a second segment; SIGTERM stops both processes (status 0)."""
    frame_ep, result_ep, record = free_tcp_endpoint(), free_tcp_endpoint(), tmp_path / "recording"
    proc = subprocess.Popen([sys.executable, "-m", "run_guidance", "pipeline", "--plain", "--supervise",
                             "--frame-endpoints", frame_ep, "--result-endpoint", result_ep, "--record", str(record)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    frame_id = 0
    try:
        with Publisher(frame_ep) as pub, Subscriber(result_ep, topics=("heartbeat", "pose_result"),
                                                    rcvhwm=1000) as sub:
            def serve_until_ok(after_ns):
                """Stream frames at ~10 fps until an ok pose of one acquired after ``after_ns``
                and a heartbeat after it (every 0.5 s: the serving worker's first pose may
                come before its first heartbeat); the generations seen in heartbeats."""
                nonlocal frame_id
                generations = set()
                served = False
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    frame_id += 1
                    pub.send(Frame(source="sim", frame_id=frame_id, acquired_ns=time.time_ns(), view=sim_frame.view,
                                   pixels=sim_frame.pixels))
                    end = time.monotonic() + 0.1
                    while (msg := sub.recv(max(0.0, end - time.monotonic()))) is not None:
                        if isinstance(msg, Heartbeat):
                            assert msg.stats["supervised"] is True
                            generations.add(msg.stats["generation"])
                            if served:
                                return generations
                        elif isinstance(msg, PoseResult) and msg.status == "ok" and msg.frame_acquired_ns > after_ns:
                            served = True
                raise AssertionError(f"no ok pose and heartbeat; supervisor rc {proc.poll()}")

            assert serve_until_ok(0) == {0}
            [worker] = psutil.Process(proc.pid).children()
            killed_ns = time.time_ns()
            worker.send_signal(signal.SIGKILL)
            assert 1 in serve_until_ok(killed_ns)
            [second] = psutil.Process(proc.pid).children()
            assert second.pid != worker.pid
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert gone(second.pid)
    assert "was killed by signal 9" in out and "generation 1 started" in out
    assert "native threads" not in out  # the preparation started none
    assert len(read_manifest(record)["segments"]) == 2
