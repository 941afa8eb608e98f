// Real-browser tests of the JavaScript client (clients/js, used by the demo
// page) against a real stack it starts itself: two edges, a router, NATS and
// Redis (browser-test/stack.mjs). The page's edge is killed (SIGKILL) or
// drained (SIGTERM) while events are published; the page must show every
// event exactly once, in seq order, and no gap.
//
//   cargo build --bins -p daisi-edge -p daisi-router && node browser-test/resume.test.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), ARTIFACTS_DIR (default
// ../artifacts), DAISI_BIN_DIR (default $CARGO_TARGET_DIR/debug). Prints one
// line per test and `browser: N passed, M failed`; exits non-zero on failure.
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Stack, eventually, sleep } from "./stack.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const EXECUTABLE = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = resolve(process.env.ARTIFACTS_DIR || join(here, "..", "artifacts"));
const WAIT = 60_000;
mkdirSync(ARTIFACTS, { recursive: true });

const stack = await Stack.start({ resumeMaxEvents: 50 });
const userDataDir = mkdtempSync(join(tmpdir(), "daisi-browser-resume-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: EXECUTABLE,
  headless: true,
  viewport: { width: 1100, height: 800 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"],
});

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

async function openPage(url, before) {
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  if (before) await before(page);
  await page.goto(url, { waitUntil: "domcontentloaded" });
  return { page, pageErrors };
}

const openState = (page) => page.waitForSelector('#state[data-state="open"]', { timeout: WAIT });

/** The events the page shows, oldest first: [{subject, seq}]. */
async function shown(page) {
  const rows = await page.$$eval("#events li[data-seq]", (els) =>
    els.map((li) => ({ subject: li.dataset.subject, seq: Number(li.dataset.seq) })),
  );
  return rows.reverse();
}

/** Publishes `n` events alternating between `subjects`, about every `everyMs`; returns {subject: [seq]}. */
async function publishMany(subjects, n, everyMs, onIndex) {
  const out = Object.fromEntries(subjects.map((s) => [s, []]));
  for (let i = 0; i < n; i++) {
    const subject = subjects[i % subjects.length];
    out[subject].push(await stack.publish(subject, { i, at: Date.now() }));
    if (onIndex) await onIndex(i);
    await sleep(everyMs);
  }
  return out;
}

/** Every published event exactly once, in seq order per subject, and no gap. */
async function expectExactlyOnce(page, published) {
  const want = Object.values(published).reduce((a, l) => a + l.length, 0);
  await eventually(
    "the page shows every published event",
    async () => {
      const got = await shown(page);
      return Object.entries(published).every(([s, seqs]) => seqs.every((q) => got.some((g) => g.subject === s && g.seq === q)));
    },
    WAIT,
  ).catch(async (e) => {
    const got = await shown(page);
    throw new Error(`${e.message}; published ${JSON.stringify(published)}; shown ${JSON.stringify(got)}`);
  });
  await sleep(500); // a late duplicate would show now
  const got = await shown(page);
  for (const [subject, seqs] of Object.entries(published)) {
    const first = seqs[0];
    const mine = got.filter((g) => g.subject === subject && g.seq >= first).map((g) => g.seq);
    if (JSON.stringify(mine) !== JSON.stringify(seqs)) {
      throw new Error(`${subject}: shown ${JSON.stringify(mine)}, published ${JSON.stringify(seqs)} (${want} events in all)`);
    }
  }
  const gaps = await page.$$("#events li.gap");
  if (gaps.length) throw new Error(`the page shows ${gaps.length} gap(s)`);
}

for (const [signal, label] of [
  ["SIGKILL", "kill -9"],
  ["SIGTERM", "drain (SIGTERM)"],
]) {
  test(`${label} of the page's edge while events are published: every event once, in order, no gap`, async () => {
    const agent = signal === "SIGKILL" ? "k9" : "drain";
    const chats = `websocket.demo.${agent}.chats`;
    const chat1 = `websocket.demo.${agent}.messages.chat1`;
    const { page, pageErrors } = await openPage(stack.demoUrl("demo", agent, "u1"));
    try {
      await openState(page);
      await page.fill("#chat", "chat1");
      await page.click("#select");
      // Wait until the chat's route is live: its first event arrives.
      const warm = await stack.publish(chat1, { warm: true });
      await page.waitForSelector(`#events li[data-subject="${chat1}"][data-seq="${warm}"]`, { timeout: WAIT });
      const edge1 = stack.edges[0];
      const published = await publishMany([chats, chat1], 60, 40, async (i) => {
        if (i === 20) await stack.stopEdge(edge1, signal);
      });
      await expectExactlyOnce(page, published);
      const stats = await page.evaluate(() => window.daisiClient.stats);
      if (stats.connects < 2) throw new Error(`the page never reconnected: ${JSON.stringify(stats)}`);
      if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
    } finally {
      await page.screenshot({ path: join(ARTIFACTS, `browser-resume-${agent}.png`), fullPage: false }).catch(() => {});
      await page.close();
      await stack.restartEdge(stack.edges[0]);
    }
  });
}

test("an expired token: one refresh through the token provider, then connected", async () => {
  let calls = 0;
  const expired = stack.token("demo", "tok", "u1", -60);
  const { page, pageErrors } = await openPage(stack.demoUrl("demo", "tok", "u1", expired), (p) =>
    p.exposeFunction("demoTokenProvider", () => {
      calls++;
      return stack.token("demo", "tok", "u1");
    }),
  );
  try {
    await openState(page);
    const closes = await page.$$eval("#events li[data-close]", (els) => els.map((e) => e.dataset.close));
    if (calls !== 1) throw new Error(`token provider called ${calls} times`);
    if (JSON.stringify(closes) !== '["4403"]') throw new Error(`closes ${JSON.stringify(closes)}`);
    const seq = await stack.publish("websocket.demo.tok.chats", { after: "refresh" });
    await page.waitForSelector(`#events li[data-seq="${seq}"]`, { timeout: WAIT });
    if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
  } finally {
    await page.screenshot({ path: join(ARTIFACTS, "browser-resume-refresh.png") }).catch(() => {});
    await page.close();
  }
});

test("4402: the page whose session is taken stops, with no reconnect loop", async () => {
  const first = await openPage(stack.demoUrl("demo", "taken", "u1"));
  let second = null;
  try {
    await openState(first.page);
    second = await openPage(stack.demoUrl("demo", "taken", "u1"));
    await openState(second.page);
    await first.page.waitForSelector('#status[data-state="stopped"]', { timeout: WAIT });
    await sleep(3000);
    const closes = await first.page.$$eval("#events li[data-close]", (els) => els.map((e) => e.dataset.close));
    const stats = await first.page.evaluate(() => window.daisiClient.stats);
    if (JSON.stringify(closes) !== '["4402"]' || stats.connects !== 1) {
      throw new Error(`closes ${JSON.stringify(closes)}, connects ${stats.connects}`);
    }
    if ((await second.page.getAttribute("#state", "data-state")) !== "open") throw new Error("the second page lost its session");
  } finally {
    await first.page.screenshot({ path: join(ARTIFACTS, "browser-resume-4402.png") }).catch(() => {});
    await first.page.close();
    if (second) await second.page.close();
  }
});

test("a resume beyond app.resume_max_events: the page shows the gap, then live events", async () => {
  const chats = "websocket.demo.limit.chats";
  const { page, pageErrors } = await openPage(stack.demoUrl("demo", "limit", "u1"));
  try {
    await openState(page);
    const seen = await stack.publish(chats, { before: true });
    await page.waitForSelector(`#events li[data-seq="${seen}"]`, { timeout: WAIT });
    await page.click("#toggle"); // disconnect
    await page.waitForSelector('#state[data-state="closed"]', { timeout: WAIT });
    for (let i = 0; i < stack.resumeMaxEvents + 5; i++) await stack.publish(chats, { i });
    await page.click("#toggle"); // connect: resumes past the limit
    await page.waitForSelector(`#events li.gap[data-gap="limit"][data-subject="${chats}"]`, { timeout: WAIT });
    await openState(page);
    const live = await stack.publish(chats, { after: "gap" });
    await page.waitForSelector(`#events li[data-seq="${live}"]`, { timeout: WAIT });
    const replayed = await page.$$eval('#events li[data-replayed="true"]', (els) => els.length);
    if (replayed) throw new Error(`${replayed} events replayed despite the gap`);
    if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
  } finally {
    await page.screenshot({ path: join(ARTIFACTS, "browser-resume-gap.png") }).catch(() => {});
    await page.close();
  }
});

let passed = 0;
let failed = 0;
try {
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
} finally {
  if (failed) {
    for (const name of ["edge1", "edge2", "router"]) writeFileSync(join(ARTIFACTS, `browser-resume-${name}.log`), stack.log(name));
  }
  await context.close();
  await stack.stop();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(`browser: screenshots in ${ARTIFACTS}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
