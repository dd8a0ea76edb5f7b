"""The long-poll transport on Tornado's public API: ``<path>/longpoll``, for phoenix.js's LongPoll
(1.2 to 1.8) and its ``longPollFallbackMs``. One session a page, the same `Session` as a
WebSocket's, plugged into the same service (pusherd/service.py): joins, pushes, limits, history
and recovery, token expiry, fan-out and drain are the service's, none copied here.

The wire (reference/phoenix-protocol.md section 5): a GET without a live session opens one,
``{"status":410,"token":…,"messages":[]}`` (refused: 403, as a WebSocket upgrade would be); a
GET with one waits up to ``longpoll_window`` for messages (200) or answers 204; a POST carries
one message (``application/json``) or an ndjson batch of at most 100, each dispatched like a
WebSocket frame, answered ``{"status":200}``; OPTIONS answers the CORS preflight. Protocol
answers are HTTP 200 with the status in the body (clients read only the body); a request pusherd
refuses outright gets the matching HTTP status too, with ``{"status":…,"error":…}``.

A session (`LongPollConnection`) is a hub member whose frames are the encoded texts (``wire`` is
``str``): they wait in a bounded outbox (``max_outbox_bytes``; over it, the slow-consumer rule:
the session ends) for the pending GET (at most one: a second one answers the first with 204).
A session not polled for 1.5 windows (half a window if never polled after its open) is reaped:
its channels leave, through ``service.closed``. A session pusherd ends itself (slow consumer,
a protocol error, token flood, drain) answers its pending or next poll ``{"status":500}`` once,
so that every phoenix.js from 1.2 on reconnects and rejoins (a 410 would strand 1.2 to 1.8.0,
which take it for a fresh open); an unknown or reaped session's poll gets the 410 of a new one.

Across processes (several pusherd on one Redis broker, polls spread by a load balancer or
``reuse_port``): the session token names the process that holds the session; another process
forwards the poll or the POST to it through the broker (`Relay`), as Phoenix does, and relays
the answer. No sticky sessions needed.
"""

import asyncio
import base64
import collections
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import tornado.ioloop
import tornado.iostream
import tornado.web

from ..core import errors
from ..core.broadcast import Broadcast
from ..core.longpoll import (LongPollError, Outbox, as_objects, connect_params, mint_token, new_node_id, page_origin,
                             parse_token, poll_body, reap_after, secret_matches, session_token, split_batch,
                             status_body)
from ..core.session import Session
from .admission import Refusal, check_room, check_socket_token, check_vsn, refuse_origin
from .http import PublishBody

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")

#: How long a process waits for the process named in a session token to answer a forwarded poll
#: or POST before it takes the session for dead (Phoenix's ``pubsub_timeout_ms``).
PUBSUB_TIMEOUT = 2.0
#: What the CORS preflight allows a page to send (phoenix.js's headers, nothing else).
ALLOWED_HEADERS = "Accept, Content-Type, X-Phoenix-AuthToken, X-Phoenix-LongPoll-Token"
#: The status a session pusherd ended itself answers its pending or next poll with.
ENDED = 500


def _query(request) -> Dict[str, list]:
    """Every query parameter's values in order, UTF-8 text only."""
    out: Dict[str, list] = {}
    for name, values in request.query_arguments.items():
        texts = []
        for value in values:
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        if texts:
            out[name] = texts
    return out


# --- one session ---------------------------------------------------------------------------------

