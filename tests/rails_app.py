"""docs/rails.md's helper bound to Rails' own CSRF token, run inside real Rails (Debian's
ruby-actionpack and ruby-jwt), for the tests that join with the pages it renders.

`rails_app_script(dir)` writes a one-process Rails app around the guide's `pusher_token` helper
and its <head> ERB; `render_rails_pages(script, urlsafe)` runs it and returns, per session (alice:
three renders, bob: two), each page's meta tags, and Rails' own verdict on alice's and bob's
masked tokens in alice's session. Skips (fails under PUSHERD_NO_SKIP=1) without ruby and actionpack.
"""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from pusherd_testing import GUARDIAN_SECRET, ROOT, require

GUIDE = ROOT / "docs" / "rails.md"


def guide_block(name: str, language="ruby") -> str:
    """The first code block of docs/rails.md in `language` that contains `name`."""
    for block in re.findall(r"```%s\n(.*?)```" % language, GUIDE.read_text(), re.S):
        if name in block:
            return block
    raise AssertionError("no %s block with %s in docs/rails.md" % (language, name))


RAILS_APP = r'''
# A Rails app in one process (Debian's actionpack): a server-side session store, a controller that
# renders the guide's <head> (csrf_meta_tags, pusher_token), browsers as cookie jars driven through
# Rack::MockRequest. Rails' own form_authenticity_token masks the tokens, and Rails itself judges them.
require "action_controller"
require "action_view"
require "active_support/core_ext/integer/time"
require "json"
require "jwt"
require "rack/mock"

module Rails
  def self.env; "test"; end
  def self.configuration; @configuration ||= Struct.new(:pusher).new({ "ws_base_url" => "ws://127.0.0.1:1" }); end
end

ActionController::Base.urlsafe_csrf_tokens = ENV.fetch("URLSAFE_CSRF_TOKENS") == "1"
User = Struct.new(:id, :name, :email, :crew_ids, :admin) do
  def admin?; admin; end
end

class PagesController < ActionController::Base
  protect_from_forgery with: :exception
  helper PusherHelper
  helper_method :current_user
  rescue_from(ActionController::InvalidAuthenticityToken) { render plain: "refused", status: 422 }

  def current_user; User.new(7, "Ada", "ada@example.com", [3], false); end
  def show; render inline: GUIDE_HEAD; end
  def create; render plain: "accepted"; end
end

ROUTES = ActionDispatch::Routing::RouteSet.new
ROUTES.draw do
  get "/page" => "pages#show"
  post "/page" => "pages#create"
end
APP = Rack::MockRequest.new(Rack::Builder.new do
  use ActionDispatch::Cookies
  use ActionDispatch::Session::CacheStore, key: "_app_session", cache: ActiveSupport::Cache::MemoryStore.new
  run ROUTES
end.to_app)

class Browser
  def initialize; @cookie = nil; end
  def request(method, headers = {})
    response = APP.request(method, "/page", headers.merge(@cookie ? { "HTTP_COOKIE" => @cookie } : {}))
    @cookie = response.headers["Set-Cookie"].split(";").first if response.headers["Set-Cookie"]
    response
  end
  def page; request("GET").body; end
  def rails_accepts?(masked); request("POST", "HTTP_X_CSRF_TOKEN" => masked).status == 200; end
end

# Two sessions: three renders in the first, two in the second.
alice, bob = Browser.new, Browser.new
pages = { "alice" => 3.times.map { alice.page }, "bob" => 2.times.map { bob.page } }
masked = ->(html) { html[/<meta name="csrf-token" content="([^"]+)"/, 1] }
verdicts = {
  "alice_own" => pages["alice"].map { |html| alice.rails_accepts?(masked.(html)) },
  "alice_given_bobs" => pages["bob"].map { |html| alice.rails_accepts?(masked.(html)) },
}
puts JSON.generate(pages: pages, rails_accepts: verdicts)
'''



class MetaTags(HTMLParser):
    """The <meta name=… content=…> of a page, as the page's JavaScript reads them."""

    def __init__(self, html):
        super().__init__()
        self.tags = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "meta" and "name" in attrs:
            self.tags[attrs["name"]] = attrs.get("content")


def rails_app_script(directory: Path) -> Path:
    ruby = shutil.which("ruby")
    require(ruby is not None and subprocess.run([ruby, "-rjwt", "-raction_controller", "-e", ""],
                                                capture_output=True).returncode == 0,
            "ruby with ruby-jwt and Rails' actionpack is not installed (apt-get install ruby-jwt ruby-actionpack)")
    path = directory / "app.rb"
    head = guide_block("csrf_meta_tags", language="erb")
    path.write_text("\n".join([guide_block("def pusher_token"), "GUIDE_HEAD = <<~'ERB'\n%sERB" % head, RAILS_APP]))
    return path


def render_rails_pages(script: Path, urlsafe: bool):
    """({"alice": [meta tags per render], "bob": [...]}, Rails' verdicts), with Rails'
    urlsafe_csrf_tokens as given (strict Base64 with padding otherwise)."""
    env = dict(os.environ, GUARDIAN_SECRET=GUARDIAN_SECRET, URLSAFE_CSRF_TOKENS="1" if urlsafe else "0")
    result = subprocess.run(["ruby", str(script)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    pages = {who: [MetaTags(html).tags for html in htmls] for who, htmls in out["pages"].items()}
    return pages, out["rails_accepts"]
