// Types of hub.js, the JavaScript client of the hub (docs/client-js.md). Kept in step with
// hub.js by tests/node/dts.test.mjs (every export, method, field, option and event is declared
// here) and type-checked with tsc against tests/node/usage.ts.

/** False for close codes after which the client must not reconnect (4500-4999 and others). */
export function mayReconnect(code: number): boolean;

/** The hub's error code (e.g. 103), or why no reply came. */
export type HubErrorCode = number | "timeout" | "disconnected" | "unsubscribed";

/** A failed command. */
export class HubError extends Error {
  constructor(code: HubErrorCode, message: string);
  readonly name: "HubError";
  readonly code: HubErrorCode;
}

/** Anything built like the standard WebSocket: the global one, or the `ws` package's. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => unknown;

export interface HubOptions {
  /** A JWT, sent as `?token=`. */
  token?: string | null;
  /** Called before every (re)connect, and on the hub's refresh push (no 4002 then). */
  getToken?: (() => string | null | Promise<string | null>) | null;
  /** Dev mode only: `?user=` names the client when there is no token. */
  user?: string | null;
  /** ms, first reconnect delay (default 500). */
  minDelay?: number;
  /** ms, cap of the exponential backoff (default 15000). */
  maxDelay?: number;
  /** ms a connection must stay open before the backoff starts over (default 5000). */
  stableAfter?: number;
  /** ms a command waits for its reply (default 10000). */
  timeout?: number;
  /** The WebSocket implementation (default: the global one), e.g. `WebSocket` from "ws". */
  WebSocket?: WebSocketConstructor | null;
  /** Ask for the user's inbox on every (re)connect: "notification" events (default false). */
  inbox?: boolean;
  /** The device whose acknowledgements the inbox keeps (default: the token's, or "default"). */
  device?: string | null;
}

export type HubState = "disconnected" | "connecting" | "connected" | "closed";

/** Where a history channel stands: the last publication seen. */
export interface Position {
  offset: number | null;
  epoch: string | null;
}

/** The result of a subscribe: `{offset, epoch}` on history channels (and `recovered`). */
export interface SubscribeOptions {
  /** A subscription token for the channel (docs/protocol.md, Tokens): asked before every
   * subscribe and on the hub's refresh push for the channel. */
  getToken?: ((channel: string) => string | Promise<string>) | null;
}

export interface SubscribeResult {
  offset?: number;
  epoch?: string;
  recovered?: boolean;
}

/** A push as the hub sent it: `channel`, `data`, and optional `offset`, `epoch`, `ts`, `event`. */
export interface Push {
  channel?: string;
  data?: unknown;
  offset?: number;
  epoch?: string;
  ts?: number;
  event?: string;
  [key: string]: unknown;
}

export interface StateEvent {
  state: HubState;
  code?: number;
  reason?: string;
  /** ms until the next attempt (state "disconnected"). */
  delay?: number;
}

export interface MessageEvent {
  /** null for a per-user message or a broadcast. */
  channel: string | null;
  data: unknown;
  offset?: number;
  epoch?: string;
  push: Push;
}

export interface GapEvent {
  channel: string;
  /** true: hub.js resubscribes with since and gets the missed publications itself. */
  recovering: boolean;
}

export interface ReloadEvent {
  channel: string;
  reason: string;
}

export interface ErrorEvent {
  /** null for a frame that did not decode. */
  channel: string | null;
  error: unknown;
  /** true: the subscribe is tried again with backoff (error 111). */
  retrying: boolean;
}

/** An inbox entry, once each; acknowledged after the listeners (and waitUntil's promises). */
export interface NotificationEvent {
  seq: number;
  /** The backend's id, when it gave one. */
  id?: string;
  data: unknown;
  epoch: string;
  push: Push;
  /** Delay the acknowledgement until `promise` settles. */
  waitUntil: (promise: Promise<unknown>) => void;
}

export interface ReadEvent {
  read: number;
  epoch: string;
}

export interface ResetEvent {
  /** The new epoch: seq counts from 0 again. */
  epoch: string;
}

/** What this client has of its user's inbox. */
export interface InboxPosition {
  seq: number;
  epoch: string | null;
  read: number;
}

export interface HubEventMap {
  state: StateEvent;
  message: MessageEvent;
  gap: GapEvent;
  reload: ReloadEvent;
  error: ErrorEvent;
  notification: NotificationEvent;
  read: ReadEvent;
  reset: ResetEvent;
}

/** A subscription kept across reconnects. */
export interface Subscription extends Position {
  seen: number | null;
  pending: boolean;
  active: boolean;
}

export class Hub extends EventTarget {
  /** One url or a list (`ws:`, `wss:`, `http(s):`, or a path resolved against the page). */
  constructor(urls: string | string[], options?: HubOptions);
  readonly urls: string[];
  readonly options: Required<HubOptions>;
  readonly state: HubState;
  /** The current WebSocket, if any. */
  readonly ws: unknown;
  /** The url of the current connection. */
  readonly url: string | null;
  /** Connection attempts since the last stable connection. */
  readonly attempts: number;
  /** Successful opens, ever. */
  readonly connections: number;
  /** The last close code. */
  readonly closeCode: number | null;
  readonly subs: ReadonlyMap<string, Subscription>;
  /** The last inbox seq handed to the app, its epoch, and the read cursor. */
  readonly inbox: InboxPosition;

  /** `fn(detail)` for each event; returns a function that removes it. */
  on<K extends keyof HubEventMap>(
    name: K,
    fn: (detail: HubEventMap[K]) => void | Promise<unknown>,
  ): () => void;
  /** Start connecting (and keep reconnecting). */
  connect(): this;
  /** Close for good: no reconnect until connect() is called again. */
  close(): void;
  /** Any command; its `result`, or a rejection with HubError. */
  call<T = unknown>(op: string, fields?: Record<string, unknown>, timeout?: number): Promise<T>;
  /** Publish to a channel whose namespace allows client publishing. */
  publish(channel: string, data: unknown): Promise<Record<string, unknown>>;
  /** Subscribe now or once connected, and again after every reconnect. */
  subscribe(channel: string, options?: SubscribeOptions): Promise<SubscribeResult>;
  /** Stop receiving a channel (and stop resubscribing it). */
  unsubscribe(channel: string): Promise<Record<string, unknown>>;
  /** `{offset, epoch}` of the last publication seen on a history channel, or null. */
  position(channel: string): Position | null;
  /** Move the user's read cursor to `seq` (never back); every connection gets "read". */
  markRead(seq: number): Promise<{ read: number }>;
}
