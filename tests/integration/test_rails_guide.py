"""The Ruby in docs/rails.md, run as written (ruby + ruby-jwt), against a real pusherd: the token helper's
tokens join, and the publisher delivers, fails with the server's reason, and gives up when pusherd is down.

Only Rails itself is stood in for (Rails.env, Rails.configuration, 30.days.from_now, a user record).
"""

import json
import os
import re
import shutil
import subprocess

import pytest

from pusherd_testing import GUARDIAN_SECRET, PUBLISH_SECRET, ROOT, Pusherd, free_port, require

pytestmark = pytest.mark.integration

GUIDE = ROOT / "docs" / "rails.md"

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


def ruby_block(name: str) -> str:
    for block in re.findall(r"```ruby\n(.*?)```", GUIDE.read_text(), re.S):
        if name in block:
            return block
    raise AssertionError("no ruby block with %s in docs/rails.md" % name)


@pytest.fixture(scope="module")
def ruby_script(tmp_path_factory):
    ruby = shutil.which("ruby")
    require(ruby is not None and subprocess.run([ruby, "-rjwt", "-e", ""], capture_output=True).returncode == 0,
            "ruby with ruby-jwt is not installed (apt-get install ruby ruby-jwt)")
    path = tmp_path_factory.mktemp("rails") / "guide.rb"
    path.write_text("\n".join([RAILS_STANDIN, ruby_block("module PusherHelper"), ruby_block("module PusherPublisher"),
                               SCRIPT]))
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
