// sunotrack operator dashboard: plain JS, no build step. Every figure comes from the API under
// /api/v1 with the bearer token kept in sessionStorage (never in a URL).
"use strict";

const API = "/api/v1";
const STATUSES = ["submitted", "queued", "in_progress", "complete", "failed", "timed_out", "cancelled"];
const TOKEN_KEY = "sunotrack.token";
const PAGE = 25;

const state = { cursors: [null], page: 0, filters: {}, rows: new Map(), stream: null, lastEventId: null };

// --- helpers -----------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    // Through the CSSOM: the page's CSP allows no inline style attribute.
    else if (k === "style") for (const [prop, value] of Object.entries(v)) el.style.setProperty(prop, value);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const svg = (tag, attrs) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};
const $ = (sel) => document.querySelector(sel);
const token = () => sessionStorage.getItem(TOKEN_KEY);
const chip = (status, extra) => h("span", { class: `chip ${status}`, "data-status": status }, (status || "—").replace("_", " "), extra);

function ago(iso) {
  if (!iso) return "—";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return new Date(iso).toISOString().slice(0, 16).replace("T", " ");
}
function secs(v) {
  if (v === null || v === undefined) return "—";
  if (v < 90) return `${v.toFixed(v < 10 ? 1 : 0)} s`;
  if (v < 5400) return `${(v / 60).toFixed(1)} min`;
  return `${(v / 3600).toFixed(1)} h`;
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  if (response.status === 401) {
    signOut("That token was refused (401).");
    throw new ApiError("unauthorised");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError(body?.detail || `HTTP ${response.status}`);
  return body;
}

// --- sign-in -------------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.stream) state.stream.abort();
  $("#app").hidden = true;
  $("#signout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await api("/stats");
  } catch (e) {
    if (!(e instanceof ApiError) || e.message !== "unauthorised") $("#login-error").textContent = e.message;
    return;
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#signout").hidden = false;
  start();
}

// --- header: stats and charts --------------------------------------------------------------------------

function card(label, value, sub, testid) {
  return h("div", { class: "card", "data-testid": testid }, h("div", { class: "l" }, label), h("div", { class: "v" }, value), sub ? h("div", { class: "s" }, sub) : null);
}

async function loadStats() {
  const s = await api("/stats");
  const t = s.tasks.by_status;
  const live = t.submitted + t.queued + t.in_progress;
  const d = s.deliveries;
  const rate = d.success_rate_last_hour === null ? "—" : `${Math.round(d.success_rate_last_hour * 100)}%`;
  $("#cards").replaceChildren(
    card("live tasks", live, `${t.submitted} submitted · ${t.queued} queued · ${t.in_progress} running`, "stat-live"),
    card("complete", t.complete, `${s.finished_last_hour.complete} in the last hour`, "stat-complete"),
    card("failed / timed out", `${t.failed} / ${t.timed_out}`, `${s.finished_last_hour.failed + s.finished_last_hour.timed_out} in the last hour`, "stat-failed"),
    card("time to complete", secs(s.time_to_complete_s.p50), `p95 ${secs(s.time_to_complete_s.p95)} · last 24 h`, "stat-ttc"),
    card("webhooks", `${d.by_status.pending} pending`, `${d.by_status.dead} dead · ${d.by_status.failed} failing · ${rate} ok last hour`, "stat-webhooks"),
    card("poll lag", secs(s.poll_lag_s.p99), `p50 ${secs(s.poll_lag_s.p50)} · oldest pending hook ${ago(d.oldest_pending_at)}`, "stat-lag"),
  );
}

function barChart(el, points) {
  const W = 600, H = 130, pad = 18, max = Math.max(1, ...points.map((p) => p.count));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const bw = (W - pad) / points.length;
  points.forEach((p, i) => {
    const bh = ((H - pad) * p.count) / max;
    const bar = svg("rect", { x: pad + i * bw + 1, y: H - pad - bh, width: Math.max(1, bw - 2), height: bh, fill: "#5aa9ff", rx: 1.5 });
    bar.append(svg("title", {}));
    bar.firstChild.textContent = `${new Date(p.at).toTimeString().slice(0, 5)}: ${p.count}`;
    root.append(bar);
  });
  axis(root, W, H, pad, max, `${points.length ? new Date(points[0].at).toTimeString().slice(0, 5) : ""}`, "now");
  el.replaceChildren(root);
}

function lineChart(el, points) {
  const W = 600, H = 130, pad = 18;
  const max = Math.max(1, ...points.flatMap((p) => [p.p50 || 0, p.p95 || 0]));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const x = (i) => pad + (i * (W - pad - 4)) / Math.max(1, points.length - 1);
  const y = (v) => H - pad - ((H - pad - 4) * v) / max;
  for (const [key, colour] of [["p95", "#ffa726"], ["p50", "#5aa9ff"]]) {
    let d = "";
    points.forEach((p, i) => {
      if (p[key] === null) return;
      d += `${d ? "L" : "M"}${x(i).toFixed(1)},${y(p[key]).toFixed(1)}`;
      const dot = svg("circle", { cx: x(i), cy: y(p[key]), r: 2.5, fill: colour });
      dot.append(svg("title", {}));
      dot.firstChild.textContent = `${new Date(p.at).toTimeString().slice(0, 5)} ${key} ${secs(p[key])} (${p.count} tasks)`;
      root.append(dot);
    });
    if (d) root.prepend(svg("path", { d, fill: "none", stroke: colour, "stroke-width": 2 }));
  }
  axis(root, W, H, pad, max, "24 h ago", "now", secs);
  el.replaceChildren(root);
}

function axis(root, W, H, pad, max, left, right, fmt = (v) => v) {
  root.append(svg("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#263140" }));
  for (const [text, x, anchor] of [[left, pad, "start"], [right, W - 2, "end"]]) {
    const t = svg("text", { x, y: H - 4, fill: "#8593a3", "font-size": 10, "text-anchor": anchor });
    t.textContent = text;
    root.append(t);
  }
  const t = svg("text", { x: 0, y: 10, fill: "#8593a3", "font-size": 10 });
  t.textContent = fmt(max);
  root.append(t);
}

