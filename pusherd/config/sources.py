"""Where configuration comes from: the YAML file (or the embedded default), ``${VAR}`` references
to the environment, ``*_file`` paths and systemd credentials for secrets. `Section` reads one
environment's mapping and collects every problem instead of stopping at the first.

Only `read_text` touches the file system; everything else gets its inputs as parameters.
"""

import os
import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import yaml

from .values import Invalid, did_you_mean, kind, show

EMBEDDED_SOURCE = "<embedded default>"

#: Environments where missing secrets fall back to the environment's name, as the Rails app
#: does with ``ENV['GUARDIAN_SECRET'] || Rails.env``.
DEV_ENVIRONMENTS = ("development", "test")

DEFAULT_CONFIG_YAML = """\
# Embedded default configuration of pusherd, used when neither --config nor
# PUSHERD_CONFIG names a file. It only knows development and test: any other
# environment needs a real pusher.yml (see etc/pusher.yml and docs/config.md).
# Secrets are not set here, so they fall back to the environment's name
# ("development" / "test"), like the Rails app does.
default: &default
  listen: "127.0.0.1:4000"
  path: /events
  allowed_origins:
    - "http://localhost:*"
    - "http://127.0.0.1:*"
    - "https://localhost:*"
    - "https://127.0.0.1:*"
    - "http://[::1]:*"

development:
  <<: *default
  demo: true

test:
  <<: *default
  listen: "127.0.0.1:0"   # ephemeral port
  demo: false
"""


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason, ``str()`` one per line."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: List[str] = list(problems)
        super().__init__("\n".join(self.problems))


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return type(exc).__name__


