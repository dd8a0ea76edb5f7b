"""handlers.StormLog: one line per interval at most for refusals that come in storms."""

import logging

from pusherd.handlers import StormLog


def test_first_refusal_at_once_then_one_line_per_interval_with_the_count(caplog):
    storm = StormLog("refused %d upgrade(s): limit %d", interval=10.0)
    with caplog.at_level(logging.INFO, logger="pusherd"):
        storm.note(100.0, 5)
        for t in range(1, 30):
            storm.note(100.0 + t * 0.1, 5)      # within the interval: counted, not logged
        storm.flush(105.0)                       # too early
        storm.flush(110.0)                       # the interval is over: the 29 since the first
        storm.flush(125.0)                       # nothing pending: nothing logged
        storm.note(126.0, 7)                     # a new storm, long after: logged at once
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "refused 1 upgrade(s): limit 5"),
        (logging.WARNING, "refused 29 upgrade(s): limit 5"),
        (logging.WARNING, "refused 1 upgrade(s): limit 7"),
    ]
