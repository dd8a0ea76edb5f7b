"""End to end under a real systemd as PID 1 (tests/systemd/pid1.py): the shipped
systemd/pusherd.service and pusherd.socket, unchanged except for ExecStart= and the credential
paths (drop-in ``e2e.conf``), run the real daemon.

One rig for the module; the tests run in file order and share it:
socket activation -> READY -> sandbox and credentials; reload (live, then a broken config
refused); ``systemctl restart`` twice under publish load with zero failed requests; a stop whose
drain outlives TimeoutStopSec= thanks to EXTEND_TIMEOUT_USEC; a watchdog restart of a hung
event loop; journald priorities.

Inside the rig everything talks to 127.0.0.1 of the rig's own network namespace. Config and
secrets live under the rig's private /run. The interpreter is a venv under /opt
(tests/systemd/service_python.py explains why).

Skipped where the machine cannot boot the rig (failed with PUSHERD_NO_SKIP=1).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pid1  # noqa: E402
import service_python  # noqa: E402

pytestmark = pytest.mark.systemd

UNIT_DIR = pid1.REPO / "systemd"
CLIENT = Path(__file__).resolve().parent / "netns_client.py"
BASE_URL = "http://127.0.0.1:4000"  # pusherd.socket's ListenStream=, in the rig's netns
WS_URL = "ws://127.0.0.1:4000/events"
CONF_DIR = "/run/pusherd-e2e"
GUARDIAN_SECRET = "e2e-guardian-secret-0123456789abcdef0123"
PUBLISH_SECRET = "e2e-publish-secret-0123456789abcdef01234"
MODULE_BUDGET_SECONDS = 90


def config_text(**extra) -> str:
    settings = {"listen": "127.0.0.1:4000", "allowed_origins": ["http://localhost:3000"],
                "drain_seconds": 1, "log_level": "info", **extra}
    return "production:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())


@pytest.fixture(scope="module")
def rig():
    reason = pid1.unavailable_reason() or service_python.unavailable_reason()
    if reason:
        pid1.skip_or_fail(f"cannot run pusherd under systemd as PID 1 here: {reason}")
    began = time.monotonic()
    app = service_python.stage_app()
    etc_existed = Path("/etc/pusherd").exists()
    try:
        with pid1.SystemdRig(boot_timeout=30) as booted:
            install(booted, app)
            yield booted
    finally:
        service_python.remove_app(app)
        # ConfigurationDirectory=pusherd makes PID 1 create /etc/pusherd (the rig shares /etc)
        if not etc_existed:
            try:
                os.rmdir("/etc/pusherd")
            except OSError:
                pass
    assert time.monotonic() - began < MODULE_BUDGET_SECONDS


def install(rig, app: Path) -> None:
    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text())
    rig.write_file(f"{CONF_DIR}/guardian_secret", GUARDIAN_SECRET + "\n", mode=0o600)
    rig.write_file(f"{CONF_DIR}/publish_secret", PUBLISH_SECRET + "\n", mode=0o600)
    for name in ("pusherd.service", "pusherd.socket"):
        rig.install_unit(name, (UNIT_DIR / name).read_text())  # as shipped
    rig.install_dropin("pusherd.service", "e2e", f"""[Service]
