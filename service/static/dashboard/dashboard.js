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

/** The interval of metric `name` in a run's (or slice's) `intervals`
 * ({value, ci: [lo, hi], level, replicates}), or null where it has none. */
function intervalOf(intervals, name) {
  const found = intervals ? intervals[name] : null;
  return found && Array.isArray(found.ci) && found.ci.length === 2 ? found : null;
}

/** "[lo, hi]", each bound formatted as a metric. */
function ciText(ci) {
  return `[${fmtMetric(ci[0])}, ${fmtMetric(ci[1])}]`;
}

/** A confidence level as a percentage: 0.95 → "95%". */
function levelText(level) {
  return typeof level === "number" ? `${Number((100 * level).toFixed(1))}%` : "";
}

function intervalTitle(interval) {
  return `${levelText(interval.level)} percentile bootstrap interval, ${interval.replicates} replicates`;
}

/** A signed difference: "+0.0123", "-0.0040". */
function signed(value) {
  return typeof value === "number" && value > 0 ? `+${fmtMetric(value)}` : fmtMetric(value);
}

/** A small inline bar of `value` on [0, scale] with the interval `ci` drawn as a whisker over
 * it (CSS: three nodes per cell). Bounds outside [0, scale] are clipped to it. */
function ciBar(value, ci, scale) {
  const bar = el("span", { class: "ci-bar", "aria-hidden": "true" });
  if (typeof value !== "number" || !(scale > 0)) return bar;
  const at = (x) => Math.max(0, Math.min(100, (100 * x) / scale));
  const fill = el("span", { class: "ci-fill" });
  fill.style.width = `${at(value).toFixed(2)}%`;
  bar.append(fill);
  if (ci && typeof ci[0] === "number" && typeof ci[1] === "number") {
    const whisker = el("span", { class: "ci-whisker" });
    whisker.style.left = `${at(ci[0]).toFixed(2)}%`;
    whisker.style.width = `${Math.max(0, at(ci[1]) - at(ci[0])).toFixed(2)}%`;
    bar.append(whisker);
  }
  return bar;
}

/** Metrics bounded by 1 share the scale [0, 1] in the bars; the others scale to the largest
 * bound shown. */
const UNIT_METRICS = /^(accuracy|top_k_accuracy|ece|mce|auroc|average_precision|macro_|micro_|weighted_)/;

function barScale(name, points) {
  if (UNIT_METRICS.test(name)) return 1;
  let top = 0;
  for (const [value, ci] of points) {
    const high = ci && typeof ci[1] === "number" ? ci[1] : value;
    if (typeof high === "number" && Number.isFinite(high)) top = Math.max(top, high);
  }
  return top;
}

/** A gate answer ({passed, checks: [{metric, slice, value, baseline, delta, ci, margin,
 * verdict}]}) as a badge and a table. */
function verdictBadge(verdict) {
  const word = String(verdict ?? "inconclusive").toLowerCase();
  const kind = word.startsWith("pass") ? "pass" : word.startsWith("fail") ? "fail" : "inconclusive";
  return el("span", { class: `verdict verdict-${kind}`, "data-verdict": kind, text: word });
}

function gateView(gate) {
  const checks = Array.isArray(gate.checks) ? gate.checks : [];
  const head = el("p", { class: "gate-head" }, verdictBadge(gate.passed ? "passed" : "failed"),
    ` ${checks.length} check${checks.length === 1 ? "" : "s"}${gate.baseline ? ` against ${gate.baseline}` : ""}`);
  const columns = ["metric", "slice", "value", "baseline", "delta", "ci", "margin", "verdict"];
  const table = el("table", { class: "gate-table" },
    el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { class: c === "metric" || c === "slice" ? "" : "num", text: c })))),
    el("tbody", {}, ...checks.map((check) => el("tr", { "data-metric": check.metric ?? "" },
      el("th", { text: check.metric ?? "–" }),
      el("td", { text: check.slice ?? "all" }),
      el("td", { class: "num", text: fmtMetric(check.value) }),
      el("td", { class: "num", text: fmtMetric(check.baseline) }),
      el("td", { class: "num", text: signed(check.delta) }),
      el("td", { class: "num", text: Array.isArray(check.ci) ? ciText(check.ci) : "–" }),
      el("td", { class: "num", text: fmtMetric(check.margin) }),
      el("td", { class: "num" }, verdictBadge(check.verdict))))));
  return el("div", { class: "gate" }, head, table);
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
  // Ranking metrics are {macro, per_class}; a run's summary carries the macro ("–" without).
  const macro = (name) => {
    const value = run.metrics ? run.metrics[name] : null;
    return value && typeof value === "object" && typeof value.macro === "number" ? value.macro : null;
  };
  return el("tr", { "data-run-id": run.id },
    el("td", {}, check),
    el("td", {}, link, suffix),
    el("td", { class: `status-${run.status}`, text: run.status }),
    el("td", { text: run.loss }),
    tags,
    el("td", { class: "num", text: fmt(run.num_classes) }),
    el("td", { class: "num", text: fmt(run.batches) }),
    el("td", { class: "num", text: fmt(run.count) }),
    el("td", { class: "num", text: fmtMetric(run.value) }),
    el("td", { class: "num", text: fmtMetric(accuracy) }),
    el("td", { class: "num", text: fmtMetric(macro("auroc")) }),
    el("td", { class: "num", text: fmtMetric(macro("average_precision")) }),
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
  const value = intervalOf(run.intervals, "value");
  if (value) items.splice(6, 0, [`Value ${levelText(value.level)} CI`, ciText(value.ci)]);
  if (typeof run.paired_ids === "boolean") {
    items.push(["Example ids", run.paired_ids ? "given (comparisons pair by example)" : "positions (unpaired)"]);
  }
  $("run-summary").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: fmt(v) }))));
}

