"""guidance.live.throttle: the first event at once, then counted summaries per period."""

import logging

import pytest

from guidance.core.errors import GuidanceError
from guidance.live.throttle import ThrottledLog


def test_burst_becomes_one_line_with_the_count(caplog):
    caplog.set_level(logging.WARNING)
    log = ThrottledLog(logging.getLogger("t"), period_s=5.0)
    for i in range(10_000):
        log.warning("malformed frame from 'X'", f"reason {i}", now_s=100.0 + i * 1e-4)  # 1 s of burst
    log.warning("malformed frame from 'Y'", "other sender", now_s=101.0)
    assert [r.getMessage() for r in caplog.records] == ["malformed frame from 'X': reason 0",
                                                        "malformed frame from 'Y': other sender"]
    log.flush(now_s=105.5)
    assert caplog.records[-1].getMessage() == ("malformed frame from 'X': 9,999 more in the last 5.5 s "
                                               "(last: reason 9999)")
    log.flush(now_s=200.0)  # nothing new: no line
    assert log.lines == 3 == len(caplog.records)
    with pytest.raises(GuidanceError, match="period_s must be positive"):
        ThrottledLog(logging.getLogger("t"), period_s=0)
