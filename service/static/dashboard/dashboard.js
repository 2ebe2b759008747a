/* ce-eval dashboard: runs table, per-run curves, reliability diagram, confusion matrix and run
 * comparison, all from the Runs API of the same service (no network beyond it).
 * With API keys on, the page asks for a key once (kept in sessionStorage, for this tab only) and
 * sends it as X-API-Key; the runs shown are that key's. */
"use strict";

const COLORS = ["#2f6fdd", "#e5533d", "#1a9e77", "#b3590b", "#7c4dcc", "#c2185b", "#00838f"];
const charts = {};
const selected = new Set();
let nextCursor = null;

const KEY_STORAGE = "ce-eval-api-key";
/** Refresh period of an open run's page, ms: ?refresh_ms=N on the page URL (100 ms to 10 min),
 * else 5 s. */
const REFRESH_MS = Math.min(600000, Math.max(100,
  Number(new URLSearchParams(location.search).get("refresh_ms")) || 5000));

const $ = (id) => document.getElementById(id);

/** 401/403 from the API: the page needs a (valid) key, not a retry. */
class AuthError extends Error {
  constructor(status) {
    super(status === 401
      ? "This service requires an API key. Enter yours to see its runs."
      : "The API key was rejected (403). Check it and enter it again.");
    this.status = status;
  }
}

function storedKey() {
  try { return sessionStorage.getItem(KEY_STORAGE); } catch { return null; }
}

async function api(path, method = "GET") {
  const headers = { Accept: "application/json" };
  const key = storedKey();
  if (key) headers["X-API-Key"] = key;
  const response = await fetch(path, { method, headers });
  if (response.status === 401 || response.status === 403) throw new AuthError(response.status);
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${path}`);
  return body;
}

function showKeyForm(error) {
  if (error.status === 403) sessionStorage.removeItem(KEY_STORAGE);
  show(null);
  $("key-message").textContent = error.message;
  $("key-form").hidden = false;
  $("key-forget").hidden = true;
  $("api-key").value = "";
  $("api-key").focus();
  document.body.dataset.ready = "auth";
}

function showKeyState() {
  $("key-form").hidden = true;
  $("key-forget").hidden = !storedKey();
}

/** Counts and other plain values: integers with thousands separators. */
function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Math.abs(value) >= 1e4 || Math.abs(value) < 1e-3 ? value.toExponential(3) : value.toFixed(digits);
}

/** Every metric and loss value: 4 decimals (1 as 1.0000), or 3 in scientific notation when
 * 0 < |v| < 1e-3 or |v| ≥ 1e4; "–" for no value. */
function fmtMetric(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  const size = Math.abs(value);
  return value !== 0 && (size < 1e-3 || size >= 1e4) ? value.toExponential(3) : value.toFixed(4);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function drawChart(id, config) {
  if (charts[id]) charts[id].destroy();
  config.options = Object.assign(
    { animation: false, responsive: true, maintainAspectRatio: false,
      plugins: { legend: { position: "bottom" } } },
    config.options || {},
  );
  charts[id] = new Chart($(id), config);
  return charts[id];
}

function show(view) {
  for (const id of ["runs-view", "run-view", "compare-view"]) $(id).hidden = id !== view;
  if (view) showKeyState();
}

/* ------------------------------------------------------------------ runs table */

function runsQuery(cursor) {
  const params = new URLSearchParams({ limit: "50" });
  const name = $("filter-name").value.trim();
  const tag = $("filter-tag").value.trim();
  const status = $("filter-status").value;
  if (name) params.set("name", name);
  if (tag) params.append("tag", tag);
  if (status) params.set("status", status);
  if (cursor) params.set("cursor", cursor);
  return `/v1/runs?${params}`;
}

/** ISO time as "YYYY-MM-DD HH:MM:SS" (UTC, as the API gives it). */
function when(iso) {
  return (iso || "").replace("T", " ").slice(0, 19);
}

function runRow(run) {
  const check = el("input", { type: "checkbox", "aria-label": `select ${run.name}` });
  check.checked = selected.has(run.id);
  check.addEventListener("change", () => {
    if (check.checked) selected.add(run.id); else selected.delete(run.id);
    $("compare-button").disabled = selected.size < 2;
  });
  const tags = el("td");
  for (const [key, value] of Object.entries(run.tags)) tags.append(el("span", { class: "tag", text: `${key}:${value}` }));
  const link = el("a", { href: `#run=${encodeURIComponent(run.id)}`, text: run.name });
  // Runs may share a name: the id's tail and the creation time tell them apart.
  const suffix = el("span", { class: "run-id", title: run.id, text: ` …${run.id.slice(-6)}` });
  const accuracy = run.metrics && typeof run.metrics.accuracy === "number" ? run.metrics.accuracy : null;
  return el("tr", { "data-run-id": run.id },
    el("td", {}, check),
    el("td", {}, link, suffix),
    el("td", { class: `status-${run.status}`, text: run.status }),
    el("td", { text: run.loss }),
    tags,
    el("td", { class: "num", text: fmt(run.batches) }),
    el("td", { class: "num", text: fmt(run.count) }),
    el("td", { class: "num", text: fmtMetric(run.value) }),
    el("td", { class: "num", text: fmtMetric(accuracy) }),
    el("td", { text: when(run.created_at) }),
    el("td", { text: when(run.updated_at) }),
  );
}

