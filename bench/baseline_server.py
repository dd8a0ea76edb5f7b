"""The baseline: the classic Tornado pattern, as most Python push servers are written.

A set of handlers per topic and, for every broadcast, a loop calling ``write_message`` on each
handler with the message encoded for that socket. It speaks enough Phoenix V2 for the benchmark
(join with an optional Guardian token checked with PyJWT, heartbeat, broadcast) and has the same
publish API (Bearer secret, JSON body validated). Run: ``python bench/baseline_server.py PORT``.
"""

import asyncio
import hashlib
import hmac
import base64
import json
import sys

import jwt
import tornado.netutil
import tornado.httpserver
import tornado.web
import tornado.websocket


class State:
    def __init__(self, guardian_secret: str, publish_secret: str):
        self.guardian_secret = guardian_secret
        self.publish_secret = publish_secret
        self.topics = {}


class Socket(tornado.websocket.WebSocketHandler):
    def initialize(self, state):
        self.state = state
        self.joined = set()

    def check_origin(self, origin):
        return True

    def on_message(self, message):
        join_ref, ref, topic, event, payload = json.loads(message)
        if topic == "phoenix" and event == "heartbeat":
            return self.write_message(json.dumps([None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}]))
        if event == "phx_join":
            status, response = "ok", {}
            token = payload.get("guardian_token")
            if token is not None or not topic.startswith("public:"):
                try:
                    claims = jwt.decode(token or "", self.state.guardian_secret, algorithms=["HS256"], audience="csrf",
                                        options={"require": ["exp"], "verify_sub": False})
                    digest = hmac.new(self.state.guardian_secret.encode(), str(payload.get("csrf_token")).encode(),
                                      hashlib.sha256).digest()
                    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                    if not hmac.compare_digest(expected, str(claims.get("s_csrf"))):
                        status, response = "error", {"reason": "csrf_mismatch"}
                except jwt.InvalidTokenError:
                    status, response = "error", {"reason": "invalid_token"}
            if status == "ok":
                self.state.topics.setdefault(topic, set()).add(self)
                self.joined.add(topic)
            self.write_message(json.dumps([join_ref, ref, topic, "phx_reply", {"status": status, "response": response}]))

    def on_close(self):
        for topic in self.joined:
            self.state.topics.get(topic, set()).discard(self)


class Publish(tornado.web.RequestHandler):
    def initialize(self, state):
        self.state = state

    def post(self):
        auth = self.request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            auth = auth[7:]
        if not hmac.compare_digest(auth.encode(), self.state.publish_secret.encode()):
            self.set_status(401)
            return self.finish({"error": "unauthorized"})
        try:
            doc = json.loads(self.request.body)
        except ValueError:
            self.set_status(400)
            return self.finish({"error": "bad json"})
        items = doc if isinstance(doc, list) else [doc]
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("topic"), str) or not isinstance(item.get("event"), str):
                self.set_status(400)
                return self.finish({"error": "bad event"})
        for item in items:
            topic = item["topic"]
            for handler in list(self.state.topics.get(topic, ())):
                # The classic pattern: one message built and encoded per socket.
                handler.write_message(json.dumps([None, None, topic, item["event"], item.get("payload", {})]))
        self.finish({"status": "ok", "published": len(items)})


async def main(port: int, guardian_secret: str, publish_secret: str):
    state = State(guardian_secret, publish_secret)
    app = tornado.web.Application([
        (r"/events/websocket", Socket, {"state": state}),
        (r"/publish", Publish, {"state": state}),
    ])
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(tornado.netutil.bind_sockets(port, "127.0.0.1", backlog=1024))
    print("serving on 127.0.0.1:%d" % port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, gsecret, psecret, loop_kind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if loop_kind == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main(port, gsecret, psecret))
