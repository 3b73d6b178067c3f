// lrpilot's web view: the jobs table and one job's curves, read from /api every few seconds.
// Read-only: steering stays on the admin socket (lrpilot set-lr, reload, ...).
"use strict";

const REFRESH_MS = 3000;
const PER_PAGE = 50;
// LR changes drawn across the LR chart, by audit reason; the rest get a short tick at the top.
const LINES = { override: "#e67e22", reload: "#8e44ad", divergence: "#c0392b" };
const TICKS = { range_test: "#16a085" };
const OTHER = "#95a5a6";
const SUGGESTIONS = { valley: "#2ca02c", steep: "#ff7f0e", minimum: "#9467bd" };

const state = { q: "", page: 1, job: null, cache: null, busy: false, again: false,
  lrChart: null, lrKey: "",
  rangeChart: null, rangeKey: "", events: [], rangeTest: null };

const $ = (id) => document.getElementById(id);

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Number(v.toPrecision(digits)).toString();
}

function age(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.message) || `${url}: HTTP ${r.status}`);
  return body;
}

// -- the jobs table -------------------------------------------------------------------------

function renderJobs(data) {
  $("summary").textContent = `${data.total} jobs` +
    (state.q ? `, ${data.matched} match "${state.q}"` : "");
  state.page = data.page;
  $("page").textContent = `page ${data.page} of ${data.pages}`;
  $("prev").disabled = data.page <= 1;
  $("next").disabled = data.page >= data.pages;
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  for (const j of data.jobs) {
    const tr = document.createElement("tr");
    tr.className = "job-row" + (j.job === state.job ? " selected" : "") +
      (j.finished ? " finished" : "");
    tr.dataset.job = j.job;
    const name = cell(tr, "");
    const a = document.createElement("a");
    a.href = `/?job=${encodeURIComponent(j.job)}`;
    a.textContent = j.job;
    name.appendChild(a);
    cell(tr, j.finished ? "finished" : fmt(j.workers));
    cell(tr, j.unit === "step" && j.epoch !== null ? `step ${j.epoch}` : fmt(j.epoch));
    cell(tr, fmt(j.lr));
    cell(tr, j.monitor || "-");
    cell(tr, fmt(j.value));
    cell(tr, fmt(j.best));
    cell(tr, j.patience === null || j.patience === undefined ? "-" : `${j.wait}/${j.patience}`);
    cell(tr, j.policy);
    cell(tr, j.phase || "-");
    cell(tr, j.override ? `pinned ${fmt(j.override.lr)}` : "-");
    cell(tr, age(j.last_report_age_s));
    tr.addEventListener("click", (ev) => { ev.preventDefault(); select(j.job); });
    body.appendChild(tr);
  }
  $("jobs-empty").hidden = data.jobs.length > 0;
}

// -- one job --------------------------------------------------------------------------------

function chartWidth() {
  return Math.max(480, Math.min(1200, document.body.clientWidth - 60));
}

function drawEvents(u) {
  const ctx = u.ctx, { left, top, width, height } = u.bbox;
  ctx.save();
  for (const ev of state.events) {
    if (ev.epoch === null || ev.reason === "initial") continue;
    const x = u.valToPos(ev.epoch, "x", true);
    if (x < left || x > left + width) continue;
    const line = LINES[ev.reason];
    ctx.strokeStyle = line || TICKS[ev.reason] || OTHER;
    ctx.lineWidth = line ? 2 * devicePixelRatio : 1.5 * devicePixelRatio;
    ctx.setLineDash(line ? [6 * devicePixelRatio, 4 * devicePixelRatio] : []);
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, line ? top + height : top + 10 * devicePixelRatio);
    ctx.stroke();
  }
  ctx.restore();
}