async function loadRuns(append = false) {
  $("runs-error").hidden = true;
  try {
    const page = await api(runsQuery(append ? nextCursor : null));
    const body = $("runs-table").tBodies[0];
    if (!append) body.replaceChildren();
    for (const run of page.runs) body.append(runRow(run));
    nextCursor = page.next_cursor;
    $("more-button").hidden = !nextCursor;
  } catch (error) {
    if (error instanceof AuthError) throw error;
    $("runs-error").textContent = error.message;
    $("runs-error").hidden = false;
  }
}

/* ---------------------------------------------------------------------- one run */

async function allBatches(runId) {
  const points = [];
  let cursor = null;
  do {
    const params = new URLSearchParams({ limit: "10000" });
    if (cursor) params.set("cursor", cursor);
    const page = await api(`/v1/runs/${encodeURIComponent(runId)}/batches?${params}`);
    points.push(...page.batches);
    cursor = page.next_cursor;
  } while (cursor && points.length < 100000);
  return points;
}

function summary(run) {
  const items = [["Status", run.status], ["Loss", run.loss], ["Batches", run.batches],
    ["Count", run.count], ["Ignored", run.ignored], [`Value (${run.unit})`, fmtMetric(run.value)],
    ["Reduction", `${run.reduction} / ${run.normalization}`], ["Created", run.created_at]];
  $("run-summary").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: fmt(v) }))));
}

function metricsTable(run) {
  const rows = [];
  for (const [key, value] of Object.entries(run.metrics || {})) {
    if (typeof value === "number" || value === null) rows.push(el("tr", {}, el("th", { text: key }), el("td", { class: "num", text: fmtMetric(value) })));
    else if (key === "top_k_accuracy") {
      for (const [k, v] of Object.entries(value)) rows.push(el("tr", {}, el("th", { text: `top-${k} accuracy` }), el("td", { class: "num", text: fmtMetric(v) })));
    }
  }
  $("metrics-table").tBodies[0].replaceChildren(...rows);
}

/** Most classes the per-class table lists (the first ones by index); a note says when cut. */
const PER_CLASS_ROWS = 50;