class LocalWaiter:
    """A GET on this process waiting for its session's messages."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future

    def answer(self, status: int, texts) -> None:
        if not self.future.done():
            self.future.set_result((status, texts))


class LongPollConnection:
    """One long-poll session: a `Connection` for the service, a member for the hub."""

    wire = str  # a broadcast's frame is its encoded text: it waits as such for the next poll

    def __init__(self, sessions: "LongPollSessions", token: str, sid: str, secret: str, origin: Optional[str],
                 serializer, session: Session):
        self.sessions = sessions
        self.service = sessions.service
        self.token = token
        self.sid = sid
        self.secret = secret
        self.origin = origin          # the Origin header it was opened with (None: same-origin, or no browser)
        self.serializer = serializer
        self.objects = as_objects(serializer)
        self.session = session
        self.buffer = Outbox(self.service.config.settings.max_outbox_bytes)
        self.waiter = None            # the pending GET (LocalWaiter, or a relay's RemoteWaiter)
        self._window_timer = None
        self._flush_due = False
        self.last_poll = time.monotonic()
        self.polled = False           # polled since its open
        self.ended: Optional[str] = None  # why pusherd ended it (its next poll gets 500), once ended

    # -- the Connection protocol ----------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        if self.ended is not None:
            self.service.counters.frames_dropped += 1
            return
        if not self.buffer.add(text):
            self._slow_consumer()
            return
        if self.waiter is not None and not self._flush_due:
            # Answered on the next loop iteration: what one event brings (a join's reply and
            # replay, a publish batch) goes in one answer.
            self._flush_due = True
            self.sessions.loop.add_callback(self._flush)

    def send_text(self, text: str) -> None:
        self.send_frame(text)

    def close_with(self, code: int, reason: str) -> None:
        self.end(reason)

    def tick(self, now: float) -> None:
        if self.ended is not None:
            return
        if self.waiter is None and time.monotonic() - self.last_poll > reap_after(self.sessions.window, self.polled):
            log.debug("%s: long-poll session reaped (no poll)", self.session.peer)
            self.sessions.counters["reaped"] += 1
            self.end(None)
            return
        actions = self.session.tick(now)
        if actions:
            self.service.execute(self, actions)

    # -- polls ----------------------------------------------------------------------------------

    def listen(self, waiter) -> None:
        """A GET for this session: answered at once when messages wait, else when they come or
        the window ends. A GET already pending is answered 204 (the newer one takes its place)."""
        self.last_poll = time.monotonic()
        self.polled = True
        self.session.last_seen = time.time()   # no heartbeats over long-poll: a poll is a sign of life
        old, self.waiter = self.waiter, waiter
        if old is not None:
            self._cancel_timer()
            old.answer(204, [])
        if len(self.buffer):
            self._flush()
        else:
            self._window_timer = self.sessions.loop.call_later(self.sessions.window, self._window_over, waiter)

    def forget(self, waiter) -> None:
        """The GET went away unanswered (its client closed): what waits stays for the next one."""
        if self.waiter is waiter:
            self.waiter = None
            self.last_poll = time.monotonic()
            self._cancel_timer()

    def requeue(self, texts) -> None:
        """Messages an answer took but could not deliver (its client went away): first in line again."""
        if self.ended is None and texts:
            texts = list(texts) + self.buffer.take()
            self.buffer.size = sum(len(t) for t in texts)
            self.buffer.texts = texts

    def _window_over(self, waiter) -> None:
        self._window_timer = None
        if self.waiter is waiter:
            self.waiter = None
            self.last_poll = time.monotonic()
            waiter.answer(204, [])

    def _flush(self) -> None:
        self._flush_due = False
        waiter = self.waiter
        if waiter is None or not len(self.buffer):
            return
        self.waiter = None
        self._cancel_timer()
        self.last_poll = time.monotonic()
        waiter.answer(200, self.buffer.take())

    def _cancel_timer(self) -> None:
        if self._window_timer is not None:
            self.sessions.loop.remove_timeout(self._window_timer)
            self._window_timer = None

    # -- the end --------------------------------------------------------------------------------

    def _slow_consumer(self) -> None:
        counters = self.service.counters
        counters.slow_consumer_closes += 1
        counters.frames_dropped += len(self.buffer) + 1
        log.info("%s: ending long-poll session: slow consumer (outbox over %d bytes)", self.session.peer,
                 self.buffer.limit)
        self.end("slow consumer")

    def end(self, reason: Optional[str]) -> None:
        """The session is over: its channels leave (service.closed). `reason`: pusherd ended it
        (its pending or next poll gets 500, then it is forgotten); None: reaped, forgotten now."""
        if self.ended is not None:
            return
        self.ended = reason or "reaped"
        self.buffer.take()
        self._cancel_timer()
        self.service.closed(self)
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.answer(ENDED, [])
            self.sessions.forget(self)
        elif reason is None:
            self.sessions.forget(self)
        else:
            self.sessions.bury(self)

    def body(self, status: int, texts) -> Tuple[int, str]:
        """(HTTP status, body) of a poll's answer."""
        if status == ENDED:
            return 200, status_body(ENDED, "session ended: %s" % self.ended)
        return 200, poll_body(status, self.token, texts, self.objects)