ExecStart=
ExecStart={app}/bin/pusherd-launch --config {CONF_DIR}/pusher.yml
LoadCredential=
LoadCredential=guardian_secret:{CONF_DIR}/guardian_secret
LoadCredential=publish_secret:{CONF_DIR}/publish_secret
""")
    rig.daemon_reload()


# --------------------------------------------------------------------------- helpers


def request(rig, method: str, path: str, body=None, secret=None, timeout=10):
    """An HTTP request from inside the rig's netns -> (status, JSON body)."""
    code = (
        "import json, sys, urllib.request, urllib.error\n"
        "m, url, body, secret = sys.argv[1:5]\n"
        "req = urllib.request.Request(url, data=body.encode() or None, method=m)\n"
        "req.add_header('Content-Type', 'application/json')\n"
        "secret and req.add_header('Authorization', 'Bearer ' + secret)\n"
        "try:\n"
        "    r = urllib.request.urlopen(req, timeout=%d); s, raw = r.status, r.read()\n"
        "except urllib.error.HTTPError as e:\n"
        "    s, raw = e.code, e.read()\n"
        "print(json.dumps([s, json.loads(raw)]))\n" % timeout)
    out = rig.run([sys.executable, "-c", code, method, BASE_URL + path,
                   json.dumps(body) if body is not None else "", secret or ""],
                  ns="net", timeout=timeout + 5).stdout
    status, parsed = json.loads(out)
    return status, parsed


def netns_client(rig, *args) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", "-t", str(rig.pid1), "-n", "--", sys.executable, str(CLIENT), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_json_line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = "still running"
        raise AssertionError("client ended without a line (exit status %s): %s" % (code, proc.stderr.read()))
    return json.loads(line)


def ws_joined(rig, topic: str) -> subprocess.Popen:
    proc = netns_client(rig, "ws", WS_URL, topic)
    assert read_json_line(proc) == {"joined": "ok"}
    return proc


def main_pid(rig) -> int:
    return int(rig.show("pusherd.service", "MainPID")["MainPID"])


def ensure_active(rig) -> int:
    rig.systemctl("start", "pusherd.socket")
    if rig.show("pusherd.service", "ActiveState")["ActiveState"] != "active":
        assert request(rig, "GET", "/healthz")[0] == 200
    rig.wait_for("pusherd.service", ActiveState="active", SubState="running")
    return main_pid(rig)


def journal_since(rig, cursor_lines: int) -> str:
    return "\n".join(rig.journal("pusherd.service").splitlines()[cursor_lines:])


def wait_journal(rig, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = rig.journal("pusherd.service")
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the journal:\n{log[-4000:]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the lifecycle


def test_socket_activation_ready_sandbox_and_credentials(rig):
    rig.systemctl("start", "pusherd.socket")
    rig.wait_for("pusherd.socket", ActiveState="active", SubState="listening")
    assert rig.show("pusherd.service", "ActiveState")["ActiveState"] == "inactive"

    # the first connection starts the service; it is answered over the inherited socket
    status, body = request(rig, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    props = rig.wait_for("pusherd.service", ActiveState="active", SubState="running")
    props = rig.show("pusherd.service", "MainPID", "StatusText", "Type", "NRestarts")
    assert props["Type"] == "notify"
    assert "config gen 1" in props["StatusText"], props  # READY=1 carried a STATUS=
    assert "inherited sockets" in wait_journal(rig, "pusherd serving on")

    # the secrets came in as credentials: the config file has none
    assert request(rig, "POST", "/publish", {"topic": "public:a", "event": "e"}, PUBLISH_SECRET)[0] == 200
    assert request(rig, "POST", "/publish", {"topic": "public:a", "event": "e"}, "wrong")[0] == 401

    # the sandbox really applies to the running process
    pid = int(props["MainPID"])
    status_lines = dict(line.split(":\t", 1) for line in
                        rig.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines() if ":\t" in line)
    assert status_lines["CapEff"].strip() == "0000000000000000"
    assert status_lines["CapBnd"].strip() == "0000000000000000"
    assert status_lines["NoNewPrivs"].strip() == "1"
    assert status_lines["Seccomp"].strip() == "2"
    assert status_lines["Uid"].split()[0] != "0"
    limits = rig.run(["cat", f"/proc/{pid}/limits"]).stdout
    soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    assert soft == hard  # raised from systemd's soft 1024 to the hard limit


def test_reload_keeps_sockets_and_refuses_a_broken_config(rig):
    pid = ensure_active(rig)
    client = ws_joined(rig, "public:reload")

    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text(max_channels_per_socket=7))
    rig.systemctl("reload", "pusherd.service")
    props = rig.wait_for("pusherd.service", ActiveState="active")
    assert "config gen 2" in rig.show("pusherd.service", "StatusText")["StatusText"]
    assert main_pid(rig) == pid
    wait_journal(rig, "configuration reloaded (gen 2); applied: max_channels_per_socket")

    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text(heartbeat_timeout="soon"))
    rig.systemctl("reload", "pusherd.service")  # returns: READY=1 also after a refusal
    wait_journal(rig, "reload refused, keeping configuration gen 2")
    assert rig.show("pusherd.service", "ActiveState")["ActiveState"] == "active"
    assert "reload refused" in rig.show("pusherd.service", "StatusText")["StatusText"]
    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text())

    # the socket joined before both reloads is still there and receives
    assert request(rig, "POST", "/publish", {"topic": "public:reload", "event": "after"}, PUBLISH_SECRET)[0] == 200
    assert read_json_line(client) == {"event": "after"}
    assert main_pid(rig) == pid and props["ActiveState"] == "active"
    client.kill()
    client.wait()