function perClassTable(run) {
  const metrics = run.metrics || {};
  const columns = ["precision", "recall", "f1"].filter((m) => Array.isArray(metrics[m]));
  const support = Array.isArray(metrics.support) ? metrics.support : null;
  $("per-class-empty").hidden = columns.length > 0;
  $("per-class-table").hidden = columns.length === 0;
  $("per-class-note").hidden = true;
  if (!columns.length) { $("per-class-table").tHead.replaceChildren(); $("per-class-table").tBodies[0].replaceChildren(); return; }
  const classes = metrics[columns[0]].length;
  const names = run.class_names && run.class_names.length === classes ? run.class_names : null;
  const shown = Math.min(classes, PER_CLASS_ROWS);
  $("per-class-table").tHead.replaceChildren(el("tr", {}, el("th", { text: "class" }),
    ...columns.map((m) => el("th", { class: "num", text: m === "f1" ? "F1" : m })),
    ...(support ? [el("th", { class: "num", text: "support" })] : [])));
  const rows = [];
  for (let c = 0; c < shown; c++) {
    rows.push(el("tr", {}, el("th", { text: names ? names[c] : String(c) }),
      ...columns.map((m) => el("td", { class: "num", text: fmtMetric(metrics[m][c]) })),
      ...(support ? [el("td", { class: "num", text: fmt(support[c]) })] : [])));
  }
  $("per-class-table").tBodies[0].replaceChildren(...rows);
  if (shown < classes) {
    $("per-class-note").textContent = `Showing the first ${shown} of ${classes} classes.`;
    $("per-class-note").hidden = false;
  }
}

function reliability(run) {
  const bins = (run.metrics || {}).reliability;
  $("reliability-empty").hidden = Boolean(bins);
  $("reliability-chart").parentElement.hidden = !bins;
  if (!bins) return;
  // Empty bins have no accuracy or confidence: leave gaps rather than drawing zeros.
  const filled = (values) => values.map((v, i) => (bins.count[i] > 0 ? v : null));
  const centers = bins.bin_edges.slice(0, -1).map((lo, i) => ((lo + bins.bin_edges[i + 1]) / 2).toFixed(2));
  drawChart("reliability-chart", {
    data: {
      labels: centers,
      datasets: [
        { type: "bar", label: "accuracy", data: filled(bins.accuracy), backgroundColor: "rgba(47,111,221,0.7)" },
        { type: "line", label: "confidence", data: filled(bins.confidence), borderColor: "#e5533d", pointRadius: 2,
          spanGaps: true },
        { type: "line", label: "perfect calibration", data: centers.map(Number), borderColor: "#999",
          borderDash: [4, 4], pointRadius: 0 },
      ],
    },
    options: { scales: { y: { min: 0, max: 1 }, x: { title: { display: true, text: "confidence bin" } } } },
  });
}

/** Most classes the confusion table shows (its first rows and columns). */
const CONFUSION_CLASSES = 30;

