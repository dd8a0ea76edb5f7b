"""``pusherd publish``, ``pusherd presence`` and ``pusherd token``: the deploy hook, who is on a
topic, and the token minter.

Both find the configuration as the daemon does (``--config``/``--env``, ``PUSHERD_CONFIG``,
``PUSHERD_ENV``, ``RAILS_ENV``) but read it only for what the command line did not give.
Exit status: 0 done, 1 pusherd refused or could not be reached (its reason on stderr),
2 bad usage or configuration.
"""

import argparse
import json
import os
import secrets
import sys
import urllib.parse
from typing import TYPE_CHECKING, List, Mapping, Optional, TextIO

from . import client

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings

COMMANDS = ("publish", "presence", "token")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class UsageError(Exception):
    """Bad arguments or configuration: exit 2 with this message."""


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--config and --env, as every pusherd command takes them."""
    p.add_argument("--config", metavar="FILE", help="pusher.yml (default: $PUSHERD_CONFIG, else the embedded default)")
    p.add_argument("--env", metavar="NAME", help="environment section (default: $PUSHERD_ENV, $RAILS_ENV, development)")


def publish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pusherd publish",
        description="Publish one event to a running pusherd, e.g. the deploy hook: "
                    "pusherd publish deploys:web new_version '{\"version\": \"abc123\"}'",
        epilog="The URL is --url, else $PUSHERD_URL, else the config's listen address (a wildcard address "
               "means 127.0.0.1). The secret is --secret, else $PUSHERD_PUBLISH_SECRET, else the config's "
               "publish_secret. Exit 0 when published; 1 with pusherd's reason when refused or unreachable; "
               "2 for bad arguments or configuration.")
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?",
                   help="a JSON object (default {}); '-' reads it from standard input")
    add_daemon_options(p)
    return p


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    """How `publish` and `presence` reach the daemon: its URL and secret, the configuration they
    may come from, the timeout and the retries."""
    p.add_argument("--url", help="pusherd's base URL, e.g. http://127.0.0.1:4000")
    p.add_argument("--secret", help="the publish secret (visible to other users in ps: prefer the variable)")
    add_config_options(p)
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per attempt (default 5)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries on 503 or connection errors, with backoff (default 3)")


def presence_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pusherd presence",
        description="Print who is on a presence topic now, across every pusherd process, as phoenix.js's "
                    "presence_state: {key: {metas: [...]}}, e.g. pusherd presence private:ops",
        epilog="URL and secret as for pusherd publish. Exit 0 with the list; 1 with pusherd's reason (404: "
               "no presence on that topic) or when unreachable; 2 for bad arguments or configuration.")
    p.add_argument("topic", metavar="TOPIC")
    add_daemon_options(p)
    return p


def token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pusherd token",
        description="Mint a join token exactly as the Rails helper does, signed with the first guardian "
                    "secret of the configuration. Prints the JWT; with --csrf also the csrf token, "
                    "on a second line (join with {guardian_token: line 1, csrf_token: line 2}).")
    p.add_argument("--sub", metavar="JSON", help='the sub claim as JSON (default {}), e.g. \'{"id": 1}\'')
    p.add_argument("--listen", metavar="PATTERN", action="append", default=[],
                   help="topic pattern the token may join, e.g. 'deploys:web' or 'private:*' (repeatable)")
    p.add_argument("--publish", metavar="PATTERN", action="append", default=[],
                   help="topic pattern the token may push to (repeatable)")
    p.add_argument("--ttl", default="30d", help="lifetime: seconds or 30d, 12h, 15m, 45s (default 30d)")
    p.add_argument("--csrf", metavar="TOKEN", nargs="?", const="",
                   help="bind the token to this csrf token (aud csrf, s_csrf); without a value a random one")
    p.add_argument("--issuer", help="iss claim (default: the config's first issuer, if any)")
    p.add_argument("--secret", help="sign with this secret instead of the config's guardian secret")
    add_config_options(p)
    return p


def _load(args, environ: Mapping[str, str]) -> "Settings":
    from . import config  # only when the command line left something to the configuration
    try:
        return config.load_selected(args.config, args.env, environ)
    except config.ConfigError as exc:
        raise UsageError("configuration error:\n" + "\n".join("  " + p for p in exc.problems)) from None


def base_url(settings: "Settings") -> str:
    """Where a client on this host reaches the daemon configured by `settings`."""
    host = settings.host
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return "http://%s:%d" % (host, settings.port)


def _payload(text: Optional[str], stdin: Optional[TextIO]):
    """The parsed payload (``{}`` when absent or empty); UsageError when it is not JSON.

    Standard input is read only for ``-``: a deploy hook run where stdin stays open (SSH
    sessions of deploy tools) must not hang waiting for it.
    """
    if text is None:
        return {}
    if text == "-":
        if stdin is None:
            raise UsageError("PAYLOAD_JSON is '-' but there is no standard input")
        text = stdin.read()
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise UsageError("PAYLOAD_JSON is not valid JSON: %s" % exc) from None


def _checked_url(url: str, given: bool) -> str:
    """`url` when it can be a pusherd base URL (http or https, a host, no spaces), else a usage
    error naming where it came from (--url or PUSHERD_URL): exit 2, not a failed request."""
    parts = urllib.parse.urlsplit(client.publish_url(url))
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url.strip()):
        raise UsageError("%s is not an http(s) URL: %r" % ("--url" if given else "PUSHERD_URL", url))
    return url


def run_publish(argv: List[str], environ: Mapping[str, str], stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    args = publish_parser().parse_args(argv)
    payload = _payload(args.payload, stdin)
    url = args.url or environ.get("PUSHERD_URL")
    if url:
        url = _checked_url(url, bool(args.url))
    secret = args.secret or environ.get("PUSHERD_PUBLISH_SECRET")
    if not url or not secret:
        settings = _load(args, environ)
        url = url or base_url(settings)
        secret = secret or settings.publish_secret
    # Only JSON syntax is checked here: anything else is the server's to refuse, with its reason.
    body = json.dumps({"topic": args.topic, "event": args.event, "payload": payload})

    def note_retry(failure: client.PublishFailed, delay: float) -> None:
        stderr.write("pusherd publish: %s; retrying in %gs\n" % (failure, delay))
        stderr.flush()

    answer = client.post(client.publish_url(url), body.encode("utf-8"), secret,
                         timeout=args.timeout, retries=max(0, args.retries), on_retry=note_retry)
    stdout.write(json.dumps(answer) + "\n")
    return 0


def run_presence(argv: List[str], environ: Mapping[str, str], stdout: TextIO) -> int:
    args = presence_parser().parse_args(argv)
    url = args.url or environ.get("PUSHERD_URL")
    if url:
        url = _checked_url(url, bool(args.url))
    secret = args.secret or environ.get("PUSHERD_PUBLISH_SECRET")
    if not url or not secret:
        settings = _load(args, environ)
        url = url or base_url(settings)
        secret = secret or settings.publish_secret
    answer = client.presence(args.topic, url=url, secret=secret, timeout=args.timeout, retries=max(0, args.retries))
    stdout.write(json.dumps(answer, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    return 0


def run_token(argv: List[str], environ: Mapping[str, str], stdout: TextIO) -> int:
    from .config.values import Invalid, seconds
    args = token_parser().parse_args(argv)
    try:
        sub = json.loads(args.sub) if args.sub is not None else {}
    except ValueError as exc:
        raise UsageError("--sub is not valid JSON: %s" % exc) from None
    try:
        ttl = seconds(args.ttl)
    except Invalid:
        raise UsageError("--ttl: expected seconds or a duration like 30d, 12h, 15m, 45s, got %r" % args.ttl) from None
    if ttl <= 0:
        raise UsageError("--ttl must be positive")
    secret, issuer = args.secret, args.issuer
    if secret is None:
        settings = _load(args, environ)
        if settings.guardian_algorithm != "HS256" or not settings.guardian_secrets:
            raise UsageError("guardian_algorithm is %s: pusherd token mints HS256 tokens only "
                             "(the private key stays with the Rails app)" % settings.guardian_algorithm)
        secret = settings.guardian_secrets[0]
        if issuer is None and settings.issuer:
            issuer = settings.issuer[0]
    csrf = args.csrf
    if csrf == "":
        csrf = secrets.token_urlsafe(32)
    token = client.mint_token(secret, sub=sub, listen=args.listen, publish=args.publish, ttl=ttl,
                              csrf_token=csrf, issuer=issuer)
    stdout.write(token + "\n")
    if csrf is not None:
        stdout.write(csrf + "\n")
    return 0


def main(argv: List[str], environ: Optional[Mapping[str, str]] = None, stdin: Optional[TextIO] = None,
         stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """``argv[0]`` is the command (``publish``, ``presence`` or ``token``)."""
    environ = os.environ if environ is None else environ
    stdin = stdin if stdin is not None else sys.stdin
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    command, rest = argv[0], argv[1:]
    try:
        if command == "publish":
            return run_publish(rest, environ, stdin, stdout, stderr)
        if command == "presence":
            return run_presence(rest, environ, stdout)
        return run_token(rest, environ, stdout)
    except UsageError as exc:
        stderr.write("pusherd %s: %s\n" % (command, exc))
        return 2
    except client.PublishFailed as exc:
        stderr.write("pusherd %s: %s\n" % (command, exc))
        return 1
