"""A small long-poll client for tests: the requests phoenix.js's LongPoll makes, over real HTTP.

``LongPoll(base_url)`` opens a session (the 410 with its token) and speaks V2 (arrays) or V1
(objects, ``vsn="1.0.0"``): ``poll()`` is one GET, ``post()`` one POST (a message, or a list of
them as ndjson), ``join``/``push`` wait for their reply across polls, ``collect`` gathers what
the polls bring. Every call returns what the server said; nothing is retried behind a test's back.
"""

import collections
import http.client
import json
import time
from typing import List, Optional
from urllib.parse import urlencode, urlsplit


class LongPoll:
    def __init__(self, base_url: str, vsn: str = "2.0.0", params=None, headers=None, path: str = "/events/longpoll",
                 open_session: bool = True, timeout: float = 20.0):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.path = path
        self.vsn = vsn
        self.params = dict(params or {})
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.token: Optional[str] = None
        self.ref = 0
        self.messages: List = []   # what polls brought and no expect() consumed yet
        self.opened = None
        if open_session:
            self.opened = self.poll()
            assert self.opened.get("status") == 410, self.opened
            self.token = self.opened["token"]

    # -- HTTP -----------------------------------------------------------------------------------

    def url(self, token: Optional[str] = None) -> str:
        query = dict(self.params, vsn=self.vsn)
        items = list(query.items())
        token = self.token if token is None else token
        if token:
            items.append(("token", token))
        return self.path + "?" + urlencode(items)

    def request(self, method: str, url: str, body: Optional[bytes] = None, headers=None, timeout=None):
        """(HTTP status, parsed body or text, headers) of one request on a new connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            conn.request(method, url, body=body, headers=dict(self.headers, **(headers or {})))
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            return resp.status, parsed, resp.headers
        finally:
            conn.close()

    def poll(self, token: Optional[str] = None, headers=None, timeout=None) -> dict:
        status, body, _ = self.request("GET", self.url(token), headers=headers, timeout=timeout)
        assert status == 200, (status, body)
        if isinstance(body, dict) and body.get("status") == 200:
            self.messages.extend(self.decode(m) for m in body.get("messages", []))
        return body

    def post(self, message, ndjson: bool = False, token: Optional[str] = None, headers=None, ctype=None):
        """POST one message (text, or a list/dict to encode as JSON) or, with `ndjson`, a list of
        them one a line as phoenix.js 1.7+ batches them. Bytes are sent as they are."""
        if isinstance(message, bytes):
            body = message
        elif ndjson:
            body = "\n".join(m if isinstance(m, str) else json.dumps(m) for m in message).encode("utf-8")
        else:
            body = (message if isinstance(message, str) else json.dumps(message)).encode("utf-8")
        ctype = ctype or ("application/x-ndjson" if ndjson else "application/json")
        return self.request("POST", self.url(token), body, dict({"Content-Type": ctype}, **(headers or {})))

    # -- Phoenix messages -----------------------------------------------------------------------

    def decode(self, message):
        if self.vsn.startswith("2"):
            assert isinstance(message, str), message
            join_ref, ref, topic, event, payload = json.loads(message)
        else:
            assert isinstance(message, dict), message
            join_ref, ref, topic, event, payload = (message.get("join_ref"), message.get("ref"), message["topic"],
                                                    message["event"], message["payload"])
        return {"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload}

    def encode(self, join_ref, ref, topic, event, payload):
        if self.vsn.startswith("2"):
            return [join_ref, ref, topic, event, payload]
        return {"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload}

    def next_ref(self) -> str:
        self.ref += 1
        return str(self.ref)

    def send(self, topic, event, payload, join_ref=None):
        """POST one message; its ref."""
        ref = self.next_ref()
        status, body, _ = self.post(self.encode(join_ref, ref, topic, event, payload))
        assert (status, body) == (200, {"status": 200}), (status, body)
        return ref

    def expect(self, timeout: float = 15.0, **fields) -> dict:
        """The first message (already polled, or from further polls) whose fields match."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.messages):
                if all(msg.get(k) == v for k, v in fields.items()):
                    return self.messages.pop(i)
            assert time.monotonic() < deadline, "no message %r; got %r" % (fields, self.messages)
            body = self.poll()
            assert body.get("status") in (200, 204), body

    def join(self, topic, payload=None) -> dict:
        ref = self.send(topic, "phx_join", payload or {}, join_ref=None)
        reply = self.expect(topic=topic, event="phx_reply", ref=ref)
        self.join_ref = ref
        return reply["payload"]

    def push(self, topic, event, payload, join_ref=None) -> dict:
        ref = self.send(topic, event, payload, join_ref=join_ref or getattr(self, "join_ref", None))
        return self.expect(topic=topic, event="phx_reply", ref=ref)["payload"]

    def collect(self, topic, event, count: int, timeout: float = 15.0) -> list:
        """The payloads of the next `count` messages with this topic and event, in order."""
        return [self.expect(timeout, topic=topic, event=event)["payload"] for _ in range(count)]


class RequestProxy:
    """An HTTP proxy on 127.0.0.1 that sends each request (not each connection) to a backend
    port of its choosing: in turn (``mode="alternate"``, what a load balancer without sticky
    sessions may do to one page's consecutive polls) or always ``ports[index]`` (``switch_to``).
    It passes no WebSocket upgrade (as many corporate proxies): a WebSocket through it fails its
    handshake. A backend that is down is answered 502 with an HTML page, as a load balancer
    would. ``seen``: (method, path, port) of every request."""

    def __init__(self, ports, mode: str = "alternate"):
        import http.server
        import itertools
        import socketserver
        import threading

        self.ports = list(ports)
        self.mode = mode
        self.index = 0
        self.seen = []
        self._turns = collections.defaultdict(itertools.count)   # per method: GETs alternate, and POSTs
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                with proxy._lock:
                    if proxy.mode == "alternate":
                        port = proxy.ports[next(proxy._turns[self.command]) % len(proxy.ports)]
                    else:
                        port = proxy.ports[proxy.index]
                    proxy.seen.append((self.command, self.path.split("?")[0], port))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    status, items = resp.status, resp.getheaders()
                except OSError:
                    status, items, data = 502, [("Content-Type", "text/html")], b"<html>502 Bad Gateway</html>"
                finally:
                    upstream.close()
                self.send_response(status)
                for k, v in items:
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server",
                                         "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_OPTIONS = _forward

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def switch_to(self, index: int) -> None:
        with self._lock:
            self.mode, self.index = "fixed", index

    def ports_seen(self, method: str = "GET", path_suffix: str = "/longpoll"):
        return [port for m, path, port in self.seen if m == method and path.endswith(path_suffix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
