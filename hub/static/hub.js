// hub.js: the JavaScript client of the hub (client protocol v1, docs/protocol.md; API in
// docs/client-js.md; types in hub.d.ts). One dependency-free ES module for browsers, Node and
// bundlers: connect with a token, subscribe, publish, reconnect with backoff and jitter, recover
// missed messages on history channels. It uses the global WebSocket, or the `WebSocket` option
// (e.g. the `ws` package in Node versions without one).

/**
 * Close codes after which the client must not reconnect (docs/protocol.md, "Close codes"); the
 * same rule as hub.errors.may_reconnect, checked against it by tests/test_node.py.
 */
export function mayReconnect(code) {
  if (code >= 4500 && code <= 4999) return false;
  return ![1002, 1003, 1007, 1008, 1009, 1010].includes(code);
}

/** A failed command: `code` is the hub's error code, or "timeout" / "disconnected". */
export class HubError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "HubError";
    this.code = code;
  }
}

const DEFAULTS = {
  token: null, // a JWT, sent as ?token=
  getToken: null, // async () => token, called before every (re)connect and on a refresh push
  user: null, // dev mode only: ?user=
  minDelay: 500, // ms, first reconnect delay
  maxDelay: 15000, // ms, cap of the exponential backoff
  stableAfter: 5000, // ms a connection must stay open before the backoff starts over
  timeout: 10000, // ms a command waits for its reply
  WebSocket: null, // a WebSocket constructor (default: the global one), e.g. the ws package's
  inbox: false, // ask for the user's inbox on every (re)connect: "notification" events
  device: null, // the device whose acknowledgements the inbox keeps (default: the token's)
};

const OPEN = 1; // WebSocket.OPEN, the same in every implementation

// CustomEvent is global in browsers and Node 19+; a minimal stand-in elsewhere.
const DetailEvent =
  globalThis.CustomEvent ??
  class extends Event {
    constructor(type, init = {}) {
      super(type);
      this.detail = init.detail;
    }
  };

function resolveUrl(url) {
  const base = globalThis.location?.href;
  let out;
  try {
    out = new URL(url, base);
  } catch {
    throw new TypeError(`hub.js: not an absolute url (and no page to resolve it against): ${url}`);
  }
  if (out.protocol === "http:") out.protocol = "ws:";
  if (out.protocol === "https:") out.protocol = "wss:";
  if (out.protocol !== "ws:" && out.protocol !== "wss:") {
    throw new TypeError(`hub.js: not a ws, wss, http or https url: ${url}`);
  }
  return out;
}

function reportListenerError(err) {
  // Browsers report it like any uncaught error; Node would crash the process on a throw from an
  // EventTarget listener, so there it is logged and the other listeners still run.
  if (typeof globalThis.reportError === "function" && typeof window !== "undefined") {
    globalThis.reportError(err);
  } else {
    console.error("hub.js: listener failed:", err);
  }
}

/**
 * A connection to a hub, kept open until close() or a close code that forbids reconnecting.
 * Events (EventTarget, or hub.on(name, fn) with fn(detail)):
 *   state    {state, code, reason, delay}  "connecting" | "connected" | "disconnected" | "closed"
 *   message  {channel, data, offset, epoch, push}  a publication, or a user message / broadcast
 *            (no channel)
 *   gap      {channel, recovering}  messages may have been lost on channel; recovering: hub.js
 *            is fetching them from history itself
 *   reload   {channel, reason}  history could not fill a hole: reload the channel's state
 *   error    {channel, error, retrying}  a subscribe was refused (retrying: error 111, tried
 *            again with backoff; else the subscription is dropped), or a frame did not decode
 *   notification {seq, id, data, epoch, push, waitUntil}  an inbox entry (option inbox), once
 *            each: duplicates are dropped by seq, and it is acknowledged after the listeners
 *            ran (and the promises given to waitUntil, or returned by on()'s fn, settled)
 *   read     {read, epoch}  the user's read cursor moved (on any of its connections)
 *   reset    {epoch}  the inbox started over (the hub lost it): seq counts from 0 again
 */
