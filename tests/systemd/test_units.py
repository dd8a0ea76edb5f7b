"""The unit files in systemd/: offline checks, no running systemd needed.

* ``systemd-analyze verify --man=no``: parse errors and unknown keys are only
  warnings with rc 0, so ANY output is a failure here;
* ``systemd-analyze security --offline=yes --threshold=20``: the threshold is on
  the internal 0-100 scale, i.e. exposure <= 2.0 as printed;
* ``systemctl --root=DIR enable``: the [Install] sections;
* static project rules (no PartOf= on the sockets, stop timeout > drain, ...).

verify insists that ExecStart= exists, so the units are staged in a temporary
directory with /opt/pusherd/bin/pusherd replaced by a copy of /bin/true, unless
pusherd is really installed there.

Without systemd-analyze the tests are skipped (failed with PUSHERD_NO_SKIP=1).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pid1  # noqa: E402  (skip policy)

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
UNITS = ("pusherd.service", "pusherd.socket", "pusherd@.service", "pusherd@.socket")
SERVICES = ("pusherd.service", "pusherd@.service")
SOCKETS = ("pusherd.socket", "pusherd@.socket")
INSTALLED_EXEC = "/opt/pusherd/bin/pusherd"

# drain_seconds default of the daemon (pusherd.config.Settings, read when importable);
# the stop timeout must cover it, Tornado's
# 5 s close-handshake abort and a margin (reference/systemd.md, section 3.2).
DEFAULT_DRAIN_SECONDS = 5
CLOSE_HANDSHAKE_SECONDS = 5
MARGIN_SECONDS = 5

MAX_EXPOSURE = 2.0
# checks that a public network server cannot pass (reference/systemd.md 3.1)
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=", "RestrictAddressFamilies=~AF_(INET|INET6)", "RestrictAddressFamilies=~AF_UNIX",
    "IPAddressDeny=", "RootDirectory=/RootImage=", "DeviceAllow=",
}


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pid1.skip_or_fail(f"{name} not found: install the systemd package "
                          "(apt-get install -y systemd) to check the unit files")
    return path


def systemd_version() -> int:
    out = subprocess.run([tool("systemd-analyze"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def run(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER=""))


def parse_unit(text: str):
    """[(section, key, value)] in file order; repeated keys kept (configparser can't)."""
    entries, section = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(unit: str, key: str, section: str = None):
    return [v for s, k, v in parse_unit((UNIT_DIR / unit).read_text())
            if k == key and (section is None or s == section)]


def value(unit: str, key: str, section: str = None) -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{unit}: expected one {key}=, found {found}"
    return found[0]


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture
def stage(tmp_path):
    """The units in a temp dir; ExecStart= pointed at an existing executable."""
    exec_path = INSTALLED_EXEC
    if not os.access(INSTALLED_EXEC, os.X_OK):
        stub = tmp_path / "bin" / "pusherd"
        stub.parent.mkdir()
        shutil.copy("/bin/true", stub)
        exec_path = str(stub)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert (INSTALLED_EXEC in text) == name.endswith(".service"), name
        (units / name).write_text(text.replace(INSTALLED_EXEC, exec_path))
    return units


# --------------------------------------------------------------------------- systemd-analyze verify


# verify an *instance* of a template so %i is expanded; the template is found next to it
@pytest.mark.parametrize("unit", ["pusherd.service", "pusherd.socket",
                                  "pusherd@1.service", "pusherd@1.socket"])
def test_verify_is_silent(stage, unit):
    proc = run([tool("systemd-analyze"), "verify", "--man=no", f"./{unit}"], cwd=stage)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and output == "", output


def test_verify_check_catches_warnings(stage):
    """The 'any output fails' rule matters: a typo is only a warning with rc 0."""
    unit = stage / "pusherd.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    proc = run([tool("systemd-analyze"), "verify", "--man=no", "./pusherd.service"], cwd=stage)
    assert "Unknown key 'ProtectSystm'" in proc.stdout + proc.stderr


def test_verify_without_the_socket_unit(stage):
    """Socket activation is optional: the service must load without pusherd.socket."""
    (stage / "pusherd.socket").unlink()
    proc = run([tool("systemd-analyze"), "verify", "--man=no", "./pusherd.service"], cwd=stage)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and output == "", output


def test_notify_reload_dropin(stage):
    """The drop-in is clean on systemd >= 253; on 252 it is rejected, which is why
    it is not part of the main unit (252 would run the service as Type=simple)."""
    dropin_dir = stage / "pusherd.service.d"
    dropin_dir.mkdir()
    shutil.copy(UNIT_DIR / "notify-reload.conf", dropin_dir)
    proc = run([tool("systemd-analyze"), "verify", "--man=no", "./pusherd.service"], cwd=stage)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0, lines
    if systemd_version() >= 253:
        assert lines == []
    else:
        assert len(lines) == 2, lines
        assert "Failed to parse service type, ignoring: notify-reload" in lines[0]
        assert "Unknown key 'ReloadSignal'" in lines[1]


# --------------------------------------------------------------------------- systemd-analyze security


def exposure(stage, unit):
    proc = run([tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20",
                f"./{unit}"], cwd=stage)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return proc, float(match.group(1))


@pytest.mark.parametrize("unit", ["pusherd.service", "pusherd@1.service"])
def test_security_exposure_at_most_2(stage, unit):
    proc, score = exposure(stage, unit)
    assert score <= MAX_EXPOSURE, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr  # --threshold=20 agrees


@pytest.mark.parametrize("unit", ["pusherd.service", "pusherd@1.service"])
def test_security_only_network_server_exposures_remain(stage, unit):
    proc = run([tool("systemd-analyze"), "security", "--offline=yes", "--json=short",
                f"./{unit}"], cwd=stage)
    assert proc.returncode == 0, proc.stderr
    failing = {c["name"] for c in json.loads(proc.stdout)
               if not c["set"] and c.get("exposure") not in (None, 0, "0.0")}
    assert failing <= ACCEPTED_EXPOSURES, f"new exposures: {sorted(failing - ACCEPTED_EXPOSURES)}"


# --------------------------------------------------------------------------- [Install]


def test_enable_creates_the_expected_links(tmp_path):
    systemctl = tool("systemctl")
    etc = tmp_path / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(UNIT_DIR / name, etc)
    for args in (["pusherd.service"], ["pusherd@0.service", "pusherd@1.service"]):
        proc = run([systemctl, f"--root={tmp_path}", "enable", *args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    links = sorted(str(p.relative_to(etc)) for p in etc.rglob("*") if p.is_symlink())
    assert links == [
        "multi-user.target.wants/pusherd.service",
        "multi-user.target.wants/pusherd@0.service",
        "multi-user.target.wants/pusherd@1.service",
        "sockets.target.wants/pusherd.socket",        # Also=: enabling the service enables both
        "sockets.target.wants/pusherd@0.socket",
        "sockets.target.wants/pusherd@1.socket",
    ]


# --------------------------------------------------------------------------- project rules (static)


@pytest.mark.parametrize("unit", SERVICES)
def test_service_contract(unit):
    assert value(unit, "Type") == "notify"
    assert value(unit, "NotifyAccess") == "main"
    assert value(unit, "ExecStart").startswith(INSTALLED_EXEC + " --config /etc/pusherd/pusher.yml")
    assert value(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(unit, "WatchdogSec") == "30s"
    assert value(unit, "Restart") == "on-failure"
    assert value(unit, "DynamicUser") == "yes"
    assert value(unit, "LimitNOFILE") == "65536"
    assert sorted(values(unit, "LoadCredential")) == [
        "guardian_secret:/etc/pusherd/guardian_secret",
        "publish_secret:/etc/pusherd/publish_secret",
    ]
    env = " ".join(values(unit, "Environment")).split()
    assert {"PUSHERD_ENV=production", "PYTHONFAULTHANDLER=1", "PYTHONUNBUFFERED=1"} <= set(env)
    assert value(unit, "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert values(unit, "SystemCallFilter")[0] == "@system-service"


@pytest.mark.parametrize("unit", SERVICES)
def test_stop_timeout_covers_the_drain(unit):
    import dataclasses
    from pusherd import config  # noqa: PLC0415 - the daemon's own default, which the units must cover
    drain = next(f.default for f in dataclasses.fields(config.Settings) if f.name == "drain_seconds")
    assert drain == DEFAULT_DRAIN_SECONDS, "docs and units say %s s; the daemon's default is %s" % (
        DEFAULT_DRAIN_SECONDS, drain)
    need = drain + CLOSE_HANDSHAKE_SECONDS + MARGIN_SECONDS
    assert seconds(value(unit, "TimeoutStopSec")) >= need


@pytest.mark.parametrize("unit", SERVICES)
def test_no_notify_reload_in_the_main_units(unit):
    # systemd 252 (Debian 12, RHEL 9) would run the service as Type=simple
    assert "notify-reload" not in " ".join(values(unit, "Type"))


@pytest.mark.parametrize("unit", SERVICES)
def test_socket_activation_is_optional(unit):
    """Wants=, not Requires=/BindsTo=: `systemctl mask pusherd.socket` must leave a
    service that starts and binds its port itself."""
    socket_unit = "pusherd.socket" if unit == "pusherd.service" else "pusherd@%i.socket"
    assert socket_unit in " ".join(values(unit, "Wants")).split()
    assert socket_unit in " ".join(values(unit, "After")).split()
    for strong in ("Requires", "BindsTo", "Requisite"):
        assert socket_unit not in " ".join(values(unit, strong)).split()


def test_sandbox_identical_in_both_services():
    def sandbox(unit):
        entries = [(k, v) for s, k, v in parse_unit((UNIT_DIR / unit).read_text())
                   if s == "Service"]
        skip = {"ExecStart", "Environment", "SyslogIdentifier", "RuntimeDirectory"}
        return [(k, v) for k, v in entries if k not in skip]

    assert sandbox("pusherd.service") == sandbox("pusherd@.service")


def test_template_uses_flat_directories():
    runtime = value("pusherd@.service", "RuntimeDirectory")
    assert "%i" in runtime and "/" not in runtime


@pytest.mark.parametrize("unit", SOCKETS)
def test_socket_rules(unit):
    assert values(unit, "PartOf") == []  # a restart would close the listener (measured)
    assert value(unit, "FileDescriptorName") == "http"
    assert int(value(unit, "Backlog")) >= 1024
    assert values(unit, "ListenStream"), "no ListenStream="
    assert value(unit, "WantedBy", "Install") == "sockets.target"


def test_template_socket_reuses_the_port():
    assert value("pusherd@.socket", "ReusePort") == "yes"
    assert value("pusherd@.socket", "Service") == "pusherd@%i.service"
    assert values("pusherd@.socket", "ListenStream") == values("pusherd.socket", "ListenStream")


def test_notify_reload_dropin_content():
    entries = parse_unit((UNIT_DIR / "notify-reload.conf").read_text())
    assert entries == [
        ("Service", "Type", "notify-reload"),
        ("Service", "ReloadSignal", "SIGHUP"),
        ("Service", "ExecReload", ""),
    ]