async function loadCharts() {
  const s = await api("/stats/series");
  barChart($("#chart-transitions"), s.transitions_per_minute);
  lineChart($("#chart-ttc"), s.time_to_complete_s);
}

let headerTimer = null;
function refreshHeaderSoon() {
  if (headerTimer) return;
  headerTimer = setTimeout(async () => {
    headerTimer = null;
    await Promise.allSettled([loadStats(), loadCharts()]);
  }, 1500);
}

// --- task list -----------------------------------------------------------------------------------------

function query(cursor) {
  const q = new URLSearchParams();
  const f = state.filters;
  for (const s of f.status || []) q.append("status", s);
  if (f.kind) q.set("kind", f.kind);
  if (f.task_id_prefix) q.set("task_id_prefix", f.task_id_prefix);
  if (f.meta_key) q.set(`metadata.${f.meta_key}`, f.meta_value || "");
  for (const k of ["created_after", "created_before"]) if (f[k]) q.set(k, new Date(f[k]).toISOString());
  q.set("limit", PAGE);
  if (cursor) q.set("cursor", cursor);
  return q.toString();
}

function taskRow(task) {
  const tr = h("tr", { "data-task-id": task.task_id, "data-status": task.status },
    h("td", { class: "mono" }, h("a", { href: `#/tasks/${encodeURIComponent(task.task_id)}` }, task.task_id)),
    h("td", {}, task.kind),
    h("td", {}, chip(task.status)),
    h("td", {}, task.progress === null ? "—" : h("div", { class: "bar", title: `${task.progress}%` }, h("span", { style: { width: `${task.progress}%` } }))),
    h("td", {}, task.clips.length),
    h("td", { class: "meta mono", title: task.metadata ? JSON.stringify(task.metadata) : "" }, task.metadata ? JSON.stringify(task.metadata) : ""),
    h("td", { title: task.updated_at }, ago(task.updated_at)),
    h("td", { title: task.created_at }, ago(task.created_at)),
  );
  return tr;
}

