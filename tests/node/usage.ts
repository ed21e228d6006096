// Type-checked by tests/test_node.py (tsc --noEmit, strict): how an app uses hub.js with ws,
// through the package's own "exports" and "types". Never run.
import { Hub, HubError, mayReconnect, type HubEventMap, type MessageEvent } from "@hub/client";
import { WebSocket } from "ws";

const hub = new Hub(["wss://a.example/ws", "wss://b.example/ws"], {
  WebSocket,
  getToken: async () => "jwt",
  minDelay: 250,
});
const off: () => void = hub.on("message", (m: MessageEvent) => {
  const channel: string | null = m.channel;
  const offset: number | undefined = m.offset;
  console.log(channel, offset, m.data, m.push.ts);
});
hub.on("state", ({ state, code, delay }) => console.log(state.toUpperCase(), code, delay));
hub.on("gap", ({ channel, recovering }) => console.log(channel.length, recovering === true));
hub.on("reload", ({ channel, reason }) => console.log(channel, reason));
hub.on("error", ({ error, retrying }) => console.log(error instanceof HubError, retrying));
off();
const inboxed = new Hub("wss://a.example/ws", { WebSocket, inbox: true, device: "phone" });
inboxed.on("notification", async ({ seq, id, data, waitUntil }) => {
  waitUntil(Promise.resolve(seq + 1));
  console.log(id?.length, data, inboxed.inbox.seq, inboxed.inbox.epoch?.length);
});
inboxed.on("read", ({ read }) => console.log(read + 1));
inboxed.on("reset", ({ epoch }) => console.log(epoch.length));

async function main(): Promise<void> {
  hub.connect().connect();
  const { offset, epoch, recovered } = await hub.subscribe("news");
  console.log(offset?.toFixed(), epoch?.length, recovered);
  await hub.publish("chat:lobby", { text: "hi" });
  const stats = await hub.call<{ num_clients: number }>("presence_stats", { channel: "chat:x" });
  console.log(stats.num_clients + 1, hub.position("news")?.offset, hub.state === "closed");
  try {
    await hub.unsubscribe("news");
  } catch (err) {
    if (err instanceof HubError && err.code === "timeout") console.log(mayReconnect(4000));
  }
  const { read } = await inboxed.markRead(3);
  console.log(read + 1);
  hub.close();
}

type Events = keyof HubEventMap;
const names: Events[] = ["state", "message", "gap", "reload", "error", "notification", "reset"];
console.log(names, main);
