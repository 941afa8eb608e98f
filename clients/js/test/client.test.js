// Unit tests of the client's state machine with a scripted WebSocket:
// node --test clients/js/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { DaisiClient } from "../daisi-ws.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.serverClose(code, reason);
  }
  server(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function until(what, check, ms = 2000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (check()) return;
    await tick(2);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function client(extra = {}) {
  FakeSocket.all = [];
  const c = new DaisiClient({
    urls: ["ws://a/ws/c/a1", "ws://b/ws/c/a1"],
    token: "t",
    apiKey: "k",
    backoffBaseMs: 10,
    backoffMaxMs: 20,
    rateLimitedMs: 300,
    WebSocket: FakeSocket,
    ...extra,
  });
  const seen = { events: [], gaps: [], states: [], taken: 0, errors: [] };
  c.on("event", (e) => seen.events.push(`${e.subject}#${e.seq}`));
  c.on("gap", (g) => seen.gaps.push(g));
  c.on("state", (s) => seen.states.push(s));
  c.on("taken", () => seen.taken++);
  c.on("error", (e) => seen.errors.push(e));
  return { c, seen };
}

const chats = "websocket.c.a1.chats";
const ev = (seq, subject = chats) => ({ type: "event", seq, subject, payload: { seq } });

test("resumes from the floor and the last seq, drops duplicates, re-selects the chat with after_seq", async () => {
  // resumeLagMs 0: from the highest seq received (no lag window).
  const { c, seen } = client({ resumeLagMs: 0 });
  c.start();
  await until("first socket", () => FakeSocket.all.length === 1);
  const s1 = FakeSocket.all[0];
  assert.equal(s1.url.searchParams.get("resume"), "");
  assert.equal(s1.url.host, "a");
  s1.server({ type: "ready", payload: { stream_seq: 10 } });
  assert.equal(c.state, "open");
  c.selectChat("x");
  assert.deepEqual(s1.sent.at(-1), { type: "select_chat", payload: { chat_id: "x" } });
  s1.server(ev(12));
  s1.server(ev(12));
  s1.server(ev(11)); // overtaken: new to the client, delivered
  s1.server(ev(13, "websocket.c.a1.messages.x"));
  s1.serverClose(1006);
  await until("second socket", () => FakeSocket.all.length === 2);
  const s2 = FakeSocket.all[1];
  assert.equal(s2.url.host, "b", "the next URL");
  assert.equal(s2.url.searchParams.get("resume"), `10,${chats}:12`);
  await until("resuming", () => c.state === "resuming");
  s2.server(ev(12)); // replayed again: dropped
  s2.server(ev(14));
  s2.server({ type: "ready", payload: { stream_seq: 20 } });
  assert.deepEqual(s2.sent.at(-1), { type: "select_chat", payload: { chat_id: "x", after_seq: 13 } });
  assert.deepEqual(seen.events, [`${chats}#12`, `${chats}#11`, "websocket.c.a1.messages.x#13", `${chats}#14`]);
  assert.equal(c.stats.duplicates, 2);
  assert.deepEqual(c.snapshot().subjects, { "websocket.c.a1.messages.x": 13 });
  assert.equal(c.snapshot().floor, 20);
  c.stop();
  assert.equal(c.state, "closed");
});

/** A clock the test moves by hand. */
function manualClock() {
  const clock = () => clock.now;
  clock.now = 1_000_000;
  return clock;
}

test("resumes from the last seq received lagMs before the last message: an event overtaken and lost with the socket is replayed", async () => {
  const clock = manualClock();
  const { c, seen } = client({ clock, resumeLagMs: 2000 });
  c.start();
  await until("first socket", () => FakeSocket.all.length === 1);
  const s1 = FakeSocket.all[0];
  s1.server({ type: "ready", payload: { stream_seq: 10 } });
  s1.server(ev(11));
  s1.server(ev(12));
  clock.now += 5000;
  s1.server(ev(13));
  clock.now += 1000;
  // 15 (router B) is written; 14 (router A) was queued behind it and dies with the socket.
  s1.server(ev(15));
  clock.now += 30000; // the drop is noticed late: the window is measured from the last message
  s1.serverClose(1006);
  await until("second socket", () => FakeSocket.all.length === 2);
  const s2 = FakeSocket.all[1];
  assert.equal(s2.url.searchParams.get("resume"), `10,${chats}:12`, "12 was the last seq received 2 s before 15");
  for (const seq of [13, 14, 15, 16]) s2.server(ev(seq)); // the edge replays everything after 12
  s2.server({ type: "ready", payload: { stream_seq: 16 } });
  assert.deepEqual(seen.events, [11, 12, 13, 15, 14, 16].map((q) => `${chats}#${q}`), "each once; 14 not lost");
  assert.equal(c.stats.duplicates, 2, "13 and 15 re-sent by the lagged resume, dropped");
  c.stop();
});

test("the lag window holds at most resumeLagEvents events of a subject", async () => {
  const clock = manualClock();
  const { c } = client({ clock, resumeLagMs: 60000, resumeLagEvents: 2 });
  c.start();
  await until("first socket", () => FakeSocket.all.length === 1);
  const s1 = FakeSocket.all[0];
  s1.server({ type: "ready", payload: { stream_seq: 10 } });
  for (const seq of [11, 12, 13, 14, 15]) s1.server(ev(seq));
  s1.serverClose(1006);
  await until("second socket", () => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[1].url.searchParams.get("resume"), `10,${chats}:13`, "14 and 15 are the window");
  c.stop();
});

test("a subject whose events are all inside the window resumes from its position before them, never below the floor", async () => {
  const clock = manualClock();
  const { c } = client({ clock });
  c.start();
  await until("first socket", () => FakeSocket.all.length === 1);
  const s1 = FakeSocket.all[0];
  s1.server({ type: "ready", payload: { stream_seq: 10 } });
  s1.server(ev(11));
  s1.serverClose(1006);
  await until("second socket", () => FakeSocket.all.length === 2);
  const s2 = FakeSocket.all[1];
  assert.equal(s2.url.searchParams.get("resume"), "10", "from the floor: 11 is inside the window");
  s2.server(ev(11)); // replayed again: dropped
  s2.server(ev(12));
  s2.server({ type: "ready", payload: { stream_seq: 30 } });
  clock.now += 5000;
  s2.server(ev(31));
  s2.serverClose(1006);
  await until("third socket", () => FakeSocket.all.length === 3);
  assert.equal(FakeSocket.all[2].url.searchParams.get("resume"), "30", "the window's base (12) is below the new floor");
  assert.equal(c.stats.duplicates, 1);
  c.stop();
});

test("the selected chat resumes through select_chat with the lagged position", async () => {
  const clock = manualClock();
  const { c, seen } = client({ clock });
  const chat = "websocket.c.a1.messages.x";
  c.start();
  await until("first socket", () => FakeSocket.all.length === 1);
  const s1 = FakeSocket.all[0];
  s1.server({ type: "ready", payload: { stream_seq: 20 } });
  c.selectChat("x");
  s1.server(ev(21, chat));
  clock.now += 3000;
  s1.server(ev(23, chat));
  s1.serverClose(1006);
  await until("second socket", () => FakeSocket.all.length === 2);
  const s2 = FakeSocket.all[1];
  s2.server({ type: "ready", payload: { stream_seq: 25 } });
  assert.deepEqual(s2.sent.at(-1), { type: "select_chat", payload: { chat_id: "x", after_seq: 21 } });
  for (const seq of [22, 23]) s2.server(ev(seq, chat));
  assert.deepEqual(seen.events, [21, 23, 22].map((q) => `${chat}#${q}`));
  c.stop();
});

test("a gap moves the position to its cut and is emitted", async () => {
  const { c, seen } = client();
  c.start();
  await until("socket", () => FakeSocket.all.length === 1);
  const s = FakeSocket.all[0];
  s.server({ type: "gap", payload: { subject: chats, after_seq: 3, until_seq: 50, reason: "limit" } });
  s.server({ type: "ready", payload: { stream_seq: 50 } });
  assert.equal(seen.gaps.length, 1);
  assert.equal(seen.gaps[0].reason, "limit");
  s.server(ev(51));
  s.serverClose(1012);
  await until("reconnect", () => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[1].url.searchParams.get("resume"), "50", "the window restarts at the cut");
  c.stop();
});

test("4403 asks the token provider once more, then gives up with an error", async () => {
  let calls = 0;
  const { c, seen } = client({ token: async ({ refresh }) => `tok${++calls}${refresh ? "r" : ""}` });
  c.start();
  await until("socket", () => FakeSocket.all.length === 1);
  assert.equal(FakeSocket.all[0].url.searchParams.get("token"), "tok1");
  FakeSocket.all[0].server({ type: "error", payload: { code: "InvalidToken", message: "token has expired" } });
  FakeSocket.all[0].serverClose(4403);
  await until("refreshed socket", () => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[1].url.searchParams.get("token"), "tok2r");
  assert.equal(FakeSocket.all[1].url.host, "a", "the same edge: the token was the problem");
  FakeSocket.all[1].serverClose(4403);
  await tick(50);
  assert.equal(FakeSocket.all.length, 2, "no third attempt");
  assert.equal(c.state, "closed");
  assert.ok(seen.errors.some((e) => e.fatal && e.closeCode === 4403));
  assert.equal(calls, 2);
});

test("4402 stops and emits taken; 4401 and 4400 stop", async () => {
  for (const code of [4402, 4401, 4400]) {
    const { c, seen } = client();
    c.start();
    await until("socket", () => FakeSocket.all.length === 1);
    FakeSocket.all[0].server({ type: "ready" });
    FakeSocket.all[0].serverClose(code);
    await tick(60);
    assert.equal(FakeSocket.all.length, 1, `${code}: no reconnect`);
    assert.equal(c.state, "closed");
    assert.equal(seen.taken, code === 4402 ? 1 : 0);
  }
});

test("1001/1006/1011/1012/1013 reconnect; 4429 waits at least rateLimitedMs", async () => {
  for (const code of [1001, 1006, 1011, 1012, 1013]) {
    const { c } = client();
    c.start();
    await until("socket", () => FakeSocket.all.length === 1);
    FakeSocket.all[0].serverClose(code);
    await until(`${code}: reconnect`, () => FakeSocket.all.length === 2);
    c.stop();
  }
  const { c } = client();
  c.start();
  await until("socket", () => FakeSocket.all.length === 1);
  const closed = Date.now();
  FakeSocket.all[0].serverClose(4429);
  await until("reconnect after 4429", () => FakeSocket.all.length === 2, 3000);
  assert.ok(Date.now() - closed >= 280, `waited ${Date.now() - closed} ms`);
  c.stop();
});

test("backoff grows with full jitter up to its cap", async () => {
  const { c } = client({ backoffBaseMs: 100, backoffMaxMs: 400 });
  const delays = [];
  c.on("close", (i) => i.reconnect && delays.push(i.delayMs));
  const realRandom = Math.random;
  Math.random = () => 0.999;
  try {
    c.attempt = 3;
    c.wanted = true;
    c.retry({ code: 1006, reason: "" });
    c.retry({ code: 1006, reason: "" });
  } finally {
    Math.random = realRandom;
    c.stop();
  }
  assert.deepEqual(delays, [399, 399], "capped at backoffMaxMs");
  c.attempt = 1;
  Math.random = () => 0.5;
  try {
    c.wanted = true;
    c.retry({ code: 1006, reason: "" });
  } finally {
    Math.random = realRandom;
    c.stop();
  }
  assert.equal(delays[2], 100, "uniform in [0, base * 2^attempt)");
});
