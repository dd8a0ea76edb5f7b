"""The live demo page in real headless Chromium, end to end: the page loads phoenix.js from the npm
package, connects, joins, shows what `pusherd publish` sends, pushes `msg`, and reloads itself on a
`new_version` deploy event on `deploys:web` (the system's first use case).

Needs /usr/bin/chromium, node and `npm ci` in tests/browser (playwright-core, phoenix): skipped on
a laptop without them, a failure in CI (PUSHERD_NO_SKIP=1).
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pusherd_testing import ROOT, require

pytestmark = pytest.mark.integration

BROWSER_DIR = Path(__file__).resolve().parent
NODE_MODULES = BROWSER_DIR / "node_modules"
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 10000


def _modules_ready() -> bool:
    return all((NODE_MODULES / name / "package.json").is_file() for name in ("playwright-core", "phoenix"))


@pytest.fixture(scope="session")
def browser_tools():
    require(os.path.exists(CHROMIUM), "Debian's chromium is not installed (apt-get install chromium)")
    require(shutil.which("node") is not None, "node is not installed")
    if not _modules_ready() and shutil.which("npm"):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=str(BROWSER_DIR),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    require(_modules_ready(), "tests/browser/node_modules is missing (run npm ci in tests/browser)")


class Chromium:
    """One Chromium driven through driver.js (JSON lines over stdin/stdout)."""

    def __init__(self, user_data_dir: Path):
        self.proc = subprocess.Popen(["node", str(BROWSER_DIR / "driver.js")], cwd=str(BROWSER_DIR),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.answers: "queue.Queue[dict]" = queue.Queue()
        self.console = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.version = self.call("launch", timeout=60, executablePath=CHROMIUM, userDataDir=str(user_data_dir))

    def _read(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "event" in msg:
                self.console.append("%s: %s" % (msg["event"], msg["text"]))
            else:
                self.answers.put(msg)

    def call(self, cmd, timeout=20.0, **args):
        self._id += 1
        self.proc.stdin.write(json.dumps(dict(args, id=self._id, cmd=cmd)) + "\n")
        self.proc.stdin.flush()
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("browser did not answer %s within %ss; console:\n%s"
                                 % (cmd, timeout, "\n".join(self.console))) from None
        assert answer["id"] == self._id
        if not answer["ok"]:
            raise AssertionError("%s failed: %s\nconsole:\n%s" % (cmd, answer["error"], "\n".join(self.console)))
        return answer["result"]

    def click(self, selector):
        return self.call("click", selector=selector)

    def wait(self, selector, state="visible"):
        return self.call("wait", selector=selector, state=state, timeout=WAIT_MS)

    def wait_true(self, expression):
        return self.call("waitFunction", expression=expression, timeout=WAIT_MS)

    def close(self):
        try:
            self.call("close", timeout=10)
        except (AssertionError, OSError, ValueError):
            pass
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def chromium(browser_tools, tmp_path_factory):
    """One browser for the module (each test's daemon has its own port, hence its own origin)."""
    browser = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


def pusherd_cli(daemon, *args, timeout=30):
    """Run `pusherd ...` against the daemon's config file, as a deploy script would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("PUSHERD_URL", "PUSHERD_PUBLISH_SECRET", "PUSHERD_CONFIG", "PUSHERD_ENV"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "pusherd", *args, "--config", str(daemon.config_path),
                             "--env", daemon.env], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def demo_daemon(pusherd_factory, **overrides):
    settings = {"demo": True, "demo_assets": str(NODE_MODULES / "phoenix"),
                "allowed_origins": ["http://127.0.0.1:*"]}
    settings.update(overrides)
    daemon = pusherd_factory(settings)
    # `pusherd publish --config` finds the daemon through the file's listen, as a deploy hook would.
    daemon.settings["listen"] = "0.0.0.0:%d" % daemon.port
    daemon.write_config(daemon.settings)
    return daemon


def join_deploys_with_a_pasted_token(chromium, daemon):
    """Join deploys:web with a token minted like the Rails helper does, pasted into the page."""
    token, csrf = pusherd_cli(daemon, "token", "--listen", "deploys:web", "--csrf").split()
    chromium.call("fill", selector="#topic", value="deploys:web")
    chromium.call("fill", selector="#token", value=token)
    chromium.call("fill", selector="#csrf", value=csrf)
    chromium.click("#join")
    chromium.wait('#channels li[data-topic="deploys:web"][data-status="joined"]')


def test_page_connects_joins_shows_published_events_and_reloads_on_deploy(pusherd_factory, chromium, phx_connect):
    daemon = demo_daemon(pusherd_factory)
    assert chromium.call("goto", url=daemon.http_url + "/demo")["status"] == 200
    chromium.wait('#state[data-state="open"]')

    # Join public:lobby (the page's default topic), without a token.
    chromium.click("#join")
    chromium.wait('#channels li[data-topic="public:lobby"][data-status="joined"]')

    # An event published from the shell shows up in the page.
    pusherd_cli(daemon, "publish", "public:lobby", "msg", '{"body": "from the shell"}')
    chromium.wait('#events li[data-topic="public:lobby"][data-event="msg"]:has-text("from the shell")')

    # A msg push from the page reaches other members (and the page itself).
    other = phx_connect(daemon.ws_url)
    assert other.join("public:lobby")[0] == "ok"
    chromium.call("fill", selector="#body", value="from the page")
    chromium.click("#send")
    chromium.wait('#push-status:has-text("sent")')
    assert other.expect(event="msg")["payload"] == {"body": "from the page"}
    chromium.wait('#events li[data-event="msg"]:has-text("from the page")')

    join_deploys_with_a_pasted_token(chromium, daemon)
    assert chromium.call("evaluate", expression="document.getElementById('reloaded').hidden") is True

    # The deploy hook: every subscribed page reloads itself.
    chromium.call("evaluate", expression="window.beforeDeploy = true")
    pusherd_cli(daemon, "publish", "deploys:web", "new_version", '{"version": "v2"}')
    chromium.wait('#reloaded:has-text("v2")')
    assert chromium.call("evaluate", expression="window.beforeDeploy === undefined") is True  # a new document
    # After the reload the page is subscribed again (the joins live in sessionStorage).
    chromium.wait('#state[data-state="open"]')
    chromium.wait('#channels li[data-topic="deploys:web"][data-status="joined"]')
    if os.environ.get("PUSHERD_DEMO_SCREENSHOT"):
        chromium.call("screenshot", path=os.environ["PUSHERD_DEMO_SCREENSHOT"])


def test_page_shows_a_refused_join_with_its_reason(pusherd_factory, chromium):
    daemon = demo_daemon(pusherd_factory)
    chromium.call("goto", url=daemon.http_url + "/demo")
    chromium.wait('#state[data-state="open"]')
    chromium.call("fill", selector="#topic", value="private:secret")
    chromium.click("#join")
    chromium.wait('#channels li[data-topic="private:secret"][data-status="refused"]:has-text("authentication_required")')


def test_page_says_when_the_phoenix_client_is_missing(pusherd_factory, chromium, tmp_path):
    empty = tmp_path / "no-assets"
    empty.mkdir()
    daemon = demo_daemon(pusherd_factory, demo_assets=str(empty))
    chromium.call("goto", url=daemon.http_url + "/demo")
    chromium.wait("#client-missing")
    text = chromium.call("text", selector="#client-missing")
    assert "npm install phoenix" in text and str(empty) in text
    assert chromium.call("text", selector="#state") == "no client"


def test_page_with_history_reloads_once_per_deploy_and_recovers_deploys_missed_while_reloading(
        pusherd_factory, chromium):
    daemon = demo_daemon(pusherd_factory, history=[{"topics": "deploys:*", "size": 20, "ttl": 3600}])
    assert chromium.call("goto", url=daemon.http_url + "/demo")["status"] == 200
    chromium.wait('#state[data-state="open"]')
    join_deploys_with_a_pasted_token(chromium, daemon)

    chromium.call("evaluate", expression="window.marker = 1")
    pusherd_cli(daemon, "publish", "deploys:web", "new_version", '{"version": "v2"}')
    chromium.wait('#reloaded:has-text("v2")')
    chromium.wait('#channels li[data-topic="deploys:web"][data-status="joined"]')
    # The rejoin carried `since` = the v2 event: nothing replayed, so no reload loop.
    chromium.call("evaluate", expression="window.marker = 2")
    daemon.publish("public:tick", "noop", {})       # let a moment pass through the daemon
    import time
    time.sleep(1.0)
    assert chromium.call("evaluate", expression="window.marker") == 2

    # The page is away (the tab navigated elsewhere) while the next deploy happens; when it
    # comes back it rejoins from sessionStorage with `since`, gets the missed deploy replayed,
    # and reloads for it.
    chromium.call("goto", url="about:blank")
    pusherd_cli(daemon, "publish", "deploys:web", "new_version", '{"version": "v3"}')
    chromium.call("goto", url=daemon.http_url + "/demo")
    chromium.wait('#reloaded:has-text("v3")')


def test_page_lists_who_is_on_a_joined_presence_topic(pusherd_factory, chromium):
    from presence_testing import Page
    daemon = demo_daemon(pusherd_factory, presence=[{"topics": "private:*", "key": "id", "meta": ["name"]}])
    chromium.call("goto", url=daemon.http_url + "/demo")
    chromium.wait('#state[data-state="open"]')
    token, csrf = pusherd_cli(daemon, "token", "--listen", "private:*", "--sub", '{"id": 1, "name": "Ann"}',
                              "--csrf").split()
    chromium.call("fill", selector="#topic", value="private:ops")
    chromium.call("fill", selector="#token", value=token)
    chromium.call("fill", selector="#csrf", value=csrf)
    chromium.click("#join")
    chromium.wait('.presence-topic[data-topic="private:ops"] li[data-key="1"]:has-text("Ann")')
    # Another member with two tabs comes and goes: the page's list follows.
    tabs = [Page(daemon, "private:ops", {"id": 2, "name": "Bob"}) for _ in range(2)]
    chromium.wait('.presence-topic[data-topic="private:ops"] li[data-key="2"][data-metas="2"]:has-text("Bob")')
    for tab in tabs:
        tab.close()
    chromium.wait('.presence-topic[data-topic="private:ops"] li[data-key="2"]', state="detached")
    assert chromium.call("evaluate", expression="document.querySelectorAll('.presence li').length") == 1