async function loadTasks() {
  const page = await api(`/tasks?${query(state.cursors[state.page])}`);
  state.rows = new Map(page.items.map((t) => [t.task_id, t]));
  $("#task-rows").replaceChildren(...page.items.map(taskRow));
  $("#empty").hidden = page.items.length > 0;
  state.cursors[state.page + 1] = page.next_cursor;
  $("#older").disabled = !page.next_cursor;
  $("#newer").disabled = state.page === 0;
}

function matches(task) {
  const f = state.filters;
  if (f.status?.length && !f.status.includes(task.status)) return false;
  if (f.kind && task.kind !== f.kind) return false;
  if (f.task_id_prefix && !task.task_id.startsWith(f.task_id_prefix)) return false;
  if (f.meta_key && String(task.metadata?.[f.meta_key]) !== f.meta_value) return false;
  return !f.created_after && !f.created_before;
}

async function onTaskEvent(event) {
  refreshHeaderSoon();
  if (!$("#task-view").hidden && state.openTask === event.task_id) openTask(event.task_id, true);
  if ($("#list-view").hidden) return;
  const known = state.rows.has(event.task_id);
  if (!known && (state.page !== 0 || event.seq !== 1)) return;
  let task;
  try {
    task = await api(`/tasks/${encodeURIComponent(event.task_id)}${event.client ? `?client=${encodeURIComponent(event.client)}` : ""}`);
  } catch {
    return;
  }
  const old = $(`#task-rows tr[data-task-id="${CSS.escape(event.task_id)}"]`);
  if (!matches(task)) {
    if (old) old.remove();
    return;
  }
  const row = taskRow(task);
  row.classList.add("flash");
  state.rows.set(task.task_id, task);
  if (old) old.replaceWith(row);
  else $("#task-rows").prepend(row);
  $("#empty").hidden = true;
}

// --- live stream (fetch streaming: EventSource cannot send the Authorization header) ---------------------

async function stream() {
  let backoff = 500;
  while (token()) {
    const controller = new AbortController();
    state.stream = controller;
    try {
      const headers = { Authorization: `Bearer ${token()}` };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const response = await fetch(`${API}/events/stream`, { headers, signal: controller.signal });
      if (response.status === 401) return signOut("That token was refused (401).");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setLive(true);
      backoff = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const message = parseMessage(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (message.id) state.lastEventId = message.id;
          if (message.event === "task.event" && message.data) onTaskEvent(JSON.parse(message.data));
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

function parseMessage(text) {
  const message = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    message[field] = field === "data" && message.data ? `${message.data}\n${value}` : value;
  }
  return message;
}

function setLive(on) {
  const el = $("#live");
  el.className = `live ${on ? "on" : "off"}`;
  el.textContent = on ? "live" : "reconnecting…";
}

// --- task page -----------------------------------------------------------------------------------------

async function openTask(taskId, quiet) {
  state.openTask = taskId;
  const view = $("#task-view");
  const path = `/tasks/${encodeURIComponent(taskId)}`;
  let task, events, deliveries;
  try {
    [task, events, deliveries] = await Promise.all([api(path), api(`${path}/events`), api(`${path}/deliveries`)]);
  } catch (e) {
    if (!quiet) view.replaceChildren(h("p", { class: "error" }, `Could not load ${taskId}: ${e.message}`));
    return;
  }
  if (state.openTask !== taskId) return;
  view.replaceChildren(
    h("div", { class: "task-head" },
      h("a", { href: "#/" }, "← all tasks"),
      h("h2", { class: "mono", "data-testid": "task-title" }, task.task_id),
      chip(task.status), h("span", { class: "muted" }, `${task.kind} · polled ${task.poll_count}×`)),
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h3", {}, "Task"), details(task)),
      h("div", { class: "panel" }, h("h3", {}, "Time in each status"), timeline(task.timeline || {}))),
    h("div", { class: "panel" }, h("h3", {}, `Clips (${task.clips.length})`), clips(task.clips)),
    h("div", { class: "panel" }, h("h3", {}, `Events (${events.items.length})`), eventTable(events.items)),
    h("div", { class: "panel" }, h("h3", {}, `Webhook deliveries (${deliveries.items.length})`), deliveryTable(task, deliveries.items)),
  );
}

function details(task) {
  const rows = [
    ["upstream status", task.upstream_status], ["progress", task.progress === null ? "—" : `${task.progress}%`],
    ["fail reason", task.fail_reason], ["notify hook", task.notify_hook ? `${task.notify_hook} (${task.notify_hook_source}, ${task.notify_format})` : null],
    ["metadata", task.metadata ? JSON.stringify(task.metadata) : null], ["created", task.created_at],
    ["updated", task.updated_at], ["finished", task.finished_at], ["last polled", task.last_polled_at],
    ["next poll", task.next_poll_at], ["last error", task.last_error],
  ];
  return h("dl", { class: "kv" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: k === "metadata" ? "mono" : "" }, v ?? "—")]));
}