# --- every session of this process -------------------------------------------------------------

class LongPollSessions:
    """The long-poll sessions of one process, by sid; the ended ones until their next poll (or a
    window and a half); this process's node id; the relay to the others (None: one process)."""

    def __init__(self, service: "Service", node: Optional[str] = None):
        self.service = service
        self.node = node or new_node_id(secrets.token_bytes)
        self.live: Dict[str, LongPollConnection] = {}
        self.buried: "collections.OrderedDict[str, Tuple[LongPollConnection, float]]" = collections.OrderedDict()
        self.relay: Optional["Relay"] = None
        self.counters = collections.Counter()   # opened, reaped, forwarded_polls, forwarded_posts
        self._loop = None

    @property
    def loop(self):
        if self._loop is None:
            self._loop = tornado.ioloop.IOLoop.current()
        return self._loop

    @property
    def window(self) -> float:
        return self.service.config.settings.longpoll_window

    def open(self, serializer, claims, peer: str, origin: Optional[str]) -> LongPollConnection:
        token, sid, secret = mint_token(self.node, secrets.token_bytes)
        session = Session(serializer, self.service.policy, time.time(), peer=peer, socket_claims=claims)
        conn = LongPollConnection(self, token, sid, secret, origin, serializer, session)
        self.live[sid] = conn
        self.counters["opened"] += 1
        self.service.opened(conn)
        return conn

    def find(self, token: Optional[str], origin: Optional[str]):
        """The session `token` names here: a LongPollConnection (live or ended), the node id of
        another process (str), or None (no such session: unknown, forged, reaped)."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        node, sid, secret = parsed
        if node != self.node:
            return node if self.relay is not None else None
        conn = self.live.get(sid)
        if conn is None:
            buried = self.buried.get(sid)
            conn = buried[0] if buried is not None else None
        if conn is None or not secret_matches(conn.secret, secret):
            return None
        if conn.origin is not None and origin is not None and origin != conn.origin:
            return None  # bound to the page origin that opened it
        return conn

    def forget(self, conn: LongPollConnection) -> None:
        self.live.pop(conn.sid, None)
        self.buried.pop(conn.sid, None)

    def bury(self, conn: LongPollConnection) -> None:
        """An ended session waits for its next poll (to answer it 500), a window and a half at most."""
        self.live.pop(conn.sid, None)
        now = time.monotonic()
        self.buried[conn.sid] = (conn, now + 1.5 * self.window)
        limit = max(1, self.service.config.settings.max_connections)
        while self.buried:
            sid, (_, until) = next(iter(self.buried.items()))
            if until > now and len(self.buried) <= limit:
                break
            del self.buried[sid]

    def take_buried(self, conn: LongPollConnection) -> None:
        """The ended session's next poll has been answered: forgotten."""
        self.buried.pop(conn.sid, None)


# --- across processes ----------------------------------------------------------------------------

class _PassThrough:
    """The relay's 'serializer' as a hub member: a broadcast on its topic reaches it undecoded."""

    vsn = "relay"

    @staticmethod
    def encode_broadcast(topic, event, payload, position=None):
        return event, payload


def _same(frame):
    return frame


def relay_topic(node: str) -> str:
    """The broker topic a process listens on for forwarded polls and their answers. It holds a
    space: no client can join it and no publish can name it (core.topics.is_valid_topic)."""
    return " longpoll:" + node


