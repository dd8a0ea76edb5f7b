"""Every counter of the daemon, as plain numbers: `Counters` is the one place they live.

The hot paths bump ints here (the service, the hub, the transports, the outboxes write to one
`Counters` the daemon makes); metrics.py turns them into Prometheus families when scraped.
Nothing here imports prometheus_client.
"""

import bisect
import collections
from typing import Iterable, List, Tuple

#: Seconds from publish (``Broadcast.published_at``) to the frames being handed to local sockets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A fixed-bucket histogram in plain numbers: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        if value < 0.0:
            value = 0.0  # clocks of two hosts (a Redis broker) may disagree a little
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> List[Tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, ending with ``("+Inf", count)``."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Counters:
    """What the daemon counts for metrics, as plain ints (always kept; costs next to nothing)."""

    __slots__ = ("frames_received", "frames_dropped", "messages_received", "joins", "publish_requests",
                 "latency", "replayed", "recoveries", "encodes", "delivered", "slow_consumer_closes",
                 "connections_refused", "broker", "presence_diffs", "presence_states", "presence_encodes",
                 "presence_untracked")

    def __init__(self):
        self.frames_received = 0                      # frames from clients
        self.frames_dropped = 0                       # frames for a socket that never left its outbox
        self.messages_received = 0                    # broadcasts the broker handed us to deliver
        self.joins = collections.Counter()            # JOIN_OK or a refusal reason -> count
        self.publish_requests = collections.Counter()  # HTTP status of POST /publish -> count
        self.latency = Histogram()
        self.replayed = 0                             # missed broadcasts replayed on joins with `since`
        self.recoveries = collections.Counter()       # "recovered" / "not_recovered" -> count
        self.encodes = 0                              # broadcast frames encoded (once per serializer)
        self.delivered = 0                            # broadcast frames handed to connections
        self.slow_consumer_closes = 0                 # connections closed as slow consumers
        self.connections_refused = collections.Counter()  # reason -> connections refused at open
        self.broker = collections.Counter()           # broker event -> count (the Redis broker's)
        self.presence_diffs = 0                       # presence_diff broadcasts delivered here
        self.presence_states = 0                      # presence_state pushes to joiners
        self.presence_encodes = 0                     # presence_state payloads encoded (once per version)
        self.presence_untracked = collections.Counter()   # joiners of presence topics not listed, by reason

    def dropped(self, frames: int) -> None:
        self.frames_dropped += frames
