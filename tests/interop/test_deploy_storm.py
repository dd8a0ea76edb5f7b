"""The deploy storm with the real phoenix.js 1.8 (issue 18): 2,000 pages reconnect at once after
a deploy, each with its own Rails-style token, and join ``deploys:web``. Every one joins, with no
error on any socket: over the listener's cap (max_http_connections 1,000 by default) the rest
wait in the kernel's queue, and upgrades that arrive together wait for their batch on the front
(fast/front.py). Prints the time; the side-by-side figures are bench/run.py's storm scenarios."""

import pytest

from presence_storm import run_storm
from pusherd_testing import GUARDIAN_SECRET

pytestmark = pytest.mark.interop

N = 2000


def test_a_deploy_storm_of_2000_phoenix_js_pages_with_their_own_tokens_all_join(pusherd_factory, node_modules_ready):
    daemon = pusherd_factory({"log_level": "info", "access_log": False})
    summary = run_storm(daemon.ws_url, "deploys:web", N, GUARDIAN_SECRET, presence=False, rate=1000000, timeout=90)
    print("deploy storm of %d phoenix.js pages: all joined in %.1fs" % (N, summary["seconds"]))
    assert summary["complete"] and summary["joined"] == N and summary["errors"] == 0, summary
    assert not [line for line in daemon.lines if " ERROR " in line or "Traceback" in line], daemon.log()
