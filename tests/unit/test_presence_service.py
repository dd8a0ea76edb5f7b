"""pusherd/presence_service.py: the Service's presence carried out against a hub and a backplane —
the memory broker's (one process), and a simulated shared one (several processes on one store,
what redis_presence.py does against Redis, tested for real in tests/broker/test_redis_presence.py).
Connections are stand-ins with a real Session; no network."""

import asyncio
import json

import pytest

from pusherd.brokers.base import PresenceBackplane
from pusherd.brokers.memory import MemoryBroker
from pusherd.client import mint_token
from pusherd.core.fanout import Hub
from pusherd.core.origins import OriginPolicy
from pusherd.core.presence import Entry, PresenceRule, PresenceRules, entry_field
from pusherd.core.protocol import V1, V2
from pusherd.core.session import Policy, Session
from pusherd.core.tokens import Verifier
from pusherd.counters import Counters
from pusherd.presence_service import PresenceService
from pusherd.service import Config, Service

SECRET = "s" * 32
TOPIC = "private:ops"


class Conn:
    wire = staticmethod(str)

    def __init__(self, service, serializer=V2):
        self.serializer = serializer
        self.session = Session(serializer, service.policy, 0.0)
        self.texts = []

    def send_frame(self, frame):
        self.texts.append(frame)

    def send_text(self, text):
        self.texts.append(text)

    def close_with(self, code, reason):
        pass

    def tick(self, now):
        pass

    def messages(self, event=None):
        out = []
        for text in self.texts:
            doc = json.loads(text)
            msg = (doc[3], doc[4]) if isinstance(doc, list) else (doc["event"], doc["payload"])
            if event is None or msg[0] == event:
                out.append(msg[1])
        return out


def listing(conn):
    """What a phoenix.js page of `conn` lists: its presence_state, then every diff applied."""
    state = {}
    for text in conn.texts:
        doc = json.loads(text)
        event, payload = (doc[3], doc[4]) if isinstance(doc, list) else (doc["event"], doc["payload"])
        if event == "presence_state":
            state = {k: {m["phx_ref"] for m in p["metas"]} for k, p in payload.items()}
        elif event == "presence_diff":
            for k, p in payload["joins"].items():
                state.setdefault(k, set()).update(m["phx_ref"] for m in p["metas"])
            for k, p in payload["leaves"].items():
                state.get(k, set()).difference_update(m["phx_ref"] for m in p["metas"])
                if not state.get(k):
                    state.pop(k, None)
    return {k: len(v) for k, v in state.items()}


def policy():
    return Policy(Verifier([SECRET]), presence=PresenceRules([PresenceRule(TOPIC, "id", ["name"], limit=5)]))


def make_service(backplane=None, interval=0.01, monotonic=None):
    broker = MemoryBroker()
    config = Config(settings=None, policy=policy(), origins=OriginPolicy(["*"]), publish_secrets=("p",))
    counters = Counters()
    hub = Hub(broker.subscribe, broker.unsubscribe, counters=counters)
    kwargs = {"monotonic": monotonic} if monotonic else {}
    presence = PresenceService(config.policy.presence, backplane or broker.presence_backplane(), hub, counters,
                               interval=interval, **kwargs)
    return broker, Service(broker, config, counters, hub, presence=presence)


def join_frame(uid, ref="1", topic=TOPIC, serializer=V2):
    tok = mint_token(SECRET, sub={"id": uid, "name": "u%d" % uid}, listen=["private:*"])
    if serializer is V1:
        return json.dumps({"topic": topic, "event": "phx_join", "payload": {"guardian_token": tok}, "ref": ref})
    return json.dumps([ref, ref, topic, "phx_join", {"guardian_token": tok}])


async def started(backplane=None, **kw):
    broker, service = make_service(backplane, **kw)
    await broker.start(service.deliver)
    await service.presence.start()
    return service


async def settle(service, rounds=5):
    for _ in range(rounds):
        await asyncio.sleep(service.presence.interval * 2)
        if service.tasks:
            await asyncio.wait(list(service.tasks))


def connect(service, uid, serializer=V2, ref="1"):
    conn = Conn(service, serializer)
    service.opened(conn)
    service.receive(conn, join_frame(uid, ref, serializer=serializer))
    return conn


def test_a_storm_in_one_window_is_one_diff_and_one_encoded_list():
    async def run():
        service = await started(interval=0.05)
        conns = [connect(service, uid % 3, serializer=V1 if uid % 2 else V2) for uid in range(5)]
        await settle(service)
        for conn in conns:
            assert conn.messages("presence_state") == [{}]         # the window had not ended
            assert len(conn.messages("presence_diff")) == 1        # then one diff for the 5 joins
            assert listing(conn) == {"0": 2, "1": 2, "2": 1}
        counters = service.counters
        assert counters.presence_encodes == 1 and counters.presence_states == 5 and counters.presence_diffs == 1
        # A late joiner gets the list (encoded once more: it changed) and nothing else.
        # The sixth connection finds the topic full (limit 5): joined, not listed, counted; it
        # gets the list, encoded once more (it changed since the first five joined).
        late = connect(service, 9)
        await settle(service)
        assert late.messages("phx_reply")[0]["status"] == "ok"
        assert listing(late) == listing(conns[0]) == {"0": 2, "1": 2, "2": 1}
        assert counters.presence_untracked["topic_full"] == 1
        assert counters.presence_encodes == 2
    asyncio.run(run())