export class Hub extends EventTarget {
  constructor(urls, options = {}) {
    super();
    this.urls = Array.isArray(urls) ? urls.slice() : [urls];
    if (!this.urls.length) throw new TypeError("hub.js: at least one url");
    this.urls.forEach(resolveUrl); // fail now on a url that can never work
    this.options = { ...DEFAULTS, ...options };
    this._WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("hub.js: no global WebSocket here: pass the WebSocket option (e.g. ws)");
    }
    this.state = "disconnected";
    this.ws = null;
    this.url = null; // the url of the current connection
    this.attempts = 0; // connection attempts since the last stable connection
    this.connections = 0; // successful opens, ever
    this.closeCode = null; // the last close code
    this.subs = new Map(); // channel -> {offset, epoch, seen, waiters, pending}
    this._urlIndex = 0;
    this._ids = 1;
    this._calls = new Map(); // id -> {resolve, reject, timer}
    this._timer = null;
    this._stable = null;
    this._stopped = true;
    /** The inbox as this client has it: the last seq handed to the app, epoch, read cursor. */
    this.inbox = { seq: 0, epoch: null, read: 0 };
    this._acks = Promise.resolve();
  }

  on(name, fn) {
    const listener = (event) => {
      try {
        const result = fn(event.detail);
        if (result && typeof result.then === "function" && event.detail?.waitUntil) {
          event.detail.waitUntil(result);
        }
      } catch (err) {
        reportListenerError(err);
      }
    };
    this.addEventListener(name, listener);
    return () => this.removeEventListener(name, listener);
  }

  _emit(name, detail) {
    this.dispatchEvent(new DetailEvent(name, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    if (state === "closed") {
      // No connection is coming: nobody waits forever for a first subscribe reply.
      for (const sub of this.subs.values()) {
        for (const w of sub.waiters.splice(0)) w.reject(new HubError("disconnected", "closed"));
      }
    }
    this._emit("state", { state, ...extra });
  }

  /** Start connecting (and keep reconnecting). */
  connect() {
    this._stopped = false;
    if (!this.ws && this._timer === null && this.state !== "connecting") this._open();
    return this;
  }

  /** Close for good: no reconnect until connect() is called again. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    this._timer = null;
    if (this.ws) this.ws.close(1000, "client closing");
    else this._setState("closed", { code: 1000, reason: "client closing" });
  }

  async _open() {
    this._setState("connecting");
    let token = this.options.token;
    if (this.options.getToken) {
      try {
        token = await this.options.getToken();
      } catch (err) {
        this._scheduleReconnect(1006, "getToken failed: " + err);
        return;
      }
    }
    if (this._stopped) {
      this._setState("closed", { code: 1000, reason: "client closing" });
      return;
    }
    const url = resolveUrl(this.urls[this._urlIndex % this.urls.length]);
    if (token) url.searchParams.set("token", token);
    else if (this.options.user) url.searchParams.set("user", this.options.user);
    this.attempts += 1;
    let ws;
    try {
      ws = new this._WebSocket(url.href, "hub.v1.json");
    } catch (err) {
      this._scheduleReconnect(1006, String(err));
      return;
    }
    this.ws = ws;
    this.url = url.href;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    // The close event that follows says what happened; the ws package would otherwise throw an
    // unhandled "error" (a refused connection) out of the process.
    ws.onerror = () => {};
  }

  _onOpen(ws) {
    if (ws !== this.ws) return;
    this.connections += 1;
    this._stable = setTimeout(() => (this.attempts = 0), this.options.stableAfter);
    this._setState("connected");
    for (const [channel, sub] of this.subs) if (!sub.server) this._sendSubscribe(channel);
    if (this.options.inbox) this._openInbox(ws);
  }

  _onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.closeCode = code;
    clearTimeout(this._stable);
    for (const [id, call] of this._calls) {
      clearTimeout(call.timer);
      call.reject(new HubError("disconnected", "connection closed before the reply"));
      this._calls.delete(id);
    }
    for (const sub of this.subs.values()) sub.pending = sub.active = false;
    if (this._stopped || !mayReconnect(code)) {
      this._stopped = true;
      this._setState("closed", { code, reason });
      return;
    }
    this._urlIndex += 1; // the next url of the list, if there are several
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    // Exponential backoff with jitter: half fixed, half random, so that clients dropped
    // together (a hub restart) do not all come back in the same instant.
    const base = Math.min(
      this.options.maxDelay,
      this.options.minDelay * 2 ** Math.min(this.attempts, 16),
    );
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    this._setState("disconnected", { code, reason, delay });
    this._timer = setTimeout(() => {
      this._timer = null;
      if (!this._stopped) this._open();
    }, delay);
  }

  // -- commands ----------------------------------------------------------------------------

  /** Send a command; resolves with its result, rejects with a HubError. */
  call(op, fields = {}, timeout = this.options.timeout) {
    return new Promise((resolve, reject) => {
      const ws = this.ws;
      if (!ws || ws.readyState !== OPEN) {
        reject(new HubError("disconnected", "not connected"));
        return;
      }
      const id = this._ids++;
      const timer = setTimeout(() => {
        this._calls.delete(id);
        reject(new HubError("timeout", `no reply to ${op} within ${timeout} ms`));
      }, timeout);
      this._calls.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ op, ...fields, id }));
    });
  }

  /** Publish to a channel whose namespace allows client publishing. */
  publish(channel, data) {
    return this.call("publish", { channel, data });
  }

  /**
   * Subscribe to a channel, now or as soon as connected, and again after every reconnect (with
   * `since` on history channels, so nothing is lost). Resolves with the first reply's result.
   */
  subscribe(channel, options = {}) {
    let sub = this.subs.get(channel);
    if (sub && sub.active) return Promise.resolve({ offset: sub.offset, epoch: sub.epoch });
    if (!sub) {
      sub = this._newSub();
      this.subs.set(channel, sub);
    }
    // async (channel) => a subscription token (docs/protocol.md, Tokens), asked before every
    // subscribe and on the hub's refresh push for the channel.
    if (options.getToken) sub.getToken = options.getToken;
    const done = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
    if (this.state === "connected") this._sendSubscribe(channel);
    return done;
  }

  /** Stop receiving a channel (and stop resubscribing it). */
  async unsubscribe(channel) {
    const sub = this.subs.get(channel);
    if (!sub) return {};
    this.subs.delete(channel);
    for (const w of sub.waiters) w.reject(new HubError("unsubscribed", "unsubscribed"));
    if (this.state !== "connected") return {};
    try {
      return await this.call("unsubscribe", { channel });
    } catch (err) {
      if (err.code === 109) return {}; // not subscribed (e.g. the subscribe was still pending)
      throw err;
    }
  }

  /** Where a channel stands: {offset, epoch} of the last publication seen (history channels). */
  position(channel) {
    const sub = this.subs.get(channel);
    return sub ? { offset: sub.offset, epoch: sub.epoch } : null;
  }

  _newSub() {
    return { offset: null, epoch: null, seen: null, waiters: [], pending: false, active: false };
  }

  async _sendSubscribe(channel) {
    const sub = this.subs.get(channel);
    if (!sub || sub.pending || sub.active || this.state !== "connected") return;
    sub.pending = true;
    const fields = { channel };
    const since = sub.offset !== null && sub.epoch !== null;
    if (since) fields.since = { offset: sub.offset, epoch: sub.epoch };
    let result;
    try {
      if (sub.getToken) fields.token = await sub.getToken(channel);
      result = await this.call("subscribe", fields);
    } catch (err) {
      if (this.subs.get(channel) !== sub) return;
      sub.pending = false;
      if (err.code === "disconnected" || err.code === "timeout") {
        if (err.code === "timeout" && this.ws) this.ws.close(4000, "subscribe timed out");
        return; // tried again after the reconnect
      }
      if (err.code === 105) result = {}; // already subscribed on this connection: fine
      else if (err.code === 111 || err.code === 100) {
        // The hub cannot reach its broker (or failed): try again later, the subscription stays.
        sub.retries = (sub.retries || 0) + 1;
        const base = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** sub.retries);
        setTimeout(() => this._sendSubscribe(channel), base / 2 + (Math.random() * base) / 2);
        this._emit("error", { channel, error: err, retrying: true });
        return;
      } else {
        this.subs.delete(channel);
        for (const w of sub.waiters.splice(0)) w.reject(err);
        this._emit("error", { channel, error: err, retrying: false });
        return;
      }
    }
    if (this.subs.get(channel) !== sub) return;
    sub.pending = false;
    sub.active = true;
    sub.retries = 0;
    if (result && typeof result.offset === "number") {
      if (since && result.recovered === false) {
        this._emit("reload", { channel, reason: "history lost" });
        sub.offset = result.offset;
        sub.epoch = result.epoch;
        sub.seen = null;
      } else if (!since) {
        // A first subscribe: continue from the top (pushes that came first may be past it).
        if (sub.offset === null || sub.offset < result.offset) sub.offset = result.offset;
        sub.epoch = result.epoch;
      }
      // recovered: the missed publications follow as pushes and move the offset forward.
    }
    for (const w of sub.waiters.splice(0)) w.resolve(result);
  }

  // -- inbound -----------------------------------------------------------------------------

  _onMessage(ws, raw) {
    if (ws !== this.ws) return;
    if (typeof raw !== "string") {
      // msgpack-encoded push of data JSON cannot carry (docs/protocol.md): decode it.
      try {
        raw = decodeMsgpack(new Uint8Array(raw));
      } catch (err) {
        this._emit("error", { channel: null, error: err, retrying: false });
        return;
      }
    } else {
      try {
        raw = JSON.parse(raw);
      } catch (err) {
        this._emit("error", { channel: null, error: err, retrying: false });
        return;
      }
    }
    const msg = raw;
    if (msg === null || typeof msg !== "object") return;
    if ("id" in msg && ("result" in msg || "error" in msg)) {
      const call = this._calls.get(msg.id);
      if (!call) return;
      this._calls.delete(msg.id);
      clearTimeout(call.timer);
      if (msg.error) call.reject(new HubError(msg.error.code, msg.error.message));
      else call.resolve(msg.result);
      return;
    }
    const channel = msg.channel;
    if (channel === undefined && msg.inbox && typeof msg.inbox === "object") {
      this._onInbox(msg);
      return;
    }
    if (channel === undefined) {
      if (msg.refresh) this._refresh(null, this.options.getToken);
      else this._emit("message", { channel: null, data: msg.data, push: msg });
      return;
    }
    if (msg.subscribed && msg.subscribed.server) {
      // Subscribed by the server (token claim or connect proxy): it does so again on every
      // connect, so this client never sends a subscribe for it.
      const sub = this.subs.get(channel) ?? this._newSub();
      sub.server = sub.active = true;
      this.subs.set(channel, sub);
      return;
    }
    const sub = this.subs.get(channel);
    if (!sub) return; // unsubscribed meanwhile
    if (msg.refresh) {
      this._refresh(channel, sub.getToken);
      return;
    }
    if (msg.unsubscribed) {
      // Its subscription token ran out unrenewed: the hub ended it.
      this.subs.delete(channel);
      const error = new HubError("unsubscribed", String(msg.unsubscribed.reason));
      this._emit("error", { channel, error, retrying: false });
      return;
    }
    if (msg.gap) {
      this._onGap(channel, sub);
      return;
    }
    if (typeof msg.offset === "number") {
      if (sub.epoch !== null && msg.epoch !== sub.epoch) {
        sub.seen = null; // a new stream: offsets start over
      } else if (sub.seen !== null && msg.offset <= sub.seen) {
        return; // a duplicate of a publication already delivered
      }
      sub.seen = msg.offset;
      sub.offset = msg.offset;
      sub.epoch = msg.epoch;
    }
    this._emit("message", {
      channel,
      data: msg.data,
      offset: msg.offset,
      epoch: msg.epoch,
      push: msg,
    });
  }

  // -- inbox (docs/inbox.md) -----------------------------------------------------------------

  /** Move the user's read cursor (never back); every connection of the user gets "read". */
  markRead(seq) {
    return this.call("read", { seq });
  }

  async _openInbox(ws) {
    const fields = {};
    if (this.inbox.epoch !== null) {
      Object.assign(fields, { since: this.inbox.seq, epoch: this.inbox.epoch });
    }
    if (this.options.device) fields.device = this.options.device;
    try {
      const result = await this.call("inbox", fields);
      if (result.reset || (this.inbox.epoch !== null && result.epoch !== this.inbox.epoch)) {
        this._resetInbox(result.epoch);
      }
      this.inbox.epoch = result.epoch || this.inbox.epoch;
      this.inbox.read = result.read;
    } catch (err) {
      if (err.code === 111 && ws === this.ws) {
        setTimeout(() => ws === this.ws && this._openInbox(ws), this.options.minDelay);
      } else if (err.code !== "disconnected") {
        this._emit("error", { channel: null, error: err, retrying: false });
      }
    }
  }

  _resetInbox(epoch) {
    this.inbox.seq = 0;
    this.inbox.epoch = epoch;
    this._emit("reset", { epoch });
  }

  _onInbox(msg) {
    const mark = msg.inbox;
    if (mark.reset) {
      this._resetInbox(mark.epoch);
      return;
    }
    if (typeof mark.read === "number") {
      this.inbox.read = mark.read;
      this._emit("read", { read: mark.read, epoch: mark.epoch });
      return;
    }
    if (typeof mark.seq !== "number") return;
    if (this.inbox.epoch !== null && mark.epoch !== this.inbox.epoch) this._resetInbox(mark.epoch);
    if (mark.seq <= this.inbox.seq) return; // delivered already (at least once: a duplicate)
    this.inbox.seq = mark.seq;
    this.inbox.epoch = mark.epoch;
    const pending = [];
    const waitUntil = (promise) => pending.push(promise);
    const seq = mark.seq;
    const epoch = mark.epoch;
    this._emit("notification", { seq, id: mark.id, data: msg.data, epoch, push: msg, waitUntil });
    // Acknowledged in order, each once its listeners are done (cumulative: a later ack covers
    // an earlier one lost with a connection).
    this._acks = this._acks
      .then(() => Promise.allSettled(pending))
      .then(() => this.call("ack", { seq }))
      .catch(() => {});
  }

  async _refresh(channel, getToken) {
    // The token runs out soon: send a fresh one. Without getToken, or if it fails, the hub
    // closes with 4002 (ends the subscription) at expiry, and the reconnect asks again.
    if (!getToken) return;
    try {
      const token = await getToken(channel ?? undefined);
      await this.call("refresh", channel === null ? { token } : { channel, token });
    } catch (err) {
      this._emit("error", { channel, error: err, retrying: false });
    }
  }

  async _onGap(channel, sub) {
    const recovering = sub.offset !== null && sub.epoch !== null;
    this._emit("gap", { channel, recovering });
    if (!recovering || sub.pending) return;
    // Resubscribe from where we are: the hub replays what we missed from history.
    sub.pending = true;
    sub.active = false;
    try {
      await this.call("unsubscribe", { channel });
    } catch (err) {
      if (err.code !== 109) {
        sub.pending = false;
        return; // disconnected: the reconnect resubscribes with since anyway
      }
    }
    sub.pending = false;
    if (this.subs.get(channel) === sub) this._sendSubscribe(channel);
  }
}

