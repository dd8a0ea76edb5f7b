"""Boot a throwaway systemd as PID 1 in fresh namespaces, for end-to-end tests.

Our CI machines run as root but systemd is not PID 1 there, so ``systemctl``
cannot talk to anything. This helper gives a real systemd its own pid, mount,
net, uts, ipc and cgroup namespaces (so it *is* PID 1 in there), drives it with
``nsenter -t <pid1> -a systemctl ...`` and tears everything down again
(design: reference/systemd.md, section 5.7 and Appendix C).

Inside the rig:

* ``/lib/systemd/system`` is a private directory with stub targets (sysinit,
  basic, sockets, multi-user, network-online, ...; all ``DefaultDependencies=no``),
  journald's units and ``rig.target`` as the default target;
* ``/etc/systemd/system`` is empty and generators are disabled, so nothing of
  the host's configuration is started;
* ``/run``, ``/var/lib``, ``/var/tmp`` and ``/var/log/journal`` are tmpfs, so
  DynamicUser state, credentials and the journal never touch the host;
* ``/`` is made rshared, as a real PID 1 does (``LoadCredential=`` needs it);
* the network namespace has only ``lo``: tests talk to 127.0.0.1 inside it with
  ``rig.run(..., ns="net")`` (host file system, rig network) or ``ns="all"``.

Units under test go to ``/run/systemd/system`` (``install_unit``), changes to
them as drop-ins (``install_dropin``), followed by ``daemon_reload()``.

Usage::

    with SystemdRig() as rig:                      # boots, ~5-8 s here
        rig.install_unit("x.service", text)
        rig.daemon_reload()
        rig.systemctl("start", "x.service")
        rig.wait_for("x.service", ActiveState="active")
        print(rig.journal("x.service"))

Requirements: root with CAP_SYS_ADMIN, util-linux ``unshare``/``nsenter``,
systemd installed, a writable cgroup2 hierarchy (``/sys/fs/cgroup`` on a
unified host, ``/sys/fs/cgroup/unified`` on a hybrid one). ``unavailable_reason()``
says why not; ``skip_or_fail()`` turns that into a skip, or a failure when
``PUSHERD_NO_SKIP=1``.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[2]

SYSTEMD_BINARY = Path("/lib/systemd/systemd")
HOST_UNIT_DIR = Path("/lib/systemd/system")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

STUB_TARGETS = (
    "sysinit", "basic", "sockets", "timers", "paths", "slices", "shutdown", "umount",
    "local-fs", "local-fs-pre", "remote-fs", "swap", "network", "network-pre",
    "network-online", "multi-user", "nss-lookup", "time-sync", "getty", "emergency",
    "rescue", "final",
)
# `systemctl exit` starts exit.target; its service stops everything (every unit with
# default dependencies conflicts with shutdown.target) and then makes PID 1 exit.
EXIT_UNITS = {
    "exit.target": "[Unit]\nDescription=Exit the rig\nDefaultDependencies=no\n"
                   "Requires=systemd-exit.service\nAfter=systemd-exit.service\n"
                   "AllowIsolate=yes\n",
    "systemd-exit.service": "[Unit]\nDescription=Exit the rig\nDefaultDependencies=no\n"
                            "Requires=shutdown.target umount.target final.target\n"
                            "After=shutdown.target umount.target final.target\n"
                            "SuccessAction=exit-force\n",
}
JOURNALD_UNITS = (
    "systemd-journald.service", "systemd-journald.socket",
    "systemd-journald-dev-log.socket", "systemd-journald-audit.socket",
)
REQUIRED_TOOLS = ("unshare", "nsenter", "mount")

Argv = Sequence[Union[str, os.PathLike]]


class RigError(RuntimeError):
    """The rig could not boot or a command inside it failed."""


# --------------------------------------------------------------------------- skip policy


def no_skip() -> bool:
    return os.environ.get("PUSHERD_NO_SKIP") == "1"


def skip_or_fail(reason: str) -> None:
    """pytest.skip(reason), or pytest.fail(reason) when PUSHERD_NO_SKIP=1 (CI that
    must prove the systemd tests really ran)."""
    import pytest

    if no_skip():
        pytest.fail(f"{reason} (PUSHERD_NO_SKIP=1 turns this skip into a failure)")
    pytest.skip(reason)


def cgroup2_root() -> Optional[Path]:
    """Where the cgroup2 hierarchy is mounted, or None."""
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        try:
            if _fs_type(candidate) == "cgroup2":
                return candidate
        except OSError:
            continue
    return None


def _fs_type(path: Path) -> str:
    # /proc/self/mountinfo: "... mountpoint ... - fstype source options"
    best = ("", "")
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mountpoint = left.split()[4]
            if target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/"):
                if len(mountpoint) >= len(best[0]):
                    best = (mountpoint, right.split()[0])
    return best[1] if best[0] == target else ""


def unavailable_reason() -> Optional[str]:
    """None when a PID 1 rig can be booted here, else a human-readable reason."""
    if os.geteuid() != 0:
        return "booting systemd as PID 1 in namespaces needs root"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"util-linux tools missing: {', '.join(missing)}"
    if not os.access(SYSTEMD_BINARY, os.X_OK):
        return f"{SYSTEMD_BINARY} not found (install the systemd package)"
    for unit in JOURNALD_UNITS[:2]:
        if not (HOST_UNIT_DIR / unit).exists():
            return f"{HOST_UNIT_DIR / unit} not found"
    root = cgroup2_root()
    if root is None:
        return "no cgroup2 hierarchy mounted (checked /sys/fs/cgroup and /sys/fs/cgroup/unified)"
    if not os.access(root, os.W_OK):
        return f"cgroup2 hierarchy {root} is not writable"
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--cgroup",
             "--propagation", "private", "true"],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode != 0:
        return f"cannot create namespaces (unshare: {probe.stderr.strip()})"
    return None


# --------------------------------------------------------------------------- unit text helpers


def exec_quote(arg: Union[str, os.PathLike]) -> str:
    """Quote one argument for ExecStart= and friends: "..." with \\ and " escaped,
    % and $ doubled (no specifier or variable expansion). One line only."""
    text = os.fspath(arg)
    if "\n" in text:
        raise ValueError("ExecStart= arguments cannot contain newlines")
    text = (text.replace("\\", "\\\\").replace('"', '\\"')
            .replace("%", "%%").replace("$", "$$"))
    return f'"{text}"'


def exec_line(argv: Argv) -> str:
    """``["/usr/bin/python3", "-c", code]`` -> a value for ExecStart=."""
    return " ".join(exec_quote(a) for a in argv)


# --------------------------------------------------------------------------- the rig


class SystemdRig:
    """A throwaway systemd as PID 1. Use as a context manager, or start()/stop()."""

    def __init__(self, *, boot_timeout: float = 30.0, stop_timeout: float = 30.0,
                 log_level: str = "info", keep_workdir: bool = False):
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.keep_workdir = keep_workdir
        self.workdir: Optional[Path] = None
        self.cgroup: Optional[Path] = None
        self.outer: Optional[subprocess.Popen] = None
        self.pid1: Optional[int] = None
        self.system_state: Optional[str] = None
        self.boot_seconds: Optional[float] = None
        self._installed: List[str] = []
        self._private_tmp_before: set = set()
        self._outer_log = None

    # ---- lifecycle

    def __enter__(self) -> "SystemdRig":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SystemdRig":
        reason = unavailable_reason()
        if reason:
            raise RigError(reason)
        began = time.monotonic()
        try:
            self._prepare_workdir()
            self._spawn()
            self._wait_booted(began + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - began
        return self

    def _prepare_workdir(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pusherd-rig."))
        self.workdir.chmod(0o755)
        units = self.workdir / "units"
        units.mkdir()
        (self.workdir / "empty").mkdir()
        for target in STUB_TARGETS:
            (units / f"{target}.target").write_text(
                f"[Unit]\nDescription=rig stub {target}\nDefaultDependencies=no\n")
        for name, text in EXIT_UNITS.items():
            (units / name).write_text(text)
        for slice_name in ("-.slice", "system.slice"):
            (units / slice_name).write_text("[Unit]\nDefaultDependencies=no\n")
        for unit in JOURNALD_UNITS:
            if (HOST_UNIT_DIR / unit).exists():
                shutil.copy(HOST_UNIT_DIR / unit, units / unit)
        wants = " ".join(u for u in JOURNALD_UNITS if (units / u).exists())
        (units / "rig.target").write_text(
            f"[Unit]\nDescription=pusherd test rig\nDefaultDependencies=no\nWants={wants}\n")
        (units / "default.target").symlink_to("rig.target")
        (self.workdir / "console").write_text("")
        inner = self.workdir / "inner.sh"
        inner.write_text(self._inner_script())
        inner.chmod(0o755)
        self._private_tmp_before = set(Path("/tmp").glob("systemd-private-*"))

    def _inner_script(self) -> str:
        w = self.workdir
        return f"""#!/bin/sh
