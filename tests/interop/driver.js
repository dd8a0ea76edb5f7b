#!/usr/bin/env node
/*
 * pusherd interop driver: runs the REAL, unmodified phoenix.js client (several
 * published npm versions side by side) under Node.js and lets a test drive it
 * over stdin/stdout with JSON lines.
 *
 *   node driver.js [--version 1.8]      long-running, one JSON command per stdin line
 *   node driver.js --self-check         load every library, print one JSON line, exit
 *
 * Every line written to stdout is one JSON object with a monotonically
 * increasing "seq" and a "type".  Nothing else is ever written to stdout
 * (diagnostics go to stderr).  See tests/interop/README.md for the protocol.
 */
"use strict";

const fs = require("fs");
const path = require("path");
const readline = require("readline");
const WebSocket = require("ws");

// ---------------------------------------------------------------------------
// Library loading.  All libraries are required as published (no copies, no
// patches, no global shims):
//   1.8  package "exports".require -> priv/static/phoenix.cjs.js (CommonJS)
//   1.5  "main" -> priv/static/phoenix.js (webpack UMD: module.exports = ...)
//   1.4  "main" -> priv/static/phoenix.js (webpack UMD)
//   1.2  "main" -> priv/static/phoenix.js (Babel IIFE, writes into the
//        module's own `exports` when `exports` is defined, which it is under
//        CommonJS require, so no `window` shim is needed)
// None of them touches window/location/document at load time; they only use
// `window.WebSocket`/`location` when no transport is given or the URL is
// relative, and the driver always passes an absolute URL and a transport.
// ---------------------------------------------------------------------------
const LIBRARIES = {
  "1.2": "phoenix12",
  "1.4": "phoenix14",
  "1.5": "phoenix15",
  "1.7": "phoenix17",
  "1.8": "phoenix18",
};

function normalizeVersion(v) {
  if (v === undefined || v === null) return null;
  let s = String(v).trim().replace(/^phoenix@?/, "");
  if (/^\d\d$/.test(s)) s = s[0] + "." + s[1]; // "18" -> "1.8"
  const m = /^(\d+)\.(\d+)/.exec(s);             // "1.8.16" -> "1.8"
  if (m) s = m[1] + "." + m[2];
  if (!LIBRARIES[s]) {
    throw new Error(`unknown phoenix version ${JSON.stringify(v)}; known: ${Object.keys(LIBRARIES).join(", ")}`);
  }
  return s;
}

// 1.8's "exports" map hides package.json from require(): read it from disk,
// walking up from the resolved entry point.
function packageVersion(mainFile) {
  let dir = path.dirname(mainFile);
  for (;;) {
    const candidate = path.join(dir, "package.json");
    if (fs.existsSync(candidate)) {
      const json = JSON.parse(fs.readFileSync(candidate, "utf8"));
      if (json.name && json.version) return json.version;
    }
    const parent = path.dirname(dir);
    if (parent === dir) return null;
    dir = parent;
  }
}

