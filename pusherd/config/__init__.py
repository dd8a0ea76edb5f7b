"""Configuration: a Rails-style ``pusher.yml`` turned into an immutable, validated `Settings`.

The file holds one mapping per environment (``development:``, ``production:``...), like the
Rails app's ``config/pusher.yml``; YAML anchors and merge keys (``<<: *default``) are allowed.

* `settings` declares every key once (default, parser, secret/URL/restart flags);
* `values` holds the value parsers (durations, sizes, addresses, origins, the URL masker);
* `sources` reads the YAML, ``${VAR}`` references, ``*_file`` secrets and systemd credentials.

`from_mapping` is pure and reports *every* problem at once in one `ConfigError`; `load` is the
only function that reads a file. Secrets never appear in problems, ``repr()`` or
`Settings.masked`.
"""

import os
from typing import Any, Callable, Mapping, Optional

from .settings import (DEFAULTS, DEV_ALLOWED_ORIGINS, KNOWN_KEYS, RESTART_KEYS, HistoryRule, MetricsSettings,
                       PresenceSetting, Settings, read_section)
from .sources import (DEFAULT_CONFIG_YAML, DEV_ENVIRONMENTS, EMBEDDED_SOURCE, FAILED, ConfigError, Section,
                      parse_yaml, read_text, reason)
from .values import kind

__all__ = [
    "ConfigError", "HistoryRule", "MetricsSettings", "PresenceSetting", "Settings", "DEFAULT_CONFIG_YAML", "EMBEDDED_SOURCE",
    "DEV_ENVIRONMENTS", "DEV_ALLOWED_ORIGINS", "RESTART_KEYS", "from_mapping", "load", "load_selected",
    "resolve_env", "resolve_path",
]


def resolve_env(cli_env: Optional[str], environ: Mapping[str, str]) -> str:
    """``--env``, else ``PUSHERD_ENV``, else ``RAILS_ENV``, else ``"development"``."""
    for candidate in (cli_env, environ.get("PUSHERD_ENV"), environ.get("RAILS_ENV")):
        if candidate:
            return candidate
    return "development"


def resolve_path(cli_path: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """``--config``, else ``PUSHERD_CONFIG``, else ``None`` (the embedded default)."""
    return cli_path or environ.get("PUSHERD_CONFIG") or None


def load_selected(cli_path: Optional[str], cli_env: Optional[str], environ: Mapping[str, str] = os.environ,
                  listen: Optional[str] = None) -> Settings:
    """The settings every command uses: file and environment chosen by `resolve_path` and
    `resolve_env` from ``--config``/``--env`` and the environment variables."""
    return load(resolve_path(cli_path, environ), resolve_env(cli_env, environ), environ, listen=listen)


def load(path: Optional[str], env: str, environ: Mapping[str, str] = os.environ,
         listen: Optional[str] = None) -> Settings:
    """Read ``path`` (``None``: `DEFAULT_CONFIG_YAML`) and build the settings of ``env``.

    ``listen`` ("host:port") overrides the file's ``listen`` (the CLI's ``--listen``).
    """
    if path is None:
        source, text = EMBEDDED_SOURCE, DEFAULT_CONFIG_YAML
    else:
        source = path
        try:
            text = read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: cannot read the configuration file: {reason(exc)}"]) from None
    doc = parse_yaml(text, source)
    return from_mapping(doc, env, source, environ, read_text, listen=listen)


def from_mapping(doc: Any, env: str, source: str, environ: Mapping[str, str], read_file: Callable[[str], str], *,
                 listen: Optional[str] = None) -> Settings:
    """Build the `Settings` of ``env`` from a parsed pusher.yml ``doc``.

    Pure: environment variables come from ``environ``, ``*_file`` secrets and systemd
    credentials through ``read_file(path) -> str`` (raising ``OSError`` / ``FileNotFoundError``).
    ``listen`` overrides the section's ``listen`` (the CLI's ``--listen``).
    Raises `ConfigError` listing every problem found.
    """
    if doc is None:
        raise ConfigError([f"{source}: the file is empty (expected a mapping of environment names to settings)"])
    if not isinstance(doc, Mapping):
        raise ConfigError([f"{source}: expected a mapping of environment names to settings, got {kind(doc)}"])
    if env not in doc:
        found = ", ".join(str(k) for k in doc) or "none"
        raise ConfigError([f"{source}: no section for environment '{env}' (sections found: {found})"])
    section = doc[env]
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError([f"{source}: {env}: expected a mapping of settings, got {kind(section)}"])
    s = Section(section, env, source, environ, read_file, KNOWN_KEYS, DEFAULTS, cli_listen=listen)
    values = read_section(s)
    if s.problems:
        raise ConfigError(s.problems)
    assert FAILED not in values.values()  # every FAILED came with a problem
    return Settings(env=env, source=source, **values)