/** One row of the metrics table: the value, then "[lo, hi] level" where the run has an interval. */
function metricRow(label, value, interval) {
  const row = el("tr", { "data-metric": label }, el("th", { text: label }), el("td", { class: "num", text: fmtMetric(value) }));
  if (interval) {
    row.append(el("td", { class: "ci", title: intervalTitle(interval),
      text: `${ciText(interval.ci)} ${levelText(interval.level)}` }));
  }
  return row;
}

function metricsTable(run) {
  const rows = [];
  const intervals = run.intervals || null;
  for (const [key, value] of Object.entries(run.metrics || {})) {
    if (typeof value === "number" || value === null) rows.push(metricRow(key, value, intervalOf(intervals, key)));
    else if (value && typeof value === "object" && "macro" in value) {
      rows.push(metricRow(`${key} (macro)`, value.macro, intervalOf(intervals, `${key}.macro`)));
    } else if (key === "top_k_accuracy") {
      for (const [k, v] of Object.entries(value)) rows.push(metricRow(`top-${k} accuracy`, v, intervalOf(intervals, `${key}.${k}`)));
    }
  }
  $("metrics-table").tBodies[0].replaceChildren(...rows);
  const without = run.no_interval || [];
  $("metrics-note").textContent = intervals && without.length ? `No interval for: ${without.join(", ")}.` : "";
  $("metrics-note").hidden = !(intervals && without.length);
}

/* Large statistics come from GET /v1/runs/{id}/metrics/{name} (the run's `details`), never
 * from the run itself: a window of the confusion matrix, its top cells and a page of the
 * per-class table, so the page holds O(rows shown) DOM nodes whatever the class count. */
function metricUrl(runId, name, params) {
  const query = new URLSearchParams(params);
  return `/v1/runs/${encodeURIComponent(runId)}/metrics/${name}${query.size ? `?${query}` : ""}`;
}

/** Rows per page of the per-class table. */
const PER_CLASS_ROWS = 50;
const PER_CLASS_LABELS = { precision: "precision", recall: "recall", f1: "F1", support: "support",
  auroc: "AUROC", average_precision: "AP" };
let perClass = { runId: null, sort: "class", order: "asc", offset: 0 };

async function perClassTable(run) {
  const has = (run.details || []).includes("per_class");
  if (perClass.runId !== run.id) perClass = { runId: run.id, sort: "class", order: "asc", offset: 0 };
  $("per-class-empty").hidden = has;
  $("per-class-table").hidden = !has;
  $("per-class-pager").hidden = true;
  if (!has || !run.num_classes) {
    $("per-class-table").hidden = true;
    $("per-class-table").tHead.replaceChildren();
    $("per-class-table").tBodies[0].replaceChildren();
    if (has) { $("per-class-note").textContent = "No batches yet."; $("per-class-pager").hidden = false; }
    $("per-class-prev").hidden = $("per-class-next").hidden = Boolean(has);
    return;
  }
  $("per-class-prev").hidden = $("per-class-next").hidden = false;
  const page = await api(metricUrl(run.id, "per_class", { sort: perClass.sort, order: perClass.order,
    limit: String(PER_CLASS_ROWS), offset: String(perClass.offset) }));
  const columns = Object.keys(PER_CLASS_LABELS).filter((m) => page.rows.length && m in page.rows[0]);
  const header = (key, text, num) => {
    const sorted = perClass.sort === key;
    const th = el("th", { class: `sortable${num ? " num" : ""}${sorted ? " sorted" : ""}`, "data-sort": key,
      title: `sort by ${text}`, text: `${text}${sorted ? (perClass.order === "asc" ? " ▲" : " ▼") : ""}` });
    th.addEventListener("click", guarded(() => {
      if (perClass.sort === key) perClass.order = perClass.order === "asc" ? "desc" : "asc";
      else { perClass.sort = key; perClass.order = key === "class" ? "asc" : "desc"; }
      perClass.offset = 0;
      return perClassTable(run);
    }));
    return th;
  };
  $("per-class-table").tHead.replaceChildren(el("tr", {}, header("class", "class", false),
    ...columns.map((m) => header(m, PER_CLASS_LABELS[m], true))));
  $("per-class-table").tBodies[0].replaceChildren(...page.rows.map((row) => el("tr", { "data-class": row.class },
    el("th", { text: row.name ?? String(row.class) }),
    ...columns.map((m) => el("td", { class: "num", text: m === "support" ? fmt(row[m]) : fmtMetric(row[m]) })))));
  const last = page.offset + page.rows.length;
  if (page.total > page.rows.length) {
    $("per-class-note").textContent = `Showing ${page.offset + 1}–${last}: ${page.rows.length} of ${page.total} classes.`;
    $("per-class-prev").disabled = page.offset === 0;
    $("per-class-next").disabled = last >= page.total;
    $("per-class-pager").hidden = false;
  }
}

function perClassPage(step) {
  return guarded(async () => {
    if (!shownRun) return;
    perClass.offset = Math.max(0, perClass.offset + step * PER_CLASS_ROWS);
    await perClassTable(shownRun);
  });
}

/* Slices: one table per slice key of the run, a page (SLICE_ROWS) at a time from
 * GET /v1/runs/{id}/slices, worst first (the highest loss value) until a header asks for
 * another order; each cell shows the slice's value, its interval and a bar with the whisker. */
