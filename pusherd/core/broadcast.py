"""A broadcast: one event for every member of a topic, as it travels from a publisher (HTTP or a
client push) through the broker to every process's hub."""

from typing import Optional


class Broadcast:
    """One event for every member of a topic."""

    __slots__ = ("topic", "event", "payload", "published_at", "position")

    def __init__(self, topic: str, event: str, payload: dict, published_at: Optional[float] = None,
                 position: Optional[str] = None):
        self.topic = topic
        self.event = event
        self.payload = payload
        self.published_at = published_at  # stamped when it is handed to the broker (None before)
        self.position = position

    def __repr__(self):
        return "Broadcast(%r, %r, %r)" % (self.topic, self.event, self.payload)