function lrChart(d) {
  const names = Object.keys(d.metrics);
  const monitor = d.monitor && names.includes(d.monitor) ? d.monitor : names[0];
  const others = names.filter((n) => n !== monitor);
  const unit = d.unit || "epoch";
  const series = [
    { label: unit },
    { label: "lr (trained)", scale: "lr", stroke: "#d62728", width: 2,
      paths: uPlot.paths.stepped({ align: 1 }), value: (u, v) => fmt(v) },
  ];
  const data = [d.x, d.lr];
  for (const name of monitor ? [monitor, ...others] : []) {
    series.push({ label: name, scale: "y", stroke: name === monitor ? "#1f77b4" : "#7f7f7f",
      width: name === monitor ? 2 : 1, show: name === monitor, value: (u, v) => fmt(v) });
    data.push(d.metrics[name]);
  }
  const key = `${d.job}|${d.run}|${series.map((s) => s.label).join(",")}`;
  if (state.lrChart && state.lrKey === key) {
    state.lrChart.setData(data);
    return;
  }
  if (state.lrChart) state.lrChart.destroy();
  $("lr-chart").replaceChildren();
  state.lrKey = key;
  state.lrChart = new uPlot({
    width: chartWidth(), height: 320,
    scales: { x: { time: false }, lr: { distr: 3 }, y: {} },
    axes: [
      { label: unit },
      { scale: "lr", label: "learning rate (log)", size: 70,
        values: (u, vals) => vals.map((v) => v === null ? "" : v.toExponential(0)) },
      { scale: "y", side: 1, label: monitor || "", grid: { show: false }, size: 70 },
    ],
    series,
    hooks: { draw: [drawEvents] },
  }, data, $("lr-chart"));
}

function drawSuggestions(u) {
  const rt = state.rangeTest;
  if (!rt) return;
  const ctx = u.ctx, { top, height } = u.bbox;
  ctx.save();
  ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
  let row = 0;
  for (const [name, lr] of Object.entries(rt.suggestions || {})) {
    if (lr === null) continue;
    row += 1;  // one label line each: suggestions close together must not overlap
    const x = u.valToPos(lr, "x", true);
    const chosen = name === rt.suggest;
    ctx.strokeStyle = ctx.fillStyle = SUGGESTIONS[name] || "#000";
    ctx.lineWidth = (chosen ? 2.5 : 1.2) * devicePixelRatio;
    ctx.setLineDash(chosen ? [] : [5 * devicePixelRatio, 4 * devicePixelRatio]);
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
    ctx.fillText(`${name} ${fmt(lr, 2)}${chosen ? " (suggested)" : ""}`, x + 4,
      top + 16 * row * devicePixelRatio);
  }
  ctx.restore();
}

function rangeChart(job, rt) {
  state.rangeTest = rt;
  const section = $("range-test");
  if (!rt || !rt.points || rt.points.length === 0) {
    section.hidden = true;
    if (state.rangeChart) { state.rangeChart.destroy(); state.rangeChart = null; }
    return;
  }
  section.hidden = false;
  const s = rt.suggestions || {};
  const status = rt.done ? `stopped: ${rt.stop_reason}` : "still sweeping";
  $("range-test-info").textContent = `${rt.points.length} points, ${status}; suggested lr ` +
    `${fmt(rt.suggested_lr, 3)} (${rt.suggest}); valley ${fmt(s.valley, 3)}, ` +
    `steep ${fmt(s.steep, 3)}, minimum ${fmt(s.minimum, 3)}`;
  const lrs = rt.points.map((p) => p[0]);
  const data = [lrs, rt.points.map((p) => p[1]), rt.points.map((p) => p[2])];
  // The blow-up that stops the sweep would flatten the rest of the curve: cut it off.
  const smooth = rt.points.slice(0, -1).map((p) => p[2]).filter((v) => v !== null);
  const raw = rt.points.map((p) => p[1]).filter((v) => v !== null);
  const hi = Math.max(...(smooth.length ? smooth : raw)), lo = Math.min(...raw, ...smooth);
  const key = `${job}|${rt.points.length}|${rt.done}`;
  if (state.rangeChart && state.rangeKey === key) return;
  if (state.rangeChart) state.rangeChart.destroy();
  $("range-chart").replaceChildren();
  state.rangeKey = key;
  state.rangeChart = new uPlot({
    width: chartWidth(), height: 300,
    scales: { x: { time: false, distr: 3 }, y: { range: () => [lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo)] } },
    axes: [
      { label: "learning rate (log)", values: (u, vals) => vals.map((v) => v === null ? "" : v.toExponential(0)) },
      { label: "training loss", size: 60 },
    ],
    series: [
      { label: "lr", value: (u, v) => fmt(v) },
      { label: "loss", stroke: "#999", paths: () => null, points: { show: true, size: 4, fill: "#999" } },
      { label: "smoothed", stroke: "#1f77b4", width: 2 },
    ],
    hooks: { draw: [drawSuggestions] },
  }, data, $("range-chart"));
}

