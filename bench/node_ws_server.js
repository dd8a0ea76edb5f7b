// A Node.js contender: the `ws` package, the same minimal Phoenix V2 behaviour as floor_server.py.
//
//   node bench/node_ws_server.js PORT GSECRET PSECRET LOOP [ISSUER]     (LOOP is ignored)
//
// - WebSocket upgrade on /events/websocket (ws, no permessage-deflate, no client tracking);
// - phx_join: `public:*` needs no token; a token, when sent (and on any other topic always), is an
//   HS256 JWT verified with node's crypto: the signature (constant time), `exp` required and in the
//   future, `iss` when an issuer is given, `s_csrf` = base64url(HMAC-SHA256(secret, csrf_token))
//   when `aud` is "csrf", the topic matched against `listen` (exact or `prefix*`);
// - any other event (heartbeat) is answered with an ok phx_reply;
// - POST /publish with `Authorization: Bearer <secret>`, a JSON event or a list of them: per event
//   one frame built once (ws's Sender.frame) and written to each joined socket.
//
// `ws` is resolved from tests/interop/node_modules (`cd tests/interop && npm ci`): no package.json
// of its own. Exits with status 3 and a message on stderr when it cannot be found.
"use strict";

const crypto = require("crypto");
const http = require("http");
const path = require("path");

let WebSocket;
try {
  WebSocket = require(path.join(__dirname, "..", "tests", "interop", "node_modules", "ws"));
} catch (err) {
  process.stderr.write("node_ws_server: the ws package is missing (cd tests/interop && npm ci): " + err.message + "\n");
  process.exit(3);
}

const [port, gsecret, psecret, , issuer] = process.argv.slice(2);
const PSECRET = Buffer.from("Bearer " + psecret);
const topics = new Map(); // topic -> Set of ws

function b64url(buf) {
  return buf.toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

function claimsOf(token) {
  if (typeof token !== "string" || token.length > 16384) return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], "base64url"));
    if (!header || header.alg !== "HS256") return null;
    const want = crypto.createHmac("sha256", gsecret).update(parts[0] + "." + parts[1]).digest();
    const got = Buffer.from(parts[2], "base64url");
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) return null;
    claims = JSON.parse(Buffer.from(parts[1], "base64url"));
  } catch (err) {
    return null;
  }
  if (!claims || typeof claims.exp !== "number" || claims.exp <= Date.now() / 1000) return null;
  if (issuer !== undefined && claims.iss !== issuer) return null;
  return claims;
}

// null when the join is allowed, else the reason
function mayJoin(topic, payload) {
  const isPublic = topic.startsWith("public:");
  const token = payload && payload.guardian_token;
  if (token === undefined || token === null) return isPublic ? null : "authentication_required";
  const claims = claimsOf(token);
  if (claims === null) return isPublic ? null : "invalid_token";
  if (claims.aud === "csrf") {
    const want = Buffer.from(b64url(crypto.createHmac("sha256", gsecret).update(String(payload.csrf_token)).digest()));
    const got = Buffer.from(String(claims.s_csrf));
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) return isPublic ? null : "csrf_mismatch";
  }
  if (isPublic) return null;
  for (const p of Array.isArray(claims.listen) ? claims.listen : []) {
    if (p === topic || (typeof p === "string" && p.endsWith("*") && topic.startsWith(p.slice(0, -1)))) return null;
  }
  return "forbidden";
}

function onMessage(ws, data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch (err) {
    return;
  }
  if (!Array.isArray(msg) || msg.length !== 5) return;
  const [joinRef, ref, topic, event, payload] = msg;
  let status = "ok";
  let response = {};
  if (event === "phx_join") {
    const reason = mayJoin(String(topic), payload);
    if (reason !== null) {
      status = "error";
      response = {reason};
    } else {
      let members = topics.get(topic);
      if (!members) topics.set(topic, (members = new Set()));
      members.add(ws);
      ws.joined.push(topic);
    }
  }
  ws.send(JSON.stringify([joinRef, ref, topic, "phx_reply", {status, response}]));
}

// One frame per event, built once; written to each socket as ws's own sender writes it (no
// permessage-deflate, so ws writes synchronously and a frame written here cannot interleave).
const frameOpts = {fin: true, rsv1: false, opcode: 1, mask: false, readOnly: false};
function fanOut(topic, event, payload) {
  const members = topics.get(topic);
  if (!members || members.size === 0) return;
  const data = Buffer.from(JSON.stringify([null, null, topic, event, payload === undefined ? {} : payload]));
  const frame = Buffer.concat(WebSocket.Sender.frame(data, frameOpts));
  for (const ws of members) {
    if (ws.readyState === 1) ws._socket.write(frame);
  }
}

function answer(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {"Content-Type": "application/json", "Content-Length": Buffer.byteLength(text)});
  res.end(text);
}

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url.split("?")[0] !== "/publish") return answer(res, 404, {error: "not found"});
  const auth = Buffer.from(req.headers.authorization || "");
  if (auth.length !== PSECRET.length || !crypto.timingSafeEqual(auth, PSECRET)) {
    req.resume();
    return answer(res, 401, {error: "unauthorized"});
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let doc;
    try {
      doc = JSON.parse(Buffer.concat(chunks));
    } catch (err) {
      return answer(res, 400, {error: "bad json"});
    }
    const items = Array.isArray(doc) ? doc : [doc];
    for (const item of items) {
      if (!item || typeof item !== "object" || typeof item.topic !== "string" || typeof item.event !== "string") {
        return answer(res, 400, {error: "bad event"});
      }
    }
    for (const item of items) fanOut(item.topic, item.event, item.payload);
    answer(res, 200, {status: "ok"});
  });
});
server.keepAliveTimeout = 600000; // publishers keep their connection between bursts
server.headersTimeout = 0;
server.requestTimeout = 0;
server.maxConnections = Infinity;

const wss = new WebSocket.WebSocketServer({noServer: true, perMessageDeflate: false, clientTracking: false,
                                           maxPayload: 1 << 20});
server.on("upgrade", (req, socket, head) => {
  if (req.url.split("?")[0] !== "/events/websocket") {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.joined = [];
    ws.on("message", (data) => onMessage(ws, data));
    ws.on("close", () => {
      for (const t of ws.joined) {
        const members = topics.get(t);
        if (members) members.delete(ws);
      }
    });
    ws.on("error", () => {});
  });
});
server.on("clientError", (err, socket) => socket.destroy());

server.listen(Number(port), "127.0.0.1", 65535, () => {
  process.stdout.write("serving on 127.0.0.1:" + port + "\n");
});
