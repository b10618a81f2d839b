// llmd's admin page: hand-written, no dependencies, no build step.
// The admin key lives in sessionStorage and travels only as an Authorization header: fetch()
// for JSON, and a fetch() stream reader for /admin/events (an EventSource cannot send headers).
"use strict";

const KEY = "llmd.adminKey";
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac"];
const $ = (sel) => document.querySelector(sel);
const fmt = (n) => Number(n).toLocaleString("en-US");

let usageRows = [];
let eventsAbort = null;

// --- DOM helpers (text only: nothing from the server is parsed as HTML) ---------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillTable(sel, rows) {
  const body = $(sel + " tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c));
    return tr;
  }));
}

// --- the API ---------------------------------------------------------------------------------------

class AuthError extends Error {}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = Object.assign({ Authorization: "Bearer " + key }, options.headers || {});
  const resp = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (resp.status === 401 || resp.status === 403) {
    let msg = resp.statusText;
    try { msg = (await resp.json()).error.message; } catch (e) { /* keep the status text */ }
    throw new AuthError(msg);
  }
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try { msg = (await resp.json()).error.message; } catch (e) { /* keep the status text */ }
    throw new Error(msg);
  }
  return resp;
}

// --- sign in / out ------------------------------------------------------------------------------------

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await api("/admin/status");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    throw e;
  }
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = null;
  for (const id of ["tabs", "live", "logout"]) $("#" + id).hidden = true;
  for (const s of document.querySelectorAll(".tab")) s.hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

function showApp() {
  $("#login").hidden = true;
  $("#login-error").textContent = "";
  for (const id of ["tabs", "live", "logout"]) $("#" + id).hidden = false;
  showTab("usage");
  loadUsage();
  loadKeys();
  streamEvents();
}

function showTab(name) {
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
}

function failed(e, where) {
  if (e instanceof AuthError) signOut("Refused: " + e.message);
  else $(where).textContent = e.message;
}

// --- usage ----------------------------------------------------------------------------------------------

async function loadUsage() {
  $("#usage-error").textContent = "";
  try {
    const resp = await api("/admin/usage/daily?month=" + encodeURIComponent($("#month").value));
    usageRows = (await resp.json()).rows;
  } catch (e) {
    usageRows = [];
    failed(e, "#usage-error");
  }
  for (const [sel, field] of [["#f-key", "key_id"], ["#f-model", "model"], ["#f-tier", "tier"]]) {
    const select = $(sel);
    const keep = select.value;
    const values = [...new Set(usageRows.map((r) => r[field]))].sort();
    select.replaceChildren(el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, v || "(none)")));
    select.value = values.includes(keep) ? keep : "";
  }
  drawUsage();
}

function filteredRows() {
  const k = $("#f-key").value, m = $("#f-model").value, t = $("#f-tier").value;
  return usageRows.filter((r) => (!k || r.key_id === k) && (!m || r.model === m) && (!t || r.tier === t));
}

function drawUsage() {
  const rows = filteredRows();
  const sum = (f) => rows.reduce((a, r) => a + r[f], 0);
  $("#total-tokens").textContent = fmt(sum("total_tokens"));
  $("#total-requests").textContent = fmt(sum("requests"));
  $("#total-prompt").textContent = fmt(sum("prompt_tokens"));
  $("#total-completion").textContent = fmt(sum("completion_tokens"));
  $("#total-errors").textContent = fmt(sum("errors"));
  drawChart($("#chart-key"), rows, "key_id");
  drawChart($("#chart-model"), rows, "model");
  fillTable("#usage-table", rows.map((r) => [r.day, r.key_id, r.tier, r.model, fmt(r.requests),
    fmt(r.prompt_tokens), fmt(r.completion_tokens), fmt(r.total_tokens), fmt(r.cached_tokens), fmt(r.errors)]));
}

