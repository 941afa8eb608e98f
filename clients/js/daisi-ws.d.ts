// Type declarations for daisi-ws.js (the Daisi WS browser client).

export type State = "connecting" | "resuming" | "open" | "closed";

export declare const STATES: readonly State[];
export declare const CLOSE_ACTIONS: Readonly<Record<number, "stop" | "taken" | "refresh" | "slow-down">>;

/** Where a client stands; persist it and pass it back as `positions` to resume across page loads. */
export interface Positions {
  /** The last `stream_seq` of `ready`: the position of connect-time subjects not listed. */
  floor: number | null;
  /** Subject → highest seq received. */
  subjects: Record<string, number>;
  /** Chat id → position of that chat (resumed through `select_chat`). */
  chats: Record<string, number>;
}

export interface DaisiClientOptions {
  /** One WebSocket URL, e.g. `wss://edge.example.com/ws/acme/agent7` (without token or key). */
  url?: string;
  /** Several URLs tried in turn, or a function returning the URL for an attempt. */
  urls?: string[] | ((attempt: number) => string | Promise<string>);
  /** A token, or a provider called at start and once more (with `refresh: true`) after a 4403. */
  token: string | ((context: { refresh: boolean }) => string | Promise<string>);
  /** The API key (`x-api-key` query parameter). */
  apiKey?: string;
  /** Ask the edge to replay what was missed on every reconnect (default true). */
  resume?: boolean;
  /** Positions saved from an earlier `snapshot()`. */
  positions?: Partial<Positions>;
  /** First backoff cap in milliseconds (default 500); doubles per failed attempt. */
  backoffBaseMs?: number;
  /** Largest backoff in milliseconds (default 30000). */
  backoffMaxMs?: number;
  /** Least wait after a 4429 (rate limited), in milliseconds (default 30000). */
  rateLimitedMs?: number;
  /** Recent sequences remembered per subject to drop duplicates (default 1024). */
  seenPerSubject?: number;
  /**
   * Resume each subject from the highest seq received at least this long
   * before the connection's last message, not from the highest seq (default
   * 2000 ms; 0 = from the highest): an older event overtaken by a newer one
   * between two routers and lost with the socket is then replayed. The events
   * re-sent with it are dropped as duplicates. See docs/PROTOCOL.md, Resume.
   */
  resumeLagMs?: number;
  /** At most this many events of a subject are inside that window (default 100; 0 = no lag). */
  resumeLagEvents?: number;
  /** The clock, milliseconds (default `Date.now`; for tests). */
  clock?: () => number;
  /** A WebSocket implementation (default `globalThis.WebSocket`). */
  WebSocket?: typeof WebSocket;
}

export interface EventMessage {
  subject: string;
  seq: number;
  payload: unknown;
  /** True when it came from the replay of a resume (before `ready`). */
  replayed: boolean;
}

export interface GapMessage {
  subject: string;
  after_seq: number;
  until_seq: number;
  reason: "retention" | "limit" | string;
}

export interface ErrorMessage {
  code: string;
  message: string;
  details?: string;
  /** The close code, when the error ended the connection. */
  closeCode?: number;
  /** True when the client stopped for good. */
  fatal?: boolean;
}

export interface CloseInfo {
  code: number;
  reason: string;
  reconnect: boolean;
  delayMs?: number;
}

export interface DaisiClientEvents {
  event: EventMessage;
  gap: GapMessage;
  state: State;
  ready: { streamSeq: number | null };
  taken: { code: number; error: ErrorMessage | null };
  error: ErrorMessage;
  close: CloseInfo;
}

export declare class DaisiClient {
  constructor(options: DaisiClientOptions);
  readonly state: State;
  /** The negotiated WebSocket extensions of the current socket (e.g. permessage-deflate). */
  readonly extensions: string;
  readonly stats: { events: number; replayed: number; duplicates: number; gaps: number; connects: number };
  on<K extends keyof DaisiClientEvents>(type: K, listener: (detail: DaisiClientEvents[K]) => void): () => void;
  off<K extends keyof DaisiClientEvents>(type: K, listener: (detail: DaisiClientEvents[K]) => void): void;
  /** Connects and keeps reconnecting until `stop()` or a final close code. */
  start(): void;
  /** Closes the socket and stops reconnecting. */
  stop(): void;
  /** Selects a chat; re-sent (resumed) on every reconnect. */
  selectChat(chatId: string): void;
  /** Where the client stands. */
  snapshot(): Positions;
}
