// Daisi WS browser client: one WebSocket to a Daisi WS edge that reconnects
// with backoff and full jitter, resumes where it left off (every event once,
// in order per connection, gaps announced), and acts on the close codes.
// An ES module with no dependencies and no build step. Protocol:
// docs/PROTOCOL.md of the Daisi WS repository.

/** States, in the order a connection goes through them. */
export const STATES = Object.freeze(["connecting", "resuming", "open", "closed"]);

/** What each close code means to this client. */
export const CLOSE_ACTIONS = Object.freeze({
  4400: "stop", // bad request: the same request would be refused again
  4401: "stop", // API key refused
  4402: "taken", // another socket holds the session: never fight it
  4403: "refresh", // token refused: ask the provider once, then stop
  4429: "slow-down", // rate limited: back off longer
});

const DEFAULTS = Object.freeze({
  backoffBaseMs: 500,
  backoffMaxMs: 30000,
  rateLimitedMs: 30000,
  seenPerSubject: 1024,
  resume: true,
  resumeLagMs: 2000,
  resumeLagEvents: 100,
  clock: () => Date.now(),
});

/** Splits `websocket.{c}.{a}.messages.{chat}` → chat id (or null). */
function chatOf(subject) {
  const parts = subject.split(".");
  return parts.length === 5 && parts[3] === "messages" ? parts[4] : null;
}

/** Whether a subject is one a socket receives from `ready` on (resumed in the URL). */
function isConnectTime(subject) {
  return subject.endsWith(".chats") || subject.endsWith(".agents");
}

/** Token-wise match of a NATS subject filter (`*` = one token). */
function matches(filter, subject) {
  const f = filter.split(".");
  const s = subject.split(".");
  return f.length === s.length && f.every((t, i) => t === "*" || t === s[i]);
}

/** The recent sequences of one subject, for dropping duplicates. */
class Seen {
  constructor(cap) {
    this.cap = cap;
    this.order = [];
    this.set = new Set();
  }
  /** True the first time `seq` is offered (within the window). */
  add(seq) {
    if (this.set.has(seq)) return false;
    if (this.order.length >= this.cap && seq < this.order[0]) return false; // older than anything remembered
    this.set.add(seq);
    this.order.push(seq);
    if (this.order.length > this.cap) {
      this.order.sort((a, b) => a - b);
      this.set.delete(this.order.shift());
    }
    return true;
  }
}

/**
 * The events of one subject received lately, to resume a little behind the
 * last one: with several routers an older event can reach the edge just after
 * a newer one, be queued behind it and be lost with the socket, below the
 * highest position (docs/decisions/0017-resume-protocol.md). Resuming from
 * the highest seq received at least `lagMs` before the last message of the
 * connection (at most `lagEvents` events back) has such an event replayed;
 * the events re-sent with it are dropped as duplicates.
 */
class Recent {
  /** @param {number | undefined} base the subject's position before these events */
  constructor(base) {
    this.base = base;
    /** [seq, received at (ms)], in arrival order */
    this.items = [];
  }
  /** Records an event received at `at`; folds what can no longer be inside a window into `base`. */
  push(seq, at, lagMs, lagEvents) {
    this.items.push([seq, at]);
    while (this.items.length > 0 && (this.items.length > lagEvents || this.items[0][1] <= at - lagMs)) {
      this.fold(this.items.shift()[0]);
    }
  }
  fold(seq) {
    this.base = this.base === undefined ? seq : Math.max(this.base, seq);
  }
  /** The highest seq received at or before `reference - lagMs` (or the base); undefined if unknown. */
  position(reference, lagMs) {
    let p = this.base;
    for (const [seq, at] of this.items) if (at <= reference - lagMs) p = p === undefined ? seq : Math.max(p, seq);
    return p;
  }
  /** Restarts at `seq` (a gap's cut). */
  reset(seq) {
    this.base = seq;
    this.items = [];
  }
}

export class DaisiClient {
  /**
   * @param {import("./daisi-ws").DaisiClientOptions} options
   */
  constructor(options) {
    if (!options || (!options.urls && !options.url)) throw new TypeError("DaisiClient needs `url` or `urls`");
    if (typeof options.token !== "function" && typeof options.token !== "string") {
      throw new TypeError("DaisiClient needs `token` (a string or a function returning one)");
    }
    this.options = { ...DEFAULTS, ...options };
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    this.listeners = new Map();
    this.state = "closed";
    this.ws = null;
    this.wanted = false;
    this.attempt = 0;
    this.connects = 0;
    this.timer = null;
    this.token = null;
    this.refreshed = false;
    this.selected = null;
    /** The negotiated WebSocket extensions of the current socket. */
    this.extensions = "";
    /** subject → highest seq received */
    this.positions = new Map();
    /** the last `stream_seq` of `ready`: the position of connect-time subjects not in `positions` */
    this.floor = null;
    /** chat id → position, for chats resumed through select_chat */
    this.chatPositions = new Map();
    this.seen = new Map();
    /** subject → Recent (the lag window of resume) */
    this.recent = new Map();
    /** when the last message of any connection was received (ms), the reference of the lag window */
    this.lastReceipt = 0;
    this.stats = { events: 0, replayed: 0, duplicates: 0, gaps: 0, connects: 0 };
    const seed = options.positions;
    if (seed) {
      if (typeof seed.floor === "number") this.floor = seed.floor;
      for (const [s, q] of Object.entries(seed.subjects || {})) this.positions.set(s, q);
      for (const [c, q] of Object.entries(seed.chats || {})) this.chatPositions.set(c, q);
    }
  }