# PID 1 of the new pid namespace until it execs systemd. Mounts only affect
# the new mount namespace.
set -eu
mount --make-rprivate /
mount -t proc proc /proc
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /run/systemd/system
for d in /var/lib /var/tmp /var/log/journal; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=755 tmpfs "$d"; fi
done
chmod 1777 /var/tmp
mount --bind '{w}/units' /lib/systemd/system
mount --bind '{w}/empty' /etc/systemd/system
if [ -d /lib/systemd/system-generators ]; then
  mount --bind '{w}/empty' /lib/systemd/system-generators
fi
mount -t cgroup2 none /sys/fs/cgroup
mount --bind '{w}/console' /dev/console
mount --make-rshared /
ulimit -Sn 1024
exec env -i container=pusherd-rig PATH={PATH} LANG=C.UTF-8 \\
  {SYSTEMD_BINARY} --log-level={self.log_level} --show-status=no
"""

    def _spawn(self) -> None:
        root = cgroup2_root()
        assert root is not None and self.workdir is not None
        self.cgroup = root / f"pusherd-rig.{uuid.uuid4().hex[:12]}"
        self.cgroup.mkdir()
        self._outer_log = open(self.workdir / "outer.log", "wb")
        # The shell moves itself into the rig's cgroup, then becomes unshare, whose
        # forked child becomes PID 1 of the new pid namespace and execs inner.sh.
        # Safety net if the test process dies without stop(): setpriv makes unshare
        # die with us, and --kill-child then kills PID 1 (and so the whole rig).
        guard = "setpriv --pdeathsig KILL " if shutil.which("setpriv") else ""
        script = ('echo $$ > "$1/cgroup.procs" && exec ' + guard + 'unshare --kill-child '
                  '--pid --fork --mount --uts --ipc --net --cgroup --propagation private "$2"')
        self.outer = subprocess.Popen(
            ["sh", "-c", script, "sh", str(self.cgroup), str(self.workdir / "inner.sh")],
            stdin=subprocess.DEVNULL, stdout=self._outer_log, stderr=subprocess.STDOUT,
            env={"PATH": PATH}, start_new_session=True)

    def _wait_booted(self, deadline: float) -> None:
        assert self.outer is not None
        while self.pid1 is None:
            self._check_outer_alive()
            self.pid1 = _first_child(self.outer.pid)
            if self.pid1 is None:
                self._sleep_until(deadline, "PID 1 to appear")
        private = self.path("/run/systemd/private")
        while not private.is_socket():
            self._check_outer_alive()
            self._sleep_until(deadline, "/run/systemd/private")
        remaining = max(1.0, deadline - time.monotonic())
        # "running" or "degraded"; rc is non-zero for degraded, which we report.
        state = self.systemctl("is-system-running", "--wait", check=False, timeout=remaining)
        self.system_state = state.stdout.strip()
        if self.system_state not in ("running", "degraded"):
            raise RigError(f"systemd did not finish booting: {self.system_state!r}\n"
                           + self.diagnostics())
        # PID 1 logs to /dev/console (a file here) until told otherwise.
        self.run(["systemd-analyze", "log-target", "journal"], check=False)

    def _check_outer_alive(self) -> None:
        assert self.outer is not None
        if self.outer.poll() is not None:
            raise RigError(f"the rig exited early (rc={self.outer.returncode}):\n"
                           + self._read("outer.log") + self._read("console"))

    def _sleep_until(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise RigError(f"timed out waiting for {what}\n" + self._read("console"))
        time.sleep(0.05)

    def _read(self, name: str) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / name).read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Shut the rig down and remove every trace of it. Safe to call twice."""
        forced = False
        try:
            if self.outer is not None and self.outer.poll() is None:
                orderly = (self.pid1 is not None
                           and self.path("/run/systemd/private").is_socket()
                           and self.systemctl("exit", "--no-block", check=False,
                                              timeout=10).returncode == 0)
                # Orderly: `systemctl exit` stops every unit (their ExecStop=/drain
                # run, within stop_timeout), then PID 1 exits. Otherwise: kill.
                try:
                    self.outer.wait(timeout=self.stop_timeout if orderly else 0.01)
                except subprocess.TimeoutExpired:
                    forced = True
                    self._kill_everything()
        except Exception:  # noqa: BLE001 - whatever went wrong, leave nothing behind
            forced = True
            self._kill_everything()
        finally:
            self._cleanup(forced)

    def _kill_everything(self) -> None:
        if self.cgroup is not None and (self.cgroup / "cgroup.kill").exists():
            try:
                (self.cgroup / "cgroup.kill").write_text("1")
            except OSError:
                pass
        for pid in (self.pid1, self.outer.pid if self.outer else None):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)  # PID 1 gone = whole pid namespace gone
                except ProcessLookupError:
                    pass
        if self.outer is not None:
            try:
                self.outer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _cleanup(self, forced: bool) -> None:
        if self.cgroup is not None:
            deadline = time.monotonic() + 5
            while self.cgroup.exists():
                _remove_cgroup_tree(self.cgroup)
                if not self.cgroup.exists() or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self.cgroup = None
        if forced:  # a killed systemd could not remove its PrivateTmp= directories
            names = [u for u in self._installed if u.endswith(".service")]
            for leftover in set(Path("/tmp").glob("systemd-private-*")) - self._private_tmp_before:
                if any(f"-{name}-" in leftover.name for name in names):
                    shutil.rmtree(leftover, ignore_errors=True)
        if self._outer_log is not None:
            self._outer_log.close()
            self._outer_log = None
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.pid1 = None

    @property
    def running(self) -> bool:
        return self.outer is not None and self.outer.poll() is None and self.pid1 is not None

    # ---- commands inside

    def run(self, argv: Argv, *, ns: str = "all", check: bool = True, timeout: float = 30,
            env: Optional[Mapping[str, str]] = None, input: Optional[str] = None,
            ) -> subprocess.CompletedProcess:
        """Run argv inside the rig.

        ns="all": every namespace of PID 1, including its file system view (/run of
        the rig, its journal). ns="net": only the network namespace, so host files
        (the repo, pytest's tmp_path, the test venv) are usable while 127.0.0.1 is
        the rig's loopback. Raises RigError on a non-zero exit when check is True.
        """
        if self.pid1 is None:
            raise RigError("the rig is not running")
        flags = {"all": ["-a"], "net": ["-n"]}[ns]
        cmd = ["nsenter", "-t", str(self.pid1), *flags, "--", *map(os.fspath, argv)]
        full_env = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        if env:
            full_env.update(env)
        try:
            proc = subprocess.run(cmd, env=full_env, input=input, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RigError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
        if check and proc.returncode != 0:
            raise RigError(f"{' '.join(cmd)} -> rc {proc.returncode}\n"
                           f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30,
                  ) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *args],
                        check=check, timeout=timeout)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        """``systemctl show`` as a dict (all properties when none are named)."""
        args = ["show", unit]
        if props:
            args.append("--property=" + ",".join(props))
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float = 15, **expected: str) -> Dict[str, str]:
        """Poll ``systemctl show`` until every property has the expected value."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.show(unit, *expected)
            if all(got.get(k) == v for k, v in expected.items()):
                return got
            if time.monotonic() > deadline:
                raise RigError(f"{unit}: wanted {expected}, have {got}\n"
                               + self.diagnostics(unit))
            time.sleep(0.1)

    def journal(self, unit: Optional[str] = None, *args: str) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-monotonic", *args]
        if unit:
            argv += ["-u", unit]
        return self.run(argv, check=False).stdout

    def journal_entries(self, unit: str) -> List[Dict[str, object]]:
        """The unit's journal entries as dicts (MESSAGE, PRIORITY, SYSLOG_IDENTIFIER...)."""
        out = self.run(["journalctl", "--no-pager", "-o", "json", "-u", unit], check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def diagnostics(self, unit: Optional[str] = None) -> str:
        """Status and journal, for assertion messages."""
        if not self.running:
            return self._read("console")
        parts = []
        if unit:
            parts.append(self.systemctl("status", unit, check=False).stdout)
        parts.append(self.systemctl("list-units", "--failed", check=False).stdout)
        parts.append(self.journal(unit, "-n", "60"))
        return "\n".join(parts)

    # ---- files inside

    def path(self, inner: str) -> Path:
        """A host path that reaches ``inner`` in the rig's mount namespace."""
        if self.pid1 is None:
            raise RigError("the rig is not running")
        return Path(f"/proc/{self.pid1}/root") / inner.lstrip("/")

    def write_file(self, inner: str, text: str, mode: int = 0o644) -> Path:
        target = self.path(inner)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    def install_unit(self, name: str, text: str) -> None:
        """Install a unit into /run/systemd/system (call daemon_reload() afterwards)."""
        self.write_file(f"/run/systemd/system/{name}", text)
        self._installed.append(name)

    def install_unit_files(self, paths: Iterable[Union[str, os.PathLike]]) -> None:
        for p in paths:
            p = Path(p)
            self.install_unit(p.name, p.read_text())

    def install_dropin(self, unit: str, name: str, text: str) -> None:
        """/run/systemd/system/<unit>.d/<name>.conf (call daemon_reload() afterwards)."""
        if not name.endswith(".conf"):
            name += ".conf"
        self.write_file(f"/run/systemd/system/{unit}.d/{name}", text)


def _first_child(pid: int) -> Optional[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    if children:
        return int(children[0])
    for stat in Path("/proc").glob("[0-9]*/stat"):  # fallback without CONFIG_PROC_CHILDREN
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    return None


def _remove_cgroup_tree(path: Path) -> None:
    for dirpath, dirnames, _files in os.walk(path, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass
