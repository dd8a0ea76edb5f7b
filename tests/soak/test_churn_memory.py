"""Memory under connection churn: a bounded soak of the real daemon, in CI.

3,000 client slots join, push, leave and come back for two and a half minutes while a
publisher posts (bench/soak.py). After warm-up pusherd's RSS must be flat: a least-squares
slope under 1 MiB/min. The leak this guards against (frozen garbage cycles of closed sockets,
speedups.GcFreezer) grew at +10 to +16 MiB/min here; the fixed daemon measures about +0.2.
The bound is on memory, not time: a slow machine churns less, which only lowers a leak's slope,
so the check asserts first that enough churn happened for a leak to show.
"""

import json
import subprocess
import sys

import pytest

from pusherd_testing import ROOT

pytestmark = pytest.mark.slow

MAX_SLOPE_MIB_PER_MIN = 1.0
#: Connections opened and closed during the run; at the leak's ~2 KB per closed connection,
#: 8,000 would add 16 MiB, far above what the slope bound lets through.
MIN_CONNECTS = 8000


def test_rss_stays_flat_while_sockets_churn(tmp_path):
    summary_file = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--sockets", "3000", "--minutes", "2.5",
         "--interval", "5", "--warmup", "0.4", "--summary-json", str(summary_file)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    totals = summary["totals"]
    report = proc.stdout[-2500:]
    assert totals.get("connects", 0) >= MIN_CONNECTS, "too little churn to judge memory:\n" + report
    assert summary["publish_errors"] == 0, report
    assert summary["warm_samples"] >= 10, report
    assert summary["slope_mib_per_min"] < MAX_SLOPE_MIB_PER_MIN, report