  /** Subscribes to `event`, `gap`, `state`, `taken`, `error`, `close` or `ready`; returns an unsubscribe function. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  emit(type, detail) {
    for (const fn of [...(this.listeners.get(type) || [])]) {
      try {
        fn(detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  /** Connects (and keeps reconnecting) until `stop()` or a final close code. */
  start() {
    if (this.wanted) return;
    this.wanted = true;
    this.attempt = 0;
    this.refreshed = false;
    this.connect();
  }

  /** Closes the socket and stops reconnecting. */
  stop() {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= 1) ws.close(1000, "bye");
    this.setState("closed");
  }

  /** Selects a chat (replacing the previous one); re-sent, resumed, on every reconnect. */
  selectChat(chatId) {
    this.selected = chatId;
    if (this.state === "open") this.sendSelect();
  }

  /** Where this client stands, to persist and pass back as `options.positions`. */
  snapshot() {
    return {
      floor: this.floor,
      subjects: Object.fromEntries(this.positions),
      chats: Object.fromEntries(this.chatPositions),
    };
  }

  async nextUrl() {
    const o = this.options;
    if (typeof o.urls === "function") return await o.urls(this.attempt);
    const list = Array.isArray(o.urls) ? o.urls : [o.url];
    // Start on the first URL; each failed attempt moves to the next one.
    return list[this.connects % list.length];
  }

  async getToken(fresh) {
    const t = this.options.token;
    if (typeof t === "string") return t;
    if (this.token === null || fresh) this.token = await t({ refresh: !!fresh });
    return this.token;
  }

  /**
   * Where to resume `subject` from: its highest seq `position`, moved back
   * to the highest seq received at least `resumeLagMs` before the last
   * message of the connection (see `Recent`); never below `atLeast`.
   */
  resumeFrom(subject, position, atLeast) {
    const recent = this.recent.get(subject);
    if (!recent || this.options.resumeLagEvents <= 0) return position;
    const lagged = recent.position(this.lastReceipt, this.options.resumeLagMs);
    if (lagged === undefined) return position;
    let from = Math.min(position, lagged);
    if (atLeast !== null && atLeast !== undefined) from = Math.max(from, atLeast);
    return from;
  }

  resumeParam() {
    const items = [];
    if (this.floor !== null) items.push(String(this.floor));
    for (const [subject, seq] of this.positions) {
      if (!isConnectTime(subject)) continue;
      const from = this.resumeFrom(subject, seq, this.floor);
      if (this.floor === null || from > this.floor) items.push(`${subject}:${from}`);
    }
    return items.join(",");
  }

  async connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (!this.wanted) return;
    this.setState("connecting");
    let url;
    let token;
    try {
      url = new URL(await this.nextUrl());
      token = await this.getToken(false);
    } catch (e) {
      this.emit("error", { code: "ClientError", message: `cannot prepare the connection: ${e && e.message ? e.message : e}` });
      this.retry(null);
      return;
    }
    if (!this.wanted) return;
    url.searchParams.set("token", token);
    if (this.options.apiKey) url.searchParams.set("x-api-key", this.options.apiKey);
    if (this.options.resume) url.searchParams.set("resume", this.resumeParam());
    const ws = new this.WebSocketImpl(url.toString());
    this.ws = ws;
    this.connects++;
    this.stats.connects++;
    let lastError = null;
    let ready = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.extensions = ws.extensions || "";
      if (this.options.resume) this.setState("resuming");
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws) return;
      this.lastReceipt = this.options.clock();
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch {
        this.emit("error", { code: "ClientError", message: "unparseable message from the server" });
        return;
      }
      if (msg.type === "event") this.onEvent(msg, !ready);
      else if (msg.type === "gap") this.onGap(msg.payload || {});
      else if (msg.type === "ready") {
        ready = true;
        this.onReady(msg.payload || {});
      } else if (msg.type === "error") {
        lastError = msg.payload || {};
        this.emit("error", { ...lastError });
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onClose(ev.code, ev.reason, lastError);
    };
  }

  onEvent(msg, replayed) {
    const { subject, seq } = msg;
    if (typeof subject !== "string" || typeof seq !== "number") return;
    let seen = this.seen.get(subject);
    if (!seen) {
      seen = new Seen(this.options.seenPerSubject);
      this.seen.set(subject, seen);
    }
    if (!seen.add(seq)) {
      this.stats.duplicates++;
      return;
    }
    const chat = chatOf(subject);
    let recent = this.recent.get(subject);
    if (!recent) {
      // The position before this subject's first remembered event.
      const before = chat !== null ? this.chatPositions.get(chat) : (this.positions.get(subject) ?? this.floor);
      recent = new Recent(before ?? undefined);
      this.recent.set(subject, recent);
    }
    const lagEvents = Math.min(this.options.resumeLagEvents, this.options.seenPerSubject);
    recent.push(seq, this.lastReceipt || this.options.clock(), this.options.resumeLagMs, Math.max(lagEvents, 0));
    if (!(this.positions.get(subject) >= seq)) this.positions.set(subject, seq);
    if (chat !== null && !(this.chatPositions.get(chat) >= seq)) this.chatPositions.set(chat, seq);
    this.stats.events++;
    if (replayed) this.stats.replayed++;
    this.emit("event", { subject, seq, payload: msg.payload, replayed });
  }

  onGap(gap) {
    this.stats.gaps++;
    const until = gap.until_seq;
    if (typeof until === "number" && typeof gap.subject === "string") {
      // The application reloads that view; positions restart at the cut.
      for (const subject of [...this.positions.keys()]) {
        if (matches(gap.subject, subject)) this.positions.set(subject, until);
      }
      for (const [subject, recent] of this.recent) {
        if (matches(gap.subject, subject)) recent.reset(until);
      }
      if (!gap.subject.includes("*")) this.positions.set(gap.subject, until);
      const chat = chatOf(gap.subject);
      if (chat !== null) this.chatPositions.set(chat, until);
    }
    this.emit("gap", { ...gap });
  }

  onReady(payload) {
    if (typeof payload.stream_seq === "number") {
      this.floor = Math.max(this.floor ?? 0, payload.stream_seq);
      for (const [subject, seq] of [...this.positions]) {
        if (isConnectTime(subject) && seq <= this.floor) this.positions.delete(subject);
      }
    }
    this.attempt = 0;
    this.refreshed = false;
    this.setState("open");
    this.emit("ready", { streamSeq: payload.stream_seq ?? null });
    if (this.selected !== null) this.sendSelect();
  }

  sendSelect() {
    const chat = this.selected;
    const payload = { chat_id: chat };
    let pos = this.chatPositions.get(chat);
    if (pos !== undefined) {
      const subject = [...this.recent.keys()].find((s) => chatOf(s) === chat);
      if (subject !== undefined) pos = this.resumeFrom(subject, pos, null);
    }
    if (this.options.resume) {
      if (pos !== undefined) payload.after_seq = pos;
      // A chat selected for the first time starts at the latest message (sent
      // first) or, if it has none, at the stream position of `ready`.
      else if (this.floor !== null) this.chatPositions.set(chat, this.floor);
    }
    this.ws?.send(JSON.stringify({ type: "select_chat", payload }));
  }

  async onClose(code, reason, lastError) {
    const action = CLOSE_ACTIONS[code];
    if (!this.wanted) {
      this.setState("closed");
      this.emit("close", { code, reason, reconnect: false });
      return;
    }
    if (action === "taken") {
      this.wanted = false;
      this.setState("closed");
      this.emit("close", { code, reason, reconnect: false });
      this.emit("taken", { code, error: lastError });
      return;
    }
    if (action === "stop" || (action === "refresh" && this.refreshed)) {
      this.wanted = false;
      this.setState("closed");
      this.emit("close", { code, reason, reconnect: false });
      this.emit("error", { code: lastError?.code || "Closed", message: lastError?.message || reason || "", closeCode: code, fatal: true });
      return;
    }
    if (action === "refresh") {
      this.refreshed = true;
      this.emit("close", { code, reason, reconnect: true, delayMs: 0 });
      try {
        await this.getToken(true);
      } catch (e) {
        this.wanted = false;
        this.setState("closed");
        this.emit("error", { code: "InvalidToken", message: `token refresh failed: ${e && e.message ? e.message : e}`, closeCode: code, fatal: true });
        return;
      }
      this.connects--; // the same URL again: the token was the problem, not the edge
      this.connect();
      return;
    }
    this.retry({ code, reason }, action === "slow-down");
  }

  /** Schedules the next attempt: exponential backoff with full jitter. */
  retry(closed, slowDown) {
    const o = this.options;
    const cap = Math.min(o.backoffMaxMs, o.backoffBaseMs * 2 ** Math.min(this.attempt, 20));
    let delay = Math.floor(Math.random() * cap);
    if (slowDown) delay = Math.max(delay, o.rateLimitedMs);
    // The very first retry after a working connection goes at once to the
    // next URL: the edge is gone, another one is probably fine.
    if (this.attempt === 0 && !slowDown) delay = Math.floor(Math.random() * Math.min(cap, 250));
    this.attempt++;
    this.setState("connecting");
    if (closed) this.emit("close", { ...closed, reconnect: true, delayMs: delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
