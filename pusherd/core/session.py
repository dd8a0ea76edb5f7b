"""The per-socket Phoenix Channels state machine: frames in, actions out, no I/O.

``Session.receive(frame, now)`` and ``Session.tick(now)`` return a list of actions for the
adapter to carry out in order (`Send`, `Join`, `Subscribe`, `Unsubscribe`, `Publish`, `Close`).
A join is answered in two steps, so that the whole join flow is decided here: `Join` says what
the broker must do first, `Session.joined` what follows once it has (reply, replay, subscribe).
Client input never raises: a bad frame becomes an error reply with a stable reason, or a close.
That is what keeps one bad client from disturbing anyone else, and it lets the whole protocol
be tested by feeding frames to a session and looking at the actions.
"""

import logging
from dataclasses import dataclass
from typing import Any, Counter, Dict, List, Optional, Sequence, Tuple

from . import errors
from .access import EventPattern, may_listen, may_publish, may_push_event
from .errors import AuthError
from .history import Recovery, format_position, parse_position, pending_after
from .protocol import (HEARTBEAT, PHOENIX_TOPIC, PHX_CLOSE, PHX_JOIN, PHX_LEAVE, MalformedFrame,
                       Message, Serializer, UndecodableFrame, is_reserved_event, is_valid_event)
from .tokens import Claims, Verifier
from .topics import is_public, is_valid_topic

log = logging.getLogger("pusherd.session")


# --- actions -------------------------------------------------------------------------------

class Send:
    """Write one text frame to this socket."""
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return "Send(%s)" % self.text


class Subscribe:
    """Start delivering broadcasts on `topic` to this socket (after any Send before it)."""
    __slots__ = ("topic", "params")

    def __init__(self, topic: str, params: Optional[dict] = None):
        self.topic = topic
        self.params = params or {}

    def __repr__(self):
        return "Subscribe(%r)" % self.topic


class Unsubscribe:
    __slots__ = ("topic",)

    def __init__(self, topic: str):
        self.topic = topic

    def __repr__(self):
        return "Unsubscribe(%r)" % self.topic


class Publish:
    """Broadcast a client push to every member of the topic; then answer the push.

    The adapter hands it to the broker and sends ``session.push_ok(self)`` on success or
    ``session.push_error(self, reason)`` when the broker refuses it.
    """
    __slots__ = ("topic", "event", "payload", "join_ref", "ref")

    def __init__(self, topic, event, payload, join_ref, ref):
        self.topic, self.event, self.payload, self.join_ref, self.ref = topic, event, payload, join_ref, ref

    def __repr__(self):
        return "Publish(%r, %r, %r)" % (self.topic, self.event, self.payload)


class Join:
    """A join the session accepted: the channel is open, the reply is not sent yet.

    The adapter makes the broker ready for it — reads the history after ``since`` when it is a
    string (`recover`), else makes sure broadcasts on the topic reach this process (its
    subscription confirmed) — while holding the topic's broadcasts, then carries out
    ``session.joined(join, recovery, held)``: the reply, what was missed, what was held, in
    order, then the subscription. With nothing to wait for it may call ``joined(join)`` at once.
    """
    __slots__ = ("topic", "join_ref", "ref", "since", "params")

    def __init__(self, topic, join_ref, ref, since, params):
        self.topic, self.join_ref, self.ref, self.since, self.params = topic, join_ref, ref, since, params

    @property
    def recover(self) -> bool:
        """The join carries ``since``: the broker's history decides what it missed."""
        return self.since is not None

    def __repr__(self):
        return "Join(%r%s)" % (self.topic, ", since=%r" % self.since if self.since is not None else "")


class Close:
    """Close the WebSocket with `code` (never 1000: phoenix.js must come back)."""
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason

    def __repr__(self):
        return "Close(%d, %r)" % (self.code, self.reason)


# --- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    heartbeat_timeout: float = 60.0
    max_topic_length: int = 255
    max_channels: int = 100
    push_rate: float = 10.0          # client pushes per second (token bucket refill)
    push_burst: int = 20             # bucket size
    flood_strikes: int = 50          # rate-limited pushes in a row before the socket is closed
    client_events: Tuple[EventPattern, ...] = (EventPattern("msg"),)   # what clients may push