// -- a small msgpack decoder (pushes whose data JSON cannot carry) ----------------------------

function decodeMsgpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const text = new TextDecoder();
  let pos = 0;
  const u8 = () => view.getUint8(pos++);
  const take = (n) => {
    const out = bytes.subarray(pos, pos + n);
    if (out.length !== n) throw new Error("msgpack: truncated");
    pos += n;
    return out;
  };
  const num = (kind, n) => {
    const v = view[kind](pos);
    pos += n;
    return v;
  };
  const u64 = (signed) => {
    const hi = signed ? view.getInt32(pos) : view.getUint32(pos);
    const lo = view.getUint32(pos + 4);
    pos += 8;
    return hi * 4294967296 + lo;
  };
  const arr = (n) => Array.from({ length: n }, () => value());
  const map = (n) => {
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = value();
      out[String(k)] = value();
    }
    return out;
  };
  const ext = (n) => {
    const type = view.getInt8(pos++);
    return { extType: type, data: take(n) };
  };
  function value() {
    const b = u8();
    if (b <= 0x7f) return b;
    if (b <= 0x8f) return map(b & 0x0f);
    if (b <= 0x9f) return arr(b & 0x0f);
    if (b <= 0xbf) return text.decode(take(b & 0x1f));
    if (b >= 0xe0) return b - 256;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return take(u8());
      case 0xc5: return take(num("getUint16", 2));
      case 0xc6: return take(num("getUint32", 4));
      case 0xc7: return ext(u8());
      case 0xc8: return ext(num("getUint16", 2));
      case 0xc9: return ext(num("getUint32", 4));
      case 0xca: return num("getFloat32", 4);
      case 0xcb: return num("getFloat64", 8);
      case 0xcc: return u8();
      case 0xcd: return num("getUint16", 2);
      case 0xce: return num("getUint32", 4);
      case 0xcf: return u64(false);
      case 0xd0: return num("getInt8", 1);
      case 0xd1: return num("getInt16", 2);
      case 0xd2: return num("getInt32", 4);
      case 0xd3: return u64(true);
      case 0xd4: return ext(1);
      case 0xd5: return ext(2);
      case 0xd6: return ext(4);
      case 0xd7: return ext(8);
      case 0xd8: return ext(16);
      case 0xd9: return text.decode(take(u8()));
      case 0xda: return text.decode(take(num("getUint16", 2)));
      case 0xdb: return text.decode(take(num("getUint32", 4)));
      case 0xdc: return arr(num("getUint16", 2));
      case 0xdd: return arr(num("getUint32", 4));
      case 0xde: return map(num("getUint16", 2));
      case 0xdf: return map(num("getUint32", 4));
      default: throw new Error("msgpack: bad byte 0x" + b.toString(16));
    }
  }
  const out = value();
  if (pos !== bytes.length) throw new Error("msgpack: trailing bytes");
  return out;
}