def test_restart_under_load_refuses_nothing(rig, tmp_path):
    first = ensure_active(rig)
    ws = ws_joined(rig, "public:restart")
    stop_file = tmp_path / "stop"
    load = netns_client(rig, "load", BASE_URL, PUBLISH_SECRET, str(stop_file), "4")
    time.sleep(0.5)
    pids = [first]
    for _ in range(2):
        rig.systemctl("restart", "pusherd.service", timeout=30)  # returns after the new READY=1
        pids.append(main_pid(rig))
        time.sleep(0.3)
    stop_file.write_text("")
    out, err = load.communicate(timeout=60)
    counts = json.loads(out)
    assert counts["failed"] == 0, counts
    assert counts["ok"] > 50, counts
    assert len(set(pids)) == 3, pids
    # the websocket of the first instance was told to go away with 1001
    assert read_json_line(ws) == {"closed": 1001}
    ws.wait(10)
    print("restart under load: %d publishes OK, %d failed, pids %s" % (counts["ok"], counts["failed"], pids))


def test_drain_longer_than_timeoutstopsec_is_extended(rig):
    ensure_active(rig)
    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text(drain_seconds=3))
    rig.systemctl("reload", "pusherd.service")
    wait_journal(rig, "applied: drain_seconds")
    rig.install_dropin("pusherd.service", "short-stop", "[Service]\nTimeoutStopSec=1500ms\n")
    rig.daemon_reload()
    clients = [ws_joined(rig, "public:drain") for _ in range(4)]
    began = time.monotonic()
    rig.systemctl("stop", "pusherd.service", timeout=30)
    took = time.monotonic() - began
    codes = [read_json_line(c) for c in clients]
    for c in clients:
        c.wait(10)
    log = rig.journal("pusherd.service")
    rig.run(["rm", "/run/systemd/system/pusherd.service.d/short-stop.conf"])
    rig.write_file(f"{CONF_DIR}/pusher.yml", config_text())
    rig.daemon_reload()

    assert codes == [{"closed": 1001}] * 4
    # 4 sockets closed in batches over 3 s: the last at ~2.25 s, past the 1.5 s stop timeout
    assert took > 2.0, took
    assert "timed out" not in log and "Killing" not in log, log[-3000:]
    assert "pusherd.service: Deactivated successfully." in log, log[-3000:]


