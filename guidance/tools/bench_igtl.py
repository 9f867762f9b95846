"""``bench igtl``: what the OpenIGTLink bridge costs the live pipeline's latency.

The pipeline (``run_pipeline``, real ZeroMQ sockets on loopback) registers a simulated
15 fps fluoro scenario on a 2 mm phantom with 128-pixel frames (small, so that it keeps
up on a small shared machine; the same frames for every configuration), three times:
without the bridge, with the bridge and no client, and with the bridge and
``n_clients`` clients in their own processes that read and decode every message (as
Slicer would). Reports the frame latency (acquisition -> pose published) p50/p95 and
what each client received.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np

from guidance.live.igtl import HEADER_SIZE, IgtlBridge, decode
from guidance.live.pipeline import Pipeline
from guidance.live.serve import run_pipeline
from guidance.live.transport import Publisher, Subscriber, free_tcp_endpoint
from guidance.live.wire import Frame, PoseResult
from guidance.registration.register import Registrator

__all__ = ["bench_igtl", "format_igtl_table", "client_main"]


def client_main(port: int, seconds: float) -> None:
    """An OpenIGTLink client process: connect, read and decode everything until the server
    closes the connection (at most ``seconds``), print the message counts by type and the
    bytes received as JSON."""
    deadline = time.monotonic() + seconds
    counts: Counter[str] = Counter()
    received = 0
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                break
            received += len(chunk)
            buffer += chunk
            while len(buffer) >= HEADER_SIZE:
                size = HEADER_SIZE + int.from_bytes(buffer[42:50], "big")
                if len(buffer) < size:
                    break
                counts[decode(buffer[:size])[0].type_name] += 1
                buffer = buffer[size:]
    print(json.dumps({"counts": dict(counts), "mbytes": round(received / 1e6, 1)}))


def _frames(duration_s: float, fps: float, seed: int):
    from sim.phantom import make_phantom
    from sim.scenario import Scenario, ScenarioPlayer

    phantom = make_phantom(seed=seed, spacing_mm=2.0)
    scenario = Scenario(duration_s=duration_s, fps=fps, detector_px=128, pixel_spacing_mm=2.4, seed=seed,
                        instrument=None)
    player = ScenarioPlayer(scenario, phantom)
    frames = [player.frame_at(k / fps) for k in range(int(duration_s * fps))]
    return phantom, frames


def _run(registrator, plan, ct, frames, fps: float, n_clients: int | None, settle_s: float) -> dict:
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    stop = threading.Event()
    bridge = IgtlBridge(0, ct=ct, plan=plan) if n_clients is not None else None
    clients = [subprocess.Popen([sys.executable, "-c", "import sys; from guidance.tools.bench_igtl import "
                                 f"client_main; client_main({bridge.port}, 600)"],
                                stdout=subprocess.PIPE, text=True) for _ in range(n_clients or 0)]
    deadline = time.monotonic() + 300
    while bridge is not None and len(bridge.server.clients) < len(clients) and time.monotonic() < deadline:
        stop.wait(0.1)  # the clients have started and connected before anything is timed
    thread = threading.Thread(target=run_pipeline, args=(Pipeline(registrator, plan=plan),), daemon=True,
                              kwargs=dict(frame_endpoints=[frames_ep], result_endpoint=results_ep, stop=stop,
                                          sink=bridge))
    thread.start()
    results = Subscriber([results_ep], topics=("pose_result",), rcvhwm=10000)
    latencies, ok = [], 0
    try:
        with Publisher(frames_ep) as pub:
            first = None
            while first is None:  # the global registration (and any compilation) before timing
                pub.send(Frame(frame_id=0, acquired_ns=time.time_ns(), view=frames[0].view, pixels=frames[0].pixels))
                first = results.recv(2.0)
            stop.wait(settle_s)
            start = time.monotonic()
            for k, f in enumerate(frames):
                stop.wait(max(0.0, start + k / fps - time.monotonic()))
                pub.send(Frame(frame_id=k + 1, acquired_ns=time.time_ns(), view=f.view, pixels=f.pixels))
                while (msg := results.recv(0.0)) is not None:
                    if isinstance(msg, PoseResult) and msg.frame_id > 0:
                        latencies.append(msg.latency_ms["total"])
                        ok += msg.status == "ok"
            end = time.monotonic() + settle_s
            while time.monotonic() < end and (msg := results.recv(0.1)) is not None:
                if isinstance(msg, PoseResult) and msg.frame_id > 0:
                    latencies.append(msg.latency_ms["total"])
                    ok += msg.status == "ok"
    finally:
        stop.set()
        thread.join(10)
        results.close()
        if bridge is not None:
            bridge.close()
    received = [json.loads(c.communicate(timeout=60)[0] or "{}") for c in clients]
    lat = np.asarray(latencies) if latencies else np.full(1, np.nan)
    return {"poses": len(latencies), "ok": ok, "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)), "clients": received}


def bench_igtl(*, duration_s: float = 20.0, fps: float = 15.0, n_clients: int = 2, seed: int = 0,
               settle_s: float = 1.0, rounds: int = 2) -> list[dict]:
    """Rows: configuration and round, poses (ok), latency p50/p95 (ms), per client messages
    by type. The configurations alternate in ``rounds`` rounds, so that a change in the
    machine's load shows as a spread within a configuration, not as a difference between them."""
    phantom, frames = _frames(duration_s, fps, seed)
    registrator = Registrator(phantom.ct, labels=phantom.labels)
    rows = []
    for round_ in range(1, rounds + 1):
        for name, clients in (("no bridge", None), ("bridge, no client", 0),
                              (f"bridge, {n_clients} clients", n_clients)):
            rows.append({"config": f"{name} (round {round_})"}
                        | _run(registrator, phantom.plan, phantom.ct, frames, fps, clients, settle_s))
    return rows


def format_igtl_table(rows: list[dict]) -> str:
    lines = ["| configuration | poses (ok) | latency p50 ms | latency p95 ms | "
             "per client: TRANSFORM / IMAGE / STATUS, MB |", "|---|---|---|---|---|"]
    for r in rows:
        per_client = "; ".join(f"{c.get('counts', {}).get('TRANSFORM', 0)} / {c.get('counts', {}).get('IMAGE', 0)}"
                               f" / {c.get('counts', {}).get('STATUS', 0)}, {c.get('mbytes', 0)} MB"
                               for c in r["clients"]) or "-"
        lines.append(f"| {r['config']} | {r['poses']} ({r['ok']}) | {r['latency_p50_ms']:.0f} | "
                     f"{r['latency_p95_ms']:.0f} | {per_client} |")
    return "\n".join(lines)
