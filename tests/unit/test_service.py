"""service.py: the join flow and pushes carried out against a broker and a hub, for any transport
(connections are stand-ins with a real Session; no network)."""

import asyncio

import pytest

from pusherd.brokers.memory import MemoryBroker
from pusherd.core.broadcast import Broadcast
from pusherd.core.protocol import V2
from pusherd.core.session import Policy, Session
from pusherd.core.tokens import Verifier
from pusherd.core.origins import OriginPolicy
from pusherd.service import Config, Service


class GatedBroker(MemoryBroker):
    """A memory broker whose subscriptions take effect only when the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.confirmed = set()

    def active(self, topic):
        return topic in self.confirmed

    async def activate(self, topic):
        await self.gate.wait()
        self.confirmed.add(topic)


class Conn:
    """A connection of any transport, as the service sees it; its messages as texts."""

    serializer = V2
    wire = staticmethod(str)

    def __init__(self, service):
        self.session = Session(V2, service.policy, 0.0)
        self.texts = []
        self.closed_with = None

    def send_frame(self, frame):
        self.texts.append(frame)

    def send_text(self, text):
        self.texts.append(text)

    def close_with(self, code, reason):
        self.closed_with = code

    def tick(self, now):
        pass


def service_over(broker):
    config = Config(settings=None, policy=Policy(Verifier(["s" * 32])), origins=OriginPolicy(["*"]),
                    publish_secrets=("p",))
    return Service(broker, config)


@pytest.mark.parametrize("left_meanwhile", [False, True])
def test_a_join_reply_waits_for_the_broker_and_held_broadcasts_follow_it(left_meanwhile):
    async def run():
        broker = GatedBroker()
        service = service_over(broker)
        await broker.start(service.deliver)
        conn = Conn(service)
        service.opened(conn)
        service.receive(conn, '["1","1","public:x","phx_join",{}]')
        for _ in range(3):
            await asyncio.sleep(0)
        await broker.publish(Broadcast("public:x", "early", {}))
        assert conn.texts == [], "nothing before the broker confirmed"
        if left_meanwhile:
            service.receive(conn, '["1","2","public:x","phx_leave",{}]')
            conn.texts.clear()
        broker.gate.set()
        await asyncio.wait(list(service.tasks))
        await broker.publish(Broadcast("public:x", "live", {}))
        return conn.texts, service.hub

    texts, hub = asyncio.run(run())
    if left_meanwhile:
        assert texts == [] and "public:x" not in hub.topics
    else:
        assert [("phx_reply" in t, "early" in t, "live" in t) for t in texts] == \
            [(True, False, False), (False, True, False), (False, False, True)]
        assert hub.members("public:x") == 1


def test_a_join_on_a_topic_the_broker_already_delivers_is_answered_at_once():
    async def run():
        broker = MemoryBroker()
        service = service_over(broker)
        await broker.start(service.deliver)
        conn = Conn(service)
        service.opened(conn)
        service.receive(conn, '["1","1","public:x","phx_join",{}]')
        answered_at_once = list(conn.texts)
        await broker.publish(Broadcast("public:x", "live", {}))
        return answered_at_once, conn.texts, service

    at_once, texts, service = asyncio.run(run())
    assert len(at_once) == 1 and "phx_reply" in at_once[0] and not service.tasks
    assert "live" in texts[1]


def test_a_closed_connection_leaves_every_topic_and_a_reload_reaches_open_sessions():
    async def run():
        broker = MemoryBroker()
        service = service_over(broker)
        await broker.start(service.deliver)
        conn = Conn(service)
        service.opened(conn)
        for topic in ("public:a", "public:b"):
            service.receive(conn, '["1","1","%s","phx_join",{}]' % topic)
        assert service.hub.members("public:a") == service.hub.members("public:b") == 1
        new = Config(settings=None, policy=Policy(Verifier(["t" * 32])), origins=OriginPolicy(["*"]),
                     publish_secrets=("q",))
        service.reload(new)
        assert conn.session.policy is new.policy
        service.closed(conn)
        return service

    service = asyncio.run(run())
    assert service.hub.topics == {} and not service.connections


def test_a_push_is_answered_after_the_broker_took_it():
    async def run():
        broker = MemoryBroker()
        service = service_over(broker)
        await broker.start(service.deliver)
        conn = Conn(service)
        service.opened(conn)
        service.receive(conn, '["1","1","public:x","phx_join",{}]')
        service.receive(conn, '["1","2","public:x","msg",{"body":"hi"}]')
        await asyncio.wait(list(service.tasks))
        return conn.texts

    texts = asyncio.run(run())
    assert [t for t in texts if '"msg"' in t] == ['[null,null,"public:x","msg",{"body":"hi"}]']
    assert texts[-1] == '["1","2","public:x","phx_reply",{"status":"ok","response":{}}]'


# --- max_new_connections_per_second ----------------------------------------------------------

def test_connection_rate_is_a_token_bucket_whose_burst_is_its_rate():
    from pusherd.service import ConnectionRate
    bucket = ConnectionRate()
    assert all(bucket.take(0, 0.0) for _ in range(100))  # 0: no limit
    assert [bucket.take(3, 10.0) for _ in range(4)] == [True, True, True, False]  # the burst, then none
    assert bucket.take(3, 10.2) is False  # 0.6 of a token back
    assert bucket.take(3, 10.34) is True  # 1.02
    assert [bucket.take(3, 20.0) for _ in range(4)] == [True, True, True, False]  # refilled up to the burst only
    assert [bucket.take(1, 30.0) for _ in range(2)] == [True, False]  # a reload to 1: burst 1
    assert bucket.take(0, 30.0) and bucket.take(0, 30.0)  # turned off
    assert [bucket.take(2, 30.0) for _ in range(3)] == [True, True, False]  # turned on again: a full bucket


def test_over_the_connection_rate_check_room_refuses_503_retry_after_1_counted_and_storm_logged(caplog):
    import types
    from pusherd.transports.admission import Refusal, check_room
    service = service_over(MemoryBroker())
    settings = types.SimpleNamespace(max_connections=100, max_new_connections_per_second=2)
    service.config = Config(settings=settings, policy=service.config.policy, origins=service.config.origins,
                            publish_secrets=service.config.publish_secrets)
    with caplog.at_level("WARNING", logger="pusherd"):
        check_room(service)
        check_room(service)
        refusals = []
        for _ in range(5):
            with pytest.raises(Refusal) as raised:
                check_room(service)
            refusals.append(raised.value)
    assert {(r.status, r.reason, r.retry_after) for r in refusals} == {(503, "connection rate limited", "1")}
    assert service.counters.connections_refused["connection_rate_limited"] == 5
    lines = [r.getMessage() for r in caplog.records if "max_new_connections_per_second" in r.getMessage()]
    assert lines == ["refused 1 connection(s) with 503: max_new_connections_per_second (2) reached"], lines
    settings.max_connections = 0  # full: refused for that first, with its own Retry-After
    with pytest.raises(Refusal) as raised:
        check_room(service)
    assert (raised.value.reason, raised.value.retry_after) == ("too many connections", "5")