function renderEvents(rows) {
  const body = $("events").tBodies[0];
  body.replaceChildren();
  for (const r of rows.slice(-200).reverse()) {
    const tr = document.createElement("tr");
    tr.className = `event ev-${r.reason}`;
    cell(tr, r.time);
    cell(tr, fmt(r.epoch));
    cell(tr, fmt(r.old_lr));
    cell(tr, fmt(r.new_lr));
    cell(tr, r.reason === "divergence" ? "divergence (rollback)" : r.reason);
    cell(tr, r.source);
    cell(tr, r.detail || "");
    body.appendChild(tr);
  }
}

function renderJob(d) {
  $("job").hidden = false;
  $("job-title").textContent = d.job;
  const st = d.status;
  const runs = d.runs.length > 1 ? ` (${d.runs.length} runs recorded)` : "";
  $("job-info").textContent = st
    ? `${st.policy}${st.phase ? ", phase " + st.phase : ""}; lr ${fmt(st.lr)}; ` +
      `${d.unit} ${fmt(st.epoch)}; ${st.workers} worker${st.workers === 1 ? "" : "s"}; ` +
      `run ${d.run}${runs}; ` +
      `${d.x.length} points recorded`
    : `not in memory; run ${d.run}${runs}; ${d.x.length} points recorded`;
  state.events = d.events;
  $("no-points").hidden = d.x.length > 0;
  lrChart(d);
  rangeChart(d.job, d.range_test);
  renderEvents(d.events);
}

// -- refresh --------------------------------------------------------------------------------

// Appends the points of `d` (those after the cache's last) to the cached run's columns.
function merge(c, d) {
  const out = { ...d, x: c.x.concat(d.x), epoch: c.epoch.concat(d.epoch), lr: c.lr.concat(d.lr),
    time: c.time.concat(d.time), metrics: {} };
  const names = new Set([...Object.keys(c.metrics), ...Object.keys(d.metrics)]);
  for (const name of [...names].sort()) {
    const old = c.metrics[name] || new Array(c.x.length).fill(null);
    const add = d.metrics[name] || new Array(d.x.length).fill(null);
    out.metrics[name] = old.concat(add);
  }
  return out;
}

// The job's current run: only the points past those the page has, unless the run changed,
// or the controller thinned the run or dropped points (a resume): then all of it again.
async function jobMetrics(job) {
  const base = `/api/jobs/${encodeURIComponent(job)}/metrics`;
  const c = state.cache;
  if (c && c.job === job && c.x.length > 0) {
    const d = await getJSON(`${base}?run=${c.run}&after=${c.x[c.x.length - 1]}`);
    const current = !d.status || d.status.run === c.run;
    const merged = merge(c, d);
    if (current && merged.x.length === d.count) {
      state.cache = merged;
      return merged;
    }
  }
  state.cache = await getJSON(base);
  return state.cache;
}

async function refresh() {
  if (state.busy) {  // a click or a filter while one is under way: once more right after it
    state.again = true;
    return;
  }
  state.busy = true;
  state.again = false;
  try {
    const q = new URLSearchParams({ q: state.q, page: state.page, per_page: PER_PAGE });
    renderJobs(await getJSON(`/api/jobs?${q}`));
    if (state.job) {
      try {
        renderJob(await jobMetrics(state.job));
      } catch (err) {
        $("job").hidden = false;
        $("job-title").textContent = state.job;
        $("job-info").textContent = String(err.message || err);
      }
    }
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("updated").textContent = `cannot reach the controller: ${err.message || err}`;
  } finally {
    state.busy = false;
    if (state.again) refresh();
  }
}

function select(job) {
  state.job = job;
  history.pushState(null, "", job ? `/?job=${encodeURIComponent(job)}` : "/");
  refresh();
}

function init() {
  const params = new URLSearchParams(location.search);
  state.job = params.get("job");
  state.q = params.get("q") || "";
  $("filter").value = state.q;
  let timer = null;
  $("filter").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = $("filter").value; state.page = 1; refresh(); }, 250);
  });
  $("prev").addEventListener("click", () => { state.page -= 1; refresh(); });
  $("next").addEventListener("click", () => { state.page += 1; refresh(); });
  window.addEventListener("popstate", () => {
    state.job = new URLSearchParams(location.search).get("job");
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

init();