function timeline(spans) {
  const entries = STATUSES.filter((s) => s in spans).map((s) => [s, spans[s]]);
  const total = entries.reduce((a, [, v]) => a + v, 0) || 1;
  return h("div", { "data-testid": "timeline" },
    h("div", { class: "timeline" }, entries.map(([s, v]) => h("div", { style: { width: `${(100 * v) / total}%`, background: `var(--${s})` }, title: `${s}: ${secs(v)}` }))),
    h("div", { class: "legend" }, entries.map(([s, v]) => h("span", {}, chip(s), " ", secs(v)))));
}

function clips(items) {
  if (!items.length) return h("p", { class: "muted" }, "No clips yet.");
  return h("div", { class: "clips" }, items.map((c) => h("div", { class: "clip", "data-testid": "clip" },
    h("div", {}, chip(c.status), " ", h("strong", {}, c.title || c.id)),
    c.image_url ? h("img", { src: c.image_url, alt: `cover of ${c.title || c.id}`, loading: "lazy" }) : null,
    c.audio_url ? h("audio", { controls: true, preload: "none", src: c.audio_url }) : null,
    h("div", { class: "muted mono" }, c.id, c.duration ? ` · ${secs(c.duration)}` : ""),
    c.error ? h("div", { class: "error" }, c.error) : null)));
}

function eventTable(items) {
  return h("table", { "data-testid": "events" },
    h("thead", {}, h("tr", {}, ["seq", "at", "type", "change", "source", "clip", "detail"].map((c) => h("th", {}, c)))),
    h("tbody", {}, items.map((e) => h("tr", {},
      h("td", {}, e.seq), h("td", { title: e.at }, new Date(e.at).toISOString().replace("T", " ").slice(0, 23)),
      h("td", {}, e.type === "anomaly" ? chip("anomaly") : e.type),
      h("td", {}, e.from_status ? chip(e.from_status) : "", " → ", chip(e.to_status)),
      h("td", {}, e.source), h("td", { class: "mono" }, e.clip_id || ""),
      h("td", {}, e.detail ? h("details", {}, h("summary", {}, "raw"), h("pre", {}, JSON.stringify(e.detail, null, 2))) : "")))));
}

