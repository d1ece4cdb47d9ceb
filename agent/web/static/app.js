// The status page: one fetch of the last hour, then server-sent events. Plain DOM and SVG,
// no framework, no build step, nothing from the network but this agent.
"use strict";

const HOUR_S = 3600;
const MAX_POINTS = 3600;
const state = { summary: null, series: {}, outputs: {}, outboxRows: [], uplink: [],
                windows: {}, warnings: [] };
const built = { sensors: {}, models: {} };
const seenWindow = {};

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function fmt(v, unit) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (unit === "1") unit = "";
  const s = Number.isInteger(v) ? String(v) : a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  return unit ? `${s} ${unit}` : s;
}

function push(arr, t, v) {
  if (typeof v !== "number" || !isFinite(v)) return;
  if (arr.length && t < arr[arr.length - 1][0]) return;
  arr.push([t, v]);
  const cutoff = Date.now() / 1000 - HOUR_S;
  while (arr.length && (arr[0][0] < cutoff || arr.length > MAX_POINTS)) arr.shift();
}

const SVG_NS = "http://www.w3.org/2000/svg";
// One or more series on a shared scale: the first is the main line, a second (an actual
// value beside a forecast) is drawn in the "actual" style.
function sparkline(svg, points, ...others) {
  svg.replaceChildren();
  const all = [points, ...others].filter(p => p && p.length);
  svg.classList.toggle("empty", points.length < 2);
  if (points.length < 2) return;
  let t0 = Infinity, t1 = -Infinity, lo = Infinity, hi = -Infinity;
  for (const series of all)
    for (const [t, v] of series) {
      t0 = Math.min(t0, t); t1 = Math.max(t1, t); lo = Math.min(lo, v); hi = Math.max(hi, v);
    }
  const span = hi - lo, w = t1 - t0 || 1;
  // A constant series is drawn mid-height, not along the bottom edge.
  const y = v => span ? 24 - 22 * (v - lo) / span : 13;
  all.forEach((series, i) => {
    const line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points", series.map(([t, v]) =>
      `${(100 * (t - t0) / w).toFixed(2)},${y(v).toFixed(2)}`).join(" "));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    if (i) line.setAttribute("class", "actual");
    svg.append(line);
  });
}

function sparkSvg(key) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "spark empty");
  svg.setAttribute("viewBox", "0 0 100 26");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.dataset.series = key;
  return svg;
}

function renderSensors() {
  const root = document.getElementById("sensors");
  for (const s of state.summary.sensors) {
    let card = built.sensors[s.name];
    if (!card) {
      card = el("div", { class: "sensor", "data-sensor": s.name },
        el("div", { class: "head" }, el("span", { class: "name" }, s.name),
           el("span", { class: "driver" }, s.driver), el("span", { class: "badge state" })),
        el("div", { class: "quantities" }), el("div", { class: "muted error" }));
      root.append(card);
      built.sensors[s.name] = card;
    }
    const badge = card.querySelector(".state");
    badge.textContent = s.state; badge.className = `badge state ${s.state}`;
    card.querySelector(".error").textContent = s.state === "up" ? "" : (s.last_error || "");
    const quantities = new Set(Object.keys(s.last_values || {}));
    for (const ch of Object.keys(state.series))
      if (ch.startsWith(s.name + ".")) quantities.add(ch.slice(s.name.length + 1));
    const box = card.querySelector(".quantities");
    for (const q of [...quantities].sort()) {
      const ch = `${s.name}.${q}`;
      let row = box.querySelector(`[data-channel="${CSS.escape(ch)}"]`);
      if (!row) {
        row = el("div", { class: "q", "data-channel": ch }, el("span", { class: "label" }, q),
                 el("span", { class: "value" }), sparkSvg(ch));
        box.append(row);
      }
      const last = (s.last_values || {})[q];
      const live = state.series[ch] || [];
      const value = last ? last.value : (live.length ? live[live.length - 1][1] : null);
      row.querySelector(".value").textContent = fmt(value, last ? last.unit : "");
      sparkline(row.querySelector("svg"), live);
    }
  }
}

function renderModels() {
  const root = document.getElementById("models");
  const models = state.summary.models || {};
  if (!Object.keys(models).length) root.textContent = "No model configured.";
  for (const [name, m] of Object.entries(models)) {
    let box = built.models[name];
    if (!box) {
      box = el("div", { class: "model", "data-model": name });
      root.append(box);
      built.models[name] = box;
    }
    const rows = [el("tr", {}, el("th", {}, name),
      el("td", {}, el("span", { class: `badge ${m.source || ""}` }, m.source || "–")),
      el("td", {}, `skill ${fmt(m.skill)}`), el("td", {}, `${fmt(m.latency_ms, "ms")}`),
      el("td", { class: "muted" }, (m.version || "").slice(0, 10)))];
    for (const [out, v] of Object.entries(m.last_outputs || {})) {
      const key = `${name}.${out}`;
      const spark = sparkSvg(key);
      const isForecast = out === m.forecast_output;
      sparkline(spark, state.outputs[key] || [],
                ...(isForecast ? [state.outputs[`${key}:actual`] || []] : []));
      const label = isForecast ? el("td", { title: "forecast (blue) against the actual value (grey)" },
                                    `${out} vs actual`) : el("td", {}, out);
      rows.push(el("tr", { class: isForecast ? "output forecast" : "output" }, label,
                   el("td", { class: "num" }, fmt(v)), el("td", { colspan: "3" }, spark)));
    }
    box.replaceChildren(el("table", {}, ...rows));
  }
}

