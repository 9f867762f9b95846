"""``bench igtl``: what the OpenIGTLink bridge costs the live pipeline.

Runs the demo (simulator with pre-rendered images + pipeline, no display) three times:
without the bridge, with the bridge and no client, and with the bridge and two clients
that read and decode everything (as Slicer would). Reports the pipeline's frame
latency (acquisition -> pose published) p50/p95 and what the clients received.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

from guidance.live.igtl import HEADER_SIZE, decode
from guidance.live.transport import free_tcp_endpoint
from guidance.tools.demo import run_demo

__all__ = ["bench_igtl", "format_igtl_table"]


class _DecodingClient(threading.Thread):
    """An OpenIGTLink client that connects (retrying until the server is up), reads,
    decodes and counts every message by type until ``stop``."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.counts: Counter[str] = Counter()
        self.bytes = 0

    def run(self) -> None:
        sock = None
        while sock is None and not self.stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            except OSError:
                self.stop.wait(0.2)
        if sock is None:
            return
        buffer = b""
        with sock:
            while not self.stop.is_set():
                try:
                    chunk = sock.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                self.bytes += len(chunk)
                buffer += chunk
                while len(buffer) >= HEADER_SIZE:
                    size = HEADER_SIZE + int.from_bytes(buffer[42:50], "big")
                    if len(buffer) < size:
                        break
                    message, _ = decode(buffer[:size])
                    self.counts[message.type_name] += 1
                    buffer = buffer[size:]


def bench_igtl(out_dir: str | Path, *, duration_s: float = 30.0, n_clients: int = 2) -> list[dict]:
    """Rows: configuration, poses, latency p50/p95 (ms), messages per client by type."""
    rows = []
    for name, bridge, clients in (("no bridge", False, 0), ("bridge, no client", True, 0),
                                  (f"bridge, {n_clients} clients", True, n_clients)):
        port = int(free_tcp_endpoint().rsplit(":", 1)[1]) if bridge else None
        stop = threading.Event()
        readers = [_DecodingClient(port, stop) for _ in range(clients)]
        for r in readers:
            r.start()
        started = time.monotonic()
        try:
            report = run_demo(Path(out_dir) / name.replace(" ", "_").replace(",", ""), duration_s=duration_s,
                              with_display=False, print_rows=False, record=False, prerender=True, igtl_port=port)
        finally:
            stop.set()
            for r in readers:
                r.join(5.0)
        summary = report.summary()
        rows.append({"config": name, "poses": summary["poses"], "ok": summary["ok"],
                     "latency_p50_ms": summary["latency_p50_ms"], "latency_p95_ms": summary["latency_p95_ms"],
                     "client_messages": [dict(r.counts) for r in readers],
                     "client_mbytes": [round(r.bytes / 1e6, 1) for r in readers],
                     "wall_s": time.monotonic() - started})
    return rows


def format_igtl_table(rows: list[dict]) -> str:
    lines = ["| configuration | poses (ok) | latency p50 ms | latency p95 ms | "
             "per client: TRANSFORM / IMAGE / STATUS, MB |", "|---|---|---|---|---|"]
    for r in rows:
        per_client = "; ".join(f"{m.get('TRANSFORM', 0)} / {m.get('IMAGE', 0)} / {m.get('STATUS', 0)}, {mb} MB"
                               for m, mb in zip(r["client_messages"], r["client_mbytes"])) or "-"
        lines.append(f"| {r['config']} | {r['poses']} ({r['ok']}) | {r['latency_p50_ms']:.0f} | "
                     f"{r['latency_p95_ms']:.0f} | {per_client} |")
    return "\n".join(lines)