const SLICE_ROWS = 50;
/** Metrics where higher is better: a first click on their header sorts them ascending (worst
 * first); every other column (loss value, nll, ece, brier…) sorts descending first. */
const HIGHER_IS_BETTER = /^(accuracy|top_k_accuracy|auroc|average_precision|macro_|micro_|weighted_)/;
let sliceView = { runId: null, keys: new Map() };

function sliceState(run, key) {
  if (sliceView.runId !== run.id) {
    sliceView = { runId: run.id, keys: new Map() };
    $("slice-min-size").value = "0";
  }
  let state = sliceView.keys.get(key);
  if (!state) {
    const prev = el("button", { type: "button", class: "slice-prev", text: "◀ previous" });
    const next = el("button", { type: "button", class: "slice-next", text: "next ▶" });
    const note = el("span", { class: "empty slice-page-note" });
    const block = el("div", { class: "slice-block", "data-key": key },
      el("h4", { text: `by ${key}` }),
      el("table", { class: "slice-table", "data-key": key }, el("thead"), el("tbody")),
      el("p", { class: "slice-hidden flag", hidden: "" }),
      el("p", { class: "controls slice-pager", hidden: "" }, prev, note, next));
    state = { sort: "value", order: "desc", offset: 0, block };
    prev.addEventListener("click", guarded(() => { state.offset = Math.max(0, state.offset - SLICE_ROWS); return sliceTable(shownRun, key); }));
    next.addEventListener("click", guarded(() => { state.offset += SLICE_ROWS; return sliceTable(shownRun, key); }));
    sliceView.keys.set(key, state);
  }
  return state;
}

/** The minimum slice size asked for (a count ≥ 0; 0 shows every slice). */
function minSliceSize() {
  return Math.max(0, Math.floor(Number($("slice-min-size").value) || 0));
}

/** A slice row's metrics flattened to the names of the slices endpoint and the intervals:
 * `accuracy`, `top_k_accuracy.5`, `auroc.macro`. */
function flatMetrics(metrics) {
  const flat = [];
  for (const [name, value] of Object.entries(metrics || {})) {
    if (value !== null && typeof value === "object") {
      for (const [k, v] of Object.entries(value)) flat.push([`${name}.${k}`, v]);
    } else flat.push([name, value]);
  }
  return flat;
}

function metricLabel(name) {
  const [base, k] = name.split(".");
  if (base === "top_k_accuracy" && k) return `top-${k} accuracy`;
  return k ? `${base} (${k})` : base;
}

async function sliceTables(run) {
  const keys = run.slice_keys || [];
  $("slices-section").hidden = keys.length === 0;
  $("slices-note").hidden = true;
  if (!keys.length) { $("slice-tables").replaceChildren(); return; }
  const states = keys.map((key) => sliceState(run, key));
  $("slice-tables").replaceChildren(...states.map((state) => state.block));
  await Promise.all(keys.map((key) => sliceTable(run, key)));
}

async function sliceTable(run, key) {
  const state = sliceState(run, key);
  const minSize = minSliceSize();
  const params = new URLSearchParams({ key, sort: state.sort, order: state.order, limit: String(SLICE_ROWS),
    offset: String(state.offset), min_slice_size: String(minSize) });
  const page = await api(`/v1/runs/${encodeURIComponent(run.id)}/slices?${params}`);
  if (shownRun && shownRun.id !== run.id) return;  // the page moved on meanwhile
  const table = state.block.querySelector("table");
  const rows = page.slices || [];
  const names = [];
  for (const row of rows) for (const [name] of flatMetrics(row.metrics)) if (!names.includes(name)) names.push(name);
  const header = (sortKey, text, num) => {
    const sorted = state.sort === sortKey;
    const th = el("th", { class: `sortable${num ? " num" : ""}${sorted ? " sorted" : ""}`, "data-sort": sortKey,
      title: `sort by ${text}`, text: `${text}${sorted ? (state.order === "asc" ? " ▲" : " ▼") : ""}` });
    th.addEventListener("click", guarded(() => {
      if (state.sort === sortKey) state.order = state.order === "asc" ? "desc" : "asc";
      else {
        state.sort = sortKey;
        state.order = sortKey === "slice" || HIGHER_IS_BETTER.test(sortKey) ? "asc" : "desc";
      }
      state.offset = 0;
      return sliceTable(shownRun, key);
    }));
    return th;
  };
  table.tHead.replaceChildren(el("tr", {}, header("slice", key, false), header("count", "count", true),
    header("value", `value (${run.unit})`, true), ...names.map((name) => header(name, metricLabel(name), true))));
  const column = (name, of) => rows.map((row) => {
    const value = of(row);
    const interval = intervalOf(row.intervals, name);
    return [value, interval ? interval.ci : null];
  });
  const valueOf = (name) => (row) => {
    const found = flatMetrics(row.metrics).find(([n]) => n === name);
    return found ? found[1] : null;
  };
  const scales = { value: barScale("value", column("value", (row) => row.value)) };
  for (const name of names) scales[name] = barScale(name, column(name, valueOf(name)));
  const cell = (row, name, value) => {
    const interval = intervalOf(row.intervals, name);
    const td = el("td", { class: "num slice-metric", "data-metric": name }, el("span", { class: "v", text: fmtMetric(value) }));
    if (interval) td.append(" ", el("span", { class: "ci", title: intervalTitle(interval), text: ciText(interval.ci) }));
    td.append(ciBar(value, interval ? interval.ci : null, scales[name]));
    return td;
  };
  table.tBodies[0].replaceChildren(...rows.map((row) => el("tr", { "data-slice": row.slice, "data-count": row.count },
    el("th", { text: row.slice }),
    el("td", { class: "num", title: row.ignored ? `${fmt(row.ignored)} ignored` : "", text: fmt(row.count) }),
    cell(row, "value", row.value),
    ...names.map((name) => cell(row, name, valueOf(name)(row))))));
  const hiddenNote = state.block.querySelector(".slice-hidden");
  hiddenNote.textContent = page.hidden
    ? `${fmt(page.hidden)} of ${fmt(page.values)} ${key} values have fewer than ${fmt(minSize)} examples and are not shown.`
    : "";
  hiddenNote.hidden = !page.hidden;
  const shown = page.values - page.hidden;
  const pager = state.block.querySelector(".slice-pager");
  const note = state.block.querySelector(".slice-page-note");
  if (!rows.length) {
    note.textContent = page.values ? "No slice this large." : "No slices yet.";
    pager.querySelector(".slice-prev").hidden = pager.querySelector(".slice-next").hidden = true;
    pager.hidden = false;
  } else if (shown > rows.length || state.offset > 0) {
    const last = state.offset + rows.length;
    note.textContent = `Showing ${state.offset + 1}–${last} of ${fmt(shown)} values.`;
    const [prev, next] = [pager.querySelector(".slice-prev"), pager.querySelector(".slice-next")];
    prev.hidden = next.hidden = false;
    prev.disabled = state.offset === 0;
    next.disabled = last >= shown;
    pager.hidden = false;
  } else pager.hidden = true;
}

