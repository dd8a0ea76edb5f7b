"""Test helpers for pusherd/core/presence.py: what phoenix.js does with our payloads.

* `sync_state`, `sync_diff`, `ClientPresence`: a Python port of phoenix.js's presence sync,
  for tests only, in both semantics: ``dedup=False`` is 1.2 (``syncDiff`` prepends every old
  meta of a joined key, duplicates included), ``dedup=True`` is 1.4-1.8 (old metas whose
  phx_ref is joined again are dropped). `ClientPresence` also ports 1.4+'s ``new Presence()``
  buffering of diffs until a presence_state for the current join. The interop test checks the
  port against the real presence.js, so the unit tests that rely on it stand for the real thing.
* `Cluster`: several simulated processes with their `TopicPresence`, one ordered broker log,
  a Redis-like hash, outages, deaths and clients that record every frame they receive.
* `NodeReplayer`: the real phoenix.js (tests/interop/node_modules) replaying those frames.
"""

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from pusherd.core.presence import Entry, Member, TopicPresence, Tracked

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
SYNC_JS = INTEROP_DIR / "presence_sync.js"
VERSIONS = ("1.2", "1.4", "1.5", "1.8")


# --- the port (phoenix.js assets/js/phoenix/presence.js; 1.2: web/static/js/phoenix.js) ------

def sync_diff(state: Dict, diff: Dict, dedup: bool = True) -> Dict:
    state = copy.deepcopy(state)
    diff = copy.deepcopy(diff)
    for key, new_presence in diff["joins"].items():
        current = state.get(key)
        state[key] = new_presence
        if current is not None:
            if dedup:
                joined_refs = [m["phx_ref"] for m in new_presence["metas"]]
                kept = [m for m in current["metas"] if m["phx_ref"] not in joined_refs]
            else:
                kept = current["metas"]
            new_presence["metas"][:0] = kept
    for key, left_presence in diff["leaves"].items():
        current = state.get(key)
        if current is None:
            continue
        refs_to_remove = [m["phx_ref"] for m in left_presence["metas"]]
        current["metas"] = [m for m in current["metas"] if m["phx_ref"] not in refs_to_remove]
        if not current["metas"]:
            del state[key]
    return state


def sync_state(state: Dict, new_state: Dict, dedup: bool = True) -> Dict:
    state = copy.deepcopy(state)
    new_state = copy.deepcopy(new_state)
    joins, leaves = {}, {}
    for key, presence in state.items():
        if key not in new_state:
            leaves[key] = presence
    for key, new_presence in new_state.items():
        current = state.get(key)
        if current is not None:
            new_refs = [m["phx_ref"] for m in new_presence["metas"]]
            cur_refs = [m["phx_ref"] for m in current["metas"]]
            joined = [m for m in new_presence["metas"] if m["phx_ref"] not in cur_refs]
            left = [m for m in current["metas"] if m["phx_ref"] not in new_refs]
            if joined:
                joins[key] = dict(new_presence, metas=joined)
            if left:
                leaves[key] = dict(copy.deepcopy(current), metas=left)
        else:
            joins[key] = new_presence
    return sync_diff(state, {"joins": joins, "leaves": leaves}, dedup)


class ClientPresence:
    """1.4+'s ``new Presence(channel)``: diffs wait for the presence_state of the current join."""

    def __init__(self, dedup: bool = True):
        self.dedup = dedup
        self.state: Dict = {}
        self.pending: List[Dict] = []
        self.join_ref = 1
        self.synced_ref: Optional[int] = None

    def on_state(self, new_state):
        self.synced_ref = self.join_ref
        self.state = sync_state(self.state, new_state, self.dedup)
        for diff in self.pending:
            self.state = sync_diff(self.state, diff, self.dedup)
        self.pending = []

    def on_diff(self, diff):
        if self.synced_ref != self.join_ref:
            self.pending.append(diff)
        else:
            self.state = sync_diff(self.state, diff, self.dedup)

    def rejoin(self):
        self.join_ref += 1