class RemoteWaiter:
    """A GET waiting on another process (which forwarded it) for a session held here."""

    __slots__ = ("relay", "node", "ref", "conn")

    def __init__(self, relay: "Relay", node: str, ref: int, conn: LongPollConnection):
        self.relay, self.node, self.ref, self.conn = relay, node, ref, conn

    def answer(self, status: int, texts) -> None:
        code, body = self.conn.body(status, texts)
        if status == ENDED:
            self.conn.sessions.take_buried(self.conn)
        self.relay.send(self.node, "body", {"ref": self.ref, "code": code, "body": body})


class Relay:
    """Forwards polls and POSTs for a session another process holds to it, through the broker,
    and carries out those forwarded here. A hub member of this process's relay topic.

    Forwarded here: ``poll`` (answered ``held``, then ``body``; or ``body`` at once; ``gone``
    for no such session), ``cancel`` (the client of a held poll went away), ``post``
    (answered ``body``). The process that forwards waits ``PUBSUB_TIMEOUT`` for a first answer;
    without one the session is taken for dead (its process stopped or restarted).
    """

    serializer = _PassThrough()
    wire = staticmethod(_same)

    def __init__(self, sessions: LongPollSessions):
        self.sessions = sessions
        self.service = sessions.service
        self.topic = relay_topic(sessions.node)
        self.pending: Dict[int, Any] = {}
        self._ref = 0

    async def start(self) -> None:
        self.service.hub.subscribe(self.topic, self)
        try:
            await self.service.broker.activate(self.topic)
        except Exception as exc:  # the broker resubscribes it once it is back
            log.warning("long-poll relay: subscription not confirmed yet: %s", exc or type(exc).__name__)

    def stop(self) -> None:
        self.service.hub.unsubscribe(self.topic, self)

    def send(self, node: str, op: str, payload: dict) -> None:
        payload["from"] = self.sessions.node
        self.service.spawn(self._send(node, op, payload))

    async def _send(self, node: str, op: str, payload: dict) -> None:
        try:
            await self.service.broker.publish(Broadcast(relay_topic(node), op, payload))
        except Exception as exc:  # the other side times out: the session is taken for dead
            log.debug("long-poll relay: %s to %s not sent: %s", op, node, exc or type(exc).__name__)

    # -- forwarding (this process got a request for another's session) -------------------------

    async def forward(self, node: str, op: str, payload: dict, wait: float):
        """Send `op` to `node` and wait for its answer: ("gone"|"body", payload), or None when
        the node did not answer (no such process). A ``held`` answer extends the wait by `wait`."""
        self._ref += 1
        ref = payload["ref"] = self._ref
        answers: "collections.deque" = collections.deque()
        arrived = asyncio.Event()
        self.pending[ref] = (answers, arrived)
        self.send(node, op, payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBSUB_TIMEOUT
        try:
            while True:
                try:
                    await asyncio.wait_for(arrived.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return None
                arrived.clear()
                while answers:
                    kind, answer = answers.popleft()
                    if kind != "held":
                        return kind, answer
                    deadline = loop.time() + wait + PUBSUB_TIMEOUT
        finally:
            self.pending.pop(ref, None)

    # -- hub member: a message on this process's relay topic ------------------------------------

    def send_frame(self, frame) -> None:
        op, payload = frame
        origin = payload.get("from")
        if not isinstance(origin, str) or origin == self.sessions.node:
            return
        try:
            handler = getattr(self, "_on_" + op)
        except (AttributeError, TypeError):
            return
        try:
            handler(origin, payload)
        except Exception:  # a broken message from another process must not break the hub
            log.exception("long-poll relay: %s from %s failed", op, origin)

    def _answered(self, kind: str, payload: dict) -> None:
        pending = self.pending.get(payload.get("ref"))
        if pending is not None:
            queue, event = pending
            queue.append((kind, payload))
            event.set()

    def _on_held(self, origin: str, payload: dict) -> None:
        self._answered("held", payload)

    def _on_gone(self, origin: str, payload: dict) -> None:
        self._answered("gone", payload)

    def _on_body(self, origin: str, payload: dict) -> None:
        self._answered("body", payload)

    def _on_poll(self, origin: str, payload: dict) -> None:
        ref = payload.get("ref")
        conn = self.sessions.find(payload.get("token"), payload.get("origin"))
        if not isinstance(conn, LongPollConnection):
            self.send(origin, "gone", {"ref": ref})
            return
        self.sessions.counters["forwarded_polls"] += 1
        waiter = RemoteWaiter(self, origin, ref, conn)
        if conn.ended is not None:
            waiter.answer(ENDED, [])
            return
        self.send(origin, "held", {"ref": ref})
        conn.listen(waiter)

    def _on_cancel(self, origin: str, payload: dict) -> None:
        conn = self.sessions.find(payload.get("token"), payload.get("origin"))
        if isinstance(conn, LongPollConnection):
            waiter = conn.waiter
            if isinstance(waiter, RemoteWaiter) and waiter.node == origin and waiter.ref == payload.get("cancels"):
                conn.forget(waiter)

    def _on_post(self, origin: str, payload: dict) -> None:
        ref = payload.get("ref")
        conn = self.sessions.find(payload.get("token"), payload.get("origin"))
        if not isinstance(conn, LongPollConnection):
            self.send(origin, "gone", {"ref": ref})
            return
        self.sessions.counters["forwarded_posts"] += 1
        try:
            body = base64.b64decode(payload.get("body") or "")
        except (ValueError, TypeError):
            body = b""
        code, text = dispatch_post(conn, body, str(payload.get("ctype") or ""))
        self.send(origin, "body", {"ref": ref, "code": code, "body": text})


def dispatch_post(conn: LongPollConnection, body: bytes, content_type: str) -> Tuple[int, str]:
    """One POST for a session held here: its messages, each as a WebSocket frame, in order."""
    if conn.ended is not None:
        return 200, status_body(410)
    service = conn.service
    try:
        messages = split_batch(body, content_type, service.config.settings.max_frame_bytes)
    except LongPollError as exc:
        return exc.status, status_body(exc.status, exc.reason)
    for message in messages:
        service.receive(conn, message)
        if conn.ended is not None:
            # What it sent made pusherd end the session (a protocol error, a push flood): the
            # client errors and reconnects, as after a WebSocket close.
            return 400, status_body(400, conn.ended)
    return 200, status_body(200)


# --- the handler ---------------------------------------------------------------------------------

@tornado.web.stream_request_body
class LongPollHandler(tornado.web.RequestHandler):
    """``<path>/longpoll``: GET opens or polls, POST sends, OPTIONS answers the preflight."""

    def initialize(self, service: "Service", sessions: LongPollSessions):
        self.service = service
        self.sessions = sessions
        self.origin: Optional[str] = None     # the Origin header, when the request has one
        self._body: Optional[PublishBody] = None
        self._waiting: Optional[Tuple[LongPollConnection, Any]] = None
        self._forwarding = None   # (node, op, payload) while another process answers for its session
        self._gone = False

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")  # a token in a header leaves the URL the same for every session

    def prepare(self):
        """Every request: the origin (CORS answers only allowed pages), then the body's bound."""
        headers = self.request.headers
        if self.service.draining:
            self.set_header("Connection", "close")
        origin, from_page = page_origin(headers, "%s://%s" % (self.request.protocol, self.request.host))
        if from_page and not self.service.config.origins.allows(origin):
            refusal = refuse_origin(self.service, "long-poll request", origin)
            self.set_header("Connection", "close")
            return self._send(refusal.status, status_body(403, refusal.reason))
        self.origin = headers.get("Origin")
        if self.origin is not None:
            self.set_header("Access-Control-Allow-Origin", self.origin)
            self.set_header("Vary", "Origin")
        if self.request.method == "POST":
            self._body = PublishBody(self.service.config.settings.max_publish_bytes)
            refusal = self._body.start(self.request.connection, headers.get("Content-Length"))
            if refusal is not None:
                self.set_header("Connection", "close")
                self._send(refusal[0], status_body(refusal[0], refusal[1]))

    def data_received(self, chunk: bytes) -> None:
        body = self._body
        if body is not None and not body.refused and not body.add(chunk):
            self.set_header("Connection", "close")
            self._send(413, status_body(413, body.too_large))

    def _send(self, status: int, text: str) -> None:
        if self._finished or self._gone:
            return
        self.set_status(status)
        try:
            self.finish(text)
        except tornado.iostream.StreamClosedError:
            pass

    def options(self):
        self.set_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Max-Age", "3600")
        self.set_status(200)
        self.finish()

    # -- GET -------------------------------------------------------------------------------------

    async def get(self):
        query = _query(self.request)
        token = session_token(query, self.request.headers.get("X-Phoenix-LongPoll-Token"))
        found = self.sessions.find(token, self.origin)
        if isinstance(found, LongPollConnection):
            self.quiet_access_log = True  # a poll every window per page: not a line each
            return await self._listen(found)
        if isinstance(found, str):  # held by another process
            self.quiet_access_log = True
            answer = await self._forward(found, "poll", {"token": token, "origin": self.origin})
            if answer is not None:
                return
        self._open(query)

    def _open(self, query) -> None:
        service = self.service
        try:
            serializer = check_vsn(service, (query.get("vsn") or [None])[-1])
            check_room(service)
            claims = check_socket_token(service, "long-poll open", connect_params(query),
                                        self.request.headers.get("X-Phoenix-AuthToken"))
        except Refusal as refusal:
            if refusal.retry_after:
                self.set_header("Retry-After", refusal.retry_after)
            # phoenix.js reads the body: 403 makes it stop; 500 makes it retry with backoff.
            return self._send(refusal.status, status_body(403 if refusal.status == 403 else 500, refusal.reason))
        conn = self.sessions.open(serializer, claims, self.request.remote_ip or "-", self.origin)
        self._send(200, poll_body(410, conn.token, (), conn.objects))

    async def _listen(self, conn: LongPollConnection) -> None:
        if conn.ended is not None:
            self.sessions.take_buried(conn)
            code, body = conn.body(ENDED, [])
            return self._send(code, body)
        future = asyncio.get_running_loop().create_future()
        waiter = LocalWaiter(future)
        self._waiting = (conn, waiter)
        conn.listen(waiter)
        status, texts = await future
        self._waiting = None
        if self._gone:  # the client left as the answer was made: what it took waits for the next poll
            conn.requeue(texts)
            return
        code, body = conn.body(status, texts)
        self._send(code, body)

    # -- POST ------------------------------------------------------------------------------------

    async def post(self):
        if self._finished:
            return
        query = _query(self.request)
        token = session_token(query, self.request.headers.get("X-Phoenix-LongPoll-Token"))
        body = self._body.take() if self._body is not None else b""
        content_type = self.request.headers.get("Content-Type", "")
        found = self.sessions.find(token, self.origin)
        if isinstance(found, LongPollConnection):
            code, text = dispatch_post(found, body, content_type)
            return self._send(code, text)
        if isinstance(found, str):
            payload = {"token": token, "origin": self.origin, "ctype": content_type,
                       "body": base64.b64encode(body).decode("ascii")}
            if await self._forward(found, "post", payload) is not None:
                return
        self._send(200, status_body(410))

    # -- forwarded to another process ------------------------------------------------------------

    async def _forward(self, node: str, op: str, payload: dict):
        relay = self.sessions.relay
        self.sessions.counters["forwarded"] += 1
        self._forwarding = (node, op, payload)
        try:
            answer = await relay.forward(node, op, payload, self.sessions.window)
        finally:
            self._forwarding = None
        if answer is None or answer[0] == "gone":
            return None
        if self._gone:
            return answer
        reply = answer[1]
        code, text = reply.get("code"), reply.get("body")
        if not isinstance(code, int) or not isinstance(text, str):
            return None
        self._send(code, text)
        return answer

    def on_connection_close(self):
        self._gone = True
        forwarding, self._forwarding = self._forwarding, None
        if forwarding is not None and forwarding[1] == "poll":
            node, _, payload = forwarding
            self.sessions.relay.send(node, "cancel", {"token": payload["token"], "origin": payload["origin"],
                                                      "cancels": payload.get("ref")})
        if self._waiting is not None:
            conn, waiter = self._waiting
            self._waiting = None
            conn.forget(waiter)
            waiter.answer(204, [])