def test_leave_close_and_close_all_are_leaves_and_a_join_that_left_in_its_window_is_never_heard_of():
    async def run():
        service = await started(interval=0.05)
        a, b = connect(service, 1), connect(service, 2)
        await settle(service)
        c = connect(service, 3)
        service.closed(c)            # joined and gone within one window: nobody hears of it
        service.receive(a, json.dumps(["1", "2", TOPIC, "phx_leave", {}]))
        await settle(service)
        assert listing(b) == {"2": 1}
        assert not any("3" in d["joins"] or "3" in d["leaves"] for d in b.messages("presence_diff"))
        service.closed(b)
        assert service.presence.stats()["tracked"] == 0
        await service.presence.close()
        service.sweep(0)
        assert service.presence.replicas == {}
    asyncio.run(run())


class Store:
    """What Redis holds for the simulated backplanes: entries, registrations, the diff channel."""

    def __init__(self):
        self.entries = {}          # (node, ref) -> Entry per topic
        self.alive = set()
        self.members = []          # the backplanes subscribed
        self.up = True

    def publish(self, node, topic, diff):
        for backplane in self.members:
            if backplane.healthy():
                backplane.owner.remote_diff(node, topic, json.loads(json.dumps(diff)))


class SharedBackplane(PresenceBackplane):
    local = False
    ttl = 5.0

    def __init__(self, store, node):
        super().__init__(node)
        self.store = store
        self.owner = None
        self.connected = True
        store.members.append(self)
        store.alive.add(node)

    async def start(self, owner):
        self.owner = owner

    def healthy(self):
        return self.connected and self.store.up

    async def snapshot(self, topic):
        from pusherd.core.errors import BrokerUnavailable
        if not self.healthy():
            raise BrokerUnavailable("down")
        return [e for (t, _), e in self.store.entries.items() if t == topic], set(self.store.alive)

    def write(self, topic, diff):
        if not self.healthy():
            self.owner.write_failed(topic)
            return
        for key, p in diff["joins"].items():
            for meta in p["metas"]:
                self.store.entries[(topic, entry_field(self.node, meta["phx_ref"]))] = Entry(self.node, key, meta)
        for p in diff["leaves"].values():
            for meta in p["metas"]:
                self.store.entries.pop((topic, entry_field(self.node, meta["phx_ref"])), None)
        self.store.publish(self.node, topic, diff)


def test_processes_sharing_a_store_list_each_other_and_a_dead_one_leaves():
    async def run():
        store = Store()
        a = await started(SharedBackplane(store, "A"))
        b = await started(SharedBackplane(store, "B"))
        on_a = connect(a, 1)
        await settle(a)
        on_b = connect(b, 2)      # B reads the list (A's member) before answering
        await settle(b)
        await settle(a)
        assert listing(on_a) == listing(on_b) == {"1": 1, "2": 1}
        # A diff arriving twice (a resync's correction, say) changes nothing on the pages.
        before = len(on_b.messages("presence_diff"))
        entry = next(e for e in store.entries.values() if e.node == "A")
        b.presence.remote_diff("A", TOPIC, {"joins": {entry.key: {"metas": [entry.meta]}}, "leaves": {}})
        assert len(on_b.messages("presence_diff")) == before
        # A dies: B hears it, A's member leaves B's list.
        store.alive.discard("A")
        b.presence.node_down("A")
        assert listing(on_b) == {"2": 1}
        # and A's late diffs are dropped
        b.presence.remote_diff("A", TOPIC, {"joins": {"1": {"metas": [dict(entry.meta, phx_ref="late")]}},
                                            "leaves": {}})
        assert listing(on_b) == {"2": 1}
    asyncio.run(run())


