"""The Ruby in docs/rails.md, run as written (ruby + ruby-jwt), against a real pusherd: the token helpers'
tokens join, and the publisher delivers, fails with the server's reason, and gives up when pusherd is down.

The helper bound to Rails' own CSRF token runs inside real Rails (Debian's ruby-actionpack): a
controller with a session renders the guide's <head>, csrf_meta_tags and all, and the page's masked
token joins. Elsewhere only Rails itself is stood in for (Rails.env, Rails.configuration,
30.days.from_now, a user record).
"""

import json
import os
import shutil
import subprocess

import pytest

from pusherd.core.rails_csrf import unmask
from pusherd_testing import GUARDIAN_SECRET, PUBLISH_SECRET, Pusherd, free_port, require
from rails_app import guide_block, rails_app_script, render_rails_pages

pytestmark = pytest.mark.integration

RAILS_STANDIN = r'''
require "json"
require "jwt"
require "securerandom"
require "ostruct"

class Integer
  def days; self * 86400; end
  def from_now; Time.now + self; end
end

module Rails
  def self.env; "test"; end
  def self.configuration; @configuration ||= OpenStruct.new(pusher: { "x_http_url" => ENV.fetch("PUSHERD_HTTP_URL") }); end
end

User = Struct.new(:id, :name, :email, :crew_ids, :admin) do
  def admin?; admin; end
end
'''

SCRIPT = r'''
class Page
  include PusherHelper
  def current_user; nil; end
end

command = ARGV[0]
if command == "credentials"
  user = User.new(7, "Ada", "ada@example.com", [3], ARGV[1] == "admin")
  page = Page.new
  first = page.pusher_credentials(user)
  raise "not memoized per page" unless page.pusher_credentials(user).equal?(first)
  puts JSON.generate(first)
else
  begin
    puts JSON.generate(PusherPublisher.publish(JSON.parse(ARGV[1]), ARGV[2], JSON.parse(ARGV[3]), retries: ARGV[4].to_i))
  rescue PusherPublisher::Error => e
    warn e.message
    exit 1
  end
end
'''


@pytest.fixture(scope="module")
def ruby_script(tmp_path_factory):
    ruby = shutil.which("ruby")
    require(ruby is not None and subprocess.run([ruby, "-rjwt", "-e", ""], capture_output=True).returncode == 0,
            "ruby with ruby-jwt is not installed (apt-get install ruby ruby-jwt)")
    path = tmp_path_factory.mktemp("rails") / "guide.rb"
    path.write_text("\n".join([RAILS_STANDIN, guide_block("def pusher_credentials"),
                               guide_block("module PusherPublisher"), SCRIPT]))
    return path


