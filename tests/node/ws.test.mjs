// hub.js in Node with the ws package, against a real hub serve (tests/test_node.py).
import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Hub, HubError, mayReconnect } from "@hub/client";
import { WebSocket } from "ws";

import { FAST, WS_URL, api, record, sleep, until } from "./helpers.mjs";

const open = [];
after(() => open.forEach((hub) => hub.close()));

function client(user, options = {}) {
  const hub = new Hub(WS_URL, { WebSocket, user, ...FAST, ...options });
  open.push(hub);
  return hub;
}

test("subscribe, publish and receive", async () => {
  const alice = client("alice");
  const bob = client("bob");
  const got = record(alice);
  alice.connect();
  bob.connect();
  assert.deepEqual(await alice.subscribe("chat:room"), {});
  await bob.subscribe("chat:room");
  assert.equal(alice.state, "connected");
  await bob.publish("chat:room", { text: "hi" });
  await api("/api/publish", { channel: "chat:room", data: 7 });
  await api("/api/send", { user: "alice", data: "direct" });
  await until(() => got.of("message").length === 3, "three messages");
  const messages = got.of("message").map((m) => [m.channel, m.data]);
  assert.deepEqual(messages, [
    ["chat:room", { text: "hi" }],
    ["chat:room", 7],
    [null, "direct"],
  ]);
  await assert.rejects(alice.publish("news", 1), (err) => err instanceof HubError && err.code === 103);
  await assert.rejects(alice.call("nonsense"), (err) => err.code === 104);
  await assert.rejects(alice.subscribe("bad channel!"), (err) => err.code === 107);
  assert.deepEqual(await alice.unsubscribe("chat:room"), {});
  alice.close();
  await until(() => alice.state === "closed", "closed");
  await assert.rejects(alice.call("publish", {}), (err) => err.code === "disconnected");
});

test("recovery across a forced reconnect (4000) loses and repeats nothing", async () => {
  const hub = client("reader", { minDelay: 1000, maxDelay: 2000 });
  const got = record(hub);
  hub.connect();
  const reply = await hub.subscribe("feed:x");
  assert.equal(typeof reply.offset, "number");
  const publish = async (from, to) => {
    for (let seq = from; seq < to; seq++) await api("/api/publish", { channel: "feed:x", data: seq });
  };
  await publish(0, 50);
  await api("/api/disconnect", { user: "reader", code: 4000, reason: "slow" });
  await until(() => hub.state === "disconnected", "the drop");
  await publish(50, 70);
  assert.equal(hub.state, "disconnected"); // these went out while it was away
  await until(() => hub.state === "connected", "the reconnect");
  await publish(70, 100);
  await until(() => got.of("message").length >= 100, "every publication");
  await sleep(100);
  const seqs = got.of("message").map((m) => m.data);
  assert.deepEqual(seqs, Array.from({ length: 100 }, (_, i) => i));
  const offsets = got.of("message").map((m) => m.offset);
  assert.deepEqual(offsets, Array.from({ length: 100 }, (_, i) => reply.offset + 1 + i));
  const drops = got.of("state").filter((s) => s.state === "disconnected");
  assert.deepEqual(drops.map((s) => s.code), [4000]);
  assert.equal(hub.connections, 2);
  assert.deepEqual(got.of("reload"), []);
});

test("4503 stops reconnecting; connect() again renews the subscriptions", async () => {
  const hub = client("banned");
  const got = record(hub);
  hub.connect();
  await hub.subscribe("chat:a");
  await api("/api/disconnect", { user: "banned" }); // 4503 by default
  await until(() => hub.state === "closed", "the close");
  const pending = hub.subscribe("chat:b");
  await sleep(1000); // several maxDelay periods
  assert.equal(hub.connections, 1);
  assert.equal(hub.closeCode, 4503);
  assert.deepEqual(got.of("state").at(-1), { state: "closed", code: 4503, reason: "" });
  hub.connect(); // connecting again is allowed, and the subscriptions come back
  await pending;
  assert.equal(hub.connections, 2);
});

test("a refused connection retries with backoff and close() stops it", async () => {
  const hub = new Hub("ws://127.0.0.1:9/ws", { WebSocket, ...FAST });
  const got = record(hub);
  hub.connect();
  await until(() => got.of("state").filter((s) => s.state === "disconnected").length >= 3, "retries");
  const delays = got.of("state").filter((s) => s.state === "disconnected").map((s) => s.delay);
  assert.ok(delays.every((d) => d >= 25 && d <= 300), delays);
  hub.close();
  await until(() => hub.state === "closed", "closed");
  const attempts = hub.attempts;
  await sleep(500);
  assert.equal(hub.attempts, attempts);
});

test("a listener that throws does not break the client or the process", async () => {
  const hub = client("erin");
  const seen = [];
  const errors = [];
  const original = console.error;
  console.error = (...args) => errors.push(args.join(" "));
  try {
    hub.on("message", () => {
      throw new Error("listener bug");
    });
    hub.on("message", (m) => seen.push(m.data));
    hub.connect();
    await hub.subscribe("chat:throw");
    await hub.publish("chat:throw", 1);
    await hub.publish("chat:throw", 2);
    await until(() => seen.length === 2, "both messages");
  } finally {
    console.error = original;
  }
  assert.deepEqual(seen, [1, 2]);
  assert.equal(errors.length, 2);
  assert.match(errors[0], /listener bug/);
});

test("bad arguments fail at construction", () => {
  assert.throws(() => new Hub([], { WebSocket }), TypeError);
  assert.throws(() => new Hub("/ws", { WebSocket }), /not an absolute url/); // no page in Node
  assert.throws(() => new Hub("ftp://x/ws", { WebSocket }), /not a ws/);
  assert.equal(mayReconnect(4000), true);
  assert.equal(mayReconnect(4500), false);
});

test("inbox: what came while offline, then live, once each, acknowledged after the handler", async () => {
  const user = "inboxed";
  for (let n = 0; n < 30; n++) await api("/api/notify", { user, data: { n } });
  const hub = client(user, { inbox: true, device: "laptop", minDelay: 100, maxDelay: 200 });
  const got = [];
  let slow = 0;
  hub.on("notification", async ({ seq, data }) => {
    got.push([seq, data.n]);
    if (seq === 31) {
      await sleep(200); // its ack waits for this
      slow = seq;
    }
  });
  const reads = record(hub);
  hub.connect();
  await until(() => got.length === 30, "the 30 stored");
  await api("/api/notify", { user, data: { n: 30 } });
  await until(() => got.length === 31, "a live one");
  // A forced reconnect: the client asks for what came after its last seq, and gets no repeat.
  await api("/api/disconnect", { user, code: 4000, reason: "again" });
  await until(() => hub.state === "disconnected", "the drop");
  for (let n = 31; n < 40; n++) await api("/api/notify", { user, data: { n } });
  await until(() => got.length === 40, "the ones sent while away");
  assert.deepEqual(
    got.map(([seq]) => seq),
    Array.from({ length: 40 }, (_, i) => i + 1),
  );
  assert.deepEqual(
    got.map(([, n]) => n),
    Array.from({ length: 40 }, (_, i) => i),
  );
  for (let i = 0; (await api("/api/inbox", { user, device: "laptop" })).acked !== 40; i++) {
    assert.ok(i < 500, "every notification acknowledged");
    await sleep(20);
  }
  assert.equal(slow, 31);
  assert.deepEqual(await hub.markRead(40), { read: 40 });
  await until(() => reads.of("read").length === 1, "the read push");
  assert.equal(hub.inbox.read, 40);
  hub.close();
});