def test_after_an_outage_the_lists_are_right_without_dropping_anyone_who_stayed():
    async def run():
        now = [0.0]
        store = Store()
        a = await started(SharedBackplane(store, "A"), monotonic=lambda: now[0])
        b = await started(SharedBackplane(store, "B"), monotonic=lambda: now[0])
        a1, b1, b2 = connect(a, 1), connect(b, 2), connect(b, 3)
        await settle(a)
        await settle(b)
        await settle(a)
        assert listing(a1) == {"1": 1, "2": 1, "3": 1}
        # Redis restarts and loses everything; meanwhile 3 leaves on B and 4 joins on A.
        store.up = False
        b.closed(b2)
        a4 = connect(a, 4)
        await settle(a)
        await settle(b)
        assert listing(b1) == {"1": 1, "2": 1}          # B's own change reached B's page at once
        assert listing(a1) == {"1": 1, "2": 1, "3": 1, "4": 1}  # A's own too; A cannot know of 3
        store.entries.clear()
        store.alive.clear()
        store.up = True
        # A comes back first: it rewrites its entries and reads the list; B is not registered yet.
        marks = {c: len(c.texts) for c in (a1, a4, b1)}
        await a.presence.resync()
        store.alive.add("A")
        a.presence.nodes_alive(store.alive)
        assert listing(a1) == {"1": 1, "2": 1, "3": 1, "4": 1}     # B's entries kept meanwhile
        await b.presence.resync()
        store.alive.add("B")
        b.presence.nodes_alive(store.alive)
        a.presence.nodes_alive(store.alive)                      # B is back: A reads the list again
        await settle(a)
        await settle(b)
        for conn in (a1, a4, b1):
            assert listing(conn) == {"1": 1, "2": 1, "4": 1}, conn.texts
            # Nobody who stayed ever left a page meanwhile: only 3's leave and 4's join moved.
            for text in conn.texts[marks[conn]:]:
                doc = json.loads(text)
                if doc[3] == "presence_diff":
                    assert set(doc[4]["leaves"]) <= {"3"} and set(doc[4]["joins"]) <= {"4"}, doc
        assert {e.node for e in store.entries.values()} == {"A", "B"} and len(store.entries) == 3
        # A process that does not come back leaves after ttl.
        store.alive.discard("B")
        a.presence.nodes_alive(store.alive)
        now[0] += 6.0
        a.presence.nodes_alive(store.alive)
        assert listing(a1) == {"1": 1, "4": 1}
    asyncio.run(run())


def test_after_an_outage_a_process_registered_before_the_first_heartbeat_is_read_again():
    """The race of the Redis restart: A reads the list while B has not registered again (B's old
    entries are kept), and B registers before A's first heartbeat, which so never sees B absent.
    A must still read the list again once B is back, or B's member who left during the outage
    stays on A's pages for good."""
    async def run():
        store = Store()
        a = await started(SharedBackplane(store, "A"))
        b = await started(SharedBackplane(store, "B"))
        a1, b1, b2 = connect(a, 1), connect(b, 2), connect(b, 3)
        await settle(a)
        await settle(b)
        await settle(a)
        assert listing(a1) == {"1": 1, "2": 1, "3": 1}
        store.up = False
        b.closed(b2)                      # 3 leaves on B while Redis is down
        await settle(b)
        store.entries.clear()
        store.alive.clear()
        store.up = True
        await a.presence.resync()         # B not registered yet: its entries (2 and 3) kept
        assert listing(a1) == {"1": 1, "2": 1, "3": 1}
        await b.presence.resync()
        store.alive.update({"A", "B"})    # both registered before A's first nodes_alive
        b.presence.nodes_alive(store.alive)
        a.presence.nodes_alive(store.alive)
        await settle(a)
        await settle(b)
        assert listing(a1) == listing(b1) == {"1": 1, "2": 1}, a1.texts
    asyncio.run(run())


def test_a_process_given_up_for_dead_lists_its_members_again_under_a_new_id():
    async def run():
        store = Store()
        bp_a = SharedBackplane(store, "A")
        a = await started(bp_a)
        b = await started(SharedBackplane(store, "B"))
        a1, b1 = connect(a, 1), connect(b, 2)
        await settle(a)
        await settle(b)
        # The others gave A up (a partition longer than ttl): its entries are gone from the store.
        b.presence.node_down("A")
        for k in [k for k, e in store.entries.items() if e.node == "A"]:
            del store.entries[k]
        assert listing(b1) == {"2": 1}
        bp_a.node = "A2"
        store.alive.add("A2")
        await a.presence.resync(renamed_from="A")
        await settle(b)
        assert listing(b1) == listing(a1) == {"1": 1, "2": 1}
        assert {e.node for e in store.entries.values()} == {"A2", "B"}
        # A's next leave is heard by B under its new id.
        a.closed(a1)
        await settle(a)
        assert listing(b1) == {"2": 1}
    asyncio.run(run())


def test_a_first_joiner_waits_for_the_list_and_a_down_backplane_answers_with_what_is_here():
    async def run():
        store = Store()
        a = await started(SharedBackplane(store, "A"))
        a1 = connect(a, 1)
        await settle(a)
        bp = SharedBackplane(store, "B")
        bp.connected = False
        b = await started(bp)
        b1 = connect(b, 2)
        await settle(b)
        assert b1.messages("presence_state") == [{}]      # answered without the list: Redis is down
        assert b.presence.replicas[TOPIC].dirty
        bp.connected = True
        b.presence.nodes_alive(store.alive)               # the next heartbeat reads it
        await settle(b)
        assert listing(b1) == {"1": 1, "2": 1}
    asyncio.run(run())


def test_get_presence_reads_the_local_list_or_the_backplane():
    async def run():
        store = Store()
        a = await started(SharedBackplane(store, "A"))
        b = await started(SharedBackplane(store, "B"))
        connect(a, 1)
        await settle(a)
        listed = await b.presence.listing(TOPIC)      # B has no member there: read from the store
        assert list(listed) == ["1"]
        store.up = False
        with pytest.raises(Exception):
            await b.presence.listing(TOPIC)
        mem = await started()
        assert await mem.presence.listing(TOPIC) == {}
    asyncio.run(run())