function gateSection(run) {
  $("gate-section").hidden = !run.gate;
  $("run-gate").replaceChildren(...(run.gate ? [gateView(run.gate)] : []));
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

/* ------------------------------------------------------------- confusion heatmap */

/** Classes of one heatmap window (`?classes=`) for large C; C <= FULL_MATRIX_CLASSES fetches all. */
const CONFUSION_WINDOW = 256;
const FULL_MATRIX_CLASSES = 64;
const TOP_CONFUSIONS = 20;
/** Sequential colour map (light to dark), interpolated into a 256-entry table. */
const HEAT_STOPS = [[255, 247, 236], [253, 212, 158], [252, 141, 89], [215, 48, 31], [127, 0, 0], [60, 0, 70]];
const HEAT_LUT = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (HEAT_STOPS.length - 1);
    const k = Math.min(HEAT_STOPS.length - 2, Math.floor(x));
    const f = x - k;
    for (let ch = 0; ch < 3; ch++) lut[i * 3 + ch] = HEAT_STOPS[k][ch] * (1 - f) + HEAT_STOPS[k + 1][ch] * f;
  }
  return lut;
})();
const HEAT_EMPTY = [247, 248, 251];
const HEAT_MARGIN = 46;

/** The heatmap's state: `classes` (ids of the fetched window), `names`, `matrix` (rows true,
 * columns predicted, Float64Array n×n) and the zoomed `view` [r0, r1) × [c0, c1) into it. */
const heat = { runId: null, numClasses: 0, start: 0, classes: [], names: [], matrix: null, n: 0,
  normalize: false, view: null, drag: null, highlight: null };
window.ceDashboard = {
  heat,
  renderCompareTable: (result, baseline) => renderCompareTable(result, baseline),
  chartLabels: (id) => (charts[id] ? charts[id].data.datasets.map((d) => d.label) : null),
};

function className(i) {
  const name = heat.nameOf && heat.nameOf.get(i);
  return name !== undefined ? `${name} (#${i})` : `#${i}`;
}

async function confusion(run) {
  const has = (run.details || []).includes("confusion_matrix") && run.loss !== "binary_cross_entropy"
    && !(run.loss === "focal" && (run.options || {}).variant !== "softmax");
  $("confusion-empty").hidden = has;
  $("top-figure").hidden = !has;
  $("confusion-box").hidden = !has || !run.num_classes;
  $("confusion-controls").hidden = true;
  $("confusion-note").hidden = true;
  if (!has) return;
  if (!run.num_classes) {
    $("confusion-note").textContent = "No batches yet.";
    $("confusion-note").hidden = false;
    $("top-confusions").replaceChildren();
    return;
  }
  if (heat.runId !== run.id) {
    Object.assign(heat, { runId: run.id, start: 0, view: null, highlight: null, nameOf: new Map() });
    $("confusion-normalize").checked = false;
  }
  heat.numClasses = run.num_classes;
  await Promise.all([loadConfusionWindow(), topConfusions(run)]);
}

function windowIds() {
  if (heat.custom) return heat.custom;
  const C = heat.numClasses;
  const start = Math.max(0, Math.min(heat.start, Math.max(0, C - CONFUSION_WINDOW)));
  heat.start = start;
  return Array.from({ length: Math.min(CONFUSION_WINDOW, C - start) }, (_, i) => start + i);
}