class _Loader(yaml.SafeLoader):
    """SafeLoader that also records duplicate keys (plain YAML silently keeps the last one)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: List[Tuple[str, int]] = []

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    loader = _Loader(text)
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Built from the parts, not str(exc): the snippet of the offending line could hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{source}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            [f"{source}: line {line}: duplicate key '{key}' (YAML would keep only the last one)"
             for key, line in loader.duplicates]
        )
    return doc


_REF_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def expand(text: str, environ: Mapping[str, str], errors: List[str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (default when unset or empty); ``$${`` is a literal ``${``."""

    def sub(m: "re.Match[str]") -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name is None:
            errors.append("malformed '${' (write ${NAME} or ${NAME:-default}, or $${ for a literal '${')")
            return ""
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            errors.append(f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")
            return ""
        return value

    return _REF_RE.sub(sub, text)


def interpolate(value: Any, environ: Mapping[str, str], errors: List[str]) -> Any:
    if isinstance(value, str):
        return expand(value, environ, errors)
    if isinstance(value, list):
        return [interpolate(v, environ, errors) for v in value]
    if isinstance(value, Mapping):
        return {k: interpolate(v, environ, errors) for k, v in value.items()}
    return value


UNSET = object()   # key absent (or null)
FAILED = object()  # a problem was already reported for this key


class Section:
    """One environment's mapping: values by key (``${VAR}`` expanded), and every problem found.

    `known` lists the keys the section may hold (``x_``/``x-`` keys are extensions for other
    readers of the file, e.g. the Rails app, and are skipped); `defaults` the value of an unset key.
    """

    def __init__(self, section: Mapping, env: str, source: str, environ: Mapping[str, str],
                 read_file: Callable[[str], str], known, defaults: Mapping[str, Any], cli_listen=None):
        self.env, self.source = env, source
        self.cli_listen = cli_listen  # --listen, which overrides the section's listen
        self.environ, self.read_file = environ, read_file
        self.defaults = defaults
        self.problems: List[str] = []
        # Relative *_file paths are relative to the config file's directory.
        self.base_dir = "" if source.startswith("<") else os.path.dirname(source)
        self.raw: Dict[str, Any] = {}
        for key, value in section.items():
            if not isinstance(key, str):
                self.add(show(key), "keys must be strings")
            elif key.startswith(("x_", "x-")):
                continue
            elif key not in known:
                self.add(key, "unknown key" + did_you_mean(key, known))
            else:
                errors: List[str] = []
                expanded = interpolate(value, environ, errors)
                for error in errors:
                    self.add(key, error)
                self.raw[key] = FAILED if errors else (UNSET if expanded is None else expanded)

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: {self.env}: {key}: {message}")

    def get(self, key: str, parse: Callable[[Any], Any], default: Any = UNSET) -> Any:
        """Parsed value of ``key``; ``default`` when unset; ``FAILED`` after a reported problem."""
        value = self.raw.get(key, UNSET)
        if value is FAILED:
            return FAILED
        if value is UNSET:
            return self.defaults.get(key) if default is UNSET else default
        try:
            return parse(value)
        except Invalid as exc:
            self.add(key, str(exc))
            return FAILED

    def given(self, key: str) -> bool:
        value = self.raw.get(key, UNSET)
        return value is not UNSET and value != "" and value != []

    def resolve_path(self, path: str) -> str:
        return path if os.path.isabs(path) or not self.base_dir else os.path.join(self.base_dir, path)

    def secret(self, key: str, *, required: bool, allow_list: bool = False, systemd: bool = True) -> Any:
        """Precedence: explicit value > ``<key>_file`` > systemd credential > development fallback.

        An empty value counts as unset, so ``"${VAR:-}"`` falls through to the next source.
        ``systemd=False`` (the public key) disables both the credential and the fallback.
        """
        file_key = f"{key}_file"
        if self.raw.get(key) is FAILED or self.raw.get(file_key) is FAILED:
            return FAILED
        has_value, has_file = self.given(key), self.given(file_key)
        if has_value and has_file:
            self.add(key, f"give either {key} or {file_key}, not both")
            return FAILED
        value: Any = None
        if has_value:
            value = self.raw[key]
            if allow_list and isinstance(value, list):
                bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item]
                for i in bad:
                    self.add(f"{key}[{i}]", f"expected a non-empty string, got {kind(value[i])}")
                return FAILED if bad else tuple(value)
            if not isinstance(value, str):
                shape = "a string or a list of strings" if allow_list else "a string"
                self.add(key, f"expected {shape}, got {kind(value)}")  # never the value itself
                return FAILED
        elif has_file:
            path = self.raw[file_key]
            if not isinstance(path, str):
                self.add(file_key, f"expected a file path, got {show(path)}")
                return FAILED
            value = self.read_secret(file_key, self.resolve_path(path), "file")
        elif systemd and self.environ.get("CREDENTIALS_DIRECTORY"):
            path = os.path.join(self.environ["CREDENTIALS_DIRECTORY"], key)
            value = self.read_secret(key, path, "systemd credential", missing_ok=True)
        if value is None and systemd and self.env in DEV_ENVIRONMENTS:
            value = self.env
        if value is None and required:
            hint = f"set {key}, {file_key} or the systemd credential {key}" if systemd else f"set {key} or {file_key}"
            self.add(key, f"required in environment '{self.env}' ({hint})")
            return FAILED
        if value is None or value is FAILED or not allow_list:
            return value
        return (value,)

    def read_secret(self, key: str, path: str, what: str, missing_ok: bool = False) -> Any:
        """The file's text without trailing whitespace; None if absent and ``missing_ok``."""
        try:
            text = self.read_file(path)
        except FileNotFoundError:
            if missing_ok:
                return None
            self.add(key, f"cannot read {what} {path!r}: file not found")
            return FAILED
        except (OSError, UnicodeDecodeError) as exc:
            self.add(key, f"cannot read {what} {path!r}: {reason(exc)}")
            return FAILED
        text = text.rstrip()
        if not text:
            self.add(key, f"{what} {path!r} is empty")
            return FAILED
        return text

    def items(self, key: str, accept_string: bool) -> Any:
        """The list under ``key`` as ``[(label, item)]``; ``UNSET`` / ``FAILED``."""
        value = self.raw.get(key, UNSET)
        if value is UNSET or value is FAILED:
            return value
        if accept_string and isinstance(value, str):
            return [(key, value)]
        if not isinstance(value, list):
            self.add(key, f"expected a list, got {show(value)}")
            return FAILED
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]

    def each(self, pairs, parse) -> Any:
        out, ok = [], True
        for label, item in pairs:
            try:
                out.append(parse(item))
            except Invalid as exc:
                self.add(label, str(exc))
                ok = False
        return tuple(out) if ok else FAILED

    def strings(self, key: str, parse, *, empty: str) -> Any:
        """A list of values under ``key`` (a single string counts as a list of one), each parsed,
        duplicates dropped; ``UNSET``, or ``FAILED`` with `empty` as the problem of an empty list."""
        pairs = self.items(key, accept_string=True)
        if pairs is UNSET or pairs is FAILED:
            return pairs
        if pairs == []:
            self.add(key, empty)
            return FAILED
        values = self.each(pairs, parse)
        return values if values is FAILED else tuple(dict.fromkeys(values))

    def mapping(self, label: str, value: Any, known) -> Any:
        if not isinstance(value, Mapping):
            self.add(label, f"expected a mapping with keys {', '.join(known)}, got {show(value)}")
            return None
        unknown = [k for k in value if k not in known]
        for k in unknown:
            self.add(f"{label}.{k}", "unknown key" + did_you_mean(str(k), known))
        return None if unknown else value

    def sub(self, label: str, value: Any, parse) -> Any:
        try:
            return parse(value)
        except Invalid as exc:
            self.add(label, str(exc))
            return FAILED
