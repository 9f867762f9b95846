"""guidance.tools.reliability: its probes are what they claim and its CURVE comparison runs.

The whole bench starts the pipeline process several times (each with a first global
registration), minutes on a small machine: it is run by hand (`bench reliability
--duration 5` for a short version), not here."""

import numpy as np

from guidance.core.views import carm_view
from guidance.live.wire import Frame, WireError, decode
from guidance.tools import reliability


class _Frames:
    """The part of the bench's C-arm the probes use."""

    def __init__(self):
        view = carm_view(detector_size_px=(64, 48)).with_intensity("raw", 4095.0)
        self.frames = [type("SimFrame", (), {"view": view, "pixels": np.zeros((48, 64), np.uint16)})]

    def good_frame(self):
        return Frame(source="sim", frame_id=1, acquired_ns=1, view=self.frames[0].view,
                     pixels=self.frames[0].pixels)


def test_bad_probes_are_refused_and_bursts_are_valid():
    for name, items in reliability._probes(_Frames()):
        for parts in items[:50]:
            if "valid" in name or "8192" in name:
                assert decode(parts[1:]).kind == parts[0].decode()  # well-formed, only too many or too big
            else:
                try:
                    msg = decode(parts[1:])
                except WireError:
                    continue
                assert parts[0] != msg.kind.encode(), name  # decodes, but under another topic


def test_curve_cost_rows_and_table():
    rows = reliability.curve_cost(frame_px=32, seconds=0.5, burst=20)
    assert [r["measure"].split(":")[0] for r in rows] == ["plain", "curve"]
    table = reliability.format_rows(rows)
    assert table.startswith("| measure | value | target | met |") and table.count("\n") == 3


def test_oversize_cost_sees_the_stream_come_back_after_a_refused_frame():
    rows = reliability.oversize_cost(frame_px=16, big_px=1024, max_frame_px=16)  # 2 MiB over a ~1 MiB limit
    (value,) = [r["value"] for r in rows]
    assert value.startswith("plain ") and ", curve " in value and "None" not in value