async function loadConfusionWindow() {
  const C = heat.numClasses;
  heat.normalize = $("confusion-normalize").checked;
  const params = heat.normalize ? { normalize: "true" } : {};
  const whole = C <= FULL_MATRIX_CLASSES && !heat.custom;
  const ids = whole ? null : windowIds();
  if (!whole) params.classes = ids.join(",");
  const answer = await api(metricUrl(heat.runId, "confusion_matrix", params));
  const classes = answer.classes || answer.matrix.map((_, i) => i);
  const n = classes.length;
  const matrix = new Float64Array(n * n);
  answer.matrix.forEach((row, i) => matrix.set(row, i * n));
  if (answer.class_names) classes.forEach((c, i) => heat.nameOf.set(c, answer.class_names[i]));
  Object.assign(heat, { classes, matrix, n, view: heat.view && heat.view.n === n ? heat.view : fullView(n) });
  // Few classes: cells of about 48 px rather than a page-wide matrix.
  $("confusion-box").style.maxWidth = `${Math.min(720, HEAT_MARGIN + Math.max(n, 8) * 48)}px`;
  $("confusion-controls").hidden = whole;
  $("confusion-start").value = String(heat.custom ? classes[0] : heat.start);
  $("confusion-start").max = String(Math.max(0, C - 1));
  $("confusion-prev").disabled = !heat.custom && heat.start === 0;
  $("confusion-next").disabled = !heat.custom && heat.start + n >= C;
  $("confusion-note").textContent = whole ? "" : heat.custom
    ? `Classes of the top confusions (${n} of ${C}); ◀ ▶ go back to windows of ${CONFUSION_WINDOW}.`
    : `Classes ${classes[0]}–${classes[n - 1]} of ${C} (windows of ${CONFUSION_WINDOW}).`;
  $("confusion-note").hidden = whole;
  drawHeatmap();
}

function fullView(n) { return { r0: 0, r1: n, c0: 0, c1: n, n }; }

/** Colour index of a cell: log(1 + v·s) / log(1 + max·s), s = 1 for counts and 1000 for rates,
 * so single confusions stay visible next to a dominant diagonal. */
function drawHeatmap() {
  const canvas = $("confusion-canvas");
  const css = canvas.getBoundingClientRect().width || 640;
  const size = Math.round(css * (window.devicePixelRatio || 1));
  if (canvas.width !== size) { canvas.width = size; canvas.height = size; }
  const ctx = canvas.getContext("2d");
  const { r0, r1, c0, c1 } = heat.view;
  const rows = r1 - r0, cols = c1 - c0, n = heat.n;
  let max = 0;
  for (let i = r0; i < r1; i++) for (let j = c0; j < c1; j++) max = Math.max(max, heat.matrix[i * n + j]);
  const scale = heat.normalize ? 1000 : 1;
  const denominator = Math.log1p(max * scale) || 1;
  const image = new ImageData(cols, rows);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const v = heat.matrix[(r0 + i) * n + c0 + j];
      const o = (i * cols + j) * 4;
      if (v > 0) {
        const k = Math.round(255 * Math.log1p(v * scale) / denominator) * 3;
        image.data[o] = HEAT_LUT[k]; image.data[o + 1] = HEAT_LUT[k + 1]; image.data[o + 2] = HEAT_LUT[k + 2];
      } else { image.data[o] = HEAT_EMPTY[0]; image.data[o + 1] = HEAT_EMPTY[1]; image.data[o + 2] = HEAT_EMPTY[2]; }
      image.data[o + 3] = 255;
    }
  }
  const cells = document.createElement("canvas");
  cells.width = cols; cells.height = rows;
  cells.getContext("2d").putImageData(image, 0, 0);
  const ratio = size / css;
  const margin = HEAT_MARGIN * ratio;
  const plot = size - margin;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(cells, margin, margin, plot, plot);
  // Axis labels: every class when cells are tall enough, else evenly spaced ids.
  ctx.fillStyle = "#667085";
  ctx.font = `${10 * ratio}px system-ui, sans-serif`;
  const cellH = plot / rows, cellW = plot / cols;
  const every = (cell) => Math.max(1, Math.ceil((14 * ratio) / cell));
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let i = 0; i < rows; i += every(cellH)) {
    ctx.fillText(axisLabel(heat.classes[r0 + i], cellH / ratio), margin - 3 * ratio, margin + (i + 0.5) * cellH);
  }
  ctx.save();
  ctx.textAlign = "left";
  for (let j = 0; j < cols; j += every(cellW)) {
    ctx.save();
    ctx.translate(margin + (j + 0.5) * cellW, margin - 3 * ratio);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(axisLabel(heat.classes[c0 + j], cellW / ratio), 0, 0);
    ctx.restore();
  }
  ctx.restore();
  // Cells wide enough for text carry their value.
  if (cellW >= 30 * ratio && cellH >= 16 * ratio) {
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
      const v = heat.matrix[(r0 + i) * n + c0 + j];
      const k = v > 0 ? Math.round(255 * Math.log1p(v * scale) / denominator) : 0;
      ctx.fillStyle = k > 150 ? "#fff" : "#1d2330";
      ctx.fillText(heat.normalize ? v.toFixed(2) : fmt(Math.round(v * 100) / 100),
        margin + (j + 0.5) * cellW, margin + (i + 0.5) * cellH);
    }
  }
  if (heat.highlight) {
    const i = heat.classes.indexOf(heat.highlight[0]) - r0, j = heat.classes.indexOf(heat.highlight[1]) - c0;
    if (i >= 0 && i < rows && j >= 0 && j < cols) {
      ctx.strokeStyle = "#2f6fdd"; ctx.lineWidth = 2 * ratio;
      ctx.strokeRect(margin + j * cellW - ratio, margin + i * cellH - ratio, cellW + 2 * ratio, cellH + 2 * ratio);
    }
  }
  if (heat.drag && heat.drag.end) {
    const [a, b] = [heat.drag.start, heat.drag.end];
    ctx.strokeStyle = "#2f6fdd"; ctx.lineWidth = ratio; ctx.setLineDash([4 * ratio, 3 * ratio]);
    ctx.strokeRect(margin + (Math.min(a[1], b[1]) - c0) * cellW, margin + (Math.min(a[0], b[0]) - r0) * cellH,
      (Math.abs(a[1] - b[1]) + 1) * cellW, (Math.abs(a[0] - b[0]) + 1) * cellH);
    ctx.setLineDash([]);
  }
  canvas.dataset.rows = String(rows);
  canvas.dataset.cols = String(cols);
}

