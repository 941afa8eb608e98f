// Real-browser test of the edge's demo page (/demo) against a running local
// stack: headless Debian chromium driven by playwright-core.
//
//   DEMO_URL=<the DEMO_URL= line printed by daisi-dev-stack> node demo.test.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), ARTIFACTS_DIR (default
// ../artifacts). Prints one line per test and closes with
// `browser: N passed, M failed`; exits non-zero on any failure.
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const DEMO_URL = process.env.DEMO_URL;
const EXECUTABLE = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = resolve(process.env.ARTIFACTS_DIR || join(here, "..", "artifacts"));
const WAIT = 30_000;

if (!DEMO_URL) {
  console.error("browser: DEMO_URL is not set (run scripts/browser-test.sh, which starts the stack)");
  console.log("browser: 0 passed, 1 failed");
  process.exit(1);
}
mkdirSync(ARTIFACTS, { recursive: true });

const url = new URL(DEMO_URL);
const params = new URLSearchParams(url.hash.slice(1) || url.search.slice(1));
const company = params.get("company");
const agent = params.get("agent");
const chatsSubject = `websocket.${company}.${agent}.chats`;
const chat1Subject = `websocket.${company}.${agent}.messages.chat1`;

const userDataDir = mkdtempSync(join(tmpdir(), "daisi-browser-test-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: EXECUTABLE,
  headless: true,
  viewport: { width: 1100, height: 800 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

async function openPage(target) {
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  await page.goto(target, { waitUntil: "domcontentloaded" });
  return { page, pageErrors };
}

test("demo page: ready, a published event, select_chat and its message", async () => {
  const { page, pageErrors } = await openPage(DEMO_URL);
  try {
    await page.waitForSelector('#status[data-state="ready"]', { timeout: WAIT });
    // Chromium offers permessage-deflate; the edge must have negotiated it.
    const extensions = await page.getAttribute("#status", "data-extensions");
    if (!extensions || !extensions.includes("permessage-deflate")) {
      throw new Error(`permessage-deflate not negotiated: ${JSON.stringify(extensions)}`);
    }
    await page.waitForSelector(`#events li[data-subject="${chatsSubject}"]`, { timeout: WAIT });
    await page.fill("#chat", "chat1");
    await page.click("#select");
    await page.waitForSelector(`#events li[data-subject="${chat1Subject}"]`, { timeout: WAIT });
    const payload = await page.textContent(`#events li[data-subject="${chat1Subject}"] pre`);
    if (!JSON.parse(payload).chat_id || JSON.parse(payload).chat_id !== "chat1") {
      throw new Error(`unexpected chat1 payload: ${payload}`);
    }
    if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
  } finally {
    await page.screenshot({ path: join(ARTIFACTS, "browser-demo.png") }).catch(() => {});
    await page.close();
  }
});

test("demo page: a refused token shows close code 4403 and does not reconnect", async () => {
  const bad = new URL(DEMO_URL);
  const p = new URLSearchParams(bad.hash.slice(1));
  p.set("token", "not-a-valid-token");
  bad.hash = p.toString();
  const { page, pageErrors } = await openPage(bad.toString());
  try {
    await page.waitForSelector('#status[data-state="stopped"]', { timeout: WAIT });
    const status = await page.textContent("#status");
    const why = await page.textContent("#why");
    if (!status.includes("4403") || !why.includes("Not reconnecting")) {
      throw new Error(`status "${status}", why "${why}"`);
    }
    if (!(await page.$('#events li[data-code="InvalidToken"]'))) throw new Error("the InvalidToken error is not shown");
    await page.waitForTimeout(2_000);
    const closes = await page.$$eval("#events li[data-close]", (els) => els.length);
    if (closes !== 1) throw new Error(`expected one close, saw ${closes} (it reconnected)`);
    if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
  } finally {
    await page.screenshot({ path: join(ARTIFACTS, "browser-demo-4403.png") }).catch(() => {});
    await page.close();
  }
});

test("demo page: a second tab takes the session; the first shows 4402 and stays closed", async () => {
  const first = await openPage(DEMO_URL);
  let second = null;
  try {
    await first.page.waitForSelector('#status[data-state="ready"]', { timeout: WAIT });
    second = await openPage(DEMO_URL);
    await second.page.waitForSelector('#status[data-state="ready"]', { timeout: WAIT });
    await first.page.waitForSelector('#status[data-state="stopped"]', { timeout: WAIT });
    const status = await first.page.textContent("#status");
    if (!status.includes("4402")) throw new Error(`first tab status "${status}"`);
    await first.page.waitForTimeout(2_000);
    const state = await second.page.getAttribute("#status", "data-state");
    if (state !== "ready") throw new Error(`second tab lost its session: ${state}`);
    const errors = [...first.pageErrors, ...second.pageErrors];
    if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  } finally {
    await first.page.screenshot({ path: join(ARTIFACTS, "browser-demo-4402.png") }).catch(() => {});
    await first.page.close();
    if (second) await second.page.close();
  }
});

let passed = 0;
let failed = 0;
for (const t of tests) {
  const started = Date.now();
  try {
    await t.fn();
    passed++;
    console.log(`browser: ok   ${t.name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed++;
    console.log(`browser: FAIL ${t.name}: ${e && e.message ? e.message : e}`);
  }
}
await context.close();
rmSync(userDataDir, { recursive: true, force: true });
console.log(`browser: screenshots in ${ARTIFACTS}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