const loaded = {};
function loadLibrary(version) {
  const v = normalizeVersion(version);
  if (!loaded[v]) {
    const pkg = LIBRARIES[v];
    const lib = require(pkg);
    if (typeof lib.Socket !== "function") {
      throw new Error(`${pkg} loaded but exports no Socket (keys: ${Object.keys(lib).join(",")})`);
    }
    const main = require.resolve(pkg);
    loaded[v] = { lib, pkg, exactVersion: packageVersion(main), main };
  }
  return loaded[v];
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------
let seq = 0;

// Turn anything (payloads, ws events, errors) into plain JSON-able data.
function sanitize(value, depth = 0, seen = new WeakSet()) {
  if (value === undefined) return null;
  if (value === null || typeof value === "boolean" || typeof value === "string") return value;
  if (typeof value === "number") return Number.isFinite(value) ? value : String(value);
  if (typeof value === "bigint" || typeof value === "symbol") return String(value);
  if (typeof value === "function") return `[function ${value.name || "anonymous"}]`;
  if (value instanceof ArrayBuffer) return { $binary: Buffer.from(value).toString("base64") };
  if (ArrayBuffer.isView(value)) {
    return { $binary: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64") };
  }
  if (value instanceof Error) return { error: value.name, message: value.message };
  if (depth > 32) return "[too deep]";
  if (seen.has(value)) return "[circular]";
  seen.add(value);
  try {
    // ws Event objects (CloseEvent, ErrorEvent, MessageEvent) keep their data
    // in getters on the prototype and carry a circular `target`.
    const ctor = value.constructor && value.constructor.name;
    if (typeof ctor === "string" && /Event$/.test(ctor) && typeof value.type === "string") {
      const out = { event: value.type };
      for (const k of ["code", "reason", "wasClean", "message", "data"]) {
        if (value[k] !== undefined) out[k] = sanitize(value[k], depth + 1, seen);
      }
      return out;
    }
    if (value instanceof WebSocket) return "[WebSocket]";
    if (Array.isArray(value)) return value.map((v) => sanitize(v, depth + 1, seen));
    const out = {};
    for (const k of Object.keys(value)) out[k] = sanitize(value[k], depth + 1, seen);
    return out;
  } finally {
    seen.delete(value);
  }
}

function emit(obj) {
  let line;
  try {
    line = JSON.stringify(Object.assign({ seq: ++seq }, sanitize(obj)));
  } catch (e) {
    line = JSON.stringify({ seq, type: "driver_error", message: `cannot serialize output: ${e.message}` });
  }
  process.stdout.write(line + "\n");
}

// Payload coming from the test: {"$binary": base64} at top level -> ArrayBuffer
function decodePayload(p) {
  if (p && typeof p === "object" && !Array.isArray(p) && Object.keys(p).length === 1 &&
      typeof p.$binary === "string") {
    const b = Buffer.from(p.$binary, "base64");
    return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
  }
  return p === undefined ? {} : p;
}

// number -> constant backoff; array -> per-try list (last element repeats)
function backoff(spec, name) {
  if (spec === undefined || spec === null) return undefined;
  if (typeof spec === "number") return () => spec;
  if (Array.isArray(spec) && spec.length > 0 && spec.every((x) => typeof x === "number")) {
    return (tries) => spec[Math.min(Math.max(tries, 1), spec.length) - 1];
  }
  throw new Error(`${name} must be a number of ms or a non-empty array of numbers`);
}

// ---------------------------------------------------------------------------
// Transport: a ws.WebSocket subclass, so phoenix.js's `new transport(url[, protocols])`
// gets our ws options (Origin, extra headers) and we can trace frames.
// ---------------------------------------------------------------------------
//
// Browser semantics for exceptions: an exception thrown by an `onmessage` (etc.)
// handler is reported and the connection carries on.  Under ws it would unwind
// through ws's frame parser and silently lose the frames that arrived in the
// same TCP read, so every on* handler phoenix.js installs is wrapped: the
// exception is reported as {"type":"exception","where":"onmessage",...}.
function reportException(e, where) {
  emit({ type: "exception", where, message: String(e && e.message || e), stack: e && e.stack || null });
}

const HANDLER_PROPS = ["onopen", "onclose", "onerror", "onmessage"];

function makeTransport(wsOptions, trace) {
  const NodeWebSocket = class NodeWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols === undefined ? [] : protocols, wsOptions);
      emit({ type: "transport_connect", url: String(url), protocols: protocols === undefined ? null : protocols });
      if (trace) {
        this.addEventListener("open", () => emit({ type: "transport_open", protocol: this.protocol }));
        this.addEventListener("message", (ev) => emit({ type: "frame_in", data: ev.data }));
        this.addEventListener("close", (ev) => emit({ type: "transport_close", code: ev.code, reason: ev.reason }));
        this.addEventListener("error", (ev) => emit({ type: "transport_error", message: ev.message }));
      }
    }
    send(data, ...rest) {
      if (trace) emit({ type: "frame_out", data });
      return super.send(data, ...rest);
    }
  };
  for (const prop of HANDLER_PROPS) {
    const base = Object.getOwnPropertyDescriptor(WebSocket.prototype, prop);
    const slot = Symbol(prop);
    Object.defineProperty(NodeWebSocket.prototype, prop, {
      configurable: true,
      enumerable: true,
      get() { return this[slot] === undefined ? null : this[slot]; },
      set(fn) {
        this[slot] = fn;
        const guarded = typeof fn === "function"
          ? function (ev) { try { return fn.call(this, ev); } catch (e) { reportException(e, prop); } }
          : fn;
        base.set.call(this, guarded);
      },
    });
  }
  return NodeWebSocket;
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------
let defaultVersion = null;
let current = null; // {socket, version, lib, exactVersion}
const channels = new Map(); // id -> {channel, topic}

