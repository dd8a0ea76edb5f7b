"""pusherd.config: parsing, validation, secrets and the shipped example file."""

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings as hsettings, strategies as st

from pusherd import config
from pusherd.config import (
    DEFAULT_CONFIG_YAML,
    DEV_ALLOWED_ORIGINS,
    ConfigError,
    HistoryRule,
    MetricsSettings,
    PresenceSetting,
    Settings,
    from_mapping,
    load,
    resolve_env,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "etc" / "pusher.yml"
SRC = "etc/pusher.yml"
SECRET = "S3cr3t-value-that-must-never-leak-0123456789"
PROD_OK = {
    "guardian_secret": SECRET,
    "publish_secret": SECRET + "-publish",
    "allowed_origins": ["https://app.example.com"],
}


def no_files(path):
    raise FileNotFoundError(2, "No such file or directory", path)


def files_reader(files):
    def read(path):
        if path in files:
            return files[path]
        raise FileNotFoundError(2, "No such file or directory", path)

    return read


def build(section=None, env="production", environ=None, files=None, doc=None, **kw):
    """Settings of `env` from a dict section (or a whole doc), production-valid by default."""
    if doc is None:
        doc = {env: section}
    return from_mapping(doc, env, SRC, environ or {}, files_reader(files or {}), **kw)


def prod(**overrides):
    section = dict(PROD_OK)
    section.update(overrides)
    return build(section)


def problems(section=None, **kw):
    with pytest.raises(ConfigError) as info:
        build(section, **kw)
    return info.value.problems


def one_problem(section=None, **kw):
    found = problems(section, **kw)
    assert len(found) == 1, found
    return found[0]


def prod_problem(**overrides):
    section = dict(PROD_OK)
    section.update(overrides)
    return one_problem(section)


# ---------------------------------------------------------------- defaults and embedded default


def test_defaults_apply_to_every_unset_key():
    s = prod()
    assert (s.host, s.port, s.path) == ("127.0.0.1", 4000, "/events")
    assert s.ws_base_url is None and s.issuer is None and s.metrics is None
    assert s.guardian_algorithm == "HS256" and s.guardian_public_key is None
    assert s.heartbeat_timeout == 60.0
    assert (s.max_frame_bytes, s.max_publish_bytes, s.max_outbox_bytes) == (65536, 1048576, 1048576)
    assert (s.max_connections, s.max_channels_per_socket, s.max_topic_length) == (10000, 100, 255)
    assert (s.client_push_rate, s.client_push_burst) == (10.0, 20)
    assert (s.slow_consumer_seconds, s.drain_seconds) == (30.0, 5.0)
    assert (s.broker, s.broker_prefix, s.reuse_port) == ("memory", "pusherd", False)
    assert s.demo is False and s.history == () and s.max_recovery == 300
    assert (s.log_level, s.access_log) == ("info", True)
    assert (s.env, s.source) == ("production", SRC)


def test_dataclass_defaults_match_documented_defaults():
    s = Settings(env="x", source="y", host="h", port=1, guardian_secrets=("a",), publish_secret="b")
    assert s == dataclasses.replace(prod(), env="x", source="y", host="h", port=1,
                                    guardian_secrets=("a",), publish_secret="b",
                                    allowed_origins=())


def test_settings_are_frozen():
    s = prod()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_embedded_default_development():
    s = load(None, "development", environ={})
    assert s.source == "<embedded default>"
    assert (s.host, s.port, s.path) == ("127.0.0.1", 4000, "/events")
    assert s.allowed_origins == DEV_ALLOWED_ORIGINS
    assert s.guardian_secrets == ("development",) and s.publish_secret == "development"
    assert s.demo is True


def test_embedded_default_test():
    s = load(None, "test", environ={})
    assert s.guardian_secrets == ("test",) and s.publish_secret == "test"
    assert s.demo is False


def test_embedded_default_has_no_production():
    with pytest.raises(ConfigError) as info:
        load(None, "production", environ={})
    (problem,) = info.value.problems
    assert "<embedded default>" in problem and "'production'" in problem
    assert "development" in problem and "test" in problem


def test_default_config_yaml_is_a_plain_pusher_yml():
    doc = yaml.safe_load(DEFAULT_CONFIG_YAML)
    assert {"development", "test"} <= set(doc)
    assert "production" not in doc


def test_demo_defaults_true_only_in_development():
    assert build({}, env="development").demo is True
    assert build({}, env="test").demo is False
    assert prod().demo is False
    assert prod(demo=True).demo is True
    assert build({"demo": False}, env="development").demo is False


def test_null_value_means_default():
    assert prod(heartbeat_timeout=None, broker=None).heartbeat_timeout == 60.0


def test_empty_section_is_allowed():
    assert build(None, env="development").port == 4000


# ---------------------------------------------------------------- YAML: merge keys, file problems


MERGED = """\
default: &default
  listen: "0.0.0.0:5000"
  heartbeat_timeout: 30s
  allowed_origins: ["https://app.example.com"]
development:
  <<: *default
  heartbeat_timeout: 10
production:
  <<: *default
  guardian_secret: "${G}"
  publish_secret: "${P}"
"""


def test_merge_keys_and_shared_anchor_block(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text(MERGED)
    dev = load(str(path), "development", environ={})
    assert (dev.host, dev.port, dev.heartbeat_timeout) == ("0.0.0.0", 5000, 10.0)
    production = load(str(path), "production", environ={"G": "g", "P": "p"})
    assert production.heartbeat_timeout == 30.0
    assert production.allowed_origins == ("https://app.example.com",)


def test_missing_environment_lists_sections(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text(MERGED)
    with pytest.raises(ConfigError) as info:
        load(str(path), "staging", environ={})
    assert info.value.problems == [
        f"{path}: no section for environment 'staging' (sections found: default, development, production)"
    ]


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text("production:\n  listen: [1, 2\n  path: /x\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), "production", environ={})
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: invalid YAML at line ")


def test_invalid_yaml_does_not_echo_the_line(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text(f'production:\n  guardian_secret: "{SECRET}\n  x: [\n')
    with pytest.raises(ConfigError) as info:
        load(str(path), "production", environ={})
    assert SECRET not in str(info.value)


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text("production: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(str(path), "production", environ={})


def test_duplicate_keys_are_reported(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text("development:\n  listen: ':1'\n  path: /a\n  listen: ':2'\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), "development", environ={})
    assert info.value.problems == [f"{path}: line 4: duplicate key 'listen' (YAML would keep only the last one)"]


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as info:
        load(str(missing), "development", environ={})
    assert info.value.problems == [f"{missing}: cannot read the configuration file: No such file or directory"]


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty (expected a mapping of environment names to settings)"),
    ("- a\n- b\n", "expected a mapping of environment names to settings, got a list"),
])
def test_file_not_a_mapping(tmp_path, text, expected):
    path = tmp_path / "pusher.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path), "development", environ={})
    assert info.value.problems == [f"{path}: {expected}"]


def test_section_not_a_mapping():
    assert problems(doc={"production": ["a"]}) == [
        f"{SRC}: production: expected a mapping of settings, got a list"
    ]


# ---------------------------------------------------------------- unknown keys, types, several problems


def test_unknown_key_with_hint():
    assert prod_problem(heartbeat_timout=5) == (
        "etc/pusher.yml: production: heartbeat_timout: unknown key (did you mean 'heartbeat_timeout'?)"
    )


def test_unknown_key_without_close_match():
    assert prod_problem(frobnicate=1) == f"{SRC}: production: frobnicate: unknown key"


def test_extension_keys_are_ignored():
    assert prod(x_rails_only="anything", **{"x-other": [1]}).port == 4000


def test_several_problems_reported_at_once():
    found = problems({
        "heartbeat_timout": 5,
        "heartbeat_timeout": "abc",
        "listen": "localhost",
        "path": "events",
        "max_frame_bytes": "lots",
        "log_level": "verbose",
        "broker": "memroy",
        "allowed_origins": ["https://ok.example.com", "https://bad.example.com/"],
    })
    joined = "\n".join(found)
    for key in ("heartbeat_timout", "heartbeat_timeout", "listen", "path", "max_frame_bytes",
                "log_level", "broker", "allowed_origins[1]", "guardian_secret", "publish_secret"):
        assert f"{SRC}: production: {key}: " in joined, key
    assert len(found) == 10, found


def test_str_of_error_is_one_problem_per_line():
    with pytest.raises(ConfigError) as info:
        build({"a": 1, "b": 2}, env="development")
    assert str(info.value).splitlines() == info.value.problems
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("key, value, message", [
    ("heartbeat_timeout", "abc", "expected a number of seconds, got 'abc'"),
    ("heartbeat_timeout", 0, "must be greater than 0, got 0"),
    ("heartbeat_timeout", -1, "must be greater than 0, got -1"),
    ("heartbeat_timeout", True, "expected a number of seconds, got true"),
    ("heartbeat_timeout", float("inf"), "expected a number of seconds, got inf"),
    ("slow_consumer_seconds", [], "expected a number of seconds, got a list"),
    ("drain_seconds", -1, "must be at least 0, got -1"),
    ("max_frame_bytes", "64 parsecs", "expected a size in bytes, got '64 parsecs'"),
    ("max_frame_bytes", 0, "must be greater than 0, got 0"),
    ("max_frame_bytes", 1.5, "expected a size in bytes, got 1.5"),
    ("max_connections", "many", "expected a whole number, got 'many'"),
    ("max_connections", 0, "must be at least 1, got 0"),
    ("client_push_burst", 2.5, "expected a whole number, got 2.5"),
    ("max_recovery", -1, "must be at least 0, got -1"),
    ("client_push_rate", "fast", "expected a number, got 'fast'"),
    ("client_push_rate", 0, "must be greater than 0, got 0"),
    ("reuse_port", "maybe", "expected true or false, got 'maybe'"),
    ("access_log", 1, "expected true or false, got 1"),
    ("log_level", "verbose", "expected one of debug, info, warning, error, got 'verbose'"),
    ("guardian_algorithm", "none", "expected one of HS256, RS256, ES256, got 'none'"),
    ("broker_prefix", "", "expected a non-empty string, got ''"),
    ("path", "events", "expected a URL path starting with '/'"),
    ("path", "/events/", "without a trailing '/'"),
    ("path", "/", "without a trailing '/'"),
    ("path", "/a b", "expected a URL path"),
    ("ws_base_url", "push.example.com", "expected a ws://, wss://, http:// or https:// URL"),
    ("issuer", [], "must not be an empty list"),
    ("issuer", 5, "expected a list, got 5"),
    ("history", {"topics": "a"}, "expected a list, got a mapping"),
])
def test_wrong_values(key, value, message):
    problem = prod_problem(**{key: value})
    assert problem.startswith(f"{SRC}: production: {key}: "), problem
    assert message in problem


@pytest.mark.parametrize("value, seconds", [
    (5, 5.0), (2.5, 2.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("1d", 86400.0), ("250ms", 0.25), (" 1.5 H ", 5400.0),
])
def test_durations(value, seconds):
    assert prod(heartbeat_timeout=value).heartbeat_timeout == seconds


def test_drain_seconds_may_be_zero():
    assert prod(drain_seconds=0).drain_seconds == 0.0


@pytest.mark.parametrize("value, size", [
    (1024, 1024), ("1024", 1024), ("64KiB", 65536), ("1MiB", 1048576), ("512KB", 512000),
    ("1 mib", 1048576), ("2GiB", 2 * 1024**3), ("10B", 10), (4096.0, 4096),
])
def test_sizes(value, size):
    assert prod(max_frame_bytes=value).max_frame_bytes == size


def test_strings_from_environment_are_parsed_as_numbers_and_booleans():
    section = dict(PROD_OK, max_connections="${N}", reuse_port="${R}", client_push_rate="${RATE}",
                   max_frame_bytes="${F}")
    s = build(section, environ={"N": "5000", "R": "yes", "RATE": "2.5", "F": "32KiB"})
    assert (s.max_connections, s.reuse_port, s.client_push_rate, s.max_frame_bytes) == (5000, True, 2.5, 32768)


def test_log_level_is_case_insensitive_and_accepts_warn():
    assert prod(log_level="DEBUG").log_level == "debug"
    assert prod(log_level="warn").log_level == "warning"


def test_guardian_algorithm_is_case_insensitive():
    pem = "-----BEGIN PUBLIC KEY-----\nMFk=\n-----END PUBLIC KEY-----\n"
    s = prod(guardian_algorithm="es256", guardian_public_key=pem)
    assert (s.guardian_algorithm, s.guardian_public_key) == ("ES256", pem)


def test_non_string_key():
    found = problems(doc={"production": {**PROD_OK, 5: "x"}})
    assert found == [f"{SRC}: production: 5: keys must be strings"]


# ---------------------------------------------------------------- listen


@pytest.mark.parametrize("value, host, port", [
    ("127.0.0.1:4000", "127.0.0.1", 4000),
    ("localhost:80", "localhost", 80),
    ("[::1]:4000", "::1", 4000),
    ("[::]:4000", "::", 4000),
    (":4000", "0.0.0.0", 4000),
    ("0.0.0.0:0", "0.0.0.0", 0),
    ("push.internal:65535", "push.internal", 65535),
])
def test_listen(value, host, port):
    s = prod(listen=value)
    assert (s.host, s.port) == (host, port)


@pytest.mark.parametrize("value, hint", [
    ("localhost", ""),
    ("localhost:65536", ""),
    ("localhost:-1", ""),
    ("::1:4000", "in brackets"),
    ("[nope]:4000", "IPv6"),
    ("bad host:4000", "host name"),
    (4000, ""),
])
def test_bad_listen(value, hint):
    problem = prod_problem(listen=value)
    assert f"{SRC}: production: listen: expected \"host:port\" with a port from 0 to 65535" in problem
    assert hint in problem


def test_listen_override_from_cli():
    s = build(dict(PROD_OK, listen="127.0.0.1:4000"), listen="[::1]:0")
    assert (s.host, s.port) == ("::1", 0)


def test_listen_override_wins_over_invalid_file_value_and_is_validated():
    assert build(dict(PROD_OK, listen="nonsense"), listen=":1").port == 1
    with pytest.raises(ConfigError) as info:
        build(dict(PROD_OK), listen="nonsense")
    assert info.value.problems[0].startswith("--listen: expected \"host:port\"")


def test_load_passes_listen_override(tmp_path):
    assert load(None, "development", environ={}, listen="127.0.0.1:0").port == 0


# ---------------------------------------------------------------- environment interpolation


def test_interpolation_and_defaults():
    s = build(dict(PROD_OK, broker_prefix="pd-${NAME}-${MISSING:-x}-${EMPTY:-y}", listen="${HOST:-127.0.0.1}:${PORT}"),
              environ={"NAME": "n", "EMPTY": "", "PORT": "4100"})
    assert s.broker_prefix == "pd-n-x-y"
    assert (s.host, s.port) == ("127.0.0.1", 4100)


def test_interpolation_in_nested_values():
    environ = {"ORIGIN": "https://app.example.com", "TOKEN": "tok", "MPORT": "9100", "TTL": "1h"}
    s = build(dict(PROD_OK,
                   allowed_origins=["${ORIGIN}", "https://*.example.com"],
                   metrics={"listen": "127.0.0.1:${MPORT}", "token": "${TOKEN}"},
                   history=[{"topics": "deploys:*", "size": 5, "ttl": "${TTL}"}]),
              environ=environ)
    assert s.allowed_origins == ("https://app.example.com", "https://*.example.com")
    assert s.metrics == MetricsSettings(host="127.0.0.1", port=9100, token="tok")
    assert s.history == (HistoryRule(topics="deploys:*", size=5, ttl=3600.0),)


def test_unset_variable_is_a_problem_naming_key_and_variable():
    problem = prod_problem(broker_prefix="${PUSHERD_PREFIX}")
    assert problem.startswith(f"{SRC}: production: broker_prefix: environment variable PUSHERD_PREFIX is not set")


def test_unset_variable_in_secret_gives_one_problem():
    assert prod_problem(guardian_secret="${PUSHERD_GUARDIAN_SECRET}").startswith(
        f"{SRC}: production: guardian_secret: environment variable PUSHERD_GUARDIAN_SECRET is not set")


def test_escaped_and_malformed_references():
    assert prod(broker_prefix="a$${B}c").broker_prefix == "a${B}c"
    assert "malformed" in prod_problem(broker_prefix="a${B")
    assert prod(broker_prefix="cost$5").broker_prefix == "cost$5"


@hsettings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="$"), min_size=1))
def test_strings_without_dollar_are_unchanged(text):
    errors = []
    assert config.sources.expand(text, {}, errors) == text and errors == []


# ---------------------------------------------------------------- secrets


def test_dev_fallback_to_environment_name():
    for env in ("development", "test"):
        s = build({}, env=env)
        assert s.guardian_secrets == (env,) and s.publish_secret == env


def test_production_missing_secrets():
    found = problems({"allowed_origins": ["https://a.example.com"]})
    assert found == [
        "etc/pusher.yml: production: guardian_secret: required in environment 'production' "
        "(set guardian_secret, guardian_secret_file or the systemd credential guardian_secret)",
        "etc/pusher.yml: production: publish_secret: required in environment 'production' "
        "(set publish_secret, publish_secret_file or the systemd credential publish_secret)",
    ]


def test_empty_secret_counts_as_missing():
    assert "required in environment 'staging'" in one_problem(
        dict(PROD_OK, publish_secret=""), env="staging")
    # ... and in development falls back like an unset one:
    assert build({"guardian_secret": "${G:-}"}, env="development").guardian_secrets == ("development",)


def test_guardian_secret_list_for_rotation():
    s = prod(guardian_secret=["new", "old"])
    assert s.guardian_secrets == ("new", "old")


def test_guardian_secret_bad_types_do_not_echo():
    problem = prod_problem(guardian_secret=[SECRET, 7])
    assert problem == f"{SRC}: production: guardian_secret[1]: expected a non-empty string, got a number"
    problem = prod_problem(publish_secret=[SECRET])
    assert problem == f"{SRC}: production: publish_secret: expected a string, got a list"
    problem = prod_problem(guardian_secret={"k": SECRET})
    assert problem == f"{SRC}: production: guardian_secret: expected a string or a list of strings, got a mapping"


def test_secret_files_relative_to_config_dir():
    files = {"etc/guardian": "gsecret\n", "/run/publish": "psecret\r\n"}
    s = build({"guardian_secret_file": "guardian", "publish_secret_file": "/run/publish",
               "allowed_origins": "*"}, files=files)
    assert s.guardian_secrets == ("gsecret",) and s.publish_secret == "psecret"


def test_secret_file_problems():
    found = problems({"guardian_secret_file": "/nope", "publish_secret_file": "/empty",
                      "allowed_origins": "*"}, files={"/empty": "\n"})
    assert found == [
        f"{SRC}: production: guardian_secret_file: cannot read file '/nope': file not found",
        f"{SRC}: production: publish_secret_file: file '/empty' is empty",
    ]


def test_value_and_file_together_is_a_problem():
    assert prod_problem(guardian_secret_file="/x") == (
        f"{SRC}: production: guardian_secret: give either guardian_secret or guardian_secret_file, not both"
    )


def test_systemd_credentials():
    environ = {"CREDENTIALS_DIRECTORY": "/run/credentials/pusherd.service"}
    files = {"/run/credentials/pusherd.service/guardian_secret": "cred-g\n",
             "/run/credentials/pusherd.service/publish_secret": "cred-p"}
    s = build({"allowed_origins": "*"}, environ=environ, files=files)
    assert s.guardian_secrets == ("cred-g",) and s.publish_secret == "cred-p"


def test_secret_precedence_value_then_file_then_credential_then_fallback():
    environ = {"CREDENTIALS_DIRECTORY": "/creds"}
    files = {"/creds/guardian_secret": "cred", "/f": "file"}
    assert build({"guardian_secret": "value"}, env="development", environ=environ,
                 files=files).guardian_secrets == ("value",)
    assert build({"guardian_secret_file": "/f"}, env="development", environ=environ,
                 files=files).guardian_secrets == ("file",)
    assert build({}, env="development", environ=environ, files=files).guardian_secrets == ("cred",)
    # publish_secret has no credential file here: the development fallback applies
    assert build({}, env="development", environ=environ, files=files).publish_secret == "development"


def test_missing_credential_in_production_is_required_problem():
    found = problems({"allowed_origins": "*"}, environ={"CREDENTIALS_DIRECTORY": "/creds"},
                     files={"/creds/publish_secret": "p"})
    assert len(found) == 1 and "guardian_secret: required" in found[0]


def test_asymmetric_algorithm_needs_public_key_not_secret():
    pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
    s = build({"guardian_algorithm": "RS256", "guardian_public_key_file": "/k.pem",
               "publish_secret": "p", "allowed_origins": "*"}, files={"/k.pem": pem + "\n"})
    assert s.guardian_public_key == pem and s.guardian_secrets == ()
    found = problems({"guardian_algorithm": "RS256", "publish_secret": "p", "allowed_origins": "*"})
    assert found == [f"{SRC}: production: guardian_public_key: required in environment 'production' "
                     "(set guardian_public_key or guardian_public_key_file)"]


def test_public_key_problems():
    assert "only used with guardian_algorithm RS256 or ES256" in prod_problem(
        guardian_public_key="-----BEGIN PUBLIC KEY-----")
    problem = prod_problem(guardian_algorithm="ES256", guardian_public_key=SECRET)
    assert "expected a PEM public key" in problem and SECRET not in problem


# ---------------------------------------------------------------- secrets never leak


def secretive():
    return build(dict(PROD_OK,
                      guardian_secret=[SECRET, SECRET + "-old"],
                      broker=f"redis://user:{SECRET}@redis.internal:6379/0",
                      metrics={"listen": "127.0.0.1:9100", "token": SECRET + "-metrics"}))


def test_secrets_absent_from_repr_and_masked():
    s = secretive()
    for text in (repr(s), str(s), repr(s.metrics), json.dumps(s.masked())):
        assert SECRET not in text
    m = s.masked()
    assert m["guardian_secrets"] == ["***", "***"]
    assert m["publish_secret"] == "***"
    assert m["metrics"] == {"host": "127.0.0.1", "port": 9100, "token": "***"}
    assert m["broker"] == "redis://user:***@redis.internal:6379/0"
    assert m["guardian_public_key"] is None
    json.dumps(m)  # JSON-able


def test_masked_has_every_field():
    m = prod().masked()
    assert set(m) == {f.name for f in dataclasses.fields(Settings)}
    assert m["metrics"] is None and m["history"] == []


def test_masked_unix_socket_password_in_query():
    s = prod(broker=f"unix:///run/redis.sock?db=1&password={SECRET}")
    assert SECRET not in repr(s) and SECRET not in json.dumps(s.masked())
    assert s.broker.endswith(SECRET)  # the real value is kept


def test_secrets_absent_from_errors():
    found = problems(dict(PROD_OK,
                          guardian_secret=[SECRET, 1],
                          publish_secret={"x": SECRET},
                          broker=f"redis://:{SECRET}@/0",
                          ws_base_url=f"ftp://u:{SECRET}@h",
                          metrics={"listen": "x", "token": [SECRET]}))
    assert len(found) == 6, found
    assert SECRET not in "\n".join(found)


def test_broker_with_unknown_scheme_shows_only_the_scheme():
    problem = prod_problem(broker=f"amqp://u:{SECRET}@h")
    assert "got scheme 'amqp'" in problem and SECRET not in problem


# ---------------------------------------------------------------- origins, broker, issuer


def test_allowed_origins():
    s = prod(allowed_origins=["https://App.Example.com", "https://*.example.com",
                              "http://localhost:*", "http://[::1]:8080", "https://app.example.com"])
    assert s.allowed_origins == ("https://app.example.com", "https://*.example.com",
                                 "http://localhost:*", "http://[::1]:8080")
    assert prod(allowed_origins="*").allowed_origins == ("*",)
    assert prod(allowed_origins="https://one.example.com").allowed_origins == ("https://one.example.com",)


@pytest.mark.parametrize("origin, hint", [
    ("app.example.com", "starts with a scheme"),
    ("https://app.example.com/", "has no path"),
    ("https://app.example.com/x", "has no path"),
    ("https://*", ""),
    ("https://a.*.com", ""),
    ("https://app.example.com:99999", ""),
    ("http://[zz]:1", ""),
    (5, ""),
])
def test_bad_origins(origin, hint):
    problem = prod_problem(allowed_origins=["https://ok.example.com", origin])
    assert problem.startswith(f"{SRC}: production: allowed_origins[1]: expected an origin like")
    assert hint in problem


def test_allowed_origins_required_outside_development():
    section = dict(PROD_OK)
    del section["allowed_origins"]
    assert "allowed_origins: required in environment 'production'" in one_problem(section)
    assert build({}, env="test").allowed_origins == DEV_ALLOWED_ORIGINS
    assert "must not be empty" in prod_problem(allowed_origins=[])


@pytest.mark.parametrize("broker", [
    "memory", "redis://localhost:6379/0", "rediss://:pw@redis.example.com:6380", "unix:///run/redis.sock",
])
def test_brokers(broker):
    assert prod(broker=broker).broker == broker


@pytest.mark.parametrize("broker", ["memroy", "redis://", "redis://h:port", "unix://", "http://h", 5])
def test_bad_brokers(broker):
    assert "expected 'memory' or a redis://, rediss:// or unix:// URL" in prod_problem(broker=broker)


def test_issuer_string_or_list():
    assert prod(issuer="rails").issuer == ("rails",)
    assert prod(issuer=["a", "b"]).issuer == ("a", "b")
    assert prod(issuer=None).issuer is None
    assert "issuer[1]: expected a non-empty string" in prod_problem(issuer=["a", ""])


# ---------------------------------------------------------------- metrics and history


def test_metrics():
    s = prod(metrics={"listen": "127.0.0.1:9100"})
    assert s.metrics == MetricsSettings(host="127.0.0.1", port=9100, token=None)
    assert prod(metrics={"listen": ":9100", "token": ""}).metrics.token is None
    assert prod(metrics=None).metrics is None
    assert prod(metrics=False).metrics is None


@pytest.mark.parametrize("metrics, message", [
    ({"token": "t"}, "metrics.listen: required"),
    ({"listen": "nope"}, "metrics.listen: expected \"host:port\""),
    ({"listen": ":1", "tokn": "t"}, "metrics.tokn: unknown key (did you mean 'token'?)"),
    ({"listen": "127.0.0.1:4000"}, "metrics.listen: must differ from listen"),
    ("127.0.0.1:9100", "metrics: expected a mapping with keys listen, token"),
])
def test_bad_metrics(metrics, message):
    assert message in prod_problem(metrics=metrics)


def test_history():
    s = prod(history=[{"topics": "deploys:*", "size": 100, "ttl": 86400},
                      {"topics": "chat:*", "size": "10", "ttl": "5m"}])
    assert s.history == (HistoryRule("deploys:*", 100, 86400.0), HistoryRule("chat:*", 10, 300.0))


def test_history_client_pushes_and_global_bounds():
    s = prod(history=[{"topics": "public:chat:*", "size": 10, "ttl": 60, "client_pushes": True},
                      {"topics": "public:*", "size": 10, "ttl": 60, "client_pushes": "no"}],
             max_history_topics="500", max_history_bytes="8MiB")
    assert s.history == (HistoryRule("public:chat:*", 10, 60.0, client_pushes=True),
                         HistoryRule("public:*", 10, 60.0, client_pushes=False))
    assert (s.max_history_topics, s.max_history_bytes) == (500, 8 * 1024 * 1024)
    assert (prod().max_history_topics, prod().max_history_bytes) == (10000, 64 * 1024 * 1024)
    found = problems(dict(PROD_OK, history=[{"topics": "a:*", "size": 1, "ttl": 1, "client_pushes": "maybe"}],
                          max_history_topics=0, max_history_bytes="lots"))
    joined = "\n".join(found)
    assert "history[0].client_pushes: expected true or false, got 'maybe'" in joined
    assert "max_history_topics: must be at least 1, got 0" in joined
    assert "max_history_bytes: expected a size in bytes, got 'lots'" in joined
    assert len(found) == 3


def test_history_problems_all_reported():
    found = problems(dict(PROD_OK, history=[
        {"topics": "a:*", "size": 0, "ttl": "1x"},
        {"topics": "b:*", "size": 1},
        {"topic": "c", "size": 1, "ttl": 1},
        "d:*",
    ]))
    joined = "\n".join(found)
    assert "history[0].size: must be at least 1, got 0" in joined
    assert "history[0].ttl: expected a number of seconds" in joined
    assert "history[1].ttl: required" in joined
    assert "history[2].topic: unknown key (did you mean 'topics'?)" in joined
    assert "history[3]: expected a mapping with keys topics, size, ttl" in joined
    assert len(found) == 5


def test_presence():
    s = prod(presence=[{"topics": "private:*", "key": "uid", "meta": ["name", "avatar"], "limit": 50},
                       {"topics": "room:*"}], presence_interval="250ms", presence_ttl="30s")
    assert s.presence == (PresenceSetting("private:*", "uid", ("name", "avatar"), 50), PresenceSetting("room:*"))
    assert (s.presence_interval, s.presence_ttl) == (0.25, 30.0)
    assert (prod().presence, prod().presence_interval, prod().presence_ttl) == ((), 0.1, 15.0)
    assert prod(presence=[{"topics": "a:*"}]).masked()["presence"] == [
        {"topics": "a:*", "key": "id", "meta": (), "limit": 1000}]
    found = "\n".join(problems(dict(PROD_OK, presence=[
        {"key": "id"}, {"topics": "a:*", "meta": "name"}, {"topics": "b:*", "meta": ["phx_ref"]},
        {"topics": "c:*", "meta": ["n", "n"]}, {"topics": "d:*", "limit": 0}, {"topics": "e:*", "colour": 1},
        {"topics": "f:*", "meta": ["__proto__"]}, {"topics": "g:*", "meta": [3]}, "h:*"],
        presence_interval=0, presence_ttl="soon")))
    for expected in ("presence[0].topics: required", "presence[1].meta: expected a list of sub field names",
                     "presence[2]: meta field 'phx_ref' is reserved", "presence[3]: meta lists a field twice",
                     "presence[4].limit: must be at least 1", "presence[5].colour: unknown key",
                     "presence[6]: meta field '__proto__' is reserved", "presence[7].meta[0]: expected a non-empty string",
                     "presence[8]: expected a mapping", "presence_interval: must be greater than 0",
                     "presence_ttl: expected a number of seconds"):
        assert expected in found, (expected, found)
    assert problems(dict(PROD_OK, presence={"topics": "a"}))[0].endswith("presence: expected a list, got a mapping")


def test_a_presence_limit_whose_list_could_pass_the_outbox_bound_is_warned_about():
    assert prod(presence=[{"topics": "a:*", "meta": ["name"]}]).warnings() == []
    notes = prod(presence=[{"topics": "a:*", "meta": ["name"], "limit": 10000}]).warnings()
    assert len(notes) == 1 and notes[0].startswith("presence[0]: a full topic's list (limit 10000)")
    assert prod(presence=[{"topics": "a:*", "meta": ["name"], "limit": 10000}],
                max_outbox_bytes="16MiB").warnings() == []


# ---------------------------------------------------------------- restart_required, warnings


def test_restart_required():
    a = prod()
    assert a.restart_required(a) == []
    b = dataclasses.replace(a, heartbeat_timeout=1.0, allowed_origins=("*",), log_level="debug",
                            guardian_secrets=("x",))
    assert a.restart_required(b) == []
    c = dataclasses.replace(a, port=1, path="/socket", broker="redis://h", broker_prefix="p",
                            reuse_port=True, metrics=MetricsSettings("127.0.0.1", 9),
                            history=(HistoryRule("a", 1, 1.0),), max_recovery=5, max_history_topics=9,
                            max_history_bytes=9000, presence=(PresenceSetting("a:*"),), presence_interval=1.0,
                            presence_ttl=3.0)
    assert a.restart_required(c) == ["listen", "path", "broker", "broker_prefix", "reuse_port", "metrics",
                                     "history", "max_recovery", "max_history_topics", "max_history_bytes",
                                     "presence", "presence_interval", "presence_ttl"]
    assert a.restart_required(dataclasses.replace(a, host="::1")) == ["listen"]
    # derived from the declarations (settings.key(restart=True)): the broker and its history are built at start
    assert config.RESTART_KEYS == ("listen", "path", "broker", "broker_prefix", "reuse_port", "metrics",
                                   "history", "max_recovery", "max_history_topics", "max_history_bytes",
                                   "presence", "presence_interval", "presence_ttl")


def test_warnings():
    assert prod().warnings() == []
    notes = prod(guardian_secret="short", publish_secret="short", allowed_origins="*").warnings()
    assert [n.split(":")[0] for n in notes] == ["guardian_secret", "publish_secret", "allowed_origins"]
    assert build({}, env="development").warnings() == []


@pytest.mark.parametrize("origins, warned", [
    (["https://*.com"], ["https://*.com"]), (["https://*.io:*", "https://*.example.com"], ["https://*.io:*"]),
    (["https://*.example.com", "http://*.example.co.uk:8080", "https://app.com"], []),
])
def test_a_wildcard_over_a_top_level_domain_is_warned_of(origins, warned):
    """Found by an outside trial: 'https://*.com' let every .com site in without a word."""
    notes = [n for n in prod(allowed_origins=origins).warnings() if n.startswith("allowed_origins")]
    assert [n.split("'")[1] for n in notes] == warned


# ---------------------------------------------------------------- resolve_env / resolve_path


def test_resolve_env():
    assert resolve_env("staging", {"PUSHERD_ENV": "a", "RAILS_ENV": "b"}) == "staging"
    assert resolve_env(None, {"PUSHERD_ENV": "a", "RAILS_ENV": "b"}) == "a"
    assert resolve_env(None, {"RAILS_ENV": "b"}) == "b"
    assert resolve_env(None, {"PUSHERD_ENV": "", "RAILS_ENV": "b"}) == "b"
    assert resolve_env(None, {}) == "development"


def test_resolve_path():
    assert resolve_path("/a.yml", {"PUSHERD_CONFIG": "/b.yml"}) == "/a.yml"
    assert resolve_path(None, {"PUSHERD_CONFIG": "/b.yml"}) == "/b.yml"
    assert resolve_path(None, {"PUSHERD_CONFIG": ""}) is None
    assert resolve_path(None, {}) is None


# ---------------------------------------------------------------- the shipped example


@pytest.mark.parametrize("env", ["development", "test"])
def test_example_file_loads_for_development_and_test(env):
    s = load(str(EXAMPLE), env, environ={})
    assert s.guardian_secrets == (env,) and s.publish_secret == env
    assert s.demo is (env == "development")


def test_example_file_production_needs_secrets_then_loads():
    with pytest.raises(ConfigError) as info:
        load(str(EXAMPLE), "production", environ={})
    assert [p.split(": ")[2] for p in info.value.problems] == ["guardian_secret", "publish_secret"]
    s = load(str(EXAMPLE), "production", environ={
        "PUSHERD_GUARDIAN_SECRET": SECRET, "PUSHERD_PUBLISH_SECRET": SECRET + "p",
        "PUSHERD_METRICS_TOKEN": "m"})
    assert s.ws_base_url == "wss://push.example.com"
    assert s.guardian_secrets == (SECRET,) and s.metrics.token == "m"
    assert "*" not in s.allowed_origins and s.demo is False
    assert s.warnings() == []


def test_example_file_production_with_systemd_credentials(tmp_path):
    (tmp_path / "guardian_secret").write_text(SECRET + "\n")
    (tmp_path / "publish_secret").write_text(SECRET + "p\n")
    s = load(str(EXAMPLE), "production", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.guardian_secrets == (SECRET,) and s.publish_secret == SECRET + "p"


def test_example_file_staging_reads_secret_files(tmp_path):
    doc = config.sources.parse_yaml(EXAMPLE.read_text(), str(EXAMPLE))
    files = {"/etc/pusherd/guardian_secret": "g\n", "/etc/pusherd/publish_secret": "p\n"}
    s = from_mapping(doc, "staging", str(EXAMPLE), {}, files_reader(files))
    assert (s.host, s.port) == ("0.0.0.0", 4000)
    assert s.broker == "redis://localhost:6379/1"


def test_load_reads_secret_file_relative_to_config(tmp_path):
    (tmp_path / "pusher.yml").write_text(
        "production:\n  guardian_secret_file: g.txt\n  publish_secret: p\n  allowed_origins: '*'\n")
    (tmp_path / "g.txt").write_text("from-file\n")
    s = load(str(tmp_path / "pusher.yml"), "production", environ={})
    assert s.guardian_secrets == ("from-file",)


@pytest.mark.parametrize("text,seconds", [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("45s", 45),
                                          ("2w", 1209600), ("90", 90), (60, 60), (1.5, 1.5), (" 1d ", 86400),
                                          ("250ms", 0.25), ("1.5 h", 5400)])
def test_one_duration_parser_for_config_and_the_command_line(text, seconds):
    """config keys and ``pusherd token --ttl`` read durations with the same parser (and units)."""
    from pusherd.config.values import seconds as parse
    assert parse(text) == seconds


@pytest.mark.parametrize("text", ["\u00b2s", "\u0663d", "1x", "", "-5s", "inf", "nan"])
def test_durations_are_ascii_digits_and_a_known_unit(text):
    from pusherd.config.values import Invalid, seconds as parse
    with pytest.raises(Invalid):
        parse(text)


def test_demo_assets_is_relative_to_the_config_file():
    settings = from_mapping({"test": {"demo_assets": "../node_modules/phoenix"}}, "test", "/srv/app/config/pusher.yml",
                            {}, lambda p: "")
    assert settings.demo_assets == "/srv/app/config/../node_modules/phoenix"


@pytest.mark.parametrize("metrics, warned", [
    ({"listen": "0.0.0.0:9100"}, True),
    ({"listen": "0.0.0.0:9100", "token": "t"}, False),
    ({"listen": "127.0.0.1:9100"}, False),
    ({"listen": "[::1]:9100"}, False),
])
def test_metrics_without_a_token_off_loopback_are_warned_about(metrics, warned):
    settings = from_mapping({"test": {"metrics": metrics}}, "test", "<t>", {}, lambda p: "")
    assert any(w.startswith("metrics.token") for w in settings.warnings()) == warned
