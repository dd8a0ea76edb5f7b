"""The brokers: how a publish reaches every pusherd process. `base` states the interface and
its delivery guarantee; `memory` is one process; `redis` is a Redis pub/sub backplane. Each
states its own guarantee in its docstring, and one contract suite runs against all of them."""

from ..core.errors import StartupError
from ..core.history import Rules
from .base import Broker
from .memory import MemoryBroker


def build_broker(settings, stats=None) -> Broker:
    """`memory`, or a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL
    (redis-py is imported only then). ``stats``: where the broker counts its events
    (the daemon's Counters.broker)."""
    bounds = {"max_topics": settings.max_history_topics, "max_bytes": settings.max_history_bytes}
    if settings.broker == "memory":
        return MemoryBroker(Rules(settings.history), settings.max_recovery, **bounds)
    try:
        from .redis import RedisBroker
    except ImportError as exc:
        raise StartupError("broker %s needs redis-py >= 5: pip install 'pusherd[redis]' (%s)"
                           % (settings.broker.split("://", 1)[0] + "://", exc)) from None
    return RedisBroker(settings.broker, prefix=settings.broker_prefix, stats=stats,
                       history_rules=Rules(settings.history), max_recovery=settings.max_recovery, **bounds)