def port_replay(version: str, steps: List) -> Dict:
    """What the ported client of `version` lists after `steps` (the NodeReplayer format)."""
    if version == "1.2":
        state: Dict = {}
        for step in steps:
            if step[0] == "state":
                state = sync_state(state, step[1], dedup=False)
            elif step[0] == "diff":
                state = sync_diff(state, step[1], dedup=False)
        return state
    client = ClientPresence(dedup=True)
    for step in steps:
        {"state": lambda: client.on_state(step[1]), "diff": lambda: client.on_diff(step[1]),
         "rejoin": client.rejoin}[step[0]]()
    return client.state


# --- the real phoenix.js ------------------------------------------------------------------------

class NodeReplayer:
    """One ``node presence_sync.js`` process; `replay` sends a batch and returns the lists."""

    def __init__(self):
        self.proc = subprocess.Popen([shutil.which("node"), str(SYNC_JS)], cwd=str(INTEROP_DIR),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def replay(self, runs: List) -> List[Dict]:
        """`runs` are ``(version, steps)``; one synced state per run, in order."""
        for version, steps in runs:
            self.proc.stdin.write(json.dumps({"version": version, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        out = []
        for _ in runs:
            answer = json.loads(self.proc.stdout.readline())
            assert answer["ok"], answer["error"]
            out.append(answer["state"])
        return out

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


# --- a simulated cluster --------------------------------------------------------------------------

def wire(payload):
    """What a client receives: the JSON text, parsed again (no shared objects)."""
    return json.loads(json.dumps(payload))


def canonical(state: Dict, ordered: bool) -> Dict:
    """A list to compare: metas in their order, or by phx_ref when order is not promised."""
    if ordered:
        return state
    return {k: dict(p, metas=sorted(p["metas"], key=lambda m: m["phx_ref"])) for k, p in state.items()}


KEYS = ("1", "2", "10", "alice", "user:3", "é")


class SimClient:
    def __init__(self, version: str, node: "SimNode"):
        self.version = version
        self.node = node
        self.steps: List = []
        self.rejoined = False


class SimNode:
    def __init__(self, name: str, limit: int):
        self.name = name
        self.tp = TopicPresence(name, limit)
        self.position = 0          # next log index to consume
        self.cut_off = False       # in a broker outage: publishes lost, deliveries missed
        self.handles: List[Tracked] = []
        self.clients: List[SimClient] = []

    def deliver(self, diff):
        if diff is not None:
            for c in self.clients:
                c.steps.append(["diff", wire(diff)])


class Cluster:
    """Processes sharing one ordered broker log and one hash of entries, driven op by op.

    Every process applies each log message once, in order, its own included (apply-on-echo);
    a process that is declared dead has its entries removed everywhere and its messages ignored.
    """

    def __init__(self, nodes: int = 3, limit: int = 1000):
        self.nodes = [SimNode("n%d" % i, limit) for i in range(nodes)]
        self.log: List = []                     # (origin node, diff)
        self.hash: Dict = {}                    # (node, phx_ref) -> Entry, like the Redis hash
        self.dead = set()
        self.clients: List[SimClient] = []
        self.refs = 0
        self.now = 1_700_000_000.0
        self.not_tracked = []

    def live(self, i: int) -> SimNode:
        return self.nodes[i % len(self.nodes)]

    def random(self) -> bytes:
        self.refs += 1
        return self.refs.to_bytes(12, "big")

    # operations
    def track(self, i, k):
        node = self.live(i)
        self.now += 1
        member = Member(KEYS[k % len(KEYS)], {"name": "user %d" % k})
        result = node.tp.track(member, self.random(), self.now)
        if isinstance(result, Tracked):
            node.handles.append(result)
        else:
            self.not_tracked.append(result)

    def untrack(self, i, j):
        node = self.live(i)
        if node.handles:
            node.tp.untrack(node.handles.pop(j % len(node.handles)))

    def flush(self, i):
        node = self.live(i)
        self.publish(node, node.tp.flush())

    def publish(self, node, diff):
        if diff is None or node.cut_off:
            return   # a flush during an outage is lost; the resync's correction repairs it
        for key, presence in diff["joins"].items():
            for meta in presence["metas"]:
                self.hash[(node.name, meta["phx_ref"])] = Entry(node.name, key, meta)
        for presence in diff["leaves"].values():
            for meta in presence["metas"]:
                self.hash.pop((node.name, meta["phx_ref"]), None)
        self.log.append((node.name, wire(diff)))

    def consume(self, i, count):
        node = self.live(i)
        if node.cut_off:
            return
        while count and node.position < len(self.log):
            origin, diff = self.log[node.position]
            node.position += 1
            count -= 1
            if origin not in self.dead:
                node.deliver(node.tp.state.apply_diff(origin, diff))

    def join_client(self, i, version):
        node = self.live(i)
        client = SimClient(version, node)
        client.steps.append(["state", wire(node.tp.state.payload())])
        node.clients.append(client)
        self.clients.append(client)

    def rejoin_client(self, c, i):
        if not self.clients:
            return
        client = self.clients[c % len(self.clients)]
        client.node.clients.remove(client)
        self.attach(client, self.live(i))

    def attach(self, client, node):
        client.steps.append(["rejoin"])
        client.steps.append(["state", wire(node.tp.state.payload())])
        client.rejoined = True
        client.node = node
        node.clients.append(client)

    def kill(self, i):
        """A process dies without goodbye: the others find out and drop its entries."""
        if len(self.nodes) < 2:
            return
        node = self.live(i)
        self.dead.add(node.name)
        for key in [k for k in self.hash if k[0] == node.name]:
            del self.hash[key]
        self.stop(node)
        for other in self.nodes:
            other.deliver(other.tp.state.remove_node(node.name))

    def drain(self, i):
        """A process leaves gracefully: every entry of it leaves in one diff, then it stops."""
        if len(self.nodes) < 2:
            return
        node = self.live(i)
        if node.cut_off:
            return self.kill(i)   # its goodbye cannot be published: it is found dead instead
        node.tp.untrack_all()
        node.handles.clear()
        self.publish(node, node.tp.flush())
        self.stop(node)

    def stop(self, node):
        self.nodes.remove(node)
        for n, client in enumerate(node.clients):    # its sockets reconnect elsewhere
            self.attach(client, self.nodes[n % len(self.nodes)])

    def outage(self, i):
        self.live(i).cut_off = True

    def recover(self, i, rewind: float):
        """The broker is back: resubscribe (somewhere at or before now), snapshot, resync."""
        node = self.live(i)
        if not node.cut_off:
            return
        node.cut_off = False
        # resubscribed before the snapshot: messages already in it may be received again
        node.position = max(node.position, int(len(self.log) * (1 - rewind)))
        snapshot = [e for e in self.hash.values() if e.node not in self.dead]
        local, correction = node.tp.resync(snapshot)
        node.deliver(local)
        self.publish(node, correction)

    def settle(self):
        for i in range(len(self.nodes)):
            self.recover(i, 0.0)
        for i in range(len(self.nodes)):
            self.flush(i)
        for i in range(len(self.nodes)):
            self.consume(i, len(self.log))

    def run(self, ops):
        for op, *args in ops:
            getattr(self, op)(*args)
        self.settle()
        return self

    # what must hold once settled
    def truth(self):
        return {(e.node, e.key, e.meta["phx_ref"]) for n in self.nodes for e in n.tp.own_entries()}

    def expected(self, client: SimClient) -> Dict:
        return canonical(wire(client.node.tp.state.payload()), ordered=not client.rejoined)

    def runs(self):
        return [(c.version, c.steps) for c in self.clients]


def ops_strategy(st, versions=VERSIONS, min_ops=20, max_ops=100):
    """Hypothesis strategy: a random sequence of Cluster operations (the common ones more often)."""
    node = st.integers(0, 2)
    args = {
        "track": st.tuples(node, st.integers(0, 20)),
        "untrack": st.tuples(node, st.integers(0, 50)),
        "flush": st.tuples(node),
        "consume": st.tuples(node, st.integers(1, 8)),
        "join_client": st.tuples(node, st.sampled_from(versions)),
        "rejoin_client": st.tuples(st.integers(0, 30), node),
        "kill": st.tuples(node),
        "drain": st.tuples(node),
        "outage": st.tuples(node),
        "recover": st.tuples(node, st.floats(0, 1)),
    }
    weights = {"track": 12, "untrack": 5, "flush": 8, "consume": 10, "join_client": 5, "rejoin_client": 2}
    names = [name for name in args for _ in range(weights.get(name, 1))]
    op = st.sampled_from(names).flatmap(lambda name: args[name].map(lambda a: (name,) + a))
    return st.lists(op, min_size=min_ops, max_size=max_ops)
