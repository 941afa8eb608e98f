// A real Daisi WS stack for browser tests that kill and restart edges:
// nats-server -js, redis-server, one daisi-router and two daisi-edge
// processes on free ports, fresh secrets, tokens sealed like the edge's
// (AES-256-GCM), and a minimal NATS client that publishes to JetStream and
// returns each event's stream sequence. Everything is stopped by `stop()`.
import { spawn } from "node:child_process";
import { createCipheriv, randomBytes } from "node:crypto";
import { mkdtempSync, openSync, readFileSync, rmSync, existsSync } from "node:fs";
import net from "node:net";
import { homedir, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function eventually(what, check, ms = 30_000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
}

function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

async function httpStatus(port, path) {
  try {
    const r = await fetch(`http://127.0.0.1:${port}${path}`);
    await r.text();
    return r.status;
  } catch {
    return 0;
  }
}

function binDir() {
  if (process.env.DAISI_BIN_DIR) return process.env.DAISI_BIN_DIR;
  const target = process.env.CARGO_TARGET_DIR || join(homedir(), ".cache", "daisi-ws", "target");
  return join(target, "debug");
}

/** `base64url(nonce || AES-256-GCM(claims) || tag)`, as common/src/token.rs seals. */
export function seal(hexKey, claims) {
  const nonce = randomBytes(12);
  const c = createCipheriv("aes-256-gcm", Buffer.from(hexKey, "hex"), nonce);
  const body = Buffer.concat([c.update(JSON.stringify(claims)), c.final(), c.getAuthTag()]);
  return Buffer.concat([nonce, body]).toString("base64url");
}

/** Minimal NATS client: JetStream publish with ack (the stream sequence). */
class Nats {
  static connect(port) {
    return new Promise((res, rej) => {
      const n = new Nats();
      n.sock = net.connect(port, "127.0.0.1");
      n.buf = Buffer.alloc(0);
      n.pending = new Map();
      n.next = 1;
      n.inbox = `_INBOX.bt${randomBytes(6).toString("hex")}`;
      n.sock.once("error", rej);
      n.sock.on("data", (d) => n.onData(d));
      n.sock.once("connect", () => {
        n.sock.write(`CONNECT {"verbose":false,"pedantic":false,"name":"browser-test"}\r\nSUB ${n.inbox}.* 1\r\nPING\r\n`);
        n.ready = res.bind(null, n);
      });
    });
  }
  onData(d) {
    this.buf = Buffer.concat([this.buf, d]);
    for (;;) {
      const eol = this.buf.indexOf("\r\n");
      if (eol < 0) return;
      const line = this.buf.subarray(0, eol).toString();
      if (line.startsWith("MSG ")) {
        const parts = line.split(" ");
        const len = Number(parts[parts.length - 1]);
        if (this.buf.length < eol + 2 + len + 2) return;
        const payload = this.buf.subarray(eol + 2, eol + 2 + len).toString();
        this.buf = this.buf.subarray(eol + 2 + len + 2);
        const waiter = this.pending.get(parts[1]);
        if (waiter) {
          this.pending.delete(parts[1]);
          waiter(JSON.parse(payload));
        }
        continue;
      }
      this.buf = this.buf.subarray(eol + 2);
      if (line === "PING") this.sock.write("PONG\r\n");
      else if (line === "PONG" && this.ready) {
        this.ready();
        this.ready = null;
      }
    }
  }
  /** Publishes to JetStream; resolves with the stream sequence. */
  publish(subject, obj) {
    const reply = `${this.inbox}.${this.next++}`;
    const body = Buffer.from(JSON.stringify(obj));
    return new Promise((res, rej) => {
      const timer = setTimeout(() => {
        this.pending.delete(reply);
        rej(new Error(`no JetStream ack for ${subject}`));
      }, 5000);
      this.pending.set(reply, (ack) => {
        clearTimeout(timer);
        if (ack.error || typeof ack.seq !== "number") rej(new Error(`publish ${subject}: ${JSON.stringify(ack)}`));
        else res(ack.seq);
      });
      this.sock.write(`PUB ${subject} ${reply} ${body.length}\r\n`);
      this.sock.write(Buffer.concat([body, Buffer.from("\r\n")]));
    });
  }
  close() {
    this.sock.destroy();
  }
}

export class Stack {
  /** @param {{resumeMaxEvents?: number}} opts */
  static async start(opts = {}) {
    const s = new Stack();
    s.dir = mkdtempSync(join(tmpdir(), "daisi-browser-stack-"));
    s.procs = new Map();
    s.bin = binDir();
    for (const b of ["daisi-edge", "daisi-router"]) {
      if (!existsSync(join(s.bin, b))) throw new Error(`${b} not found in ${s.bin} (cargo build --bins -p daisi-edge -p daisi-router)`);
    }
    s.secrets = {
      apiKey: randomBytes(16).toString("hex"),
      adminApiKey: randomBytes(16).toString("hex"),
      userKey: randomBytes(32).toString("hex"),
      adminKey: randomBytes(32).toString("hex"),
      internal: randomBytes(16).toString("hex"),
      issuer: randomBytes(16).toString("hex"),
    };
    [s.natsPort, s.redisPort, s.routerPort] = [await freePort(), await freePort(), await freePort()];
    s.edges = [];
    for (let i = 0; i < 2; i++) s.edges.push({ name: `edge${i + 1}`, http: await freePort(), grpc: await freePort() });
    s.resumeMaxEvents = opts.resumeMaxEvents ?? 50;
    s.spawn("nats", "nats-server", ["-a", "127.0.0.1", "-p", String(s.natsPort), "-js", "-sd", join(s.dir, "nats")]);
    s.spawn("redis", "redis-server", ["--port", String(s.redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", s.dir]);
    await eventually("nats and redis listening", async () => (await s.portOpen(s.natsPort)) && (await s.portOpen(s.redisPort)));
    s.startRouter();
    await eventually("router ready", async () => (await httpStatus(s.routerPort, "/ready")) === 200, 60_000);
    for (const e of s.edges) s.startEdge(e);
    for (const e of s.edges) await s.waitEdgeReady(e);
    s.nats = await Nats.connect(s.natsPort);
    return s;
  }

  portOpen(port) {
    return new Promise((res) => {
      const c = net.connect(port, "127.0.0.1");
      c.once("connect", () => {
        c.destroy();
        res(true);
      });
      c.once("error", () => res(false));
    });
  }

  spawn(name, cmd, args, env = {}) {
    const log = openSync(join(this.dir, `${name}.log`), "a");
    const p = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", log, log] });
    p.exited = new Promise((r) => p.once("exit", r));
    this.procs.set(name, p);
    return p;
  }

  commonEnv() {
    const configPath = join(repo, "config", "config.yaml");
    const env = {
      DAISI_WS_CONFIG: configPath,
      DAISI_WS_NATS_URL: `nats://127.0.0.1:${this.natsPort}`,
      DAISI_WS_REDIS_ADDRESS: `127.0.0.1:${this.redisPort}`,
      DAISI_WS_LOG_FORMAT: "text",
      DAISI_WS_AUTH_INTERNAL_TOKEN: this.secrets.internal,
      DAISI_WS_APP_TTL_REFRESH_INTERVAL_SECONDS: "1",
      DAISI_WS_APP_SESSION_TTL_SECONDS: "5",
    };
    // Newer builds require a minting key; older ones refuse an unknown variable.
    if (readFileSync(configPath, "utf8").includes("token_issuer_key")) env.DAISI_WS_AUTH_TOKEN_ISSUER_KEY = this.secrets.issuer;
    return env;
  }

  startRouter() {
    this.spawn("router", join(this.bin, "daisi-router"), [], {
      ...this.commonEnv(),
      DAISI_WS_ROUTER_BIND_ADDRESS: "127.0.0.1",
      DAISI_WS_ROUTER_HTTP_PORT: String(this.routerPort),
      DAISI_WS_ROUTER_NAK_DELAY_MS: "200",
    });
  }

  startEdge(e) {
    this.spawn(e.name, join(this.bin, "daisi-edge"), [], {
      ...this.commonEnv(),
      DAISI_WS_SERVER_BIND_ADDRESS: "127.0.0.1",
      DAISI_WS_SERVER_HTTP_PORT: String(e.http),
      DAISI_WS_SERVER_GRPC_PORT: String(e.grpc),
      DAISI_WS_SERVER_GRPC_ADVERTISE_ADDR: `127.0.0.1:${e.grpc}`,
      DAISI_WS_SERVER_POD_ID: `bt-${e.name}`,
      DAISI_WS_SERVER_DEMO_ENABLED: "true",
      DAISI_WS_SERVER_DRAIN_WINDOW_SECONDS: "1",
      DAISI_WS_APP_RESUME_MAX_EVENTS: String(this.resumeMaxEvents),
      DAISI_WS_AUTH_SECRET_TOKEN: this.secrets.apiKey,
      DAISI_WS_AUTH_ADMIN_SECRET_TOKEN: this.secrets.adminApiKey,
      DAISI_WS_AUTH_TOKEN_AES_KEY: this.secrets.userKey,
      DAISI_WS_AUTH_ADMIN_TOKEN_AES_KEY: this.secrets.adminKey,
    });
  }

  async waitEdgeReady(e) {
    await eventually(`${e.name} ready`, async () => (await httpStatus(e.http, "/ready")) === 200, 60_000);
  }

  /** SIGKILL (no goodbye) or SIGTERM (drain) an edge and wait for its exit. */
  async stopEdge(e, signal) {
    const p = this.procs.get(e.name);
    p.kill(signal);
    await p.exited;
  }

  async restartEdge(e) {
    this.startEdge(e);
    await this.waitEdgeReady(e);
  }

  token(company, agent, user, ttlSeconds = 3600) {
    const now = Math.floor(Date.now() / 1000);
    return seal(this.secrets.userKey, {
      company_id: company,
      agent_id: agent,
      user_id: user,
      expires_at: now + ttlSeconds,
      token_id: randomBytes(16).toString("hex"),
    });
  }

  /** The demo page on the first edge, rotating through both edges. */
  demoUrl(company, agent, user, token = this.token(company, agent, user)) {
    const edges = this.edges.map((e) => `ws://127.0.0.1:${e.http}`).join(",");
    const p = new URLSearchParams({ company, agent, user, token, key: this.secrets.apiKey, edges });
    return `http://127.0.0.1:${this.edges[0].http}/demo#${p}`;
  }

  publish(subject, obj) {
    return this.nats.publish(subject, obj);
  }

  log(name) {
    try {
      return readFileSync(join(this.dir, `${name}.log`), "utf8");
    } catch {
      return "";
    }
  }

  async stop() {
    this.nats?.close();
    const order = [...this.edges.map((e) => e.name), "router", "redis", "nats"];
    for (const name of order) {
      const p = this.procs.get(name);
      if (p && p.exitCode === null && p.signalCode === null) {
        p.kill("SIGTERM");
        const done = await Promise.race([p.exited.then(() => true), sleep(10_000).then(() => false)]);
        if (!done) p.kill("SIGKILL");
      }
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
