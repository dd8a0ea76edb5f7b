#!/usr/bin/env node
// A join storm with the REAL, unmodified phoenix.js 1.8: N sockets join one topic as fast as
// `rate` allows and each keeps its presence list. Used by tests/integration/test_presence_storm.py
// and bench/presence_storm.py.
//
// stdin: one JSON line {url, topic, origin, tokens: [[guardian_token, csrf_token], ...],
//        presence: bool, rate: sockets/s, full: how many sockets use `new Presence(channel)`,
//        timeout_ms}
// stdout: {"type": "done", complete, seconds, joined, frames, bytes, lists: {digest: sockets},
//          sizes: {size: sockets}, errors}, once every list holds N entries (presence) or every
//          socket joined (no presence), or at the timeout; then waits for a line on stdin
//          (the test reads the server's list meanwhile) and exits.
//
// `full` sockets keep phoenix.js's own Presence (its list() is what is digested); the others
// apply presence_state and presence_diff to a count and an XOR of a 64-bit hash of
// key "|" phx_ref per meta (two FNV-1a 32-bit hashes over the UTF-16 code units, see
// `meta_hash` in the Python side): O(1) memory a socket, so thousands fit in one process, and
// a leave of a meta that was never joined, a join listed twice or a missing one shows as a
// wrong digest.
"use strict";
const readline = require("readline");
const WebSocket = require("ws");
const { Socket, Presence } = require("phoenix18");

class Digest {
  constructor() { this.lo = 0; this.hi = 0; this.count = 0; }
  toggle(key, ref) {
    const text = key + "|" + ref;
    let a = 0x811c9dc5, b = 0x01000193 ^ 0x5bd1e995;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      a = Math.imul(a ^ c, 0x01000193) >>> 0;
      b = Math.imul(b ^ c, 0x01000193) >>> 0;
    }
    this.lo = (this.lo ^ a) >>> 0;
    this.hi = (this.hi ^ b) >>> 0;
  }
  add(key, metas) { for (const m of metas) { this.toggle(key, m.phx_ref); this.count++; } }
  remove(key, metas) { for (const m of metas) { this.toggle(key, m.phx_ref); this.count--; } }
  hex() { return this.hi.toString(16).padStart(8, "0") + this.lo.toString(16).padStart(8, "0"); }
}

function listDigest(list) {
  const d = new Digest();
  for (const item of list) d.add(item.key, item.metas);
  return d;
}

function run(cfg) {
  const n = cfg.tokens.length;
  const started = Date.now();
  let frames = 0, joined = 0, complete = 0, errors = 0, finished = false, allJoined = null;
  const clients = [];
  const sockets = [];
  const Transport = class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols === undefined ? [] : protocols, { origin: cfg.origin });
      sockets.push(this);
      this.addEventListener("message", () => { frames++; });
    }
  };

  function finish(reason) {
    if (finished) return;
    finished = true;
    const lists = {}, sizes = {};
    for (const c of clients) {
      const d = c.presence ? listDigest(c.presence.list((key, p) => ({ key, metas: p.metas })))
        : (c.digest || new Digest());
      lists[d.hex()] = (lists[d.hex()] || 0) + 1;
      sizes[d.count] = (sizes[d.count] || 0) + 1;
    }
    let bytes = 0;
    for (const ws of sockets) bytes += ws._socket ? ws._socket.bytesRead : 0;
    process.stdout.write(JSON.stringify({ type: "done", reason, complete: complete === n || (!cfg.presence && joined === n),
      seconds: (Date.now() - started) / 1000, joined_seconds: allJoined, sockets: n, joined, frames, bytes,
      cpu_seconds: process.cpuUsage().user / 1e6 + process.cpuUsage().system / 1e6,
      lists: cfg.presence ? lists : {}, sizes: cfg.presence ? sizes : {}, errors }) + "\n");
  }

  function check(c) {
    if (c.done || !cfg.presence) return;
    const count = c.presence ? c.presence.list().reduce((s, p) => s + p.metas.length, 0) : c.digest.count;
    if (count === n) {
      c.done = true;
      if (++complete === n) finish("complete");
    }
  }

  let next = 0;
  const perTick = Math.max(1, Math.round(cfg.rate / 100));
  const opener = setInterval(() => {
    for (let k = 0; k < perTick && next < n; k++, next++) {
      const [token, csrf] = cfg.tokens[next];
      const socket = new Socket(cfg.url, { transport: Transport, heartbeatIntervalMs: 30000, timeout: 60000,
        reconnectAfterMs: () => 3600000, rejoinAfterMs: () => 3600000 });
      socket.onError(() => { errors++; });
      socket.connect();
      const channel = socket.channel(cfg.topic, { guardian_token: token, csrf_token: csrf });
      const c = { socket, channel, done: false, presence: null, digest: null };
      if (cfg.presence && next < cfg.full) {
        c.presence = new Presence(channel);
        c.presence.onSync(() => check(c));
      } else if (cfg.presence) {
        c.digest = new Digest();
        channel.on("presence_state", (state) => {
          c.digest = new Digest();
          for (const key of Object.keys(state)) c.digest.add(key, state[key].metas);
          check(c);
        });
        channel.on("presence_diff", (diff) => {
          for (const key of Object.keys(diff.joins)) c.digest.add(key, diff.joins[key].metas);
          for (const key of Object.keys(diff.leaves)) c.digest.remove(key, diff.leaves[key].metas);
          check(c);
        });
      }
      channel.join()
        .receive("ok", () => {
          if (++joined === n) {
            allJoined = (Date.now() - started) / 1000;
            if (!cfg.presence) finish("complete");
          }
        })
        .receive("error", () => { errors++; })
        .receive("timeout", () => { errors++; });
      clients.push(c);
    }
    if (next >= n) clearInterval(opener);
  }, 10);
  setTimeout(() => finish("timeout"), cfg.timeout_ms);
}

const rl = readline.createInterface({ input: process.stdin });
let configured = false;
rl.on("line", (line) => {
  if (!configured) {
    configured = true;
    run(JSON.parse(line));
  } else {
    process.exit(0);
  }
});
rl.on("close", () => process.exit(0));
