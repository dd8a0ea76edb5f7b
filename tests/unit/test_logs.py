"""pusherd.logs: <N> priority prefixes only when the stream is the journal.

journald is faked the way systemd announces it: $JOURNAL_STREAM holds
"device:inode" of the stream's fd, which we take from os.fstat of a real file.
"""

import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the package is not necessarily installed
    sys.path.insert(0, str(REPO))

from pusherd import logs  # noqa: E402

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    pkg = logging.getLogger("pusherd")
    saved = (list(root.handlers), root.level, pkg.level)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    pkg.setLevel(saved[2])


@pytest.fixture
def stream(tmp_path):
    with open(tmp_path / "stderr.log", "w+", encoding="utf-8") as f:
        yield f


def journal_env(stream):
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def lines_of(stream):
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def emit_every_level(name="pusherd.test"):
    log = logging.getLogger(name)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")


def test_priority_prefixes_when_stream_is_the_journal(stream):
    logs.setup_logging("debug", environ=journal_env(stream), stream=stream)
    emit_every_level()
    assert lines_of(stream) == [
        "<7>DEBUG pusherd.test: d",
        "<6>INFO pusherd.test: i",
        "<4>WARNING pusherd.test: w",
        "<3>ERROR pusherd.test: e",
        "<2>CRITICAL pusherd.test: c",
    ]


def test_every_line_of_a_traceback_is_prefixed(stream):
    logs.setup_logging("info", environ=journal_env(stream), stream=stream)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("pusherd.hub").exception("delivery failed")
    lines = lines_of(stream)
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[0] == "<3>ERROR pusherd.hub: delivery failed"
    assert "<3>RuntimeError: boom" in lines


def test_access_logger_goes_through(stream):
    logs.setup_logging("info", environ=journal_env(stream), stream=stream)
    logging.getLogger("pusherd.access").info("200 GET /socket/websocket 1.2ms")
    assert lines_of(stream) == ["<6>INFO pusherd.access: 200 GET /socket/websocket 1.2ms"]


@pytest.mark.parametrize("kind", ["unset", "other-inode", "malformed", "empty"])
def test_no_prefix_unless_the_stream_is_the_journal(stream, tmp_path, kind):
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    environ = {
        "unset": {},
        "other-inode": {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        "malformed": {"JOURNAL_STREAM": "not-a-dev-inode"},
        "empty": {"JOURNAL_STREAM": ""},
    }[kind]
    logs.setup_logging("info", environ=environ, stream=stream)
    logging.getLogger("pusherd").warning("careful")
    (line,) = lines_of(stream)
    assert not line.startswith("<")
    assert TIMESTAMP.match(line), line
    assert line.endswith(" WARNING pusherd: careful")


def test_stream_without_fd_is_not_the_journal():
    buf = io.StringIO()
    logs.setup_logging("info", environ={"JOURNAL_STREAM": "1:2"}, stream=buf)
    logging.getLogger("pusherd").info("hello")
    assert TIMESTAMP.match(buf.getvalue())
    assert buf.getvalue().rstrip().endswith("INFO pusherd: hello")


def test_stream_is_journal(stream):
    assert logs.stream_is_journal(stream, journal_env(stream)) is True
    assert logs.stream_is_journal(stream, {}) is False
    assert logs.stream_is_journal(io.StringIO(), journal_env(stream)) is False


def test_default_stream_is_current_stderr(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    logs.setup_logging("info", environ={})
    logging.getLogger("pusherd").info("to stderr")
    assert "INFO pusherd: to stderr" in buf.getvalue()


def test_setup_is_idempotent(stream):
    env = journal_env(stream)
    logs.setup_logging("info", environ=env, stream=stream)
    logs.setup_logging("info", environ=env, stream=stream)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "pusherd-stderr"]
    assert len(ours) == 1
    logging.getLogger("pusherd").info("once")
    assert lines_of(stream) == ["<6>INFO pusherd: once"]


def test_second_setup_switches_stream(tmp_path, stream):
    logs.setup_logging("info", environ={}, stream=stream)
    with open(tmp_path / "second.log", "w+", encoding="utf-8") as second:
        logs.setup_logging("info", environ=journal_env(second), stream=second)
        logging.getLogger("pusherd").info("moved")
        assert lines_of(second) == ["<6>INFO pusherd: moved"]
    assert lines_of(stream) == []


def test_set_level_at_runtime(stream):
    logs.setup_logging("warning", environ=journal_env(stream), stream=stream)
    emit_every_level()
    assert [line[:3] for line in lines_of(stream)] == ["<4>", "<3>", "<2>"]
    stream.seek(0)
    stream.truncate()

    logs.set_level("DEBUG")
    emit_every_level()
    assert [line[:3] for line in lines_of(stream)] == ["<7>", "<6>", "<4>", "<3>", "<2>"]


def test_debug_is_for_pusherd_loggers_only(stream):
    logs.setup_logging("debug", environ=journal_env(stream), stream=stream)
    logging.getLogger("tornado.general").debug("noise")
    logging.getLogger("asyncio").info("kept")
    logging.getLogger("pusherd.broker").debug("detail")
    assert lines_of(stream) == ["<6>INFO asyncio: kept", "<7>DEBUG pusherd.broker: detail"]


def test_error_level_applies_to_everyone(stream):
    logs.setup_logging("error", environ=journal_env(stream), stream=stream)
    logging.getLogger("tornado.general").warning("dropped")
    logging.getLogger("pusherd").warning("dropped too")
    logging.getLogger("tornado.application").error("kept")
    assert lines_of(stream) == ["<3>ERROR tornado.application: kept"]


@pytest.mark.parametrize("bad", ["verbose", "", None, True])
def test_unknown_level_is_refused_without_side_effects(stream, bad):
    logs.setup_logging("info", environ={}, stream=stream)
    with pytest.raises(ValueError):
        logs.set_level(bad)
    assert logging.getLogger("pusherd").getEffectiveLevel() == logging.INFO
    with pytest.raises(ValueError):
        logs.setup_logging(bad, environ={}, stream=stream)


@pytest.mark.parametrize("name, expected", [
    ("debug", logging.DEBUG), ("INFO", logging.INFO), (" Warning ", logging.WARNING),
    ("warn", logging.WARNING), ("error", logging.ERROR), ("critical", logging.CRITICAL),
    (15, 15),
])
def test_parse_level(name, expected):
    assert logs.parse_level(name) == expected


@pytest.mark.parametrize("levelno, priority", [
    (logging.DEBUG, 7), (5, 7), (logging.INFO, 6), (25, 6), (logging.WARNING, 4),
    (logging.ERROR, 3), (logging.CRITICAL, 2), (60, 2),
])
def test_syslog_priority(levelno, priority):
    assert logs.syslog_priority(levelno) == priority


@pytest.mark.parametrize("text,shown", [
    ("plain topic", "plain topic"),
    ("a\nFAKE LINE", "a\\nFAKE LINE"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\u202ertl", "\\u202ertl"),
    ("lone \ud800", "lone \\ud800"),
    ("tab\there", "tab\\there"),
    ("é中", "é中"),
])
def test_escape_leaves_no_raw_control_character(text, shown):
    from pusherd.logs import escape
    assert escape(text) == shown


def test_escape_bounds_the_message():
    from pusherd.logs import escape
    assert escape("x" * 50, limit=10) == "x" * 10 + "... (40 more characters)"


def test_formatters_escape_messages_but_keep_tracebacks():
    from pusherd.logs import HumanFormatter, JournalFormatter
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        exc_info = sys.exc_info()
    record = logging.LogRecord("pusherd", logging.ERROR, __file__, 1, "topic=%s", ("a\nFAKE",), exc_info)
    human = HumanFormatter().format(record)
    assert "topic=a\\nFAKE" in human and "\nFAKE" not in human
    assert "Traceback (most recent call last):\n" in human       # the formatter's own lines stay
    journal = JournalFormatter().format(record)
    assert all(line.startswith("<3>") for line in journal.splitlines())


# --- StormLog: one line per interval at most for refusals that come in storms ------------------

from pusherd.logs import StormLog
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


def test_records_skip_what_no_format_shows(stream):
    """setup_logging turns off the caller lookup and the thread and process fields (the logging
    HOWTO's optimization): neither of pusherd's formats may show them."""
    import re as _re
    logs.setup_logging("info", environ={}, stream=stream)
    assert logging._srcfile is None and not logging.logThreads and not logging.logProcesses
    unused = _re.compile(r"%\((pathname|filename|module|funcName|lineno|thread|threadName|process|processName)\)")
    for formatter in (logs.HumanFormatter(), logs.JournalFormatter()):
        assert not unused.search(formatter._fmt), formatter._fmt
    logging.getLogger("pusherd").info("still %s", "logged")
    assert lines_of(stream)[-1].endswith("INFO pusherd: still logged")
