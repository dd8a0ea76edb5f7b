// Drives one real headless Chromium (Debian's /usr/bin/chromium) with playwright-core for pytest.
//
// Protocol: one JSON command per line on stdin, {"id": N, "cmd": "...", ...args}; one JSON line per
// answer on stdout, {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "error": "..."}.
// Page console messages and errors come as {"event": "console" | "pageerror", "text": "..."}.
// The process exits when stdin closes (pytest kills it at teardown anyway).
"use strict";

const readline = require("readline");
const { chromium } = require("playwright-core");

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let context = null;
let page = null;

function emit(obj) { process.stdout.write(JSON.stringify(obj) + "\n"); }

const commands = {
  async launch({ executablePath, userDataDir }) {
    context = await chromium.launchPersistentContext(userDataDir, { executablePath, headless: true, args: ARGS });
    page = context.pages()[0] || await context.newPage();
    page.on("console", (m) => emit({ event: "console", text: m.text() }));
    page.on("pageerror", (e) => emit({ event: "pageerror", text: String(e) }));
    const browser = context.browser();
    return { version: browser ? browser.version() : null };
  },
  async goto({ url }) {
    const response = await page.goto(url);
    return { status: response ? response.status() : null };
  },
  async fill({ selector, value }) { await page.fill(selector, value); return null; },
  async click({ selector }) { await page.click(selector); return null; },
  async wait({ selector, state, timeout }) {
    await page.waitForSelector(selector, { state: state || "visible", timeout });
    return null;
  },
  async waitFunction({ expression, timeout }) {
    await page.waitForFunction(expression, null, { timeout });
    return null;
  },
  async text({ selector }) { return page.textContent(selector); },
  async texts({ selector }) { return page.$$eval(selector, (els) => els.map((e) => e.textContent)); },
  async evaluate({ expression }) { return page.evaluate(expression); },
  async screenshot({ path }) { await page.screenshot({ path, fullPage: true }); return path; },
  async close() {
    if (context) { await context.close(); context = null; }
    return null;
  },
};

const rl = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
rl.on("line", (line) => {
  queue = queue.then(async () => {
    let msg;
    try { msg = JSON.parse(line); } catch (e) { emit({ id: null, ok: false, error: "bad JSON command" }); return; }
    const fn = commands[msg.cmd];
    if (!fn) { emit({ id: msg.id, ok: false, error: "unknown command " + msg.cmd }); return; }
    try {
      emit({ id: msg.id, ok: true, result: await fn(msg) });
    } catch (e) {
      emit({ id: msg.id, ok: false, error: String(e && e.message ? e.message : e).slice(0, 4000) });
    }
  });
});
rl.on("close", () => { queue.then(() => (context ? context.close() : null)).finally(() => process.exit(0)); });