/** An axis label: the class name (7 characters) where cells are 40 px or more, else its id. */
function axisLabel(id, cellPx) {
  const name = heat.nameOf && heat.nameOf.get(id);
  return cellPx >= 40 && name !== undefined ? name.slice(0, 7) : String(id);
}

/** The (row, column) index into the window under a mouse event, or null off the cells. */
function cellAt(event) {
  const canvas = $("confusion-canvas");
  const box = canvas.getBoundingClientRect();
  const plot = box.width - HEAT_MARGIN;
  const x = event.clientX - box.left - HEAT_MARGIN, y = event.clientY - box.top - HEAT_MARGIN;
  if (!heat.view || x < 0 || y < 0 || x >= plot || y >= plot) return null;
  const { r0, r1, c0, c1 } = heat.view;
  return [r0 + Math.floor((y / plot) * (r1 - r0)), c0 + Math.floor((x / plot) * (c1 - c0))];
}

function heatTip(event) {
  const tip = $("confusion-tip");
  const cell = cellAt(event);
  if (heat.drag) { heat.drag.end = cell || heat.drag.end; drawHeatmap(); }
  if (!cell) { tip.hidden = true; return; }
  const v = heat.matrix[cell[0] * heat.n + cell[1]];
  tip.textContent = `true: ${className(heat.classes[cell[0]])}\npred: ${className(heat.classes[cell[1]])}\n`
    + (heat.normalize ? `rate: ${fmtMetric(v)}` : `count: ${fmt(v)}`);
  const box = $("confusion-box").getBoundingClientRect();
  tip.style.left = `${event.clientX - box.left + 14}px`;
  tip.style.top = `${event.clientY - box.top + 14}px`;
  tip.hidden = false;
}

/** Wheel: zoom in or out by 1.25 around the cell under the pointer (at least 2 × 2 cells). */
function heatWheel(event) {
  const cell = cellAt(event);
  if (!cell) return;
  event.preventDefault();
  const factor = event.deltaY < 0 ? 1 / 1.25 : 1.25;
  const zoom = (lo, hi, at) => {
    const span = Math.min(heat.n, Math.max(2, Math.round((hi - lo) * factor)));
    const next = Math.round(at - ((at - lo) / (hi - lo)) * span);
    const start = Math.max(0, Math.min(heat.n - span, next));
    return [start, start + span];
  };
  const [r0, r1] = zoom(heat.view.r0, heat.view.r1, cell[0]);
  const [c0, c1] = zoom(heat.view.c0, heat.view.c1, cell[1]);
  heat.view = { r0, r1, c0, c1, n: heat.n };
  drawHeatmap();
  heatTip(event);
}

function heatDown(event) {
  const cell = cellAt(event);
  if (cell) heat.drag = { start: cell, end: null };
}

function heatUp() {
  const drag = heat.drag;
  heat.drag = null;
  if (drag && drag.end && (drag.end[0] !== drag.start[0] || drag.end[1] !== drag.start[1])) {
    const [a, b] = [drag.start, drag.end];
    heat.view = { r0: Math.min(a[0], b[0]), r1: Math.max(a[0], b[0]) + 1,
      c0: Math.min(a[1], b[1]), c1: Math.max(a[1], b[1]) + 1, n: heat.n };
  }
  if (heat.view) drawHeatmap();
}

function heatReset() {
  if (!heat.n) return;
  heat.view = fullView(heat.n);
  drawHeatmap();
}

function heatStep(step) {
  return guarded(async () => {
    heat.start = heat.custom ? Math.max(0, heat.custom[0]) : heat.start + step * CONFUSION_WINDOW;
    heat.custom = null;
    heat.view = null;
    await loadConfusionWindow();
  });
}

/** The largest off-diagonal cells (`?top=20&normalize=true`: count and rate); a click shows the
 * cell on the heatmap (the window holding both classes, or the top confusions' classes). */
async function topConfusions(run) {
  const answer = await api(metricUrl(run.id, "confusion_matrix", { top: String(TOP_CONFUSIONS), normalize: "true" }));
  for (const [id, name] of Object.entries(answer.class_names || {})) heat.nameOf.set(Number(id), name);
  heat.topClasses = [...new Set(answer.top.flatMap((t) => [t.true, t.pred]))].sort((a, b) => a - b);
  $("top-empty").hidden = answer.top.length > 0;
  $("top-confusions").replaceChildren(...answer.top.map((t) => {
    const item = el("li", { "data-true": t.true, "data-pred": t.pred,
      text: `${className(t.true)} → ${className(t.pred)}: ${fmt(t.count)} (${(100 * t.rate).toFixed(1)}% of its row)` });
    item.addEventListener("click", guarded(() => showCell(t.true, t.pred)));
    return item;
  }));
}

async function showCell(t, p) {
  heat.highlight = [t, p];
  const inWindow = heat.classes.includes(t) && heat.classes.includes(p);
  if (!inWindow) {
    if (Math.abs(t - p) < CONFUSION_WINDOW) {
      heat.custom = null;
      heat.start = Math.max(0, Math.min(t, p) - Math.floor((CONFUSION_WINDOW - Math.abs(t - p)) / 2));
    } else heat.custom = heat.topClasses;
    heat.view = null;
    await loadConfusionWindow();
  } else {
    heat.view = fullView(heat.n);
    drawHeatmap();
  }
}

/** Classes whose curves are drawn by default: the first CURVE_CLASSES ids. */
const CURVE_CLASSES = 8;
let curvesRun = null;

