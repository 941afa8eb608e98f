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
  const { c, seen } = client();
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

test("a gap moves the position to its cut and is emitted", async () => {
  const { c, seen } = client();
  c.start();
  await until("socket", () => FakeSocket.all.length === 1);
  const s = FakeSocket.all[0];
  s.server({ type: "gap", payload: { subject: chats, after_seq: 3, until_seq: 50, reason: "limit" } });
  s.server({ type: "ready", payload: { stream_seq: 50 } });
  assert.equal(seen.gaps.length, 1);
  assert.equal(seen.gaps[0].reason, "limit");
  s.serverClose(1012);
  await until("reconnect", () => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[1].url.searchParams.get("resume"), "50");
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
