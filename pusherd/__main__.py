"""Command line: ``pusherd`` serves; ``pusherd --check-config`` validates; exit 2 on a config error.

``pusherd publish ...``, ``pusherd presence ...`` and ``pusherd token ...`` are handled by :mod:`pusherd.cli`.
"""

import argparse
import asyncio
import json
import sys
from typing import List, Optional

from . import __version__
from .cli import add_config_options


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pusherd",
        description="Real-time push daemon speaking the Phoenix Channels protocol. "
                    "With no arguments: development settings on 127.0.0.1:4000.",
        epilog="Other commands: 'pusherd publish TOPIC EVENT [PAYLOAD_JSON]' (see pusherd publish --help), "
               "'pusherd presence TOPIC' (see pusherd presence --help) and "
               "'pusherd token [--listen P] [--csrf]' (see pusherd token --help).")
    add_config_options(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
    p.add_argument("--check-config", action="store_true", help="validate, print the effective settings, exit 0/2")
    p.add_argument("--version", action="version", version="pusherd " + __version__)
    return p


def load_settings(args, environ=None):
    """Config and environment chosen as documented; raises config.ConfigError."""
    import os
    from . import config
    environ = os.environ if environ is None else environ
    return config.load_selected(args.config, args.env, environ, listen=getattr(args, "listen", None))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("publish", "presence", "token"):
        from . import cli
        return cli.main(argv)
    from . import config
    from .metrics import MetricsUnavailable, require_client

    args = _serve_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        if settings.metrics is not None:
            require_client()
    except config.ConfigError as exc:
        print("pusherd: configuration error:\n" + "\n".join("  " + p for p in exc.problems), file=sys.stderr)
        return 2
    except MetricsUnavailable as exc:
        print("pusherd: %s" % exc, file=sys.stderr)
        return 2
    if args.check_config:
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
        return 0

    from .logs import setup_logging
    from .core.errors import StartupError
    from .daemon import serve
    setup_logging(settings.log_level)
    import logging
    for warning in settings.warnings():
        logging.getLogger("pusherd").warning("config: %s", warning)

    def reload_settings():
        return load_settings(args)

    from .fast import loop_factory
    factory = loop_factory()
    try:
        if factory is not None and sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(serve(settings, reload_settings))
        return asyncio.run(serve(settings, reload_settings))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # e.g. address in use
        print("pusherd: %s" % exc, file=sys.stderr)
        return 1
    except StartupError as exc:  # e.g. broker: redis://... without redis-py
        print("pusherd: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