def run_ruby(script, *args, url, secret=PUBLISH_SECRET):
    env = dict(os.environ, GUARDIAN_SECRET=GUARDIAN_SECRET, PUSHER_PUBLISH_SECRET=secret, PUSHERD_HTTP_URL=url)
    return subprocess.run(["ruby", str(script), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Pusherd(tmp_path_factory.mktemp("pusherd"), {"issuer": "od-web-test"}).start()
    yield d
    d.stop()


def test_the_token_helper_mints_tokens_pusherd_accepts(ruby_script, daemon, phx_connect):
    result = run_ruby(ruby_script, "credentials", "member", url=daemon.http_url)
    assert result.returncode == 0, result.stderr
    creds = json.loads(result.stdout)
    params = {"guardian_token": creds["token"], "csrf_token": creds["csrf"]}
    c = phx_connect(daemon.ws_url)
    assert c.join("deploys:web", params)[0] == "ok"
    assert c.join("private:user-7", params)[0] == "ok"
    assert c.join("private:user-8", params)[1] == {"reason": "forbidden"}
    assert c.push("private:user-7", "msg", {})[1] == {"reason": "forbidden"}  # members publish nothing
    assert c.join("deploys:web", dict(params, csrf_token="another-page"))[1] == {"reason": "csrf_mismatch"}

    admin = json.loads(run_ruby(ruby_script, "credentials", "admin", url=daemon.http_url).stdout)
    a = phx_connect(daemon.ws_url)
    admin_params = {"guardian_token": admin["token"], "csrf_token": admin["csrf"]}
    assert a.join("private:ops", admin_params)[0] == "ok"
    assert a.push("private:ops", "msg", {"body": "hi"})[0] == "ok"


def test_the_publisher_delivers_to_one_topic_and_to_several(ruby_script, daemon, phx_connect):
    one = phx_connect(daemon.ws_url)
    two = phx_connect(daemon.ws_url)
    assert one.join("public:rails-a")[0] == "ok" and two.join("public:rails-b")[0] == "ok"
    result = run_ruby(ruby_script, "publish", '"public:rails-a"', "new_version", '{"version": "r1"}', "3",
                      url=daemon.http_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "ok", "published": 1}
    assert one.expect(event="new_version")["payload"] == {"version": "r1"}
    result = run_ruby(ruby_script, "publish", '["public:rails-a", "public:rails-b"]', "notification",
                      '{"text": "hi"}', "3", url=daemon.http_url)
    assert json.loads(result.stdout)["published"] == 2, result.stderr
    assert one.expect(event="notification")["payload"] == two.expect(event="notification")["payload"] == {"text": "hi"}


def test_the_publisher_raises_the_servers_reason(ruby_script, daemon):
    result = run_ruby(ruby_script, "publish", '"public:x"', "e", "{}", "3", url=daemon.http_url, secret="wrong")
    assert result.returncode == 1
    assert result.stderr.strip() == "pusherd 401: missing or wrong publish secret"
    result = run_ruby(ruby_script, "publish", '"bad topic"', "e", "{}", "3", url=daemon.http_url)
    assert result.stderr.strip() == "pusherd 400: invalid topic"


def test_the_publisher_gives_up_when_pusherd_is_down(ruby_script):
    result = run_ruby(ruby_script, "publish", '"public:x"', "e", "{}", "1",
                      url="http://127.0.0.1:%d" % free_port())
    assert result.returncode == 1
    assert result.stderr.startswith("pusherd unreachable: Errno::ECONNREFUSED")


# --- the helper bound to Rails' own CSRF token, inside real Rails --------------------------------

@pytest.fixture(scope="module")
def rails_app(tmp_path_factory):
    return rails_app_script(tmp_path_factory.mktemp("rails-app"))


def changed(masked: str, index: int) -> str:
    """One Base64 character replaced by another of the same alphabet (still well-formed)."""
    return masked[:index] + ("B" if masked[index] == "A" else "A") + masked[index + 1:]


@pytest.mark.parametrize("urlsafe", [False, True], ids=["strict-base64", "urlsafe_csrf_tokens"])
def test_rails_masked_tokens_join_with_the_guides_pusher_token(rails_app, daemon, phx_connect, urlsafe):
    pages, rails_accepts = render_rails_pages(rails_app, urlsafe)
    alice, bob = pages["alice"], pages["bob"]
    # What Rails did: a new mask on every render, in the configured Base64; it accepts each of
    # alice's tokens in her session and refuses bob's there.
    masked = [p["csrf-token"] for p in alice]
    assert len(set(masked)) == 3
    assert {len(p["csrf-token"]) for p in alice + bob} == {86 if urlsafe else 88}
    assert rails_accepts == {"alice_own": [True, True, True], "alice_given_bobs": [False, False]}
    assert len({unmask(m) for m in masked}) == 1 and unmask(bob[0]["csrf-token"]) != unmask(masked[0])

    def params(page, csrf=None):
        return {"guardian_token": page["pusher-token"], "csrf_token": csrf or page["csrf-token"]}

    for i, page in enumerate(alice):
        c = phx_connect(daemon.ws_url)
        assert c.join("private:user-7", params(page))[:2] == ("ok", {})
        # the token of another render of the same session: the same bytes under another pad
        assert c.join("deploys:web", params(page, alice[(i + 1) % 3]["csrf-token"]))[:2] == ("ok", {})

    for index in (10, 60):  # a changed token is still a well-formed masked token, of other bytes
        assert unmask(changed(masked[0], index)) not in (None, unmask(masked[0]))
    c = phx_connect(daemon.ws_url)
    refusals = [params(alice[0], bob[0]["csrf-token"]), params(alice[0], bob[1]["csrf-token"]),
                params(bob[0], masked[0]),
                params(alice[0], changed(masked[0], 10)),    # in the pad
                params(alice[0], changed(masked[0], 60))]    # in the masked bytes
    for join_params in refusals:
        assert c.join("private:user-7", join_params)[:2] == ("error", {"reason": "csrf_mismatch"}), join_params
    assert c.join("private:user-7", params(alice[0], masked[2]))[:2] == ("ok", {})
