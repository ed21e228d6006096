// hub.js with the runtime's own global WebSocket (Node 22+, or Node 20 with
// --experimental-websocket, which tests/test_node.py passes): no option needed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Hub } from "@hub/client";

import { FAST, WS_URL, api, record, until } from "./helpers.mjs";

test("the global WebSocket is used when no WebSocket option is given", async () => {
  assert.equal(typeof globalThis.WebSocket, "function", "this runtime has no global WebSocket");
  const hub = new Hub(WS_URL, { user: "native", ...FAST });
  const got = record(hub);
  hub.connect();
  try {
    await hub.subscribe("chat:native");
    await api("/api/publish", { channel: "chat:native", data: { n: 1 } });
    await until(() => got.of("message").length === 1, "the publication");
    assert.deepEqual(got.of("message")[0].data, { n: 1 });
    assert.ok(hub.ws instanceof globalThis.WebSocket);
  } finally {
    hub.close();
  }
});
