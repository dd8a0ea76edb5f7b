"""Fuzz targets for the two parsers that take bytes from strangers: WebSocket frames (through a
whole `Session`) and /publish requests (authorization header + body).

Each target takes raw bytes and returns nothing; any exception other than the documented ones is a
crash. They run under Hypothesis in CI (tests/fuzz/test_fuzz.py, bounded time) and, where atheris
builds, under libFuzzer::

    python tests/fuzz/fuzz_targets.py frames -max_total_time=300      # atheris
    python tests/fuzz/fuzz_targets.py publish --seconds 300            # Hypothesis, no atheris
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pusherd.core.errors import PublishError  # noqa: E402
from pusherd.core.protocol import LEGACY, V1, V2, Message, ProtocolError  # noqa: E402
from pusherd.core.publish import authorize, parse_body  # noqa: E402
from pusherd.core.session import Close, Join, Limits, Policy, Publish, Send, Session, Subscribe, Unsubscribe  # noqa: E402
from pusherd.core.tokens import Verifier  # noqa: E402
from pusherd.client import mint_token  # noqa: E402
from pusherd.core.topics import is_public, is_valid_topic  # noqa: E402

SECRET = "fuzz-guardian-secret-0123456789abcdef"
PUBLISH_SECRET = "fuzz-publish-secret-0123456789abcdef"
POLICY = Policy(Verifier([SECRET]), Limits(max_channels=4, max_topic_length=64, push_rate=1000, push_burst=1000))
TOKEN = mint_token(SECRET, listen=["private:a", "room:*"], publish=["room:*"], ttl=10 ** 9, now=0)
ACTIONS = (Send, Join, Subscribe, Unsubscribe, Publish, Close)


def _check_actions(session: Session, actions, serializer) -> None:
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, ACTIONS), action
        if isinstance(action, Join):
            # What the join flow sends once the broker is ready (reply, subscription) is checked too.
            assert action.topic in session.channels
            _check_actions(session, session.joined(action), serializer)
        if isinstance(action, Send):
            # Every frame pusherd writes is JSON a browser can parse (no NaN, valid UTF-8).
            json.loads(action.text, parse_constant=_refuse_constant)
            action.text.encode("utf-8")
        elif isinstance(action, Subscribe):
            # Access never goes beyond the literal grant: public, or the token's listen claim.
            assert is_valid_topic(action.topic, 64)
            assert is_public(action.topic) or action.topic in ("private:a",) or \
                (action.topic.startswith("room:") and len(action.topic) > 5), action.topic
        elif isinstance(action, Publish):
            assert is_public(action.topic) or action.topic.startswith("room:")
            # What a client pushes must re-encode for every other member.
            for s in (V1, V2, LEGACY):
                s.encode_broadcast(action.topic, action.event, action.payload)
    assert len(session.channels) <= 4


def _refuse_constant(name):
    raise AssertionError("non-JSON constant %s in an outgoing frame" % name)


def frames_target(data: bytes) -> None:
    """Split `data` into frames; feed each as text (when UTF-8) and as binary to V1/V2/legacy sessions."""
    parts = data.split(b"\x1e")[:16]
    for serializer in (V2, V1, LEGACY):
        session = Session(serializer, POLICY, now=1000.0)
        for i, part in enumerate(parts):
            try:
                frame = part.decode("utf-8")
            except UnicodeDecodeError:
                frame = part  # binary frame
            frame = frame.replace("$TOKEN", TOKEN) if isinstance(frame, str) else frame
            _check_actions(session, session.receive(frame, 1000.0 + i), serializer)
            if session.closed:
                break
        _check_actions(session, session.tick(5000.0), serializer)


def decode_target(data: bytes) -> None:
    """The serializers alone: a Message or a ProtocolError, nothing else."""
    try:
        inputs = [data, data.decode("utf-8")]
    except UnicodeDecodeError:
        inputs = [data]
    for serializer in (V1, V2):
        for frame in inputs:
            try:
                msg = serializer.decode(frame)
            except ProtocolError:
                continue
            assert isinstance(msg, Message)
            assert isinstance(msg.topic, str) and isinstance(msg.event, str) and isinstance(msg.payload, dict)
    if data[:1] == b"\x00":
        V2.decode_binary(data)


def publish_target(data: bytes) -> None:
    """An Authorization header and a body, split at the first newline."""
    header, _, body = data.partition(b"\n")
    try:
        grant = authorize([header.decode("latin-1")], [PUBLISH_SECRET], now=1000.0)
    except PublishError as exc:
        assert exc.status == 401
        grant = None
    for ctype in ("application/json", "application/x-www-form-urlencoded"):
        try:
            broadcasts = parse_body(body, ctype, 64)
        except PublishError as exc:
            assert exc.status == 400 and isinstance(exc.reason, str)
            continue
        assert broadcasts
        for b in broadcasts:
            assert is_valid_topic(b.topic, 64) and isinstance(b.payload, dict)
            for s in (V1, V2):
                s.encode_broadcast(b.topic, b.event, b.payload)
        if grant is not None:
            try:
                grant.check(broadcasts)
            except PublishError as exc:
                assert exc.status == 403


TARGETS = {"frames": frames_target, "decode": decode_target, "publish": publish_target}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "frames"
    target = TARGETS[name]
    try:
        import atheris  # type: ignore
    except ImportError:
        atheris = None
    if atheris is not None and "--seconds" not in argv:
        atheris.Setup([sys.argv[0]] + argv[1:], target)
        atheris.Fuzz()
        return 0
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 60.0
    from fuzz_strategies import run_for
    runs = run_for(target, seconds)
    print("%s: %d inputs in %.0f s, no crash" % (name, runs, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