def test_watchdog_restarts_a_hung_event_loop(rig):
    rig.install_dropin("pusherd.service", "watchdog", "[Service]\nWatchdogSec=2s\n"
                       "Environment=PUSHERD_DEBUG_HANG_ON_SIGUSR2=1\n")
    rig.daemon_reload()
    try:
        rig.systemctl("restart", "pusherd.service")
        hung = ensure_active(rig)
        restarts = int(rig.show("pusherd.service", "NRestarts")["NRestarts"])
        rig.systemctl("kill", "--kill-who=main", "--signal=SIGUSR2", "pusherd.service")
        deadline = time.monotonic() + 20
        while True:
            props = rig.show("pusherd.service", "NRestarts", "MainPID", "ActiveState", "SubState")
            if (int(props["NRestarts"]) > restarts and props["SubState"] == "running"
                    and int(props["MainPID"]) not in (0, hung)):
                break
            assert time.monotonic() < deadline, rig.diagnostics("pusherd.service")
            time.sleep(0.2)
        log = wait_journal(rig, "Failed with result 'watchdog'")
        assert "Watchdog timeout" in log
        # PYTHONFAULTHANDLER=1: the journal shows where the loop hung
        assert "Fatal Python error: Aborted" in log
        assert 'daemon.py", line' in log and "in hang" in log
        assert request(rig, "GET", "/healthz")[0] == 200
    finally:
        rig.run(["rm", "-f", "/run/systemd/system/pusherd.service.d/watchdog.conf"])
        rig.daemon_reload()


def test_secret_file_rotates_on_reload_with_a_supplementary_group(rig):
    """LoadCredential= copies are frozen at start; live rotation goes through a *_file that the
    dynamic user reads via SupplementaryGroups= (docs/operations.md). Debian's group adm stands
    in for the operator's pusherd-secrets group."""
    old, new = "old-publish-secret-0123456789abcdef0123", "new-publish-secret-0123456789abcdef0123"
    rig.run(["install", "-d", "-m", "750", "-g", "adm", "/run/pusherd-secrets"])
    rig.write_file("/run/pusherd-secrets/publish_secret", old + "\n", mode=0o640)
    rig.run(["chgrp", "adm", "/run/pusherd-secrets/publish_secret"])
    rig.write_file(f"{CONF_DIR}/pusher.yml",
                   config_text(publish_secret_file="/run/pusherd-secrets/publish_secret"))
    rig.install_dropin("pusherd.service", "secrets-group", "[Service]\nSupplementaryGroups=adm\n")
    rig.daemon_reload()
    try:
        rig.systemctl("restart", "pusherd.service")
        ensure_active(rig)
        body = {"topic": "public:rot", "event": "e"}
        assert request(rig, "POST", "/publish", body, old)[0] == 200
        assert request(rig, "POST", "/publish", body, PUBLISH_SECRET)[0] == 401  # the file wins
        rig.write_file("/run/pusherd-secrets/publish_secret", new + "\n", mode=0o640)
        rig.systemctl("reload", "pusherd.service")
        wait_journal(rig, "applied: publish_secret")
        assert request(rig, "POST", "/publish", body, new)[0] == 200
        assert request(rig, "POST", "/publish", body, old)[0] == 401
    finally:
        rig.run(["rm", "-f", "/run/systemd/system/pusherd.service.d/secrets-group.conf"])
        rig.write_file(f"{CONF_DIR}/pusher.yml", config_text())
        rig.daemon_reload()


def test_journal_has_priorities_and_no_secrets(rig):
    entries = [e for e in rig.journal_entries("pusherd.service") if e.get("SYSLOG_IDENTIFIER") == "pusherd"]
    by_priority = {}
    for e in entries:
        by_priority.setdefault(e["PRIORITY"], []).append(e["MESSAGE"])
    assert any(m.startswith("INFO pusherd: pusherd serving on") for m in by_priority.get("6", []))
    assert any(m.startswith("WARNING pusherd.access: 401 POST /publish") for m in by_priority.get("4", []))
    assert any(m.startswith("ERROR pusherd: reload refused") for m in by_priority.get("3", []))
    messages = [str(e["MESSAGE"]) for e in entries]
    assert not [m for m in messages if m[:1] == "<"]  # prefixes were turned into PRIORITY=
    assert not [m for m in messages if GUARDIAN_SECRET in m or PUBLISH_SECRET in m]