function renderOutbox() {
  const ob = state.summary.outbox || {}, up = state.summary.uplink || {};
  const spark = sparkSvg("outbox.rows");
  sparkline(spark, state.outboxRows);
  const strip = el("div", { class: "strip", title: "uplink state, last hour" },
    ...state.uplink.slice(-120).map(([, s]) => el("span", { class: s })));
  const drops = Object.entries(ob.drops || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
  document.getElementById("outbox").replaceChildren(
    el("table", {},
      el("tr", {}, el("td", {}, "stored"), el("td", { class: "num", id: "outbox-rows" },
                                           fmt(ob.rows)), el("td", {}, "messages")),
      el("tr", {}, el("td", {}, "size"), el("td", { class: "num" }, fmt(ob.bytes)),
         el("td", {}, "bytes")),
      el("tr", {}, el("td", {}, "oldest"), el("td", { class: "num" }, fmt(ob.oldest_age_s)),
         el("td", {}, "s")),
      el("tr", {}, el("td", {}, "dropped"), el("td", { colspan: "2" }, drops)),
      el("tr", {}, el("td", {}, "quarantined"), el("td", { class: "num" }, fmt(ob.quarantine_rows)),
         el("td", {}, ""))),
    spark,
    el("p", {}, "uplink ", el("span", { class: `badge ${up.state}`, id: "uplink-state" }, up.state || "–"),
       ` ${up.broker || ""} · PUBACK ${fmt(up.puback_latency_ms, "ms")} · reconnects ${fmt(up.reconnects)}`),
    strip);
}

function renderWindows() {
  const rows = [];
  for (const [stream, w] of Object.entries(state.windows)) {
    const end = new Date(w.end_ns / 1e6).toLocaleTimeString();
    rows.push(el("tr", {}, el("th", { colspan: "3" }, `${stream} · ${end}`)));
    for (const [ch, c] of Object.entries(w.channels || {}))
      rows.push(el("tr", {}, el("td", {}, ch), el("td", { class: "num" }, fmt(c.mean, c.unit)),
                   el("td", { class: "num muted" }, `n=${c.count}`)));
  }
  document.getElementById("windows").replaceChildren(
    rows.length ? el("table", {}, ...rows) : "No window closed yet.");
}

function renderWarnings() {
  const items = state.warnings.slice(-20).reverse().map(w =>
    el("li", { class: w.level }, `${new Date(w.ts * 1000).toLocaleTimeString()} ${w.logger}: ${w.message}`));
  document.getElementById("warnings").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none")]));
}

function render() {
  if (!state.summary) return;
  const a = state.summary.agent || {};
  document.getElementById("gateway").textContent = a.gateway || "";
  document.getElementById("version").textContent = a.version ? `v${a.version}` : "";
  document.getElementById("uptime").textContent = a.uptime_s ? `up ${fmt(a.uptime_s)} s` : "";
  renderSensors(); renderModels(); renderOutbox(); renderWindows(); renderWarnings();
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; render(); });
}

function onStatus(summary) {
  state.summary = summary;
  if (summary.warnings) state.warnings = summary.warnings;
  const now = Date.now() / 1000;
  push(state.outboxRows, now, summary.outbox.rows);
  if (summary.uplink.state) state.uplink.push([now, summary.uplink.state]);
  for (const [name, m] of Object.entries(summary.models || {})) {
    // A new model window: its forecast (drawn at the window it forecasts) and the actual.
    if (!m.window_start_ns || m.window_start_ns === seenWindow[name]) continue;
    seenWindow[name] = m.window_start_ns;
    const t = m.window_start_ns / 1e9;
    for (const [out, v] of Object.entries(m.last_outputs || {}))
      push(state.outputs[`${name}.${out}`] ||= [],
           out === m.forecast_output ? t + (m.window_s || 0) : t, v);
    if (m.forecast_output && typeof m.last_actual === "number")
      push(state.outputs[`${name}.${m.forecast_output}:actual`] ||= [], t, m.last_actual);
  }
  schedule();
}

function onUpdate(u) {
  for (const [ch, [t, v, unit, quality]] of Object.entries(u.readings || {})) {
    push(state.series[ch] ||= [], t, v);
    const [sensor, q] = [ch.slice(0, ch.indexOf(".")), ch.slice(ch.indexOf(".") + 1)];
    const s = state.summary && state.summary.sensors.find(x => x.name === sensor);
    if (s) (s.last_values ||= {})[q] = { value: v, unit, quality };
  }
  for (const w of u.windows || []) state.windows[w.name] = w;
  for (const inf of u.inferences || []) {
    if (inf.shadow) continue;
    const m = state.summary && state.summary.models[inf.name];
    if (m) m.last_outputs = { ...(m.last_outputs || {}), ...inf.outputs };
  }
  schedule();
}

async function start() {
  const r = await fetch("/api/status", { cache: "no-store" });
  const body = await r.json();
  const h = body.history;
  state.series = h.channels; state.outputs = h.outputs; state.outboxRows = h.outbox_rows;
  state.uplink = h.uplink; state.windows = h.windows; state.warnings = h.warnings;
  onStatus(body.summary);
  const live = document.getElementById("live");
  const es = new EventSource("/events");
  es.onopen = () => { live.textContent = "live"; live.className = "badge on"; };
  es.onerror = () => { live.textContent = "offline"; live.className = "badge off"; };
  es.addEventListener("status", e => onStatus(JSON.parse(e.data)));
  es.addEventListener("update", e => onUpdate(JSON.parse(e.data)));
}

start();
