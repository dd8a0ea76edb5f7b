"""pusherd's life under a service manager, against the real daemon over real sockets, with the
test playing PID 1: notify protocol (READY, WATCHDOG, RELOADING/READY, STOPPING, EXTEND),
socket activation (systemd-socket-activate and a held listener across a restart), the SIGTERM
drain (1001 to every socket, in batches, exit 0), SIGHUP reloads (secret rotation through a
file, broken config refused, log level), the open files limit and the access log.

The same lifecycle under a real systemd as PID 1: tests/systemd/test_e2e_pid1.py.
"""

import http.client as httpclient
import resource
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pusherd_testing import BASE_CONFIG, GUARDIAN_SECRET, PUBLISH_SECRET, PhxClient, free_port, http, rails_token, require

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lifecycle_testing import ManagedPusherd, NotifyListener, listening_socket  # noqa: E402

pytestmark = pytest.mark.integration

NEW_SECRET = "rotated-guardian-secret-9876543210fedcba"


def write_config(target: Path, **overrides) -> Path:
    settings = dict(BASE_CONFIG, log_level="info", drain_seconds=0.2)
    settings.update(overrides)
    target.write_text(yaml.safe_dump({"test": settings}))
    return target


@pytest.fixture
def notify(tmp_path):
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


@pytest.fixture
def managed():
    started = []

    def start(*args, **kwargs):
        d = ManagedPusherd(*args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def publish(base, topic, event="msg", payload=None, secret=PUBLISH_SECRET):
    return http("POST", base + "/publish", {"topic": topic, "event": event, "payload": payload or {}},
                {"Authorization": "Bearer " + secret, "Content-Type": "application/json"})


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --------------------------------------------------------------------------- notify protocol


def test_notify_ready_watchdog_reload_stopping(tmp_path, notify, managed):
    sock = listening_socket()
    port = sock.getsockname()[1]
    d = managed(write_config(tmp_path / "p.yml"), listeners=[sock], notify=notify,
                extra_env={"WATCHDOG_USEC": "300000"})  # 0.3 s: a ping every 0.15 s
    d.start(wait_log=None)

    ready = notify.wait_for(lambda f: f.get("READY") == "1")
    assert ready["pid"] == d.pid
    assert "config gen 1" in ready["fields"]["STATUS"]
    # READY=1 means served: the very next request is answered
    assert http("GET", "http://127.0.0.1:%d/healthz" % port, timeout=2)[0] == 200

    first = notify.count()
    notify.wait_for(lambda f: f.get("WATCHDOG") == "1", after=first, timeout=2)
    time.sleep(0.8)
    pings = [m for m in notify.messages[first:] if m["fields"].get("WATCHDOG") == "1"]
    assert 3 <= len(pings) <= 12, len(pings)
    assert all(m["pid"] == d.pid for m in pings)

    mark, before = notify.count(), monotonic_usec()
    d.signal(signal.SIGHUP)
    reloading = notify.wait_for(lambda f: "RELOADING" in f, after=mark)
    # RELOADING=1 and MONOTONIC_USEC in ONE datagram (Type=notify-reload on systemd >= 253)
    assert reloading["fields"]["RELOADING"] == "1"
    assert before <= int(reloading["fields"]["MONOTONIC_USEC"]) <= monotonic_usec()
    after_reload = notify.wait_for(lambda f: f.get("READY") == "1", after=notify.messages.index(reloading))
    assert "config gen 2" in after_reload["fields"]["STATUS"]

    mark = notify.count()
    d.signal(signal.SIGTERM)
    stopping = notify.wait_for(lambda f: f.get("STOPPING") == "1", after=mark)
    assert "draining" in stopping["fields"]["STATUS"]
    extend = notify.wait_for(lambda f: "EXTEND_TIMEOUT_USEC" in f, after=mark)
    assert int(extend["fields"]["EXTEND_TIMEOUT_USEC"]) > 1_000_000
    assert d.wait(15) == 0
    assert http_refused_or_queued(port)  # nobody serves the held listener any more


def http_refused_or_queued(port) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as c:  # the test holds the listener
        c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        c.settimeout(0.3)
        try:
            return c.recv(100) == b""
        except socket.timeout:
            return True


def test_no_watchdog_pings_without_watchdog_usec(tmp_path, notify, managed):
    d = managed(write_config(tmp_path / "p.yml"), listen="127.0.0.1:0", notify=notify)
    d.start(wait_log=None)
    notify.wait_for(lambda f: f.get("READY") == "1")
    time.sleep(0.5)
    assert not [m for m in notify.messages if "WATCHDOG" in m["fields"]]


# --------------------------------------------------------------------------- socket activation


def test_systemd_socket_activate_serves_the_first_connection(tmp_path, notify, managed):
    activate = shutil.which("systemd-socket-activate")
    require(activate is not None, "systemd-socket-activate not installed (Debian package systemd)")
    port = free_port()
    d = managed(write_config(tmp_path / "p.yml"), notify=notify,
                argv_prefix=[activate, "-l", "127.0.0.1:%d" % port, "--fdname=http",
                             "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET", "-E", "PYTHONUNBUFFERED"])
    d.start(wait_log="Listening on")
    # The daemon does not exist yet: systemd-socket-activate starts it on this connection.
    assert notify.count() == 0
    status, body, _ = http("GET", "http://127.0.0.1:%d/healthz" % port, timeout=10)
    assert status == 200 and body["status"] == "ok"
    ready = notify.wait_for(lambda f: f.get("READY") == "1")
    assert ready["pid"] == d.pid  # systemd-socket-activate execs in place
    assert "inherited sockets" in d.wait_log("serving on")


def test_restart_on_a_held_listener_refuses_nothing(tmp_path, managed):
    """The test holds the listener like PID 1: a request sent while no pusherd runs at all is
    answered by the next instance; the websocket of the old one gets 1001."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    config = write_config(tmp_path / "p.yml", drain_seconds=0.2)
    a = managed(config, listeners=[sock]).start()
    client = PhxClient("ws://127.0.0.1:%d/events" % port)
    assert client.join("public:lobby")[0] == "ok"
    a.signal(signal.SIGTERM)
    assert client.close_code() == 1001
    assert a.wait(10) == 0

    pending = socket.create_connection(("127.0.0.1", port), timeout=10)
    pending.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    b = managed(config, listeners=[sock]).start()
    pending.settimeout(10)
    answer = b""
    while chunk := pending.recv(4096):
        answer += chunk
    pending.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b.pid != a.pid


def test_metrics_socket_is_held_for_the_metrics_endpoint(tmp_path, managed):
    http_sock, metrics_sock = listening_socket(), listening_socket()
    d = managed(write_config(tmp_path / "p.yml"), listeners=[http_sock, metrics_sock],
                fd_names=["http", "metrics"]).start()
    d.wait_log("holding 1 inherited metrics socket(s)")
    port = http_sock.getsockname()[1]
    assert http("GET", "http://127.0.0.1:%d/healthz" % port)[0] == 200
    assert d.stop() == 0


# --------------------------------------------------------------------------- SIGTERM drain


def test_sigterm_closes_every_socket_with_1001_in_batches(tmp_path, managed):
    drain = 1.0
    sock = listening_socket()
    port = sock.getsockname()[1]
    d = managed(write_config(tmp_path / "p.yml", drain_seconds=drain), listeners=[sock]).start()
    url = "ws://127.0.0.1:%d/events" % port
    clients = [PhxClient(url, vsn="2.0.0" if i % 2 else "1.0.0") for i in range(16)]
    for c in clients:
        assert c.join("public:drain")[0] == "ok"
    # an HTTP connection opened before the stop is still served during the drain
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read()

    closed = {}

    def watch(i, c):
        closed[i] = (c.close_code(timeout=drain + 5), time.monotonic())

    threads = [threading.Thread(target=watch, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    d.signal(signal.SIGTERM)
    d.wait_log("shutting down: draining 16 connections")
    conn.request("POST", "/publish", body=b'{"topic": "public:drain", "event": "late"}',
                 headers={"Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Connection")) == (200, "close")
    resp.read()
    for t in threads:
        t.join(drain + 6)
    assert d.wait(drain + 10) == 0
    took = time.monotonic() - began

    assert sorted(code for code, _ in closed.values()) == [1001] * 16
    times = sorted(at for _, at in closed.values())
    # spread over the drain window, not all at once
    assert times[-1] - times[0] >= 0.5 * drain, [round(t - began, 2) for t in times]
    assert took < drain + 5, took
    conn.close()


def test_a_second_sigterm_ends_the_drain_at_once(tmp_path, managed):
    d = managed(write_config(tmp_path / "p.yml", drain_seconds=10), listen="127.0.0.1:0").start()
    port = int(d.wait_log("serving on").split("serving on ")[1].split(" ")[0].rsplit(":", 1)[1])
    clients = [PhxClient("ws://127.0.0.1:%d/events" % port) for _ in range(3)]
    d.signal(signal.SIGTERM)
    d.wait_log("draining 3 connections over 10.0s")
    began = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(5) == -signal.SIGTERM
    assert time.monotonic() - began < 2
    for c in clients:
        c.close()


# --------------------------------------------------------------------------- SIGHUP reload


def test_sighup_rotates_the_guardian_secret_file(tmp_path, managed, notify):
    secret_file = tmp_path / "guardian_secret"
    secret_file.write_text(GUARDIAN_SECRET + "\n")
    settings = dict(BASE_CONFIG, log_level="info", guardian_secret_file=str(secret_file))
    del settings["guardian_secret"]
    config = tmp_path / "p.yml"
    config.write_text(yaml.safe_dump({"test": settings}))
    d = managed(config, listen="127.0.0.1:0", notify=notify).start()
    port = int(d.wait_log("serving on").split("serving on ")[1].split(" ")[0].rsplit(":", 1)[1])
    base, url = "http://127.0.0.1:%d" % port, "ws://127.0.0.1:%d/events" % port

    old_token, csrf = rails_token(listen=["private:ops"])
    new_token, _ = rails_token(listen=["private:ops"], secret=NEW_SECRET)
    joined = PhxClient(url)
    assert joined.join("private:ops", {"guardian_token": old_token, "csrf_token": csrf})[0] == "ok"

    secret_file.write_text(NEW_SECRET + "\n")
    mark = d.mark()
    d.signal(signal.SIGHUP)
    line = d.wait_log("configuration reloaded (gen 2)", after=mark)
    assert "guardian_secret" in line and NEW_SECRET not in d.log()

    # the socket joined with the old secret stays up and keeps receiving
    assert publish(base, "private:ops", "after_rotation")[0] == 200
    assert joined.expect(event="after_rotation")["topic"] == "private:ops"
    # new joins need the new secret
    late = PhxClient(url)
    status, response, _ = late.join("private:ops", {"guardian_token": old_token, "csrf_token": csrf})
    assert (status, response) == ("error", {"reason": "invalid_token"})
    assert late.join("private:ops", {"guardian_token": new_token, "csrf_token": csrf})[0] == "ok"
    for c in (joined, late):
        c.close()


def test_broken_config_on_reload_is_refused_and_the_old_one_stays(tmp_path, managed, notify):
    config = write_config(tmp_path / "p.yml")
    d = managed(config, listen="127.0.0.1:0", notify=notify).start()
    port = int(d.wait_log("serving on").split("serving on ")[1].split(" ")[0].rsplit(":", 1)[1])
    base, url = "http://127.0.0.1:%d" % port, "ws://127.0.0.1:%d/events" % port
    client = PhxClient(url)
    assert client.join("public:keep")[0] == "ok"

    config.write_text(yaml.safe_dump({"test": dict(BASE_CONFIG, heartbeat_timeout="soon",
                                                   guardian_secret=NEW_SECRET)}))
    mark, nmark = d.mark(), notify.count()
    d.signal(signal.SIGHUP)
    line = d.wait_log("reload refused", after=mark)
    assert "heartbeat_timeout" in line and "keeping configuration gen 1" in line
    assert line.startswith(tuple("0123456789")) and " ERROR " in line
    assert NEW_SECRET not in d.log()
    # systemd still gets READY=1, or `systemctl reload` would hang until its timeout
    ready = notify.wait_for(lambda f: f.get("READY") == "1", after=nmark)
    assert "reload refused" in ready["fields"]["STATUS"]

    # the old configuration is in force: old secret joins, the socket is up, publishes flow
    token, csrf = rails_token(listen=["private:x"])
    assert PhxClient(url).join("private:x", {"guardian_token": token, "csrf_token": csrf})[0] == "ok"
    assert publish(base, "public:keep", "still")[0] == 200
    assert client.expect(event="still")["topic"] == "public:keep"

    # a YAML syntax error is refused the same way
    config.write_text("test: [unclosed\n")
    mark = d.mark()
    d.signal(signal.SIGHUP)
    d.wait_log("reload refused", after=mark)
    assert http("GET", base + "/healthz")[0] == 200


def test_reload_applies_log_level_and_origins_live_and_names_restart_keys(tmp_path, managed):
    config = write_config(tmp_path / "p.yml")
    sock = listening_socket()  # socket activation: the file's listen is not overridden
    port = sock.getsockname()[1]
    d = managed(config, listeners=[sock]).start()
    base, url = "http://127.0.0.1:%d" % port, "ws://127.0.0.1:%d/events" % port
    with pytest.raises(Exception):
        PhxClient(url, origin="https://evil.test")
    http("GET", base + "/healthz")
    d.wait_log("200 GET /healthz")

    write_config(config, log_level="warning", allowed_origins=["https://evil.test"],
                 listen="127.0.0.1:1", path="/socket", history=[{"topics": "deploys:*", "size": 5, "ttl": 60}])
    mark = d.mark()
    d.signal(signal.SIGHUP)
    line = d.wait_log("configuration reloaded", after=mark)
    assert "log_level" in line and "allowed_origins" in line
    assert "need a restart to take effect: listen, path, history" in d.wait_log("need a restart", after=mark)
    # warning level: the access line of a 200 is gone, the one of a 404 (warning) is not
    mark = d.mark()
    http("GET", base + "/healthz")
    http("GET", base + "/nope")
    d.wait_log("404 GET /nope", after=mark)
    assert not [line for line in d.lines[mark:] if "GET /healthz" in line]
    # the origin list changed live; listen and path did not (restart keys)
    PhxClient(url, origin="https://evil.test").close()


# --------------------------------------------------------------------------- process limits and logs


def test_open_files_soft_limit_is_raised_to_the_hard_limit(tmp_path, managed):
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("hard RLIMIT_NOFILE %d is too low to tell a raise apart" % hard)

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    d = managed(write_config(tmp_path / "p.yml"), listen="127.0.0.1:0", preexec_fn=low_soft_limit).start()
    limits = Path("/proc/%d/limits" % d.pid).read_text()
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert row.split()[3:5] == [str(hard), str(hard)], row
    assert "open files limit %d" % hard in d.wait_log("serving on")


def test_access_log_has_no_query_strings(tmp_path, managed):
    d = managed(write_config(tmp_path / "p.yml"), listen="127.0.0.1:0").start()
    port = int(d.wait_log("serving on").split("serving on ")[1].split(" ")[0].rsplit(":", 1)[1])
    http("GET", "http://127.0.0.1:%d/healthz?token=SECRET-IN-QUERY" % port)
    c = PhxClient("ws://127.0.0.1:%d/events" % port, params={"page_secret": "TOKEN-IN-QUERY"})
    c.close()
    d.wait_log("101 GET /events/websocket")
    line = d.wait_log("200 GET /healthz")
    assert line.endswith("ms") and "?" not in line
    assert "SECRET-IN-QUERY" not in d.log() and "TOKEN-IN-QUERY" not in d.log()

    write_config(d.config_path, access_log=False)
    mark = d.mark()
    d.signal(signal.SIGHUP)
    d.wait_log("configuration reloaded", after=mark)
    http("GET", "http://127.0.0.1:%d/healthz" % port)
    http("GET", "http://127.0.0.1:%d/nope" % port)
    time.sleep(0.2)
    assert not [line for line in d.lines[mark:] if " GET /" in line]
