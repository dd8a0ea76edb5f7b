"""The core is pure: no module under pusherd/core imports anything that does I/O, reads the clock
or draws randomness (those come in as parameters), nor anything of pusherd outside the core.

Logging is allowed: it is how the core reports refusals, and it writes nowhere by itself (the
daemon configures the handlers).
"""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[3] / "pusherd" / "core"

#: Top-level modules the core may not import (directly or as ``from x import y``).
FORBIDDEN = {
    "asyncio", "socket", "select", "selectors", "ssl", "time", "random", "secrets", "os", "sys", "io",
    "subprocess", "threading", "multiprocessing", "signal", "http", "urllib", "tornado", "redis",
    "prometheus_client", "yaml", "uvloop", "shutil", "pathlib", "tempfile", "datetime",
}
#: Modules the core may import from urllib (parsing only, no requests).
ALLOWED_SUBMODULES = {"urllib.parse"}


def core_modules():
    return sorted(p for p in CORE.glob("*.py"))


def imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must stay inside the core
                yield ("." * node.level) + (node.module or ""), node.lineno
            else:
                yield node.module, node.lineno


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_no_io(path):
    for name, line in imports(path):
        if name.startswith(".."):
            pytest.fail("%s:%d imports %s: the core imports nothing of pusherd outside pusherd/core" % (path.name, line, name))
        if name.startswith("."):
            continue
        if name in ALLOWED_SUBMODULES:
            continue
        top = name.split(".")[0]
        assert top not in FORBIDDEN, "%s:%d imports %s (I/O, the clock or randomness: pass it in)" % (path.name, line, name)
        assert top != "pusherd", "%s:%d imports %s: use a relative import inside the core" % (path.name, line, name)


def test_the_check_sees_every_core_module():
    names = {p.stem for p in core_modules()}
    assert {"protocol", "session", "tokens", "topics", "access", "publish", "history", "origins",
            "presence"} <= names