// Events that phoenix.js handles itself; everything else reaching
// channel.onMessage is an application event (broadcast or push).
function isInternalEvent(event) {
  return typeof event !== "string" ||
    event.startsWith("chan_reply_") ||
    ["phx_reply", "phx_join", "phx_leave", "phx_close", "phx_error"].includes(event);
}

function requireSocket() {
  if (!current) throw new Error("not connected: send a connect command first");
  return current;
}

function requireChannel(id) {
  const entry = channels.get(id);
  if (!entry) throw new Error(`unknown channel id ${JSON.stringify(id)}`);
  return entry;
}

// Forget the current socket for good (connect to a new URL, exit): unlike a
// plain socket.disconnect() (which is what the "disconnect" command does, with
// the library's real semantics), also stop every timer, so that e.g. a 1.2
// reconnect already scheduled cannot resurrect a zombie connection.
function dropSocket() {
  if (!current) return;
  const { socket } = current;
  current = null;
  channels.clear();
  const quiet = (f) => { try { f(); } catch (e) { /* ignore */ } };
  quiet(() => socket.disconnect());
  quiet(() => socket.reconnectTimer && socket.reconnectTimer.reset());
  quiet(() => { clearInterval(socket.heartbeatTimer); clearTimeout(socket.heartbeatTimer); });
  quiet(() => clearTimeout(socket.heartbeatTimeoutTimer));
  for (const ch of socket.channels || []) {
    quiet(() => ch.rejoinTimer && ch.rejoinTimer.reset());
    quiet(() => ch.joinPush && ch.joinPush.cancelTimeout && ch.joinPush.cancelTimeout());
    quiet(() => { for (const p of ch.pushBuffer || []) p.cancelTimeout && p.cancelTimeout(); });
  }
}

// ---------------------------------------------------------------------------
// LongPoll under Node: phoenix.js's Ajax wants a browser's XMLHttpRequest. 1.2 reads
// window.XMLHttpRequest when it polls; 1.4, 1.5 and 1.7 take `self || window` when they
// load (so the shim must be in place first: PHX_XHR=1 in the driver's environment installs it
// at start, before any library is required); 1.8 prefers XMLHttpRequest over fetch, as in a browser. The shim
// is npm's xhr2 (a plain XMLHttpRequest on Node's http module), plus what a browser adds by
// itself: the page's Origin (cmd.origin) and any cmd.headers (e.g. a proxy's).
// ---------------------------------------------------------------------------
let xhrInstalled = false;
const xhrConfig = { origin: null, headers: {}, trace: false };

