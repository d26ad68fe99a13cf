// Headless Chromium driven through playwright-core, one JSON command per
// line on stdin, one JSON answer per line on stdout. Used by
// host_tests/test_dashboard.py.
//   node browser_driver.mjs CHROMIUM USER_DATA_DIR
// Commands:
//   {"cmd": "open", "url": U}                  -> {"ok": true, "status": 200}
//   {"cmd": "wait", "js": EXPR, "timeout": ms}  -> {"ok": true, "value": ...}  (EXPR truthy)
//   {"cmd": "eval", "js": EXPR}                 -> {"ok": true, "value": ...}
//   {"cmd": "fill", "sel": S, "value": V}       -> {"ok": true}
//   {"cmd": "click", "sel": S}                  -> {"ok": true}
//   {"cmd": "screenshot", "path": P}            -> {"ok": true}
//   {"cmd": "errors"}                           -> {"ok": true, "value": [...]}
//   {"cmd": "quit"}                             -> {"ok": true}, then exits
// A failing command answers {"error": "..."}. "errors" returns the page's
// console errors, uncaught exceptions and failed requests so far.
// The first line printed is {"ready": true}. Chromium runs with
// USER_DATA_DIR as its profile, so the test can find its processes by that
// path and end them by PID if this script dies first.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [executablePath, userDataDir] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");

const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 1000 },
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
const page = ctx.pages()[0] || (await ctx.newPage());
const errors = [];
page.on("console", (m) => { if (m.type() === "error") errors.push("console: " + m.text()); });
page.on("pageerror", (e) => errors.push("pageerror: " + e.message));
page.on("requestfailed", (r) => errors.push("requestfailed: " + r.url() + " " + (r.failure() || {}).errorText));

out({ ready: true });

async function run(c) {
  switch (c.cmd) {
    case "open": {
      const r = await page.goto(c.url, { waitUntil: "load", timeout: 15000 });
      return { status: r ? r.status() : null, headers: r ? r.headers() : null };
    }
    case "wait": {
      // Polled from here: waitForFunction evaluates its predicate with
      // eval() inside the page, which the dashboard's CSP (rightly) forbids.
      const end = Date.now() + (c.timeout || 10000);
      for (;;) {
        const v = await page.evaluate(c.js);
        if (v) return { value: v };
        if (Date.now() > end) throw new Error("timed out waiting for " + c.js);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    case "eval":
      return { value: await page.evaluate(c.js) };
    case "fill":
      await page.fill(c.sel, c.value);
      return {};
    case "click":
      await page.click(c.sel);
      return {};
    case "screenshot":
      await page.screenshot({ path: c.path, fullPage: true });
      return {};
    case "errors":
      return { value: errors };
    case "quit":
      await ctx.close();
      return {};
    default:
      throw new Error("unknown command " + c.cmd);
  }
}

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let c;
  try {
    c = JSON.parse(line);
    out({ ok: true, ...(await run(c)) });
  } catch (e) {
    out({ error: String(e && e.message ? e.message : e) });
  }
  if (c && c.cmd === "quit") process.exit(0);
}
await ctx.close();
