"""An interpreter the hardened unit can run, for the end-to-end tests under a real systemd.

``ProtectHome=yes`` hides /root, where CI's Python (pyenv) lives, and ``PrivateTmp=yes`` hides
pytest's /tmp. The unit must run an install under /opt or /usr, as in production
(docs/operations.md): so the tests build, once per machine, a virtualenv of Debian's
``/usr/bin/python3`` at ``/opt/pusherd-test/venv`` with pusherd's ``install_requires`` from
setup.cfg (about 15 s the first time; a stamp file lists what it holds, so later runs reuse it
and a change of the requirements rebuilds it). pusherd itself is not installed there: each test
run copies the package of *this* checkout into ``/opt/pusherd-test/run-<id>/`` next to a
launcher script, so the service runs exactly the code under test (and the checkout may live
under /root, as CI's does).

Why not a venv of CI's pyenv Python: its standard library stays under /root. Why not Debian's
python3-tornado & co: their versions lag behind setup.cfg (python3-jwt is 2.6 in Debian 12).
"""

import configparser
import fcntl
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]
BASE = Path("/opt/pusherd-test")
VENV = BASE / "venv"
SYSTEM_PYTHON = Path("/usr/bin/python3")
STAMP = VENV / "pusherd-requirements.json"


def requirements() -> List[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]


def unavailable_reason() -> Optional[str]:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found (the unit needs an interpreter outside /root)"
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        return "Debian's python3-venv is not installed (apt-get install -y python3-venv)"
    return None


def ensure_venv() -> Path:
    """The shared virtualenv with pusherd's dependencies; built or rebuilt when needed."""
    BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    wanted = {"python": os.path.realpath(SYSTEM_PYTHON), "requires": requirements()}
    with open(BASE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs share the venv
        try:
            if json.loads(STAMP.read_text()) == wanted and (VENV / "bin" / "python").exists():
                return VENV
        except (OSError, ValueError):
            pass
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(VENV)], check=True,
                       capture_output=True, timeout=120)
        proc = subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet",
                               "--disable-pip-version-check", *wanted["requires"]],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            raise RuntimeError("pip install into %s failed:\n%s" % (VENV, proc.stderr[-2000:]))
        STAMP.write_text(json.dumps(wanted))
    return VENV


def stage_app() -> Path:
    """/opt/pusherd-test/run-<id>/ with a copy of this checkout's package and an executable
    ``pusherd`` launcher (the venv's python in its #! line); returns the directory.
    The launcher's directory comes first on sys.path, so ``import pusherd`` finds the copy."""
    venv = ensure_venv()
    run_dir = BASE / f"run-{uuid.uuid4().hex[:12]}"
    (run_dir / "bin").mkdir(mode=0o755, parents=True)
    shutil.copytree(REPO / "pusherd", run_dir / "bin" / "pusherd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    launcher = run_dir / "bin" / "pusherd-launch"
    launcher.write_text(f"#!{venv}/bin/python\nimport sys\nfrom pusherd.__main__ import main\n"
                        "sys.exit(main())\n")
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == launcher else 0o644)
    return run_dir


def remove_app(run_dir: Path) -> None:
    if run_dir.parent == BASE and run_dir.name.startswith("run-"):
        shutil.rmtree(run_dir, ignore_errors=True)
