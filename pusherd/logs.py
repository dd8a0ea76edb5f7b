"""Logging to stderr, journald-aware.

pusherd logs one event per line to stderr and never writes log files:

* under systemd, when stderr *is* the journal stream (``$JOURNAL_STREAM`` holds
  the ``device:inode`` of our stderr), every line starts with the syslog
  priority ``<N>``. journald turns it into ``PRIORITY=N``, strips it, and adds
  the timestamp itself, so these lines carry no timestamp;
* anywhere else (a terminal, a test, a redirected file) lines are
  human-readable with a timestamp.

Checking only that ``$JOURNAL_STREAM`` is set is not enough: a child whose
stderr was redirected inherits the variable (sd_journal_stream_fd(3)).

``setup_logging()`` installs one handler on the root logger (so tornado,
asyncio and library warnings are not lost) and is idempotent: calling it again
replaces the handler instead of adding a second one. ``set_level()`` changes
the level at runtime, e.g. on SIGHUP.
"""

import logging
import os
import re
import sys
from typing import Mapping, Optional, TextIO, Union

__all__ = [
    "setup_logging",
    "set_level",
    "parse_level",
    "stream_is_journal",
    "syslog_priority",
    "JournalFormatter",
    "HumanFormatter",
    "escape",
    "StormLog",
    "install_tornado_redaction",
]

PACKAGE_LOGGER = "pusherd"

_HANDLER_NAME = "pusherd-stderr"

_LEVELS = {
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def parse_level(level: Union[str, int]) -> int:
    """``"info"``/``"INFO"``/``20`` -> 20. Raises ValueError for anything else."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        found = _LEVELS.get(level.strip().lower())
        if found is not None:
            return found
    raise ValueError(f"unknown log level {level!r}; expected one of "
                     "debug, info, warning, error, critical")


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (5, notice, is not used by Python)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream``'s fd is the journal stream named by ``$JOURNAL_STREAM``."""
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # malformed variable, or a stream without a real fd (StringIO, pytest capture)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


#: Longest message a log line carries; the rest is cut (a client can make a message long).
MAX_MESSAGE = 2000


def escape(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` fit for one log line: no raw control character (a newline and a fake line, ANSI
    escapes, a NUL), no bidi override or lone surrogate; each is written as its Python escape
    (``\\n``, ``\\x1b``, ``\\u202e``), and the whole is cut at `limit` characters."""
    if len(text) > limit:
        text = "%s... (%d more characters)" % (text[:limit], len(text) - limit)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


class _EscapingFormatter(logging.Formatter):
    """Every message escaped (`escape`) before it is formatted: client bytes quoted in a message
    (a topic, an origin, a path, a library's error text) cannot start a line of their own. The
    traceback of ``log.exception`` is the formatter's own text and keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class JournalFormatter(_EscapingFormatter):
    """``<N>LEVEL logger: message``; every line of a multi-line record (tracebacks)
    gets the prefix, or journald would file continuation lines as info."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class HumanFormatter(_EscapingFormatter):
    """``2024-05-01 12:00:00.123 WARNING pusherd.hub: message``"""

    default_msec_format = "%s.%03d"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _third_party_level(level: int) -> int:
    # Debug output of tornado/asyncio/redis is noise for operators; debug is for
    # pusherd's own loggers. Errors-only stays errors-only for everyone.
    return max(level, logging.INFO)


def setup_logging(level: Union[str, int] = "info",
                  environ: Mapping[str, str] = os.environ,
                  stream: Optional[TextIO] = None) -> logging.Handler:
    """Install (or replace) pusherd's stderr handler and set the level.

    ``stream`` defaults to the *current* ``sys.stderr``. The journal format is
    chosen once, here, by comparing ``$JOURNAL_STREAM`` with that stream's fd.
    Returns the installed handler.
    """
    levelno = parse_level(level)
    if stream is None:
        stream = sys.stderr
    _skip_unused_record_fields()
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    if stream_is_journal(stream, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(HumanFormatter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(levelno)
    return handler


def _skip_unused_record_fields() -> None:
    """The logging HOWTO's "Optimization": no record gathers what neither format shows (the
    caller's file and line, found by walking the stack, the thread and the process). With the
    access log on, that was 40 % of a publish's log line (12.6 -> 7.4 µs:
    tests/unit/test_logs.py shows the formats need none of it)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def set_level(level: Union[str, int]) -> None:
    """Change the level at runtime (config reload). Raises ValueError on an
    unknown level name, before changing anything."""
    levelno = parse_level(level)
    logging.getLogger(PACKAGE_LOGGER).setLevel(levelno)
    logging.getLogger().setLevel(_third_party_level(levelno))


class StormLog:
    """One log line per ``interval`` seconds at most for a refusal that comes in storms (a
    connection limit reached), counting the refusals since the previous line: a storm of
    thousands is a handful of lines, not one each. ``flush`` (from the daemon's sweep) reports
    the last ones of a storm that stopped. Time comes in as ``now`` (time.monotonic)."""

    __slots__ = ("message", "level", "interval", "pending", "args", "_quiet_until", "_log")

    def __init__(self, message: str, level: int = logging.WARNING, interval: float = 10.0,
                 logger: str = PACKAGE_LOGGER):
        self.message = message  # %-formatted with the count, then the args of the latest note()
        self.level = level
        self.interval = interval
        self.pending = 0
        self.args: tuple = ()
        self._quiet_until = float("-inf")
        self._log = logging.getLogger(logger)

    def note(self, now: float, *args) -> None:
        self.pending += 1
        self.args = args
        if now >= self._quiet_until:
            self._emit(now)

    def flush(self, now: float) -> None:
        if self.pending and now >= self._quiet_until:
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._log.log(self.level, self.message, self.pending, *self.args)
        self.pending = 0
        self._quiet_until = now + self.interval


class RedactTornadoLog(logging.Filter):
    """Tornado's own log lines can quote request bytes: a malformed header's value (a publish
    secret with a stray control character) or a URL's query string (join tokens travel there).
    Keep the line, cut those parts."""

    _QUERY = re.compile(r"\?[^\s'\"]*")
    _QUOTED = re.compile(r"""\s*:?\s*b?['"].*$""", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = self._QUOTED.sub(" (value withheld)", message) if "Malformed HTTP" in message else message
        redacted = self._QUERY.sub("?...", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


TORNADO_LOGGERS = ("tornado.general", "tornado.application", "tornado.access")


def install_tornado_redaction() -> None:
    """Idempotent: one filter per Tornado logger, however many daemons run in the process."""
    for name in TORNADO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTornadoLog) for f in logger.filters):
            logger.addFilter(RedactTornadoLog())
