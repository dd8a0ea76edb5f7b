// Replays presence_state / presence_diff payloads through the REAL, unmodified phoenix.js
// presence code and prints the list each client ends with. Used by tests/presence_sync.py.
//
// stdin, one JSON object per line:
//   {"version": "1.2"|"1.4"|"1.5"|"1.8", "steps": [["state", {...}], ["diff", {...}], ["rejoin"], ...]}
// stdout, one line per input line: {"ok": true, "state": {key: {"metas": [...]}}} or {"ok": false, "error": "..."}
//
// 1.2 has only the static helpers (syncState/syncDiff): the page wires them to the channel
// events itself, as its docs show. 1.4+ is driven through `new Presence(channel)` with a
// minimal channel (on + joinRef), so its buffering of diffs until presence_state is exercised.
"use strict";
const readline = require("readline");
const LIBRARIES = { "1.2": "phoenix12", "1.4": "phoenix14", "1.5": "phoenix15", "1.8": "phoenix18" };

function replay(version, steps) {
  const Presence = require(LIBRARIES[version]).Presence;
  if (version === "1.2") {
    let state = {};
    for (const [kind, payload] of steps) {
      if (kind === "state") state = Presence.syncState(state, payload);
      else if (kind === "diff") state = Presence.syncDiff(state, payload);
    }
    return state;
  }
  const handlers = {};
  let joinRef = 1;
  const channel = { on: (event, cb) => { handlers[event] = cb; }, joinRef: () => String(joinRef) };
  const presence = new Presence(channel);
  for (const [kind, payload] of steps) {
    if (kind === "state") handlers.presence_state(payload);
    else if (kind === "diff") handlers.presence_diff(payload);
    else if (kind === "rejoin") joinRef += 1;
  }
  return presence.state;
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  let out;
  try {
    const { version, steps } = JSON.parse(line);
    out = { ok: true, state: replay(version, steps) };
  } catch (e) {
    out = { ok: false, error: String(e && e.stack || e) };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
});
