// Shared by the Node tests of hub.js: where the hub under test is (set by tests/test_node.py),
// its HTTP API, and bounded waits.
import assert from "node:assert/strict";

export const WS_URL = process.env.HUB_WS_URL;
export const HTTP_URL = process.env.HUB_HTTP_URL;
assert.ok(WS_URL && HTTP_URL, "run through tests/test_node.py: HUB_WS_URL / HUB_HTTP_URL unset");

/** Reconnect fast in tests. */
export const FAST = { minDelay: 50, maxDelay: 300 };

/** POST to the hub's HTTP API (dev mode: no key); the parsed answer, failing on an error status. */
export async function api(path, body) {
  const response = await fetch(HTTP_URL + path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  assert.equal(response.status, 200, JSON.stringify(answer));
  return answer.result;
}

/** Poll until predicate() is true; fail naming `what` after `ms`. */
export async function until(predicate, what, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Every event of a hub.js client, in order. */
export function record(hub) {
  const events = [];
  for (const name of ["state", "message", "gap", "reload", "error", "notification", "read", "reset"]) {
    hub.on(name, (detail) => events.push([name, detail]));
  }
  return {
    events,
    of: (name) => events.filter(([n]) => n === name).map(([, d]) => d),
  };
}