function deliveryTable(task, items) {
  if (!items.length) return h("p", { class: "muted" }, task.notify_hook ? "Nothing sent yet." : "No notify_hook: nothing is sent.");
  const redeliverAll = h("button", {
    "data-testid": "redeliver",
    onclick: async () => {
      redeliverAll.disabled = true;
      const r = await api(`/tasks/${encodeURIComponent(task.task_id)}/redeliver`, { method: "POST" });
      redeliverAll.textContent = `Re-queued ${r.items.length}`;
      setTimeout(() => openTask(task.task_id, true), 800);
    },
  }, "Redeliver failed and dead");
  return h("div", {}, h("p", {}, redeliverAll),
    h("table", { "data-testid": "deliveries" },
      h("thead", {}, h("tr", {}, ["id", "seq", "status", "attempts", "last answer", "next attempt", "", "attempt log"].map((c) => h("th", {}, c)))),
      h("tbody", {}, items.map((d) => h("tr", { "data-testid": "delivery", "data-status": d.status },
        h("td", { class: "mono" }, d.id), h("td", {}, d.event_seq), h("td", {}, chip(d.status)), h("td", {}, d.attempts),
        h("td", {}, d.last_status_code ?? d.last_error ?? "—"), h("td", {}, d.next_attempt_at ? ago(d.next_attempt_at) : "—"),
        h("td", {}, h("button", { class: "ghost", onclick: async (ev) => {
          ev.target.disabled = true;
          await api(`/deliveries/${d.id}/retry`, { method: "POST" });
          setTimeout(() => openTask(task.task_id, true), 800);
        } }, "Redeliver")),
        h("td", {}, attemptLog(d.attempt_log || [])))))));
}

function attemptLog(attempts) {
  if (!attempts.length) return h("span", { class: "muted" }, "none yet");
  return h("details", {}, h("summary", {}, `${attempts.length} attempt${attempts.length > 1 ? "s" : ""}`),
    h("table", { class: "attempts" }, h("tbody", {}, attempts.map((a) => h("tr", {},
      h("td", {}, `#${a.attempt}`), h("td", {}, new Date(a.at).toISOString().slice(11, 23)),
      h("td", {}, a.status_code ?? a.error_class ?? "—"), h("td", {}, a.duration_ms === null ? "" : `${a.duration_ms.toFixed(0)} ms`),
      h("td", {}, a.error || ""), h("td", {}, a.response_body ? h("pre", {}, a.response_body) : ""))))));
}

// --- wiring --------------------------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/tasks\/(.+)$/);
  $("#list-view").hidden = !!match;
  $("#task-view").hidden = !match;
  if (match) openTask(decodeURIComponent(match[1]));
  else {
    state.openTask = null;
    loadTasks().catch(() => {});
  }
}

function readFilters() {
  const form = $("#filters");
  const data = Object.fromEntries(new FormData(form));
  data.status = [...form.querySelectorAll(".chip.toggle.on")].map((c) => c.dataset.status);
  state.filters = data;
  state.cursors = [null];
  state.page = 0;
}

let started = false;
function start() {
  loadStats().catch(() => {});
  loadCharts().catch(() => {});
  route();
  stream();
  if (started) return;
  started = true;
  setInterval(refreshHeaderSoon, 15000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#status-filter").replaceChildren(...STATUSES.map((s) => {
    const c = chip(s);
    c.classList.add("toggle");
    c.setAttribute("role", "checkbox");
    c.addEventListener("click", () => c.classList.toggle("on"));
    return c;
  }));
  $("#filters").addEventListener("submit", (e) => {
    e.preventDefault();
    readFilters();
    loadTasks().catch((err) => { $("#empty").hidden = false; $("#empty").textContent = err.message; });
  });
  $("#filters").addEventListener("reset", () => {
    document.querySelectorAll(".chip.toggle.on").forEach((c) => c.classList.remove("on"));
    setTimeout(() => { readFilters(); loadTasks(); });
  });
  $("#older").addEventListener("click", () => { state.page += 1; loadTasks(); });
  $("#newer").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); loadTasks(); });
  $("#login-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#token").value.trim()); });
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", () => token() && route());
  if (token()) signIn(token());
  else signOut();
});
