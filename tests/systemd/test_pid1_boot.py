"""Proves the PID 1 rig (pid1.py): boot a real systemd in namespaces, run a
Type=notify unit whose readiness comes from pusherd.systemd, shut down.

Needs root + namespaces + cgroup2; skipped otherwise (failed with PUSHERD_NO_SKIP=1).
"""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pid1  # noqa: E402

pytestmark = pytest.mark.systemd

TIME_BUDGET_SECONDS = 60  # the whole test; it takes about a second here

# One line of Python (ExecStart= has no multi-line form): journald-aware logging,
# READY=1 with a status, and a clean STOPPING=1 + exit 0 on SIGTERM.
NOTIFY_DAEMON = (
    "import logging, signal, sys; "
    "from pusherd import logs, systemd; "
    "logs.setup_logging('info'); "
    "log = logging.getLogger('pusherd.rig'); "
    "signal.signal(signal.SIGTERM, lambda *a: (systemd.stopping('bye'), "
    "log.info('SIGTERM: stopping'), sys.exit(0))); "
    "log.warning('about to be ready 100%'); "
    "systemd.ready('rig ok, pid ' + str(__import__('os').getpid())); "
    "[signal.pause() for _ in iter(int, 1)]"
)


@pytest.fixture
def rig():
    reason = pid1.unavailable_reason()
    if reason:
        pid1.skip_or_fail(f"cannot boot systemd as PID 1 here: {reason}")
    with pid1.SystemdRig(boot_timeout=30) as booted:
        yield booted


def notify_unit() -> str:
    return f"""[Unit]
Description=rig notify probe

[Service]
Type=notify
NotifyAccess=main
ExecStart={pid1.exec_line([sys.executable, "-c", NOTIFY_DAEMON])}
Environment=PYTHONPATH={pid1.REPO} PYTHONUNBUFFERED=1
SyslogIdentifier=rig-notify
TimeoutStartSec=15s
TimeoutStopSec=10s
"""


def test_boot_notify_unit_and_shutdown(rig):
    began = time.monotonic()
    assert rig.system_state == "running", rig.diagnostics()
    assert rig.systemctl("is-system-running").stdout.strip() == "running"
    # we really talk to a systemd that is PID 1 of its own namespace
    assert rig.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"

    rig.install_unit("rig-notify.service", notify_unit())
    rig.daemon_reload()
    # For Type=notify, `systemctl start` returns only after READY=1.
    rig.systemctl("start", "rig-notify.service", timeout=20)
    rig.wait_for("rig-notify.service", ActiveState="active", SubState="running")
    props = rig.show("rig-notify.service", "MainPID", "StatusText", "Type", "NotifyAccess")
    assert props["Type"] == "notify"
    main_pid = int(props["MainPID"])
    assert main_pid > 1
    assert props["StatusText"] == f"rig ok, pid {main_pid}"  # sent by pusherd.systemd.ready()

    # stderr was the journal stream: pusherd.logs wrote "<4>WARNING ...", journald
    # stored PRIORITY=4 and stripped the prefix (no timestamp: journald adds its own).
    deadline = time.monotonic() + 5
    while True:
        entries = [e for e in rig.journal_entries("rig-notify.service")
                   if e.get("SYSLOG_IDENTIFIER") == "rig-notify"]
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e["PRIORITY"], e["MESSAGE"]) for e in entries] == [
        ("4", "WARNING pusherd.rig: about to be ready 100%")], rig.diagnostics("rig-notify.service")

    rig.systemctl("stop", "rig-notify.service", timeout=20)
    rig.wait_for("rig-notify.service", ActiveState="inactive")
    # An inactive unit may be unloaded at once, so `show` no longer has its exit
    # status: read what PID 1 and the service logged instead.
    log = rig.journal("rig-notify.service")
    assert "INFO pusherd.rig: SIGTERM: stopping" in log, log
    assert "rig-notify.service: Deactivated successfully." in log, log
    assert "code=killed" not in log and "Failed" not in log, log

    assert time.monotonic() - began < TIME_BUDGET_SECONDS


def test_rig_leaves_nothing_behind():
    reason = pid1.unavailable_reason()
    if reason:
        pid1.skip_or_fail(f"cannot boot systemd as PID 1 here: {reason}")
    def ours():
        return {n for n in os.listdir("/tmp") if n.startswith(("pusherd-rig.", "systemd-private-"))}

    before_tmp = ours()
    rig = pid1.SystemdRig(boot_timeout=30)
    rig.start()
    workdir, cgroup, outer = rig.workdir, rig.cgroup, rig.outer
    pid = rig.pid1
    assert workdir.is_dir() and cgroup.is_dir()
    rig.stop()
    rig.stop()  # idempotent
    assert outer.poll() is not None
    assert not Path(f"/proc/{pid}").exists()
    assert not workdir.exists()
    assert not cgroup.exists()
    assert ours() - before_tmp == set()
