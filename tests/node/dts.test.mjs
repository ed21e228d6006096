// hub.d.ts kept in step with hub.js: every export, public method, public field, option and event
// of the code is declared in the types (tsc then checks tests/node/usage.ts against them).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as hubjs from "@hub/client";

const source = readFileSync(new URL("../../hub/static/hub.js", import.meta.url), "utf8");
const dts = readFileSync(new URL("../../hub/static/hub.d.ts", import.meta.url), "utf8");

/** The body of `export class <name> ... {` ... the matching `}` in the declarations. */
function classBody(name) {
  const start = dts.search(new RegExp(`export class ${name}\\b[^{]*\\{`));
  assert.ok(start >= 0, `hub.d.ts declares no class ${name}`);
  let depth = 0;
  for (let i = dts.indexOf("{", start); i < dts.length; i++) {
    if (dts[i] === "{") depth++;
    if (dts[i] === "}" && --depth === 0) return dts.slice(start, i);
  }
  throw new Error(`unbalanced class ${name}`);
}

function interfaceBody(name) {
  const match = dts.match(new RegExp(`export interface ${name}\\b[^{]*\\{([^}]*)\\}`));
  assert.ok(match, `hub.d.ts declares no interface ${name}`);
  return match[1];
}

test("every export of hub.js is declared", () => {
  const exported = Object.keys(hubjs).sort();
  assert.deepEqual(exported, ["Hub", "HubError", "mayReconnect"]);
  for (const name of exported) {
    assert.match(dts, new RegExp(`export (declare )?(function|class|const) ${name}\\b`), name);
  }
});

test("every public method and field of Hub is declared", () => {
  const body = classBody("Hub");
  const methods = Object.getOwnPropertyNames(hubjs.Hub.prototype).filter(
    (name) => name !== "constructor" && !name.startsWith("_"),
  );
  assert.ok(methods.length >= 8, methods);
  for (const name of methods) assert.match(body, new RegExp(`\\n\\s+${name}(<[^>]*>)?\\(`), name);
  const hub = new hubjs.Hub("ws://127.0.0.1:1/ws", { WebSocket: class {} });
  const fields = Object.keys(hub).filter((name) => !name.startsWith("_"));
  assert.ok(fields.length >= 8, fields);
  for (const name of fields) assert.match(body, new RegExp(`readonly ${name}\\??:`), name);
});

test("every option is declared", () => {
  const body = interfaceBody("HubOptions");
  const hub = new hubjs.Hub("ws://127.0.0.1:1/ws", { WebSocket: class {} });
  const options = Object.keys(hub.options);
  assert.ok(options.length >= 8, options);
  for (const name of options) assert.match(body, new RegExp(`\\n\\s+${name}\\?:`), name);
});

test("every event and its detail fields are declared", () => {
  const events = [...source.matchAll(/this\._emit\("(\w+)", \{([^}]*)\}/g)];
  const names = [...new Set(events.map((m) => m[1]))].sort();
  assert.deepEqual(names, [
    "error",
    "gap",
    "message",
    "notification",
    "read",
    "reload",
    "reset",
    "state",
  ]);
  const map = interfaceBody("HubEventMap");
  for (const name of names) assert.match(map, new RegExp(`\\n\\s+${name}:`), name);
  const detailType = {
    error: "ErrorEvent",
    gap: "GapEvent",
    message: "MessageEvent",
    reload: "ReloadEvent",
    state: "StateEvent",
    notification: "NotificationEvent",
    read: "ReadEvent",
    reset: "ResetEvent",
  };
  for (const [, name, fields] of events) {
    const body = interfaceBody(detailType[name]);
    const keys = fields.split(",").map((f) => f.split(":")[0].trim());
    for (const field of keys.filter((f) => f && !f.startsWith("..."))) {
      assert.match(body, new RegExp(`\\n\\s+${field}\\??:`), `${name}.${field}`);
    }
  }
  const states = [...source.matchAll(/_setState\("(\w+)"/g)].map((m) => m[1]);
  for (const state of new Set(states)) assert.match(dts, new RegExp(`"${state}"`), state);
});

test("HubError carries its code", () => {
  const err = new hubjs.HubError(103, "no");
  assert.ok(err instanceof Error);
  assert.equal(err.name, "HubError");
  assert.equal(err.code, 103);
  assert.match(classBody("HubError"), /readonly code: HubErrorCode/);
});
