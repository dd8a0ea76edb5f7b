"""Hypothesis strategies that produce the inputs of the fuzz targets, and a time-bounded runner.

Random bytes alone rarely get past the JSON parser, so most inputs are built from the shapes the
parsers expect (Phoenix frames, publish bodies) with wrong types, odd strings and deep nesting
mixed in; a share are mutations of valid inputs at the byte level.
"""

import hashlib
import json
import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ODD_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "phoenix", "heartbeat", "phx_join", "phx_leave", "phx_reply", "phx_close", "public:x",
                     "public:", "private:a", "room:1", "room:", "room:*", "private:*", "$TOKEN", "a b", "\u0000",
                     "\u202e", "\ud7ff", "x" * 300, "public:" + "y" * 60]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    ODD_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(ODD_TEXT, inner, max_size=4)),
                    max_leaves=20)
PAYLOAD = st.one_of(st.just({}), st.dictionaries(ODD_TEXT, JSON, max_size=4),
                    st.builds(lambda t, c: {"guardian_token": t, "csrf_token": c},
                              st.one_of(st.just("$TOKEN"), JSON), JSON),
                    JSON)


def _deep(depth):
    return "[" * depth + "]" * depth


def _v2(join_ref, ref, topic, event, payload):
    return json.dumps([join_ref, ref, topic, event, payload])


def _v1(join_ref, ref, topic, event, payload):
    return json.dumps({"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload})


REF = st.one_of(st.none(), st.text(max_size=5), st.integers(), JSON)
STRUCTURED_FRAME = st.builds(lambda enc, *f: enc(*f), st.sampled_from([_v2, _v1]), REF, REF, ODD_TEXT, ODD_TEXT,
                             PAYLOAD)
RAW_FRAME = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["NaN", "[1e999]", "-Infinity", '["1","2","public:x","e",{"n":NaN}]',
                     '["1","2","public:x","phx_join",{"a":%s}]' % _deep(80), _deep(5000), "[" * 3000, "{}", "[]"]),
    st.integers(0, 200).map(lambda d: '["1","2","public:x","phx_join",{"a":%s}]' % _deep(d)),
)


def _mutate(data: bytes, positions, values) -> bytes:
    buf = bytearray(data)
    for p, v in zip(positions, values):
        if buf:
            buf[p % len(buf)] = v
    return bytes(buf)


MUTATED = st.builds(_mutate, STRUCTURED_FRAME.map(str.encode), st.lists(st.integers(0, 10 ** 6), max_size=3),
                    st.lists(st.integers(0, 255), max_size=3))
FRAME_BYTES = st.one_of(STRUCTURED_FRAME.map(str.encode), RAW_FRAME.map(lambda s: s.encode("utf-8", "surrogatepass")),
                        MUTATED, st.binary(max_size=64))
FRAMES_INPUT = st.lists(FRAME_BYTES, min_size=1, max_size=8).map(lambda fs: b"\x1e".join(fs))

EVENT = st.builds(lambda topic, event, payload, extra: dict({"topic": topic, "event": event, "payload": payload},
                                                            **extra),
                  ODD_TEXT, ODD_TEXT, PAYLOAD, st.dictionaries(st.sampled_from(["topics", "ref", "x"]), JSON, max_size=1))
BODY = st.one_of(
    EVENT.map(json.dumps),
    st.lists(EVENT, max_size=4).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=100),
    st.builds(lambda t, e, p: "topic=%s&event=%s&payload=%s" % (t, e, p), ODD_TEXT, ODD_TEXT, st.text(max_size=30)),
)
AUTH = st.one_of(st.just("Bearer " + "fuzz-publish-secret-0123456789abcdef"), st.text(max_size=40),
                 st.builds(lambda a, b, c: "Bearer %s.%s.%s" % (a, b, c), *[st.text("ab-_XYZ09", max_size=20)] * 3))
PUBLISH_INPUT = st.builds(lambda a, b: a.encode("latin-1", "replace").replace(b"\n", b" ") + b"\n"
                          + b.encode("utf-8", "surrogatepass"), AUTH, BODY)
PUBLISH_BYTES = st.one_of(PUBLISH_INPUT, st.builds(_mutate, PUBLISH_INPUT, st.lists(st.integers(0, 10 ** 6), max_size=3),
                                                   st.lists(st.integers(0, 255), max_size=3)))

STRATEGIES = {"frames": FRAMES_INPUT, "decode": FRAME_BYTES, "publish": PUBLISH_BYTES}


def mutants(data: bytes, count: int):
    """`count` byte-level variants of `data` (flip, insert, delete, duplicate a slice), chosen
    deterministically from `data` itself so that a crash reproduces from the reported input."""
    rng = random.Random(hashlib.blake2b(data, digest_size=8).digest())
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randint(0, len(buf))
            if op == 0 and buf:
                buf[pos % len(buf)] ^= 1 << rng.randrange(8)
            elif op == 1:
                buf[pos:pos] = bytes([rng.choice(b'[]{}",:\\0nNe\x00\x80\xff\x1e')])
            elif op == 2 and buf:
                del buf[pos:pos + rng.randint(1, 8)]
            else:
                buf[pos:pos] = buf[pos:pos + rng.randint(1, 16)]
        yield bytes(buf)


def run_for(target, seconds: float, strategy=None, batch: int = 200, mutations: int = 20) -> int:
    """Run `target` on generated inputs (and byte-level mutants of each) for about `seconds`.

    A crash raises: Hypothesis shrinks the generated input; a crashing mutant is named exactly.
    Generating structured inputs is the slow part, so each one is stretched by its mutants.
    """
    if strategy is None:
        strategy = STRATEGIES[target.__name__.replace("_target", "")]
    runs = 0

    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one_batch(data):
        nonlocal runs
        runs += 1
        target(data)
        for variant in mutants(data, mutations):
            runs += 1
            try:
                target(variant)
            except Exception as exc:
                raise AssertionError("crash on mutant %r of the generated input" % (variant,)) from exc

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        one_batch()
    return runs
