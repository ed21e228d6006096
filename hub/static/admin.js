// The hub's admin page. Polls /admin/api/overview once a second with the API key (kept in this
// tab's sessionStorage only) and charts deliveries/s, connections and the mean fan-out latency
// from each process's own totals. Publish and disconnect go through the HTTP API with the same key.
//
// Every name on this page (users, channels, processes) may come from a user or from Redis, so it
// is set as text (textContent), never parsed as HTML.

const POLL_MS = 1000;
const POINTS = 120;
const STORE = "hub-admin-key";

const $ = (id) => document.getElementById(id);
const series = { rate: [], connections: [], latency: [] };
const previous = new Map(); // process id -> {time, delivered, fanout_count, fanout_sum}
let key = sessionStorage.getItem(STORE);
let timer = null;
let shownUser = null;
window.hubAdmin = { series }; // for the console (and the browser tests)

class Refused extends Error {}

async function call(path, init = {}) {
  const headers = { "X-API-Key": key || "", ...(init.headers || {}) };
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const message = body?.error?.message || `http ${response.status}`;
  if (response.status === 401 || response.status === 403) throw new Refused(message);
  if (!response.ok) throw new Error(message);
  return body.result;
}

function post(path, body) {
  return call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function refused(message) {
  clearInterval(timer);
  timer = null;
  key = null;
  sessionStorage.removeItem(STORE);
  $("main").hidden = true;
  $("login").hidden = false;
  $("status").textContent = "locked";
  $("login-error").textContent = `refused: ${message}`;
}

function failed(error, where) {
  if (error instanceof Refused) refused(error.message);
  else where.textContent = `error: ${error.message}`;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = String(text);
  if (className) td.className = className;
  return td;
}

function fill(table, rows, columns) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const column of columns) column(row, item);
  }
}

function push(list, value) {
  list.push(value);
  if (list.length > POINTS) list.shift();
}

function draw(canvas, values, digits) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(...values, 1e-9);
  ctx.fillStyle = "#555";
  ctx.font = "12px sans-serif";
  ctx.fillText(`max ${top.toFixed(digits)}`, 4, 14);
  ctx.strokeStyle = "#1565c0";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((value, i) => {
    const x = (i / (POINTS - 1)) * width;
    const y = height - 4 - (value / top) * (height - 24);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  canvas.dataset.last = String(values.length ? values[values.length - 1] : 0);
  canvas.dataset.points = String(values.length);
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// Rates per process, from its own consecutive reports (a process that appears or goes away
// changes the totals, never the rates of the others).
function rates(processes) {
  let delivered = 0;
  let fanoutCount = 0;
  let fanoutSum = 0;
  const seen = new Set();
  for (const p of processes) {
    seen.add(p.id);
    let before = previous.get(p.id);
    if (!before) {
      before = { ...p, rate: 0, count: 0, sum: 0 };
      previous.set(p.id, before);
    } else if (p.time > before.time) {
      // A new report: this process's figures over the time since its last one.
      before = {
        ...p,
        rate: Math.max(0, p.delivered - before.delivered) / (p.time - before.time),
        count: Math.max(0, p.fanout_count - before.fanout_count),
        sum: Math.max(0, p.fanout_sum - before.fanout_sum),
      };
      previous.set(p.id, before);
    } // else: no report since the last poll (a heartbeat is due): its last figures stand
    delivered += before.rate;
    fanoutCount += before.count;
    fanoutSum += before.sum;
  }
  for (const id of previous.keys()) if (!seen.has(id)) previous.delete(id);
  return { delivered, latency: fanoutCount ? (fanoutSum / fanoutCount) * 1000 : 0 };
}

function render(overview) {
  const processes = overview.processes;
  const sum = (field) => processes.reduce((total, p) => total + p[field], 0);
  $("total-processes").textContent = String(processes.length);
  for (const field of ["connections", "subscriptions", "channels", "users"]) {
    $(`total-${field}`).textContent = String(sum(field));
  }
  const now = rates(processes);
  push(series.rate, now.delivered);
  push(series.connections, sum("connections"));
  push(series.latency, now.latency);
  $("now-rate").textContent = now.delivered.toFixed(1);
  $("now-connections").textContent = String(sum("connections"));
  $("now-latency").textContent = now.latency.toFixed(3);
  draw($("chart-rate"), series.rate, 1);
  draw($("chart-connections"), series.connections, 0);
  draw($("chart-latency"), series.latency, 3);

  fill($("processes"), processes, [
    (row, p) => cell(row, p.self ? `${p.id} (this page)` : p.id),
    (row, p) => cell(row, p.pid),
    (row, p) => cell(row, p.version),
    (row, p) => cell(row, p.redis, p.redis === "down" ? "down" : ""),
    (row, p) => cell(row, p.ready ? "yes" : "no", p.ready ? "" : "down"),
    (row, p) => cell(row, p.reconnects),
    (row, p) => cell(row, p.connections),
    (row, p) => cell(row, p.channels),
    (row, p) => cell(row, p.delivered),
    (row, p) => cell(row, ago(overview.time - p.started)),
    (row, p) => cell(row, p.self ? "now" : `${p.age} s ago`),
  ]);
  fill($("top"), overview.top, [
    (row, [channel]) => cell(row, channel),
    (row, [, count]) => cell(row, count),
  ]);
}

async function poll() {
  try {
    render(await call("/admin/api/overview"));
    $("status").textContent = `live, ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    failed(error, $("status"));
  }
}

function open() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("login-error").textContent = "";
  poll();
  timer = setInterval(poll, POLL_MS);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value;
  $("key").value = "";
  sessionStorage.setItem(STORE, key);
  open();
});

$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = $("user").value;
  const out = $("user-result");
  out.textContent = "searching...";
  try {
    const result = await call(`/admin/api/user?user=${encodeURIComponent(user)}`);
    shownUser = result.user;
    fill($("connections"), result.connections, [
      (row, c) => cell(row, c.process),
      (row, c) => cell(row, c.client),
      (row, c) => cell(row, c.address),
      (row, c) => cell(row, c.protocol),
      (row, c) => cell(row, c.channels.join(", ")),
    ]);
    const n = result.connections.length;
    const partial = result.everywhere ? "" : " on this process (the others cannot be asked)";
    out.textContent = `${result.user}: ${n} connection${n === 1 ? "" : "s"}${partial}`;
    $("disconnect").disabled = n === 0;
  } catch (error) {
    failed(error, out);
  }
});

$("disconnect").addEventListener("click", async () => {
  const out = $("user-result");
  if (shownUser === null) return;
  try {
    await post("/api/disconnect", { user: shownUser });
    out.textContent = `${shownUser}: disconnected`;
    $("disconnect").disabled = true;
  } catch (error) {
    failed(error, out);
  }
});

$("publish").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("publish-result");
  let data = $("data").value;
  try {
    data = JSON.parse(data);
  } catch {
    // not JSON: published as a string, as `hub publish` does
  }
  try {
    const result = await post("/api/publish", { channel: $("channel").value, data });
    out.textContent = `published ${JSON.stringify(result)}`;
  } catch (error) {
    failed(error, out);
  }
});

if (key) open();
