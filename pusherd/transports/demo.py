"""The live demo page (``GET /demo``), served only while ``demo: true`` (the development default).

The page runs the official phoenix.js client, which is not copied into this package: it is
served from the npm package ``phoenix`` installed next to pusherd (``npm install phoenix``)
or from the ``demo_assets`` path of the configuration. When the file cannot be found the page
says so, with the places it looked in.
"""

import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

import tornado.web

from .. import __version__
from .http import JSONHandler

CLIENT_FILES = ("phoenix.min.js", "phoenix.js")
_NPM_STATIC = Path("node_modules", "phoenix", "priv", "static")
PAGE = Path(__file__).resolve().parent.parent / "static" / "demo.html"
CONFIG_MARK = "/*PUSHERD_DEMO_CONFIG*/{}"


def client_dirs(demo_assets: Optional[str], config_source: str, cwd: str) -> List[Path]:
    """Where the phoenix.js client may be, in order.

    ``demo_assets`` (a file, a ``priv/static`` directory, the ``phoenix`` package or a directory
    holding ``node_modules``) is the only place looked in when it is set; otherwise the
    ``node_modules`` of the working directory, of the config file's directory and of its parent
    (a Rails app keeps ``config/pusher.yml`` beside its ``node_modules``).
    """
    if demo_assets:
        base = Path(demo_assets)
        return [base, base / "priv" / "static", base / _NPM_STATIC]
    bases = [Path(cwd)]
    if config_source and not config_source.startswith("<"):
        config_dir = Path(config_source).resolve().parent
        bases += [config_dir, config_dir.parent]
    return list(dict.fromkeys(base / _NPM_STATIC for base in bases))


def find_client(demo_assets: Optional[str], config_source: str, cwd: str) -> Tuple[Optional[Path], List[Path]]:
    """``(path of the client file or None, places looked in)``."""
    places = client_dirs(demo_assets, config_source, cwd)
    for place in places:
        if place.is_file():
            return place, places
        for name in CLIENT_FILES:
            candidate = place / name
            if candidate.is_file():
                return candidate, places
    return None, places


def _client_for(settings) -> Tuple[Optional[Path], List[Path]]:
    return find_client(settings.demo_assets, settings.source, os.getcwd())


class _DemoHandler(JSONHandler):
    def prepare(self):
        if not self.service.config.settings.demo:
            self.send_json(404, {"error": "not found"})


class DemoRootHandler(_DemoHandler):
    def get(self):
        self.redirect("/demo")


class DemoPageHandler(_DemoHandler):
    def get(self):
        settings = self.service.config.settings
        client, places = _client_for(settings)
        config = {
            "socketPath": settings.path,
            "client": str(client) if client else None,
            "lookedIn": [str(p) for p in places],
            "version": __version__,
        }
        # "</" must not appear inside a <script> element.
        text = PAGE.read_text(encoding="utf-8").replace(
            CONFIG_MARK, json.dumps(config).replace("<", "\\u003c"), 1)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
                        "connect-src 'self' ws: wss:")
        self.finish(text)


class DemoAssetHandler(_DemoHandler):
    def get(self):
        client, places = _client_for(self.service.config.settings)
        self.set_header("Content-Type", "application/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        if client is None:
            self.set_status(404)
            return self.finish("/* phoenix.js not found; looked in: %s */\n" % ", ".join(str(p) for p in places))
        try:
            self.finish(client.read_bytes())
        except OSError as exc:
            raise tornado.web.HTTPError(500, "cannot read %s: %s" % (client, exc.strerror)) from None


RECOVERY_HELPER = Path(__file__).resolve().parent.parent / "static" / "pusherd-recovery.js"


class RecoveryHelperHandler(_DemoHandler):
    """The page helper that keeps `since` up to date (shipped with pusherd, not with phoenix.js)."""

    def get(self):
        self.set_header("Content-Type", "application/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(RECOVERY_HELPER.read_bytes())