function installXhr() {
  if (xhrInstalled) return;
  const XHR2 = require("xhr2");
  class PageXMLHttpRequest extends XHR2 {
    open(method, url, ...rest) {
      const result = super.open(method, url, ...rest);
      if (xhrConfig.origin) super.setRequestHeader("Origin", xhrConfig.origin);
      for (const [k, v] of Object.entries(xhrConfig.headers)) super.setRequestHeader(k, v);
      if (xhrConfig.trace) emit({ type: "http_request", method, url: String(url) });
      return result;
    }
  }
  // A browser sets Origin itself; xhr2 refuses it from script, as it should for a page.
  PageXMLHttpRequest.prototype._restrictedHeaders =
    Object.assign({}, XHR2.prototype._restrictedHeaders, { origin: false });
  if (typeof globalThis.window === "undefined") globalThis.window = {};
  globalThis.window.XMLHttpRequest = PageXMLHttpRequest;
  globalThis.XMLHttpRequest = PageXMLHttpRequest;   // 1.2 names it bare: `new XMLHttpRequest()`
  xhrInstalled = true;
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------
function recoveryHelper() {
  return require(path.join(__dirname, "..", "..", "pusherd", "static", "pusherd-recovery.js"));
}

const FUNCTION_OPTS = new Set(["reconnectAfterMs", "rejoinAfterMs"]);

// Presence, as a page uses it: "class" is 1.4+'s `new Presence(channel)` (onSync, onJoin,
// onLeave, list); "static" is 1.2's helpers wired to the channel's events by the page
// (syncState on presence_state, syncDiff on presence_diff, list). Every sync emits the list:
// {"type": "presence_sync", "id", "topic", "list": [{"key", "metas"}], "state"}.
function attachPresence(me, channel, id, topic, mode, live, entry) {
  const Presence = me.lib.Presence;
  if (!Presence) throw new Error(`phoenix ${me.exactVersion} exports no Presence`);
  const chooser = (key, presence) => ({ key, metas: presence.metas });
  if (mode === "class") {
    if (typeof Presence !== "function" || !Presence.prototype || typeof Presence.prototype.onSync !== "function") {
      throw new Error(`phoenix ${me.exactVersion} has no Presence class (use presence: "static")`);
    }
    const presence = new Presence(channel);
    presence.onJoin((key, current, joined) => live() && emit({ type: "presence_join", id, key,
      had: current ? current.metas.length : 0, joined: joined.metas.length }));
    presence.onLeave((key, current, left) => live() && emit({ type: "presence_leave", id, key,
      left: left.metas.length, remaining: current.metas.length }));
    presence.onSync(() => live() && emit({ type: "presence_sync", id, topic, list: presence.list(chooser),
      state: presence.state }));
    entry.presenceList = () => presence.list(chooser);
  } else if (mode === "static") {
    let state = {};
    const sync = () => live() && emit({ type: "presence_sync", id, topic, list: Presence.list(state, chooser), state });
    channel.on("presence_state", (s) => { state = Presence.syncState(state, s); sync(); });
    channel.on("presence_diff", (d) => { state = Presence.syncDiff(state, d); sync(); });
    entry.presenceList = () => Presence.list(state, chooser);
  } else {
    throw new Error(`presence must be "class" or "static", got ${JSON.stringify(mode)}`);
  }
}

const commands = {
  connect(cmd) {
    if (!cmd.url) throw new Error("connect needs a url (use reconnect to reuse the existing socket)");
    const version = normalizeVersion(cmd.version || defaultVersion || "1.8");
    const { lib, exactVersion } = loadLibrary(version);
    dropSocket();

    const userOpts = cmd.opts || {};
    const opts = {};
    for (const [k, v] of Object.entries(userOpts)) {
      if (!FUNCTION_OPTS.has(k) && k !== "logger" && k !== "transport") opts[k] = v;
    }
    for (const k of FUNCTION_OPTS) {
      const f = backoff(userOpts[k], k);
      if (f) opts[k] = f;
    }
    if (cmd.params !== undefined) opts.params = cmd.params;
    if (userOpts.logger || cmd.logger) {
      opts.logger = (kind, msg, data) => emit({ type: "log", kind, msg, data });
    }

    const transportName = cmd.transport || userOpts.transport || "websocket";
    if (transportName === "websocket") {
      const wsOptions = Object.assign({}, cmd.ws_options || {});
      if (cmd.origin) wsOptions.origin = cmd.origin;
      if (cmd.headers) wsOptions.headers = Object.assign({}, wsOptions.headers || {}, cmd.headers);
      opts.transport = makeTransport(wsOptions, !!cmd.trace_frames);
    } else if (transportName === "longpoll") {
      if (!lib.LongPoll) throw new Error(`phoenix ${exactVersion} exports no LongPoll`);
      if (!xhrInstalled) {
        throw new Error("longpoll needs the XMLHttpRequest shim, installed before the library loads: " +
                        "start the driver with PHX_XHR=1 in its environment");
      }
      xhrConfig.origin = cmd.origin || null;
      xhrConfig.headers = Object.assign({}, cmd.headers || {});
      xhrConfig.trace = !!cmd.trace_frames;
      opts.transport = lib.LongPoll;
    } else {
      throw new Error(`unknown transport ${JSON.stringify(transportName)} (websocket|longpoll)`);
    }

    const socket = new lib.Socket(cmd.url, opts);
    const me = { socket, version, lib, exactVersion };
    current = me;
    const live = () => current === me;
    socket.onOpen(() => live() && emit({ type: "open" }));
    socket.onClose((ev) => live() && emit({
      type: "close",
      code: ev && ev.code !== undefined ? ev.code : null,
      reason: ev && ev.reason !== undefined ? ev.reason : null,
      wasClean: ev && ev.wasClean !== undefined ? ev.wasClean : null,
    }));
    socket.onError((err) => live() && emit({
      type: "error",
      message: err && (err.message || (err.error && err.error.message)) || (typeof err === "string" ? err : null),
    }));
    socket.connect();
    return { version, exact_version: exactVersion, endpoint_url: socket.endPointURL() };
  },

  reconnect() {
    requireSocket().socket.connect();
  },

  disconnect(cmd) {
    const me = requireSocket();
    me.socket.disconnect(() => {
      if (current === me) emit({ type: "disconnected" });
    }, cmd.code, cmd.reason);
  },

  join(cmd) {
    const me = requireSocket();
    if (!cmd.id) throw new Error("join needs an id");
    if (!cmd.topic) throw new Error("join needs a topic");
    const old = channels.get(cmd.id);
    if (old && !old.channel.isClosed()) throw new Error(`channel id ${cmd.id} is in use (state ${old.channel.state})`);
    const id = cmd.id;
    const topic = cmd.topic;
    // With `recovery`, the channel is made by pusherd's own page helper (pusherd/static/
    // pusherd-recovery.js), exactly as a page would use it.
    const channel = cmd.recovery
      ? recoveryHelper().channel(me.socket, topic, cmd.params || {}, {
          since: cmd.recovery.since,
          onGap: (response) => channels.get(id) === entry && emit({ type: "gap", id, topic, response }),
        })
      : me.socket.channel(topic, cmd.params || {});
    const entry = { channel, topic };
    channels.set(id, entry);
    const live = () => channels.get(id) === entry;

    // Catch-all for application events.  Channel#onMessage(event, payload, ref[, joinRef])
    // exists in every version (1.2 included) and runs for every frame the channel
    // accepted, before the bindings; it must return the payload.
    const previousOnMessage = channel.onMessage;  // the library's, or a page helper's wrapper
    channel.onMessage = function (event, payload, ref, joinRef) {
      if (live() && !isInternalEvent(event)) {
        emit({ type: "event", id, topic, event, payload, ref: ref === undefined ? null : ref,
               join_ref: joinRef === undefined ? null : joinRef });
      }
      return previousOnMessage.apply(this, arguments);
    };
    if (cmd.presence) attachPresence(me, channel, id, topic, cmd.presence, live, entry);
    channel.onClose((payload) => live() && emit({ type: "channel_close", id, topic, payload }));
    channel.onError((reason) => live() && emit({ type: "channel_error", id, topic, reason }));

    const report = (status) => (response) => live() && emit({
      type: "join", id, topic, status, response, join_ref: channel.joinRef() === undefined ? null : channel.joinRef(),
    });
    const push = cmd.timeout !== undefined ? channel.join(cmd.timeout) : channel.join();
    push.receive("ok", report("ok")).receive("error", report("error")).receive("timeout", report("timeout"));
  },

  presence_list(cmd) {
    const entry = requireChannel(cmd.id);
    if (!entry.presenceList) throw new Error(`channel ${cmd.id} was joined without presence`);
    return { list: entry.presenceList() };
  },

  push(cmd) {
    const { channel, topic } = requireChannel(cmd.id);
    if (!cmd.event) throw new Error("push needs an event");
    const id = cmd.id;
    const tag = cmd.tag === undefined ? null : cmd.tag;
    const payload = decodePayload(cmd.payload);
    const p = cmd.timeout !== undefined ? channel.push(cmd.event, payload, cmd.timeout) : channel.push(cmd.event, payload);
    const me = current;
    const report = (status) => (response) => current === me && emit({ type: "push_reply", id, topic, event: cmd.event, tag, status, response });
    p.receive("ok", report("ok")).receive("error", report("error")).receive("timeout", report("timeout"));
    // Statuses other than ok/error/timeout are legal on the wire; listen for any the test names.
    for (const st of cmd.statuses || []) {
      if (!["ok", "error", "timeout"].includes(st)) p.receive(st, report(st));
    }
  },

  leave(cmd) {
    const entry = requireChannel(cmd.id);
    const id = cmd.id;
    const p = cmd.timeout !== undefined ? entry.channel.leave(cmd.timeout) : entry.channel.leave();
    const me = current;
    const report = (status) => (response) => current === me && emit({ type: "leave", id, topic: entry.topic, status, response });
    p.receive("ok", report("ok")).receive("error", report("error")).receive("timeout", report("timeout"));
  },

  state() {
    const out = { connection: null, channels: {} };
    if (current) {
      out.connection = current.socket.connectionState();
      out.version = current.exactVersion;
    }
    for (const [id, { channel, topic }] of channels) {
      out.channels[id] = { topic, state: channel.state, join_ref: channel.joinRef() === undefined ? null : channel.joinRef() };
    }
    return out;
  },

  ping() {
    return {};
  },

  exit(cmd) {
    dropSocket();
    // give the close frame a moment to leave, but never hang
    setTimeout(() => process.exit(cmd.code || 0), 50).unref();
    process.stdin.pause();
    return { exiting: true };
  },
};

function handleLine(line) {
  line = line.trim();
  if (!line) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ type: "cmd_error", cid: null, cmd: null, message: `invalid JSON: ${e.message}` });
    return;
  }
  const cid = cmd.cid === undefined ? null : cmd.cid;
  const name = cmd.cmd;
  try {
    const fn = Object.prototype.hasOwnProperty.call(commands, name) ? commands[name] : null;
    if (!fn) throw new Error(`unknown cmd ${JSON.stringify(name)}; known: ${Object.keys(commands).join(", ")}`);
    const result = fn(cmd);
    emit(Object.assign({ type: "ack", cid, cmd: name }, result || {}));
  } catch (e) {
    emit({ type: "cmd_error", cid, cmd: name, message: String(e && e.message || e) });
  }
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------
function parseArgs(argv) {
  const args = { version: null, selfCheck: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--self-check") args.selfCheck = true;
    else if (argv[i] === "--version") args.version = argv[++i];
    else if (argv[i].startsWith("--version=")) args.version = argv[i].slice("--version=".length);
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.selfCheck) {
    const libs = {};
    for (const v of Object.keys(LIBRARIES)) {
      try {
        const l = loadLibrary(v);
        libs[v] = { ok: true, package: l.pkg, version: l.exactVersion, main: l.main };
      } catch (e) {
        libs[v] = { ok: false, error: String(e && e.message || e) };
      }
    }
    const wsVersion = require("ws/package.json").version;
    process.stdout.write(JSON.stringify({ type: "self_check", node: process.version, ws: wsVersion, libraries: libs }) + "\n");
    return;
  }

  if (process.env.PHX_XHR === "1") installXhr();
  defaultVersion = normalizeVersion(args.version || process.env.PHX_VERSION || "1.8");
  const { exactVersion } = loadLibrary(defaultVersion);

  // The client library (e.g. 1.2 on a null payload) may throw from inside a
  // WebSocket callback: report it as an observation instead of dying.
  process.on("uncaughtException", (e) => reportException(e, "uncaught"));
  process.on("unhandledRejection", (e) => reportException(e, "unhandledRejection"));

  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  rl.on("line", handleLine);
  // stdin closed (test finished or crashed): never outlive the controller
  rl.on("close", () => {
    dropSocket();
    setTimeout(() => process.exit(0), 50).unref();
  });
  emit({ type: "ready", version: defaultVersion, exact_version: exactVersion, node: process.version,
         pid: process.pid });
}

main();
