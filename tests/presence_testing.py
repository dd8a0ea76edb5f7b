"""Test support for presence: a Python Phoenix client that keeps a topic's presence list."""

import time

from pusherd_testing import PhxClient, rails_token


class Page:
    """A Python Phoenix client on a presence topic that applies what it receives as phoenix.js
    1.4+ does: diffs wait for the presence_state of the current join."""

    def __init__(self, daemon, topic, sub=None, vsn="2.0.0", ttl=3600, listen=("private:*",)):
        self.client = PhxClient(daemon.ws_url, vsn=vsn)
        self.topic = topic
        params = {}
        if sub is not None:
            token, csrf = rails_token(listen=list(listen), sub=sub, ttl=ttl)
            params = {"guardian_token": token, "csrf_token": csrf}
        status, response, self.join_ref = self.client.join(topic, params)
        assert status == "ok", response
        self.state = None
        self.frames = []

    def pump(self, timeout=0.05):
        try:
            while True:
                msg = self.client.recv(timeout=timeout)
                self.frames.append(msg)
                if msg["event"] == "presence_state":
                    self.state = {k: {m["phx_ref"]: m for m in p["metas"]} for k, p in msg["payload"].items()}
                elif msg["event"] == "presence_diff" and self.state is not None:
                    for k, p in msg["payload"]["joins"].items():
                        self.state.setdefault(k, {}).update({m["phx_ref"]: m for m in p["metas"]})
                    for k, p in msg["payload"]["leaves"].items():
                        for m in p["metas"]:
                            self.state.get(k, {}).pop(m["phx_ref"], None)
                        if not self.state.get(k):
                            self.state.pop(k, None)
        except TimeoutError:
            pass

    def counts(self):
        return {k: len(v) for k, v in (self.state or {}).items()}

    def wait(self, expected, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if self.counts() == expected:
                return self
            if time.monotonic() > deadline:
                raise AssertionError("list %r, expected %r; frames: %r" % (self.counts(), expected, self.frames))

    def events(self, name):
        return [f for f in self.frames if f["event"] == name]

    def close(self):
        self.client.close()