/** `roc_curve` / `pr_curve` of a few classes (`?classes=`), as lines of Chart.js. */
async function curves(run) {
  const wanted = ["roc_curve", "pr_curve"].filter((n) => (run.details || []).includes(n));
  $("curves-figure").hidden = wanted.length === 0;
  if (!wanted.length) return;
  if (curvesRun !== run.id) {
    curvesRun = run.id;
    $("curves-classes").value = "";
  }
  $("curves-note").hidden = true;
  if (!run.num_classes) { $("curves-note").textContent = "No batches yet."; $("curves-note").hidden = false; return; }
  let ids = $("curves-classes").value.split(",").map((t) => t.trim()).filter(Boolean).map(Number)
    .filter((c) => Number.isInteger(c) && c >= 0 && c < run.num_classes);
  if (!ids.length) ids = Array.from({ length: Math.min(CURVE_CLASSES, run.num_classes) }, (_, i) => i);
  ids = [...new Set(ids)].slice(0, 64);
  $("curves-classes").value = ids.join(",");
  const axes = { roc_curve: ["fpr", "tpr", "false positive rate", "true positive rate", "roc-chart"],
    pr_curve: ["recall", "precision", "recall", "precision", "pr-chart"] };
  for (const name of ["roc_curve", "pr_curve"]) {
    const chart = axes[name][4];
    $(chart).parentElement.hidden = !wanted.includes(name);
  }
  await Promise.all(wanted.map(async (name) => {
    const [xKey, yKey, xTitle, yTitle, chart] = axes[name];
    const answer = await api(metricUrl(run.id, name, { classes: ids.join(",") }));
    const datasets = answer.classes.map((c, i) => {
      const curve = answer.value[i];
      return { label: heat.runId === run.id ? className(c) : `#${c}`, showLine: true, pointRadius: 0, borderWidth: 1.5,
        borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length],
        data: curve ? curve[xKey].map((x, k) => ({ x, y: curve[yKey][k] })) : [] };
    });
    drawChart(chart, { type: "scatter", data: { datasets },
      options: { scales: { x: { min: 0, max: 1, title: { display: true, text: xTitle } },
        y: { min: 0, max: 1, title: { display: true, text: yTitle } } } } });
  }));
}

async function loadDetails(run) {
  const sections = [["confusion", confusion], ["per-class", perClassTable], ["curves", curves],
    ["slices", sliceTables]];
  await Promise.all(sections.map(([id, section]) => section(run).catch((error) => {
    if (error instanceof AuthError) throw error;
    const note = $(`${id}-note`);
    note.textContent = `Could not load: ${error.message}`;
    note.hidden = false;
    if (id === "per-class") $("per-class-pager").hidden = false;
  })));
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
      if (next.batches !== run.batches) await loadDetails(next);
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
  await loadDetails(run);
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
  gateSection(run);
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
      ...ciBand(run.intervals && run.intervals.value, points.length, COLORS[1], "run value"),
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
        borderColor: COLORS[2], backgroundColor: COLORS[2], pointRadius: lone ? 5 : 1 },
        ...ciBand(run.intervals && run.intervals.accuracy, points.length, COLORS[2], "run accuracy")] },
      options: { scales: { y: { min: 0, max: 1 }, x: { title: { display: true, text: "batch" } } } },
    });
  }
  reliability(run);
}

/** The run's interval [lo, hi] of a metric as a shaded band across a per-batch chart (the
 * running value ends inside it); none without an interval. */
function ciBand(interval, n, color, label) {
  if (!interval || !Array.isArray(interval.ci) || interval.ci.some((x) => x === null)) return [];
  const [lo, hi] = interval.ci;
  const common = { borderColor: color, borderDash: [4, 4], borderWidth: 1, pointRadius: 0 };
  const level = `${Math.round(100 * interval.level)}%`;
  return [
    { ...common, label: `${label} ${level} CI (low)`, data: Array(n).fill(lo), fill: false },
    { ...common, label: `${label} ${level} CI (high)`, data: Array(n).fill(hi), fill: "-1",
      backgroundColor: "rgba(120, 120, 120, 0.15)" },
  ];
}

/* ------------------------------------------------------------------- comparison */

async function openCompare(ids, baseline) {
  show("compare-view");
  // `baseline` asks for deltas against that run (where the service gives them); the first
  // run is the baseline unless the page's hash names another (#compare=A,B&baseline=B).
  const base = baseline && ids.includes(baseline) ? baseline : ids[0];
  const result = await api(`/v1/runs/compare?ids=${ids.map(encodeURIComponent).join(",")}&baseline=${encodeURIComponent(base)}`);
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
  renderCompareTable(result, base);
  document.body.dataset.ready = "compare";
}

/** The comparison's rows: [label, metric name (as in `intervals` and `deltas`), run id →
 * value]. Metrics that only `deltas` names (per-slice ones, say) get rows of their own. */
function flatDeltas(deltas) {
  // {run: {metric: d, slices: {"key=value": {metric: d}}}} → {run: {metric | "metric@key=value": d}}
  const flat = {};
  for (const [id, perMetric] of Object.entries(deltas || {})) {
    const own = {};
    for (const [name, delta] of Object.entries(perMetric || {})) {
      if (name !== "slices") own[name] = delta;
    }
    for (const [where, perSlice] of Object.entries((perMetric || {}).slices || {})) {
      for (const [name, delta] of Object.entries(perSlice || {})) own[`${name}@${where}`] = delta;
    }
    flat[id] = own;
  }
  return flat;
}