function confusion(run) {
  const matrix = (run.metrics || {}).confusion_matrix;
  $("confusion-empty").hidden = Boolean(matrix);
  $("confusion-note").hidden = true;
  const box = $("confusion");
  box.replaceChildren();
  if (!matrix) return;
  const names = run.class_names && run.class_names.length === matrix.length ? run.class_names : matrix.map((_, i) => String(i));
  // At most CONFUSION_CLASSES² cells in the page: larger matrices show their top-left corner.
  const shown = Math.min(matrix.length, CONFUSION_CLASSES);
  $("confusion-note").hidden = shown === matrix.length;
  $("confusion-note").textContent = `Showing the first ${shown} of ${matrix.length} classes (shares are of the whole row).`;
  const head = el("tr", {}, el("th", { text: "true \\ pred" }), ...names.slice(0, shown).map((n) => el("th", { text: n })));
  const rows = matrix.slice(0, shown).map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", { text: names[i] }), ...row.slice(0, shown).map((value) => {
      const share = value / total;
      const cell = el("td", { text: fmt(Math.round(value * 100) / 100, 2), title: `${(share * 100).toFixed(1)}% of row` });
      cell.style.background = `rgba(47,111,221,${(0.08 + 0.85 * share).toFixed(3)})`;
      cell.style.color = share > 0.55 ? "#fff" : "#1d2330";
      return cell;
    }));
  });
  box.append(el("table", { id: "confusion-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

/* An open run's page refetches the run every REFRESH_MS (the batches only when their count
 * changed) and stops once the run is closed or the page leaves it. */
let refresh = { timer: null, token: 0 };

function stopRefresh() {
  clearTimeout(refresh.timer);
  refresh = { timer: null, token: refresh.token + 1 };
  document.body.dataset.refresh = "off";
}

function scheduleRefresh(run, points) {
  if (run.status !== "open") { document.body.dataset.refresh = "off"; return; }
  const token = refresh.token;
  document.body.dataset.refresh = "on";
  refresh.timer = setTimeout(async () => {
    try {
      const next = await api(`/v1/runs/${encodeURIComponent(run.id)}`);
      const nextPoints = next.batches === run.batches ? points : await allBatches(run.id);
      if (token !== refresh.token) return;  // the page moved on meanwhile
      renderRun(next, nextPoints);
      scheduleRefresh(next, nextPoints);
    } catch (error) {
      if (token !== refresh.token) return;
      stopRefresh();
      if (error instanceof AuthError) { showKeyForm(error); return; }
      runError(`refresh stopped: ${error.message}`);
    }
  }, REFRESH_MS);
}

async function openRun(runId) {
  show("run-view");
  const [run, points] = await Promise.all([api(`/v1/runs/${encodeURIComponent(runId)}`), allBatches(runId)]);
  renderRun(run, points);
  document.body.dataset.ready = "run";
  scheduleRefresh(run, points);
}

/* Close and delete: a run is visible only to the key that created it (or to all, with auth
 * off), so whoever sees the run page may close or delete it; both ask first. */
let shownRun = null;

function runError(message) {
  $("run-error").textContent = message;
  $("run-error").hidden = !message;
}

async function closeRun() {
  const run = shownRun;
  if (!run || !confirm(`Close run "${run.name}" (${run.id})? It will accept no more batches.`)) return;
  await api(`/v1/runs/${encodeURIComponent(run.id)}/close`, "POST");
  await route();
}

async function deleteRun() {
  const run = shownRun;
  if (!run || !confirm(`Delete run "${run.name}" (${run.id}) and all its batches? This cannot be undone.`)) return;
  stopRefresh();
  await api(`/v1/runs/${encodeURIComponent(run.id)}`, "DELETE");
  selected.delete(run.id);
  location.hash = "";
}

function renderRun(run, points) {
  shownRun = run;
  runError("");
  $("close-run").hidden = run.status !== "open";
  $("delete-run").hidden = false;
  $("run-title").textContent = `${run.name} (${run.id})`;
  $("run-tags").replaceChildren(...Object.entries(run.tags || {}).map(([k, v]) => el("span", { class: "tag", text: `${k}:${v}` })));
  summary(run);
  metricsTable(run);
  const seq = points.map((p) => p.seq);
  // A line needs two points: a lone batch gets visible markers instead of a 1-pixel dot.
  const lone = points.length === 1;
  const empty = points.length === 0;
  $("batches-empty").hidden = !empty;
  $("loss-chart").parentElement.hidden = empty;
  if (empty && charts["loss-chart"]) { charts["loss-chart"].destroy(); delete charts["loss-chart"]; }
  if (!empty) drawChart("loss-chart", {
    type: "line",
    data: { labels: seq, datasets: [
      { label: "batch value", data: points.map((p) => p.value), borderColor: COLORS[0], backgroundColor: COLORS[0],
        pointRadius: lone ? 5 : 1 },
      { label: "running value", data: points.map((p) => p.cumulative_value), borderColor: COLORS[1],
        backgroundColor: COLORS[1], pointRadius: lone ? 4 : 0, pointStyle: lone ? "rectRot" : "circle" },
    ] },
    options: { scales: { x: { title: { display: true, text: "batch" } } } },
  });
  const hasAccuracy = points.some((p) => p.metrics && typeof p.metrics.accuracy === "number");
  $("accuracy-empty").textContent = empty ? "No batches yet." : "No accuracy metric in this run.";
  $("accuracy-empty").hidden = hasAccuracy;
  $("accuracy-chart").parentElement.hidden = !hasAccuracy;
  if (hasAccuracy) {
    drawChart("accuracy-chart", {
      type: "line",
      data: { labels: seq, datasets: [{ label: "accuracy", data: points.map((p) => p.metrics.accuracy ?? null),
        borderColor: COLORS[2], backgroundColor: COLORS[2], pointRadius: lone ? 5 : 1 }] },
      options: { scales: { y: { min: 0, max: 1 }, x: { title: { display: true, text: "batch" } } } },
    });
  }
  reliability(run);
  confusion(run);
  perClassTable(run);
}

/* ------------------------------------------------------------------- comparison */

async function openCompare(ids) {
  show("compare-view");
  const result = await api(`/v1/runs/compare?ids=${ids.map(encodeURIComponent).join(",")}`);
  const series = await Promise.all(result.runs.map((run) => allBatches(run.id)));
  const longest = Math.max(1, ...series.map((s) => s.length));
  drawChart("compare-chart", {
    type: "line",
    data: {
      labels: Array.from({ length: longest }, (_, i) => i + 1),
      datasets: result.runs.map((run, i) => ({ label: run.name, data: series[i].map((p) => p.cumulative_value),
        borderColor: COLORS[i % COLORS.length], pointRadius: 0 })),
    },
    options: { scales: { x: { title: { display: true, text: "batch" } } } },
  });
  const head = el("tr", {}, el("th", { text: "metric" }), ...result.runs.map((r) => el("th", { class: "num", text: r.name })));
  const rows = [];
  for (const [key, values] of Object.entries(result.table)) {
    const first = Object.values(values)[0];
    if (first !== null && typeof first === "object") {
      for (const k of Object.keys(first)) rows.push(el("tr", {}, el("th", { text: `${key} @${k}` }),
        ...result.runs.map((r) => el("td", { class: "num", text: fmtMetric(values[r.id] ? values[r.id][k] : null) }))));
    } else {
      rows.push(el("tr", {}, el("th", { text: key }), ...result.runs.map((r) => el("td", { class: "num", text: fmtMetric(values[r.id]) }))));
    }
  }
  $("compare-table").tHead.replaceChildren(head);
  $("compare-table").tBodies[0].replaceChildren(...rows);
  document.body.dataset.ready = "compare";
}

/* ------------------------------------------------------------------------ routing */

async function route() {
  stopRefresh();
  document.body.dataset.ready = "";
  const hash = new URLSearchParams(location.hash.slice(1));
  try {
    if (hash.get("run")) await openRun(hash.get("run"));
    else if (hash.get("compare")) await openCompare(hash.get("compare").split(",").filter(Boolean));
    else { show("runs-view"); await loadRuns(); document.body.dataset.ready = "runs"; }
  } catch (error) {
    if (error instanceof AuthError) { showKeyForm(error); return; }
    show("runs-view");
    $("runs-error").textContent = error.message;
    $("runs-error").hidden = false;
    document.body.dataset.ready = "error";
  }
}

function guarded(action) {
  return () => action().catch((error) => {
    if (error instanceof AuthError) showKeyForm(error); else throw error;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); guarded(loadRuns)(); });
  $("more-button").addEventListener("click", guarded(() => loadRuns(true)));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    route();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); route(); });
  $("close-run").addEventListener("click", guarded(() => closeRun().catch((error) => {
    if (error instanceof AuthError) throw error;
    runError(error.message);
  })));
  $("delete-run").addEventListener("click", guarded(() => deleteRun().catch((error) => {
    if (error instanceof AuthError) throw error;
    runError(error.message);
  })));
  $("compare-button").addEventListener("click", () => { location.hash = `compare=${[...selected].join(",")}`; });
  window.addEventListener("hashchange", route);
  route();
});