// A stacked bar chart of total tokens per day of the month, one color per group.
function drawChart(box, rows, field) {
  const [year, month] = $("#month").value.split("-").map(Number);
  const days = new Date(Date.UTC(year, month, 0)).getUTCDate();
  const groups = [...new Set(rows.map((r) => r[field]))].sort();
  const per = Array.from({ length: days }, () => ({}));
  for (const r of rows) {
    const d = Number(r.day.slice(8, 10)) - 1;
    per[d][r[field]] = (per[d][r[field]] || 0) + r.total_tokens;
  }
  const max = Math.max(1, ...per.map((p) => Object.values(p).reduce((a, b) => a + b, 0)));
  const W = 640, H = 220, L = 56, B = 24, T = 8;
  const bw = (W - L - 4) / days;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "tokens per day by " + field });
  for (const frac of [0, 0.5, 1]) {
    const y = T + (H - T - B) * (1 - frac);
    chart.append(svg("line", { x1: L, x2: W, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end", class: "axis" }, fmt(Math.round(max * frac))));
  }
  per.forEach((p, d) => {
    let y = H - B;
    groups.forEach((g, i) => {
      const v = p[g] || 0;
      if (!v) return;
      const h = (H - T - B) * v / max;
      y -= h;
      const rect = svg("rect", { x: L + d * bw + 1, y, width: Math.max(1, bw - 2), height: h, fill: COLORS[i % COLORS.length] });
      rect.append(svg("title", {}, `${year}-${String(month).padStart(2, "0")}-${String(d + 1).padStart(2, "0")} ${g}: ${fmt(v)} tokens`));
      chart.append(rect);
    });
    if ((d + 1) % 5 === 0 || d === 0) {
      chart.append(svg("text", { x: L + d * bw + bw / 2, y: H - 8, "text-anchor": "middle", class: "axis" }, String(d + 1)));
    }
  });
  const legend = el("ul", { class: "legend" }, ...groups.map((g, i) => {
    const swatch = el("span", { class: "swatch c" + (i % COLORS.length) });
    return el("li", {}, swatch, g || "(none)");
  }));
  if (!groups.length) legend.append(el("li", {}, "no usage this month"));
  box.replaceChildren(chart, legend);
}

async function downloadCsv() {
  // The server's CSV of the same query, fetched with the header, saved from a blob: URL.
  const q = new URLSearchParams({ month: $("#month").value, format: "csv" });
  for (const [sel, name] of [["#f-key", "key"], ["#f-model", "model"], ["#f-tier", "tier"]]) {
    if ($(sel).value) q.set(name, $(sel).value);
  }
  try {
    const blob = await (await api("/admin/usage/daily?" + q)).blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: `llmd-usage-${$("#month").value}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  } catch (e) {
    failed(e, "#usage-error");
  }
}

// --- live state: /admin/events ------------------------------------------------------------------

function setLive(on, text) {
  const live = $("#live");
  live.textContent = text;
  live.classList.toggle("off", !on);
}

async function streamEvents() {
  let delay = 500;
  while (sessionStorage.getItem(KEY)) {
    const abort = new AbortController();
    eventsAbort = abort;
    try {
      const resp = await api("/admin/events", { signal: abort.signal, headers: { Accept: "text/event-stream" } });
      setLive(true, "live");
      delay = 500;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
    } catch (e) {
      if (e instanceof AuthError) { signOut("Refused: " + e.message); return; }
      if (abort.signal.aborted) return;
    }
    if (!sessionStorage.getItem(KEY)) return;
    setLive(false, "reconnecting");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(5000, delay * 2);
  }
}

function onEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (event === "snapshot" && data.length) drawSnapshot(JSON.parse(data.join("\n")));
}

function stateCell(state) {
  return el("td", {}, el("span", { class: "state " + state }, state));
}

function drawSnapshot(s) {
  fillTable("#replica-table", s.replicas.map((r) => [
    r.replica + (r.draining ? " (draining)" : "") + (r.ejected ? " (ejected)" : ""),
    r.backend, stateCell(r.state), r.pid ?? "", (r.cpus || []).join(","), (r.gpus || []).join(","), r.slots,
    r.in_flight, fmt(r.served), r.restarts,
    Object.entries(r.backend_metrics || {}).map(([k, v]) => `${k}=${Math.round(v * 100) / 100}`).join(" "),
  ]));
  for (const tr of document.querySelectorAll("#replica-table tbody tr")) tr.dataset.replica = tr.cells[0].textContent;
  fillTable("#queue-table", s.queues.map((q) => [q.model, `${q.depth} / ${q.max_queue}`, q.oldest_wait_s.toFixed(1) + " s",
    q.last_wait_s.toFixed(2) + " s", `${q.in_flight} / ${q.slots}`]));
  const win = (w) => (w ? `${fmt(w.remaining)} of ${fmt(w.limit)} left` + (w.reset_s ? `, resets in ${w.reset_s} s` : "") : "unlimited");
  $("#limit-month").textContent = s.month;
  fillTable("#limit-table", s.limits.map((k) => {
    const m = k.monthly_tokens;
    const month = el("td", {}, m.limit ? `${fmt(m.used)} of ${fmt(m.limit)}` : `${fmt(m.used)} (no quota)`);
    if (m.limit) {
      const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
      bar.firstChild.style.width = Math.min(100, (100 * m.used) / m.limit) + "%";
      month.append(bar);
    }
    return [k.key_id, k.tier, `${k.in_flight} / ${k.max_concurrent ?? "∞"}`, win(k.requests_per_minute),
      win(k.requests_per_hour), win(k.tokens_per_minute), month];
  }));
}

// --- keys -----------------------------------------------------------------------------------------------

async function loadKeys() {
  try {
    const data = await (await api("/admin/keys")).json();
    fillTable("#key-table", data.keys.map((k) => [k.id, k.tier, k.models ? k.models.join(", ") : "all",
      k.admin ? "yes" : "", k.revoked ? "revoked" : "",
      Object.entries(k.limits || {}).filter(([, v]) => v !== null).map(([n, v]) => `${n}=${v}`).join(" ")]));
    const tier = $("#new-tier");
    tier.replaceChildren(el("option", { value: "" }, "none"), ...data.tiers.map((t) => el("option", { value: t }, t)));
  } catch (e) {
    failed(e, "#keys-error");
  }
}

async function newKey(ev) {
  ev.preventDefault();
  $("#keys-error").textContent = "";
  try {
    const body = JSON.stringify({ id: $("#new-id").value, tier: $("#new-tier").value || null });
    const k = await (await api("/admin/keys/new", { method: "POST", body, headers: { "Content-Type": "application/json" } })).json();
    $("#new-secret").textContent = k.secret;
    $("#new-yaml").textContent = k.yaml;
    $("#new-key").hidden = false;
  } catch (e) {
    failed(e, "#keys-error");
  }
}

// --- start ------------------------------------------------------------------------------------------------

function thisMonth() {
  const d = new Date();
  return `${d.getUTCFullYear()}-${String(d.getUTCMonth() + 1).padStart(2, "0")}`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("#month").value = thisMonth();
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("#key");
    try {
      await signIn(input.value.trim());
      input.value = "";
      showApp();
    } catch (e) {
      input.value = "";
      $("#login-error").textContent = "Refused: " + e.message;
    }
  });
  $("#logout").addEventListener("click", () => signOut(""));
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#month").addEventListener("change", loadUsage);
  for (const sel of ["#f-key", "#f-model", "#f-tier"]) $(sel).addEventListener("change", drawUsage);
  $("#csv").addEventListener("click", downloadCsv);
  $("#new-key-form").addEventListener("submit", newKey);
  if (sessionStorage.getItem(KEY)) showApp();
});