@dataclass(frozen=True)
class Policy:
    """What a session consults on every join and push. Immutable: a reload builds a new one and
    hands it to every open session (``session.policy = new``).

    ``joins``, when given, is a Counter the sessions tally join outcomes in ("ok" or the
    refusal reason), for metrics; the same Counter outlives reloads.
    """

    verifier: Verifier
    limits: Limits = Limits()
    joins: Optional[Counter] = None


class Channel:
    __slots__ = ("topic", "join_ref", "claims", "expires_at")

    def __init__(self, topic: str, join_ref: Any, claims: Optional[Claims]):
        self.topic = topic
        self.join_ref = join_ref
        self.claims = claims
        # A public topic joined without a token never expires.
        self.expires_at = claims.exp if claims is not None and not is_public(topic) else None


# --- the state machine ------------------------------------------------------------------------

class Session:
    __slots__ = ("serializer", "policy", "channels", "last_seen", "_tokens", "_bucket_at", "_strikes",
                 "closed", "peer", "socket_claims")

    def __init__(self, serializer: Serializer, policy: Policy, now: float, peer: str = "-",
                 socket_claims: Optional[Claims] = None):
        """`socket_claims`: what the socket's own token granted, verified when it connected
        (`tokens.socket_token`): the claims of every join that brings no token of its own."""
        self.serializer = serializer
        self.policy = policy
        self.socket_claims = socket_claims
        self.channels: Dict[str, Channel] = {}
        self.last_seen = now
        self._tokens = float(policy.limits.push_burst)
        self._bucket_at = now
        self._strikes = 0
        self.closed = False
        self.peer = peer

    # -- input -----------------------------------------------------------------------------

    def receive(self, frame, now: float) -> List[object]:
        """Handle one text frame (str) or binary frame (bytes) from the client."""
        if self.closed:
            return []
        self.last_seen = now
        if isinstance(frame, (bytes, bytearray)):
            decode_binary = getattr(self.serializer, "decode_binary", None)
            if decode_binary is None:
                return self._close(errors.CLOSE_UNSUPPORTED, "binary frames are not supported")
            err = decode_binary(bytes(frame))
            if err.answerable:
                return [self._error_reply(err.join_ref, err.ref, err.topic, err.reason)]
            return self._close(errors.CLOSE_UNSUPPORTED, err.detail)
        try:
            msg = self.serializer.decode(frame)
        except UndecodableFrame as exc:
            log.info("%s: closing: undecodable frame (%s)", self.peer, exc.detail)
            return self._close(errors.CLOSE_INVALID_DATA, "invalid JSON")
        except MalformedFrame as exc:
            if exc.answerable:
                return [self._error_reply(exc.join_ref, exc.ref, exc.topic, exc.reason, detail=exc.detail)]
            log.info("%s: closing: malformed frame (%s)", self.peer, exc.detail)
            return self._close(errors.CLOSE_INVALID_DATA, exc.detail)
        return self._dispatch(msg, now)

    def _dispatch(self, msg: Message, now: float) -> List[object]:
        if msg.topic == PHOENIX_TOPIC:
            if msg.event == HEARTBEAT:
                return [self._reply(None, msg.ref, PHOENIX_TOPIC, "ok", {})]
            return [self._error_reply(None, msg.ref, msg.topic, errors.UNMATCHED_TOPIC)]
        if msg.event == PHX_JOIN:
            return self._join(msg, now)
        if msg.event == PHX_LEAVE:
            return self._leave(msg)
        if not is_valid_event(msg.event) or is_reserved_event(msg.event):
            return [self._error_reply(msg.join_ref, msg.ref, msg.topic, errors.INVALID_EVENT)]
        return self._push(msg, now)

    def _join(self, msg: Message, now: float) -> List[object]:
        topic, limits = msg.topic, self.policy.limits
        join_ref = msg.join_ref if msg.join_ref is not None else msg.ref
        if not is_valid_topic(topic, limits.max_topic_length):
            return [self._refuse(msg, join_ref, errors.INVALID_TOPIC, "invalid topic")]
        actions: List[object] = []
        old = self.channels.pop(topic, None)
        if old is not None:
            # Phoenix >= 1.2: close the existing channel, then process the new join.
            actions += [Send(self._encode(old.join_ref, old.join_ref, topic, PHX_CLOSE, {})), Unsubscribe(topic)]
        if len(self.channels) >= limits.max_channels:
            return actions + [self._refuse(msg, join_ref, errors.TOO_MANY_CHANNELS, "channel limit reached")]
        claims = None
        token = msg.payload.get("guardian_token")
        if token is None and self.socket_claims is not None:
            # No token of the join's own: the socket's, verified when it connected, if still valid.
            claims = self.socket_claims
            if claims.exp <= now:
                if not is_public(topic):
                    return actions + [self._refuse(msg, join_ref, errors.TOKEN_EXPIRED, "socket token expired")]
                claims = None
        elif not is_public(topic) or token is not None:
            if token is None:
                return actions + [self._refuse(msg, join_ref, errors.AUTHENTICATION_REQUIRED, "no guardian_token")]
            try:
                claims = self.policy.verifier.verify(token, msg.payload.get("csrf_token"), now=now)
            except AuthError as exc:
                if is_public(topic):
                    claims = None  # a public topic needs no token: a stale one is no reason to refuse
                else:
                    return actions + [self._refuse(msg, join_ref, exc.reason, exc.detail)]
        if not may_listen(topic, claims):
            return actions + [self._refuse(msg, join_ref, errors.FORBIDDEN, "listen claim does not match")]
        self.channels[topic] = Channel(topic, join_ref, claims)
        log.debug("%s: joined %s", self.peer, topic)
        if self.policy.joins is not None:
            self.policy.joins["ok"] += 1
        since = msg.payload.get("since")
        return actions + [Join(topic, join_ref, msg.ref, since if isinstance(since, str) else None, msg.payload)]

    def _refuse(self, msg: Message, join_ref: Any, reason: str, detail: str) -> Send:
        log.info("%s: join refused topic=%.200s reason=%s (%s)", self.peer, msg.topic, reason, detail)
        if self.policy.joins is not None:
            self.policy.joins[reason] += 1
        return self._reply(join_ref, msg.ref, msg.topic, "error", {"reason": reason})

    def _leave(self, msg: Message) -> List[object]:
        channel = self.channels.pop(msg.topic, None)
        join_ref = channel.join_ref if channel is not None else msg.join_ref
        actions: List[object] = [self._reply(join_ref, msg.ref, msg.topic, "ok", {})]
        if channel is not None:
            actions += [Send(self._encode(join_ref, join_ref, msg.topic, PHX_CLOSE, {})), Unsubscribe(msg.topic)]
        return actions

    def _push(self, msg: Message, now: float) -> List[object]:
        channel = self.channels.get(msg.topic)
        if channel is None:
            # Phoenix answers with a null join_ref: the client routes it by topic and ref.
            return [self._error_reply(None, msg.ref, msg.topic, errors.UNMATCHED_TOPIC)]
        if channel.expires_at is not None and channel.expires_at <= now:
            return self._expire(channel) + [self._error_reply(None, msg.ref, msg.topic, errors.TOKEN_EXPIRED)]
        if not may_push_event(msg.event, self.policy.limits.client_events):
            log.info("%s: push refused topic=%.200s event=%.100s reason=event_not_allowed", self.peer, msg.topic,
                     msg.event)
            return [self._error_reply(channel.join_ref, msg.ref, msg.topic, errors.EVENT_NOT_ALLOWED)]
        if not may_publish(msg.topic, channel.claims):
            log.info("%s: push refused topic=%.200s event=%.100s reason=forbidden", self.peer, msg.topic, msg.event)
            return [self._error_reply(channel.join_ref, msg.ref, msg.topic, errors.FORBIDDEN)]
        if not self._take_token(now):
            self._strikes += 1
            if self._strikes >= self.policy.limits.flood_strikes:
                log.warning("%s: closing: client push flood", self.peer)
                return self._close(errors.CLOSE_POLICY, "push rate limit exceeded")
            return [self._error_reply(channel.join_ref, msg.ref, msg.topic, errors.RATE_LIMITED)]
        self._strikes = 0
        return [Publish(msg.topic, msg.event, msg.payload, channel.join_ref, msg.ref)]

    def _take_token(self, now: float) -> bool:
        limits = self.policy.limits
        self._tokens = min(float(limits.push_burst), self._tokens + (now - self._bucket_at) * limits.push_rate)
        self._bucket_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    # -- answers for the adapter ----------------------------------------------------------

    def joined(self, join: Join, recovery: Optional[Recovery] = None, held: Sequence = ()) -> List[object]:
        """The rest of `join`, once the broker is ready: the reply, then (a join with ``since``) the
        broadcasts it missed, then those `held` while the broker was asked (minus the ones the
        replay already covered), then the subscription. Nothing if the channel was left, rejoined
        or closed meanwhile. `recovery`: the broker's answer for a join with ``since`` (None when
        it could not be asked: the page is told ``recovered: false``)."""
        channel = self.channels.get(join.topic)
        if self.closed or channel is None or channel.join_ref != join.join_ref:
            return []
        topic, encode = join.topic, self.serializer.encode_broadcast
        if not join.recover:
            actions: List[object] = [self._reply(join.join_ref, join.ref, topic, "ok", {})]
        else:
            ok = recovery is not None and recovery.recovered
            actions = [self._reply(join.join_ref, join.ref, topic, "ok",
                                   {"recovered": ok, "position": recovery.position if recovery else None})]
            if ok:
                actions += [Send(encode(topic, e.event, e.payload, format_position(recovery.epoch, e.offset)))
                            for e in recovery.missed]
            last = parse_position(recovery.position) if recovery and recovery.position else None
            held = pending_after(held, last[1] if last else 0)
        actions += [Send(encode(topic, b.event, b.payload, b.position)) for b in held]
        actions.append(Subscribe(topic, join.params))
        return actions

    def push_ok(self, push: Publish) -> Send:
        return self._reply(push.join_ref, push.ref, push.topic, "ok", {})

    def push_error(self, push: Publish, reason: str) -> Send:
        return self._error_reply(push.join_ref, push.ref, push.topic, reason)

    # -- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> List[object]:
        """Periodic check: idle sockets are closed, channels whose token expired are ended."""
        if self.closed:
            return []
        if now - self.last_seen > self.policy.limits.heartbeat_timeout:
            log.info("%s: closing: no frame for %.0f s", self.peer, now - self.last_seen)
            return self._close(errors.CLOSE_GOING_AWAY, "heartbeat timeout")
        actions: List[object] = []
        for channel in [c for c in self.channels.values() if c.expires_at is not None and c.expires_at <= now]:
            actions += self._expire(channel)
        return actions

    def _expire(self, channel: Channel) -> List[object]:
        self.channels.pop(channel.topic, None)
        log.info("%s: channel closed topic=%.200s reason=token_expired", self.peer, channel.topic)
        return [Send(self._encode(channel.join_ref, channel.join_ref, channel.topic, PHX_CLOSE, {})),
                Unsubscribe(channel.topic)]

    def next_expiry(self) -> Optional[float]:
        times = [c.expires_at for c in self.channels.values() if c.expires_at is not None]
        return min(times) if times else None

    # -- encoding --------------------------------------------------------------------------

    def _encode(self, join_ref, ref, topic, event, payload) -> str:
        return self.serializer.encode(Message(join_ref, ref, topic, event, payload))

    def _reply(self, join_ref, ref, topic, status: str, response: dict) -> Send:
        return Send(self.serializer.encode_reply(join_ref, ref, topic, status, response))

    def _error_reply(self, join_ref, ref, topic, reason: str, detail: str = "") -> Send:
        return self._reply(join_ref, ref, topic, "error", {"reason": reason})

    def _close(self, code: int, reason: str) -> List[object]:
        self.closed = True
        return [Close(code, reason)]