function compareRows(result) {
  const rows = [];
  for (const [key, values] of Object.entries(result.table || {})) {
    const first = Object.values(values).find((v) => v !== null && v !== undefined);
    if (first !== undefined && typeof first === "object") {
      for (const k of Object.keys(first)) rows.push([`${key} @${k}`, `${key}.${k}`, (id) => (values[id] ? values[id][k] : null)]);
    } else rows.push([key, key, (id) => values[id]]);
  }
  const known = new Set(rows.map((row) => row[1]));
  const deltas = flatDeltas(result.deltas);
  for (const perMetric of Object.values(deltas)) {
    for (const [name, delta] of Object.entries(perMetric || {})) {
      if (known.has(name)) continue;
      known.add(name);
      rows.push([name, name, (id) => {
        const own = deltas[id] && deltas[id][name];
        return own ? own.value : (delta ? delta.baseline : null);
      }]);
    }
  }
  return rows;
}

/** The comparison table: each run's value with its interval and a bar with the whisker;
 * with `deltas`, each other run's delta to the baseline ± its interval (paired or not); with
 * gates on the runs, their verdicts. Without intervals, deltas or gates, plain values. */
function renderCompareTable(result, baseline) {
  const deltas = result.deltas ? flatDeltas(result.deltas) : null;
  const head = el("tr", {}, el("th", { text: "metric" }), ...result.runs.map((r) => el("th", { class: "num",
    "data-run-id": r.id, text: deltas && r.id === baseline ? `${r.name} (baseline)` : r.name })));
  const rows = compareRows(result).map(([label, name, valueOf]) => {
    const points = result.runs.map((run) => {
      const interval = intervalOf(run.intervals, name);
      return [valueOf(run.id), interval ? interval.ci : null];
    });
    const scale = barScale(name, points);
    return el("tr", { "data-metric": name }, el("th", { text: label }), ...result.runs.map((run, i) => {
      const [value, ci] = points[i];
      const interval = intervalOf(run.intervals, name);
      const td = el("td", { class: "num", "data-run-id": run.id }, el("span", { class: "v", text: fmtMetric(value) }));
      if (interval) td.append(" ", el("span", { class: "ci", title: intervalTitle(interval), text: ciText(ci) }));
      if (interval) td.append(ciBar(value, ci, scale));
      const delta = deltas && run.id !== baseline && deltas[run.id] ? deltas[run.id][name] : null;
      if (delta) {
        const ciPart = Array.isArray(delta.ci) ? ` ${ciText(delta.ci)}` : "";
        const kind = delta.paired === true ? "paired" : delta.paired === false ? "unpaired" : "";
        td.append(el("div", { class: "delta", title: kind ? `${kind} bootstrap interval of the delta` : "",
          text: `Δ ${signed(delta.delta)}${ciPart}${kind ? ` ${kind}` : ""}` }));
      }
      return td;
    }));
  });
  $("compare-table").tHead.replaceChildren(head);
  $("compare-table").tBodies[0].replaceChildren(...rows);
  const level = result.runs.map((run) => intervalOf(run.intervals, "value")).find(Boolean);
  $("compare-note").textContent = level ? `Intervals: ${intervalTitle(level)}.` : "";
  $("compare-note").hidden = !level;
  const gated = result.runs.filter((run) => run.gate);
  $("compare-gates").hidden = gated.length === 0;
  $("compare-gate-list").replaceChildren(...gated.map((run) => el("div", { class: "gate-run", "data-run-id": run.id },
    el("h4", { text: run.name }), gateView(run.gate))));
}

/* ------------------------------------------------------------------------ routing */

async function route() {
  stopRefresh();
  document.body.dataset.ready = "";
  const hash = new URLSearchParams(location.hash.slice(1));
  try {
    if (hash.get("run")) await openRun(hash.get("run"));
    else if (hash.get("compare")) await openCompare(hash.get("compare").split(",").filter(Boolean), hash.get("baseline"));
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
  $("curves-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (shownRun) guarded(() => curves(shownRun).catch((error) => {
      if (error instanceof AuthError) throw error;
      $("curves-note").textContent = `Could not load: ${error.message}`;
      $("curves-note").hidden = false;
    }))();
  });
  $("per-class-prev").addEventListener("click", perClassPage(-1));
  $("per-class-next").addEventListener("click", perClassPage(1));
  $("slices-form").addEventListener("submit", (event) => event.preventDefault());
  $("slice-min-size").addEventListener("change", guarded(async () => {
    if (!shownRun) return;
    for (const state of sliceView.keys.values()) state.offset = 0;
    await sliceTables(shownRun);
  }));
  const canvas = $("confusion-canvas");
  canvas.addEventListener("mousemove", heatTip);
  canvas.addEventListener("mouseleave", () => { $("confusion-tip").hidden = true; });
  canvas.addEventListener("wheel", heatWheel, { passive: false });
  canvas.addEventListener("mousedown", heatDown);
  window.addEventListener("mouseup", heatUp);
  canvas.addEventListener("dblclick", heatReset);
  $("confusion-reset").addEventListener("click", heatReset);
  $("confusion-prev").addEventListener("click", heatStep(-1));
  $("confusion-next").addEventListener("click", heatStep(1));
  $("confusion-normalize").addEventListener("change", guarded(loadConfusionWindow));
  $("confusion-start").addEventListener("change", guarded(async () => {
    heat.start = Math.max(0, Number($("confusion-start").value) || 0);
    heat.custom = null;
    heat.view = null;
    await loadConfusionWindow();
  }));
  window.addEventListener("resize", () => { if (heat.view && !$("run-view").hidden) drawHeatmap(); });
  $("compare-button").addEventListener("click", () => { location.hash = `compare=${[...selected].join(",")}`; });
  window.addEventListener("hashchange", route);
  route();
});
